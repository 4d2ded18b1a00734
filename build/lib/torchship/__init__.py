"""torchship: from a PyTorch tutorial model to a TorchServe endpoint."""

__version__ = "0.1.0"
