"""The OIP server's control plane, the supervisor's side: it changes the repository (load, unload, route) in every
worker at once (worker.follow is the workers' side).

JSON lines over one Unix socket the supervisor listens on. Each worker keeps a connection open to it (`hello`), over
which the supervisor sends commands and the worker answers each; an admin call that reaches a worker over REST or
gRPC is handed to the supervisor on a connection of its own (`admin`). A load is two-phase: every worker loads and
warms the new version at the largest batch (`stage`); only when all have, the new state is saved and every worker
switches to it in one assignment (`commit`); if any fails, all drop what they staged (`abort`) and nothing changed.
A worker that starts later (a replacement) loads the saved state and is sent any newer one when it says hello.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import asdict
from pathlib import Path

from ..limits import MAX_BATCH_ITEMS
from ..model.mapped import prepare
from . import shm
from .repository import (
    ModelState,
    Repository,
    RepositoryError,
    Route,
    State,
    Version,
    default_of,
    exports_below,
    may_answer,
    proof,
)

logger = logging.getLogger("torchship.oip")
STAGE_TIMEOUT_S = 300  # loading and warming one version in a worker
REPLY_TIMEOUT_S = 60


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def receive(reader) -> dict:
    line = reader.readline()
    if not line:
        raise ConnectionError("the other side closed the control connection")
    return json.loads(line)


class ControlPlane:
    """What the supervisor keeps of the repository: the saved state, its workers' command connections, and the admin
    calls that change them."""

    def __init__(
        self,
        path: str,
        state_file: str,
        *,
        sources: list[str],
        backend: str,
        aliases: dict[str, str],
        allow_shm: bool = False,
        mapped_dir: Path | None = None,
    ):
        self.path, self.state_file, self.sources, self.backend = path, state_file, sources, backend
        self.mapped_dir = mapped_dir  # where a large model is optimized once before the workers load it (mapped.py)
        self.aliases = aliases  # a model served under another name than its card's (--model_name): served -> card
        self.allow_shm = allow_shm  # clients may register shared memory regions (config.allow_client_shm)
        self.regions: dict[str, shm.Region] = {}
        self.state = State.load(state_file)
        self.workers: dict[int, tuple[socket.socket, object]] = {}
        self.lock = threading.Lock()  # one admin call at a time; the worker table is shared with hello
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        try:
            first = receive(reader)
        except (ConnectionError, ValueError, OSError):
            sock.close()
            return
        if "hello" in first:
            self._hello(sock, reader, first["hello"])
            return
        try:
            with self.lock:
                reply = {"ok": True, "result": self.admin(first.get("admin") or {})}
        except RepositoryError as e:
            reply = {"ok": False, "status": e.status, "error": str(e)}
        except Exception as e:  # a bug here must not take the supervisor down with it
            logger.exception("admin call failed")
            reply = {"ok": False, "status": 500, "error": f"{type(e).__name__}: {e}"}
        try:
            send(sock, reply)
        finally:
            sock.close()

    def _hello(self, sock: socket.socket, reader, hello: dict) -> None:
        with self.lock:
            self.workers[int(hello["pid"])] = (sock, reader)
            try:
                if hello.get("generation", 0) != self.state.generation:  # it loaded a state older than the saved one
                    self._command(int(hello["pid"]), {"op": "commit", "state": json.loads(self.state.to_json())})
                if self.regions:  # a replacement maps what clients registered before it started
                    regions = {n: asdict(r) for n, r in self.regions.items()}
                    self._command(int(hello["pid"]), {"op": "shm", "regions": regions})
            except (OSError, ConnectionError, ValueError) as e:
                logger.warning("worker %s missed the repository's state: %s", hello["pid"], e)

    def forget(self, pid: int) -> None:
        with self.lock:
            entry = self.workers.pop(pid, None)
        if entry:
            entry[0].close()

    def _command(self, pid: int, message: dict, timeout: float = REPLY_TIMEOUT_S) -> dict:
        sock, reader = self.workers[pid]
        sock.settimeout(timeout)
        send(sock, message)
        return receive(reader)

    def _everywhere(self, message: dict, timeout: float) -> dict[int, dict]:
        """MESSAGE to every worker at once, then each one's answer (a worker that died answers with an error)."""
        pids, replies = list(self.workers), {}
        for pid in pids:
            try:
                self.workers[pid][0].settimeout(timeout)
                send(self.workers[pid][0], message)
            except OSError as e:
                replies[pid] = {"ok": False, "error": f"unreachable ({e})"}
        for pid in pids:
            if pid not in replies:
                try:
                    replies[pid] = receive(self.workers[pid][1])
                except (OSError, ConnectionError, ValueError) as e:
                    replies[pid] = {"ok": False, "error": f"no answer ({e})"}
        return replies

    def _commit(self, state: State) -> None:
        state.save(self.state_file)  # the truth first: a worker that starts now loads it
        self.state = state
        failed = {
            pid: r
            for pid, r in self._everywhere(
                {"op": "commit", "state": json.loads(state.to_json())}, REPLY_TIMEOUT_S
            ).items()
            if not r.get("ok")
        }
        for pid, r in failed.items():
            logger.error("worker %d did not apply repository generation %d: %s", pid, state.generation, r["error"])

    # the admin calls (REST and gRPC forward them here)

    def admin(self, call: dict) -> list[dict] | dict:
        op, name = call.get("op"), str(call.get("model", ""))[:64]
        params = call.get("parameters") or {}
        if op == "load":
            return self.load(name, params)
        if op == "unload":
            return self.unload(name, params)
        if op == "route":
            return self.route(name, params)
        if op == "shm_register":
            return self.shm_register(params)
        if op == "shm_unregister":
            return self.shm_unregister(params.get("name"))
        raise RepositoryError(f"no repository call {op!r}")

    # the system shared memory extension: registrations kept here, mapped in every worker (shm.py)

    def shm_register(self, params: dict) -> dict:
        if not self.allow_shm:
            raise RepositoryError(
                f"this server takes no shared memory from clients: start it with --{shm.ALLOW} "
                "(`torchship serve start --allow-client-shm`) to let clients on this machine "
                "register regions",
                403,
            )
        try:
            region = shm.check(params.get("name"), params.get("key"), params.get("offset", 0), params.get("byte_size"))
        except shm.ProtocolError as e:
            raise RepositoryError(e.message, e.status) from None
        if region.name in self.regions:
            raise RepositoryError(
                f"shared memory region {region.name!r} is already registered: unregister it first", 409
            )
        self._share({**self.regions, region.name: region})
        return {}

    def shm_unregister(self, name: str | None) -> dict:
        """One region, or every one (no name): unregistering one that is not there is no error, as in Triton."""
        self._share({n: r for n, r in self.regions.items() if name and n != name})
        return {}

    def _share(self, regions: dict) -> None:
        """Every worker maps the regions before the call returns; one that cannot keeps the old set, and says why."""
        message = {"op": "shm", "regions": {n: asdict(r) for n, r in regions.items()}}
        failed = {pid: r for pid, r in self._everywhere(message, REPLY_TIMEOUT_S).items() if not r.get("ok")}
        if failed:
            self._everywhere({"op": "shm", "regions": {n: asdict(r) for n, r in self.regions.items()}}, REPLY_TIMEOUT_S)
            pid, r = next(iter(failed.items()))
            raise RepositoryError(f"worker {pid} could not map the shared memory: {r.get('error')}", 400)
        self.regions = regions

    def load(self, name: str, params: dict) -> list[dict]:
        """Every version of NAME on disk: new ones loaded and warmed everywhere before any takes traffic; the default
        moves to the newest that may answer (repository.may_answer), or the one `default` names; versions gone from
        disk are unloaded. A `config` parameter (Triton's load_model(config=...)) sets what it may of the model's
        configuration; every version loads again under it. Failures start with Triton's phrase, "failed to load"."""
        try:
            return self._load(name, params)
        except RepositoryError as e:
            raise RepositoryError(f"failed to load {name!r}: {e}", e.status) from None

    def _load(self, name: str, params: dict) -> list[dict]:
        card_name = self.aliases.get(name, name)
        found = {e.version: e for src in self.sources for e in exports_below(src, self.backend) if e.name == card_name}
        if not found:
            raise RepositoryError(f"no export of a model named {name!r} in {', '.join(self.sources)}", 404)
        overrides = config_overrides(params.get("config"), name)
        old = self.state.models.get(name)
        loaded = old.versions if old else {}
        specs = {
            v: loaded[v]
            if v in loaded and loaded[v].directory == str(e.directory)
            else proof(e.directory, self.backend)
            for v, e in found.items()
        }
        same = old is not None and old.overrides == overrides
        new = [v for v in specs if not same or v not in loaded or loaded[v].directory != specs[v].directory]
        for v in new:
            prepare(specs[v].directory, self.backend, self.mapped_dir)
            stage = {"op": "stage", "model": name, "version": v, "dir": specs[v].directory, "overrides": overrides}
            replies = self._everywhere(stage, STAGE_TIMEOUT_S)
            failed = {pid: r for pid, r in replies.items() if not r.get("ok")}
            if failed:
                self._everywhere({"op": "abort"}, REPLY_TIMEOUT_S)
                pid, r = next(iter(failed.items()))
                raise RepositoryError(
                    f"{name} version {v} never took traffic: it failed in worker {pid} ({r.get('error')})"
                )
        default = str(params.get("default") or "") or default_of(specs)
        if default not in specs or not may_answer(specs, default):
            self._everywhere({"op": "abort"}, REPLY_TIMEOUT_S)
            why = specs[default].reason if default in specs else "not on disk"
            raise RepositoryError(f"{name} version {default} cannot be the default: {why}")
        for v, spec in specs.items():
            if not spec.proven and v == default:
                logger.warning("%s version %s answers clients unproven (no version of it is): %s", name, v, spec.reason)
        route = old.route if old else Route(default)
        route = Route(
            default,
            *(route.canary, route.canary_percent) if route.canary in specs else (None, 0.0),
            route.shadow if route.shadow in specs else None,
        )
        self._commit(self.state.with_model(name, ModelState(specs, route, overrides)))
        return self.index(name)

    def unload(self, name: str, params: dict) -> list[dict]:
        old = self.state.models.get(name)
        if old is None:
            raise RepositoryError(f"no model named {name!r} is loaded", 404)
        version = str(params.get("version") or "")
        if not version:
            self._commit(self.state.with_model(name, None))
            return []
        if version not in old.versions:
            raise RepositoryError(f"{name} has no version {version!r} loaded", 404)
        if version == old.route.default:
            raise RepositoryError(
                f"{name} version {version} is the default: make another the default first "
                "(load with a default, or route)",
                409,
            )
        r = old.route
        route = Route(
            r.default,
            *(r.canary, r.canary_percent) if r.canary != version else (None, 0.0),
            r.shadow if r.shadow != version else None,
        )
        versions = {v: s for v, s in old.versions.items() if v != version}
        self._commit(self.state.with_model(name, ModelState(versions, route)))
        return self.index(name)

    def route(self, name: str, params: dict) -> list[dict]:
        """Set NAME's default, canary (a version and its percent of requests) and shadow; only proven versions may
        answer clients, any loaded version may shadow."""
        old = self.state.models.get(name)
        if old is None:
            raise RepositoryError(f"no model named {name!r} is loaded", 404)
        r = old.route
        default = str(params.get("default", r.default))
        canary = params.get("canary", r.canary) or None
        shadow = params.get("shadow", r.shadow) or None
        try:
            percent = float(params.get("canary_percent", r.canary_percent if canary == r.canary else 0))
        except (TypeError, ValueError):
            raise RepositoryError("canary_percent must be a number from 0 to 100") from None
        for role, v in (("default", default), ("canary", canary), ("shadow", shadow)):
            if v is not None and str(v) not in old.versions:
                raise RepositoryError(f"{name} has no version {str(v)[:32]!r} loaded to be its {role}", 404)
        for role, v in (("default", default), ("canary", canary)):
            if v is not None and not may_answer(old.versions, str(v)):
                raise RepositoryError(f"{name} version {v} cannot be the {role}: {old.versions[str(v)].reason}")
        if not 0 <= percent <= 100:
            raise RepositoryError("canary_percent must be a number from 0 to 100")
        route = Route(
            default, str(canary) if canary else None, percent if canary else 0.0, str(shadow) if shadow else None
        )
        self._commit(self.state.with_model(name, ModelState(old.versions, route)))
        return self.index(name)

    def index(self, name: str) -> list[dict]:
        return [row for row in self.index_all() if row["name"] == name]

    def index_all(self) -> list[dict]:
        return Repository().index(self.state)

    def close(self) -> None:
        self.listener.close()
        Path(self.path).unlink(missing_ok=True)


