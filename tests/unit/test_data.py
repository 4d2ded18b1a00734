import gzip
import hashlib
import shutil

import pytest
import torch

from torchship.train import data
from torchship.train.mnist5k import EMBEDDED, FILES

from helpers import cli_error


def test_embedded_files_match_their_checksums():
    sums = dict(line.split()[::-1] for line in (EMBEDDED / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == set(FILES)
    for name in FILES:
        assert hashlib.sha256(gzip.open(EMBEDDED / f"{name}.gz").read()).hexdigest() == sums[name]


def test_mnist5k_loads_through_torchvision_with_the_documented_split(data_dir):
    train, test = data.load("mnist-5k", data_dir)
    assert train.images.shape == (4000, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (1000, 28, 28)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert 30 < train.images.float().mean() < 40  # real MNIST ink coverage, not noise


def test_damaged_embedded_file_is_refused(tmp_path, data_dir, monkeypatch):
    raw = tmp_path / "mnist-5k" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    fake = tmp_path / "embedded"
    shutil.copytree(EMBEDDED, fake)
    with gzip.open(fake / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"garbage")
    monkeypatch.setattr(data, "EMBEDDED", fake)
    with pytest.raises(data.DataError, match="SHA256SUMS"):
        data.prepare_embedded(tmp_path)


def test_validation_split_is_reproducible_from_the_seed(data_dir):
    train, _ = data.load("mnist-5k", data_dir)
    a_train, a_val = data.split_validation(train, 0.1, seed=3)
    b_train, b_val = data.split_validation(train, 0.1, seed=3)
    _, c_val = data.split_validation(train, 0.1, seed=4)
    assert len(a_val) == 400 and len(a_train) == 3600
    assert torch.equal(a_val.labels, b_val.labels) and torch.equal(a_val.images, b_val.images)
    assert not torch.equal(a_val.images, c_val.images)


def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path, data_dir):
    """Offline, torchvision's FashionMNIST class reads whatever IDX files the user put in place."""
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(data_dir / "mnist-5k" / "MNIST" / "raw", raw)
    train, test = data.load("fashion-mnist", tmp_path, download=False)
    assert len(train) == 4000 and len(test) == 1000


def test_missing_dataset_is_one_line_error_not_a_traceback(tmp_path, monkeypatch):
    code, errors, stderr = cli_error(
        monkeypatch,
        tmp_path,
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        tmp_path,
        "--no-download",
        "--quiet",
        "--out",
        tmp_path / "run",
    )
    assert code != 0 and len(stderr.strip().splitlines()) == 1, stderr
    assert "mnist not found" in errors[0] and str(tmp_path / "MNIST" / "raw") in errors[0]


def test_batches_cover_every_sample_once_including_a_short_last_batch():
    x = torch.arange(10).float()
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in data.batches(x, y, 4, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b) for _, b in data.batches(x, y, 4)] == [4, 4, 2]
