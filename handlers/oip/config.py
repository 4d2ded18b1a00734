"""The OIP server's configuration: one frozen, checked object, built once from the command line (or a JSON file that
`torchship serve start` writes), completed once by the supervisor from a measured pass, and handed whole to every
worker, whose batcher reads it as is. Each setting has one name everywhere: here, on the command line
(`--max_batch_delay_ms`), in the status file and in the startup log."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..formats import FORMAT_BY_BACKEND
from ..limits import MAX_REQUEST_BYTES
from ..model.mapped import FOLDER

HTTP_PORT, GRPC_PORT = 8080, 8081  # KServe's ports for a custom predictor container: REST, then gRPC
LOOPBACK = "127.0.0.1"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class ConfigError(ValueError):
    """A setting that cannot work; the message names it."""


@dataclass(frozen=True)
class Limits:
    """What one client may cost a worker: nginx's defaults where nginx has one (shared/anchors.md), stated once."""

    max_body: int = MAX_REQUEST_BYTES  # bytes of one request body (client_max_body_size): 413 beyond
    head_bytes: int = 16 * 1024  # request line + header lines together: 414 (the line alone) or 431 beyond
    header_lines: int = 100  # header lines of one request, repeats counted: 431 beyond
    header_timeout_s: float = 60  # from a request's first byte to its last header (client_header_timeout): 408
    body_timeout_s: float = 60  # between two reads of a body, not over the whole body (client_body_timeout): 408
    idle_timeout_s: float = 75  # a keep-alive connection with nothing to do (keepalive_timeout): closed
    send_timeout_s: float = 60  # answers waiting for a client that reads none of them (send_timeout): dropped
    unsent_bytes: int = 1 << 20  # answers waiting for the client beyond which no more requests are read
    pipelined: int = 32  # requests read and waiting behind the one being answered beyond which reading stops
    connections: int = 1024  # open connections per worker process: beyond, 503 and close

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{f.name} must be a positive number, got {value!r}")


TRACE_STAGES = ("events", "spans")  # how a traced request's stages are told (tracing.py)


