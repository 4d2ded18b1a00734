"""The Open Inference Protocol server's lifecycle (torchship.handlers.oip): start, wait ready, status, stop, with the
same shape as TorchServe's; one state directory per instance, so `stop` stops exactly this one. The server is started
with its own Config (handlers/oip/config.py), written into the state directory whole: no setting is passed twice."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import KW_ONLY, dataclass, replace
from pathlib import Path

import psutil

from torchship.handlers.card import CARD_FILE, ModelCard
from torchship.handlers.formats import FORMAT_BY_BACKEND
from torchship.handlers.oip import metrics as names
from torchship.handlers.oip.config import Config, Limits
from torchship.handlers.oip.repository import exports_below
from torchship.serve.client import Target, metric_series
from torchship.serve.process import ServerError, StartOptions, free_ports, http_json, log_marks, new_lines
from torchship.serve.samples import Sample
from torchship.serve.settings import LOOPBACK

MODULE = "torchship.handlers.oip"
# instances started before the runtime had folders, or took its folder's name: `stop` still knows them
LEGACY_MODULES = ("torchship.handlers.oip_server", "torchship.runtime.oip_server")
LOG = "oip.log"
STATUS = "oip-status.json"  # the supervisor's own account of its workers
ADMIN_TOKEN = "admin-token"  # the repository calls' token, beside the instance's state (mode 0600)
CACHE = "cache"  # a large model's optimized copy and the measured costs, kept for the next start (Config.cache_dir)
CONFIG = "oip-config.json"  # the server's Config, as it was started with it
NAME = "oip"


@dataclass(frozen=True)
class OIPConfig:
    """One OIP server as `torchship serve start` runs it: the name it serves, where its state lives, and the server's
    own configuration, which it is started with as is."""

    model: str
    server: Config
    _: KW_ONLY
    state_dir: str = "serve-state"
    runtime: str = NAME

    @classmethod
    def of(cls, export_dir: str, model: str, state_dir: str, *, extra_exports: tuple[str, ...] = (), **settings):
        """An instance serving EXPORT_DIR (and EXTRA_EXPORTS) with the server's SETTINGS (Config's fields)."""
        limits = settings.pop("limits", None) or Limits()
        limits = Limits(**limits) if isinstance(limits, dict) else limits
        return cls(model, Config((export_dir, *extra_exports), limits=limits, **settings), state_dir=state_dir)

    @classmethod
    def on_free_ports(cls, export_dir: str, model: str, state_dir: str, **settings) -> OIPConfig:
        """The same on two ports the kernel says are free now (tests, benchmarks), unless SETTINGS name them."""
        http_port, grpc_port = free_ports(2)
        settings = {"http_port": http_port, "grpc_port": grpc_port, **settings}
        return cls.of(export_dir, model, state_dir, **settings)

    @property
    def export_dir(self) -> str:
        return self.server.model_dirs[0]

    @property
    def http_port(self) -> int:
        return self.server.http_port

    @property
    def grpc_port(self) -> int:
        return self.server.grpc_port

    @property
    def address(self) -> str:
        host = self.server.host
        return LOOPBACK if host in ("0.0.0.0", "::") else host

    @property
    def inference_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def to_dict(self) -> dict:
        return {"model": self.model, "server": self.server.to_dict(), "state_dir": self.state_dir, "runtime": NAME}


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def command(cfg: OIPConfig) -> list[str]:
    """The server, started with the instance's Config (saved whole in its state directory)."""
    path = Path(cfg.state_dir) / CONFIG
    cfg.server.save(path)
    return [sys.executable, "-m", MODULE, "--config", str(path)]


def pid(state_dir: Path | str) -> int | None:
    """The recorded supervisor, if it still runs and is still ours (a pid can be reused)."""
    f = Path(state_dir) / "oip.pid"
    try:
        p = int(f.read_text().split()[0])
        proc = psutil.Process(p)
        command = " ".join(proc.cmdline())
        ours = any(m in command for m in (MODULE, *LEGACY_MODULES))
        return p if ours and proc.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def ready(cfg: OIPConfig) -> bool:
    try:
        return http_json(f"{cfg.inference_url}/v2/health/ready", timeout=2).get("ready") is True
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return False


def log_excerpt(state: Path, marks: dict, lines: int = 20) -> str:
    new = new_lines(state, LOG, marks)
    picked = [line for line in new if any(w in line for w in ("Error", "error", "Traceback", "ERROR", "cannot"))]
    return "\n".join(dict.fromkeys(picked[-lines:] + new[-5:])) or f"(nothing in {state / 'logs' / LOG})"


