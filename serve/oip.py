"""The Open Inference Protocol server's lifecycle (torchship.handlers.oip_server): start, wait ready, status, stop,
with the same shape as TorchServe's; one state directory per instance, so `stop` stops exactly this one."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from torchship.handlers import metrics as names
from torchship.handlers.card import CARD_FILE, FORMAT_BY_BACKEND, ModelCard
from torchship.serve.process import ServerError, StartOptions, free_ports, http_json, log_marks, new_lines
from torchship.serve.settings import LOOPBACK, OIP_GRPC_PORT, OIP_HTTP_PORT

if TYPE_CHECKING:
    from torchship.serve.samples import Sample

MODULE = "torchship.handlers.oip_server"
LEGACY_MODULES = ("torchship.runtime.oip_server",)  # instances started before the runtime took its folder's name
LOG = "oip.log"
STATUS = "oip-status.json"  # the supervisor's own account of its workers
ADMIN_TOKEN = "admin-token"  # the repository calls' token, beside the instance's state (mode 0600)
NAME = "oip"


@dataclass(frozen=True)
class OIPConfig:
    export_dir: str
    model: str
    _: KW_ONLY
    state_dir: str = "serve-state"
    http_port: int = OIP_HTTP_PORT
    grpc_port: int = OIP_GRPC_PORT
    host: str = LOOPBACK
    backend: str = "onnx"
    workers: int = 0  # 0: torchship.handlers.sizing decides, as for every number below left at its default
    max_batch: int = 0
    max_delay_ms: float = -1
    threads: int = 0
    max_queue: int = 0
    max_pixels: int = 0
    server_flags: tuple[str, ...] = ()  # more of the server's own flags (`python -m MODULE --help`: limits, timeouts)
    extra_exports: tuple[str, ...] = ()  # more exports, or folders of exports, served beside export_dir
    runtime: str = NAME

    @classmethod
    def on_free_ports(cls, export_dir: str, model: str, state_dir: str, **kw) -> OIPConfig:
        http_port, grpc_port = free_ports(2)
        return cls(export_dir, model, state_dir=state_dir, **{"http_port": http_port, "grpc_port": grpc_port, **kw})

    @property
    def address(self) -> str:
        return LOOPBACK if self.host in ("0.0.0.0", "::") else self.host

    @property
    def inference_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.address}:{self.grpc_port}"


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def command(cfg: OIPConfig) -> list[str]:
    flags = {
        "http_port": cfg.http_port,
        "grpc_port": cfg.grpc_port,
        "host": cfg.host,
        "backend": cfg.backend,
        "workers": cfg.workers,
        "max_batch": cfg.max_batch,
        "max_delay_ms": cfg.max_delay_ms,
        "threads": cfg.threads,
        "max_queue": cfg.max_queue,
        "max_pixels": cfg.max_pixels,
        "status_file": str(Path(cfg.state_dir) / STATUS),
        "admin_token_file": str(Path(cfg.state_dir) / ADMIN_TOKEN),
    }
    if not cfg.extra_exports and (Path(cfg.export_dir) / CARD_FILE).is_file():
        flags["model_name"] = cfg.model  # one export, served under the name asked for
    exports = (f"--model_dir={d}" for d in (cfg.export_dir, *cfg.extra_exports))
    return [sys.executable, "-m", MODULE, *exports, *(f"--{k}={v}" for k, v in flags.items()), *cfg.server_flags]


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
    export = Path(cfg.export_dir).resolve()
    cfg = OIPConfig(**{**asdict(cfg), "state_dir": str(state), "export_dir": str(export)})
    if not loopback(cfg.host) and not behind_auth:
        raise ServerError(
            f"refusing to listen on {cfg.host}: the Open Inference Protocol has no authentication; "
            "put an authenticating proxy in front and pass --behind-auth (README: the OIP runtime)"
        )
    if pid(state) is not None:
        raise ServerError(f"an OIP server started from {state} is already running: `torchship serve stop` first")
    if cfg.extra_exports or not (export / CARD_FILE).is_file():  # folders of exports: the server says what it found
        cfg = OIPConfig(**{**asdict(cfg), "extra_exports": tuple(str(Path(d).resolve()) for d in cfg.extra_exports)})
        if not export.is_dir():
            raise ServerError(f"{export} not found: run `torchship export` first")
    else:
        for f in (CARD_FILE, FORMAT_BY_BACKEND[cfg.backend].file):
            if not (export / f).is_file():
                raise ServerError(f"{export / f} not found: run `torchship export` first")
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
    (state / "instance.json").write_text(json.dumps(asdict(cfg), indent=2))
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
    cfg = OIPConfig(
        o.export_dir or f"exports/{o.model}",
        o.model,
        state_dir=o.state_dir,
        extra_exports=o.more_exports,
        http_port=o.inference_port or OIP_HTTP_PORT,
        grpc_port=o.grpc_port or OIP_GRPC_PORT,
        host=o.host,
        backend=o.backend,
        workers=o.workers or 0,
        max_batch=o.max_batch or 0,
        max_delay_ms=-1 if o.max_delay_ms is None else o.max_delay_ms,
        server_flags=("--access_log",) if o.access_log else (),
    )
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
    d["runtime"] = NAME  # instances recorded as "kserve" before the runtime had its own name
    d["server_flags"] = tuple(d.get("server_flags", ()))
    d["extra_exports"] = tuple(d.get("extra_exports", ()))
    return OIPConfig(**d)


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
    from torchship.serve.client import metric_series

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
    import urllib.request

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
    from torchship.serve.client import Target

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
    """The served model's card: the export's own."""
    return ModelCard.load(Path(cfg.export_dir))


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
