"""The model page in a real headless Chromium (Debian's, driven by Selenium with Debian's chromedriver): draw, drop,
ask the server; the browser's tensor and answer are the embedding's for the same image."""

import base64
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from torchship.handlers.model.onnx_model import load as load_onnx
from torchship.serve import torchserve
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.page import serve, write_page
from torchship.serve.samples import held_out_digits, on_paper, png

from helpers import ROOT

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots the test run keeps (git-ignored)
DIGITS, LABELS = held_out_digits()


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory, convnet_export, bare_python):
    """A TorchServe with token auth on, for the page's "ask the server" switch."""
    store, state = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("state")
    build_archive(convnet_export.directory, store, config=ModelConfig(minWorkers=1, maxWorkers=1))
    cfg = torchserve.ServerConfig.on_free_ports("mnist-convnet", str(store), str(state), python=str(bare_python))
    try:
        yield torchserve.start(cfg, timeout=240)
    finally:
        torchserve.stop(state)


@pytest.fixture(scope="module")
def page(tmp_path_factory, convnet_export, relay_server):
    out = tmp_path_factory.mktemp("page")
    write_page(convnet_export.directory, out)
    httpd = serve(out, 0, relay_server.state_dir)
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", out
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "apt-get install chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,1500",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        # every host name but 127.0.0.1 fails to resolve: the page must work with no network at all
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, script: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {script}: errors {driver.execute_script('return torchship.errors')}")


def open_page(driver, url):
    driver.get(url)
    wait(driver, "window.torchship && window.torchship.ready === true")


def fresh_answer(driver, before):
    """Wait for a new answer (torchship.last is replaced for every image)."""
    return wait(driver, f"torchship.last && torchship.last.done && torchship.last !== {before} && torchship.last")


