"""TorchServe's lifecycle through its own CLI: one state directory per instance, so we stop exactly ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path

import psutil

from torchship.handlers.card import CARD_FILE, ModelCard
from torchship.handlers.sizing import queue_size
from torchship.serve.client import Target
from torchship.serve.process import ServerError, StartOptions, free_ports, http_json, log_marks, new_lines
from torchship.serve.samples import Sample
from torchship.serve.settings import LOOPBACK, MAX_REQUEST_BYTES, TORCHSERVE_PORTS, torchserve_properties

PID_FILE = ".model_server.pid"
LOG_CONFIG = Path(__file__).with_name("log4j2.xml")
NAME = "torchserve"
PORTS = TORCHSERVE_PORTS


@dataclass
class ServerConfig:
    model: str
    _: KW_ONLY
    model_store: str = "model_store"
    state_dir: str = "serve-state"
    inference_port: int = PORTS.inference
    management_port: int = PORTS.management
    metrics_port: int = PORTS.metrics
    grpc_inference_port: int = PORTS.grpc_inference
    grpc_management_port: int = PORTS.grpc_management
    token_auth: bool = True
    max_request_size: int = MAX_REQUEST_BYTES  # bytes; larger bodies are refused by the frontend (413)
    job_queue_size: int = 0  # requests waiting per model beyond which TorchServe answers 503; 0: queue_size()
    extra: dict | None = None  # more config.properties lines (tuning experiments, site settings)
    extra_models: tuple[str, ...] = ()  # more archives of the store to serve beside `model`
    cors_origin: str | None = None  # the one browser origin allowed to call inference (tokens off: README)
    # The interpreter TorchServe and its workers run under: any with TorchServe and the runtime's dependencies;
    # torchship itself need not be installed there (the archive carries its runtime; tests prove it).
    python: str = sys.executable
    runtime: str = NAME

    @classmethod
    def on_free_ports(cls, model: str, model_store: str, state_dir: str, **kw) -> ServerConfig:
        """Every port the kernel says is free now: for instances that must not clash (tests, benchmarks)."""
        names = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")
        ports = dict(zip(names, free_ports(len(names))))
        return cls(model, model_store=model_store, state_dir=state_dir, **{**ports, **kw})

    @property
    def models(self) -> tuple[str, ...]:
        return (self.model, *self.extra_models)

    @property
    def inference_url(self) -> str:
        return f"http://{LOOPBACK}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}"


def config_properties(cfg: ServerConfig) -> str:
    store = str(Path(cfg.model_store).resolve())
    return torchserve_properties(
        inference=cfg.inference_url,
        management=cfg.management_url,
        metrics=cfg.metrics_url,
        grpc_host=LOOPBACK,
        grpc_ports=(cfg.grpc_inference_port, cfg.grpc_management_port),
        model_store=store,
        models=list(cfg.models),
        queue=cfg.job_queue_size or queue_size(cfg.max_request_size),
        token_auth=cfg.token_auth,
        max_request_bytes=cfg.max_request_size,
        cors_origin=cfg.cors_origin,
        extra=cfg.extra,
    )


def torchserve_command(python: str) -> list[str]:
    """TorchServe's own CLI under PYTHON: its frontend starts every worker with that same interpreter."""
    return [python, "-m", "ts.model_server"]


def _env(state: Path) -> dict:
    tmp = state / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    # TMPDIR holds TorchServe's pid file: one per instance, so --stop stops this one and no other.
    return {
        **os.environ,
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(state / "logs"),
        "METRICS_LOCATION": str(state / "logs"),
    }


