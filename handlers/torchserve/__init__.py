"""TorchServe's side: the handler an archive names (`torchship_handler.py` imports it) and its request decoding."""
