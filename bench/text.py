"""make bench's text row (issue 34): a sentence-embedding model served by the OIP server at c=1 and c=16 on texts of
8 to 128 tokens, its passes formed by rows alone and by a token budget (--max_batch_tokens), and the tokenizer's
share of a request's time in-process. The model is a 4-layer BERT from its config (hidden 128, fixed seed) with mean
pooling; the tokenizer a WordPiece trained on a copy of this repository's docs (both built here: nothing is
downloaded)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from bench.real_models import text_payloads
from torchship.serve import oip
from torchship.serve.client import Target
from torchship.serve.loadtest import run_level

CORPUS = Path(__file__).with_name("corpus.txt")  # README.md, docs/export.md and docs/serving.md of 2026-12-02
VOCAB = 600
LENGTHS = (8, 128)  # tokens a text, [CLS] and [SEP] included, drawn uniformly
BUDGETS = {"rows": 0, "tokens": 1024}  # rows alone, or a pass's longest row x its rows within 1,024 tokens
CONCURRENCY = (1, 16)
ROUNDS = 3  # both servers up, measured in turns: this machine drifts by tens of percent over minutes


def build_tokenizer(path: Path) -> Path:
    """A BERT-style WordPiece tokenizer (lower-casing, [CLS] text [SEP]) trained on CORPUS (the docs as they were when
    it was made: the vocabulary stays put while the docs change); saved with its padding so that transformers reads
    the pad token from it (the tests' text models use it too)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train([str(CORPUS)], trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.save(str(path))
    return path


def build(work: Path) -> Path:
    """The export (ONNX), made through the same API `torchship export --tokenizer --text-task embed` calls."""
    import torch
    from transformers import BertConfig, BertModel

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=128,
    )
    source = (
        "from transformers import BertConfig, BertModel\n\n\n"
        f"def encoder():\n    return BertModel(BertConfig(**{config.to_diff_dict()!r}), add_pooling_layer=False)\n"
    )
    return export_bert(
        work,
        source,
        "encoder",
        BertModel(config, add_pooling_layer=False),
        output={"name": "last_hidden_state", "datatype": "FP32", "shape": ["batch", "sequence", 128]},
        name="sentences",
        task="embed",
        formats=("onnx",),
    )


def export_bert(
    work: Path, source: str, factory: str, module, *, output: dict, name: str, task: str, formats: tuple, longest=128
) -> Path:
    """A BERT written as a user brings one (SOURCE's FACTORY, MODULE's weights as a state dict) with this tokenizer,
    exported to WORK/NAME through the API `torchship export --tokenizer --text-task TASK` calls; the signature: the
    two padded token inputs up to LONGEST tokens, and OUTPUT."""
    import torch

    from torchship.export.formats import Options, export_model, stamp
    from torchship.export.named_model import named_model
    from torchship.handlers.signature import Signature, Text

    tokenizer = build_tokenizer(work / "tokenizer.json")
    (work / f"{name}_model.py").write_text(source)
    torch.save(module.state_dict(), work / f"{name}.pt")
    token = {"datatype": "INT64", "shape": ["batch", "sequence"], "pad": 0}
    sig = Signature(
        inputs=[
            {"name": "input_ids", **token, "range": [0, VOCAB - 1]},
            {"name": "attention_mask", **token, "range": [0, 1], "mask": True},
        ],
        outputs=[output],
        dims={"sequence": [1, longest]},
    )
    spec = f"{work / f'{name}_model.py'}:{factory}"
    model, card = named_model(spec, work / f"{name}.pt", sig=sig, name=name, text=Text(task=task), tokenizer=tokenizer)
    card = stamp(card, work / f"{name}.pt", version="1")
    return export_model(model, card, work / name, formats, options=Options(tokenizer=tokenizer)).directory


