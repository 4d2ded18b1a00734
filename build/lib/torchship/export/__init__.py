"""Export stage: TorchScript + ONNX from a checkpoint, and the proof that they match the eager model."""
