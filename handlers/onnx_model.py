"""The embedding's import path before the runtime had folders (`from torchship.handlers.onnx_model import load`):
kept so that apps written against it run unchanged; the embedding itself is model/onnx_model.py."""

from .model.onnx_model import InputError, OnnxModel, load, session_options

__all__ = ["InputError", "OnnxModel", "load", "session_options"]
