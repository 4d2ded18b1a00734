"""Writes the deployable files of a model, one function per format; each carries the model card."""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from torchship.export import vision
from torchship.export.inputs import calibration_images, draw, example_dims
from torchship.export.user_model import from_checkpoint
from torchship.handlers.card import CARD_FILE, ONNX_METADATA_KEY, TORCHSCRIPT_EXTRA_FILE, CardError, ModelCard
from torchship.handlers.formats import DEFAULT_FORMATS, FORMAT_BY_NAME, digest

OPSET = 20
MAX_BATCH = 1024  # the dynamic batch dimension's upper bound in every format


class ExportError(Exception):
    """A format that could not be written; the message says which and why, in one line."""


@dataclass(frozen=True)
class Options:
    """What some formats need beyond the model and its card."""

    data_dir: Path | str = "data"  # int8 calibrates on the card's dataset's training split when it is here
    calibration: Path | str | None = None  # or on the images in this directory
    process: Path | str | None = None  # the model's own step file (signature.process), copied beside the model
    tokenizer: Path | str | None = None  # a text model's tokenizer.json (signature.text), copied beside the model


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
    """A file's digest, as the runtime checks a proof's (handlers/repository.py)."""
    return digest(path)


def next_version(out_dir: Path | str, name: str) -> str:
    """An export's version when none is given: one past the newest of the same model it replaces or stands beside
    (a repository's NAME/1, NAME/2, ...), else 1."""
    out = Path(out_dir)
    versions = []
    for folder in (out, *out.parent.glob("*")):
        try:
            card = read_card(folder)
        except CardError:
            continue
        if card.name == name:
            versions.append(int(card.version))
    return str(max(versions) + 1) if versions else "1"


def stamp(card: ModelCard, source: Path | None, epoch: int | None = None, version: str | None = None) -> ModelCard:
    """The card as exported: which version, where the weights came from, what made the files and when."""
    card = replace(card, version=version) if version else card
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
    """Batch sizes 0 and 1 would be specialised by torch.export: trace with 2 (a detector takes one image a pass)."""
    n = 1 if card.task == "detect" else n
    return torch.randn(n, *card.input_shape, generator=torch.Generator().manual_seed(0))


def example_args(card: ModelCard) -> tuple[torch.Tensor, ...]:
    """What every format traces or exports with: the one batch, or every named input (export/named.py)."""
    if card.named:
        return named_args(card)
    return (example_input(card),)


def dynamic_shapes(card: ModelCard) -> tuple[dict, ...]:
    """The batch is dynamic in every format; named inputs' named dimensions too, over their declared ranges."""
    if card.named:
        return named_shapes(card, batch_dim())
    return ({0: batch_dim()},)


def named_args(card: ModelCard) -> tuple[torch.Tensor, ...]:
    """Two examples at EXAMPLE_LENGTH, in the signature's input order: what every format traces or exports with."""
    feeds = draw(card.signature, 2, example_dims(card.signature))
    return tuple(torch.from_numpy(feeds[t.name]) for t in card.signature.inputs)


def named_shapes(card: ModelCard, batch: torch.export.Dim) -> tuple[dict, ...]:
    """torch.export's Dim for the batch and each named dimension, shared by every input that has it; one entry, for
    the wrapper's *inputs (user_model.Signed)."""
    sig = card.signature
    named = {d: torch.export.Dim(d, min=low, max=high) for d, (low, high) in sig.dims.items() if low < high}
    return (
        tuple(
            {
                axis: batch if axis == 0 else named[d]
                for axis, d in enumerate(t.shape)
                if axis == 0 or (isinstance(d, str) and d in named)
            }
            for t in sig.inputs
        ),
    )


def io_names(card: ModelCard) -> tuple[list[str], list[str]]:
    if card.task == "detect":
        return [card.input_name], list(vision.DETECTOR_OUTPUTS)
    if card.named:
        return [t.name for t in card.signature.inputs], [t.name for t in card.signature.outputs]
    return [card.input_name], [card.output_name]


