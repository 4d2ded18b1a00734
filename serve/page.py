"""The model page: a static folder a person opens to see a model and try it, and a loopback server for it.

The page runs the ONNX model in the browser (onnxruntime-web, vendored, so nothing is fetched from
elsewhere) with the servers' own recipe (web/images.js mirrors handlers/images.py). Its "ask the server"
switch goes through the page's own origin, which relays to the TorchServe on this machine: TorchServe
0.12 demands the token on the browser's CORS preflight too, which no browser sends, so a page cannot call
it across origins while token auth is on.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import urllib.error
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from torchship.handlers.card import CARD_FILE, CardError, ModelCard
from torchship.handlers.formats import FORMAT_BY_BACKEND
from torchship.handlers.limits import MAX_REQUEST_BYTES
from torchship.handlers.model.responses import DEFAULT_TOPK, top_k
from torchship.handlers.model.vision import png
from torchship.serve import runtimes
from torchship.serve.process import ServerError
from torchship.serve.settings import LOOPBACK

WEB = Path(__file__).with_name("web")
STATIC = ("index.html", "page.css", "images.js", "vision.js", "page.js")
# onnxruntime-web: npm fetches it (package.json pins the version), vendored() copies the three files the page loads
# into web/vendor/, and the wheel carries that folder.
ORT_DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
VENDOR = WEB / "vendor"
MAX_BODY = MAX_REQUEST_BYTES  # the servers' own limit
# Only this origin's files, and WebAssembly compiled from them: a page that works offline and leaks nothing.
CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' data: blob:; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'"
)


class PageError(Exception):
    """A page that cannot be written or served; one line for the user."""


def vendored() -> Path:
    """web/vendor/ with onnxruntime-web's files, copied there from npm's folder the first time; or how to get them."""
    if all((VENDOR / f).is_file() for f in ORT_FILES):
        return VENDOR
    if not all((ORT_DIST / f).is_file() for f in ORT_FILES):
        version = json.loads((WEB / "package.json").read_text())["dependencies"]["onnxruntime-web"]
        raise PageError(
            f"onnxruntime-web is missing from {VENDOR} (the page runs the model with it): run "
            f"`npm install --prefix {WEB} onnxruntime-web@{version}` once"
        )
    VENDOR.mkdir(exist_ok=True)
    for f in ORT_FILES:
        shutil.copy(ORT_DIST / f, VENDOR / f)
    return VENDOR


def figures(card: ModelCard, export_dir: Path) -> dict[str, Path]:
    """Training curves and the load-test plot, where `make train` and `make loadtest` left them."""
    found = {}
    run_dir = Path(card.provenance.source).parent if card.provenance.source else None
    for name, places in (
        ("curves.png", [run_dir and run_dir / "curves.png", export_dir / "curves.png"]),
        ("loadtest.png", [run_dir and run_dir / "loadtest" / "loadtest.png", export_dir / "loadtest.png"]),
    ):
        hit = next((p for p in places if p and p.is_file()), None)
        if hit:
            found[name] = hit
    return found


def write_page(export_dir: Path | str, out: Path | str) -> Path:
    """The page's folder: its own files, onnxruntime-web, the ONNX model, the card, the proof and the figures."""
    export_dir, out = Path(export_dir), Path(out)
    try:
        card = ModelCard.load(export_dir / CARD_FILE)
    except CardError as e:
        raise PageError(f"{export_dir}: {e}") from None
    model = export_dir / FORMAT_BY_BACKEND["onnx"].file
    if not model.is_file():
        raise PageError(f"{model} not found: the page runs the ONNX export (`torchship export --formats ...,onnx`)")
    vendor = vendored()
    (out / "ort").mkdir(parents=True, exist_ok=True)
    for f in STATIC:
        shutil.copy(WEB / f, out / f)
    for f in ORT_FILES:
        shutil.copy(vendor / f, out / "ort" / f)
    shutil.copy(model, out / "model.onnx")
    (out / "card.json").write_text(card.to_json())
    if (export_dir / "equivalence.json").is_file():
        shutil.copy(export_dir / "equivalence.json", out / "equivalence.json")
    found = figures(card, export_dir)
    for name, path in found.items():
        shutil.copy(path, out / name)
    (out / "figures.json").write_text(json.dumps(sorted(found)))
    return out / "index.html"


