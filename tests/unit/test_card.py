"""The model card: one typed contract; every bad field is named, old meta dicts still load."""

import json
import subprocess
import sys

import pytest

from torchship.handlers.card import CardError, ModelCard

from helpers import card

LEGACY_EXPORT_META = {  # meta.json as torchship wrote it before the card (stop 7)
    "preset": "mnist-convnet",
    "arch": "convnet",
    "arch_kwargs": {},
    "task": "classify",
    "input_shape": [1, 28, 28],
    "input_name": "images",
    "output_name": "log_probs",
    "output_kind": "log-probabilities",
    "mean": 0.1302,
    "std": 0.3069,
    "labels": [str(i) for i in range(10)],
    "preprocess": "mnist-digit",
    "dataset": "mnist-5k",
    "metrics": {"test_accuracy": 0.97},
    "checkpoint": "/x/best.pt",
    "checkpoint_sha256": "ab" * 32,
    "checkpoint_epoch": 7,
    "opset": 20,
    "versions": {"torch": "2.14.1", "onnx": "1.23", "onnxruntime": "1.32"},
}


def test_round_trip_through_json_is_exact():
    c = card(metrics={"test_accuracy": 0.98}, dataset="mnist-5k")
    again = ModelCard.from_json(c.to_json())
    assert again == c and again.to_dict() == c.to_dict()
    assert again.mean == (0.1302,) and again.input_shape == (1, 28, 28) and again.output_name == "log_probs"


def test_card_module_imports_nothing_but_the_standard_library():
    code = (
        "import sys, torchship.handlers.card; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]"


def test_legacy_meta_of_old_exports_and_checkpoints_loads():
    c = ModelCard.from_dict(LEGACY_EXPORT_META)
    assert c.name == "mnist-convnet" and c.architecture.spec == "torchship.train.models:ConvNet"
    assert c.provenance.epoch == 7 and c.provenance.source_sha256 == "ab" * 32 and c.mean == (0.1302,)
    assert c.output_name == "log_probs" and c.metrics["test_accuracy"] == 0.97


@pytest.mark.parametrize(
    "change,field,says",
    [
        ({"name": "../../../tmp/x"}, "name", "safe name"),
        ({"name": "a/b"}, "name", "safe name"),
        ({"name": ""}, "name", "safe name"),
        ({"task": "sort"}, "task", "classify"),
        ({"task": "detect"}, "output_kind", "cannot output"),
        ({"thresholds": {"score": 0.5}}, "thresholds", "a detector's"),
        (
            {"task": "detect", "output_kind": "detections", "preprocess": "letterbox", "labels": ["bg", "a"]},
            "thresholds",
            "score and iou",
        ),
        (
            {"task": "segment", "output_kind": "logits", "preprocess": "letterbox", "labels": ["a"]},
            "labels",
            "background",
        ),
        ({"task": "segment", "output_kind": "logits", "labels": ["a", "b"]}, "preprocess", "letterbox"),
        ({"output_kind": "image"}, "output_kind", "cannot output"),
        ({"input_shape": [1, 28]}, "input_shape", "three integers"),
        ({"input_shape": [2, 28, 28]}, "input_shape", "channels"),
        ({"mean": [0.1, 0.2]}, "mean", "2 values for 1 channel"),
        ({"std": [0.0]}, "std", "positive"),
        ({"std": "wide"}, "std", "list"),
        ({"labels": ["a", "a"]}, "labels", "duplicate"),
        ({"labels": []}, "labels", "at least one"),
        ({"preprocess": "magic"}, "preprocess", "mnist-digit"),
        ({"input_shape": [3, 28, 28], "mean": [0, 0, 0], "std": [1, 1, 1]}, "preprocess", "1-channel"),
        ({"schema_version": 99}, "schema_version", "newer"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"architecture": {"spec": "x"}}, "architecture.spec", "module:callable"),
        ({"provenance": {"sha": 1}}, "provenance.sha", "unknown field"),
    ],
)
def test_every_bad_field_is_named(change, field, says):
    d = {**card().to_dict(), **change}
    with pytest.raises(CardError) as e:
        ModelCard.from_dict(d)
    assert e.value.field == field and says in str(e.value) and f"'{field}'" in str(e.value)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"arch": "resnet"}, "arch"),
        ({"preset": "../../../tmp/x"}, "name"),
        ({"labels": None}, "labels"),
    ],
)
def test_untrusted_legacy_meta_is_refused_with_the_field(change, field):
    d = {**LEGACY_EXPORT_META, **change}
    with pytest.raises(CardError) as e:
        ModelCard.from_dict(d)
    assert e.value.field == field


def test_missing_legacy_key_is_named():
    d = dict(LEGACY_EXPORT_META)
    del d["labels"]
    with pytest.raises(CardError) as e:
        ModelCard.from_dict(d)
    assert e.value.field == "labels" and "missing" in str(e.value)


def test_resize_crop_defaults_to_torchvisions_ratio():
    c = card(input_shape=(3, 224, 224), mean=[0.5] * 3, std=[0.5] * 3, preprocess="resize-crop", output_kind="logits")
    assert c.resize == 256
    with pytest.raises(CardError) as e:
        card(input_shape=(3, 224, 224), mean=0.5, std=0.5, preprocess="resize-crop", output_kind="logits", resize=100)
    assert e.value.field == "resize"


def test_not_json_is_one_clear_error(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CardError) as e:
        ModelCard.load(tmp_path)
    assert "not valid JSON" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CardError):
        ModelCard.from_json(json.dumps([1, 2]))
