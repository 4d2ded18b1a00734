"""Serving-side code: image preprocessing, the ONNX embedding API and the TorchServe handler.

Nothing here imports torch at module level except image_handler.py, so apps can embed the ONNX model
with onnxruntime alone, and every module also imports flat from a TorchServe archive's model directory.
"""
