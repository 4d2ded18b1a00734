"""Proves an export computes the eager model's function: float64 eager is the reference for every backend."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from torchship.export.formats import present, read_card, sha256
from torchship.export.inputs import proof_inputs
from torchship.export.tolerance import ATOL, FORMAT_LOOSENING, RTOL, compare, tolerance
from torchship.handlers.card import CardError, ModelCard
from torchship.handlers.formats import FORMAT_BY_NAME

BATCH_SIZES = (1, 2, 7, 64)  # the last is capped at the number of proof images
FLOP_BUDGET = 1e11  # about 20 s of this 2-core machine for the whole proof: big models get fewer images
MAX_IMAGES, MIN_IMAGES = 320, 24


class VerificationError(Exception):
    """An export that cannot be checked (missing files, changed weights); one line for the user."""


@dataclass
class Check:
    backend: str
    batch_size: int
    atol: float
    rtol: float
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
    output: str | None = None  # named outputs: which one
    dims: dict | None = None  # named inputs: the length of each named dimension


MIN_AGREEMENT = 0.99  # an approximate format's top-1 must match eager float32's this often
MAX_ACCURACY_DROP = 0.5  # and its held-out accuracy may fall by at most this many points


@dataclass
class Approximation:
    """An approximate format (int8), judged by what it answers, not by element-wise error."""

    backend: str
    images: int
    inputs: str  # which images: the labelled held-out set, or the proof's own when there is none
    calibration: str | None
    agreement: float  # top-1 agreement with eager float32
    float_accuracy: float | None
    accuracy: float | None
    accuracy_change_points: float | None
    max_abs: float  # against eager float32: reported, not judged
    p99_abs: float
    passed: bool


@dataclass
class Report:
    export_dir: str
    atol: float
    rtol: float
    reference: str
    inputs: dict
    checks: list[Check]
    tolerance_note: str | None = None  # which tolerance differs from the one asked for, and why
    requested_atol: float | None = None
    approximations: list[Approximation] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(a.passed for a in self.approximations)

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

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
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


def proof_set(
    card: ModelCard,
    model: torch.nn.Module,
    formats: list[str],
    data_dir: Path | str = "data",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> tuple[np.ndarray, dict]:
    """The inputs the proof of an export with these formats runs on, and what they are."""
    exact = 1 + sum(FORMAT_BY_NAME[f].exact for f in formats)  # eager float32 and every exact format
    return proof_inputs(card, image_count(flops_per_image(model, card.input_shape), exact, len(batch_sizes)), data_dir)


def backends(export_dir: Path, model: torch.nn.Module, formats: list[str], threads: int = 0) -> dict:
    """Every exact format present, as a function of a numpy batch (named inputs: of a dict); eager float32 first."""
    from torchship.handlers.model import runners

    card = read_card(export_dir)
    eager = runners.named_torch_runner(model, card.signature) if card.named else runners.torch_runner(model)
    fns = {"eager-fp32": eager}
    for name in formats:
        fmt = FORMAT_BY_NAME[name]
        if fmt.exact:
            threads = threads or torch.get_num_threads()
            fns[fmt.backend] = runners.load(export_dir, fmt.backend, threads=threads, card=card).run
    return fns


def batched(fn, x: np.ndarray, size: int = 256) -> np.ndarray:
    return np.concatenate([fn(np.ascontiguousarray(x[i : i + size])) for i in range(0, len(x), size)])


def approximate(
    export_dir: Path,
    card: ModelCard,
    model: torch.nn.Module,
    formats: list[str],
    proof_x: np.ndarray,
    data_dir: Path | str,
) -> list[Approximation]:
    """Every approximate format on the whole labelled held-out set where there is one, else on the proof's images."""
    import onnxruntime as ort

    from torchship.export.inputs import dataset_split, normalise
    from torchship.handlers.model import runners
    from torchship.handlers.model.tensors import standardize

    out = []
    for name in formats:
        fmt = FORMAT_BY_NAME[name]
        if fmt.exact:
            continue
        held = dataset_split(card, data_dir, train=False)
        if held is not None:
            x, labels = (normalise(card, held[0]) if card.image else standardize(card, held[0])), held[1]
            inputs = f"{len(x)} held-out {card.dataset} images"
        else:
            x, labels = proof_x, None
            inputs = f"the proof's {len(x)} images (no labelled held-out set: accuracy not measured)"
        path = export_dir / fmt.file
        meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
        ref = batched(runners.torch_runner(model), x)
        got = batched(runners.load(export_dir, fmt.backend, threads=torch.get_num_threads()).run, x)
        err = np.abs(got.astype(np.float64) - ref)
        agreement = float((got.argmax(1) == ref.argmax(1)).mean())
        acc_f = acc = change = None
        if labels is not None:
            acc_f, acc = float((ref.argmax(1) == labels).mean()), float((got.argmax(1) == labels).mean())
            change = 100 * (acc - acc_f)
        passed = agreement >= MIN_AGREEMENT and (change is None or change >= -MAX_ACCURACY_DROP)
        out.append(
            Approximation(
                fmt.backend,
                len(x),
                inputs,
                meta.custom_metadata_map.get("torchship_calibration"),
                agreement,
                acc_f,
                acc,
                change,
                float(err.max()),
                float(np.percentile(err, 99)),
                passed,
            )
        )
    return out


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
    return Check(backend, bs, atol, rtol, passed, shape_ok, dtype_ok, top1_agreement=top1, **stats)