def drop(driver, data: bytes, name: str, mime: str = "image/png"):
    driver.execute_script("window.__before = torchship.last;")
    driver.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], arguments[1], {type: arguments[2]}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));""",
        base64.b64encode(data).decode(),
        name,
        mime,
    )
    return fresh_answer(driver, "window.__before")


def same_as_embedding(model, data: bytes, answer: dict):
    expected = model.prepare(data)
    got = np.asarray(answer["input"], np.float32).reshape(expected.shape)
    assert np.abs(got - expected).max() <= 1e-6  # the browser computed the very tensor the servers compute
    local = model.predict(data)
    assert answer["answer"]["label"] == local["label"]
    assert abs(answer["answer"]["probability"] - local["probability"]) < 1e-5


def test_drawing_a_digit_gives_the_embeddings_answer_for_the_same_canvas(browser, page, convnet_export):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, _ = page
    open_page(browser, url)
    pad = browser.find_element(By.ID, "pad")
    model = load_onnx(convnet_export.onnx)
    strokes = {  # a 7 and a 1, drawn with mouse events
        "seven": [(-70, -80), (120, 0), (-40, 70), (-40, 90)],
        "one": [(0, -100), (0, 100), (0, 100)],
    }
    for moves in strokes.values():
        browser.find_element(By.ID, "clear").click()
        browser.execute_script("window.__before = torchship.last;")
        chain = ActionChains(browser).move_to_element_with_offset(pad, *moves[0]).click_and_hold()
        for dx, dy in moves[1:]:
            chain = chain.move_by_offset(dx, dy)
        chain.release().perform()
        answer = fresh_answer(browser, "window.__before")
        canvas = base64.b64decode(browser.execute_script("return document.getElementById('pad').toDataURL()")[22:])
        assert answer["source"] == "pad"
        same_as_embedding(model, canvas, answer)
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "model-page.png"))
    shot = Image.open(ARTIFACTS / "model-page.png")
    assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 10  # a page, not a blank frame


@pytest.mark.parametrize("kind", ["mnist", "paper", "rgb"])
def test_dropping_a_png_gives_the_embeddings_answer(browser, page, convnet_export, kind):
    url, _ = page
    open_page(browser, url)
    digit = DIGITS[kind_index := {"mnist": 10, "paper": 510, "rgb": 905}[kind]]
    pixels = digit if kind == "mnist" else on_paper(digit)
    image = Image.fromarray(pixels).convert("RGB") if kind == "rgb" else Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    answer = drop(browser, buf.getvalue(), f"{kind}.png")
    assert answer["source"] == "file"
    same_as_embedding(load_onnx(convnet_export.onnx), buf.getvalue(), answer)
    assert answer["answer"]["label"] == str(LABELS[kind_index])


def test_a_blank_drop_says_so(browser, page):
    url, _ = page
    open_page(browser, url)
    answer = drop(browser, png(np.zeros((28, 28), np.uint8)), "blank.png")
    assert "blank" in answer["answer"]["error"]


def test_the_page_loads_nothing_from_elsewhere(browser, page):
    url, out = page
    open_page(browser, url)
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert resources and all(r.startswith(url) for r in resources), resources
    assert {"ort/ort.wasm.min.js", "model.onnx", "card.json"} <= {r[len(url) :].split("?")[0] for r in resources}
    assert browser.execute_script("return torchship.errors") == []
    assert (out / "ort" / "ort-wasm-simd-threaded.wasm").stat().st_size > 1_000_000  # vendored, not fetched


def test_asking_the_server_shows_both_answers_and_keeps_the_key_out_of_files(browser, page, relay_server):
    from selenium.webdriver.common.by import By

    url, out = page
    open_page(browser, url)
    key = torchserve.keys(relay_server.state_dir)["inference"]["key"]
    browser.find_element(By.ID, "use-server").click()
    browser.find_element(By.ID, "key").send_keys("wrong-key")
    answer = drop(browser, png(on_paper(DIGITS[333])), "digit.png")
    assert answer["remote"]["error"].startswith(("400", "401"))  # the server's own token check
    browser.find_element(By.ID, "key").clear()
    browser.find_element(By.ID, "key").send_keys(key)
    answer = drop(browser, png(on_paper(DIGITS[333])), "digit.png")
    assert answer["remote"]["label"] == answer["answer"]["label"] == str(LABELS[333])
    assert abs(answer["remote"]["probability"] - answer["answer"]["probability"]) < 1e-4
    shown = browser.find_element(By.ID, "remote").text
    assert answer["remote"]["label"] in shown
    assert browser.execute_script("return localStorage.length + sessionStorage.length + document.cookie.length") == 0
    assert all(
        key not in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.stat().st_size < 5_000_000
    )


def test_the_autoencoders_page_shows_input_and_reconstruction(browser, tmp_path, data_dir):
    from torchship.export.formats import export_checkpoint
    from torchship.train.fit import train

    from helpers import quick

    train(quick("mnist-autoencoder", epochs=1), tmp_path / "run", data_dir, quiet=True)
    exp = export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "export", ("onnx",))
    write_page(exp.directory, tmp_path / "page")
    httpd = serve(tmp_path / "page", 0)
    try:
        open_page(browser, f"http://127.0.0.1:{httpd.server_address[1]}/")
        answer = drop(browser, png(DIGITS[42]), "digit.png")
        assert len(answer["answer"]["reconstruction"]) == 784
        sums = browser.execute_script(
            """return [...document.querySelectorAll('#local .pair canvas')].map((c) =>
                 c.getContext('2d').getImageData(0, 0, c.width, c.height).data.reduce((a, v) => a + v, 0));"""
        )
        assert len(sums) == 2 and all(s > 28 * 28 * 255 for s in sums)  # input and reconstruction, both drawn
    finally:
        httpd.shutdown()


def test_torchserves_cors_is_opened_for_the_pages_origin_only(tmp_path):
    cfg = torchserve.ServerConfig(
        "m", model_store=str(tmp_path), state_dir=str(tmp_path), cors_origin="http://127.0.0.1:8765"
    )
    props = dict(line.split("=", 1) for line in torchserve.config_properties(cfg).splitlines())
    assert props["cors_allowed_origin"] == "http://127.0.0.1:8765" and "OPTIONS" in props["cors_allowed_methods"]
    closed = torchserve.config_properties(
        torchserve.ServerConfig("m", model_store=str(tmp_path), state_dir=str(tmp_path))
    )
    assert not [line for line in closed.splitlines() if line.startswith("cors_")]


def test_the_page_command_writes_a_folder_that_needs_no_build(tmp_path, convnet_export):
    import subprocess

    from helpers import TORCHSHIP

    r = subprocess.run(
        [*TORCHSHIP, "page", str(convnet_export.directory), "--out", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    files = {p.relative_to(tmp_path / "p").as_posix() for p in (tmp_path / "p").rglob("*") if p.is_file()}
    assert {
        "index.html",
        "page.js",
        "images.js",
        "page.css",
        "model.onnx",
        "card.json",
        "figures.json",
        "ort/ort.wasm.min.js",
        "ort/ort-wasm-simd-threaded.wasm",
    } <= files
    assert json.loads((tmp_path / "p" / "card.json").read_text())["name"] == convnet_export.card.name
    shutil.rmtree(tmp_path / "p")


@pytest.mark.parametrize("filter_name", ["lanczos", "bilinear"])
def test_the_browser_resamples_exactly_as_pillow(browser, page, filter_name):
    """Pillow's fixed-point resampler ported to the page: random images and sizes, both pass orders."""
    url, _ = page
    open_page(browser, url)
    rng = np.random.default_rng(7)
    resample = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}[filter_name]
    for h, w, oh, ow, c in [
        (217, 18, 20, 2, 1),
        (18, 217, 2, 20, 1),
        (124, 65, 31, 36, 1),
        (50, 40, 20, 17, 3),
        (300, 400, 256, 341, 3),
        (30, 30, 64, 48, 1),
        (40, 41, 40, 9, 3),
    ]:
        pixels = rng.integers(0, 256, (h, w, c) if c == 3 else (h, w)).astype(np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((ow, oh), resample))
        got = browser.execute_script(
            "return Array.from(Images.resample(Uint8Array.from(arguments[0]), arguments[1], arguments[2], "
            "arguments[3], arguments[4], arguments[5], arguments[6]))",
            pixels.ravel().tolist(),
            w,
            h,
            c,
            ow,
            oh,
            filter_name,
        )
        assert np.array_equal(np.asarray(got, np.uint8).reshape(expected.shape), expected), (h, w, oh, ow, c)


