"""Proves an export computes the eager model's function: float64 eager is the reference for every backend."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.formats import present, read_card, sha256
from export.tolerance import ATOL, RTOL, compare, tolerance
from handlers.card import FORMAT_BY_NAME, CardError, ModelCard

BATCH_SIZES = (1, 2, 7, 64)  # the last is capped at the number of proof images
FLOP_BUDGET = 1e11  # about 20 s of this 2-core machine for the whole proof: big models get fewer images
MAX_IMAGES, MIN_IMAGES = 320, 24


class VerificationError(Exception):
    """An export that cannot be checked (missing files, changed weights); one line for the user."""


@dataclass
class Check:
    backend: str
    batch_size: int
    passed: bool
    shape_ok: bool
    dtype_ok: bool
    nan: int
    failures: int
    elements: int
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float | None  # over elements where rtol decides (|ref| >= atol/rtol); None when there are none
    p99_rel: float | None
    min_atol: float  # smallest atol that would pass at this rtol
    min_rtol: float  # smallest rtol that would pass at this atol
    top1_agreement: float | None
    worst: dict = field(default_factory=dict)


@dataclass
class Report:
    export_dir: str
    atol: float
    rtol: float
    reference: str
    inputs: dict
    checks: list[Check]
    tolerance_note: str | None = None  # why atol differs from the one asked for, when it does
    requested_atol: float | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def flops_per_image(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-adds x 2 of every conv and linear layer, counted from the shapes a forward pass produces."""
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total[0] += 2 * k * output.numel()
        elif isinstance(module, torch.nn.Linear):
            total[0] += 2 * module.in_features * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                        torch.nn.Linear))]  # fmt: skip
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def image_count(flops: int, backends: int, batch_sizes: int = len(BATCH_SIZES)) -> int:
    """As many proof images as the budget allows: the float64 reference costs about three float32 passes."""
    passes = 3 + backends * batch_sizes
    return int(np.clip(FLOP_BUDGET / max(flops * passes, 1), MIN_IMAGES, MAX_IMAGES))


def held_out(card: ModelCard, n: int, data_dir: Path | str) -> np.ndarray | None:
    """Real held-out images of the card's dataset, evenly spread (the split is ordered by class); None offline."""
    from train import data

    if card.dataset not in data.DATASETS or card.input_shape != (1, 28, 28):
        return None
    try:
        _, test = data.load(card.dataset, data_dir, download=False)
    except data.DataError:
        return None
    pick = np.linspace(0, len(test) - 1, min(n, len(test))).round().astype(int)
    return test.images[pick].numpy()[:, None].astype(np.float32) / 255.0


