"""Load test of a running TorchServe: closed-loop concurrency sweep or open-loop fixed rate, loopback only.

Sends real held-out digits and checks every answer's label, so a fast wrong server shows as such.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from torchship.serve.samples import held_out_digits, on_paper, png

PROTOCOLS = ("torchserve", "v2")  # TorchServe's /predictions, or the Open Inference Protocol (KServe)


@dataclass
class Target:
    host: str
    port: int
    model: str
    key: str | None = None
    metrics_url: str | None = None
    protocol: str = "torchserve"

    def __post_init__(self):
        host = "127.0.0.1" if self.host == "localhost" else self.host
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"load tests only target this machine (127.0.0.0/8 or ::1), not {self.host}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")

    def request(self, body: bytes, content_type: str) -> bytes:
        """The whole HTTP request for one image: raw to /predictions, or one BYTES element in v2's binary form."""
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        if self.protocol == "torchserve":
            path, extra = f"/predictions/{self.model}", f"Content-Type: {content_type}\r\n"
        else:
            header = json.dumps({
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                            "parameters": {"binary_data_size": len(body) + 4}}],
                "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
            }).encode()  # fmt: skip
            path = f"/v2/models/{self.model}/infer"
            extra = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
            body = header + struct.pack("<I", len(body)) + body
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}{extra}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


@dataclass
class Level:
    mode: str  # "closed" (concurrency) or "open" (rate)
    concurrency: int
    rate: float | None
    requests: int
    errors: dict[str, int]
    seconds: float
    throughput: float
    latency_ms: dict[str, float]
    accuracy: float  # of the labelled answers; NaN when no request carried a label
    server: dict = field(default_factory=dict)
    answers: list[int] = field(default_factory=list)  # per digit of the set: 1 right, 0 wrong, -1 not sent


@dataclass(frozen=True)
class Payload:
    body: bytes
    label: str | None  # None: the answer cannot be judged (an image without a label folder)
    content_type: str = "image/png"


CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                 ".gif": "image/gif", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}  # fmt: skip


def payloads(style: str = "mnist", n: int = 1000) -> list[Payload]:
    """PNG-encoded held-out digits: as MNIST stores them, or photographed-style dark ink on white paper."""
    images, labels = held_out_digits()
    make = (lambda a: png(a)) if style == "mnist" else (lambda a: png(on_paper(a)))
    return [Payload(make(images[i]), str(labels[i])) for i in range(min(n, len(labels)))]


def image_payloads(directory: Path | str, limit: int = 10_000) -> list[Payload]:
    """Your own images: DIR/<label>/*.png gives labelled requests (accuracy counts), DIR/*.png unlabelled ones."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory of images")
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in CONTENT_TYPES:
            label = path.parent.name if path.parent != root else None
            found.append(Payload(path.read_bytes(), label, CONTENT_TYPES[path.suffix.lower()]))
            if len(found) >= limit:
                break
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(CONTENT_TYPES))}) under {root}")
    return found


class Client:
    """One keep-alive HTTP/1.1 connection over a raw socket; reconnects after errors.

    http.client parses every response's headers with the email package: at a thousand requests a second
    that is a visible share of a 2-core machine, taken from the server being measured.
    """

    def __init__(self, target: Target, timeout: float = 30):
        self.target, self.timeout, self.sock, self.buf = target, timeout, None, b""

    def connect(self) -> None:
        self.sock = socket.create_connection((self.target.host, self.target.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def read_until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:i], self.buf[i + len(sep) :]
        return out

    def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> tuple[int, bytes, bool]:
        lines = self.read_until(b"\r\n\r\n").split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        keep = fields.get(b"connection", b"").lower() != b"close"
        if b"content-length" in fields:
            return status, self.read_exactly(int(fields[b"content-length"])), keep
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while size := int(self.read_until(b"\r\n").split(b";")[0], 16):
                parts.append(self.read_exactly(size))
                self.read_until(b"\r\n")
            self.read_until(b"\r\n")  # the empty trailer
            return status, b"".join(parts), keep
        body = self.buf + b"".join(iter(lambda: self.sock.recv(65536), b""))  # body runs to the close
        return status, body, False

    def send(self, body: bytes, content_type: str = "image/png") -> tuple[int, bytes]:
        request = self.target.request(body, content_type)
        for attempt in (0, 1):
            try:
                if self.sock is None:
                    self.connect()
                self.sock.sendall(request)
                status, reply, keep = self.response()
                if not keep:
                    self.close()
                return status, reply
            except (OSError, ValueError, IndexError):
                self.close()
                if attempt:
                    return 0, b""  # connection-level failure, counted as status 0
        return 0, b""


def answer(reply: bytes) -> str | None:
    """The predicted label of a reply: ours is {"label": ...}; TorchServe's stock MNIST handler sends a bare int;
    the Open Inference Protocol sends an output named label."""
    try:
        body = json.loads(reply)
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("outputs"), list):
        label = next((o.get("data") for o in body["outputs"] if isinstance(o, dict) and o.get("name") == "label"), None)
        return str(label[0]) if isinstance(label, list) and label else None
    if isinstance(body, dict):
        return str(body.get("label"))
    return str(body) if isinstance(body, (int, str)) else None


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {k: float("nan") for k in ("p50", "p90", "p99", "p99.9", "max", "mean")}
    a = np.asarray(latencies) * 1000
    q = np.percentile(a, [50, 90, 99, 99.9])
    return {"p50": q[0], "p90": q[1], "p99": q[2], "p99.9": q[3], "max": a.max(), "mean": a.mean()}


def server_metrics(url: str | None) -> dict[str, float]:
    """TorchServe's Prometheus counters (summed over label sets), or {} when the metrics API is unreachable."""
    if not url:
        return {}
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=3) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def server_delta(before: dict, after: dict) -> dict:
    """Mean queue and inference time per request as TorchServe itself measured them."""
    n = after.get("ts_inference_requests_total", 0) - before.get("ts_inference_requests_total", 0)
    if n <= 0:
        return {}
    per = {}
    for key, name in (
        ("ts_queue_latency_microseconds", "queue_ms"),
        ("ts_inference_latency_microseconds", "inference_ms"),
    ):
        if key in after:
            per[name] = (after[key] - before.get(key, 0)) / n / 1000
    return {"requests": n, **per}


