"""Detectors and segmenters (issue 35): exported with their proofs, served over REST and gRPC by tritonclient, embedded
without torch, each answer eager PyTorch's on the same letterboxed pixels, mapped back to the sent image's."""

import io
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image

from torchship.handlers.card import ModelCard
from torchship.handlers.model.images import Preprocessor
from torchship.serve.shipping import copy_runtime

from helpers import no_torch, oip_of

CLIENTS = {"http": thttp, "grpc": tgrpc}
RED, GREEN = (230, 20, 20), (20, 230, 20)


def picture(h: int, w: int, *rects: tuple) -> np.ndarray:
    """A dark noisy ground (as the models were trained on) with filled rectangles (top, left, bottom, right, colour)."""
    pixels = (np.random.default_rng(h * 7919 + w).random((h, w, 3)) * 50).astype(np.uint8)
    for top, left, bottom, right, colour in rects:
        pixels[top:bottom, left:right] = colour
    return pixels


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def fitted(card: ModelCard, h: int, w: int) -> tuple[int, int]:
    """Where an h x w image lies in the letterbox, computed here apart from the runtime's own."""
    scale = min(card.input_shape[1] / h, card.input_shape[2] / w)
    return round(h * scale), round(w * scale)


@pytest.fixture(scope="module")
def eager(vision_exports):
    from vision_models import detector, segmenter

    models = {}
    for name, build in (("detector", detector), ("segmenter", segmenter)):
        model = build()
        model.load_state_dict(torch.load(vision_exports[name].parent / f"{name}.pt", weights_only=True))
        models[name] = (model.eval(), ModelCard.load(vision_exports[name]))
    return models


def eager_detections(eager, pixels: np.ndarray) -> dict:
    """Eager PyTorch on the letterboxed picture, its boxes scaled back to the picture's pixels."""
    model, card = eager["detector"]
    x = torch.from_numpy(np.asarray(Preprocessor(card).from_pixels(pixels)))
    with torch.no_grad():
        d = model([x])[0]
    h, w = pixels.shape[:2]
    nh, nw = fitted(card, h, w)
    boxes = d["boxes"].numpy() * np.array([w / nw, h / nh, w / nw, h / nh])
    return {"boxes": boxes, "scores": d["scores"].numpy(), "labels": d["labels"].numpy()}


