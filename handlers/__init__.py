"""torchship's runtime, torch-free, in parts: the contract every stage reads (card, signature, recipes, formats,
limits, sizing), what a model takes and gives (model/), the wire formats (protocol/), the Open Inference Protocol
server (oip/), and the TorchServe and kserve entries (torchserve/, kserve/).

Only the TorchScript and pt2 runners import torch, and only when used. Self-contained: relative imports only, so this
one folder works as `torchship.handlers`, as `torchship_handlers` inside every archive and deploy bundle, or copied
into an app.
"""
