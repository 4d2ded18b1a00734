"""The two real-sized models `make bench` serves (bench/heavy.py), built here with fixed seeds (nothing downloaded)
and kept in bench/models/ (git-ignored), and the requests it sends them: torchvision's ResNet-50 with JPEG crops of
scikit-learn's sample photos, and a BERT-base-shaped text classifier (ONNX and int8, proven) with texts of 128
tokens."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np

from torchship.serve.loadtest import Payload

SEQUENCE = 128  # tokens a text: every request a full sequence
MODELS = Path(__file__).with_name("models")  # the two exports, built once (minutes) and kept (git-ignored)


def build_resnet(work: Path) -> Path:
    """`torchship export` of torchvision's ResNet-50 with fixed-seed weights (nothing downloaded), ONNX only."""
    import torch
    import torchvision

    out = work / "resnet50"
    if (out / "equivalence.json").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), work / "resnet50.pt")
    # the CLI as a user runs it; ImageNet's normalisation
    command = [str(Path(sys.executable).with_name("torchship")), "export", "--model", "torchvision.models:resnet50"]
    command += ["--weights", str(work / "resnet50.pt"), "--input-shape", "3,224,224", "--formats", "onnx"]
    command += ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--name", "resnet50", "--out", str(out)]
    r = subprocess.run(command, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"exporting ResNet-50 failed: {(r.stderr or r.stdout)[-600:]}")
    return out


def build_bert(work: Path) -> Path:
    """BERT-base's shape (from BertConfig's defaults: 12 layers, hidden 768, 12 heads) as a 3-label sequence classifier
    with fixed-seed weights and bench/text.py's WordPiece tokenizer, exported ONNX and int8 through the API `torchship
    export --tokenizer --text-task classify` calls."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bench.text import VOCAB, export_bert

    out = work / "bert-base"
    if (out / "equivalence.json").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, num_labels=3, max_position_embeddings=512)
    source = (
        "from transformers import BertConfig, BertForSequenceClassification\n\n\n"
        f"def classifier():\n    return BertForSequenceClassification(BertConfig(**{config.to_diff_dict()!r}))\n"
    )
    out = export_bert(
        work,
        source,
        "classifier",
        BertForSequenceClassification(config),
        output={"name": "logits", "datatype": "FP32", "shape": ["batch", 3]},
        name="bert-base",
        task="classify",
        formats=("onnx", "int8"),
        longest=SEQUENCE,
    )
    prove(out)
    return out


def prove(export: Path) -> None:
    """`torchship verify`, as after any export: int8's agreement is the row's proof."""
    r = subprocess.run(
        [str(Path(sys.executable).with_name("torchship")), "verify", str(export)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"the proof of {export} failed: {(r.stderr or r.stdout)[-600:]}")


def images(n: int = 64) -> list[Payload]:
    """224x224 crops of scikit-learn's two bundled photos, as JPEG: real pictures, nothing downloaded."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng, out = np.random.default_rng(0), []
    for i in range(n):
        photo = photos[i % len(photos)]
        x, y = int(rng.integers(0, photo.width - 224)), int(rng.integers(0, photo.height - 224))
        buf = io.BytesIO()
        photo.crop((x, y, x + 224, y + 224)).save(buf, "JPEG", quality=90)
        out.append(Payload(buf.getvalue(), None, "image/jpeg"))
    return out


def texts(tokenizer_path: Path, n: int = 64, seed: int = 0) -> list[str]:
    """Texts of at least SEQUENCE tokens, so every request is a full 128-token sequence (the tokenizer truncates)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    words = [w for w in tok.get_vocab() if w.isalpha() and not w.startswith("##") and len(w) > 2]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=SEQUENCE)) for _ in range(n)]


def text_payloads(sample: list[str]) -> list[Payload]:
    """Each text as it is, for the load client's v2-text protocol (serve/client.py) to send as v2 JSON."""
    return [Payload(t.encode(), None, "text/plain") for t in sample]
