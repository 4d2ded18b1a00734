"""Named presets reproducing the architectures and hyperparameters of the PyTorch tutorials."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

DATASETS = ("mnist-5k", "mnist", "fashion-mnist")  # mnist-5k is embedded; the others download or read --data-dir
DIGITS = [str(d) for d in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    arch_kwargs: dict = field(default_factory=dict)
    dataset: str = "mnist-5k"
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.5
    epochs: int = 5
    scheduler: str = "none"  # none | step (StepLR gamma 0.7) | onecycle
    val_fraction: float = 0.1
    mean: float | None = 0.0  # None: computed from the training split
    std: float | None = 1.0
    task: str = "classify"  # classify | reconstruct
    preprocess: str = "mnist-digit"  # how served images are brought to the training form
    labels: list[str] = field(default_factory=lambda: list(DIGITS))
    augment: bool = False  # random affine jitter of training batches
    seed: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        # "What is torch.nn really?": 784-hidden-10, SGD lr 0.5; 10k of MNIST's 60k held out (1/6).
        Preset("mnist-mlp", "mlp", {"hidden": [32]}, batch_size=128, lr=0.5, epochs=10, val_fraction=1 / 6),
        Preset("mnist-mlp50", "mlp", {"hidden": [50]}, batch_size=64, lr=0.5, epochs=10),
        Preset(
            "fashion-mlp",
            "mlp",
            {"hidden": [250, 100]},
            dataset="fashion-mnist",
            optimizer="adam",
            lr=1e-3,
            batch_size=64,
            epochs=10,
            mean=None,
            std=None,
            preprocess="fashion",
            labels=list(FASHION),
        ),
        # pytorch/examples mnist/main.py, with the hyperparameters.
        Preset(
            "mnist-convnet",
            "convnet",
            batch_size=32,
            optimizer="adadelta",
            lr=0.5,
            epochs=15,
            mean=0.1302,
            std=0.3069,
            augment=True,  # 3,600 training digits: without jitter test accuracy stalls near 0.95
        ),
        Preset(
            "mnist-autoencoder",
            "autoencoder",
            batch_size=128,
            optimizer="adam",
            lr=1e-3,
            epochs=10,
            mean=0.5,
            std=0.5,
            task="reconstruct",
        ),
    ]
}
DEFAULT_PRESET = "mnist-convnet"


def get_preset(name: str, **overrides) -> Preset:
    """Look a preset up and apply the flags the user passed (None means 'not given')."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "hidden" in given:
        hidden = given.pop("hidden")
        if PRESETS[name].arch != "mlp":
            raise ValueError(f"--hidden applies to the MLP presets, not {name}")
        given["arch_kwargs"] = {"hidden": list(hidden)}
    return replace(PRESETS[name], **given)
