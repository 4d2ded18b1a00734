"""The text models the tests serve, built offline as a user would bring them: a WordPiece tokenizer trained with
`tokenizers` on a copy of this repository's docs (bench/corpus.txt), saved as tokenizer.json, which transformers'
PreTrainedTokenizerFast loads; and 2-layer BERTs from their configs with fixed seeds: a sequence classifier (3
labels), a token classifier (5 labels), a sentence encoder (mean pooling, in the export) and a classifier of pairs
of texts. Each head's weights are scaled up so that its answers are far from ties (the tests show the gap they rely
on)."""

import subprocess
import sys
from pathlib import Path

from helpers import ROOT, in_one_process

sys.path.insert(0, str(ROOT))  # bench/ belongs to the repository, not the package (as in test_bench_report.py)
from bench.text import VOCAB, build_tokenizer  # noqa: E402 - after the line above

MODELS = f"""
import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel

CONFIG = dict(vocab_size={VOCAB}, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=128)
SENTIMENT = ["negative", "neutral", "positive"]
ENTITIES = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def labelled(names):
    return dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={{n: i for i, n in enumerate(names)}})


def classifier():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**CONFIG, **labelled(SENTIMENT)))
    model.classifier.weight.data *= 30  # answers far from ties
    return model


def tagger():
    torch.manual_seed(1)
    model = BertForTokenClassification(BertConfig(**CONFIG, **labelled(ENTITIES)))
    model.classifier.weight.data *= 300  # one answer a token: no ties among the many tokens of the tests' texts
    return model


def encoder():
    torch.manual_seed(2)
    return BertModel(BertConfig(**CONFIG), add_pooling_layer=False)


def judge():  # entailment of a pair of texts: token type ids tell the two apart
    torch.manual_seed(3)
    model = BertForSequenceClassification(BertConfig(**CONFIG, **labelled(["entailment", "neutral", "contradiction"])))
    model.classifier.weight.data *= 30
    return model


TOKENS = [
    {{"name": "input_ids", "datatype": "INT64", "shape": ["batch", "sequence"], "range": [0, {VOCAB - 1}], "pad": 0}},
    {{"name": "attention_mask", "datatype": "INT64", "shape": ["batch", "sequence"], "range": [0, 1], "pad": 0,
     "mask": True}},
]
CLASSIFY = {{"inputs": TOKENS, "outputs": [{{"name": "logits", "datatype": "FP32", "shape": ["batch", 3]}}],
            "dims": {{"sequence": [1, 128]}}}}
TAG = {{"inputs": TOKENS, "outputs": [{{"name": "logits", "datatype": "FP32", "shape": ["batch", "sequence", 5]}}],
       "dims": {{"sequence": [1, 128]}}}}
EMBED = {{"inputs": TOKENS,
         "outputs": [{{"name": "last_hidden_state", "datatype": "FP32", "shape": ["batch", "sequence", 32]}}],
         "dims": {{"sequence": [1, 128]}}}}
PAIRS = {{"inputs": [*TOKENS, {{"name": "token_type_ids", "datatype": "INT64", "shape": ["batch", "sequence"],
                               "range": [0, 1], "pad": 0}}],
         "outputs": [{{"name": "logits", "datatype": "FP32", "shape": ["batch", 3]}}],
         "dims": {{"sequence": [1, 128]}}}}
"""
TEXT = {  # name -> factory, signature, the text options
    "sentiment": ("classifier", "CLASSIFY", ["--text-task", "classify", "--formats", "ts,onnx,int8"]),
    "entities": ("tagger", "TAG", ["--text-task", "tokens"]),
    "sentences": ("encoder", "EMBED", ["--text-task", "embed"]),
    "nli": ("judge", "PAIRS", ["--text-task", "classify", "--text-pairs"]),
}


def export_all(folder: Path) -> subprocess.CompletedProcess:
    """`torchship export --tokenizer` of every one of them, the command's own code run in one process (four
    processes each paid torch's and transformers' imports: ~30 s of a test worker)."""
    import torch

    tokenizer = build_tokenizer(folder / "tokenizer.json")
    (folder / "models.py").write_text(MODELS)
    namespace: dict = {}
    exec(compile(MODELS, str(folder / "models.py"), "exec"), namespace)
    commands = []
    for name, (factory, sig, options) in TEXT.items():
        torch.save(namespace[factory]().state_dict(), folder / f"{name}.pt")
        spec, signature = f"{folder / 'models.py'}:{factory}", f"{folder / 'models.py'}:{sig}"
        commands.append(
            ["export", "--model", spec, "--weights", str(folder / f"{name}.pt"), "--signature", signature]
            + ["--tokenizer", str(tokenizer), *options, "--name", name, "--out", str(folder / name)]
        )
    return in_one_process(commands, folder)
