"""What the proof found, and how it is told: one check per backend, batch size (and, for named inputs, output and
lengths), the approximate formats' verdicts, the table `torchship export` and `verify` print, the one-line failure, and
equivalence.json, which ties the proof to the digest of every file it proved."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torchship.export.formats import present
from torchship.handlers.formats import FORMAT_BY_NAME, PROOF_FILE, digest


def eager_reference(model: str) -> str:
    """What every proof compares with."""
    return f"eager PyTorch, float64 copy of the weights ({model})"


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
    ties: int | None = None  # a segmenter: pixels whose best two classes tie within the tolerance, left out of top-1


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


def _sci(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2e}"


def table(report: Report) -> str:
    head = f"{'backend':<12} {'batch':>5} {'max abs':>9} {'p99 abs':>9} {'max rel*':>9} {'min atol':>9} "
    head += f"{'top-1':>7} {'fails':>6}  result"
    i = report.inputs
    if i.get("named"):
        return named_table(report)
    if i.get("detect"):
        return detection_table(report)
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
    ties = [c.ties for c in report.checks if c.ties is not None]
    if ties:
        lines.append(
            f"top-1: the class of each pixel, which must agree on >= 99.9 % of them; pixels whose best two classes "
            f"tie within the tolerance are left out ({min(ties)}-{max(ties)} a run)"
        )
    lines.append(
        f"* relative error over elements with |reference| >= atol/rtol = {report.atol / report.rtol:g}, "
        "where rtol decides; nearer zero, atol decides. An element fails only if it exceeds both."
    )
    lines += approximation_lines(report)
    return "\n".join(lines)


def approximation_lines(report: Report) -> list[str]:
    """The approximate formats' table, and the verdict line of the whole report."""
    lines = []
    if report.approximations:
        lines += [
            "",
            f"approximate formats: judged by top-1 agreement >= {MIN_AGREEMENT} with eager float32 and an "
            f"accuracy change >= -{MAX_ACCURACY_DROP} points; element error reported, not judged",
            f"{'backend':<12} {'inputs':>6} {'agreement':>9} {'float acc':>9} {'acc':>7} {'change':>7} "
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
    return lines


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
    lines += approximation_lines(report)
    return "\n".join(lines)


def approximation_failure(report: Report) -> str:
    a = next(a for a in report.approximations if not a.passed)
    change = (
        f", accuracy {a.accuracy_change_points:+.2f} points (needs >= -{MAX_ACCURACY_DROP})"
        if a.accuracy_change_points is not None
        else ""
    )
    return (
        f"{a.backend} is too far from the float model: top-1 agreement {a.agreement:.4f} (needs "
        f"{MIN_AGREEMENT}){change} on {a.inputs}"
    )


def failure_message(report: Report) -> str:
    if report.inputs.get("named"):
        return named_failure(report)
    if report.inputs.get("detect"):
        return detection_failure(report)
    if not report.failures():
        return approximation_failure(report)
    c = max(report.failures(), key=lambda c: c.max_abs)
    w = c.worst
    what = "shape or dtype differs; " if not (c.shape_ok and c.dtype_ok) else ""
    if c.ties is not None and not c.failures and c.shape_ok and c.dtype_ok:
        return (
            f"{c.backend} at batch size {c.batch_size} gives another class than eager PyTorch to "
            f"{1 - c.top1_agreement:.2%} of the pixels clear of ties (at most 0.1 %)"
        )
    return (
        f"{c.backend} at batch size {c.batch_size} does not match eager PyTorch: {what}{c.failures} of {c.elements} "
        f"elements off (atol {c.atol:g}, rtol {c.rtol:g}); worst at input {w['index'][0]}, "
        f"output {w['index'][1:]}: got {w['got']:.6g}, expected {w['expected']:.6g}"
    )


def write_report(report: Report, export_dir: Path | str) -> Path:
    """equivalence.json, with the sha256 of every model file it proved: a server loads a version as proven only
    while its file still has that digest (handlers/oip/repository.py)."""
    path = Path(export_dir) / PROOF_FILE
    files = {FORMAT_BY_NAME[f].file: digest(Path(export_dir) / FORMAT_BY_NAME[f].file) for f in present(export_dir)}
    path.write_text(json.dumps({**report.to_dict(), "files": files}, indent=2))
    return path


def named_failure(report: Report) -> str | None:
    """What failed, naming the output, the lengths and the element; None when nothing did."""
    if not report.failures():
        return approximation_failure(report) if not report.passed else None
    c = max(report.failures(), key=lambda c: c.max_abs)
    w = c.worst
    what = "shape or dtype differs; " if not (c.shape_ok and c.dtype_ok) else ""
    lengths = ", ".join(f"{d} {v}" for d, v in (c.dims or {}).items())
    return (
        f"{c.backend} output '{c.output}' at batch size {c.batch_size}{', ' + lengths if lengths else ''} does "
        f"not match eager PyTorch: {what}{c.failures} of {c.elements} elements off (atol {c.atol:g}, rtol "
        f"{c.rtol:g}); worst at row {w['index'][0]}, element {w['index'][1:]}: got {w['got']:.6g}, expected "
        f"{w['expected']:.6g}"
    )


def detection_table(report: Report) -> str:
    """A detector's proof (proof/detections.py): one line per format."""
    i = report.inputs
    lines = [
        f"reference: {report.reference}; {i['rules']}",
        f"inputs: {i['total']} drawn scenes ({', '.join(i['sizes'])}), letterboxed to {i['shape']}; eager finds "
        f"{i['detections']} detections, {i['empty']} scene{'' if i['empty'] == 1 else 's'} with none; "
        f"thresholds {i['thresholds']}",
    ]
    head = f"{'backend':<12} {'judged':>6} {'matched':>7} {'left out':>8} {'missing':>7} {'extra':>5} "
    head += f"{'box err px':>10} {'score err':>9}  result"
    lines += [head, "-" * len(head)]
    for c in report.checks:
        w = c.worst
        lines.append(
            f"{c.backend:<12} {w['judged']:>6} {w.get('matched', 0):>7} {w.get('excluded', 0):>8} "
            f"{len(w['missing']):>7} {len(w['extra']):>5} {c.max_abs:>10.2e} {c.mean_abs:>9.2e}  "
            f"{'PASS' if c.passed else 'FAIL'}{'' if c.shape_ok and c.dtype_ok else ' (shape/dtype)'}"
        )
    lines.append("all checks pass" if report.passed else f"{len(report.failures())} check(s) FAILED")
    return "\n".join(lines)


def detection_failure(report: Report) -> str:
    c = report.failures()[0]
    w = c.worst
    if w["missing"] or w["extra"]:
        first = (w["missing"] or w["extra"])[0]
        what = "misses" if w["missing"] else "adds"
        return (
            f"{c.backend} does not answer eager PyTorch's detections: {len(w['missing'])} missing, "
            f"{len(w['extra'])} extra of {w['judged']} judged; it {what} label {first['label']} score "
            f"{first['score']:.4f} box {[round(v, 1) for v in first['box']]} in scene {first['image']}"
        )
    if not (c.shape_ok and c.dtype_ok):
        return f"{c.backend} answers another shape or dtype than eager PyTorch"
    return (
        f"{c.backend}: only {w['judged']} detections clear of the threshold and of ties to judge (needs "
        f"{report.inputs['min_judged']}; {w['excluded']} left out): the proof cannot tell. Untrained weights answer "
        "one score for every box; trained ones with too high a score threshold find too little (--model-kwarg)"
    )