def texts(tokenizer_path: Path, n: int = 400, seed: int = 0) -> list[str]:
    """N texts of words from the vocabulary, each LENGTHS[0] to LENGTHS[1] tokens long."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    words = [w for w in tok.get_vocab() if w.isalpha() and not w.startswith("##") and len(w) > 2]
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        want = int(rng.integers(LENGTHS[0], LENGTHS[1] + 1))
        words_in = list(rng.choice(words, size=want))
        while len(tok.encode(" ".join(words_in)).ids) > want:
            words_in.pop()
        out.append(" ".join(words_in))
    return out


def tokenizer_share(export_dir: Path, sample: list[str]) -> dict:
    """In-process, one text a call: tokenizing it (the export's own step) against running the ONNX model on it."""
    import onnxruntime as ort

    from torchship.handlers.card import ModelCard
    from torchship.handlers.model import steps

    card = ModelCard.load(export_dir)
    step = steps.load(card.signature, export_dir)
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenize, run = [], []
    for t in sample:
        start = time.perf_counter()
        rows = step.check({"text": ("BYTES", (1,), np.array([t.encode()], dtype=object))})
        mid = time.perf_counter()
        session.run(None, rows.arrays)
        tokenize.append(mid - start)
        run.append(time.perf_counter() - mid)
    tok_ms, run_ms = statistics.median(tokenize) * 1000, statistics.median(run) * 1000
    return {"tokenize_ms": tok_ms, "model_ms": run_ms, "share": tok_ms / (tok_ms + run_ms)}


def run(work: Path, seconds: float = 5, log=print) -> dict:
    export = build(work / "model")
    sample = texts(export / "tokenizer.json")
    bodies = text_payloads(sample)
    out = {"texts": len(sample), "lengths": list(LENGTHS), "budgets": BUDGETS, "rounds": ROUNDS, "levels": []}
    out["tokenizer"] = tokenizer_share(export, sample[:200])
    targets = {}
    try:
        for setting, budget in BUDGETS.items():
            cfg = oip.OIPConfig.on_free_ports(
                str(export),
                "sentences",
                str(work / f"state-{setting}"),
                workers=1,
                threads=2,
                max_batch=32,
                max_batch_delay_ms=2,
                max_batch_tokens=budget,
            )
            cfg = oip.start(cfg, timeout=180)
            targets[setting] = Target("127.0.0.1", cfg.http_port, "sentences", protocol="v2-text")
            run_level(targets[setting], bodies, 4, 2, 10**6)  # warm-up
        runs = {}
        for r in range(ROUNDS):
            for c in CONCURRENCY:
                for setting, target in targets.items():
                    log(f"  text: round {r + 1}, {setting} c={c} ...")
                    runs.setdefault((setting, c), []).append(run_level(target, bodies, c, seconds, 10**6))
    finally:
        for setting in targets:
            oip.stop(work / f"state-{setting}")
    for (setting, c), levels in runs.items():
        out["levels"].append(
            {
                "setting": setting,
                "concurrency": c,
                "throughput": [lv.throughput for lv in levels],
                "p50_ms": [lv.latency_ms["p50"] for lv in levels],
                "p99_ms": [lv.latency_ms["p99"] for lv in levels],
                "errors": sum(sum(lv.errors.values()) for lv in levels if lv.errors),
            }
        )
    return out


def table(section: dict) -> list[str]:
    t = section["tokenizer"]
    lines = [
        f"Text: a 4-layer BERT (hidden 128) embedding {section['texts']} texts of {section['lengths'][0]}-"
        f"{section['lengths'][1]} tokens, OIP server (1 worker, 2 threads, batch 32, 2 ms); passes by rows, or within "
        f"{section['budgets']['tokens']} padded tokens",
        f"each over {section['rounds']} rounds in turns: median [min-max]",
        "setting    c              req/s                p50 ms   errors",
    ]

    def spread(values: list[float], form: str) -> str:
        return f"{statistics.median(values):{form}} [{min(values):{form}}-{max(values):{form}}]"

    for lv in section["levels"]:
        lines.append(
            f"{lv['setting']:<8} {lv['concurrency']:>3} {spread(lv['throughput'], '.1f'):>22} "
            f"{spread(lv['p50_ms'], '.2f'):>22} {lv['errors']:>6}"
        )
    lines.append(
        f"tokenizer: {t['tokenize_ms']:.3f} ms a text against the model's {t['model_ms']:.2f} ms at batch 1 "
        f"({100 * t['share']:.1f} % of the two)"
    )
    return lines
