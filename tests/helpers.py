"""Plain helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from torchship.handlers.card import Architecture, ModelCard
from torchship.train.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
# The installed console command: unlike `python -m`, it puts no working directory on sys.path, so a test of the CLI
# passes only if the installed package works.
TORCHSHIP = [str(Path(sys.executable).with_name("torchship"))]


IN_ONE_PROCESS = """
import json, sys, traceback
from torchship.cli import main
for argv in json.loads(sys.argv[1]):
    print(f"=== torchship {' '.join(argv)}", flush=True)
    try:
        main(argv, prog_name="torchship", standalone_mode=False)
    except SystemExit as e:
        print(f"exit {e.code}", flush=True)
    except Exception:
        traceback.print_exc()
"""


def in_one_process(commands: list[list[str]], cwd: Path) -> subprocess.CompletedProcess:
    """Several `torchship` commands run by the command's own code in one process: each process of their own would pay
    torch's import again (~3 s of CPU a command)."""
    return subprocess.run(
        [sys.executable, "-c", IN_ONE_PROCESS, json.dumps(commands)], capture_output=True, text=True, cwd=cwd
    )


def quick(name: str, **kw):
    """A preset cut down to seconds: the real architecture and optimiser, fewer epochs."""
    return dataclasses.replace(get_preset(name), **{"epochs": 2, **kw})


def card(**kw) -> ModelCard:
    """A valid card for tests, changed where a test needs it."""
    base = dict(
        name="digits",
        task="classify",
        input_shape=(1, 28, 28),
        mean=(0.1302,),
        std=(0.3069,),
        labels=tuple(str(i) for i in range(10)),
        preprocess="mnist-digit",
        output_kind="log-probabilities",
        architecture=Architecture("torchship.train.models:ConvNet", {}),
    )
    return ModelCard(**{**base, **kw})


def bare_site_packages(venv: Path, source: Path) -> Path:
    """VENV's site-packages, holding a link to every entry of SOURCE but this project's own (its files, its
    dist-info, an editable install's finder): the dependencies alone, as TorchServe's workers and a container have
    them."""
    import sysconfig

    target = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if not entry.name.lower().startswith(("torchship", "__editable__", "__pycache__")):
            (target / entry.name).symlink_to(entry)
    return target


