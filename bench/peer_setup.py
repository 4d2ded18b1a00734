"""The servers people pick instead of ours, set up as their own docs advise, each in a virtual environment of its own
(bench/peers/NAME/requirements.txt, created on first use; their pins conflict with ours), serving the same model.onnx
with the same preprocessing (torchship's runtime folder, copied beside each server file), on free loopback ports.

start() waits until a peer answers, stop() ends exactly what start() began (its process group).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torchship.serve.client import Target
from torchship.serve.process import free_ports
from torchship.serve.shipping import copy_runtime

PEERS_DIR = Path(__file__).with_name("peers")
WORKERS, MAX_BATCH, MAX_DELAY_MS = 2, 8, 1  # what every server gets on this 2-core machine (the settings)


class PeerFailed(Exception):
    """A peer that could not be installed or started; the bench reports it as a row that says why."""


@dataclass(frozen=True)
class Peer:
    name: str
    package: str  # whose version the table shows
    protocol: str  # what the load test sends it (serve/client.py): the richest form it takes natively
    answers: str  # what its answer holds (v2 peers are asked for every output)
    path: str | None
    settings: str
    files: tuple[str, ...]  # from bench/peers/NAME/, copied into its work directory
    argv: Callable[[Path, dict, Path], list[str]]  # (venv python, ports, model) -> the command
    ready_path: str
    configure: Callable[[Path, dict, Path], None] = lambda work, ports, model: None
    env: dict = field(default_factory=dict)
    bytes_shape: tuple[int, ...] = (1,)  # a v2 BYTES input's shape for one image
    retries: int = 1  # starts to try (PyTriton's start with two instances is racy)
    text: tuple[str, str | None] = ("v2-text", None)  # a text model's protocol and route (None: the peer's path)


def _mlserver_configure(work: Path, ports: dict, model: Path) -> None:
    (work / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": ports["http"],
                "grpc_port": ports["grpc"],
                "metrics_port": ports["metrics"],
                "parallel_workers": WORKERS,
                "debug": False,
            }
        )
    )
    (work / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "mnist",
                "implementation": "runtime.Digits",
                "max_batch_size": MAX_BATCH,
                "max_batch_time": MAX_DELAY_MS / 1000,
                "parameters": {"uri": str(model)},
            }
        )
    )


def _python_libdir() -> str:
    """PyTriton's Python-backend stub loads libpython by soname: with a non-system Python it needs this on the path."""
    return sysconfig.get_config_var("LIBDIR") or ""


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer(
            "litserve",
            "litserve",
            "multipart",
            "label + top-3 probabilities, JSON",
            "/predict",
            f"LitAPI batch {MAX_BATCH}, batch_timeout {MAX_DELAY_MS} ms, workers_per_device {WORKERS}, 1 API server",
            ("server.py",),
            lambda py, ports, model: [
                str(py),
                "server.py",
                "--model",
                str(model),
                "--port",
                str(ports["http"]),
                "--workers",
                str(WORKERS),
                "--max_batch",
                str(MAX_BATCH),
                "--max_batch_delay_ms",
                str(MAX_DELAY_MS),
            ],
            "/health",
        ),
        Peer(
            "bentoml",
            "bentoml",
            "multipart",
            "label + top-3 probabilities, JSON",
            "/classify",
            f"workers {WORKERS}, batchable max_batch_size {MAX_BATCH} (adaptive: no wait knob)",
            ("service.py",),
            lambda py, ports, model: [
                str(py),
                "-m",
                "bentoml",
                "serve",
                "service:Digits",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["http"]),
            ],
            "/readyz",
            text=("json-text", "/classify_text"),
            env={
                "TORCHSHIP_PEER_WORKERS": str(WORKERS),
                "TORCHSHIP_PEER_MAX_BATCH": str(MAX_BATCH),
                "BENTOML_DO_NOT_TRACK": "true",
            },
        ),
        Peer(
            "mlserver",
            "mlserver",
            "v2-json",
            "label + 10 probabilities, JSON",
            None,
            f"parallel_workers {WORKERS}, max_batch_size {MAX_BATCH}, max_batch_time {MAX_DELAY_MS} ms",
            ("runtime.py",),
            lambda py, ports, model: [str(py), "-m", "mlserver.cli.main", "start", "."],
            "/v2/models/mnist/ready",
            configure=_mlserver_configure,
        ),
        Peer(
            "pytriton",
            "nvidia-pytriton",
            "v2",
            "label + 10 probabilities, binary",
            None,
            f"{WORKERS} instances, max_batch_size {MAX_BATCH}, max_queue_delay {MAX_DELAY_MS * 1000} us (Triton 2.51)",
            ("server.py",),
            lambda py, ports, model: [
                str(py),
                "server.py",
                "--model",
                str(model),
                "--port",
                str(ports["http"]),
                "--grpc_port",
                str(ports["grpc"]),
                "--metrics_port",
                str(ports["metrics"]),
                "--workers",
                str(WORKERS),
                "--max_batch",
                str(MAX_BATCH),
                "--max_batch_delay_ms",
                str(MAX_DELAY_MS),
            ],
            "/v2/models/mnist/ready",
            env={"LD_LIBRARY_PATH": _python_libdir()},
            bytes_shape=(1, 1),
            retries=3,
        ),
    )
}


