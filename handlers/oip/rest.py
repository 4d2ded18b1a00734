"""The Open Inference Protocol over REST, as tritonclient, KServe's probes and KServe's own client call it, on the lean
HTTP/1.1 server (http11.py): routes to the pipeline (pipeline.py), bytes to a request and its answer to bytes. Every
bad request is a JSON 4xx that says what was wrong."""

from __future__ import annotations

import asyncio
import logging
import re

import numpy as np

from ..model import text
from ..model.responses import answers
from ..model.tensors import rows_from_instances, standardize
from ..protocol import openai, v2
from ..protocol.v1 import instances
from ..signature import EMBEDDING, TEXT_INPUT
from . import compression
from .batching import Overloaded
from .http11 import Request, Response
from .metrics import CONTENT_TYPE, exposition
from .pipeline import ABANDONED, CUDA_SHM, RETRY_AFTER_S, Flight, Pipeline, refusal
from .repository import RepositoryError
from .served import Served
from .shm import Regions

try:  # orjson writes every answer's JSON 3-10x faster than json (bench/NOTES.md)
    import orjson

    dumps = orjson.dumps
except ImportError:  # pragma: no cover
    import json

    def dumps(obj) -> bytes:
        return json.dumps(obj).encode()


logger = logging.getLogger(__name__)
MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config|/stats)?$")
ALL_STATS = "/v2/models/stats"  # Triton's statistics of every model (a model named "stats" has its own under it)
REPOSITORY_ROUTE = re.compile(r"^/v2/repository/(?:index|models/([^/]+)/(load|unload|route))$")
SHM_ROUTE = re.compile(r"^/v2/systemsharedmemory(?:/region/([^/]+))?/(status|register|unregister)$")
CUDA_SHM_ROUTE = re.compile(r"^/v2/cudasharedmemory(/region/[^/]+)?/(status|register|unregister)$")
V1_ROUTE = re.compile(r"^/v1/models/([^/:]+)(:predict)?$")  # KServe v1 / TF Serving: {"instances": [...]}
HEADER_LENGTH = v2.HEADER_LENGTH.encode()
JSON = ((b"content-type", b"application/json"),)
RETRY = ((b"retry-after", str(RETRY_AFTER_S).encode()),)
LIVE = Response(200, b'{"live":true}')
UNAUTHORIZED = ((b"www-authenticate", b'Bearer realm="repository"'),)
METRICS = ((b"content-type", CONTENT_TYPE.encode()),)


def error(status: int, message: str, *, close: bool = False, headers: tuple = ()) -> Response:
    return Response(status, dumps({"error": message, "status": status}), JSON + headers, close)


def failure(e: BaseException) -> Response:
    """Any failed request's answer (pipeline.refusal decides its status); a 503 says when to retry."""
    status, message = refusal(e)
    return error(status, message, headers=RETRY if status == 503 else ())