def export_torchscript(model: torch.nn.Module, card: ModelCard, path: Path, options: Options) -> None:
    """Scripted, falling back to tracing with the tracer's own check; the card rides along as an extra file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice: we ship it for TorchServe
        try:
            if card.named:  # a wrapper taking *inputs: scripting cannot type it, tracing records it
                raise TypeError
            module = torch.jit.script(model)
        except Exception:
            module = torch.jit.trace(model, example_args(card), check_trace=True)
        module.save(str(path), _extra_files={TORCHSCRIPT_EXTRA_FILE: card.to_json(indent=None)})


def export_onnx(model: torch.nn.Module, card: ModelCard, path: Path, options: Options) -> None:
    """The dynamo exporter with a dynamic batch dimension; checked in full before it is written."""
    inputs, outputs = io_names(card)
    if card.task == "detect":
        return write_onnx_with_card(vision.onnx_proto(model, card), card, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example_args(card),
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            dynamic_shapes=dynamic_shapes(card),
            optimize=True,
            verbose=False,
        )
    write_onnx_with_card(program.model_proto, card, path)


def batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def export_pt2(model: torch.nn.Module, card: ModelCard, path: Path, options: Options) -> None:
    """torch.export with a dynamic batch, compiled and packaged by AOTInductor; loading it needs no compiler.

    The package is machine code for this CPU's instruction set (its metadata says which): build it on the
    kind of machine that will run it."""
    import torch._inductor  # lazily: 2 s over torch, paid only by a pt2 export

    if card.task == "detect":
        raise ExportError(
            "pt2 cannot hold a detector: torch.export cannot trace non-maximum suppression's data-dependent sizes "
            "(pytorch/vision#9306); export ts and onnx"
        )
    if not (shutil.which("g++") or shutil.which("c++")):
        raise ExportError("pt2 needs a C++ compiler (g++) at export time, and none is on PATH")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime": not news on a CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, example_args(card), dynamic_shapes=dynamic_shapes(card))
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the package's folder is named after its file
            built = Path(tmp) / path.name
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(built),
                inductor_configs={"aot_inductor.metadata": {ONNX_METADATA_KEY: card.to_json(indent=None)}},
            )
            built.replace(path)


def int8_calibration(card: ModelCard, options: Options):
    from onnxruntime.quantization import CalibrationDataReader  # lazily: 0.4 s, paid only by an int8 export

    images, source = calibration_images(card, options.data_dir, options.calibration)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(images, max(1, len(images) // 64)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {card.input_name: np.ascontiguousarray(batch)}

    return Reader(), source


def export_int8(model: torch.nn.Module, card: ModelCard, path: Path, options: Options) -> None:
    """ONNX Runtime static quantization of the float ONNX model: QDQ, per-channel int8 weights, uint8
    activations with reduce_range (right on CPUs without VNNI, harmless on those with it), calibrated on
    training images only. The classifier head stays float32: it is tiny, and where two classes are close it
    decides between them (bench/NOTES.md, int8)."""
    # lazily: 0.4 s, paid only by an int8 export
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if card.named:
        return export_int8_dynamic(model, card, path, options)
    if card.task != "classify":
        raise ExportError(
            f"int8 is for classifiers (it is judged by top-1 agreement); {card.name} is a {card.task} model"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = prepared_float(model, card, path, options, tmp)
        graph = onnx.load(str(prepared)).graph
        head = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
        reader, source = int8_calibration(card, options)
        quantize_static(
            str(prepared),
            str(tmp / "int8.onnx"),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=head,
        )
        proto = onnx.load(str(tmp / "int8.onnx"))
    write_onnx_with_card(proto, card, path, source)


def prepared_float(
    model: torch.nn.Module, card: ModelCard, path: Path, options: Options, tmp: Path, *, symbolic: bool = True
) -> Path:
    """The float ONNX model written beside PATH (or exported into TMP when it was not asked for), through ONNX
    Runtime's pre-processing for quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # lazily: paid only by an int8 export

    float_model = path.with_name(FORMAT_BY_NAME["onnx"].file)
    if not float_model.is_file():
        float_model = tmp / "float.onnx"
        export_onnx(model, card, float_model, options)
    prepared = tmp / "prepared.onnx"
    quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=not symbolic)
    return prepared


