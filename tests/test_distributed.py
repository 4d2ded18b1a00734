"""DistributedDataParallel under torchrun, on CPU with gloo, loopback only: the same results as one process,
several "machines", a killed rank, a rendezvous nobody answers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from torchship.serve.process import free_ports
from torchship.train import checkpoint

from helpers import TORCHSHIP

MLP = ["train", "--preset", "mnist-mlp", "--quiet"]  # SGD, no augmentation, no dropout: equal results are expected


def train(out, data_dir, *args, timeout=240):
    cmd = [*TORCHSHIP, *MLP, "--out", str(out), "--data-dir", str(data_dir), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(out).parent, timeout=timeout)


def errors(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("Error:")]


def test_two_processes_give_the_single_process_weights_and_metrics(tmp_path, data_dir):
    """The two processes through torchrun called directly, as users may (the README's command): the same code runs
    (`--nproc-per-node` goes through torchrun's own launcher too, in the tests below)."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = train(one, data_dir, "--epochs", 2)
    env = {**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR"}
    torchrun = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "torchship.cli",
        *MLP,
        "--epochs",
        "2",
        "--out",
        str(two),
        "--data-dir",
        str(data_dir),
    ]
    r2 = subprocess.run(torchrun, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-2000:]
    a, b = (checkpoint.load(d / "last.pt") for d in (one, two))
    assert a.world_size == 1 and b.world_size == 2
    for k, v in a.model.items():  # 3,333 samples in batches of 128: the last, short one splits 3/2
        assert torch.allclose(v, b.model[k], atol=1e-4, rtol=0), k
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["processes"] == 2 and m1["test_samples"] == m2["test_samples"] == 1000
    assert m1["test_accuracy"] == pytest.approx(m2["test_accuracy"], abs=1e-3)
    assert m1["test_loss"] == pytest.approx(m2["test_loss"], rel=1e-4)
    for h1, h2 in zip(m1["history"], m2["history"]):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert h1[key] == pytest.approx(h2[key], rel=1e-4, abs=1e-6), key
    assert checkpoint.model_from_checkpoint(b)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # exports as ever


def test_two_machines_on_loopback_train_to_completion_and_write_one_set_of_files(tmp_path, data_dir):
    (port,) = free_ports(1)
    runs = [
        subprocess.Popen(
            [
                *TORCHSHIP,
                *MLP,
                "--epochs",
                "2",
                "--out",
                str(tmp_path / f"node{r}"),
                "--data-dir",
                str(data_dir),
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-timeout",
                "60",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [o[1][-1500:] for o in outs]
    assert sorted(p.name for p in (tmp_path / "node0").iterdir()) == [
        "best.pt",
        "curves.png",
        "last.pt",
        "metrics.json",
    ]
    assert not (tmp_path / "node1").exists()  # only rank 0 (machine 0's first process) writes
    assert json.loads((tmp_path / "node0" / "metrics.json").read_text())["processes"] == 2


def worker(rank: int, out) -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmd, env = " ".join(p.info["cmdline"] or []), p.info["environ"] or {}
        except psutil.Error:
            continue
        if "torchship.cli" in cmd and str(out) in cmd and env.get("RANK") == str(rank) and "WORLD_SIZE" in env:
            return p
    return None


def test_kill_9_of_a_rank_ends_the_run_and_resume_finishes_it(tmp_path, data_dir):
    out = tmp_path / "run"
    cmd = [*TORCHSHIP, *MLP, "--epochs", "400", "--out", str(out), "--data-dir", str(data_dir), "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "last.pt").exists() and checkpoint.load(out / "last.pt").epoch >= 3:
            break
        time.sleep(0.1)
    victim = worker(1, out)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)  # mid-epoch: an mnist-mlp epoch lasts a few tens of milliseconds
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = [line for line in stderr.splitlines() if line.startswith("Error:")][-1]
    assert f"rank 1 (pid {victim.pid}) was killed by SIGKILL" in last and "--resume" in last
    assert "Traceback" not in stderr
    epoch = checkpoint.load(out / "last.pt", preset="mnist-mlp").epoch  # the atomic writes held
    assert 3 <= epoch < 400
    r = train(out, data_dir, "--epochs", epoch + 3, "--resume", "--nproc-per-node", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoint.load(out / "last.pt").epoch == epoch + 3
    r = train(out, data_dir, "--epochs", epoch + 4, "--resume")  # and with another number of processes
    assert r.returncode == 0 and checkpoint.load(out / "last.pt").epoch == epoch + 4


def test_a_rendezvous_nobody_answers_ends_the_command_by_itself(tmp_path, data_dir):
    (port,) = free_ports(1)
    # train() raises TimeoutExpired if it never ends
    r = train(
        tmp_path / "run",
        data_dir,
        "--nnodes",
        2,
        "--node-rank",
        1,
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-timeout",
        3,
    )
    assert r.returncode == 1
    assert len(errors(r)) == 1 and "could not gather the 2 machine(s)" in errors(r)[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_global_batch_that_does_not_divide_is_a_one_line_error(tmp_path, data_dir):
    r = train(tmp_path / "run", data_dir, "--batch-size", 33, "--nproc-per-node", 2)
    assert r.returncode == 2 and len(errors(r)) == 1 and "does not divide into 2" in errors(r)[0]
    assert not (tmp_path / "run").exists()
