"""The models the named-input tests bring, as a user's own file: a small BERT (transformers) and a two-input
tabular model with three outputs; and how a user exports one."""

import subprocess

import torch

from helpers import TORCHSHIP

VOCAB = 1000
MODELS = '''
import torch
from transformers import BertConfig, BertForSequenceClassification


def bert():
    config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3)
    return BertForSequenceClassification(config)


BERT = {
    "inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": ["batch", "sequence"], "range": [0, 999], "pad": 0},
        {"name": "attention_mask", "datatype": "INT64", "shape": ["batch", "sequence"], "range": [0, 1], "pad": 0,
         "mask": True},
    ],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": ["batch", 3]}],
    "dims": {"sequence": [1, 128]},
}


class Shop(torch.nn.Module):
    """Dense features and two categorical ids in; a score, three logits and a count out."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.hidden = torch.nn.Linear(13 + 8, 16)
        self.score = torch.nn.Linear(16, 1)
        self.kind = torch.nn.Linear(16, 3)

    def forward(self, dense, ids):
        h = torch.relu(self.hidden(torch.cat([dense, self.embed(ids).flatten(1)], 1)))
        return {"score": torch.sigmoid(self.score(h)), "kind_logits": self.kind(h), "high_ids": (ids > 4).sum(1)}


SHOP = {
    "inputs": [{"name": "dense", "datatype": "FP32", "shape": ["batch", 13], "range": [-3, 3]},
               {"name": "ids", "datatype": "INT64", "shape": ["batch", 2], "range": [0, 9]}],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": ["batch", 1]},
                {"name": "kind_logits", "datatype": "FP32", "shape": ["batch", 3]},
                {"name": "high_ids", "datatype": "INT64", "shape": ["batch"]}],
}
'''


def export(tmp, name: str, factory: str, sig: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"named_models_{name}", tmp / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = getattr(module, factory)().eval()
    torch.save(model.state_dict(), tmp / f"{name}.pt")
    out = tmp / name
    run = subprocess.run([*TORCHSHIP, "export", "--model", f"{tmp / 'models.py'}:{factory}", "--weights",
                          str(tmp / f"{name}.pt"), "--signature", f"{tmp / 'models.py'}:{sig}", "--name", name,
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return out, run.stdout