def load_for_proof(export_dir: Path, source: Path | str | None) -> tuple[ModelCard, torch.nn.Module, list[str]]:
    from torchship.export.user_model import ModelLoadError, rebuild
    from torchship.train.checkpoint import CheckpointError

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
        raise VerificationError(
            f"the weights this export was made from are not at {source or '(unknown)'}: pass --checkpoint PATH"
        )
    if card.provenance.source_sha256 and sha256(source) != card.provenance.source_sha256:
        raise VerificationError(f"{source} changed since this export was made (sha256 differs): export again")
    try:
        model = rebuild(card, source)
    except (ModelLoadError, CheckpointError) as e:
        raise VerificationError(str(e)) from None
    return card, model, formats


def read_card_or_none(export_dir: Path) -> ModelCard | None:
    try:
        return read_card(export_dir)
    except CardError:
        return None


def verify(
    export_dir: Path | str,
    atol: float = ATOL,
    rtol: float = RTOL,
    source: Path | str | None = None,
    data_dir: Path | str = "data",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> Report:
    export_dir, requested_atol = Path(export_dir), atol
    if getattr(read_card_or_none(export_dir), "named", False):
        from torchship.export.named import verify_named

        return verify_named(export_dir, atol, rtol, source, batch_sizes)
    card, model, formats = load_for_proof(export_dir, source)
    fns = backends(export_dir, model, formats)
    x, inputs = proof_set(card, model, formats, data_dir, batch_sizes)
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
    checks, notes = [], [note] if note else []
    for backend in fns:
        rows = [
            check(backend, bs, *runs[backend, bs], ref, atol=atol, rtol=rtol, classify=classify) for bs in batch_sizes
        ]
        if backend in FORMAT_LOOSENING and not all(c.passed for c in rows):
            factor, why = FORMAT_LOOSENING[backend]
            relaxed = [
                check(backend, bs, *runs[backend, bs], ref, atol=atol * factor, rtol=rtol * factor, classify=classify)
                for bs in batch_sizes
            ]
            if all(c.passed for c in relaxed):
                rows = relaxed
                notes.append(f"{backend} held to atol {atol * factor:g}, rtol {rtol * factor:g} ({factor}x): {why}")
        checks += rows
    note = "; ".join(notes) or None
    approximations = approximate(export_dir, card, model, formats, x, data_dir) if classify else []
    return Report(
        str(export_dir),
        atol,
        rtol,
        f"eager PyTorch, float64 copy of the weights ({card.name})",
        inputs,
        checks,
        note,
        requested_atol,
        approximations,
    )


def _sci(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2e}"


def table(report: Report) -> str:
    head = f"{'backend':<12} {'batch':>5} {'max abs':>9} {'p99 abs':>9} {'max rel*':>9} {'min atol':>9} "
    head += f"{'top-1':>7} {'fails':>6}  result"
    i = report.inputs
    if i.get("named"):
        return named_table(report)
    if "ranged" in i:  # a tensor model's rows
        drawn = f"{i['ranged']} rows drawn uniformly over {'the training range' if i.get('range') else 'mean +- 2 std'}"
        inputs = (f"{i['real']} held-out {i.get('dataset')} rows + " if i["real"] else "") + f"{drawn}, {i['shape']}"
    else:
        what = f"{i['real']} held-out {i.get('dataset')} images + " if i["real"] else f"{i.get('smooth', 0)} smooth + "
        inputs = f"{what}{i['noise']} uniform-noise images, {i['shape']}"
    lines = [f"reference: {report.reference}; atol {report.atol:g}, rtol {report.rtol:g}", f"inputs: {inputs}"]
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
    if report.approximations:
        lines += [
            "",
            f"approximate formats: judged by top-1 agreement >= {MIN_AGREEMENT} with eager float32 and an "
            f"accuracy change >= -{MAX_ACCURACY_DROP} points; element error reported, not judged",
            f"{'backend':<12} {'images':>6} {'agreement':>9} {'float acc':>9} {'acc':>7} {'change':>7} "
            f"{'max abs':>9} {'p99 abs':>9}  result",
        ]
        for a in report.approximations:
            fa, acc = (f"{a.float_accuracy:.4f}", f"{a.accuracy:.4f}") if a.accuracy is not None else ("n/a", "n/a")
            change = f"{a.accuracy_change_points:+.2f}" if a.accuracy_change_points is not None else "n/a"
            lines.append(
                f"{a.backend:<12} {a.images:>6} {a.agreement:>9.4f} {fa:>9} {acc:>7} {change:>7} "
                f"{a.max_abs:>9.2e} {a.p99_abs:>9.2e}  {'PASS' if a.passed else 'FAIL'}"
            )
            lines.append(f"  on {a.inputs}; calibrated on {a.calibration or 'unknown images'}")
    bad = len(report.failures()) + sum(not a.passed for a in report.approximations)
    lines.append("all checks pass" if report.passed else f"{bad} check(s) FAILED")
    return "\n".join(lines)


def named_table(report: Report) -> str:
    """One line per backend, output and length, the worst of its batch sizes; failures in full."""
    i = report.inputs
    drawn = ", ".join(f"{x['name']} {x['datatype']} in {x['range'] or 'its default spread'}" for x in i["inputs"])
    lengths = "; ".join(", ".join(f"{d} {v}" for d, v in case.items()) or "fixed shapes" for case in i["cases"])
    lines = [
        f"reference: {report.reference}; atol {report.atol:g}, rtol {report.rtol:g}",
        f"inputs: {i['rows']} examples at each of: {lengths}; values drawn from {drawn}",
    ]
    if i["padded"]:
        lines.append(
            f"padding: one batch of rows of different {', '.join(i['padded'])}, each answer against the row alone"
        )
    if report.tolerance_note:
        lines.append(f"note: {report.tolerance_note}")
    head = f"{'backend':<12} {'output':<16} {'lengths':<24} {'batches':>8} {'max abs':>9} {'min atol':>9} "
    head += f"{'fails':>6}  result"
    lines += [head, "-" * len(head)]
    groups: dict = {}
    for c in report.checks:
        dims = ", ".join(f"{d} {v}" for d, v in (c.dims or {}).items())
        dims = "padded rows" if "padded" in dims else dims or "-"
        groups.setdefault((c.backend, c.output, dims), []).append(c)
    for (backend, output, dims), cs in groups.items():
        sizes = ",".join(str(s) for s in sorted({c.batch_size for c in cs}))
        ok = all(c.passed for c in cs)
        lines.append(
            f"{backend:<12} {output[:16]:<16} {dims[:24]:<24} {sizes:>8} {max(c.max_abs for c in cs):>9.2e} "
            f"{max(c.min_atol for c in cs):>9.2e} {sum(c.failures for c in cs):>6}  "
            f"{'PASS' if ok else 'FAIL'}"
        )
    lines.append("all checks pass" if report.passed else f"{len(report.failures())} check(s) FAILED")
    return "\n".join(lines)


def failure_message(report: Report) -> str:
    if report.inputs.get("named"):
        from torchship.export.named import failure

        return failure(report)
    if not report.failures():
        a = next(a for a in report.approximations if not a.passed)
        change = f", accuracy {a.accuracy_change_points:+.2f} points" if a.accuracy_change_points is not None else ""
        return (
            f"{a.backend} is too far from the float model: top-1 agreement {a.agreement:.4f} (needs "
            f"{MIN_AGREEMENT}){change} (needs >= -{MAX_ACCURACY_DROP}) on {a.inputs}"
        )
    c = max(report.failures(), key=lambda c: c.max_abs)
    w = c.worst
    what = "shape or dtype differs; " if not (c.shape_ok and c.dtype_ok) else ""
    return (
        f"{c.backend} at batch size {c.batch_size} does not match eager PyTorch: {what}{c.failures} of {c.elements} "
        f"elements off (atol {c.atol:g}, rtol {c.rtol:g}); worst at input {w['index'][0]}, "
        f"output {w['index'][1:]}: got {w['got']:.6g}, expected {w['expected']:.6g}"
    )


def write_report(report: Report, export_dir: Path | str) -> Path:
    """equivalence.json, with the sha256 of every model file it proved: a server loads a version as proven only
    while its file still has that digest (handlers/repository.py)."""
    from torchship.handlers.formats import PROOF_FILE

    path = Path(export_dir) / PROOF_FILE
    files = {FORMAT_BY_NAME[f].file: sha256(Path(export_dir) / FORMAT_BY_NAME[f].file) for f in present(export_dir)}
    path.write_text(json.dumps({**report.to_dict(), "files": files}, indent=2))
    return path