def eager_classes(eager, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eager's class per pixel of the letterbox, and where it is clear of a tie (best two 1e-3 apart or more):
    only there may a comparison expect the same class."""
    model, card = eager["segmenter"]
    x = torch.from_numpy(np.asarray(Preprocessor(card).from_pixels(pixels)))[None]
    with torch.no_grad():
        logits = model(x)["out"][0].numpy()
    top2 = np.sort(logits, 0)[-2:]
    clear = top2[1] - top2[0] > 1e-3
    assert clear.mean() > 0.99, "too many tied pixels for the comparison to mean anything"
    return logits.argmax(0), clear


SCENES = {
    "two": picture(96, 200, (20, 30, 60, 90, RED), (50, 120, 90, 180, GREEN)),
    "empty": picture(128, 128),
    "tall": picture(300, 150, (40, 20, 160, 110, RED)),
}


def test_the_proofs_judge_every_format_by_its_rules(vision_exports):
    det = json.loads((vision_exports["detector"] / "equivalence.json").read_text())
    assert det["passed"] and {c["backend"] for c in det["checks"]} == {"torchscript", "onnx"}
    for c in det["checks"]:
        assert c["worst"]["judged"] >= 8 and c["worst"]["matched"] == c["worst"]["judged"], c["worst"]
    assert det["inputs"]["empty"] >= 1 and len(det["inputs"]["sizes"]) >= 5
    card = ModelCard.load(vision_exports["detector"])
    assert card.thresholds == {"score": 0.3, "iou": 0.5, "detections": 100}  # as vision_models.detector sets them
    from torchship.handlers import sizing

    cost = sizing.measure(vision_exports["detector"], "onnx", card, seconds=0.1)
    assert not cost.batches and sizing.sized(cost).max_batch == 1  # one image a pass: batches only wait
    seg = json.loads((vision_exports["segmenter"] / "equivalence.json").read_text())
    assert seg["passed"]
    assert all(c["top1_agreement"] >= 0.999 and c["ties"] is not None for c in seg["checks"])


def test_a_corrupted_detector_fails_its_proof(vision_exports, tmp_path):
    """One weight of the ONNX file changed, shown first to change what it detects on the proof's own scenes."""
    import onnx

    from torchship.export.proof.detections import compare, scenes
    from torchship.export.proof.report import failure_message
    from torchship.export.proof.verify import verify
    from torchship.handlers.model import runners

    export = tmp_path / "detector"
    shutil.copytree(vision_exports["detector"], export)
    card = ModelCard.load(export)
    x, _ = scenes(card)
    before = runners.load(export, "onnx", card=card).run(x)
    model = onnx.load(str(export / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    original = onnx.numpy_helper.to_array(init).copy()
    for i in np.linspace(0, original.size - 1, 32).astype(int):
        w = original.copy()
        w.flat[i] += 5.0
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        onnx.save(model, str(export / "model.onnx"))
        found = compare(before, runners.load(export, "onnx", card=card).run(x), card.thresholds["score"])
        if found["missing"] or found["extra"]:
            break
    else:
        pytest.fail(f"no weight of {init.name} tried changes the detections")
    report = verify(export)
    assert not report.passed
    assert [c.backend for c in report.failures()] == ["onnx"]
    assert failure_message(report).startswith("onnx does not answer eager PyTorch's detections")


@pytest.fixture(scope="module")
def server(tmp_path_factory, vision_exports):
    exports = [vision_exports["detector"], vision_exports["segmenter"]]
    with oip_of(tmp_path_factory, exports, max_batch=8, max_batch_delay_ms=5) as cfg:
        yield cfg


def infer(cfg, kind: str, model: str, images: list[bytes]):
    c = CLIENTS[kind].InferenceServerClient(f"127.0.0.1:{cfg.http_port if kind == 'http' else cfg.grpc_port}")
    x = CLIENTS[kind].InferInput("images", [len(images)], "BYTES")
    x.set_data_from_numpy(np.array(images, dtype=object))
    return c.infer(model, [x])


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_served_detections_are_eager_s_in_the_sent_images_pixels(server, eager, kind):
    """Three pictures of three sizes in one request, one with nothing in it: each image's boxes, scores and labels
    are eager PyTorch's on its letterbox, mapped back; padding past its count."""
    _, card = eager["detector"]
    want = {name: eager_detections(eager, pixels) for name, pixels in SCENES.items()}
    threshold = card.thresholds["score"]
    for name, w in want.items():  # what the comparison relies on: boxes found, none near the threshold
        assert (len(w["scores"]) == 0) == (name == "empty"), (name, w["scores"])
        assert (np.abs(w["scores"] - threshold) > 1e-3).all()
    out = infer(server, kind, "detector", [png(p) for p in SCENES.values()])
    count, boxes, scores = out.as_numpy("count"), out.as_numpy("boxes"), out.as_numpy("scores")
    labels, names = out.as_numpy("labels"), out.as_numpy("names")
    assert boxes.shape == (3, card.thresholds["detections"], 4)
    for i, w in enumerate(want.values()):
        n = len(w["scores"])
        assert count[i] == n
        np.testing.assert_allclose(boxes[i, :n], w["boxes"], atol=0.05)
        np.testing.assert_allclose(scores[i, :n], w["scores"], atol=1e-4)
        assert labels[i, :n].tolist() == w["labels"].tolist()
        assert [s.decode() for s in names[i, :n]] == [card.labels[j] for j in w["labels"]]
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all()


@pytest.mark.parametrize("kind", list(CLIENTS))
def test_a_served_mask_is_eager_s_at_the_sent_size(server, eager, kind):
    """256 x 256 letterboxes to 128 x 128 exactly, so the mask is eager's class per pixel, each doubled both ways."""
    _, card = eager["segmenter"]
    pixels = picture(256, 256, (40, 30, 120, 150, RED), (150, 100, 230, 200, GREEN))
    classes, clear = eager_classes(eager, pixels)
    assert set(np.unique(classes[clear])) == {0, 1, 2}  # what it relies on: every class somewhere
    out = infer(server, kind, "segmenter", [png(pixels)])
    mask, counts = out.as_numpy("mask"), out.as_numpy("counts")
    assert mask.dtype == np.uint8 and mask.shape == (1, 256, 256)
    doubled = clear.repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(mask[0][doubled], classes.repeat(2, 0).repeat(2, 1)[doubled])
    assert counts[0].tolist() == np.bincount(mask[0].ravel(), minlength=3).tolist()


def post(cfg, model: str, images: list[bytes]) -> tuple[int, dict]:
    import base64

    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)], "data": []}]}
    body["inputs"][0]["data"] = [base64.b64encode(i).decode() for i in images]
    req = urllib.request.Request(
        f"{cfg.inference_url}/v2/models/{model}/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_odd_and_bad_images_get_an_answer_or_a_clear_4xx(server):
    tiny = png(np.full((1, 1, 3), 200, np.uint8))
    for model in ("detector", "segmenter"):
        status, body = post(server, model, [tiny])
        assert status == 200, body
    status, body = post(server, "segmenter", [tiny])
    assert [o["shape"] for o in body["outputs"] if o["name"] == "mask"] == [[1, 1, 1]]
    huge = png(np.zeros((4000, 4000, 3), np.uint8))
    for model in ("detector", "segmenter"):
        status, body = post(server, model, [huge])
        assert status == 413 and "4000x4000" in body["error"], body
        status, body = post(server, model, [b"not an image at all"])
        assert status == 415 and "not an image" in body["error"], body
    status, body = post(server, "segmenter", [png(SCENES["two"]), png(SCENES["tall"])])
    assert status == 400 and "different sizes" in body["error"], body
    from hostile import HOSTILE  # what today's image path gets: bombs, formats not on the list, a truncated file

    for name, data, _, _, want, words in HOSTILE:
        if name in ("eps reaches no ghostscript", "ico is not on the list", "rgba pixel bomb", "truncated png"):
            for model in ("detector", "segmenter"):
                status, body = post(server, model, [data])
                assert status == want and words in body["error"], (name, model, body)


def test_an_app_without_torch_embeds_the_detector_and_the_segmenter(vision_exports, eager, bare_python, tmp_path):
    """onnxruntime alone: TorchServe's object_detector answer per image ({label: box, score}), and a mask PNG."""
    app = tmp_path / "app"
    copy_runtime(app)
    files = {}
    for name, pixels in SCENES.items():
        files[name] = tmp_path / f"{name}.png"
        files[name].write_bytes(png(pixels))
    code = f"""
import json
from torchship_handlers.model.onnx_model import load
d = load({str(vision_exports["detector"] / "model.onnx")!r}).predict({[str(f) for f in files.values()]!r})
s = load({str(vision_exports["segmenter"] / "model.onnx")!r}).predict({str(files["tall"])!r})
print(json.dumps({{"d": d, "s": s}}))
"""
    env = {**os.environ, "PYTHONPATH": f"{no_torch(tmp_path / 'blocker')}{os.pathsep}{app}"}
    r = subprocess.run([bare_python, "-c", code], capture_output=True, text=True, cwd=app, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    _, card = eager["detector"]
    for got, (name, pixels) in zip(out["d"], SCENES.items()):
        w = eager_detections(eager, pixels)
        assert [next(k for k in g if k != "score") for g in got] == [card.labels[j] for j in w["labels"]], name
        np.testing.assert_allclose([g["score"] for g in got], w["scores"], atol=1e-4)
        boxes = [next(v for k, v in g.items() if k != "score") for g in got]
        np.testing.assert_allclose(np.reshape(boxes, (-1, 4)), w["boxes"], atol=0.01)
    import base64

    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["s"]["mask_png_base64"]))))
    assert mask.shape == (300, 150) and out["s"]["size"] == [300, 150]
    counts = np.bincount(mask.ravel(), minlength=3)
    assert out["s"]["counts"] == {label: int(c) for label, c in zip(card.labels, counts) if c}