def run_level(
    target: Target,
    bodies,
    concurrency: int,
    duration: float,
    max_requests: int,
    rate: float | None = None,
    samples: list[float] | None = None,
    timeline: list[tuple[float, float, int]] | None = None,
) -> Level:
    """Closed loop: `concurrency` clients back to back. Open loop (rate): sends on a fixed schedule and times
    each request from its intended send time, so a stalled server cannot hide its queue (no coordinated omission)."""
    lock = threading.Lock()
    latencies, statuses, correct, judged = [], Counter(), [0], [0]
    answers = [-1] * len(bodies)
    counter = iter(range(max_requests))
    t0 = time.perf_counter() + 0.05
    deadline = t0 + duration

    def worker():
        client = Client(target)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            intended = t0 + i / rate if rate else None
            if intended is not None:
                delay = intended - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            start = time.perf_counter()
            if start > deadline:
                return
            p = bodies[i % len(bodies)]
            status, reply = client.send(p.body, p.content_type)
            end = time.perf_counter()
            ok = status == 200 and p.label is not None and answer(reply) == p.label
            with lock:
                if timeline is not None:
                    timeline.append((start, end, status))
                latencies.append(end - (intended if intended is not None else start))
                statuses[status] += 1
                correct[0] += ok
                judged[0] += status == 200 and p.label is not None
                answers[i % len(bodies)] = int(ok) if p.label is not None else -1

    before = server_metrics(target.metrics_url)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 60)
    seconds = max(time.perf_counter() - t0, 1e-9)
    if samples is not None:  # raw latencies (s), for callers that pool several runs
        samples.extend(latencies)
    n = sum(statuses.values())
    errors = {str(k): v for k, v in sorted(statuses.items()) if k != 200}
    return Level(
        "open" if rate else "closed",
        concurrency,
        rate,
        n,
        errors,
        seconds,
        n / seconds,
        percentiles(latencies),
        correct[0] / judged[0] if judged[0] else float("nan"),
        server_delta(before, server_metrics(target.metrics_url)),
        answers,
    )


def sweep(
    target: Target,
    concurrency=(1, 4, 16),
    duration: float = 10,
    max_requests: int = 20000,
    rate: float | None = None,
    style: str = "mnist",
    warmup: int = 50,
    bodies: list[Payload] | None = None,
) -> list[Level]:
    bodies = bodies or payloads(style)
    if warmup:  # warm the workers and the JVM's JIT: first calls pay for lazy init and interpretation
        run_level(target, bodies, min(4, max(concurrency)), 30, warmup)
    if rate:
        return [run_level(target, bodies, max(concurrency), duration, max_requests, rate)]
    return [run_level(target, bodies, c, duration, max_requests) for c in concurrency]


