"""The tutorials' models: the digit models take (N, 1, 28, 28); the linear regression (N, inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchship.handlers.card import BUILTIN_ARCHITECTURES

OUTPUT_KIND = {"mlp": "logits", "convnet": "log-probabilities", "autoencoder": "image", "linear": "values"}


class MLP(nn.Module):
    def __init__(self, hidden: list[int] | tuple[int, ...] = (32,), inputs: int = 784, classes: int = 10):
        super().__init__()
        sizes = [inputs, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """pytorch/examples mnist/main.py's Net, with the issue's dropout rates."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1)
        self.dropout1 = nn.Dropout2d(0.10)
        self.dropout2 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(4608, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = torch.flatten(x, 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)
        )
        self.decoder = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 784), nn.Tanh()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view(-1, 1, 28, 28)


class LinearRegression(nn.Module):
    """y = a + b x: one nn.Linear, as the tutorial fits it (its weight is b, its bias a)."""

    def __init__(self, inputs: int = 1, outputs: int = 1):
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {
    name: globals()[spec.split(":")[1]] for name, spec in BUILTIN_ARCHITECTURES.items()
}


def build_model(arch: str, kwargs: dict | None = None) -> nn.Module:
    return ARCHITECTURES[arch](**(kwargs or {}))


def build_builtin(spec: str, kwargs: dict | None = None) -> nn.Module:
    """The model a checkpoint's card names, from our own architectures only: a checkpoint never picks code."""
    names = {s: n for n, s in BUILTIN_ARCHITECTURES.items()}
    if spec not in names:
        raise ValueError(f"architecture {spec!r} is not a torchship architecture ({', '.join(names)})")
    try:
        return build_model(names[spec], dict(kwargs or {}))
    except TypeError as e:
        raise ValueError(f"architecture {spec} does not take these arguments: {e}") from None
