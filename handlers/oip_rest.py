"""The Open Inference Protocol over REST: its routes, as tritonclient, KServe's probes and KServe's own client call
them, on the lean HTTP/1.1 server (http11.py). Every bad request is a JSON 4xx that says what was wrong."""

from __future__ import annotations

import asyncio
import logging
import re
import time

from . import metrics, tracing, triton, v2
from .batching import Overloaded
from .control import Admin
from .http11 import Request, Response
from .images import InputError
from .repository import Repository, RepositoryError, agreement
from .request import instances
from .responses import answers
from .serving import ABANDONED, ACCESS, DECODE_INLINE_BYTES, Served, Settings, access
from .tensors import rows_from_instances, standardize

try:  # orjson writes every answer's JSON 3-10x faster than json (bench/NOTES.md)
    import orjson

    dumps = orjson.dumps
except ImportError:  # pragma: no cover
    import json

    def dumps(obj) -> bytes:
        return json.dumps(obj).encode()


logger = logging.getLogger(__name__)
MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config)?$")
REPOSITORY_ROUTE = re.compile(r"^/v2/repository/(?:index|models/([^/]+)/(load|unload|route))$")
V1_ROUTE = re.compile(r"^/v1/models/([^/:]+)(:predict)?$")  # KServe v1 / TF Serving: {"instances": [...]}
HEADER_LENGTH = v2.HEADER_LENGTH.encode()
RETRY_AFTER_S = b"1"
JSON = ((b"content-type", b"application/json"),)
LIVE = Response(200, b'{"live":true}')
UNAUTHORIZED = ((b"www-authenticate", b'Bearer realm="repository"'),)


def error(status: int, message: str, *, close: bool = False, headers: tuple = ()) -> Response:
    return Response(status, dumps({"error": message, "status": status}), JSON + headers, close)


def server_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchship")
    except Exception:  # shipped inside an archive or a container, without torchship's metadata
        return ""


