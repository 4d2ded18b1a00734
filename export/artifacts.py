"""Writes the deployable files of a checkpoint: model.ts.pt, model.onnx and meta.json."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from train import checkpoint

OUTPUT_NAMES = {"logits": "logits", "log-probabilities": "log_probs", "image": "reconstruction"}
INPUT_NAME = "images"
OPSET = 20
META_KEY = "torchship"  # ONNX metadata_props key holding meta.json's text


@dataclass
class Exported:
    directory: Path
    torchscript: Path
    onnx: Path
    meta: dict


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_meta(ckpt: dict, ckpt_path: Path) -> dict:
    import onnx
    import onnxruntime

    m = ckpt["meta"]
    return {
        "preset": m["preset"],
        "arch": m["arch"],
        "arch_kwargs": m["arch_kwargs"],
        "task": m["task"],
        "input_shape": m["input_shape"],
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAMES[m["output_kind"]],
        "output_kind": m["output_kind"],
        "mean": m["mean"],
        "std": m["std"],
        "labels": m["labels"],
        "preprocess": m["preprocess"],
        "dataset": m["dataset"],
        "metrics": m.get("metrics", {}),
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": sha256(ckpt_path),
        "checkpoint_epoch": ckpt["epoch"],
        "opset": OPSET,
        "versions": {
            "torch": str(torch.__version__),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def export_torchscript(model: torch.nn.Module, meta: dict, path: Path) -> None:
    """Scripted, falling back to tracing with the tracer's own check; meta.json rides along as an extra file."""
    example = torch.randn(2, *meta["input_shape"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice: we ship it for TorchServe
        try:
            scripted = torch.jit.script(model)
        except Exception:
            scripted = torch.jit.trace(model, example, check_trace=True)
        scripted.save(str(path), _extra_files={"meta.json": json.dumps(meta)})


def export_onnx(model: torch.nn.Module, meta: dict, path: Path) -> None:
    """The dynamo exporter with a dynamic batch dimension; checked in full before it is written."""
    import onnx

    example = torch.randn(2, *meta["input_shape"])  # batch sizes 0 and 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[meta["input_name"]],
            output_names=[meta["output_name"]],
            opset_version=OPSET,
            dynamic_shapes={"x": {0: batch}},
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    proto.producer_name = "torchship"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_checkpoint(ckpt_path: Path | str, out_dir: Path | str) -> Exported:
    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    ckpt = checkpoint.load(ckpt_path)
    model = checkpoint.model_from_checkpoint(ckpt)  # eval(): dropout is baked out of both exports
    meta = build_meta(ckpt, ckpt_path)
    out.mkdir(parents=True, exist_ok=True)
    ts, onnx_path = out / "model.ts.pt", out / "model.onnx"
    export_torchscript(model, meta, ts)
    export_onnx(model, meta, onnx_path)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return Exported(out, ts, onnx_path, meta)
