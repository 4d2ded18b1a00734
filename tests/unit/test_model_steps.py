"""A model's own step (handlers/model/steps.py) on a real step file: strings in and out, the user's errors told
apart from the client's, and a step that is not the exported file refused."""

import hashlib

import numpy as np
import pytest

from torchship.handlers.fields import CardError
from torchship.handlers.model import steps
from torchship.handlers.model.errors import InputError, SignatureError
from torchship.handlers.signature import Signature, validate_signature

STEP = """
import numpy as np


def preprocess(inputs):
    text = inputs["text"]
    if any(t == b"boom" for t in text.reshape(-1)):
        raise RuntimeError("the step broke")
    if any(t == b"" for t in text.reshape(-1)):
        raise ValueError("an empty string has no length")
    return {"lengths": np.array([[len(t)] for t in text.reshape(-1)], np.int64)}


def postprocess(outputs):
    doubled = outputs["doubled"].reshape(-1)
    if (doubled == 14).any():
        return {"answer": np.array([b"x"], object)}  # one row, whatever the request held
    return {"answer": np.array([str(int(v)).encode() for v in doubled], object)}
"""


def signature(file: str = "", sha256: str = "") -> Signature:
    return Signature(
        inputs=[{"name": "lengths", "datatype": "INT64", "shape": ["batch", 1]}],
        outputs=[{"name": "doubled", "datatype": "INT64", "shape": ["batch", 1]}],
        process={
            "file": file,
            "sha256": sha256,
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": ["batch"]}],
            "outputs": [{"name": "answer", "datatype": "BYTES", "shape": ["batch"]}],
        },
    )


@pytest.fixture
def step(tmp_path):
    (tmp_path / "process.py").write_text(STEP)
    sig = signature("process.py", hashlib.sha256(STEP.encode()).hexdigest())
    validate_signature(sig)
    return steps.load(sig, tmp_path)


def given(*texts) -> dict:
    return {"text": ("BYTES", (len(texts),), np.array(texts, object))}


def test_strings_go_through_preprocess_to_the_network_and_back_through_postprocess(step):
    rows = step.check(given("abc", b"he\x00llo"))
    assert rows.arrays["lengths"].tolist() == [[3], [6]] and rows.arrays["lengths"].dtype == np.int64
    answer = step.outputs({"doubled": rows.arrays["lengths"] * 2})
    assert answer["answer"].tolist() == [b"6", b"12"]


def test_the_steps_value_error_is_the_clients_400_anything_else_a_500_naming_the_step(step):
    with pytest.raises(InputError) as e:
        step.check(given("fine", ""))
    assert e.value.status == 400 and "preprocess: an empty string has no length" in e.value.message
    with pytest.raises(steps.StepError) as e:
        step.check(given("boom"))
    assert e.value.status == 500 and "preprocess failed: RuntimeError: the step broke" in e.value.message
    with pytest.raises(SignatureError) as e:  # checked against what clients send before the step runs
        step.check({"text": ("BYTES", (1,), np.array([7], object))})
    assert "element 0: expected a string, got int" in e.value.message


def test_a_postprocess_that_loses_rows_is_the_servers_fault(step):
    rows = step.check(given("a", "bcdefgh"))  # 7 * 2 = 14: the step answers one row for two
    with pytest.raises(steps.StepError) as e:
        step.outputs({"doubled": rows.arrays["lengths"] * 2})
    assert "postprocess gave ['answer'] without one row for each of the 2 row(s)" in e.value.message


def test_a_step_file_that_is_not_the_exported_one_or_lacks_a_declared_function_is_refused(tmp_path):
    (tmp_path / "process.py").write_text(STEP + "\n# changed after export\n")
    with pytest.raises(CardError, match="not the file that was exported"):
        steps.load(signature("process.py", hashlib.sha256(STEP.encode()).hexdigest()), tmp_path)
    only_pre = STEP.split("def postprocess")[0]
    (tmp_path / "process.py").write_text(only_pre)
    with pytest.raises(CardError, match="postprocess is missing but process.outputs declares what it gives"):
        steps.load(signature("process.py", hashlib.sha256(only_pre.encode()).hexdigest()), tmp_path)


def test_bytes_belong_to_a_step_never_to_the_network():
    sig = Signature(
        inputs=[{"name": "text", "datatype": "BYTES", "shape": ["batch"]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": ["batch", 1]}],
    )
    with pytest.raises(CardError, match="strings go through a model's own step"):
        validate_signature(sig)


@pytest.mark.parametrize("truncate", [True, False])
def test_a_text_past_the_longest_sequence_is_cut_or_refused_as_the_card_says(tmp_path, truncate):
    from text_models import build_tokenizer

    from torchship.handlers.signature import Text

    path = build_tokenizer(tmp_path / "tokenizer.json")
    token = {"datatype": "INT64", "shape": ["batch", "sequence"], "pad": 0}
    sig = Signature(
        inputs=[{"name": "input_ids", **token}, {"name": "attention_mask", **token, "mask": True}],
        outputs=[{"name": "logits", "datatype": "FP32", "shape": ["batch", 2]}],
        dims={"sequence": [1, 8]},
        text=Text(
            task="classify",
            labels=("no", "yes"),
            truncate=truncate,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        ),
    )
    validate_signature(sig)
    step = steps.load(sig, tmp_path)
    text = "train export serve " * 10
    if not truncate:
        with pytest.raises(InputError) as e:
            step.check({"text": ("BYTES", (2,), np.array([b"short", text.encode()], object))})
        assert e.value.status == 413 and "row 1: 32 tokens, more than the 8 this model takes" in e.value.message
        return
    rows = step.check({"text": ("BYTES", (2,), np.array([b"short", text.encode()], object))})
    ids, mask = rows.arrays["input_ids"], rows.arrays["attention_mask"]
    assert ids.shape == (2, 8) and mask[1].tolist() == [1] * 8  # the long one cut to 8, [CLS] ... [SEP]
    assert mask[0].sum() < 8 and (ids[0][mask[0] == 0] == 0).all()  # the short one padded with [PAD], masked
