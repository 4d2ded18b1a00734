"""How close is close enough: Polygraphy's element rule, and the atol a model's own float32 noise allows.

numpy only, so the CLI can state its defaults without importing torch.
"""

from __future__ import annotations

import numpy as np

ATOL, RTOL = 1e-5, 1e-4
HEADROOM = 4  # when eager float32 itself needs a wider atol, every backend is held to this multiple of it
# Formats whose float32 arithmetic may legitimately differ from eager's more than the tolerances allow, the
# factor both atol and rtol may widen by, and why. It applies only where the format fails the tolerances
# every other backend meets, and the report says so.
FORMAT_LOOSENING = {
    "pt2": (
        10,
        "Inductor generates its own kernels, which sum long reductions (average pools, wide "
        "convolutions) in vector lanes in another order than eager PyTorch: ~1e-4 relative in float32",
    ),
}


def compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict:
    """Polygraphy's rule: an element fails only where it exceeds both atol and rtol*|ref|; NaN always fails."""
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    err = np.abs(got64 - ref64)
    mag = np.abs(ref64)
    nan = np.isnan(got64) | np.isnan(ref64)
    bad = nan | ((err > atol) & (err > rtol * mag))
    err_f = np.where(nan, np.inf, err)
    worst = int(np.argmax(np.where(nan, np.inf, err - rtol * mag)))
    idx = np.unravel_index(worst, ref.shape)
    # Relative error means something only where the relative bound decides; near zero, atol does.
    rel_mask = mag >= atol / rtol if rtol > 0 else np.zeros_like(mag, bool)
    rel = err_f[rel_mask] / mag[rel_mask]
    with np.errstate(invalid="ignore"):  # percentiles over inf (NaN elements) are inf, as they should be
        p99_abs = float(np.percentile(err_f, 99))
        p99_rel = float(np.percentile(rel, 99)) if rel.size else None
    return {
        "nan": int(nan.sum()),
        "failures": int(bad.sum()),
        "elements": int(err.size),
        "max_abs": float(err_f.max()),
        "mean_abs": float(err_f.mean()),
        "p99_abs": p99_abs,
        "max_rel": float(rel.max()) if rel.size else None,
        "p99_rel": p99_rel,
        "min_atol": float(max(0.0, (err_f - rtol * mag).max())),
        "min_rtol": float(max(0.0, ((err_f - atol) / np.maximum(mag, np.finfo(np.float64).tiny)).max())),
        "worst": {"index": [int(i) for i in idx], "got": float(got64[idx]), "expected": float(ref64[idx])},
    }


def tolerance(atol: float, rtol: float, ref: np.ndarray, eager: list[np.ndarray]) -> tuple[float, str | None]:
    """The atol every backend is held to, and why it differs from the one asked for when it does.

    Outputs far smaller than 1 (an untrained head) would pass any export under an absolute 1e-5, so atol
    shrinks with the outputs' RMS; a deep network's float32 rounding can exceed it, so atol never drops
    below HEADROOM times what eager float32 itself needs against the float64 reference.
    """
    if not ref.size:  # no floating output to scale by (every output an integer): the tolerance asked for
        return atol, None
    notes, effective = [], atol
    rms = float(np.sqrt(np.mean(np.square(ref)))) if ref.size else 1.0
    if 0 < rms < 1:
        effective = float(f"{atol * rms:.2g}")
        notes.append(f"atol scaled from {atol:g} to {effective:g} because the outputs' RMS is {rms:.2g}")
    needed = max(compare(e, ref, effective, rtol)["min_atol"] for e in eager)
    if needed > effective:
        effective = float(f"{HEADROOM * needed:.2g}")
        notes.append(
            f"atol raised to {effective:g}: eager PyTorch in float32 itself needs {needed:.2g} against "
            "the float64 reference (rounding accumulates over the network's layers), so every backend "
            f"is held to {HEADROOM}x what eager float32 needs"
        )
    return effective, "; ".join(notes) or None
