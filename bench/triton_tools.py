"""Triton's own load generator, perf_analyzer, against our OIP server and PyTriton (Triton 2.51): what a Triton user
would run to compare. It reads each server's model configuration (`/v2/models/mnist/config`, gRPC `ModelConfig`)
before it sends anything, and sends a real digit with `--input-data` (the image as one BYTES element), over HTTP and
gRPC, at concurrency 1 and 16. One server runs at a time.

Set-up: bench/peers/perf_analyzer/.venv (tritonclient 2.40.0's wheel carries the binary, pinned with the CUDA runtime
it links) and Debian's libb64-0d (`make bench` installs it).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import struct
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench import peer_setup
from torchship.serve import oip
from torchship.serve.samples import held_out_digits, png

CONCURRENCY = (1, 16)
PROTOCOLS = ("http", "grpc")


def installed() -> tuple[Path, dict]:
    """The perf_analyzer binary and the environment it runs in (libcudart.so.12 on the loader's path)."""
    py = peer_setup.venv("perf_analyzer")
    root = py.parent.parent
    binary = root / "bin" / "perf_analyzer"
    cudart = next(root.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    return binary, {**os.environ, "LD_LIBRARY_PATH": f"{cudart}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


SHM = ("--shared-memory", "system")  # perf_analyzer's inputs and outputs in regions of system shared memory


def large_input_export(out: Path) -> Path:
    """A model whose input is large and whose pass is cheap (3x224x224 FP32, 602 KB a request; an average pool and
    one linear layer): where moving the tensor is what a request costs, and shared memory might pay."""
    import torch

    from torchship.export.formats import export_model, stamp
    from torchship.handlers.card import Architecture, ModelCard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10)).eval()
    weights = out.parent / "large.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    card = ModelCard(
        name="large",
        task="classify",
        input_shape=(3, 224, 224),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        labels=tuple(str(i) for i in range(10)),
        preprocess="resize",
        output_kind="logits",
        architecture=Architecture("torch.nn:Sequential", {}),
    )
    return export_model(model, stamp(card, weights), out, ("onnx",)).directory


def large_input_file(export_dir: Path, directory: Path) -> Path:
    """--input-data for the large model's `input` (FP32 [3, 224, 224] a row; perf_analyzer adds the batch)."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    path = directory / "large-input.json"
    path.write_text(
        json.dumps({"data": [{"input": {"b64": base64.b64encode(x.tobytes()).decode(), "shape": [3, 224, 224]}}]})
    )
    return path


def input_files(export_dir: Path, directory: Path) -> dict[str, Path]:
    """A --input-data file for each input our image models take: `images` (a PNG as one BYTES element) and `input`
    (the same digit normalised, FP32 [1, 28, 28]); perf_analyzer sends the optional input it has data for."""
    import numpy as np

    from torchship.handlers.model.onnx_model import load

    digit = png(held_out_digits()[0][0])
    x = load(export_dir / "model.onnx").prepare(digit).astype(np.float32)
    tensors = {"images": (struct.pack("<I", len(digit)) + digit, [1]), "input": (x.tobytes(), list(x.shape))}
    files = {}
    for name, (raw, shape) in tensors.items():
        files[name] = directory / f"{name}.json"
        files[name].write_text(json.dumps({"data": [{name: {"b64": base64.b64encode(raw).decode(), "shape": shape}}]}))
    return files


def measure(
    binary: Path,
    env: dict,
    url: str,
    protocol: str,
    data: Path,
    concurrency: int,
    seconds: float,
    extra: tuple[str, ...] = (),
    model: str = "mnist",
) -> dict:
    """One perf_analyzer run: requests/s and latency percentiles (ms), as it reports them in its CSV. EXTRA: more of
    its flags (--shared-memory system, --streaming)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [
            str(binary),
            "-m",
            model,
            "-u",
            url,
            "-i",
            protocol,
            "--input-data",
            str(data),
            "--concurrency-range",
            str(concurrency),
            "--measurement-interval",
            str(int(seconds * 1000)),
            "--stability-percentage",
            "50",
            "--max-trials",
            "6",
            "-f",
            str(out),
            *extra,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60 + 10 * seconds)
        if r.returncode != 0 or not out.is_file():
            tail = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()][-2:]
            return {"error": " | ".join(tail)[:300]}
        row = next(csv.DictReader(out.open()))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": int(row["p50 latency"]) / 1000,
        "p99_ms": int(row["p99 latency"]) / 1000,
    }