@pytest.fixture(scope="module")
def line_page(tmp_path_factory):
    """The tutorial's linear regression: its page, and an OIP server for the page to relay to."""
    from torchship.export.formats import export_checkpoint
    from torchship.serve import oip
    from torchship.train.fit import train
    from torchship.train.presets import get_preset

    work = tmp_path_factory.mktemp("line")
    train(get_preset("linreg"), work / "run", quiet=True)
    exp = export_checkpoint(work / "run" / "best.pt", work / "export", ("onnx",))
    cfg = oip.start(oip.OIPConfig.on_free_ports(str(exp.directory), "linreg", str(work / "state"), workers=1))
    write_page(exp.directory, work / "page")
    httpd = serve(work / "page", 0, cfg.state_dir)
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", exp
    finally:
        httpd.shutdown()
        oip.stop(cfg.state_dir)


def test_a_one_number_regression_gets_a_slider_the_line_and_the_servers_answer(browser, line_page):
    from selenium.webdriver.common.by import By

    url, exp = line_page
    open_page(browser, url)
    assert browser.find_element(By.ID, "tensor-try").is_displayed()
    assert not browser.find_element(By.ID, "image-try").is_displayed()
    model = load_onnx(exp.onnx)
    first = wait(browser, "torchship.last && torchship.last.done && torchship.last")  # the slider's starting x
    assert abs(first["answer"]["value"] - model.predict(first["input"][0][0])) < 1e-5
    browser.find_element(By.ID, "use-server").click()
    browser.execute_script(
        "window.__before = torchship.last; const s = document.getElementById('x-box');"
        "s.value = '0.5'; s.dispatchEvent(new Event('change'));"
    )
    answer = fresh_answer(browser, "window.__before")
    assert answer["input"] == [[0.5]] and abs(answer["answer"]["value"] - model.predict(0.5)) < 1e-5
    assert abs(answer["remote"]["predictions"][0] - model.predict(0.5)) < 1e-5  # the OIP server, through the relay
    assert abs(answer["answer"]["value"] - 2.0) < 0.05  # 1 + 2 x 0.5, as fitted
    line = browser.execute_script(
        "const c = document.getElementById('line');"
        "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".filter((v, i) => i % 4 === 3 && v > 0).length"
    )
    assert line > 500  # the fitted line and its axes were drawn
    assert browser.execute_script("return torchship.errors") == []


