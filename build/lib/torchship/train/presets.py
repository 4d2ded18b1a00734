"""Named presets reproducing the architectures and hyperparameters of the PyTorch tutorials."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# mnist-5k is embedded and linreg-tutorial generated; the others download or read --data-dir
DATASETS = ("mnist-5k", "mnist", "fashion-mnist", "linreg-tutorial")
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
    task: str = "classify"  # classify | reconstruct | regress
    preprocess: str = "mnist-digit"  # how served inputs are brought to the training form
    labels: list[str] = field(default_factory=lambda: list(DIGITS))
    augment: bool = False  # random affine jitter of training batches
    seed: int = 1
    input_kind: str = "image"
    input_shape: tuple[int, ...] = (1, 28, 28)
    output_names: list[str] = field(default_factory=list)  # regress: one name per output value
    checkpoint_every: int = 1  # epochs between checkpoints and progress lines (and always the last)
    keep: str = "best"  # best.pt holds the epoch of lowest validation loss, or "last": the run's final model

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
        # "PyTorch from first principles" (D. Godoy, "Understanding PyTorch with an example"): y = a + b x + noise,
        # fitted by nn.Linear(1, 1) with full-batch SGD; its data is generated (train/data.py, tutorial_line).
        Preset(
            "linreg",
            "linear",
            {"inputs": 1, "outputs": 1},
            dataset="linreg-tutorial",
            batch_size=80,
            optimizer="sgd",
            lr=0.1,
            epochs=1000,
            val_fraction=0.2,
            task="regress",
            preprocess="standardize",
            labels=[],
            seed=42,
            input_kind="tensor",
            input_shape=(1,),
            output_names=["y"],
            checkpoint_every=100,
            keep="last",  # the tutorial reports the line after its 1,000 epochs, as least squares would find it
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