@dataclass
class Disruption:
    """What killing one worker under load cost: which requests failed, and how long until answers came back."""

    killed_pid: int
    requests: int
    failed: dict[str, int]  # status -> count, over the whole run
    failed_sent_after_kill: int  # requests that failed although sent after the kill (ideally none)
    in_flight_at_kill: int  # requests sent before and answered after the kill
    failed_in_flight: int  # of those, the ones that failed: what the dead worker held
    recovery_s: float  # from the kill to the first success of a request sent after it
    longest_gap_s: float  # the longest time around the kill in which no request succeeded
    p99_ms: float


def kill_worker_under_load(
    target: Target,
    worker_pid: int,
    bodies: list[Payload],
    concurrency: int = 64,
    max_requests: int = 4000,
    duration: float = 60,
    kill_at: float = 0.3,
) -> tuple[Level, Disruption]:
    """SIGKILL one worker once `kill_at` of the requests are answered, and measure the outage from the clients."""
    import os
    import signal

    timeline: list[tuple[float, float, int]] = []
    result: list[Level] = []
    runner = threading.Thread(target=lambda: result.append(
        run_level(target, bodies, concurrency, duration, max_requests, timeline=timeline)), daemon=True)  # fmt: skip
    runner.start()
    while len(timeline) < kill_at * max_requests and runner.is_alive():
        time.sleep(0.005)
    t_kill = time.perf_counter()
    os.kill(worker_pid, signal.SIGKILL)
    runner.join(duration + 60)
    level = result[0]
    events = sorted(timeline, key=lambda e: e[1])
    after = [end for start, end, status in events if status == 200 and start >= t_kill]
    ok_ends = [t_kill] + [end for _, end, status in events if status == 200 and end >= t_kill] + [events[-1][1]]
    failed = Counter(str(status) for _, _, status in events if status != 200)
    return level, Disruption(
        killed_pid=worker_pid,
        requests=len(events),
        failed=dict(failed),
        failed_sent_after_kill=sum(1 for start, _, status in events if status != 200 and start >= t_kill),
        in_flight_at_kill=sum(1 for start, end, _ in events if start < t_kill <= end),
        failed_in_flight=sum(1 for start, end, status in events if status != 200 and start < t_kill <= end),
        recovery_s=(min(after) - t_kill) if after else float("inf"),
        longest_gap_s=max(b - a for a, b in zip(ok_ends, ok_ends[1:])) if len(ok_ends) > 1 else 0.0,
        p99_ms=level.latency_ms["p99"],
    )


def table(levels: list[Level]) -> str:
    head = (
        f"{'load':>10} {'requests':>8} {'errors':>8} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'p99.9':>7} {'max ms':>7} {'accuracy':>8} {'queue ms':>8}"
    )
    rows = [head, "-" * len(head)]
    for lv in levels:
        load = f"{lv.rate:g}/s" if lv.rate else f"c={lv.concurrency}"
        err = sum(lv.errors.values())
        lat = lv.latency_ms
        queue = lv.server.get("queue_ms")
        rows.append(
            f"{load:>10} {lv.requests:>8} {err:>8} {lv.throughput:>8.1f} {lat['p50']:>7.2f} {lat['p90']:>7.2f} "
            f"{lat['p99']:>7.2f} {lat['p99.9']:>7.2f} {lat['max']:>7.2f} {lv.accuracy:>8.4f} "
            f"{queue if queue is None else round(queue, 3)!s:>8}"
        )
    return "\n".join(rows)


def plot(levels: list[Level], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [lv.throughput for lv in levels]
    for p in ("p50", "p90", "p99", "p99.9"):
        ax.plot(x, [lv.latency_ms[p] for lv in levels], "o-", label=p)
    for lv in levels:
        ax.annotate(
            f"{lv.rate:g}/s" if lv.rate else f"c={lv.concurrency}",
            (lv.throughput, lv.latency_ms["p50"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax.set(xlabel="throughput (requests/s)", ylabel="latency (ms)", yscale="log", title=title or "latency vs load")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(levels: list[Level], out_dir: Path | str, target: Target, title: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"target": {"host": target.host, "port": target.port, "model": target.model},
              "levels": [asdict(lv) for lv in levels]}  # fmt: skip
    (out / "loadtest.json").write_text(json.dumps(report, indent=2))
    plot(levels, out / "loadtest.png", title)
    return out / "loadtest.json"