def pid(state_dir: Path | str) -> int | None:
    f = Path(state_dir) / "tmp" / PID_FILE
    try:
        p = int(f.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return p if psutil.pid_exists(p) else None


def keys(state_dir: Path | str) -> dict:
    """TorchServe's key_file.json: {'inference': {'key': ...}, 'management': {...}, ...}; {} when auth is off."""
    f = Path(state_dir) / "key_file.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def headers(state_dir: Path | str, api: str = "inference") -> dict:
    k = keys(state_dir).get(api, {}).get("key")
    return {"Authorization": f"Bearer {k}"} if k else {}


LOG_FILES = ("torchserve.out", "ts_log.log", "model_log.log")
DEATH_SIGN = "Load model failed"  # what the frontend logs each time a worker dies while loading its model


def log_excerpt(state: Path, marks: dict[str, int] | None = None, lines: int = 25) -> str:
    """The lines of this start's logs that explain a failure: errors and tracebacks, newest last."""
    picked: dict[str, None] = {}  # ordered and without repeats: workers retry and log the same error again
    for name in LOG_FILES:
        for line in new_lines(state, name, marks):
            if any(w in line for w in ("ERROR", "Error", "Exception", "error:", DEATH_SIGN)):
                text = line.split(" - ", 1)[-1].strip()[:300]
                picked[f"{name}: {text}"] = None
    return "\n".join(list(picked)[-lines:]) or f"(no error lines in {state / 'logs'} since this start)"


def load_failures(state: Path, marks: dict[str, int] | None) -> int:
    return sum(DEATH_SIGN in line for line in new_lines(state, "ts_log.log", marks))


def model_status(cfg: ServerConfig, model: str | None = None) -> list[dict]:
    return http_json(f"{cfg.management_url}/models/{model or cfg.model}", headers(cfg.state_dir, "management"))


def ready(cfg: ServerConfig, model: str) -> bool:
    workers = [w for m in model_status(cfg, model) for w in m.get("workers", [])]
    return bool(workers) and all(w.get("status") == "READY" for w in workers)


def wait_ready(cfg: ServerConfig, timeout: float, marks: dict[str, int] | None = None) -> None:
    state = Path(cfg.state_dir)
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if pid(state) is None and time.monotonic() > started + 5:  # the pid file appears within seconds
            raise ServerError(f"TorchServe exited during start-up:\n{log_excerpt(state, marks)}")
        try:
            ping = http_json(f"{cfg.inference_url}/ping", headers(state), timeout=2)
            if ping.get("status") == "Healthy" and all(ready(cfg, m) for m in cfg.models):
                return
        except (urllib.error.URLError, OSError, ValueError, json.JSONDecodeError):
            pass
        if load_failures(state, marks) >= 2:  # TorchServe retries a crashing worker forever: fail now, not later
            raise ServerError(f"{cfg.model}'s workers crash while loading:\n{log_excerpt(state, marks)}")
        time.sleep(0.5)
    raise ServerError(f"{cfg.model} was not READY after {timeout:.0f}s:\n{log_excerpt(state, marks)}")


def start(cfg: ServerConfig, timeout: float = 180) -> ServerConfig:
    state = Path(cfg.state_dir).resolve()
    cfg = ServerConfig(**{**asdict(cfg), "state_dir": str(state), "model_store": str(Path(cfg.model_store).resolve())})
    if pid(state) is not None:
        raise ServerError(f"a TorchServe started from {state} is already running: `torchship serve stop` first")
    for model in cfg.models:
        mar = Path(cfg.model_store) / f"{model}.mar"
        if not mar.is_file():
            raise ServerError(f"{mar} not found: run `torchship archive` first")
    state.mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(exist_ok=True)
    marks = log_marks(state, LOG_FILES)
    (state / "key_file.json").unlink(missing_ok=True)
    props = state / "config.properties"
    props.write_text(config_properties(cfg))
    cmd = [
        *torchserve_command(cfg.python),
        "--start",
        "--ncs",
        "--ts-config",
        str(props),
        "--model-store",
        cfg.model_store,
        "--log-config",
        str(LOG_CONFIG),
    ]
    if not cfg.token_auth:
        cmd.append("--disable-token-auth")
    # The daemon inherits our stdout: send it to a file, or reading a pipe would wait for the server's exit.
    with open(state / "logs" / "torchserve.out", "ab") as console:
        code = subprocess.run(cmd, cwd=state, env=_env(state), stdout=console, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = new_lines(state, "torchserve.out", marks)[-5:]
        raise ServerError("torchserve --start failed: " + " | ".join(tail))
    (state / "instance.json").write_text(json.dumps(asdict(cfg), indent=2))
    try:
        wait_ready(cfg, timeout, marks)
    except ServerError:
        stop(state)
        raise
    return cfg


def load_instance(state_dir: Path | str) -> ServerConfig:
    f = Path(state_dir) / "instance.json"
    if not f.is_file():
        raise ServerError(f"no TorchServe instance recorded in {state_dir}")
    d = json.loads(f.read_text())
    if d.get("runtime", "torchserve") != "torchserve":
        raise ServerError(f"{state_dir} holds a {d['runtime']} instance, not TorchServe")
    d["extra_models"] = tuple(d.get("extra_models", ()))
    return ServerConfig(**d)


def stop(state_dir: Path | str = "serve-state", timeout: float = 60) -> bool:
    """`torchserve --stop` with this instance's TMPDIR, then wait until it and its workers are gone."""
    state = Path(state_dir).resolve()
    p = pid(state)
    if p is None:
        return kill_orphans(state)
    try:
        procs = [psutil.Process(p), *psutil.Process(p).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        python = load_instance(state).python
    except (ServerError, ValueError, TypeError):
        python = sys.executable
    python = python if Path(python).exists() else sys.executable
    subprocess.run([*torchserve_command(python), "--stop"], cwd=state, env=_env(state), capture_output=True, timeout=60)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:  # workers that outlived their frontend
        proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return True


def kill_orphans(state: Path) -> bool:
    """Workers whose frontend died (a failed start): they listen on sockets in this instance's TMPDIR."""
    marker = str(state / "tmp" / ".ts.sock")
    orphans = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in proc.info["cmdline"] or []):
            orphans.append(proc)
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    psutil.wait_procs(orphans, timeout=10)
    return bool(orphans)


def status(state_dir: Path | str = "serve-state") -> dict:
    state = Path(state_dir)
    p = pid(state)
    if p is None:
        return {"running": False, "runtime": NAME, "state_dir": str(state)}
    try:
        cfg = load_instance(state)
    except ServerError as e:
        return {"running": True, "pid": p, "error": str(e)}
    try:
        models = model_status(cfg)
        workers = [
            {"id": w.get("id"), "status": w.get("status"), "pid": w.get("pid")}
            for m in models
            for w in m.get("workers", [])
        ]
    except (urllib.error.URLError, OSError, ValueError) as e:
        workers = [{"error": str(e)}]
    return {
        "running": True,
        "runtime": NAME,
        "pid": p,
        "model": cfg.model,
        "inference": cfg.inference_url,
        "metrics": cfg.metrics_url,
        "workers": workers,
    }


def card(cfg: ServerConfig) -> ModelCard:
    """The served model's card, as its archive carries it."""
    with zipfile.ZipFile(Path(cfg.model_store) / f"{cfg.model}.mar") as z:
        return ModelCard.from_json(z.read(CARD_FILE).decode())


def curl_example(cfg: ServerConfig, sample: Sample) -> str:
    auth = ""
    if cfg.token_auth:
        key_cmd = f"python3 -c \"import json;print(json.load(open('{Path(cfg.state_dir) / 'key_file.json'}'))['inference']['key'])\""  # noqa: E501
        auth = f'-H "Authorization: Bearer $({key_cmd})" '
    body = f"-H 'Content-Type: application/json' -d @{sample.path}" if sample.json else f"-T {sample.path}"
    return f"curl {auth}{body} {cfg.inference_url}/predictions/{cfg.model}"


def key(state_dir: Path | str, api: str = "inference") -> str:
    """The instance's token for `Authorization: Bearer ...`."""
    found = keys(state_dir).get(api, {}).get("key")
    if not found:
        raise ServerError(f"no {api} key in {Path(state_dir) / 'key_file.json'} (token auth off, or not running)")
    return found


# TorchServe's own Prometheus names: per request, in microseconds.
METRIC_NAMES = {
    "requests": "ts_inference_requests_total",
    "queue": "ts_queue_latency_microseconds",
    "inference": "ts_inference_latency_microseconds",
    "unit": 1e-6,
}


def load_target(state_dir: Path | str):
    """What the load test sends to: this instance's inference port, token and metrics."""
    cfg = load_instance(state_dir)
    token = keys(state_dir).get("inference", {}).get("key")
    return Target(LOOPBACK, cfg.inference_port, cfg.model, token, cfg.metrics_url, metric_names=METRIC_NAMES)


def start_with(o: StartOptions) -> ServerConfig:
    p = PORTS
    cfg = ServerConfig(
        o.model,
        model_store=o.model_store,
        state_dir=o.state_dir,
        inference_port=o.inference_port or p.inference,
        management_port=o.management_port or p.management,
        metrics_port=o.metrics_port or p.metrics,
        grpc_inference_port=o.grpc_port or p.grpc_inference,
        grpc_management_port=o.grpc_management_port or p.grpc_management,
        token_auth=o.token_auth,
        cors_origin=o.cors_origin,
    )
    return start(cfg, o.timeout)