def test_torchserve_answers_as_its_object_detector_and_image_segmenter(
    tmp_path_factory, vision_exports, eager, bare_python
):
    """From the archives, under a Python without torchship: a list of {label: [x1, y1, x2, y2], "score": s} per
    image (TorchServe's object_detector), and the mask of the image's own size."""
    import base64
    import http.client

    from torchship.serve import torchserve

    from helpers import torchserve_of

    def post(model: str, body: bytes, kind: str = "image/png") -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", cfg.inference_port, timeout=60)
        conn.request("POST", f"/predictions/{model}", body, {"Content-Type": kind, **headers})
        r = conn.getresponse()
        answer = json.loads(r.read())
        conn.close()
        return r.status, answer

    _, card = eager["detector"]
    with torchserve_of(tmp_path_factory, vision_exports, bare_python) as cfg:
        headers = torchserve.headers(cfg.state_dir)
        for name in ("two", "empty"):
            status, got = post("detector", png(SCENES[name]))
            assert status == 200, got
            w = eager_detections(eager, SCENES[name])
            assert [next(k for k in g if k != "score") for g in got] == [card.labels[j] for j in w["labels"]]
            boxes = [next(v for k, v in g.items() if k != "score") for g in got]
            np.testing.assert_allclose(np.reshape(boxes, (-1, 4)), w["boxes"], atol=0.01)
            np.testing.assert_allclose([g["score"] for g in got], w["scores"], atol=1e-4)
        status, got = post("segmenter", png(SCENES["tall"]))
        assert status == 200, got
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(got["mask_png_base64"]))))
        assert mask.shape == (300, 150) and sum(got["counts"].values()) == 300 * 150
        status, got = post("detector", png(np.zeros((4000, 4000, 3), np.uint8)))
        assert status == 413 and "4000x4000" in got["error"], got
        images = [base64.b64encode(png(SCENES[n])).decode() for n in ("two", "tall")]  # v2 JSON, two sizes at once
        request = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": images}]}
        status, got = post("detector", json.dumps(request).encode(), "application/json")
        assert status == 200, got
        out = {o["name"]: o for o in got["outputs"]}
        for i, name in enumerate(("two", "tall")):
            w = eager_detections(eager, SCENES[name])
            n = len(w["scores"])
            assert out["count"]["data"][i] == n
            boxes = np.reshape(out["boxes"]["data"], (2, -1, 4))[i, :n]
            np.testing.assert_allclose(boxes, w["boxes"], atol=0.05)