def venv(name: str, python: str = "python3", log=print) -> Path:
    """bench/peers/NAME/.venv with the pinned requirements; made again only when they change."""
    folder = PEERS_DIR / name
    requirements = folder / "requirements.txt"
    env_dir, stamp = folder / ".venv", folder / ".venv" / ".requirements-sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    py = env_dir / "bin" / "python"
    if py.exists() and stamp.is_file() and stamp.read_text() == digest:
        return py
    log(f"setting up {name} in {env_dir} (first use: a few minutes of downloads) ...")
    shutil.rmtree(env_dir, ignore_errors=True)
    steps = [
        [python, "-m", "venv", str(env_dir)],
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
    ]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = [line for line in (r.stderr or r.stdout).splitlines() if not line.startswith("WARNING")][-3:]
            raise PeerFailed(f"installing {name} failed: {' | '.join(tail)[:400]}")
    stamp.write_text(digest)
    return py


def version(py: Path, package: str) -> str:
    r = subprocess.run(
        [str(py), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or "?"


@dataclass
class Running:
    peer: Peer
    proc: subprocess.Popen
    target: Target
    version: str
    log: Path
    ports: dict = field(default_factory=dict)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(peer: Peer, model: Path, work: Path, timeout: float = 180, log=print) -> Running:
    py = venv(peer.name, log=log)
    model, folder = Path(model).resolve(), work / peer.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    copy_runtime(folder)
    for f in peer.files:
        shutil.copy(PEERS_DIR / peer.name / f, folder / f)
    env = {**os.environ, "PYTHONPATH": str(folder), "TORCHSHIP_PEER_MODEL": str(model), **peer.env}
    env.pop("VIRTUAL_ENV", None)
    last = ""
    for _ in range(peer.retries):
        ports = dict(zip(("http", "grpc", "metrics"), free_ports(3)))
        peer.configure(folder, ports, model)
        logfile = folder / "server.log"
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                peer.argv(py, ports, model),
                cwd=folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{ports['http']}{peer.ready_path}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not _ready(url):
            time.sleep(0.5)
        if proc.poll() is None and _ready(url):
            target = Target(
                "127.0.0.1",
                ports["http"],
                "mnist",
                protocol=peer.protocol,
                path=peer.path,
                bytes_shape=peer.bytes_shape,
            )
            return Running(peer, proc, target, version(py, peer.package), logfile, ports)
        last = " | ".join(logfile.read_text(errors="replace").splitlines()[-3:])[:400]
        stop_process(proc)
    raise PeerFailed(f"{peer.name} did not become ready: {last}")


def stop_process(proc: subprocess.Popen, grace: float = 20) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def stop(running: Running) -> None:
    """The peer's whole process group: its API servers, workers and (for PyTriton) the Triton server."""
    stop_process(running.proc)
    try:  # anything the group left behind (a re-parented worker) still carries the group id
        os.killpg(running.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":  # set every peer's environment up ahead of a bench run
    for p in PEERS.values():
        try:
            print(p.name, venv(p.name), file=sys.stderr)
        except PeerFailed as e:
            print(e, file=sys.stderr)
