"""Serve stage: TorchServe archives, the server's lifecycle and the load test."""
