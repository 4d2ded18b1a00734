"""A large ONNX model is optimized once and its weights mapped by every session of every worker (handlers/model/
mapped.py), answering as a session of the model file itself does."""

import http.client
import json
import os
import shutil
import struct
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_user_model import photo

from torchship.handlers import sizing
from torchship.handlers.card import ModelCard
from torchship.handlers.model import mapped, runners
from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.handlers.oip import config
from torchship.serve import oip

from helpers import ROOT, TORCHSHIP

WIDE = textwrap.dedent('''
    from torch import nn


    def wide():
        """An image classifier past the size mapping starts at: one wide hidden layer (37 MB of weights)."""
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3000), nn.ReLU(), nn.Linear(3000, 4))
''')


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory):
    import subprocess

    work = tmp_path_factory.mktemp("wide")
    (work / "wide.py").write_text(WIDE)
    namespace: dict = {}
    exec(compile(WIDE, str(work / "wide.py"), "exec"), namespace)
    torch.manual_seed(0)
    torch.save(namespace["wide"]().state_dict(), work / "wide.pt")
    command = [*TORCHSHIP, "export", "--model", f"{work / 'wide.py'}:wide", "--weights", work / "wide.pt"]
    options = ["--input-shape", "3,32,32", "--preprocess", "resize", "--labels", "a,b,c,d", "--name", "wide"]
    r = subprocess.run([*command, *options, "--out", work / "export"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    export = work / "export"
    assert mapped.worth_it(export / "model.onnx")  # the size this test is about
    return export


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if line.rstrip().endswith(mapped.WEIGHTS)}


def test_a_large_model_is_optimized_once_and_every_session_maps_its_weights(wide_export, tmp_path):
    card = ModelCard.load(wide_export)
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    plain = runners.load(wide_export, "onnx", threads=1, card=card).run(x)
    assert not mapped_files()
    one = runners.load(wide_export, "onnx", threads=2, card=card, mapped_dir=tmp_path)
    made = mapped.mapped(wide_export / "model.onnx", tmp_path)
    stamp = made.stat().st_mtime_ns
    two = runners.load(wide_export, "onnx", threads=1, card=card, mapped_dir=tmp_path)
    assert made.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1  # made once, found after
    assert mapped_files() == {str(made.with_name(mapped.WEIGHTS))}  # both sessions map the one file
    for runner in (one, two):
        out = runner.run(x)
        assert runner.path == wide_export / "model.onnx"  # the runner still names the export's own file
        np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)
        assert (out.argmax(1) == plain.argmax(1)).all()


def test_a_model_the_optimizer_cannot_save_loads_as_it_is(tmp_path, caplog):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model" * 10)
    assert mapped.mapped(broken, tmp_path / "mapped") is None
    assert "loaded as it is" in caplog.text
    assert not [p for p in (tmp_path / "mapped").iterdir()]  # nothing half-made left behind


def worker_maps(state) -> list[set[str]]:
    pids = [w["pid"] for w in oip.status(state)["workers"]]
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            out.append({line.split()[-1] for line in f if line.rstrip().endswith(mapped.WEIGHTS)})
    return out


def label_of(cfg, image: bytes) -> str:
    blob = struct.pack("<I", len(image)) + image
    tensor = {"name": "images", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
    head = json.dumps({"inputs": [tensor]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    conn = http.client.HTTPConnection("127.0.0.1", cfg.http_port, timeout=60)
    conn.request("POST", "/v2/models/wide/infer", head + blob, headers)
    r = conn.getresponse()
    answer = json.loads(r.read())
    conn.close()
    assert r.status == 200, answer
    return next(o for o in answer["outputs"] if o["name"] == "label")["data"][0]


def versioned(export: Path, root: Path, version: str) -> Path:
    """The export as version VERSION of a repository folder (the same model bytes: its proof still holds)."""
    target = root / "wide" / version
    shutil.copytree(export, target)
    card = json.loads((target / "meta.json").read_text())
    (target / "meta.json").write_text(json.dumps({**card, "version": version}))
    return target


@pytest.mark.parametrize("copy_weights", [False, True])
def test_the_servers_workers_map_one_copy_unless_told_to_copy(wide_export, tmp_path, copy_weights):
    settings = dict(workers=2, threads=2, busy_threads=1, max_batch=4, max_batch_delay_ms=1, copy_weights=copy_weights)
    root, state = tmp_path / "models", tmp_path / "state"
    versioned(wide_export, root, "1")
    cfg = oip.OIPConfig.on_free_ports(str(root), "wide", str(state), **settings)
    oip.start(cfg, timeout=180)
    try:
        maps = worker_maps(state)
        local = load_onnx(wide_export / "model.onnx")
        for seed in range(4):
            body = photo(seed, size=(40, 50))
            assert label_of(cfg, body) == local.predict(body)["label"]
        if not copy_weights:  # a version loaded later is mapped too, one copy for both workers
            versioned(wide_export, root, "2")
            oip.repository_call(state, "load", "wide")
            later = worker_maps(state)
            assert label_of(cfg, photo(9, size=(40, 50))) == local.predict(photo(9, size=(40, 50)))["label"]
    finally:
        oip.stop(state)
    assert len(maps) == 2
    if copy_weights:
        assert maps == [set(), set()]
    else:
        assert maps[0] == maps[1] and len(maps[0]) == 1  # both workers, both sessions each: one file
        assert later[0] == later[1] and len(later[0]) == 2 and maps[0] < later[0]


def test_a_model_whose_weights_are_external_data_is_mapped_whole(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3000, 3000)).astype(np.float32), "w")
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3000])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3000])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x_info], [y_info], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    assert (tmp_path / "model.onnx").stat().st_size < mapped.MIN_BYTES  # the graph alone is small: its data is not
    assert mapped.worth_it(tmp_path / "model.onnx")
    made = mapped.mapped(tmp_path / "model.onnx", tmp_path / "mapped")
    x = np.random.default_rng(1).standard_normal((2, 3000)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort.InferenceSession(str(made), options).run(None, {"x": x})[0], plain, atol=1e-4)