def no_torch(directory: Path, without: tuple[str, ...] = ("torch",)) -> Path:
    """A folder that, put first on PYTHONPATH, makes `import torch` (and each of WITHOUT) fail the way a torch-free
    image does."""
    for name in without:
        blocker = directory / name
        blocker.mkdir(parents=True, exist_ok=True)
        (blocker / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return directory


def cli_error(monkeypatch, cwd: Path, *args) -> tuple[int, list[str], str]:
    """The command run by click's own runner in this process (a process each costs ~4-7 s of imports here; the
    installed command runs as a process in test_package): its exit code, its `Error:` lines and all its stderr.
    Anything but click's own exit, which is what prints no traceback, fails the test here."""
    from click.testing import CliRunner

    from torchship.cli import main

    monkeypatch.chdir(cwd)
    r = CliRunner().invoke(main, [str(a) for a in args], prog_name="torchship")
    assert isinstance(r.exception, SystemExit), (r.exception, r.stderr[-2000:])
    return r.exit_code, [line for line in r.stderr.splitlines() if line.startswith("Error:")], r.stderr


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    """Poll until condition() is truthy and return its value; fail naming what never happened."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


def proof_x(export_dir: Path, data_dir: Path | str = "data"):
    """The inputs `torchship verify EXPORT_DIR` runs its proof on."""
    from torchship.export.proof.checks import load_for_proof
    from torchship.export.proof.verify import proof_set

    card, model, formats = load_for_proof(Path(export_dir), None)
    return proof_set(card, model, formats, data_dir)[0]


def named_proof_feeds(export_dir: Path) -> dict:
    """Named inputs: the proof's case at every dimension's longest, exactly as `torchship verify` draws it."""
    from torchship.export.inputs import draw, lengths
    from torchship.export.proof.named import ROWS
    from torchship.handlers.card import ModelCard

    sig = ModelCard.load(export_dir).signature
    cases = lengths(sig)
    return draw(sig, ROWS, cases[-1], seed=len(cases) - 1)


def changes(out, base) -> bool:
    """Far past what the proof tolerates (100x its default atol, scaled by the outputs' RMS below 1 as the proof
    scales it, and 100x its rtol): a change the proof must catch."""
    import numpy as np

    from torchship.export.proof.tolerance import ATOL, RTOL, compare

    rms = min(1.0, float(np.sqrt(np.mean(np.square(base, dtype=np.float64)))))
    return compare(out, base, atol=ATOL * 100 * rms, rtol=RTOL * 100)["failures"] > 0


def spread(n: int, k: int = 64) -> list[int]:
    """K indices spread over 0..n-1: candidates for the one weight to damage."""
    import numpy as np

    return list(dict.fromkeys(np.linspace(0, n - 1, min(n, k)).astype(int).tolist()))


def corrupt_onnx(path: Path, x) -> int:
    """Add 0.5 to one weight of the largest initializer: the smallest damage the proof must catch. The weight is the
    first candidate shown to change the model's output on the proof's inputs X (a weight of a unit that never fires
    on them would rightly pass the proof); returns its index."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    def run(m) -> np.ndarray:
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = x if isinstance(x, dict) else {session.get_inputs()[0].name: x}  # named inputs: every one
        return np.concatenate([y.reshape(-1).astype(np.float64) for y in session.run(None, feeds)])

    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    original = onnx.numpy_helper.to_array(init).copy()
    base = run(model)
    for i in spread(original.size):
        w = original.copy()
        w.flat[i] += 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        if changes(run(model), base):
            onnx.save(model, str(path))
            return i
    raise AssertionError(f"no weight of {init.name} tried changes {path}'s output on the proof's inputs")


def scrape(port: int, name: str, **labels) -> float:
    """One Prometheus series from the OIP server's /metrics on PORT, summed over the label sets that match."""
    import http.client
    import re

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    conn.close()
    total = 0.0
    for m in re.finditer(rf"^{name}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", body, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(2))
    return total


@contextlib.contextmanager
def torchserve_of(tmp_path_factory, exports: dict, python: Path, config=None):
    """One TorchServe serving every export (name -> directory) from its archive, under `python`; stopped after."""
    from torchship.serve import torchserve
    from torchship.serve.archive import ModelConfig, build_archive

    store, state = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("state")
    for name, directory in exports.items():
        build_archive(directory, store, name=name, config=config or ModelConfig(minWorkers=1, maxWorkers=1))
    first, *others = exports
    cfg = torchserve.ServerConfig.on_free_ports(
        first, str(store), str(state), extra_models=tuple(others), python=str(python)
    )
    try:
        yield torchserve.start(cfg, timeout=240)
    finally:
        torchserve.stop(state)


@contextlib.contextmanager
def oip_of(tmp_path_factory, exports: list[Path], **settings):
    """One OIP server (one worker, one thread) serving every export folder; stopped after."""
    from torchship.serve import oip

    state = tmp_path_factory.mktemp("oip")
    first, *more = exports
    cfg = oip.OIPConfig.on_free_ports(
        str(first.parent), first.name, str(state), extra_exports=tuple(map(str, more)), workers=1, threads=1, **settings
    )
    try:
        yield oip.start(cfg, timeout=180)
    finally:
        oip.stop(state)


def paper(digit: np.ndarray, size: int, box: int, top: int, left: int) -> np.ndarray:
    """A digit drawn in dark ink on white paper, `box` pixels tall, at (top, left) of a size x size page."""
    big = np.asarray(Image.fromarray(digit).resize((box, box), Image.Resampling.BICUBIC))
    page = np.zeros((size, size), np.uint8)
    page[top : top + box, left : left + box] = big
    return 255 - page


def post_json(port: int, path: str, body: dict, headers: dict) -> tuple[int, dict]:
    """A JSON POST to this machine: its status and its JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"null")
    conn.close()
    return out


def export_user_model(folder: Path, source: str, name: str, factory: str, sig: str, *options) -> tuple:
    """`torchship export` of a model a user wrote in FOLDER/models.py (SOURCE), its weights saved as a user would
    (built by FACTORY, its state dict), its signature the file's SIG: the process's result and the export folder."""
    import torch

    (folder / "models.py").write_text(source)
    namespace: dict = {}
    exec(compile(source, str(folder / "models.py"), "exec"), namespace)
    torch.save(namespace[factory]().state_dict(), folder / f"{name}.pt")
    out = folder / name
    spec, signature = f"{folder / 'models.py'}:{factory}", f"{folder / 'models.py'}:{sig}"
    command = [*TORCHSHIP, "export", "--model", spec, "--weights", folder / f"{name}.pt", "--signature", signature]
    r = subprocess.run(
        [*command, *options, "--name", name, "--out", out], capture_output=True, text=True, timeout=600, cwd=folder
    )
    return r, out