def synthetic(card: ModelCard, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uniform noise, smooth natural-looking images), pixels in [0, 1]: half of n each."""
    c, h, w = card.input_shape
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 1, size=(n - n // 2, c, h, w)).astype(np.float32)
    smooth = []
    for _ in range(n // 2):
        k = int(rng.integers(2, 9))
        grid = torch.from_numpy(rng.uniform(0, 1, size=(1, c, k, k)).astype(np.float32))
        img = torch.nn.functional.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0].numpy()
        yy, xx = np.mgrid[0 : 1 : h * 1j, 0 : 1 : w * 1j]
        ramp = rng.uniform(-0.3, 0.3) * yy + rng.uniform(-0.3, 0.3) * xx
        smooth.append(np.clip(img + ramp, 0, 1).astype(np.float32))
    return noise, np.stack(smooth) if smooth else noise[:0]


def proof_inputs(card: ModelCard, n: int, data_dir: Path | str = "data") -> tuple[np.ndarray, dict]:
    """Normalised model inputs and what they are: real held-out images where available, else synthetic ones."""
    real = held_out(card, n * 4 // 5, data_dir)
    if real is not None:
        noise, _ = synthetic(card, 2 * (n - len(real)))
        pixels, kinds = np.concatenate([real, noise[: n - len(real)]]), {"real": len(real), "noise": n - len(real)}
    else:
        noise, smooth = synthetic(card, n)
        pixels, kinds = np.concatenate([smooth, noise]), {"real": 0, "smooth": len(smooth), "noise": len(noise)}
    mean = np.asarray(card.mean, np.float32)[None, :, None, None]
    std = np.asarray(card.std, np.float32)[None, :, None, None]
    x = ((pixels - mean) / std).astype(np.float32)
    return x, {**kinds, "total": int(len(x)), "shape": list(x.shape[1:]), "dataset": card.dataset if
               kinds["real"] else None}  # fmt: skip


def backends(export_dir: Path, model: torch.nn.Module, formats: list[str], threads: int = 0) -> dict:
    """Every exact format present, as a function of a numpy batch; eager float32 first."""
    from handlers import runtime

    fns = {"eager-fp32": runtime.torch_runner(model)}
    for name in formats:
        fmt = FORMAT_BY_NAME[name]
        if fmt.exact:
            fns[fmt.backend] = runtime.load(export_dir, fmt.backend, threads=threads or torch.get_num_threads()).run
    return fns


def run_batched(fn, x: np.ndarray, batch_size: int, out_shape: tuple) -> tuple[np.ndarray, bool, bool]:
    outs, shape_ok, dtype_ok = [], True, True
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        out = fn(np.ascontiguousarray(chunk))
        shape_ok &= out.shape == (len(chunk), *out_shape)
        dtype_ok &= out.dtype == np.float32
        outs.append(out.reshape(len(chunk), *out_shape) if out.size == len(chunk) * np.prod(out_shape) else out)
    try:
        return np.concatenate(outs), shape_ok, dtype_ok
    except ValueError:
        return np.full((len(x), *out_shape), np.nan, np.float32), False, dtype_ok


def check(backend: str, bs: int, got, shape_ok, dtype_ok, ref, *, atol, rtol, classify: bool) -> Check:
    stats = compare(got, ref, atol, rtol)
    top1 = float((got.argmax(1) == ref.argmax(1)).mean()) if classify else None
    passed = shape_ok and dtype_ok and stats["failures"] == 0
    return Check(backend, bs, passed, shape_ok, dtype_ok, top1_agreement=top1, **stats)


def load_for_proof(export_dir: Path, source: Path | str | None) -> tuple[ModelCard, torch.nn.Module, list[str]]:
    from export.user_model import ModelLoadError, rebuild
    from train.checkpoint import CheckpointError

    if not (export_dir / "meta.json").is_file():
        raise VerificationError(f"{export_dir / 'meta.json'} is missing: run `torchship export` first")
    try:
        card = read_card(export_dir)
    except CardError as e:
        raise VerificationError(f"{export_dir}: {e}") from None
    formats = present(export_dir)
    if not any(FORMAT_BY_NAME[f].exact for f in formats):
        raise VerificationError(f"{export_dir} holds no exported model: run `torchship export` first")
    source = Path(source or card.provenance.source or "")
    if not source.is_file():
        raise VerificationError(f"the weights this export was made from are not at {source or '(unknown)'}: "
                                "pass --checkpoint PATH")  # fmt: skip
    if card.provenance.source_sha256 and sha256(source) != card.provenance.source_sha256:
        raise VerificationError(f"{source} changed since this export was made (sha256 differs): export again")
    try:
        model = rebuild(card, source)
    except (ModelLoadError, CheckpointError) as e:
        raise VerificationError(str(e)) from None
    return card, model, formats


def verify(
    export_dir: Path | str,
    atol: float = ATOL,
    rtol: float = RTOL,
    source: Path | str | None = None,
    data_dir: Path | str = "data",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> Report:
    export_dir, requested_atol = Path(export_dir), atol
    card, model, formats = load_for_proof(export_dir, source)
    fns = backends(export_dir, model, formats)
    n = image_count(flops_per_image(model, card.input_shape), len(fns), len(batch_sizes))
    x, inputs = proof_inputs(card, n, data_dir)
    batch_sizes = tuple(sorted({min(b, len(x)) for b in batch_sizes}))
    reference_model = copy.deepcopy(model).double()
    with torch.inference_mode():
        ref = reference_model(torch.from_numpy(x).double()).numpy()
    out_shape = ref.shape[1:]
    classify = card.task == "classify"
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend, fn in fns.items():
            for bs in batch_sizes:
                runs[backend, bs] = run_batched(fn, x, bs, out_shape)
    atol, note = tolerance(atol, rtol, ref, [runs["eager-fp32", bs][0] for bs in batch_sizes])
    checks = [check(b, bs, *runs[b, bs], ref, atol=atol, rtol=rtol, classify=classify) for b, bs in runs]
    return Report(str(export_dir), atol, rtol, f"eager PyTorch, float64 copy of the weights ({card.name})",
                  inputs, checks, note, requested_atol)  # fmt: skip


def _sci(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2e}"


def table(report: Report) -> str:
    head = f"{'backend':<12} {'batch':>5} {'max abs':>9} {'p99 abs':>9} {'max rel*':>9} {'min atol':>9} "
    head += f"{'top-1':>7} {'fails':>6}  result"
    i = report.inputs
    what = f"{i['real']} held-out {i.get('dataset')} images + " if i["real"] else f"{i.get('smooth', 0)} smooth + "
    lines = [
        f"reference: {report.reference}; atol {report.atol:g}, rtol {report.rtol:g}",
        f"inputs: {what}{i['noise']} uniform-noise images, {i['shape']}",
    ]
    if report.tolerance_note:
        lines.append(f"note: {report.tolerance_note}")
    lines += [head, "-" * len(head)]
    for c in report.checks:
        top1 = f"{c.top1_agreement:.4f}" if c.top1_agreement is not None else "n/a"
        flags = "" if c.shape_ok and c.dtype_ok else " (shape/dtype)"
        lines.append(
            f"{c.backend:<12} {c.batch_size:>5} {c.max_abs:>9.2e} {c.p99_abs:>9.2e} {_sci(c.max_rel):>9} "
            f"{c.min_atol:>9.2e} {top1:>7} {c.failures:>6}  {'PASS' if c.passed else 'FAIL'}{flags}"
        )
    lines.append(
        f"* relative error over elements with |reference| >= atol/rtol = {report.atol / report.rtol:g}, "
        "where rtol decides; nearer zero, atol decides. An element fails only if it exceeds both."
    )
    lines.append("all checks pass" if report.passed else f"{len(report.failures())} check(s) FAILED")
    return "\n".join(lines)


def failure_message(report: Report) -> str:
    c = max(report.failures(), key=lambda c: c.max_abs)
    w = c.worst
    what = "shape or dtype differs; " if not (c.shape_ok and c.dtype_ok) else ""
    return (
        f"{c.backend} at batch size {c.batch_size} does not match eager PyTorch: {what}{c.failures} of {c.elements} "
        f"elements off (atol {report.atol:g}, rtol {report.rtol:g}); worst at input {w['index'][0]}, "
        f"output {w['index'][1:]}: got {w['got']:.6g}, expected {w['expected']:.6g}"
    )


def write_report(report: Report, export_dir: Path | str) -> Path:
    path = Path(export_dir) / "equivalence.json"
    path.write_text(json.dumps(report.to_dict(), indent=2))
    return path
