"""A text model's own step, which torchship brings: the tokenizer shipped in the export (Hugging Face's
`tokenizers`, Rust, no torch) turns each row's text into the network's token tensors, and the task turns the
network's first output into what people ask a text model for: a label and probabilities, a sentence embedding
(pooled over the attention mask, L2-normalised as the card says), or labelled tokens with their character offsets
(as Hugging Face's token-classification pipeline reports them). Run by both runtimes, the embedding and the proof."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..fields import CardError
from ..limits import MAX_TEXT_BYTES
from ..signature import EMBEDDING, TEXT_INPUT, TEXT_PAIR_INPUT, Signature
from . import named
from .errors import InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def tokenizer(sig: Signature, folder: Path) -> Tokenizer:
    """The export's tokenizer, checked against the digest its card recorded; truncation as the card says."""
    text = sig.text
    path = Path(folder) / text.tokenizer
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CardError("signature.text.tokenizer", f"cannot read {path}: {e.strerror or e}") from None
    if text.sha256 and hashlib.sha256(data).hexdigest() != text.sha256:
        raise CardError("signature.text.tokenizer", f"{path} is not the file that was exported (its sha256 differs)")
    from tokenizers import Tokenizer  # lazily: an image model's embedding needs onnxruntime, numpy, Pillow alone

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
        post = json.loads(data).get("post_processor") or {}
    except Exception as e:
        raise CardError("signature.text.tokenizer", f"{path} is not a tokenizer.json: {str(e)[:200]}") from None
    if text.pairs and not (post.get("pair") or post.get("type") in ("BertProcessing", "RobertaProcessing")):
        raise CardError("signature.text.pairs", f"{path} has no template for pairs of texts (its post_processor's)")
    tok.no_padding()  # padding is the batch's (model/named.py), to its longest row
    tok.no_truncation()
    if text.truncate:
        tok.enable_truncation(longest(sig))
    return tok


def longest(sig: Signature) -> int:
    """The most tokens a row may hold: the upper bound of the token inputs' one named dimension."""
    return sig.dims[sig.inputs[0].dynamic[0]][1]


def steps(sig: Signature, folder: Path) -> tuple[Callable, Callable]:
    """(preprocess, postprocess) as model/steps.Steps calls them: text to token rows, and the network's first output
    to the task's answer."""
    tok, text = tokenizer(sig, folder), sig.text
    low, high = sig.dims[sig.inputs[0].dynamic[0]]
    specs = {t.name: t for t in sig.inputs}
    first = sig.outputs[0].name

    def preprocess(arrays: dict) -> tuple[dict, list]:
        rows = decoded(arrays, TEXT_INPUT)
        if text.pairs:  # the tokenizer's pair template: [CLS] text [SEP] text_pair [SEP], type ids 0 then 1
            rows = list(zip(rows, decoded(arrays, TEXT_PAIR_INPUT)))
        encodings = tok.encode_batch(rows)
        for i, e in enumerate(encodings):
            if len(e.ids) > high:
                raise InputError(
                    413, f"input '{TEXT_INPUT}' row {i}: {len(e.ids)} tokens, more than the {high} this model takes"
                )
            if len(e.ids) < low:
                raise InputError(400, f"input '{TEXT_INPUT}' row {i}: {len(e.ids)} tokens, fewer than {low}")
        width = max(len(e.ids) for e in encodings)
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        out = {}
        for name, spec in specs.items():
            x = np.full((len(encodings), width), spec.pad, named.NUMPY[spec.datatype])
            for i, e in enumerate(encodings):
                values = getattr(e, fields[name])
                x[i, : len(values)] = values
            out[name] = x
        return out, encodings

    def postprocess(outputs: dict, rows: named.Rows | None) -> dict:
        y = outputs[first].astype(np.float64)
        if text.task == "classify":
            p = softmax(y)
            labels = np.array([text.labels[k].encode() for k in p.argmax(-1)], dtype=object)
            return {"probabilities": p.astype(np.float32), "label": labels}
        if text.task == "embed":
            return {EMBEDDING: embed(y, rows, text.pooling, text.normalize).astype(np.float32)}
        return {"entities": entities(softmax(y), rows, text.labels)}

    return preprocess, postprocess


def decoded(arrays: dict, name: str) -> list[str]:
    """A BYTES input's rows as text: each within MAX_TEXT_BYTES, each UTF-8."""
    rows = []
    for i, b in enumerate(arrays[name].reshape(-1)):
        if len(b) > MAX_TEXT_BYTES:
            raise InputError(
                413, f"input '{name}' row {i}: {len(b)} bytes, more than the {MAX_TEXT_BYTES} one text may hold"
            )
        try:
            rows.append(bytes(b).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(400, f"input '{name}' row {i}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return rows


def token_count(rows: named.Rows) -> int:
    """The tokens a text request's rows hold, as the tokenizer made them (OpenAI's usage counts them)."""
    return sum(len(e.ids) for e in rows.context) if rows.context else int(rows.arrays["input_ids"].size)


def softmax(y: np.ndarray) -> np.ndarray:
    z = np.exp(y - y.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def embed(y: np.ndarray, rows: named.Rows | None, pooling: str, normalize: bool) -> np.ndarray:
    """One vector a row: the network's own ([batch, n]) or pooled from its tokens' ([batch, sequence, n]): the mean
    over the attention mask (sentence-transformers' mean pooling), or the first token's."""
    if y.ndim == 3:
        if pooling == "cls":
            y = y[:, 0]
        else:
            mask = rows.arrays.get("attention_mask") if rows is not None else None
            mask = np.ones(y.shape[:2]) if mask is None else mask.astype(np.float64)
            y = (y * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    if normalize:  # as torch.nn.functional.normalize: never divide by less than 1e-12
        y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)
    return y


def entities(p: np.ndarray, rows: named.Rows | None, labels: tuple[str, ...]) -> np.ndarray:
    """Each row's tokens whose best label is not "O", as JSON: entity, score, index, word, start, end (character
    offsets into the row's text), special tokens left out: Hugging Face's pipeline without aggregation."""
    encodings = rows.context if rows is not None and rows.context else None
    out = np.empty(len(p), dtype=object)
    for i, row in enumerate(p):
        found = []
        if encodings is not None:
            e = encodings[i]
            for j in range(len(e.ids)):
                k = int(row[j].argmax())
                if e.special_tokens_mask[j] or labels[k] == "O":
                    continue
                start, end = e.offsets[j]
                found.append(
                    {
                        "entity": labels[k],
                        "score": float(row[j, k]),
                        "index": j,
                        "word": e.tokens[j],
                        "start": start,
                        "end": end,
                    }
                )
        out[i] = json.dumps(found).encode()
    return out
