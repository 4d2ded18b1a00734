"""A model's own step (`torchship export --process`) outside the OIP server: Triton's string models in TorchServe from
their archives, and embedded in an app with onnxruntime alone; the export's refusals. (The OIP server's side is
tests/test_triton_clients.py, with tritonclient.)"""

import json
import os
import subprocess

import pytest

from torchship.serve import torchserve
from torchship.serve.shipping import copy_runtime

from helpers import cli_error, no_torch, torchserve_of
from helpers import post_json as post

STRING_MODELS = ("simple_string", "simple_identity")


@pytest.fixture(scope="module")
def exports(triton_exports):
    return {name: triton_exports(name) for name in STRING_MODELS}


def test_torchserve_runs_the_step_from_the_archive_on_json_and_v2_requests(tmp_path_factory, exports, bare_python):
    """The archive carries the step file; TorchServe's worker (a Python without torchship) runs it: TorchServe's
    JSON of one example, a v2 request with BYTES, and the step's ValueError as the request's own 400."""
    with torchserve_of(tmp_path_factory, exports, bare_python) as cfg:
        headers = torchserve.headers(cfg.state_dir)
        body = {"inputs": {"INPUT0": [str(i) for i in range(16)], "INPUT1": ["1"] * 16}}
        status, answer = post(cfg.inference_port, "/predictions/simple_string", body, headers)
        assert status == 200, answer
        assert answer["outputs"] == {
            "OUTPUT0": [str(i + 1) for i in range(16)],
            "OUTPUT1": [str(i - 1) for i in range(16)],
        }
        sent = ["a", "he\x00llo", "caf\u00e9", ""]
        v2 = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 4], "data": sent}]}
        status, answer = post(cfg.inference_port, "/predictions/simple_identity", v2, headers)
        assert status == 200, answer
        assert answer["outputs"][0]["datatype"] == "BYTES" and answer["outputs"][0]["data"] == sent
        body["inputs"]["INPUT1"][5] = "five"
        status, answer = post(cfg.inference_port, "/predictions/simple_string", body, headers)
        assert status == 400 and "preprocess" in answer["error"] and "five" in answer["error"], answer


def test_an_app_without_torch_gets_the_same_strings_through_the_step(exports, bare_python, tmp_path):
    app = tmp_path / "app"
    copy_runtime(app)
    code = f"""
import json
import numpy as np
from torchship_handlers.model.onnx_model import load
s = load({str(exports["simple_string"] / "model.onnx")!r})
out = s.predict({{"INPUT0": [[str(i) for i in range(16)]], "INPUT1": [["2"] * 16]}})
i = load({str(exports["simple_identity"] / "model.onnx")!r})
back = i.predict({{"INPUT0": np.array([[b"\\xff\\x00", "\\u00e9".encode()]], object)}})
print(json.dumps({{"sum": [v.decode() for v in out["OUTPUT0"][0]], "back": [v.hex() for v in back["OUTPUT0"][0]]}}))
"""
    env = {**os.environ, "PYTHONPATH": f"{no_torch(tmp_path / 'blocker')}{os.pathsep}{app}"}
    r = subprocess.run([bare_python, "-c", code], capture_output=True, text=True, cwd=app, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sum"] == [str(i + 2) for i in range(16)]
    assert out["back"] == [b"\xff\x00".hex(), "\u00e9".encode().hex()]


def test_export_refuses_a_step_the_signature_does_not_declare_and_a_declared_step_without_its_file(
    monkeypatch, tmp_path
):
    import torch

    (tmp_path / "m.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2\n"
        'SIG = {"inputs": [{"name": "x", "datatype": "FP32", "shape": ["batch", 2]}],\n'
        '       "outputs": [{"name": "y", "datatype": "FP32", "shape": ["batch", 2]}]}\n'
        'STEP = {**SIG, "process": {"inputs": [{"name": "t", "datatype": "BYTES", "shape": ["batch"]}]}}\n'
    )
    (tmp_path / "step.py").write_text("def preprocess(inputs):\n    return inputs\n")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    torch.save({}, tmp_path / "w.pt")
    common = ["export", "--model", f"{tmp_path / 'm.py'}:M", "--weights", tmp_path / "w.pt", "--out", tmp_path / "o"]
    code, errors, _ = cli_error(
        monkeypatch, tmp_path, *common, "--signature", f"{tmp_path / 'm.py'}:SIG", "--process", tmp_path / "step.py"
    )
    assert code == 1 and "declare what it takes and gives in the signature's process" in errors[0], errors
    code, errors, _ = cli_error(monkeypatch, tmp_path, *common, "--signature", f"{tmp_path / 'm.py'}:STEP")
    assert code == 1 and "give its file with --process FILE.py" in errors[0], errors
    code, errors, _ = cli_error(
        monkeypatch, tmp_path, *common, "--signature", f"{tmp_path / 'm.py'}:STEP", "--process", tmp_path / "broken.py"
    )
    assert code == 1 and "does not load: ModuleNotFoundError" in errors[0], errors
    assert not (tmp_path / "o").exists()


WARM_UP_FAILS = """
import numpy as np


def postprocess(outputs):
    y = outputs["y"]
    if not y.any():  # the warm-up's zeros: a step with a bug that only the warm-up's input meets
        raise RuntimeError("cannot answer zeros")
    return {"words": np.array([" ".join(map(str, row)).encode() for row in y], dtype=object)}


def examples():
    return [{"x": np.array([[1.0, 2.0]], np.float32)}]
"""


def test_a_step_that_fails_its_warm_up_fails_the_start_saying_so(tmp_path):
    """The server warms every model up (a full batch of zeros through the network and the step) before it says it is
    ready: a step that fails there stops the start with its error, rather than a server that fails every request."""
    from torchship.serve import oip
    from torchship.serve.process import ServerError

    from helpers import export_user_model

    (tmp_path / "step.py").write_text(WARM_UP_FAILS)
    source = (
        "import torch\n"
        "class Double(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2\n"
        'SIG = {"inputs": [{"name": "x", "datatype": "FP32", "shape": ["batch", 2]}],\n'
        '       "outputs": [{"name": "y", "datatype": "FP32", "shape": ["batch", 2]}],\n'
        '       "process": {"outputs": [{"name": "words", "datatype": "BYTES", "shape": ["batch"]}]}}\n'
    )
    r, out = export_user_model(tmp_path, source, "double", "Double", "SIG", "--process", tmp_path / "step.py")
    assert r.returncode == 0, r.stderr[-2000:]  # the proof's examples pass through the step
    cfg = oip.OIPConfig.on_free_ports(str(out), "double", str(tmp_path / "state"), workers=1, max_batch=4, threads=1)
    try:
        with pytest.raises(ServerError) as e:
            oip.start(cfg, timeout=120)
        assert "postprocess failed: RuntimeError: cannot answer zeros" in str(e.value), str(e.value)[-2000:]
    finally:
        oip.stop(tmp_path / "state")