class RestApp:
    """http11's app: called once per request with a function that answers it (now or later)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __call__(self, request: Request, reply):
        path, method = request.path, request.method
        m = MODEL_ROUTE.match(path)
        if m and m.group(3) == "/infer":
            if method != "POST":
                return reply(error(405, f"{path[:200]} takes POST"))
            return self.infer(request, reply, m.group(1), m.group(2))
        v1 = V1_ROUTE.match(path)
        if v1 and v1.group(2):
            if method != "POST":
                return reply(error(405, f"{path[:200]} takes POST"))
            return self.predict_v1(request, reply, v1.group(1))
        if path == openai.EMBEDDINGS_ROUTE:
            if method != "POST":
                return reply(self.openai_error(405, f"{path} takes POST"))
            return self.embeddings(request, reply)
        if CUDA_SHM_ROUTE.match(path):
            return reply(error(501, CUDA_SHM))
        shm = SHM_ROUTE.match(path)
        if shm:
            return self.shared_memory(request, reply, shm.group(1), shm.group(2))
        repository = REPOSITORY_ROUTE.match(path)
        if repository:
            if method != "POST":
                return reply(error(405, f"{path[:200]} takes POST"))
            return self.repository(request, reply, repository.group(1), repository.group(2))
        if method not in ("GET", "HEAD"):
            return reply(error(405 if m or path.startswith("/v2") else 404, f"no {method} route {path[:200]}"))
        return reply(self.get(path, m, v1))

    def get(self, path: str, m: re.Match | None, v1: re.Match | None) -> Response:
        pipeline = self.pipeline
        if path == "/v2/health/live":
            return LIVE
        ready = pipeline.ready
        if path == "/v2/health/ready":
            return Response(200 if ready else 503, dumps({"ready": ready}))
        if path == "/v2":
            return Response(200, dumps(pipeline.server_metadata()))
        if path == "/metrics":
            return Response(200, exposition(), METRICS)
        if path == ALL_STATS:
            return Response(200, dumps(pipeline.statistics()))
        try:
            if v1:
                return Response(200, dumps({"name": pipeline.served(v1.group(1)).name, "ready": ready}))
            if m and m.group(3) == "/ready":
                served = pipeline.served(m.group(1), m.group(2))
                return Response(200 if ready else 503, dumps({"name": served.name, "ready": ready}))
            if m and m.group(3) == "/config":
                return Response(200, dumps(pipeline.model_config(m.group(1), m.group(2))))
            if m and m.group(3) == "/stats":
                return Response(200, dumps(pipeline.statistics(m.group(1), m.group(2))))
            if m:
                return Response(200, dumps(pipeline.model_metadata(m.group(1), m.group(2))))
        except RepositoryError as e:
            return error(e.status, str(e))
        return error(
            404, f"no route {path[:200]}: GET /v2 lists this server's extensions of the Open Inference Protocol"
        )

    def repository(self, request: Request, reply, model: str | None, op: str | None):
        """The repository extension (index, load, unload) and our route call, behind the admin token."""
        if not self.pipeline.authorized(request.headers.get(b"authorization"), request.client):
            how = "Authorization: Bearer TOKEN (`torchship serve key --api admin`)"
            return reply(error(401, f"the repository calls need the admin token: {how}", headers=UNAUTHORIZED))
        try:
            body = v2.loads(request.body) if request.body.strip() else {}
        except v2.ProtocolError as e:
            return reply(error(400, str(e)))
        if not isinstance(body, dict):
            return reply(error(400, "a repository call's body is a JSON object"))
        if op is None:
            return reply(Response(200, dumps(self.pipeline.index())))
        params = body.get("parameters", {}) if op != "route" else body
        if not isinstance(params, dict):
            return reply(error(400, "'parameters' must be a JSON object"))

        def done(r: dict) -> None:
            reply(Response(200, dumps(r["result"])) if r.get("ok") else error(r.get("status", 500), r["error"]))

        self.pipeline.repository_call(op, model, params, done)
        return None

    def begin(self, protocol: str, request: Request, model: str, version: str | None) -> Flight:
        headers = request.headers
        return self.pipeline.begin(
            protocol,
            model,
            version,
            client=request.client,
            traceparent=headers.get(b"traceparent"),
            nbytes=len(request.body),
        )

    def shared_memory(self, request: Request, reply, region: str | None, op: str):
        """Triton's system shared memory extension: status (GET), register and unregister (POST)."""
        if op == "status":
            if request.method not in ("GET", "HEAD"):
                return reply(error(405, "status takes GET"))
            try:
                return reply(Response(200, dumps(self.pipeline.shm_status(region))))
            except v2.ProtocolError as e:
                return reply(error(e.status, str(e)))
        if request.method != "POST":
            return reply(error(405, f"{op} takes POST"))
        try:
            body = v2.loads(request.body) if request.body.strip() else {}
        except v2.ProtocolError as e:
            return reply(error(400, str(e)))
        if op == "register" and (region is None or not isinstance(body, dict)):
            return reply(
                error(
                    400,
                    "register a region at /v2/systemsharedmemory/region/NAME/register with a JSON "
                    "object {key, offset, byte_size}",
                )
            )
        params = {**(body if op == "register" else {}), "name": region}

        def done(r: dict) -> None:
            reply(Response(200, b"{}") if r.get("ok") else error(r.get("status", 500), r["error"]))

        self.pipeline.repository_call(f"shm_{op}", None, params, done)
        return None

    def infer(self, request: Request, reply, model: str, version: str | None):
        """A v2 request: decoded (on the loop when small, in the pool when large), queued, encoded. Returns the
        function http11 calls if the client goes away first (pipeline.Flight.abandon)."""
        try:
            flight = self.begin("rest", request, model, version)
        except RepositoryError as e:
            return reply(error(e.status, str(e)))
        respond = compression.preferred(request.headers.get(b"accept-encoding"))
        answer = answering(flight, reply if respond is None else lambda r: reply(compressed(r, respond)))
        coding = request.headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if coding not in (*compression.CODINGS, "identity"):
            why = f"Content-Encoding {coding[:32]!r} is not one this server reads: send gzip, deflate or none"
            return answer(error(501, why, headers=((b"accept-encoding", compression.ACCEPTED),)))

        def predict(prepared: tuple, prompt: bool) -> None:
            header, want, rows = prepared
            flight.request_id = str(header.get("id") or request.headers.get(b"x-request-id", b"").decode()[:128])
            try:
                pending = flight.enqueue(rows, prompt=prompt)
            except (Overloaded, v2.ProtocolError) as e:  # a full queue, or more rows than the model takes
                return answer(failure(e))
            pending.add_done_callback(lambda done: answer(encode(flight, done, header, want, rows)))

        def decoded(done: asyncio.Future) -> None:
            if flight.done:  # abandoned while it was decoded
                return
            if done.exception() is not None:
                return answer(failure(done.exception()))
            predict(done.result(), False)

        try:
            limit = self.pipeline.config.limits.max_body
            # a compressed body decompresses on the pool: what it holds is not known until then
            shm = self.pipeline.shm
            prepared = flight.decode(
                prepare, flight.served, request, coding, limit, shm, small=coding == "identity" or None
            )
        except Exception as e:
            answer(failure(e))
            return None
        if isinstance(prepared, asyncio.Future):
            prepared.add_done_callback(decoded)
        else:
            predict(prepared, True)  # decoded in the turn its bytes arrived
        return flight.abandon

    @staticmethod
    def openai_error(status: int, message: str) -> Response:
        return Response(status, dumps(openai.error_body(status, message)), JSON)

    def embeddings(self, request: Request, reply):
        """OpenAI's embeddings call on a text model that embeds: its texts as one request of the model's rows."""
        try:
            texts, model, fmt, dimensions = openai.embeddings_request(v2.loads(request.body))
            flight = self.begin("rest-openai", request, model, None)
        except (v2.ProtocolError, RepositoryError) as e:
            return reply(self.openai_error(e.status, str(e)))
        answer = answering(flight, reply)
        served = flight.served
        sig = served.card.signature if served.card.named else None
        if sig is None or not sig.text or sig.text.task != "embed":
            why = f"{served.name} answers no embeddings: serve a text model exported with --text-task embed"
            return answer(self.openai_error(400, why))

        def go(rows, prompt: bool) -> None:
            try:
                pending = flight.enqueue(rows, prompt=prompt)
            except Exception as e:
                return answer(self.openai_error(*refusal(e)))
            pending.add_done_callback(lambda done: answer(embedded(flight, done, rows, fmt, dimensions)))

        def decoded(done: asyncio.Future) -> None:
            if flight.done:  # abandoned while it was tokenized
                return
            if done.exception() is not None:
                return answer(self.openai_error(*refusal(done.exception())))
            go(done.result(), False)

        tensor = v2.Tensor(TEXT_INPUT, "BYTES", (len(texts),), np.array(texts, dtype=object))
        try:
            rows = flight.decode(served.decode, [tensor])
        except Exception as e:
            return answer(self.openai_error(*refusal(e)))
        if isinstance(rows, asyncio.Future):
            rows.add_done_callback(decoded)
        else:
            go(rows, True)
        return flight.abandon

    def predict_v1(self, request: Request, reply, model: str):
        """Rows of a tensor model as KServe v1 and TF Serving send them; answered {"predictions": [...]}."""
        try:
            flight = self.begin("rest-v1", request, model, None)
        except RepositoryError as e:
            return reply(error(e.status, str(e)))
        answer = answering(flight, reply)

        card = flight.served.card
        if card.image:
            return answer(error(400, f"{flight.served.name} takes images: POST them to /v2/models/{model}/infer"))
        try:
            pending = flight.enqueue(standardize(card, rows_from_instances(card, instances(request.body))), prompt=True)
        except Exception as e:
            return answer(failure(e))

        def encoded(done: asyncio.Future) -> Response:
            if done.cancelled():
                return Response(ABANDONED, b"")
            if done.exception() is not None:
                return failure(done.exception())
            return Response(200, dumps({"predictions": answers(card, done.result())}))

        pending.add_done_callback(lambda done: answer(encoded(done)))
        return flight.abandon


