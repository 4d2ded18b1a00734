"""The KServe runtime's lifecycle: the same start / wait-ready / status / stop shape as TorchServe's."""

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

import psutil

from torchship.runtime.card import CARD_FILE, FORMAT_BY_BACKEND
from torchship.serve.process import LOOPBACK, ServerError, free_ports, http_json, log_marks, new_lines

MODULE = "torchship.runtime.kserve_model"
LOG = "kserve.log"


@dataclass(frozen=True)
class KServeConfig:
    export_dir: str
    model: str
    _: KW_ONLY
    state_dir: str = "serve-state"
    http_port: int = 8080
    grpc_port: int = 8081
    host: str = LOOPBACK
    backend: str = "onnx"
    threads: int = 1
    max_pixels: int = 0
    runtime: str = "kserve"

    @classmethod
    def on_free_ports(cls, export_dir: str, model: str, state_dir: str, **kw) -> KServeConfig:
        http_port, grpc_port = free_ports(2)
        return cls(export_dir, model, state_dir=state_dir, **{"http_port": http_port, "grpc_port": grpc_port, **kw})

    @property
    def inference_url(self) -> str:
        return f"http://{LOOPBACK if self.host in ('0.0.0.0', '::') else self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK if self.host in ('0.0.0.0', '::') else self.host}:{self.grpc_port}"


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def command(cfg: KServeConfig) -> list[str]:
    return [sys.executable, "-m", MODULE, "--model_dir", cfg.export_dir, "--model_name", cfg.model,
            "--http_port", str(cfg.http_port), "--grpc_port", str(cfg.grpc_port), "--host", cfg.host,
            "--backend", cfg.backend, "--threads", str(cfg.threads), "--max_pixels", str(cfg.max_pixels),
            "--configure_logging", "true"]  # fmt: skip


def pid(state_dir: Path | str) -> int | None:
    """The recorded runtime process, if it still runs and is still ours (a pid can be reused)."""
    f = Path(state_dir) / "kserve.pid"
    try:
        p = int(f.read_text().split()[0])
        proc = psutil.Process(p)
        return p if MODULE in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def ready(cfg: KServeConfig) -> bool:
    try:
        return http_json(f"{cfg.inference_url}/v2/models/{cfg.model}/ready", timeout=2).get("ready") is True
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return False


def log_excerpt(state: Path, marks: dict, lines: int = 20) -> str:
    picked = [line for line in new_lines(state, LOG, marks) if "Error" in line or "error" in line or "Traceback"
              in line or "address already in use" in line.lower()]  # fmt: skip
    tail = new_lines(state, LOG, marks)[-5:]
    return "\n".join(dict.fromkeys(picked[-lines:] + tail)) or f"(nothing in {state / 'logs' / LOG})"


def start(cfg: KServeConfig, timeout: float = 120, *, behind_auth: bool = False) -> KServeConfig:
    state = Path(cfg.state_dir).resolve()
    export = Path(cfg.export_dir).resolve()
    cfg = KServeConfig(**{**asdict(cfg), "state_dir": str(state), "export_dir": str(export)})
    if not loopback(cfg.host) and not behind_auth:
        raise ServerError(
            f"refusing to listen on {cfg.host}: the Open Inference Protocol has no authentication; "
            "put an authenticating proxy in front and pass --behind-auth (README: Serve with KServe)"
        )
    if pid(state) is not None:
        raise ServerError(f"a KServe runtime started from {state} is already running: `torchship serve stop` first")
    for f in (CARD_FILE, FORMAT_BY_BACKEND[cfg.backend].file):
        if not (export / f).is_file():
            raise ServerError(f"{export / f} not found: run `torchship export` first")
    (state / "logs").mkdir(parents=True, exist_ok=True)
    marks = log_marks(state, (LOG,))
    with open(state / "logs" / LOG, "ab") as log:
        proc = subprocess.Popen(command(cfg), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    (state / "kserve.pid").write_text(str(proc.pid))
    (state / "instance.json").write_text(json.dumps(asdict(cfg), indent=2))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop(state)
            raise ServerError(f"the KServe runtime exited during start-up (code {proc.returncode}):\n"
                              f"{log_excerpt(state, marks)}")  # fmt: skip
        if ready(cfg):
            return cfg
        time.sleep(0.3)
    stop(state)
    raise ServerError(f"{cfg.model} was not ready after {timeout:.0f}s:\n{log_excerpt(state, marks)}")


def stop(state_dir: Path | str = "serve-state", timeout: float = 20) -> bool:
    """SIGTERM to the runtime's own process group (its gRPC and uvicorn parts), SIGKILL if it lingers."""
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


def status(state_dir: Path | str = "serve-state") -> dict:
    state = Path(state_dir)
    p = pid(state)
    if p is None:
        return {"running": False, "runtime": "kserve", "state_dir": str(state)}
    cfg = KServeConfig(**json.loads((state / "instance.json").read_text()))
    return {"running": True, "runtime": "kserve", "pid": p, "model": cfg.model, "ready": ready(cfg),
            "inference": cfg.inference_url, "grpc": cfg.grpc_address}  # fmt: skip


def load_instance(state_dir: Path | str) -> KServeConfig:
    f = Path(state_dir) / "instance.json"
    if not f.is_file():
        raise ServerError(f"no instance recorded in {state_dir}")
    return KServeConfig(**json.loads(f.read_text()))


def load_target(state_dir: Path | str):
    """What the load test sends to: the v2 infer route, one BYTES image per request."""
    from torchship.serve.loadtest import Target

    cfg = load_instance(state_dir)
    return Target(LOOPBACK, cfg.http_port, cfg.model, protocol="v2")


def curl_example(cfg: KServeConfig, sample: Path) -> str:
    body = '{"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["\'"$(base64 -w0 ' + str(
        sample) + ')"\'"]}]}'  # fmt: skip
    return f"curl -H 'Content-Type: application/json' -d '{body}' {cfg.inference_url}/v2/models/{cfg.model}/infer"