def export_int8_dynamic(model: torch.nn.Module, card: ModelCard, path: Path, options: Options) -> None:
    """A text classifier (named inputs, a tokenizer): ONNX Runtime's dynamic quantization, as its docs advise for
    transformers: int8 weights per channel, activations quantized per call from their own range, so nothing is
    calibrated; reduce_range for CPUs without VNNI, as the static path. Judged by top-1 agreement
    (proof/agreement.py)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # lazily: paid only by an int8 export

    if not (card.signature.text and card.signature.text.task == "classify"):
        raise ExportError(
            "int8 of a model with named inputs is for text classifiers (--tokenizer --text-task classify: it is judged "
            "by top-1 agreement); export ts, onnx or pt2"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the symbolic shape pass fails on torch's dynamo graphs of transformers ("Incomplete symbolic shape
        # inference"); ONNX's own shape inference and the graph optimisation still run
        prepared = prepared_float(model, card, path, options, tmp, symbolic=False)
        quantize_dynamic(
            str(prepared), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
        )
        proto = onnx.load(str(tmp / "int8.onnx"))
    write_onnx_with_card(proto, card, path, "dynamic: int8 weights per channel, activations per call (no calibration)")


def write_onnx_with_card(proto, card: ModelCard, path: Path, calibration: str | None = None) -> None:
    """The card in the model's own metadata (and, for int8, what it was calibrated on), checked in full, written."""
    ours = {ONNX_METADATA_KEY, "torchship_calibration"}  # a quantized copy carries its float model's: replaced
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in ours]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    extra = (("torchship_calibration", calibration),) if calibration is not None else ()
    for key, value in ((ONNX_METADATA_KEY, card.to_json(indent=None)), *extra):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "torchship"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


WRITERS: dict[str, Callable[[torch.nn.Module, ModelCard, Path, Options], None]] = {
    "ts": export_torchscript,
    "onnx": export_onnx,
    "pt2": export_pt2,
    "int8": export_int8,
}


def export_model(
    model: torch.nn.Module,
    card: ModelCard,
    out_dir: Path | str,
    formats: Sequence[str] = DEFAULT_FORMATS,
    *,
    progress: Callable[[str], None] | None = None,
    options: Options = Options(),
) -> Exported:
    """Every requested format of an eval-mode model into out_dir, plus the card as meta.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()  # dropout and batch norm statistics are baked into every format
    files = {}
    for name in sorted(set(formats), key=list(FORMAT_BY_NAME).index):  # int8 quantizes the ONNX file
        path = out / FORMAT_BY_NAME[name].file
        if progress:
            progress(f"writing {path.name}")
        try:
            WRITERS[name](model, card, path, options)
        except ExportError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ExportError(f"{name} export failed ({type(e).__name__}: {first})") from e
        files[name] = path
    step = card.signature.process if card.named else None
    if step:
        if options.process is None or digest(options.process) != step.sha256:
            raise ExportError(f"the card's step {step.file} needs its file, as named_model read it (Options.process)")
        shutil.copyfile(options.process, out / step.file)
    text = card.signature.text if card.named else None
    if text:
        if options.tokenizer is None or digest(options.tokenizer) != text.sha256:
            raise ExportError("the card's tokenizer needs its file, as named_model read it (Options.tokenizer)")
        shutil.copyfile(options.tokenizer, out / text.tokenizer)
    (out / CARD_FILE).write_text(card.to_json())
    return Exported(out, card, files)


def export_checkpoint(
    ckpt_path: Path | str,
    out_dir: Path | str | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    *,
    name: str | None = None,
    version: str | None = None,
    progress: Callable[[str], None] | None = None,
    options: Options = Options(),
) -> Exported:
    """A torchship checkpoint to out_dir (default exports/NAME): its card, stamped with its version (default:
    next_version) and where it came from."""
    model, card, epoch = from_checkpoint(ckpt_path)
    card = replace(card, name=name) if name else card
    out = Path(out_dir or f"exports/{card.name}")
    card = stamp(card, Path(ckpt_path), epoch, version or next_version(out, card.name))
    return export_model(model, card, out, formats, progress=progress, options=options)


def read_card(export_dir: Path | str) -> ModelCard:
    return ModelCard.load(Path(export_dir) / CARD_FILE)


def present(export_dir: Path | str) -> list[str]:
    """The formats an export directory holds, in FORMATS order."""
    return [name for name, f in FORMAT_BY_NAME.items() if (Path(export_dir) / f.file).is_file()]