def test_a_measured_cost_is_kept_and_read_back_until_the_file_changes(wide_export, tmp_path):
    card, cache = ModelCard.load(wide_export), tmp_path / "cache"
    first, how = sizing.measured(wide_export, "onnx", card, cache=cache)
    assert how.startswith("measured, kept in ")
    kept = Path(how.removeprefix("measured, kept in "))
    again, how = sizing.measured(wide_export, "onnx", card, cache=cache)
    assert how == f"read from {kept}" and again == first
    kept.write_text("{not json")  # a torn or foreign file is measured again, never trusted
    assert sizing.measured(wide_export, "onnx", card, cache=cache)[1] == f"measured, kept in {kept}"
    copy = tmp_path / "copy"
    shutil.copytree(wide_export, copy)  # another file (path, time): another entry
    assert sizing.measured(copy, "onnx", card, cache=cache)[1] != f"read from {kept}"


def log_since(state: Path, mark: int) -> str:
    with open(state / "logs" / oip.LOG, "rb") as f:
        f.seek(mark)
        return f.read().decode(errors="replace")


def test_a_restarted_server_neither_optimizes_nor_measures_again(wide_export, tmp_path):
    export, state = tmp_path / "wide", tmp_path / "state"
    shutil.copytree(wide_export, export)
    local, body = load_onnx(export / "model.onnx"), photo(3, size=(40, 50))
    logs, entries = [], []
    for start in range(3):
        if start == 2:  # the model rewritten in place (same bytes, a new file): optimized and measured anew
            data = (export / "model.onnx").read_bytes()
            (export / "model.onnx").unlink()
            (export / "model.onnx").write_bytes(data)
        mark = (state / "logs" / oip.LOG).stat().st_size if start else 0
        cfg = oip.OIPConfig.on_free_ports(str(export), "wide", str(state), workers=1)  # batch and threads measured
        oip.start(cfg, timeout=180)
        try:
            assert label_of(cfg, body) == local.predict(body)["label"]
        finally:
            oip.stop(state)
        logs.append(log_since(state, mark))
        entries.append(sorted(p.name for p in (state / oip.CACHE / config.MAPPED).iterdir()))
    assert "optimized once" in logs[0] and "measured, kept in" in logs[0]
    assert "optimized once" not in logs[1] and "(read from" in logs[1] and entries[1] == entries[0]
    assert "optimized once" in logs[2] and "measured, kept in" in logs[2]
    assert len(entries[2]) == 1 and entries[2] != entries[0]  # the old file's copy removed, not left to pile up


def test_torchserves_workers_of_a_large_model_map_one_copy(wide_export, tmp_path):
    import psutil

    from torchship.serve import torchserve
    from torchship.serve.archive import build_archive

    build_archive(wide_export, tmp_path / "store", name="wide", backend="onnx")
    state = tmp_path / "state"
    cfg = torchserve.start(torchserve.ServerConfig.on_free_ports("wide", str(tmp_path / "store"), str(state)))
    try:
        workers = [p for p in psutil.Process(torchserve.pid(state)).children(recursive=True) if "python" in p.name()]
        maps = [{m.path for m in p.memory_maps() if m.path.endswith(mapped.WEIGHTS)} for p in workers]
        body = photo(5, size=(40, 50))
        conn = http.client.HTTPConnection("127.0.0.1", cfg.inference_port, timeout=60)
        conn.request("POST", "/predictions/wide", body, {"Content-Type": "image/jpeg", **torchserve.headers(state)})
        r = conn.getresponse()
        answer = json.loads(r.read())
        conn.close()
    finally:
        torchserve.stop(state)
    assert len(workers) == 2 and r.status == 200, answer
    # TorchServe unpacks the archive once for all of a model's workers: each may optimize, the first to finish is kept
    assert maps[0] == maps[1] and len(maps[0]) == 1 and f"/{mapped.FOLDER}/" in next(iter(maps[0]))
    assert answer["label"] == load_onnx(wide_export / "model.onnx").predict(body)["label"]


def test_a_kept_cache_loses_the_copies_no_session_will_load_again(wide_export, tmp_path):
    into, model = tmp_path / "mapped", wide_export / "model.onnx"
    made = mapped.mapped(model, into)
    assert made is not None and made.parent.name == mapped.key(model)

    def left(name: str, source: str, age_s: float = 0) -> Path:
        entry = into / name
        entry.mkdir()
        (entry / mapped.SOURCE).write_text(source)
        when = time.time() - age_s
        os.utime(entry, (when, when))
        return entry

    other = tmp_path / "other.onnx"
    other.write_bytes(b"another model, still there")
    earlier = left("earlier", str(model.resolve()))  # the same file before it was rewritten, or another machine's
    removed = left("removed", str(tmp_path / "gone.onnx"))  # a model file since deleted
    kept = left("kept", str(other))  # another model still on disk: another server may serve it
    abandoned = left(".making-killed", "", mapped.ABANDONED_S + 60)  # its optimizer killed an hour ago
    making = left(".making-now", "")  # another process optimizing right now
    assert all(p.is_dir() for p in (earlier, removed, kept, abandoned, making))
    mapped.prepare(wide_export, "onnx", into)  # a later start (or load) finds its copy and prunes
    assert sorted(p.name for p in into.iterdir()) == sorted([made.parent.name, "kept", ".making-now"])
