"""What a training run records besides the weights: the model's card (what export, serving and apps read), how it was
trained (for a reader of the checkpoint), and for the linear regression the fitted line against least squares."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import torch

from torchship.handlers.card import BUILTIN_ARCHITECTURES, Architecture, ModelCard, Provenance
from torchship.train.models import OUTPUT_KIND
from torchship.train.presets import Preset

if TYPE_CHECKING:
    from torchship.train.fit import Prepared


def build_card(preset: Preset, prep: Prepared, metrics: dict) -> ModelCard:
    """What export, serving and apps need to know about the model, and nothing about how it was trained."""
    tensor = preset.input_kind == "tensor"
    x = prep.train[0]
    spread = x.reshape(len(x), x.shape[1], -1).transpose(0, 1).reshape(x.shape[1], -1) if tensor else None
    return ModelCard(
        name=preset.name,
        task=preset.task,
        input_kind=preset.input_kind,
        input_shape=tuple(preset.input_shape),
        output_names=tuple(preset.output_names),
        input_range=tuple((float(r.min()), float(r.max())) for r in spread) if tensor else (),
        mean=prep.mean,
        std=prep.std,
        labels=tuple(preset.labels),
        preprocess=preset.preprocess,
        output_kind=OUTPUT_KIND[preset.arch],
        architecture=Architecture(BUILTIN_ARCHITECTURES[preset.arch], dict(preset.arch_kwargs)),
        provenance=Provenance(torch=str(torch.__version__), created_at=now()),
        dataset=preset.dataset,
        metrics=metrics,
    )


def training_facts(preset: Preset, device: torch.device) -> dict:
    """How the model was trained, for a reader of the checkpoint (the model's own facts are on its card)."""
    return {
        "hparams": preset.to_dict(),
        "seed": preset.seed,
        "device": str(device),
        "torch_version": str(torch.__version__),
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def line_fit(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The fitted y = a + b x against the least-squares solution of the same training points (float64)."""
    linear = model.linear
    x, y = (t.double().cpu() for t in train)
    design = torch.cat([torch.ones(len(x), 1, dtype=torch.float64), x], 1)
    solution = torch.linalg.lstsq(design, y).solution  # rows: intercept, then one per input
    fitted = torch.cat([linear.bias.detach().double().cpu()[None], linear.weight.detach().double().cpu().T])

    def shaped(m: torch.Tensor) -> dict:
        a, b = m[0], m[1:]
        one = a.numel() == 1 and b.numel() == 1
        return {"a": round(a.item(), 6) if one else a.tolist(), "b": round(b.item(), 6) if one else b.tolist()}

    return {
        "fitted": shaped(fitted),
        "least_squares": shaped(solution),
        "max_difference": float((fitted - solution).abs().max()),
    }