@pytest.mark.parametrize(
    "spec, enum, kwargs",
    [
        ("torchvision.models:mobilenet_v3_small", "torchvision.models:MobileNet_V3_Small_Weights.IMAGENET1K_V1", {}),
        (
            "torchvision.models.segmentation:lraspp_mobilenet_v3_large",
            "torchvision.models.segmentation:LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1",
            {"num_classes": 21, "weights_backbone": None},
        ),
        (
            "torchvision.models.detection:fasterrcnn_mobilenet_v3_large_320_fpn",
            "torchvision.models.detection:FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1",
            {"num_classes": 91, "weights_backbone": None},
        ),
    ],
)
def test_a_weights_enum_gives_the_card_its_preset_and_categories(tmp_path, spec, enum, kwargs):
    """The enum's architecture with weights of our own (nothing can be downloaded here): the card's mean, std,
    sizes and labels are the enum's own transforms' and categories."""
    from torchship.export.user_model import build, user_model
    from torchship.export.weights_enum import read

    module, _, member = enum.rpartition(":")
    weights = getattr(getattr(__import__(module, fromlist=["x"]), member.split(".")[0]), member.split(".")[1])
    transform = weights.transforms()
    torch.save(build(spec, kwargs).state_dict(), tmp_path / "w.pt")
    preset = read(enum)
    side = preset.crop or preset.resize or 320
    _, card = user_model(spec, tmp_path / "w.pt", kwargs=kwargs, input_shape=(3, side, side), preset=preset)
    assert card.labels == tuple(weights.meta["categories"])
    if card.task == "detect":  # torchvision's detectors normalise inside the model: its transforms state nothing
        assert card.mean == (0.0,) * 3 and card.std == (1.0,) * 3 and not hasattr(transform, "mean")
        return
    assert card.mean == tuple(transform.mean) and card.std == tuple(transform.std)
    if card.task == "classify":
        assert card.input_shape == (3, *transform.crop_size * 2) and card.resize == transform.resize_size[0]
    else:
        assert card.task == "segment" and card.input_shape == (3, *transform.resize_size * 2)


def test_a_weights_enum_and_its_own_facts_cannot_both_be_given(monkeypatch, tmp_path):
    from helpers import cli_error

    code, lines, _ = cli_error(
        monkeypatch, tmp_path, "export", "--model", "torchvision.models:resnet18", "--weights", "w.pt",
        "--weights-enum", "torchvision.models:ResNet18_Weights.IMAGENET1K_V1", "--mean", "0.5",
    )  # fmt: skip
    assert code == 2 and "--mean: --weights-enum states them" in lines[-1]
    code, lines, _ = cli_error(
        monkeypatch, tmp_path, "export", "--model", "torchvision.models:resnet18", "--weights", "w.pt",
        "--weights-enum", "torchvision.models:ResNet18_Weights.NOPE",
    )  # fmt: skip
    assert code == 2 and "has no ResNet18_Weights.NOPE" in lines[-1]
