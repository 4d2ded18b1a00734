"""What every runtime's lifecycle shares: loopback ports, JSON over HTTP, and reading only this start's logs."""

from __future__ import annotations

import json
import socket
import urllib.request
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from torchship.serve.settings import LOOPBACK


class ServerError(Exception):
    """A server did not start, or did not stop; the message carries the log lines that say why."""


@dataclass(frozen=True)
class StartOptions:
    """What `torchship serve start` was asked for; each runtime takes what applies to it (see --help) and leaves the
    rest, and None means the runtime's own default (serve/settings.py)."""

    model: str
    _: KW_ONLY
    state_dir: str = "serve-state"
    timeout: float = 180
    export_dir: str | None = None  # OIP: the export it serves  [default: exports/MODEL]
    more_exports: tuple[str, ...] = ()  # OIP: more exports or folders of exports beside it
    model_store: str = "model_store"  # TorchServe: where MODEL.mar is
    inference_port: int | None = None
    grpc_port: int | None = None  # OIP's gRPC port, TorchServe's gRPC inference port
    management_port: int | None = None  # TorchServe
    metrics_port: int | None = None  # TorchServe
    grpc_management_port: int | None = None  # TorchServe
    token_auth: bool = True  # TorchServe
    cors_origin: str | None = None  # TorchServe
    backend: str = "onnx"  # OIP: which exported file it runs (TorchServe's archive carries its own)
    host: str = LOOPBACK  # OIP
    behind_auth: bool = False  # OIP
    workers: int | None = None  # OIP (TorchServe's come from `torchship archive`)
    max_batch: int | None = None  # OIP
    max_batch_delay_ms: float | None = None  # OIP
    max_batch_tokens: int | None = None  # OIP: text models' padded tokens a pass
    access_log: bool = False  # OIP: a line per inference request
    loopback_admin: bool = False  # OIP: the repository calls need no token from this machine
    allow_client_shm: bool = False  # OIP: clients on this machine may register shared memory regions
    triton_images: bool = False  # OIP: image classifiers as Triton's image examples want them


def free_ports(n: int = 3) -> list[int]:
    """Ports the kernel says are free on the loopback now, for instances that must not clash (tests, benchmarks)."""
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind((LOOPBACK, 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def http_json(url: str, hdrs: dict | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url, headers=hdrs or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def log_marks(state: Path, names: tuple[str, ...]) -> dict[str, int]:
    """How far each log reached before this start: later checks read only what this start wrote."""
    return {name: (state / "logs" / name).stat().st_size if (state / "logs" / name).is_file() else 0 for name in names}


def new_lines(state: Path, name: str, marks: dict[str, int] | None) -> list[str]:
    f = state / "logs" / name
    if not f.is_file():
        return []
    start = (marks or {}).get(name, 0)
    with open(f, "rb") as fh:
        if start <= f.stat().st_size:  # a log rolled over since the mark starts again from 0
            fh.seek(start)
        return fh.read().decode(errors="replace").splitlines()
