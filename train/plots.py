"""Training curves as a PNG, because people would rather look than read a loss table."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on its file-only backend, imported when a plot is drawn: 1.7 s that a run without plots,
    and every other command, never pays."""
    import matplotlib  # lazily: see above

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazily: see above

    return plt


def plot_curves(history: list[dict], path: Path, title: str = "", classify: bool = True) -> None:
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    panels = 2 if classify else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title=f"{title} loss")
    ax.legend()
    if classify:
        ax = axes[0][1]
        ax.plot(epochs, [h["accuracy"] for h in history], "o-", label="train")
        ax.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel="accuracy", title=f"{title} accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_line(train, val, fit: dict, path: Path, title: str = "") -> None:
    """The points the line was fitted to, the held-out ones, and the fitted line against least squares."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ax.scatter(train[0].cpu().numpy(), train[1].cpu().numpy(), s=12, label="training points")
    ax.scatter(val[0].cpu().numpy(), val[1].cpu().numpy(), s=12, marker="x", label="validation points")
    xs = np.linspace(float(train[0].min()), float(train[0].max()), 50)
    for key, style in (("fitted", "-"), ("least_squares", ":")):
        a, b = fit[key]["a"], fit[key]["b"]
        ax.plot(xs, a + b * xs, style, label=f"{key.replace('_', ' ')}: y = {a:.4f} + {b:.4f} x")
    ax.set(xlabel="x", ylabel="y", title=f"{title} fit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