def embedded(flight: Flight, done: asyncio.Future, rows, fmt: str, dimensions) -> Response:
    if done.cancelled():
        return Response(ABANDONED, b"")
    try:
        if done.exception() is not None:
            raise done.exception()
        served = flight.served
        (vectors,) = [t.data for t in served.encode(done.result(), rows) if t.name == EMBEDDING]
        tokens = text.token_count(rows)
        body = openai.embeddings_response(served.name, vectors, tokens, fmt, dimensions)
    except Exception as e:
        return RestApp.openai_error(*refusal(e))
    return Response(200, dumps(body), JSON)


def compressed(response: Response, coding: str) -> Response:
    """An answer in the coding its client prefers (errors too: they are short, and tritonclient decodes every one)."""
    headers = (*response.headers, (b"content-encoding", coding.encode()))
    return Response(response.status, compression.compress(response.body, coding), headers, response.close)


def answering(flight: Flight, reply):
    """REPLY, called only with the first answer the request ends with (after its client left: never)."""

    def answer(response: Response) -> None:
        if flight.finish(response.status):
            reply(response)

    return answer


def prepare(
    served: Served, request: Request, coding: str = "identity", limit: int = 0, shm: Regions | None = None
) -> tuple[dict, list, object]:
    """The request's v2 header, the outputs it wants and its rows: every lie a ProtocolError (a 4xx). A compressed
    body is decompressed first, to at most LIMIT bytes; the binary extension's header length is of what it holds."""
    body = request.body if coding == "identity" else compression.decompress(request.body, coding, limit)
    cut = request.headers.get(HEADER_LENGTH)
    if cut is not None and not (cut.isdigit() and len(cut) <= 12):
        raise v2.ProtocolError(f"{v2.HEADER_LENGTH} must be a number of bytes within the body's length")
    header, tensors = v2.parse_http(body, int(cut) if cut is not None else None, served.limit, shm)
    return header, v2.wanted(header, served.outputs), served.decode(tensors)


def encode(flight: Flight, done: asyncio.Future, header: dict, want: list, rows=None) -> Response:
    if done.cancelled():
        return Response(ABANDONED, b"")
    if done.exception() is not None:
        return failure(done.exception())
    served = flight.served
    outputs = served.encode(done.result(), rows)
    try:
        shm = flight.pipeline.shm
        body, json_length = v2.response_http(served.name, header, outputs, want, served.version, served.labels, shm)
    except v2.ProtocolError as e:  # a classification the output cannot give
        return failure(e)
    if json_length is None:
        return Response(200, body)
    return Response(
        200, body, ((b"content-type", b"application/octet-stream"), (HEADER_LENGTH, str(json_length).encode()))
    )
