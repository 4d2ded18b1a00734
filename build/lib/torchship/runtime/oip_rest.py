"""The Open Inference Protocol over REST: its routes, as tritonclient, KServe's probes and KServe's own client call
them, on the lean HTTP/1.1 server (http11.py). Every bad request is a JSON 4xx that says what was wrong."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from . import metrics, v2
from .batching import Overloaded
from .http11 import Request, Response
from .images import InputError
from .request import instances
from .responses import respond
from .serving import Served
from .tensors import rows_from_instances, standardize

try:  # orjson writes every answer's JSON 3-10x faster than json (bench/NOTES.md)
    import orjson

    dumps = orjson.dumps
except ImportError:  # pragma: no cover
    import json

    def dumps(obj) -> bytes:
        return json.dumps(obj).encode()


logger = logging.getLogger(__name__)
MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
V1_ROUTE = re.compile(r"^/v1/models/([^/:]+)(:predict)?$")  # KServe v1 / TF Serving: {"instances": [...]}
DECODE_INLINE_BYTES = 64 * 1024  # larger bodies (photos) are decoded off the event loop, so they hold no one up
RETRY_AFTER_S = b"1"
JSON = ((b"content-type", b"application/json"),)
LIVE = Response(200, b'{"live":true}')


def error(status: int, message: str, *, close: bool = False, headers: tuple = ()) -> Response:
    return Response(status, dumps({"error": message, "status": status}), JSON + headers, close)


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchship")
    except Exception:  # shipped inside an archive or a container, without torchship's metadata
        return ""


class RestApp:
    def __init__(self, served: Served):
        self.served, self.version = served, server_version()
        self.loop = asyncio.get_running_loop()

    def __call__(self, request: Request, reply) -> None:
        path, method = request.path, request.method
        m = MODEL_ROUTE.match(path)
        if m and m.group(3) == "/infer":
            if method != "POST":
                return reply(error(405, f"{path[:200]} takes POST"))
            return self.infer(request, reply, m.group(1))
        v1 = V1_ROUTE.match(path)
        if v1 and v1.group(2):
            if method != "POST":
                return reply(error(405, f"{path[:200]} takes POST"))
            return self.predict_v1(request, reply, v1.group(1))
        if method not in ("GET", "HEAD"):
            return reply(error(405 if m or path.startswith("/v2") else 404, f"no {method} route {path[:200]}"))
        if v1:
            if v1.group(1) != self.served.name:
                return reply(error(404, f"no model named {v1.group(1)[:64]!r}: this server has {self.served.name!r}"))
            return reply(Response(200, dumps({"name": self.served.name, "ready": self.served.ready})))
        if path == "/v2/health/live":
            return reply(LIVE)
        ready = self.served.ready
        if path == "/v2/health/ready":
            return reply(Response(200 if ready else 503, dumps({"ready": ready})))
        if path == "/v2":
            return reply(Response(200, dumps({"name": "torchship", "version": self.version,
                                              "extensions": ["binary_tensor_data"]})))  # fmt: skip
        if path == "/metrics":
            return reply(Response(200, metrics.exposition(), ((b"content-type", metrics.CONTENT_TYPE.encode()),)))
        if m:
            if m.group(1) != self.served.name:
                return reply(error(404, f"no model named {m.group(1)[:64]!r}: this server has {self.served.name!r}"))
            if m.group(3) == "/ready":
                return reply(Response(200 if ready else 503, dumps({"name": self.served.name, "ready": ready})))
            return reply(Response(200, dumps(self.served.metadata())))
        return reply(error(404, f"no route {path[:200]}: the Open Inference Protocol's are under /v2"))

    def infer(self, request: Request, reply, model: str) -> None:
        served, start = self.served, time.perf_counter()
        served.metrics.started()

        def answer(response: Response) -> None:
            served.metrics.answered("rest", response.status, time.perf_counter() - start)
            reply(response)

        try:
            if model != served.name:
                return answer(error(404, f"no model named {model[:64]!r}: this server has {served.name!r}"))
            cut = request.headers.get(v2.HEADER_LENGTH.encode())
            if cut is not None and not cut.isdigit():
                raise v2.ProtocolError(f"{v2.HEADER_LENGTH} must be a number of bytes")
            header, tensors = v2.parse_http(request.body, int(cut) if cut is not None else None)
            want = v2.wanted(header, served.card)
        except v2.ProtocolError as e:
            return answer(error(e.status, str(e)))

        def predict(rows) -> None:
            try:
                pending = served.batcher.enqueue(rows)
            except Overloaded as e:
                return answer(error(503, str(e), headers=((b"retry-after", RETRY_AFTER_S),)))
            pending.add_done_callback(lambda done: answer(self.encode(done, header, want)))

        if len(request.body) <= DECODE_INLINE_BYTES:
            try:
                rows = served.decode(tensors)
            except v2.ProtocolError as e:
                return answer(error(e.status, str(e)))
            return predict(rows)
        served.batcher.decoding += 1
        decoded = self.loop.run_in_executor(None, served.decode, tensors)

        def decoded_then(done) -> None:
            served.batcher.decoding -= 1
            if isinstance(done.exception(), v2.ProtocolError):
                return answer(error(done.exception().status, str(done.exception())))
            if done.exception() is not None:
                logger.error("decoding failed", exc_info=done.exception())
                return answer(error(500, "the server failed to decode this request"))
            predict(done.result())

        decoded.add_done_callback(decoded_then)

    def predict_v1(self, request: Request, reply, model: str) -> None:
        """Rows of a tensor model as KServe v1 and TF Serving send them; answered {"predictions": [...]}."""
        served, start = self.served, time.perf_counter()
        served.metrics.started()

        def answer(response: Response) -> None:
            served.metrics.answered("rest-v1", response.status, time.perf_counter() - start)
            reply(response)

        if model != served.name:
            return answer(error(404, f"no model named {model[:64]!r}: this server has {served.name!r}"))
        if served.card.image:
            return answer(error(400, f"{served.name} takes images: POST them to /v2/models/{served.name}/infer"))
        try:
            rows = standardize(served.card, rows_from_instances(served.card, instances(request.body)))
            pending = served.batcher.enqueue(rows)
        except InputError as e:
            return answer(error(e.status, e.message))
        except Overloaded as e:
            return answer(error(503, str(e), headers=((b"retry-after", RETRY_AFTER_S),)))

        def encoded(done) -> Response:
            if done.cancelled() or done.exception() is not None:
                return error(500, "inference failed")
            return Response(200, dumps({"predictions": respond(served.card, done.result())}))

        pending.add_done_callback(lambda done: answer(encoded(done)))

    def encode(self, done: asyncio.Future, header: dict, want: list) -> Response:
        if done.cancelled() or done.exception() is not None:
            if not done.cancelled():
                logger.error("inference failed", exc_info=done.exception())
            return error(500, "inference failed")
        outputs = v2.model_outputs(self.served.card, done.result())
        body, json_length = v2.response_http(self.served.name, header, outputs, want)
        if json_length is None:
            return Response(200, body)
        return Response(200, body, ((b"content-type", b"application/octet-stream"),
                                    (v2.HEADER_LENGTH.encode(), str(json_length).encode())))  # fmt: skip