@pytest.fixture(scope="module")
def named_page(tmp_path_factory, shop_export):
    """A model with two named inputs (floats and ids) and three outputs: its page."""
    work, directory = tmp_path_factory.mktemp("named-page"), shop_export
    write_page(directory, work / "page")
    httpd = serve(work / "page", 0)
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", directory
    finally:
        httpd.shutdown()


def test_named_inputs_get_a_form_and_every_output_by_name(browser, named_page):
    from selenium.webdriver.common.by import By

    url, directory = named_page
    open_page(browser, url)
    assert browser.find_element(By.ID, "rows").is_displayed() and not browser.find_element(By.ID, "pad").is_displayed()
    first = wait(browser, "torchship.last && torchship.last.done && torchship.last")  # the form's example, run
    assert set(first["input"]) == {"dense", "ids"} and set(first["answer"]["outputs"]) == {
        "score",
        "kind_logits",
        "high_ids",
    }
    rng = np.random.default_rng(3)
    feeds = {"dense": rng.uniform(-3, 3, (2, 13)).round(3), "ids": rng.integers(0, 10, (2, 2))}
    text = json.dumps({k: v.tolist() for k, v in feeds.items()})
    browser.execute_script(
        "window.__before = torchship.last; document.getElementById('rows-json').value = "
        f"{json.dumps(text)}; document.getElementById('run-rows').click();"
    )
    answer = fresh_answer(browser, "window.__before")
    want = load_onnx(directory / "model.onnx").predict(
        {"dense": feeds["dense"].astype(np.float32), "ids": feeds["ids"]}
    )
    for name, y in want.items():
        got = answer["answer"]["outputs"][name]
        assert got["shape"] == list(y.shape) and np.allclose(got["data"], y.reshape(-1), rtol=1e-5, atol=1e-6), name
    browser.execute_script(
        "window.__before = torchship.last; document.getElementById('rows-json').value = "
        '\'{"dense": [0,0,0,0,0,0,0,0,0,0,0,0,0], "ids": [1, 12]}\';'
        "document.getElementById('run-rows').click();"
    )
    bad = fresh_answer(browser, "window.__before")
    assert "input 'ids': a value is outside 0..9" in bad["answer"]["error"]
    proof = browser.find_element(By.ID, "proof-summary").text
    assert proof.startswith("All checks pass") and "every output" in proof
    assert browser.execute_script("return torchship.errors") == []


def test_a_model_with_its_own_step_says_the_browser_cannot_run_it(browser, tmp_path, triton_exports):
    """simple_string's step is Python: the page says so and where to send its strings, rather than run the bare
    network on what a client of the model would never send."""
    from selenium.webdriver.common.by import By

    write_page(triton_exports("simple_string"), tmp_path / "page")
    httpd = serve(tmp_path / "page", 0)
    try:
        open_page(browser, f"http://127.0.0.1:{httpd.server_address[1]}/")
        text = browser.find_element(By.ID, "local").find_element(By.CLASS_NAME, "result").text
        assert "process.py" in text and "INPUT0 (BYTES), INPUT1 (BYTES)" in text and "OIP server" in text, text
        assert not browser.find_element(By.ID, "tensor-try").is_displayed()
        assert browser.execute_script("return torchship.errors") == []
    finally:
        httpd.shutdown()


