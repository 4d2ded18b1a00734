"""Writes the deployable files of a model, one function per format; each carries the model card."""

from __future__ import annotations

import datetime
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from handlers.card import (
    CARD_FILE,
    DEFAULT_FORMATS,
    FORMAT_BY_NAME,
    ONNX_METADATA_KEY,
    TORCHSCRIPT_EXTRA_FILE,
    ModelCard,
)

OPSET = 20
MAX_BATCH = 1024  # the dynamic batch dimension's upper bound in every format


class ExportError(Exception):
    """A format that could not be written; the message says which and why, in one line."""


@dataclass(frozen=True)
class Exported:
    directory: Path
    card: ModelCard
    files: dict[str, Path]  # format name -> file

    @property
    def onnx(self) -> Path:
        return self.files["onnx"]

    @property
    def torchscript(self) -> Path:
        return self.files["ts"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stamp(card: ModelCard, source: Path | None, epoch: int | None = None) -> ModelCard:
    """The card as exported: where the weights came from, what made the files and when."""
    import onnx
    import onnxruntime

    return card.with_provenance(
        source=str(source.resolve()) if source else None,
        source_sha256=sha256(source) if source else None,
        epoch=epoch,
        torch=str(torch.__version__),
        onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def example_input(card: ModelCard, n: int = 2) -> torch.Tensor:
    """Batch sizes 0 and 1 would be specialised by torch.export: trace with 2."""
    return torch.randn(n, *card.input_shape, generator=torch.Generator().manual_seed(0))


def export_torchscript(model: torch.nn.Module, card: ModelCard, path: Path) -> None:
    """Scripted, falling back to tracing with the tracer's own check; the card rides along as an extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice: we ship it for TorchServe
        try:
            module = torch.jit.script(model)
        except Exception:
            module = torch.jit.trace(model, example_input(card), check_trace=True)
        module.save(str(path), _extra_files={TORCHSCRIPT_EXTRA_FILE: card.to_json(indent=None)})


def export_onnx(model: torch.nn.Module, card: ModelCard, path: Path) -> None:
    """The dynamo exporter with a dynamic batch dimension; checked in full before it is written."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example_input(card),),
            dynamo=True,
            input_names=[card.input_name],
            output_names=[card.output_name],
            opset_version=OPSET,
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, card.to_json(indent=None)
    proto.producer_name = "torchship"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


WRITERS: dict[str, Callable[[torch.nn.Module, ModelCard, Path], None]] = {
    "ts": export_torchscript,
    "onnx": export_onnx,
}


def export_model(
    model: torch.nn.Module,
    card: ModelCard,
    out_dir: Path | str,
    formats: Sequence[str] = DEFAULT_FORMATS,
    progress: Callable[[str], None] | None = None,
) -> Exported:
    """Every requested format of an eval-mode model into out_dir, plus the card as meta.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()  # dropout and batch norm statistics are baked into every format
    files = {}
    for name in formats:
        path = out / FORMAT_BY_NAME[name].file
        if progress:
            progress(f"writing {path.name}")
        try:
            WRITERS[name](model, card, path)
        except ExportError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ExportError(f"{name} export failed ({type(e).__name__}: {first})") from e
        files[name] = path
    (out / CARD_FILE).write_text(card.to_json())
    return Exported(out, card, files)


def export_checkpoint(
    ckpt_path: Path | str,
    out_dir: Path | str | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    *,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Exported:
    """A torchship checkpoint to out_dir (default exports/NAME): its card, stamped with where it came from."""
    from dataclasses import replace

    from export.user_model import from_checkpoint

    model, card, epoch = from_checkpoint(ckpt_path)
    card = stamp(replace(card, name=name) if name else card, Path(ckpt_path), epoch)
    return export_model(model, card, Path(out_dir or f"exports/{card.name}"), formats, progress)


def read_card(export_dir: Path | str) -> ModelCard:
    return ModelCard.load(Path(export_dir) / CARD_FILE)


def present(export_dir: Path | str) -> list[str]:
    """The formats an export directory holds, in FORMATS order."""
    return [name for name, f in FORMAT_BY_NAME.items() if (Path(export_dir) / f.file).is_file()]
