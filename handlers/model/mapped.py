"""One optimized copy of a large ONNX model's weights that every session of every worker maps, instead of a copy each.

ONNX Runtime loads an ONNX file's weights into each session's own heap, optimizes the graph there (a convolution's
weights reordered, a MatMul's prepacked) and keeps both: the OIP server's two workers of two sessions each held four
private copies. Saved once as ONNX Runtime optimized it, with every weight (prepacked ones too) in a file beside
it, the model loads with no optimization left to do, its weights mapped from that file: the page cache holds them
once for every process, and a session keeps only its activations. BERT-base, two workers of two sessions: 1,790 MB
PSS against 712-726, passes as fast (bench/NOTES.md lever 79).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from ..formats import FORMAT_BY_BACKEND

logger = logging.getLogger("torchship.model")

MIN_BYTES = 32 << 20  # a model file this large is mapped; a smaller one costs less copied than the step costs
FILE, WEIGHTS = "model.onnx", "weights.bin"


def worth_it(path: Path) -> bool:
    """The file and its external data beside it (a model over 2 GB keeps its weights in model.onnx.data)."""
    return sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*")) >= MIN_BYTES


def machine() -> str:
    """What the optimized graph depends on besides the model: ONNX Runtime's version and the CPU's instruction set
    (its convolutions are reordered for the vector width found)."""
    import onnxruntime as ort  # lazily: an archive of TorchScript or pt2 runs without it

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return f"{ort.__version__}|{platform.machine()}|{flags}"


def key(path: Path) -> str:
    s = path.resolve().stat()
    return hashlib.sha256(f"{path.resolve()}|{s.st_size}|{s.st_mtime_ns}|{machine()}".encode()).hexdigest()[:20]


def mapped(path: Path, into: Path) -> Path | None:
    """PATH optimized once under INTO, for sessions to load with optimization off; None (said once in the log) when
    ONNX Runtime cannot save it, so the caller loads PATH as it is. Two processes may make it at once: the first to
    finish renames its folder into place and the other's is removed."""
    target = into / key(path)
    if (target / FILE).is_file():
        return target / FILE
    import onnxruntime as ort  # lazily: an archive of TorchScript or pt2 runs without it

    began, making = time.perf_counter(), None
    try:
        into.mkdir(parents=True, exist_ok=True)
        making = Path(tempfile.mkdtemp(dir=into, prefix=".making-"))
        options = ort.SessionOptions()  # every optimization, as a session of the file itself would make
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = str(making / FILE)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        options.log_severity_level = 3  # its warning that the file fits this machine only: the key says as much
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        os.rename(making, target)
    except Exception as e:  # noqa: BLE001 - whatever failed, the model still loads as it is
        if making is not None:
            shutil.rmtree(making, ignore_errors=True)
        if (target / FILE).is_file():  # another process finished first
            return target / FILE
        logger.warning("%s is loaded as it is: saving it optimized failed (%s: %s)", path, type(e).__name__, e)
        return None
    size = sum(f.stat().st_size for f in target.iterdir()) / 2**20
    logger.info("%s optimized once for every session to map: %.0f MB, %.1f s", path, size, time.perf_counter() - began)
    return target / FILE


def prepare(directory: str | Path, backend: str, into: Path | None) -> None:
    """An export's model optimized under INTO before the workers load it (each would otherwise make it at once, the
    first to finish winning), when it is an ONNX Runtime model large enough to be mapped."""
    file = FORMAT_BY_BACKEND[backend]
    path = Path(directory) / file.file
    if into is not None and file.onnxruntime and path.is_file() and worth_it(path):
        mapped(path, into)