class PageHandler(SimpleHTTPRequestHandler):
    """The page's files, and POST /relay/predictions to the server of `state_dir` (TorchServe or the OIP server),
    on loopback."""

    state_dir: Path | None = None
    quiet = True

    def end_headers(self):
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status: int, message: str) -> None:
        self.reply(status, json.dumps({"error": message, "status": status}).encode())

    def do_POST(self):
        if self.path.split("?")[0] != "/relay/predictions":
            return self.error(404, f"no such endpoint {self.path[:100]}: the page relays POST /relay/predictions")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.error(413, f"request body of {length} bytes is over the {MAX_BODY}-byte limit")
        body = self.rfile.read(length)
        if self.state_dir is None:
            return self.error(404, "this page was started without --server-state: there is no server to ask")
        try:
            target = runtimes.recorded(self.state_dir).target(self.state_dir)
        except ServerError as e:
            return self.error(404, f"{e}: start one with `make serve`")
        if target.protocol == "v2" and "json" in (self.headers.get("Content-Type") or ""):  # a tensor model's rows
            url = f"http://{LOOPBACK}:{target.port}/v1/models/{target.model}:predict"
            return self.forward(
                urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            )
        if target.protocol == "v2":
            return self.relay_v2(target, body)
        url = f"http://{LOOPBACK}:{target.port}/predictions/{target.model}"
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type", "x-topk")}
        self.forward(urllib.request.Request(url, data=body, headers=headers, method="POST"))

    def forward(self, request: urllib.request.Request, translate=None) -> None:
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                reply = r.read()
                if translate:
                    return self.reply(200, json.dumps(translate(json.loads(reply))).encode())
                return self.reply(r.status, reply, r.headers.get("Content-Type", "application/json"))
        except urllib.error.HTTPError as e:  # the server's own 4xx, passed on as it is
            return self.reply(e.code, e.read(), e.headers.get("Content-Type", "application/json"))
        except OSError as e:
            return self.error(502, f"the server at {request.full_url} did not answer ({e})")

    def relay_v2(self, target, body: bytes) -> None:
        """The Open Inference Protocol server: the image as one v2 BYTES element; its probabilities back as the
        page's {label, probability, topk}, ranked by the card's labels."""
        card = json.loads((Path(self.directory) / "card.json").read_text())
        labels = card["labels"]
        raw = target.request(body, "application/octet-stream").split(b"\r\n\r\n", 1)[1]
        header_length = len(raw) - len(body) - 4
        wanted = json.loads(raw[:header_length])
        names = VISION_OUTPUTS.get(card["task"], ("probabilities",))
        wanted["outputs"] = [{"name": name, "parameters": {"binary_data": False}} for name in names]
        head = json.dumps(wanted).encode()
        k = int(self.headers.get("X-TopK") or DEFAULT_TOPK)

        def page_answer(reply: dict) -> dict | list:
            out = {o["name"]: o for o in reply["outputs"]}
            if card["task"] in VISION_OUTPUTS:
                return vision_answer(card["task"], out, labels)
            return top_k(np.asarray(out["probabilities"]["data"], np.float32), labels, k)

        url = f"http://{LOOPBACK}:{target.port}/v2/models/{target.model}/infer"
        request = urllib.request.Request(
            url,
            data=head + raw[header_length:],
            method="POST",
            headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))},
        )
        self.forward(request, page_answer)


VISION_OUTPUTS = {"detect": ("boxes", "scores", "names", "count"), "segment": ("mask", "counts")}


def vision_answer(task: str, out: dict, labels: list[str]) -> dict | list:
    """The OIP server's v2 answer for one image as TorchServe's JSON, which the page draws (model/vision.py)."""
    if task == "detect":
        n = int(out["count"]["data"][0])
        boxes = np.reshape(out["boxes"]["data"], (-1, 4))[:n]
        return [
            {name: [round(float(v), 2) for v in box], "score": round(float(score), 6)}
            for box, score, name in zip(boxes, out["scores"]["data"][:n], out["names"]["data"][:n])
        ]
    h, w = out["mask"]["shape"][1:]
    mask = np.asarray(out["mask"]["data"], np.uint8).reshape(h, w)
    return {"mask_png_base64": base64.b64encode(png(mask)).decode("ascii"), "size": [h, w]} | {
        "counts": {label: int(c) for label, c in zip(labels, out["counts"]["data"]) if c}
    }


def serve(directory: Path | str, port: int = 0, state_dir: Path | str | None = None) -> ThreadingHTTPServer:
    """A server for the page on 127.0.0.1 (port 0: any free one), running in a background thread."""
    handler = type("Handler", (PageHandler,), {"state_dir": Path(state_dir).resolve() if state_dir else None})
    httpd = ThreadingHTTPServer((LOOPBACK, port), partial(handler, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd
