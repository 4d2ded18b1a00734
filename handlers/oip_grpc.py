"""The Open Inference Protocol over gRPC: the protocol's standard service, `inference.GRPCInferenceService`, on
grpcio's asyncio server, sharing the worker's batcher with REST. tritonclient.grpc and KServe's client talk to it."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import tracing, triton, v2
from .batching import Overloaded
from .http11 import Limits
from .repository import RepositoryError
from .serving import ABANDONED, ACCESS, DECODE_INLINE_BYTES, Served, access

logger = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
KSERVE_PROTO_MODULE = "kserve.protocol.grpc.grpc_predict_v2_pb2"


def protocol_messages():
    """kserve's generated messages for the standard service, loaded from their one file: importing the kserve package
    itself takes ~6 s here (pandas, FastAPI) and brings nothing this server uses. Registered under kserve's own module
    name, so a later `import kserve` reuses it instead of defining package `inference` twice."""
    if KSERVE_PROTO_MODULE in sys.modules:
        return sys.modules[KSERVE_PROTO_MODULE]
    found = importlib.util.find_spec("kserve")
    path = Path(found.origin).parent / "protocol" / "grpc" / "grpc_predict_v2_pb2.py" if found else None
    if path is None or not path.is_file():
        raise RuntimeError(
            "the Open Inference Protocol's gRPC messages come from kserve's definitions: "
            "pip install 'kserve>=0.21,<0.22'"
        )
    spec = importlib.util.spec_from_file_location(KSERVE_PROTO_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[KSERVE_PROTO_MODULE] = module
    return module


TYPED_CONTENTS = {
    "BYTES": "bytes_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "BOOL": "bool_contents",
}


def tensors_of(request, limit=None) -> list[v2.Tensor]:
    """A ModelInferRequest's inputs: raw contents (tritonclient's default) or typed contents; `limit`
    (v2.element_limit) bounds each tensor's elements before any is read."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise v2.ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    out = []
    for k, inp in enumerate(request.inputs):
        name, shape, datatype = inp.name[:64], tuple(int(d) for d in inp.shape[:17]), inp.datatype[:16]
        if len(shape) > 16 or any(d < 0 for d in shape):
            raise v2.ProtocolError(f"input '{name}': shape must be at most 16 non-negative integers")
        most = limit(datatype) if limit else None
        if most is not None and math.prod(shape) > most:
            raise v2.too_many(name, shape, math.prod(shape), most)
        if raw:
            out.append(v2.tensor_from_binary(name, datatype, shape, raw[k], most))
            continue
        if datatype not in TYPED_CONTENTS:
            raise v2.ProtocolError(
                f"input '{name}': datatype {datatype} is not one this model takes as typed "
                "contents (send raw_input_contents)"
            )
        contents = getattr(inp.contents, TYPED_CONTENTS[datatype])
        if most is not None and len(contents) > most:
            raise v2.too_many(name, shape, len(contents), most)
        data = (
            np.array(list(contents), dtype=object)
            if datatype == "BYTES"
            else np.asarray(contents, v2.DATATYPES[datatype])
        )
        out.append(v2.Tensor(name, datatype, shape, data))
    return out


def infer_response(served: Served, request, outputs: list[v2.Tensor], pb):
    """Outputs as raw contents, the form every client reads (typed contents reach tritonclient as empty arrays)."""
    asked = [o.name for o in request.outputs]
    unknown = [n for n in asked if n not in {t.name for t in outputs}]
    if unknown:
        raise v2.ProtocolError(f"unknown output {unknown[0][:64]!r}: this model has {[t.name for t in outputs]}")
    chosen = [t for t in outputs if not asked or t.name in asked]
    response = pb.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
    for t in chosen:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        blob = v2.bytes_blob(t.data.reshape(-1)) if t.datatype == "BYTES" else np.ascontiguousarray(t.data).tobytes()
        response.raw_output_contents.append(blob)
    return response


def handler(app):
    """The service's methods over this worker's repository, as one grpcio generic handler (APP: the worker's RestApp,
    whose repository, settings and admin REST and gRPC share)."""
    import grpc

    from .oip_rest import mirror

    pb, tr = protocol_messages(), triton.messages()
    repo, version = app.repo, app.version
    codes = {
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
        404: grpc.StatusCode.NOT_FOUND,
        409: grpc.StatusCode.ABORTED,
        401: grpc.StatusCode.UNAUTHENTICATED,
        503: grpc.StatusCode.UNAVAILABLE,
    }

    async def find(name: str, version: str, context) -> Served:
        try:
            return repo.get(name, version)[0]
        except RepositoryError as e:
            await context.abort(codes.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), str(e))

    async def server_live(request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(request, context):
        return pb.ServerReadyResponse(ready=repo.ready)

    async def server_metadata(request, context):
        return pb.ServerMetadataResponse(
            name="torchship",
            version=version,
            extensions=["binary_tensor_data", "model_repository", "model_configuration"],
        )

    async def model_ready(request, context):
        await find(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=repo.ready)

    async def model_metadata(request, context):
        served = await find(request.name, request.version, context)
        meta = served.metadata(sorted(repo.model(served.name).versions, key=int))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def model_config(request, context):
        return triton.config_message(app.config(await find(request.name, request.version, context)))

    async def authorized(context) -> None:
        if not app.admin.allows(dict(context.invocation_metadata()).get("authorization")):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the repository calls need the admin token: authorization: Bearer TOKEN metadata",
            )

    async def admin(op: str, model: str, parameters: dict, context):
        await authorized(context)
        r = await app.admin.call(op, model, parameters)
        if not r.get("ok"):
            await context.abort(codes.get(r.get("status"), grpc.StatusCode.INVALID_ARGUMENT), r["error"])

    async def repository_index(request, context):
        await authorized(context)
        response = tr["RepositoryIndexResponse"]()
        for row in repo.index():
            response.models.add(**row)
        return response

    async def repository_load(request, context):
        await admin("load", request.model_name, triton.parameters(request), context)
        return tr["RepositoryModelLoadResponse"]()

    async def repository_unload(request, context):
        await admin("unload", request.model_name, triton.parameters(request), context)
        return tr["RepositoryModelUnloadResponse"]()

    async def model_infer(request, context):
        start, status, decoding, served = time.perf_counter(), 500, False, None
        trace = (
            tracing.start(dict(context.invocation_metadata()).get("traceparent"), "grpc") if tracing.ENABLED else None
        )
        try:
            try:
                served, shadow = repo.get(request.model_name, request.model_version)
            except RepositoryError as e:
                raise v2.ProtocolError(str(e), e.status) from None
            served.metrics.started()
            served.batcher.decoding += 1
            decoding = True
            if sum(len(r) for r in request.raw_input_contents) <= DECODE_INLINE_BYTES:
                rows = decode(served, request)
            elif served.batcher.decoding > served.batcher.max_queue:
                raise Overloaded(f"{served.batcher.decoding} requests are being decoded in this worker (its limit)")
            else:
                rows = await asyncio.get_running_loop().run_in_executor(served.decoder, decode, served, request)
            served.batcher.decoding -= 1
            decoding = False
            if trace is not None:
                trace.mark_decoded()
                trace.request_id = request.id[:128]
            pending = served.batcher.enqueue(rows, trace)
            if shadow is not None:
                mirror(served, shadow, rows, pending)
            response = infer_response(served, request, v2.model_outputs(served.card, await pending), pb)
            status = 200
            return response
        except v2.ProtocolError as e:
            status = e.status
            await context.abort(codes.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), str(e))
        except Overloaded as e:
            status = 503
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except asyncio.CancelledError:  # the client cancelled or went away: its rows left the queue with the task
            status = ABANDONED
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            logger.exception("inference failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {type(e).__name__}")
        finally:
            if served is not None:
                if decoding:
                    served.batcher.decoding -= 1
                seconds = time.perf_counter() - start
                served.metrics.answered("grpc", status, seconds)
                if trace is not None:
                    trace.finish(served.name, served.version, status)
                if ACCESS.isEnabledFor(logging.INFO):
                    access("grpc", context.peer(), served.name, served.version, status, seconds, request.id[:128])

    def decode(served: Served, request):
        return served.decode(tensors_of(request, served.limit))

    methods = {
        "ServerLive": (server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ServerMetadata": (server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelReady": (model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ModelMetadata": (model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        "ModelConfig": (model_config, tr["ModelConfigRequest"], tr["ModelConfigResponse"]),
        "RepositoryIndex": (repository_index, tr["RepositoryIndexRequest"], tr["RepositoryIndexResponse"]),
        "RepositoryModelLoad": (repository_load, tr["RepositoryModelLoadRequest"], tr["RepositoryModelLoadResponse"]),
        "RepositoryModelUnload": (
            repository_unload,
            tr["RepositoryModelUnloadRequest"],
            tr["RepositoryModelUnloadResponse"],
        ),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )
            for name, (fn, req, resp) in methods.items()
        },
    )


def server(app, host: str, port: int, limits: Limits = Limits()):
    """An asyncio gRPC server on HOST:PORT; every worker binds the same port (SO_REUSEPORT, grpcio's default), with
    the REST core's limits where HTTP/2 has the same knob. Calls in progress are capped per worker like REST
    connections (past the cap: RESOURCE_EXHAUSTED); a per-connection stream cap would refuse tritonclient's streams
    instead of queueing them, since every client in a process shares one connection."""
    import grpc

    options = [
        ("grpc.max_receive_message_length", limits.max_body),
        ("grpc.max_send_message_length", limits.max_body),
        ("grpc.so_reuseport", 1),
        ("grpc.max_metadata_size", limits.head_bytes),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
    ]
    srv = grpc.aio.server(options=options, maximum_concurrent_rpcs=limits.connections)
    srv.add_generic_rpc_handlers((handler(app),))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if srv.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return srv