class RestApp:
    def __init__(self, repo: Repository, settings: Settings, admin: Admin):
        self.repo, self.settings, self.admin, self.version = repo, settings, admin, server_version()
        self.loop = asyncio.get_running_loop()
        self.calls: set[asyncio.Task] = set()  # repository calls in progress (the loop keeps only weak references)

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
        repository = REPOSITORY_ROUTE.match(path)
        if repository:
            if method != "POST":
                return reply(error(405, f"{path[:200]} takes POST"))
            return self.repository(request, reply, repository.group(1), repository.group(2))
        if method not in ("GET", "HEAD"):
            return reply(error(405 if m or path.startswith("/v2") else 404, f"no {method} route {path[:200]}"))
        if path == "/v2/health/live":
            return reply(LIVE)
        ready = self.repo.ready
        if path == "/v2/health/ready":
            return reply(Response(200 if ready else 503, dumps({"ready": ready})))
        if path == "/v2":
            return reply(
                Response(
                    200,
                    dumps(
                        {
                            "name": "torchship",
                            "version": self.version,
                            "extensions": ["binary_tensor_data", "model_repository", "model_configuration"],
                        }
                    ),
                )
            )
        if path == "/metrics":
            return reply(Response(200, metrics.exposition(), ((b"content-type", metrics.CONTENT_TYPE.encode()),)))
        try:
            if v1:
                served, _ = self.repo.get(v1.group(1))
                return reply(Response(200, dumps({"name": served.name, "ready": ready})))
            if m:
                served, _ = self.repo.get(m.group(1), m.group(2))
                if m.group(3) == "/ready":
                    return reply(Response(200 if ready else 503, dumps({"name": served.name, "ready": ready})))
                if m.group(3) == "/config":
                    return reply(Response(200, dumps(self.config(served))))
                versions = sorted(self.repo.model(served.name).versions, key=int)
                return reply(Response(200, dumps(served.metadata(versions))))
        except RepositoryError as e:
            return reply(error(e.status, str(e)))
        return reply(error(404, f"no route {path[:200]}: the Open Inference Protocol's are under /v2"))

    def config(self, served: Served) -> dict:
        return triton.config(
            served.card,
            served.name,
            served.metadata()["platform"],
            max_delay_ms=self.settings.max_delay_ms,
            max_batch=self.settings.max_batch,
        )

    def repository(self, request: Request, reply, model: str | None, op: str | None):
        """The repository extension (index, load, unload) and our route call, behind the admin token."""
        if not self.admin.allows(request.headers.get(b"authorization")):
            return reply(
                error(
                    401,
                    "the repository calls need the admin token: Authorization: Bearer TOKEN "
                    "(`torchship serve key --api admin`)",
                    headers=UNAUTHORIZED,
                )
            )
        try:
            body = v2.loads(request.body) if request.body.strip() else {}
        except v2.ProtocolError as e:
            return reply(error(400, str(e)))
        if not isinstance(body, dict):
            return reply(error(400, "a repository call's body is a JSON object"))
        if op is None:  # the index: this worker's view of what the supervisor last committed
            return reply(Response(200, dumps(self.repo.index())))
        params = body.get("parameters", {}) if op != "route" else body
        if not isinstance(params, dict):
            return reply(error(400, "'parameters' must be a JSON object"))

        def done(future) -> None:
            failed = future.cancelled() or future.exception() is not None
            r = {"ok": False, "status": 503, "error": "the supervisor did not answer"} if failed else future.result()
            reply(Response(200, dumps(r["result"])) if r.get("ok") else error(r.get("status", 500), r["error"]))

        task = self.loop.create_task(self.admin.call(op, model, params))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        task.add_done_callback(done)
        return None

    def infer(self, request: Request, reply, model: str, version: str | None):
        """Decode (off the event loop when large), queue, encode; the returned function drops the request if its
        client goes away first: its rows leave the queue before the pass, and it is counted as abandoned."""
        try:
            served, shadow = self.repo.get(model, version)
        except RepositoryError as e:
            return reply(error(e.status, str(e)))
        start = time.perf_counter()
        served.metrics.started()
        outcome: list[int] = []  # the one status this request ends with
        queued: list[asyncio.Future] = []
        trace = tracing.start(request.headers.get(b"traceparent"), "rest") if tracing.ENABLED else None
        request_id: list[str] = []  # the v2 request's id, or its x-request-id header, once decoded

        def answer(response: Response) -> None:
            if not outcome:
                outcome.append(response.status)
                seconds = time.perf_counter() - start
                served.metrics.answered("rest", response.status, seconds)
                reply(response)
                if trace is not None:
                    trace.finish(served.name, served.version, response.status)
                if ACCESS.isEnabledFor(logging.INFO):
                    access(
                        "rest",
                        request.client,
                        served.name,
                        served.version,
                        response.status,
                        seconds,
                        request_id[0] if request_id else "",
                    )

        def abandon() -> None:
            for future in queued:
                future.cancel()
            answer(Response(ABANDONED, b""))

        def predict(prepared, prompt: bool) -> None:
            header, want, rows = prepared
            request_id.append(str(header.get("id") or request.headers.get(b"x-request-id", b"").decode()[:128]))
            if trace is not None:
                trace.mark_decoded()
                trace.request_id = request_id[0]
            try:
                pending = served.batcher.enqueue(rows, trace, prompt=prompt)
            except Overloaded as e:
                return answer(error(503, str(e), headers=((b"retry-after", RETRY_AFTER_S),)))
            queued.append(pending)
            pending.add_done_callback(lambda done: answer(self.encode(served, done, header, want)))
            if shadow is not None:
                mirror(served, shadow, rows, pending)

        if len(request.body) <= DECODE_INLINE_BYTES:
            try:
                predict(self.prepare(served, request), True)  # decoded in the turn its bytes arrived
            except v2.ProtocolError as e:
                answer(error(e.status, str(e)))
            except Exception:
                logger.exception("decoding failed")
                answer(error(500, "the server failed to decode this request"))
            return abandon
        batcher = served.batcher
        if batcher.decoding >= batcher.max_queue:
            answer(
                error(
                    503,
                    f"{batcher.decoding} requests are being decoded in this worker (its limit): retry shortly",
                    headers=((b"retry-after", RETRY_AFTER_S),),
                )
            )
            return None
        batcher.decoding += 1

        def decoded(done) -> None:
            batcher.decoding -= 1
            if outcome:  # abandoned while it was decoded
                return
            e = done.exception()
            if isinstance(e, v2.ProtocolError):
                return answer(error(e.status, str(e)))
            if e is not None:
                logger.error("decoding failed", exc_info=e)
                return answer(error(500, "the server failed to decode this request"))
            predict(done.result(), False)

        self.loop.run_in_executor(served.decoder, self.prepare, served, request).add_done_callback(decoded)
        return abandon

    @staticmethod
    def prepare(served: Served, request: Request) -> tuple[dict, list, object]:
        """The request's v2 header, the outputs it wants and its rows: every lie a ProtocolError (a 4xx)."""
        cut = request.headers.get(HEADER_LENGTH)
        if cut is not None and not (cut.isdigit() and len(cut) <= 12):
            raise v2.ProtocolError(f"{v2.HEADER_LENGTH} must be a number of bytes within the body's length")
        header, tensors = v2.parse_http(request.body, int(cut) if cut is not None else None, served.limit)
        return header, v2.wanted(header, served.card), served.decode(tensors)

    def predict_v1(self, request: Request, reply, model: str):
        """Rows of a tensor model as KServe v1 and TF Serving send them; answered {"predictions": [...]}."""
        try:
            served, _ = self.repo.get(model)
        except RepositoryError as e:
            return reply(error(e.status, str(e)))
        start = time.perf_counter()
        served.metrics.started()
        outcome: list[int] = []

        def answer(response: Response) -> None:
            if not outcome:
                outcome.append(response.status)
                served.metrics.answered("rest-v1", response.status, time.perf_counter() - start)
                reply(response)

        if served.card.image:
            return answer(error(400, f"{served.name} takes images: POST them to /v2/models/{served.name}/infer"))
        try:
            rows = standardize(served.card, rows_from_instances(served.card, instances(request.body)))
            pending = served.batcher.enqueue(rows, prompt=True)
        except InputError as e:
            return answer(error(e.status, e.message))
        except Overloaded as e:
            return answer(error(503, str(e), headers=((b"retry-after", RETRY_AFTER_S),)))

        def encoded(done) -> Response:
            if done.cancelled():
                return Response(ABANDONED, b"")
            if done.exception() is not None:
                return error(500, "inference failed")
            return Response(200, dumps({"predictions": answers(served.card, done.result())}))

        def abandon() -> None:
            pending.cancel()

        pending.add_done_callback(lambda done: answer(encoded(done)))
        return abandon

    @staticmethod
    def encode(served: Served, done: asyncio.Future, header: dict, want: list) -> Response:
        if done.cancelled():
            return Response(ABANDONED, b"")
        if done.exception() is not None:
            logger.error("inference failed", exc_info=done.exception())
            return error(500, "inference failed")
        outputs = v2.model_outputs(served.card, done.result())
        body, json_length = v2.response_http(served.name, header, outputs, want, served.version)
        if json_length is None:
            return Response(200, body)
        return Response(
            200, body, ((b"content-type", b"application/octet-stream"), (HEADER_LENGTH, str(json_length).encode()))
        )


def mirror(served: Served, shadow: Served, rows, answered: asyncio.Future) -> None:
    """The request's rows again, to the shadow version: its output is compared with the default's, never sent. A
    shadow whose queue is full skips the request rather than delay anyone."""
    try:
        candidate = shadow.batcher.enqueue(rows)
    except Overloaded:
        return

    def compare(_) -> None:
        if answered.cancelled() or candidate.cancelled() or answered.exception() or candidate.exception():
            return
        agreed, largest = agreement(served.card, answered.result(), candidate.result())
        metrics.shadowed(served.name, served.version, shadow.version, agreed, largest)

    gathered = asyncio.gather(answered, candidate, return_exceptions=True)
    gathered.add_done_callback(compare)
