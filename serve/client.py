"""The load test's client: what it sends to each kind of server, how it reads the answers, how it reads the server's
own metrics. Loopback only.

One asyncio connection per simulated client, on uvloop when it is installed. Exists for speed: a thread per client
(the earlier client, on raw sockets) capped this 2-core machine near 6,500 requests/s against a server that does
nothing, because the client's threads fought over the GIL and took a core from the server being measured; this one
reaches 40,000 there (bench/NOTES.md, lever 37). Every server, ours and the peers, is measured with it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import struct
import urllib.request
from dataclasses import dataclass, field

from torchship.handlers.signature import TEXT_INPUT

# How each protocol carries one image, and where it goes: TorchServe's raw body, the Open Inference Protocol with
# the binary tensor extension, or as base64 in v2 JSON, a raw body to any path, a multipart form file; and one text
# (the body, UTF-8) as v2 JSON's `text` BYTES input, to the v2 route or any path, or as {"text": [it]} to a path.
PROTOCOLS = ("torchserve", "v2", "v2-json", "raw", "multipart", "v2-text", "json-text")
# What a v2 request asks for: every output (JSON for v2-json, binary for v2, as tritonclient asks by default), or the
# label alone as JSON (the lightest answer: a tenth of the bytes to write and parse).
OUTPUTS = ("all", "label")
BOUNDARY = "torchshipload"


@dataclass
class Target:
    host: str
    port: int
    model: str
    key: str | None = None
    metrics_url: str | None = None
    protocol: str = "torchserve"
    path: str | None = None  # the route, where the protocol does not fix it (raw, multipart)
    metric_names: dict = field(default_factory=dict)  # requests / queue / inference counters, and their unit in s
    bytes_shape: tuple[int, ...] = (1,)  # a v2 BYTES input's shape for one image ([1, 1] where batching needs a dim)
    outputs: str = "all"  # v2: OUTPUTS

    def __post_init__(self):
        host = "127.0.0.1" if self.host == "localhost" else self.host
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"load tests only target this machine (127.0.0.0/8 or ::1), not {self.host}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.outputs not in OUTPUTS:
            raise ValueError(f"outputs {self.outputs!r} is not one of {', '.join(OUTPUTS)}")

    def request(self, body: bytes, content_type: str) -> bytes:
        """The whole HTTP request for one image."""
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        if self.protocol == "torchserve":
            path, extra = f"/predictions/{self.model}", f"Content-Type: {content_type}\r\n"
        elif self.protocol in ("v2", "v2-json"):
            path = f"/v2/models/{self.model}/infer"
            binary = self.protocol == "v2"
            asks = (
                {"outputs": [{"name": "label", "parameters": {"binary_data": False}}]}
                if self.outputs == "label"
                else {"parameters": {"binary_data_output": True}}
                if binary
                else {}
            )
            image = {"name": "images", "shape": list(self.bytes_shape), "datatype": "BYTES"}
            if binary:
                header = json.dumps(
                    {"inputs": [{**image, "parameters": {"binary_data_size": len(body) + 4}}], **asks}
                ).encode()
                extra = f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
                body = header + struct.pack("<I", len(body)) + body
            else:
                body = json.dumps({"inputs": [{**image, "data": [base64.b64encode(body).decode()]}], **asks}).encode()
                extra = "Content-Type: application/json\r\n"
        elif self.protocol == "v2-text":
            path, extra = self.path or f"/v2/models/{self.model}/infer", "Content-Type: application/json\r\n"
            text = {"name": TEXT_INPUT, "shape": list(self.bytes_shape), "datatype": "BYTES", "data": [body.decode()]}
            body = json.dumps({"inputs": [text]}).encode()
        elif self.protocol == "json-text":
            path, extra = self.path or "/predict", "Content-Type: application/json\r\n"
            body = json.dumps({"text": [body.decode()]}).encode()
        elif self.protocol == "raw":
            path, extra = self.path or "/predict", f"Content-Type: {content_type}\r\n"
        else:
            path, extra = self.path or "/predict", f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            body = (
                (
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="digit.png"\r\n'
                    f"Content-Type: {content_type}\r\n\r\n"
                ).encode()
                + body
                + f"\r\n--{BOUNDARY}--\r\n".encode()
            )
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}{extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects once after an error (status 0 when that fails too). FRESH: a
    new connection for every request and no second try, as a client that does not keep connections sees a server."""

    def __init__(self, target: Target, timeout: float = 30, *, fresh: bool = False):
        self.target, self.timeout, self.fresh = target, timeout, fresh
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _read(self) -> tuple[int, bytes, bool]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
        keep = fields.get(b"connection", b"").lower() != b"close"
        if b"content-length" in fields:
            return status, await self.reader.readexactly(int(fields[b"content-length"])), keep
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readuntil(b"\r\n")
            await self.reader.readuntil(b"\r\n")  # the empty trailer
            return status, b"".join(parts), keep
        return status, await self.reader.read(), False  # the body runs to the close

    async def send(self, request: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(
                        self.target.host, self.target.port, limit=1 << 20
                    )
                self.writer.write(request)
                status, reply, keep = await asyncio.wait_for(self._read(), self.timeout)
                if not keep or self.fresh:
                    await self.close()
                return status, reply
            except (
                OSError,
                ValueError,
                IndexError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                TimeoutError,
            ):
                await self.close()
                if attempt or self.fresh:
                    return 0, b""
        return 0, b""


def answer(reply: bytes) -> str | None:
    """The predicted label of a reply: ours and the peers' {"label": ...}; TorchServe's stock MNIST handler sends a
    bare int; the Open Inference Protocol sends an output named label."""
    try:
        body, end = json.JSONDecoder().raw_decode(reply.decode("latin-1"))  # binary outputs may follow the JSON
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(body, dict) and isinstance(body.get("outputs"), list):
        at = end
        for o in body["outputs"]:
            size = (o.get("parameters") or {}).get("binary_data_size")
            if o.get("name") == "label":
                if size is not None:  # the binary extension's BYTES: a 4-byte length, then the element
                    (n,) = struct.unpack_from("<I", reply, at)
                    return reply[at + 4 : at + 4 + n].decode()
                return str(o["data"][0]) if isinstance(o.get("data"), list) and o["data"] else None
            at += size or 0
        return None
    if isinstance(body, dict):
        return str(body.get("label"))
    if isinstance(body, list) and body and isinstance(body[0], dict):  # a batching framework's one-item list
        return str(body[0].get("label"))
    return str(body) if isinstance(body, (int, str)) else None


def server_metrics(url: str | None) -> dict[str, float]:
    """The server's Prometheus counters (summed over label sets), or {} when its metrics are unreachable."""
    out: dict[str, float] = {}
    for (name, _), value in metric_series(url).items():
        out[name] = out.get(name, 0.0) + value
    return out


def metric_series(url: str | None) -> dict[tuple[str, dict], float]:
    """Every Prometheus series at URL/metrics, by (name, labels); {} when unreachable."""
    if not url:
        return {}
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=3) as r:
            return parse_metrics(r.read().decode())
    except (OSError, ValueError):
        return {}


def parse_metrics(text: str) -> dict[tuple[str, dict], float]:
    """Prometheus' text format, by (name, labels)."""
    out = {}
    for m in re.finditer(r"^([a-zA-Z_:]+)(?:\{([^}]*)\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[m.group(1), _Labels(labels)] = float(m.group(3))
    return out


class _Labels(dict):
    """A dict of labels that can key another dict."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def server_delta(target: Target, before: dict, after: dict) -> dict:
    """Mean queue and inference time per request as the server itself measured them."""
    names = target.metric_names
    if not names:
        return {}
    n = after.get(names["requests"], 0) - before.get(names["requests"], 0)
    if n <= 0:
        return {}
    per = {}
    for key, out in (("queue", "queue_ms"), ("inference", "inference_ms")):
        if names[key] in after:
            per[out] = (after[names[key]] - before.get(names[key], 0)) * names["unit"] * 1000 / n
    if "rows" in names and names["rows"] in after:  # mean rows per forward pass
        passes = after[names["passes"]] - before.get(names["passes"], 0)
        per["rows_per_pass"] = (after[names["rows"]] - before.get(names["rows"], 0)) / passes if passes else None
    return {"requests": n, **per}
