"""Kubernetes bundles: every manifest checked key by key against the kserve SDK's classes; the custom container's
own command run here (Docker cannot run on this machine), with torch made unimportable."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import yaml

from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve.deploy import CACHE_MOUNT, Scaling, inference_service
from torchship.serve.process import free_ports
from torchship.serve.samples import held_out_digits, png

from helpers import ROOT, TORCHSHIP, no_torch


def validated(*docs) -> list[list[str]]:
    """serve.deploy.validate on each manifest, in a process of its own: kserve's gRPC protos and tritonclient's
    (which test_kserve.py imports) both define the package `inference`, and one process cannot load both."""
    code = (
        "import json, sys; from torchship.serve.deploy import validate; "
        "print(json.dumps([validate(d) for d in json.load(sys.stdin)]))"
    )
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(docs), capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def deploy(export_dir, out, *args):
    return subprocess.run(
        [*TORCHSHIP, "deploy", "kserve", str(export_dir), "--out", str(out), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_torchserve_bundle_has_kserves_layout_and_a_valid_inference_service(convnet_export, tmp_path):
    out = tmp_path / "bundle"
    r = deploy(
        convnet_export.directory,
        out,
        "--storage-uri",
        "s3://models/digits",
        "--protocol",
        "v2",
        "--min-replicas",
        2,
        "--max-replicas",
        5,
        "--scale-metric",
        "rps",
        "--scale-target",
        40,
        "--cpu",
        "2",
        "--memory",
        "2Gi",
    )
    assert r.returncode == 0, r.stderr
    assert (out / "config" / "config.properties").is_file() and (out / "model-store" / "mnist-convnet.mar").is_file()
    assert "meta.json" in zipfile.ZipFile(out / "model-store" / "mnist-convnet.mar").namelist()
    props = (out / "config" / "config.properties").read_text()
    assert "model_store=/mnt/models/model-store" in props and "enable_model_api=false" in props
    doc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert validated(doc) == [[]]
    predictor = doc["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleMetric"], predictor["scaleTarget"]) == (
        2,
        5,
        "rps",
        40,
    )
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/digits" and model["resources"]["limits"] == {"cpu": "2", "memory": "2Gi"}


def test_oip_bundle_has_a_torch_free_dockerfile_and_a_custom_container_sized_for_what_a_pod_batches(
    convnet_export, tmp_path
):
    out = tmp_path / "bundle"
    r = deploy(convnet_export.directory, out, "--runtime", "kserve", "--image", "registry.example/digits:1", "--cpu", 4)
    assert r.returncode == 0, r.stderr
    docker = (out / "Dockerfile").read_text()
    requirements = (out / "requirements.txt").read_text()
    assert "torch" not in requirements.replace("no torch", "") and "kserve==" in requirements
    assert "onnxruntime==" in requirements and "COPY model/ /mnt/models/" in docker
    assert sorted(p.name for p in (out / "model").iterdir()) == ["meta.json", "model.onnx"]
    doc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert validated(doc) == [[]]
    (container,) = doc["spec"]["predictor"]["containers"]
    assert container["image"] == "registry.example/digits:1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/mnist-convnet/ready"
    cmd = json.loads(docker.split("CMD ", 1)[1])
    workers = int(cmd[cmd.index("--workers") + 1])
    assert workers == 2  # 4 CPUs, a worker per two
    (mount,) = container["volumeMounts"]  # the server's cache survives a restarted container
    assert cmd[cmd.index("--cache_dir") + 1] == mount["mountPath"] == CACHE_MOUNT
    assert {"name": mount["name"], "emptyDir": {}} in doc["spec"]["predictor"]["volumes"]
    predictor, note = doc["spec"]["predictor"], doc["metadata"]["annotations"]["torchship.dev/capacity"]
    batch = int(re.search(r"batches of (\d+)", note).group(1))
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] == workers * batch
    assert predictor["containerConcurrency"] == 2 * workers * batch and "ms at batch 1" in note


def test_a_canary_rollout_is_kserves_canary_traffic_percent_and_validates(convnet_export, tmp_path):
    out = tmp_path / "bundle"
    r = deploy(convnet_export.directory, out, "--runtime", "oip", "--canary-traffic-percent", 10)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    wrong = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    wrong["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    good, bad = validated(doc, wrong)  # one process: importing kserve takes seconds
    assert doc["spec"]["predictor"]["canaryTrafficPercent"] == 10 and good == []
    assert any("expected int" in p for p in bad)
    assert deploy(convnet_export.directory, tmp_path / "b", "--canary-traffic-percent", 101).returncode == 2


MISTAKES = {
    "indent": "belongs under model",  # how KServe's TorchServe docs page indents protocolVersion and storageUri
    "typo": "did you mean minReplicas",
    "container name": "V1Container",
    "type": "expected int",
    "no predictor": "predictor",
}


def with_mistake(mistake: str) -> dict:
    model = {"modelFormat": {"name": "pytorch"}, "protocolVersion": "v2", "storageUri": "s3://x"}
    doc = inference_service("digits", {"model": model}, Scaling())
    predictor = doc["spec"]["predictor"]
    if mistake == "indent":
        predictor["protocolVersion"] = model.pop("protocolVersion")
        predictor["storageUri"] = model.pop("storageUri")
    elif mistake == "typo":
        predictor["minReplica"] = predictor.pop("minReplicas")
    elif mistake == "container name":
        predictor["containers"] = [{"image": "x"}]
    elif mistake == "type":
        predictor["scaleTarget"] = "eight"
    else:
        doc["spec"] = {}
    return doc


def test_a_manifest_with_a_mistake_does_not_validate():
    results = validated(*(with_mistake(m) for m in MISTAKES))
    for (mistake, words), problems in zip(MISTAKES.items(), results):
        assert problems and any(words in p for p in problems), (mistake, problems)


@contextlib.contextmanager
def container(out, tmp_path, bare_python, model: str):
    """What `docker run` would start, run here from the bundle's own files under a Python where torchship is not
    installed and `import torch` fails; its REST port once the model is ready."""
    import tritonclient.http as thttp

    cmd = json.loads((out / "Dockerfile").read_text().split("CMD ", 1)[1])
    http_port, grpc_port = free_ports(2)
    swap = {"/mnt/models": str(out / "model"), "0.0.0.0": "127.0.0.1", "8080": str(http_port), "8081": str(grpc_port)}
    swap[CACHE_MOUNT] = str(tmp_path / "cache")
    cmd = [str(bare_python) if a == "python" else swap.get(a, a) for a in cmd]
    env = {**os.environ, "PYTHONPATH": f"{no_torch(tmp_path / 'blocker')}{os.pathsep}{out}"}
    proc = subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        client = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.is_model_ready(model):
                    break
            except Exception:
                pass
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        yield client
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_containers_command_serves_the_bundle_without_torch(convnet_export, tmp_path, bare_python):
    import tritonclient.http as thttp

    out = tmp_path / "bundle"
    assert deploy(convnet_export.directory, out, "--runtime", "kserve").returncode == 0
    with container(out, tmp_path, bare_python, "mnist-convnet") as client:
        inp = thttp.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array([png(held_out_digits()[0][0])], dtype=object))
        assert [x.decode() for x in client.infer("mnist-convnet", [inp]).as_numpy("label")] == ["0"]


def test_a_bundle_of_a_model_with_named_inputs_serves_every_output_by_name(tmp_path, bare_python, shop_export):
    import tritonclient.http as thttp

    directory = shop_export
    out = tmp_path / "bundle"
    run = deploy(directory, out, "--runtime", "kserve")
    assert run.returncode == 0, run.stderr
    rng = np.random.default_rng(4)
    dense, ids = rng.uniform(-3, 3, (3, 13)).astype(np.float32), rng.integers(0, 10, (3, 2))
    want = load_onnx(directory / "model.onnx").predict({"dense": dense, "ids": ids})
    with container(out, tmp_path, bare_python, "shop") as client:
        meta = client.get_model_metadata("shop")
        assert [i["name"] for i in meta["inputs"]] == ["dense", "ids"]
        inputs = [thttp.InferInput("dense", [3, 13], "FP32"), thttp.InferInput("ids", [3, 2], "INT64")]
        inputs[0].set_data_from_numpy(dense)
        inputs[1].set_data_from_numpy(ids)
        result = client.infer("shop", inputs)
        for name, y in want.items():
            assert np.allclose(result.as_numpy(name), y, rtol=1e-5, atol=1e-6), name


def test_bundles_carry_a_tokenizer_and_a_step_that_their_containers_run(
    tmp_path, bare_python, text_exports, triton_exports
):
    """A text model's tokenizer.json and a model's own process.py go into the bundle's model folder, and the
    container (a Python without torchship) answers text and strings with them."""
    import tritonclient.http as thttp

    sentences = text_exports["sentences"]
    out = tmp_path / "text-bundle"
    run = deploy(sentences, out, "--runtime", "kserve")
    assert run.returncode == 0, run.stderr
    assert (out / "model" / "tokenizer.json").read_bytes() == (sentences / "tokenizer.json").read_bytes()
    want = load_onnx(sentences / "model.onnx").predict(["a text to embed", "and another"])["embedding"]
    with container(out, tmp_path / "text", bare_python, "sentences") as client:
        x = thttp.InferInput("text", [2], "BYTES")
        x.set_data_from_numpy(np.array([b"a text to embed", b"and another"], dtype=object))
        np.testing.assert_allclose(client.infer("sentences", [x]).as_numpy("embedding"), want, atol=1e-6)
    simple_string = triton_exports("simple_string")
    out = tmp_path / "step-bundle"
    run = deploy(simple_string, out, "--runtime", "kserve")
    assert run.returncode == 0, run.stderr
    assert (out / "model" / "process.py").read_bytes() == (simple_string / "process.py").read_bytes()
    with container(out, tmp_path / "step", bare_python, "simple_string") as client:
        inputs = [thttp.InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
        inputs[0].set_data_from_numpy(np.array([[str(i).encode() for i in range(16)]], dtype=object))
        inputs[1].set_data_from_numpy(np.array([[b"3"] * 16], dtype=object))
        got = client.infer("simple_string", inputs).as_numpy("OUTPUT0")
        assert [int(v) for v in got.reshape(-1)] == [i + 3 for i in range(16)]