def run(export_dir: Path, work: Path, seconds: float = 5, log=print, peers: bool = True) -> dict:
    """perf_analyzer against each server, HTTP and gRPC, c=1 and c=16, with each input our model takes; our server
    also with shared memory and over gRPC's stream, and on a large input (PEERS: PyTriton too)."""
    binary, env = installed()
    work.mkdir(parents=True, exist_ok=True)
    data = input_files(export_dir, work)
    out: dict = {"perf_analyzer": "tritonclient 2.40.0", "seconds": seconds, "rows": []}
    with ExitStack() as stack:
        state = work / "state-oip"
        stack.callback(oip.stop, state)
        cfg = oip.start(oip.OIPConfig.on_free_ports(str(export_dir), "mnist", str(state)), timeout=120)
        servers = {
            "oip": ({"http": f"127.0.0.1:{cfg.http_port}", "grpc": f"127.0.0.1:{cfg.grpc_port}"}, ("images", "input"))
        }
        for name, (urls, inputs) in servers.items():
            for protocol in PROTOCOLS:
                for given in inputs:
                    for c in CONCURRENCY:
                        log(f"  perf_analyzer -> {name} {protocol} {given} c={c} ...")
                        r = measure(binary, env, urls[protocol], protocol, data[given], c, seconds)
                        out["rows"].append(
                            {"server": name, "protocol": protocol, "input": given, "concurrency": c, **r}
                        )
        urls = servers["oip"][0]
        for c in CONCURRENCY:  # gRPC's stream (ModelStreamInfer), perf_analyzer --streaming
            log(f"  perf_analyzer -> oip grpc stream images c={c} ...")
            r = measure(binary, env, urls["grpc"], "grpc", data["images"], c, seconds, ("--streaming",))
            out["rows"].append({"server": "oip", "protocol": "grpc stream", "input": "images", "concurrency": c, **r})
        oip.stop(state)
        # shared memory: perf_analyzer's takes no optional input, so the image models are served as Triton's image
        # examples want them (their FP32 NCHW input alone), client shared memory allowed; the digit, then a large
        # input whose pass is cheap, each sent in the request and through shared memory
        large = large_input_export(work / "large")
        for model, folder, tensor in (
            ("mnist", export_dir, data["input"]),
            ("large", large, large_input_file(large, work)),
        ):
            state = work / f"state-shm-{model}"
            stack.callback(oip.stop, state)
            cfg = oip.OIPConfig.on_free_ports(str(folder), model, str(state), allow_client_shm=True, triton_images=True)
            cfg = oip.start(cfg, timeout=120)
            urls = {"http": f"127.0.0.1:{cfg.http_port}", "grpc": f"127.0.0.1:{cfg.grpc_port}"}
            given = "input" if model == "mnist" else "3x224x224"
            for protocol in PROTOCOLS:
                for how, extra in (("", ()), ("shm", SHM)):
                    for c in CONCURRENCY:
                        log(f"  perf_analyzer -> oip {protocol} {given} {how or 'in the request'} c={c} ...")
                        r = measure(binary, env, urls[protocol], protocol, tensor, c, seconds, extra, model=model)
                        row = {"server": "oip", "protocol": f"{protocol} {how}".strip(), "input": given}
                        out["rows"].append({**row, "concurrency": c, **r})
            oip.stop(state)
        if not peers:
            return out
        running = peer_setup.start(peer_setup.PEERS["pytriton"], export_dir / "model.onnx", work / "peers")
        stack.callback(peer_setup.stop, running)
        urls = {"http": f"127.0.0.1:{running.ports['http']}", "grpc": f"127.0.0.1:{running.ports['grpc']}"}
        for protocol in PROTOCOLS:
            for c in CONCURRENCY:
                log(f"  perf_analyzer -> pytriton {protocol} images c={c} ...")
                r = measure(binary, env, urls[protocol], protocol, data["images"], c, seconds)
                out["rows"].append(
                    {"server": "pytriton", "protocol": protocol, "input": "images", "concurrency": c, **r}
                )
    return out


def table(section: dict) -> list[str]:
    head = f"{'server':<9} {'protocol':<12} {'input':<9} {'c':>3} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
    lines = [
        f"Triton's perf_analyzer ({section['perf_analyzer']}, {section['seconds']:g} s windows), one digit from "
        "--input-data; each server read its model configuration first",
        head,
    ]
    for r in section["rows"]:
        row = f"{r['server']:<9} {r['protocol']:<12} {r['input']:<9} {r['concurrency']:>3} "
        if "error" in r:
            lines.append(f"{row}failed: {r['error']}")
        else:
            lines.append(f"{row}{r['throughput']:>8.1f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}")
    return lines