def test_a_text_model_says_where_to_send_its_text(browser, tmp_path, text_exports):
    from selenium.webdriver.common.by import By

    write_page(text_exports["nli"], tmp_path / "page")
    httpd = serve(tmp_path / "page", 0)
    try:
        open_page(browser, f"http://127.0.0.1:{httpd.server_address[1]}/")
        text = browser.find_element(By.ID, "local").find_element(By.CLASS_NAME, "result").text
        assert "its tokenizer (tokenizer.json)" in text and "text (BYTES), text_pair (BYTES)" in text, text
        assert browser.execute_script("return torchship.errors") == []
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def vision_pages(tmp_path_factory, vision_exports):
    """The detector's and the segmenter's pages, relaying to one OIP server that serves both."""
    from torchship.serve import oip

    work = tmp_path_factory.mktemp("vision-page")
    det, seg = vision_exports["detector"], vision_exports["segmenter"]
    settings = dict(workers=1, threads=1, max_batch=1, max_batch_delay_ms=0)  # decided: nothing to measure at start
    cfgs = [
        oip.start(oip.OIPConfig.on_free_ports(str(d), d.name, str(work / f"state-{d.name}"), **settings))
        for d in (det, seg)
    ]
    servers = {}
    for d, cfg in zip((det, seg), cfgs):
        write_page(d, work / d.name)
        servers[d.name] = serve(work / d.name, 0, cfg.state_dir)
    try:
        yield {name: f"http://127.0.0.1:{h.server_address[1]}/" for name, h in servers.items()}
    finally:
        for h in servers.values():
            h.shutdown()
        for cfg in cfgs:
            oip.stop(cfg.state_dir)


def scene_png() -> bytes:
    """Two rectangles on a dark noisy ground, as tests/test_vision.py draws them."""
    pixels = (np.random.default_rng(3).random((96, 200, 3)) * 50).astype(np.uint8)
    pixels[20:60, 30:90] = (230, 20, 20)
    pixels[50:90, 120:180] = (20, 230, 20)
    return png(pixels)


def test_a_detectors_page_draws_the_embeddings_boxes_and_the_servers(browser, vision_pages, vision_exports):
    """Boxes found in the browser are the embedding's for the same file (in its pixels); the server's too."""
    from selenium.webdriver.common.by import By

    open_page(browser, vision_pages["detector"])
    browser.find_element(By.ID, "use-server").click()
    data = scene_png()
    answer = drop(browser, data, "scene.png")
    want = load_onnx(vision_exports["detector"] / "model.onnx").predict(data)
    assert want, "the comparison relies on the detector finding something here"
    for got in (answer["answer"]["detections"], answer["remote"]):
        assert [[k for k in g if k != "score"] for g in got] == [[k for k in w if k != "score"] for w in want]
        for g, w in zip(got, want):
            label = next(k for k in w if k != "score")
            np.testing.assert_allclose(g[label], w[label], atol=0.02)
            assert abs(g["score"] - w["score"]) < 1e-4
    canvas = browser.find_element(By.CSS_SELECTOR, "#local canvas.vision")
    assert canvas.get_attribute("width") == "200"  # drawn at the image's own size
    assert f"{len(want)} detection(s)" in browser.find_element(By.ID, "local").text


def test_a_segmenters_page_draws_the_mask_with_the_embeddings_counts(browser, vision_pages, vision_exports):
    """The browser's class per pixel, cut from the letterbox and sized back, counts what the embedding counts (to
    a pixel in a thousand: a tie may fall either way in WebAssembly's float arithmetic)."""
    from selenium.webdriver.common.by import By

    open_page(browser, vision_pages["segmenter"])
    browser.find_element(By.ID, "use-server").click()
    data = scene_png()
    answer = drop(browser, data, "scene.png")
    want = load_onnx(vision_exports["segmenter"] / "model.onnx").predict(data)["counts"]
    assert len(want) == 3  # every class somewhere: what the comparison relies on
    for got in (answer["answer"]["counts"], answer["remote"]["counts"]):
        assert set(got) == set(want) and sum(got.values()) == 96 * 200
        assert sum(abs(got[k] - want[k]) for k in want) <= 96 * 200 // 1000
    assert browser.find_element(By.CSS_SELECTOR, "#remote canvas.vision").is_displayed()
