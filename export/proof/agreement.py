"""An approximate format (int8) of a model with named inputs, judged as the image classifiers' int8 is: by how often
its top-1 label agrees with eager float32 on a fixed set of inputs, with the largest logit difference stated."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from torchship.export.inputs import draw, lengths
from torchship.export.proof.report import MIN_AGREEMENT, Approximation
from torchship.handlers.card import ModelCard
from torchship.handlers.formats import FORMAT_BY_NAME
from torchship.handlers.model import runners

ROWS = 192  # inputs the agreement is counted on, spread over the proof's lengths (1 % of them is 2 rows)
CHUNK = 16


def approximate_named(export_dir: Path, card: ModelCard, model: torch.nn.Module, formats: list[str]) -> list:
    """Every approximate format present, on ROWS inputs drawn from the signature (seeded: the same set each time)."""
    approximate = [name for name in formats if not FORMAT_BY_NAME[name].exact]
    if not approximate:
        return []
    sig = card.signature
    logits = next(t.name for t in sig.outputs if t.datatype.startswith("FP"))
    cases = lengths(sig)
    feeds = [draw(sig, ROWS // len(cases), dims, seed=1000 + k) for k, dims in enumerate(cases)]
    eager = runners.named_torch_runner(model, sig)
    out = []
    for name in approximate:
        fmt = FORMAT_BY_NAME[name]
        run = runners.load(export_dir, fmt.backend, threads=torch.get_num_threads(), card=card).run
        ref, got = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for f in feeds:
                for i in range(0, len(next(iter(f.values()))), CHUNK):
                    chunk = {k: np.ascontiguousarray(v[i : i + CHUNK]) for k, v in f.items()}
                    ref.append(eager(chunk)[logits].astype(np.float64))
                    got.append(run(chunk)[logits].astype(np.float64))
        ref, got = np.concatenate(ref), np.concatenate(got)
        err = np.abs(got - ref)
        agreement = float((got.argmax(1) == ref.argmax(1)).mean())
        meta = ort.InferenceSession(str(export_dir / fmt.file), providers=["CPUExecutionProvider"]).get_modelmeta()
        lengths_seen = ", ".join(str(d) for d in cases)
        out.append(
            Approximation(
                fmt.backend,
                len(ref),
                f"{len(ref)} inputs drawn from the signature's ranges at lengths {lengths_seen}",
                meta.custom_metadata_map.get("torchship_calibration"),
                agreement,
                None,
                None,
                None,
                float(err.max()),
                float(np.percentile(err, 99)),
                agreement >= MIN_AGREEMENT,
            )
        )
    return out