@dataclass(frozen=True)
class Config:
    """Everything the server is told. A number left at 0 (the delay at -1) is decided by the supervisor: the workers
    from the cores, the batch, delay and threads from one measured pass of the first model (sizing.py)."""

    model_dirs: tuple[str, ...]  # exports, or folders of exports (NAME/VERSION/), that the repository calls load from
    model_name: str | None = None  # the one model of the first folder served under this name
    host: str = LOOPBACK
    http_port: int = HTTP_PORT
    grpc_port: int = GRPC_PORT
    backend: str = "onnx"
    workers: int = 0
    max_batch: int = 0  # rows in one forward pass
    max_batch_delay_ms: float = -1  # how long a pass waits for company already on its way
    # models whose requests pad to a length (text): a pass's longest row times its rows at most this; 0: rows alone
    max_batch_tokens: int = 16384
    threads: int = 0  # intra-op threads per worker
    pass_slots: int = 0  # forward passes at once over all workers (slots.py)  [0: sizing.pass_slots; workers: no limit]
    # a pass's threads while another runs (slots.py): fewer than THREADS, a lone pass takes THREADS and passes under
    # load this many each, from a second session of the model  [0: sizing's for a measured heavy model, else THREADS]
    busy_threads: int = 0
    max_queue: int = 0  # queued requests per worker before 503  [0: sizing.queue_size()]
    max_pixels: int = 0  # the largest decoded image  [0: the card's]
    limits: Limits = field(default_factory=Limits)
    admin_token_file: str | None = None  # the repository calls' token: read here, or written here if absent
    status_file: str | None = None  # where the supervisor keeps its account of the workers, as JSON
    log_level: str = "INFO"
    access_log: bool = False  # a line per inference request (~10 us a request)
    loopback_admin: bool = False  # the repository calls need no token from a client on this machine (Triton's tools)
    allow_client_shm: bool = False  # clients on this machine may register shared memory regions (Triton's option)
    # an image classifier as Triton's image examples and perf_analyzer's shared memory want it: the FP32 NCHW input
    # alone (FORMAT_NCHW) and the probabilities alone (its classification names the labels); else both inputs (the
    # files or the FP32 tensor, one per request) and the label output too
    triton_images: bool = False
    # a traced request's stages (tracing.py): events of its one span (decoded, forward, forwarded), or a child span
    # each, which its trace viewer draws as bars but costs about twice as much to build and export (lever 63)
    trace_stages: str = "events"
    # each session loads its own copy of a large ONNX model's weights (ONNX Runtime's way) instead of mapping one
    # optimized copy kept in the server's work folder (model/mapped.py, lever 79): for a work folder with no room
    copy_weights: bool = False
    # kept across restarts (a volume): a large ONNX model's optimized copy and every model's measured cost, each keyed
    # by the model file and this machine, so a restart neither optimizes nor measures again (lever 82); "": neither kept
    cache_dir: str = ""

    def __post_init__(self):
        object.__setattr__(self, "model_dirs", tuple(str(d) for d in self.model_dirs))
        if isinstance(self.limits, dict):
            object.__setattr__(self, "limits", Limits(**self.limits))
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        if not self.model_dirs:
            raise ConfigError("model_dirs: give at least one export or folder of exports")
        if self.backend not in FORMAT_BY_BACKEND:
            raise ConfigError(f"backend {self.backend!r} is not one of {', '.join(FORMAT_BY_BACKEND)}")
        for name in ("http_port", "grpc_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be a port number (1-65535), got {getattr(self, name)}")
        if self.http_port == self.grpc_port:
            raise ConfigError(f"http_port and grpc_port are both {self.http_port}: REST and gRPC need one each")
        for name in (
            "workers",
            "max_batch",
            "threads",
            "pass_slots",
            "busy_threads",
            "max_queue",
            "max_pixels",
            "max_batch_tokens",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (decided at start) or more, got {getattr(self, name)}")
        if self.max_batch_delay_ms < 0 and self.max_batch_delay_ms != -1:
            raise ConfigError(f"max_batch_delay_ms must be -1 (measured) or 0 or more, got {self.max_batch_delay_ms}")
        if self.busy_threads and self.threads and self.busy_threads > self.threads:
            raise ConfigError(f"busy_threads ({self.busy_threads}) is at most threads ({self.threads})")
        if 0 < self.busy_threads < self.threads and not FORMAT_BY_BACKEND[self.backend].onnxruntime:
            raise ConfigError("busy_threads below threads needs an ONNX Runtime backend (torch: by process)")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.trace_stages not in TRACE_STAGES:
            raise ConfigError(f"trace_stages {self.trace_stages!r} is not one of {', '.join(TRACE_STAGES)}")

    @property
    def decided(self) -> bool:
        """Nothing is left for the supervisor to measure."""
        return self.max_batch > 0 and self.max_batch_delay_ms >= 0 and self.threads > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_dirs"] = list(self.model_dirs)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_json(cls, text: str) -> Config:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"not a JSON configuration ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError("a configuration is a JSON object")
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: Path | str) -> Config:
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None

    def save(self, path: Path | str) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)

    @property
    def adapts(self) -> bool:
        """A lone pass on THREADS, passes under load on BUSY_THREADS each (slots.py)."""
        return 0 < self.busy_threads < self.threads

    def turns(self) -> str:
        if self.adapts:
            return f" alone, {self.busy_threads} each while passes run at once ({self.pass_slots} at most)"
        if 0 < self.pass_slots < self.workers:
            return f", {self.pass_slots} forward pass(es) at a time over all workers"
        return ""

    def summary(self) -> str:
        """The settings every worker runs with, in one line (the startup log's)."""
        return (
            f"{self.workers} workers, batches of up to {self.max_batch} rows (max_batch_delay_ms "
            f"{self.max_batch_delay_ms:g}), {self.threads} thread(s) each{self.turns()}, {self.max_queue} requests "
            f"queued per worker at most, backend {self.backend}"
        )


MAPPED = FOLDER  # in the cache, or beside the supervisor's saved state: where optimized models are kept


def mapped_dir(config: Config, state_file: str | None) -> Path | None:
    if config.copy_weights:
        return None
    if config.cache_dir:
        return Path(config.cache_dir) / MAPPED
    return Path(state_file).with_name(MAPPED) if state_file else None


@dataclass(frozen=True)
class Assignment:
    """What the supervisor hands a worker it starts: the completed configuration, the repository state to load, the
    control socket to follow, and the pipe on which to say it is ready."""

    config: Config
    state_file: str
    control: str | None = None
    ready_fd: int = -1
    http_fd: int = -1  # the REST listening socket the supervisor shares with every worker
    grpc_fd: int = -1  # ... and the gRPC one
    index: int = 0  # this worker's place in the connection counts (sockets.Shares); a replacement takes the dead one's

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "config": self.config.to_dict()})

    @property
    def mapped_dir(self) -> Path | None:
        """Beside the saved state: large ONNX models optimized once, which every worker's sessions map."""
        return mapped_dir(self.config, self.state_file)

    @classmethod
    def from_json(cls, text: str) -> Assignment:
        d = json.loads(text)
        return cls(**{**d, "config": Config.from_dict(d["config"])})
