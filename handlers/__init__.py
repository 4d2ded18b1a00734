"""torchship's runtime: image and tensor preprocessing, the ONNX embedding, the TorchServe handler and the Open
Inference Protocol server.

Torch-free (only the TorchServe handler and the TorchScript/pt2 runners import torch, and only when used) and
self-contained: relative imports only, so this one folder works as `torchship.handlers`, as `torchship_handlers`
inside every archive and deploy bundle, or copied into an app.
"""
