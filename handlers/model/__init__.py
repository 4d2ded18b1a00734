"""What a model takes and gives: images and tensors brought to its input, named inputs checked and padded into
batches, its raw output made into answers, the exported file run whatever its format, and the ONNX embedding."""
