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

FOLDER = "mapped"  # a runtime's optimized copies, in its cache or work folder or the archive's unpacked one
MIN_BYTES = 32 << 20  # a model file this large is mapped; a smaller one costs less copied than the step costs
FILE, WEIGHTS, SOURCE = "model.onnx", "weights.bin", "source.txt"  # SOURCE: the model file it was made from


def worth_it(path: Path) -> bool:
    """The file and its external data beside it (a model over 2 GB keeps its weights in model.onnx.data)."""
    return sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*")) >= MIN_BYTES


def cpu() -> str:
    """This machine's processor as /proc/cpuinfo names it, and its instruction set."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "flags"):
                    found.setdefault(name.strip(), value.strip())
                if len(found) == 2:
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{found.get('model name', '')}|{found.get('flags', '')}"


def machine() -> str:
    """What the optimized graph depends on besides the model: ONNX Runtime's version and the CPU's instruction set
    (its convolutions are reordered for the vector width found)."""
    import onnxruntime as ort  # lazily: an archive of TorchScript or pt2 runs without it

    return f"{ort.__version__}|{cpu()}"


def stamp(path: Path) -> str:
    """The model file and its external data as they are now: a rewritten file is another model."""
    files = sorted(path.parent.glob(f"{path.name}*"))
    return "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def fingerprint(path: Path, *facts: str) -> str:
    """A name for what was made from the model file as it is now (its path and stamp) and FACTS (the machine's)."""
    path = path.resolve()
    return hashlib.sha256("|".join((str(path), stamp(path), *facts)).encode()).hexdigest()[:20]


def key(path: Path) -> str:
    return fingerprint(path, machine())


ABANDONED_S = 3600  # a folder still being made that nobody has written to for this long: its maker was killed


def prune(into: Path, source: Path, keep: Path) -> None:
    """Copies no session will load again, left in a cache kept across restarts (each holds twice the weights on disk):
    of SOURCE made for an earlier file or machine, of a model file since removed, and folders half made by a process
    killed while optimizing. A process still mapping one keeps its pages (the file is only unlinked)."""
    for entry in into.iterdir():
        try:
            if entry.name.startswith(".making-"):
                stale = time.time() - entry.stat().st_mtime > ABANDONED_S
            else:
                origin = (entry / SOURCE).read_text()
                stale = entry != keep and (origin == str(source) or not Path(origin).is_file())
        except OSError:  # not one of ours, or removed meanwhile by another process pruning
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


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
        (making / SOURCE).write_text(str(path.resolve()))
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
        made = mapped(path, into)
        if made is not None:  # once a start or load, here: what earlier ones left in a kept cache goes
            prune(into, path.resolve(), made.parent)
