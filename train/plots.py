"""Training curves as a PNG, because people would rather look than read a loss table."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], path: Path, title: str = "", classify: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
