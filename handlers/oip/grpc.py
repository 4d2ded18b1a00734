"""The Open Inference Protocol over gRPC: the protocol's standard service, `inference.GRPCInferenceService`, with
Triton's model configuration and repository calls, on our own HTTP/2 (grpc_calls.py, http2.py) on the worker's loop;
tritonclient.grpc and KServe's client talk to it. Messages to the pipeline (pipeline.py) and its answers back to
messages: nothing else."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ..protocol import triton, v2_grpc
from .config import Config
from .flow_control import Tally
from .grpc_calls import Method, Server, Status
from .handoff import Handoff
from .pipeline import ABANDONED, CUDA_SHM, Pipeline, refusal
from .repository import RepositoryError

CODES = {
    400: Status.INVALID_ARGUMENT,
    401: Status.UNAUTHENTICATED,
    404: Status.NOT_FOUND,
    409: Status.ABORTED,
    413: Status.RESOURCE_EXHAUSTED,
    501: Status.UNIMPLEMENTED,
    503: Status.UNAVAILABLE,
}


def code(status: int) -> Status:
    """gRPC's status for an HTTP one: every other 4xx is the client's invalid argument, every 5xx internal."""
    return CODES.get(status, Status.INVALID_ARGUMENT if status < 500 else Status.INTERNAL)


def methods(pipeline: Pipeline) -> dict[str, Method]:
    """The service's methods by name."""
    pb, tr = v2_grpc.messages(), triton.messages()

    async def fail(e: Exception, context) -> None:
        status, message = refusal(e)
        await context.abort(code(status), message)

    async def server_live(request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(request, context):
        return pb.ServerReadyResponse(ready=pipeline.ready)

    async def server_metadata(request, context):
        return pb.ServerMetadataResponse(**pipeline.server_metadata())

    async def model_ready(request, context):
        try:
            pipeline.served(request.name, request.version)
        except RepositoryError:  # a model or version this server does not serve is simply not ready, as in Triton
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=pipeline.ready)

    async def model_metadata(request, context):
        try:
            meta = pipeline.model_metadata(request.name, request.version)
        except Exception as e:
            await fail(e, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def model_config(request, context):
        try:
            return triton.config_message(pipeline.model_config(request.name, request.version))
        except Exception as e:
            await fail(e, context)

    async def model_statistics(request, context):
        try:
            return triton.statistics_message(pipeline.statistics(request.name or None, request.version or None))
        except Exception as e:
            await fail(e, context)

    async def shm_status(request, context):
        try:
            rows = pipeline.shm_status(request.name or None)
        except Exception as e:
            await fail(e, context)
        response = tr["SystemSharedMemoryStatusResponse"]()
        for row in rows:
            response.regions[row["name"]].CopyFrom(response.RegionStatus(**row))
        return response

    async def shm_change(op: str, params: dict, context) -> None:
        answered = asyncio.get_running_loop().create_future()
        pipeline.repository_call(op, None, params, answered.set_result)
        r = await answered
        if not r.get("ok"):
            await context.abort(code(r.get("status", 500)), r["error"])

    async def shm_register(request, context):
        params = {"name": request.name, "key": request.key, "offset": request.offset, "byte_size": request.byte_size}
        await shm_change("shm_register", params, context)
        return tr["SystemSharedMemoryRegisterResponse"]()

    async def shm_unregister(request, context):
        await shm_change("shm_unregister", {"name": request.name or None}, context)
        return tr["SystemSharedMemoryUnregisterResponse"]()

    async def authorized(context) -> None:
        if not pipeline.authorized(context.header("authorization"), context.peer()):
            message = "the repository calls need the admin token: authorization: Bearer TOKEN metadata"
            await context.abort(Status.UNAUTHENTICATED, message)

    async def admin(op: str, model: str, parameters: dict, context) -> None:
        await authorized(context)
        answered = asyncio.get_running_loop().create_future()
        pipeline.repository_call(op, model, parameters, answered.set_result)
        r = await answered
        if not r.get("ok"):
            await context.abort(code(r.get("status", 500)), r["error"])

    async def repository_index(request, context):
        await authorized(context)
        response = tr["RepositoryIndexResponse"]()
        for row in pipeline.index():
            response.models.add(**row)
        return response

    async def repository_load(request, context):
        await admin("load", request.model_name, triton.parameters(request), context)
        return tr["RepositoryModelLoadResponse"]()

    async def repository_unload(request, context):
        await admin("unload", request.model_name, triton.parameters(request), context)
        return tr["RepositoryModelUnloadResponse"]()

    async def infer(request, peer: str, traceparent, protocol: str = "grpc"):
        """One ModelInferRequest through the pipeline to its ModelInferResponse; an exception for a refusal."""
        flight, status = None, 500
        try:
            flight = pipeline.begin(
                protocol,
                request.model_name,
                request.model_version,
                client=peer,
                traceparent=traceparent,
                nbytes=request.ByteSize(),
            )
            served = flight.served
            rows = flight.decode(decode, served.decode, served.limit, request, pipeline.shm)
            if isinstance(rows, asyncio.Future):
                rows = await rows
            flight.request_id = request.id[:128]
            outputs = served.encode(await flight.enqueue(rows), rows)
            shm = pipeline.shm
            response = v2_grpc.infer_response(served.name, served.version, request, outputs, served.labels, shm)
            status = 200
            return response
        except asyncio.CancelledError:  # the client cancelled or went away: its rows left the queue with the task
            status = ABANDONED
            raise
        except Exception as e:
            status = refusal(e, log=False)[0]  # the caller's refusal says it, once
            raise
        finally:
            if flight is not None:
                flight.finish(status)

    async def model_infer(request, context):
        try:
            return await infer(request, context.peer(), context.header("traceparent"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await fail(e, context)

    async def model_stream_infer(requests, context):
        """Triton's streaming endpoint for ordinary models: every request on the stream answered on it, in the
        order their passes end, each answer or error carrying the request's id (an error does not end the stream)."""
        peer, traceparent = context.peer(), context.header("traceparent")
        writing, running = asyncio.Lock(), set()

        async def one(request) -> None:
            if isinstance(request, Undecodable):  # answered on the stream, which goes on
                answer = v2_grpc.stream_response(error=request.message, request_id="")
                async with writing:
                    await context.write(answer)
                return
            try:
                answer = v2_grpc.stream_response(await infer(request, peer, traceparent, "grpc-stream"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                answer = v2_grpc.stream_response(error=refusal(e)[1], request_id=request.id)
            async with writing:
                await context.write(answer)

        async for request in requests:
            task = asyncio.get_running_loop().create_task(one(request))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    unary = {
        "ServerLive": (server_live, pb.ServerLiveRequest),
        "ServerReady": (server_ready, pb.ServerReadyRequest),
        "ServerMetadata": (server_metadata, pb.ServerMetadataRequest),
        "ModelReady": (model_ready, pb.ModelReadyRequest),
        "ModelMetadata": (model_metadata, pb.ModelMetadataRequest),
        "ModelInfer": (model_infer, pb.ModelInferRequest),
        "ModelConfig": (model_config, tr["ModelConfigRequest"]),
        "ModelStatistics": (model_statistics, tr["ModelStatisticsRequest"]),
        "SystemSharedMemoryStatus": (shm_status, tr["SystemSharedMemoryStatusRequest"]),
        "SystemSharedMemoryRegister": (shm_register, tr["SystemSharedMemoryRegisterRequest"]),
        "SystemSharedMemoryUnregister": (shm_unregister, tr["SystemSharedMemoryUnregisterRequest"]),
        "RepositoryIndex": (repository_index, tr["RepositoryIndexRequest"]),
        "RepositoryModelLoad": (repository_load, tr["RepositoryModelLoadRequest"]),
        "RepositoryModelUnload": (repository_unload, tr["RepositoryModelUnloadRequest"]),
    }
    found = {name: Method(guarded(fn), parsing(req), handed=name == "ModelInfer") for name, (fn, req) in unary.items()}

    async def cuda_shm(request, context):
        await context.abort(Status.UNIMPLEMENTED, CUDA_SHM)

    for call in ("Status", "Register", "Unregister"):  # any request reads as nothing: we read none of it
        found[f"CudaSharedMemory{call}"] = Method(cuda_shm, lambda _: None)
    found["ModelStreamInfer"] = Method(model_stream_infer, parsing(pb.ModelInferRequest), streaming=True)
    return found


@dataclass(frozen=True)
class Undecodable:
    """What came instead of a message: bytes that are not one (a truncated or corrupted request)."""

    message: str


def parsing(message_type):
    """A deserializer that turns bytes that are not MESSAGE_TYPE into an Undecodable, where grpcio would answer
    UNKNOWN "Unexpected <class 'DecodeError'>" (found by feeding the server mutated messages: issue 36). A large
    ModelInferRequest keeps its raw contents as views of its bytes (v2_grpc.WithViews)."""
    name = message_type.DESCRIPTOR.name
    views = name == "ModelInferRequest"

    def parse(data: bytes):
        try:
            if views and len(data) >= v2_grpc.VIEWS_FROM:
                split = v2_grpc.split_raw(data)
                if split is not None and split[1]:
                    return v2_grpc.WithViews(message_type.FromString(split[0]), split[1], len(data))
            return message_type.FromString(data)
        except DecodeError as e:
            return Undecodable(f"the request is not a valid {name} message ({len(data)} bytes): {str(e)[:200]}")

    return parse


def guarded(fn):
    """FN, unless its request could not be read: then INVALID_ARGUMENT saying why."""

    async def call(request, context):
        if isinstance(request, Undecodable):
            await context.abort(Status.INVALID_ARGUMENT, request.message)
        return await fn(request, context)

    return call


def decode(to_rows, limit, request, shm=None):
    """A ModelInferRequest to the model's rows (on the loop, or on the decode pool for a large one)."""
    return to_rows(v2_grpc.tensors_of(request, limit, shm))


def server(pipeline: Pipeline, config: Config, tally: Tally, handoff: Handoff | None = None) -> Server:
    """The worker's gRPC server, with the REST core's limits where HTTP/2 has the same knob: the message size, the
    metadata's, the idle timeout, and calls in progress capped per worker like REST connections (past the cap:
    RESOURCE_EXHAUSTED; a per-connection stream cap would refuse tritonclient's streams instead of queueing them,
    since every client in a process shares one connection); HANDOFF: ModelInfer calls shared with the other workers.
    `start` it on the listening socket."""
    return Server(v2_grpc.SERVICE, methods(pipeline), config.limits, tally, handoff)