def config_overrides(text, name: str) -> dict:
    """What a load's configuration (Triton's JSON, as text) changes, in our terms: max_batch_size (rows a request and
    a pass may hold) and dynamic_batching.max_queue_delay_microseconds; a field we cannot honour is refused by name."""
    if text is None or text == "":
        return {}
    try:
        cfg = json.loads(text) if isinstance(text, str) else text
    except ValueError as e:
        raise RepositoryError(f"its config is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise RepositoryError("its config is a JSON object of model configuration fields")
    out = {}
    for key, value in cfg.items():
        if key == "name" and value == name:
            continue
        if key == "max_batch_size":
            out["max_batch_size"] = _count(value, "max_batch_size", 1, MAX_BATCH_ITEMS)
        elif key == "dynamic_batching" and isinstance(value, dict) and set(value) <= {"max_queue_delay_microseconds"}:
            if "max_queue_delay_microseconds" in value:
                us = _count(
                    value["max_queue_delay_microseconds"], "dynamic_batching.max_queue_delay_microseconds", 0, 10**6
                )
                out["max_batch_delay_ms"] = us / 1000
        else:
            field = (
                f"dynamic_batching.{sorted(set(value) - {'max_queue_delay_microseconds'})[0]}"
                if key == "dynamic_batching" and isinstance(value, dict)
                else key
            )
            raise RepositoryError(
                f"its config sets {field!r}, which this server does not take from a load (it takes "
                "max_batch_size and dynamic_batching.max_queue_delay_microseconds)"
            )
    return out


def _count(value, field: str, low: int, high: int) -> int:
    """An integer field of Triton's JSON (int64 travels as a string too), within LOW..HIGH."""
    text = "" if isinstance(value, bool) else str(value).strip()
    if not (text.lstrip("-").isdigit() and low <= int(text) <= high):
        raise RepositoryError(f"its config's {field} must be an integer from {low} to {high}, got {value!r}"[:200])
    return int(text)


def initial_state(sources: list[str], backend: str, aliases: dict[str, str] | None = None) -> State:
    """What the server starts with: every export found, each model's default the newest version that may answer
    (repository.may_answer: the rule `load` and `route` keep too). ALIASES: served name -> card name, for a model
    served under a name of its own."""
    found = [e for src in sources for e in exports_below(src, backend)]
    if not found:
        raise RepositoryError(f"no export with a {backend} model file in {', '.join(sources)}", 404)
    served_as = {card: served for served, card in (aliases or {}).items()}
    models: dict[str, dict[str, Version]] = {}
    for e in found:
        models.setdefault(served_as.get(e.name, e.name), {})[e.version] = proof(e.directory, backend)
    return State(1, {name: ModelState(versions, Route(default_of(versions))) for name, versions in models.items()})
