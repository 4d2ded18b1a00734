"""Proves an export computes the eager model's function: float64 eager is the reference for every backend."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from torchship.export.inputs import dataset_split, normalise, proof_inputs
from torchship.export.proof.checks import (
    BATCH_SIZES,
    backends,
    batched,
    check,
    load_for_proof,
    read_card_or_none,
    run_batched,
)
from torchship.export.proof.detections import verify_detections
from torchship.export.proof.named import verify_named
from torchship.export.proof.report import MAX_ACCURACY_DROP, MIN_AGREEMENT, Approximation, Report, eager_reference
from torchship.export.proof.tolerance import ATOL, FORMAT_LOOSENING, RTOL, tolerance
from torchship.handlers.card import ModelCard
from torchship.handlers.formats import FORMAT_BY_NAME
from torchship.handlers.model import runners
from torchship.handlers.model.tensors import standardize

FLOP_BUDGET = 1e11  # about 20 s of this 2-core machine for the whole proof: big models get fewer images
MAX_IMAGES, MIN_IMAGES = 320, 24
# Output numbers compared over the whole proof, at most: a segmenter answers 49,152 a 128 x 128 image, and 320 of
# them took 31 s here, most of it comparing; 40 images still check 650,000 pixels' classes
ELEMENT_BUDGET = 2_000_000


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


def image_count(flops: int, backends: int, batch_sizes: int = len(BATCH_SIZES), outputs: int = 1) -> int:
    """As many proof images as the budgets allow: the float64 reference costs about three float32 passes; OUTPUTS:
    the numbers the model answers an image."""
    passes = 3 + backends * batch_sizes
    most = min(FLOP_BUDGET / max(flops * passes, 1), ELEMENT_BUDGET / max(outputs, 1))
    return int(np.clip(most, MIN_IMAGES, MAX_IMAGES))


def proof_set(
    card: ModelCard,
    model: torch.nn.Module,
    formats: list[str],
    data_dir: Path | str = "data",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> tuple[np.ndarray, dict]:
    """The inputs the proof of an export with these formats runs on, and what they are."""
    exact = 1 + sum(FORMAT_BY_NAME[f].exact for f in formats)  # eager float32 and every exact format
    with torch.no_grad():
        outputs = model(torch.zeros(1, *card.input_shape)).numel()
    n = image_count(flops_per_image(model, card.input_shape), exact, len(batch_sizes), outputs)
    return proof_inputs(card, n, data_dir)


def approximate(
    export_dir: Path,
    card: ModelCard,
    model: torch.nn.Module,
    formats: list[str],
    proof_x: np.ndarray,
    data_dir: Path | str,
) -> list[Approximation]:
    """Every approximate format on the whole labelled held-out set where there is one, else on the proof's images."""
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


def verify(
    export_dir: Path | str,
    atol: float = ATOL,
    rtol: float = RTOL,
    source: Path | str | None = None,
    data_dir: Path | str = "data",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> Report:
    export_dir, requested_atol = Path(export_dir), atol
    card = read_card_or_none(export_dir)
    if getattr(card, "named", False):
        return verify_named(export_dir, atol, rtol, source, batch_sizes)
    if getattr(card, "task", None) == "detect":
        return verify_detections(export_dir, source)
    card, model, formats = load_for_proof(export_dir, source)
    fns = backends(export_dir, model, formats)
    x, inputs = proof_set(card, model, formats, data_dir, batch_sizes)
    batch_sizes = tuple(sorted({min(b, len(x)) for b in batch_sizes}))
    reference_model = copy.deepcopy(model).double()
    with torch.inference_mode():
        ref = reference_model(torch.from_numpy(x).double()).numpy()
    out_shape = ref.shape[1:]
    classify, pixels = card.task in ("classify", "segment"), card.task == "segment"
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
            check(backend, bs, *runs[backend, bs], ref, atol=atol, rtol=rtol, classify=classify, pixels=pixels)
            for bs in batch_sizes
        ]
        if backend in FORMAT_LOOSENING and not all(c.passed for c in rows):
            factor, why = FORMAT_LOOSENING[backend]
            relaxed = [
                check(
                    backend,
                    bs,
                    *runs[backend, bs],
                    ref,
                    atol=atol * factor,
                    rtol=rtol * factor,
                    classify=classify,
                    pixels=pixels,
                )
                for bs in batch_sizes
            ]
            if all(c.passed for c in relaxed):
                rows = relaxed
                notes.append(f"{backend} held to atol {atol * factor:g}, rtol {rtol * factor:g} ({factor}x): {why}")
        checks += rows
    note = "; ".join(notes) or None
    approximations = approximate(export_dir, card, model, formats, x, data_dir) if card.task == "classify" else []
    return Report(
        str(export_dir), atol, rtol, eager_reference(card.name), inputs, checks, note, requested_atol, approximations
    )