def start(cfg: OIPConfig, timeout: float = 120, *, behind_auth: bool = False) -> OIPConfig:
    state = Path(cfg.state_dir).resolve()
    server = cfg.server
    exports = tuple(str(Path(d).resolve()) for d in server.model_dirs)
    export = Path(exports[0])
    if not loopback(server.host) and not behind_auth:
        raise ServerError(
            f"refusing to listen on {server.host}: the Open Inference Protocol has no authentication; "
            "put an authenticating proxy in front and pass --behind-auth (docs/serving.md: the OIP runtime)"
        )
    if pid(state) is not None:
        raise ServerError(f"an OIP server started from {state} is already running: `torchship serve stop` first")
    one = len(exports) == 1 and (export / CARD_FILE).is_file()
    if not one:  # folders of exports: the server says what it found
        if not export.is_dir():
            raise ServerError(f"{export} not found: run `torchship export` first")
    else:
        for f in (CARD_FILE, FORMAT_BY_BACKEND[server.backend].file):
            if not (export / f).is_file():
                raise ServerError(f"{export / f} not found: run `torchship export` first")
    server = replace(
        server,
        model_dirs=exports,
        model_name=server.model_name or (cfg.model if one else None),  # one export, served under the name asked for
        status_file=str(state / STATUS),
        admin_token_file=str(state / ADMIN_TOKEN),
        cache_dir=server.cache_dir or str(state / CACHE),  # a restart of this instance neither optimizes nor measures
    )
    cfg = replace(cfg, server=server, state_dir=str(state))
    (state / "logs").mkdir(parents=True, exist_ok=True)
    marks = log_marks(state, (LOG,))
    with open(state / "logs" / LOG, "ab") as log:
        proc = subprocess.Popen(
            command(cfg),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    (state / "oip.pid").write_text(str(proc.pid))
    (state / "instance.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop(state)
            raise ServerError(
                f"the OIP server exited during start-up (code {proc.returncode}):\n{log_excerpt(state, marks)}"
            )
        own = workers(state)  # ready by our own supervisor's account: another server on the port is not ours
        if own.get("pid") == proc.pid and own.get("workers") and all(w["ready"] for w in own["workers"]) and ready(cfg):
            return cfg
        time.sleep(0.2)
    stop(state)
    raise ServerError(f"{cfg.model} was not ready after {timeout:.0f}s:\n{log_excerpt(state, marks)}")


def start_with(o: StartOptions) -> OIPConfig:
    settings = {
        "http_port": o.inference_port,
        "grpc_port": o.grpc_port,
        "host": o.host,
        "backend": o.backend,
        "workers": o.workers,
        "max_batch": o.max_batch,
        "max_batch_delay_ms": o.max_batch_delay_ms,
        "max_batch_tokens": o.max_batch_tokens,
        "access_log": o.access_log,
        "loopback_admin": o.loopback_admin,
        "allow_client_shm": o.allow_client_shm,
        "triton_images": o.triton_images,
    }
    given = {k: v for k, v in settings.items() if v is not None}  # the rest: the server's own defaults
    export = o.export_dir or f"exports/{o.model}"
    cfg = OIPConfig.of(export, o.model, o.state_dir, extra_exports=o.more_exports, **given)
    return start(cfg, o.timeout, behind_auth=o.behind_auth)


def stop(state_dir: Path | str = "serve-state", timeout: float = 30) -> bool:
    """SIGTERM to the supervisor's process group (it stops its workers), SIGKILL to anything that lingers."""
    state = Path(state_dir).resolve()
    p = pid(state)
    if p is None:
        return False
    try:
        procs = [psutil.Process(p), *psutil.Process(p).children(recursive=True)]
        os.killpg(os.getpgid(p), signal.SIGTERM)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return True
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return True


def load_instance(state_dir: Path | str) -> OIPConfig:
    f = Path(state_dir) / "instance.json"
    if not f.is_file():
        raise ServerError(f"no instance recorded in {state_dir}")
    d = json.loads(f.read_text())
    if "server" not in d:  # recorded before the server had one Config: its settings were the instance's own fields
        kept = {k: d[k] for k in ("host", "http_port", "grpc_port", "backend") if k in d}
        d["server"] = {"model_dirs": [d["export_dir"], *d.get("extra_exports", ())], **kept}
    return OIPConfig(d["model"], Config.from_dict(d["server"]), state_dir=d.get("state_dir", str(state_dir)))


def workers(state_dir: Path | str) -> dict:
    try:
        return json.loads((Path(state_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def status(state_dir: Path | str = "serve-state") -> dict:
    state = Path(state_dir)
    p = pid(state)
    if p is None:
        return {"running": False, "runtime": NAME, "state_dir": str(state)}
    cfg = load_instance(state)
    supervisor = workers(state)
    return {
        "running": True,
        "runtime": NAME,
        "pid": p,
        "model": cfg.model,
        "ready": ready(cfg),
        "inference": cfg.inference_url,
        "grpc": cfg.grpc_address,
        "metrics": f"{cfg.inference_url}/metrics",
        "models": supervisor.get("models", []),
        "shadow": shadows(cfg),
        "workers": [
            {"pid": w["pid"], "ready": w["ready"], "warmup": w.get("warmup", {})} for w in supervisor.get("workers", [])
        ],
        "restarts": supervisor.get("restarts", 0),
        "settings": supervisor.get("settings", {}),
    }


def shadows(cfg: OIPConfig) -> list[dict]:
    """Each shadow pair's evidence from /metrics: requests compared, how many agreed, the largest difference."""
    series = metric_series(f"{cfg.inference_url}")
    pairs: dict[tuple, dict] = {}
    for (name, labels), value in series.items():
        if name in (names.SHADOW, names.SHADOW_AGREED, names.SHADOW_MAX_DIFF):
            key = (labels.get("model"), labels.get("default"), labels.get("candidate"))
            pairs.setdefault(key, {"model": key[0], "default": key[1], "candidate": key[2]})[name] = value
    return [
        {
            **p,
            "compared": int(p.get(names.SHADOW, 0)),
            "agreed": int(p.get(names.SHADOW_AGREED, 0)),
            "max_abs_difference": p.get(names.SHADOW_MAX_DIFF, 0.0),
        }
        for p in pairs.values()
    ]


def key(state_dir: Path | str, api: str = "inference") -> str:
    """The admin token of the repository calls; inference has none (loopback, or behind your authenticating
    proxy)."""
    if api not in ("admin", "management"):
        raise ServerError(
            "the OIP server's inference has no token: it listens on loopback, or behind your "
            "authenticating proxy; the repository calls take `--api admin`"
        )
    f = Path(state_dir) / ADMIN_TOKEN
    if not f.is_file():
        raise ServerError(f"no admin token in {f}: is an OIP server running from {state_dir}?")
    return f.read_text().strip()


def repository_call(state_dir: Path | str, op: str, model: str | None = None, body: dict | None = None):
    """A repository call (index, load, unload) or our route, with the instance's admin token: its JSON answer, or a
    ServerError with the server's message."""
    cfg = load_instance(state_dir)
    path = "/v2/repository/index" if op == "index" else f"/v2/repository/models/{model}/{op}"
    req = urllib.request.Request(
        f"{cfg.inference_url}{path}",
        data=json.dumps(body or {}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key(state_dir, 'admin')}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", str(e))
        except ValueError:
            message = str(e)
        raise ServerError(message) from None
    except OSError as e:
        raise ServerError(f"no OIP server answers at {cfg.inference_url}: {e}") from None


def load_target(state_dir: Path | str):
    """What the load test sends to: the v2 infer route, one BYTES image per request, and our metric names."""
    cfg = load_instance(state_dir)
    return Target(
        LOOPBACK, cfg.http_port, cfg.model, protocol="v2", metrics_url=cfg.inference_url, metric_names=METRIC_NAMES
    )


METRIC_NAMES = {
    "requests": names.REQUESTS,
    "queue": f"{names.QUEUE_SECONDS}_sum",
    "inference": f"{names.INFERENCE_SECONDS}_sum",
    "unit": 1.0,
    "rows": f"{names.BATCH_SIZE}_sum",
    "passes": f"{names.BATCH_SIZE}_count",
}


def card(cfg: OIPConfig) -> ModelCard:
    """The served model's card: the export's own, or, for a folder of exports, its newest version's."""
    export = Path(cfg.export_dir)
    if (export / CARD_FILE).is_file():
        return ModelCard.load(export)
    found = [e for d in cfg.server.model_dirs for e in exports_below(d, cfg.server.backend) if e.name == cfg.model]
    if not found:
        raise ValueError(f"no export of {cfg.model} in {', '.join(cfg.server.model_dirs)}")
    return ModelCard.load(max(found, key=lambda e: int(e.version)).directory)


def curl_example(cfg: OIPConfig, sample: Sample) -> str:
    if sample.v2 is not None:  # named inputs: a v2 request
        return (
            f"curl -H 'Content-Type: application/json' -d @{sample.v2} {cfg.inference_url}/v2/models/{cfg.model}/infer"
        )
    if sample.json:  # KServe v1 rows
        return (
            f"curl -H 'Content-Type: application/json' -d @{sample.path} "
            f"{cfg.inference_url}/v1/models/{cfg.model}:predict"
        )
    body = (
        '{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["\'"$(base64 -w0 '
        + str(sample.path)
        + ')"\'"]}]}'
    )
    return f"curl -H 'Content-Type: application/json' -d '{body}' {cfg.inference_url}/v2/models/{cfg.model}/infer"
