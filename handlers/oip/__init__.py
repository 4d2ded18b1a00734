"""The Open Inference Protocol server (`python -m torchship.handlers.oip`): main (command line to one Config), config,
supervisor (ports, workers, the repository's control plane), worker, sockets; the request path, once for every
transport (pipeline), its transports (rest over http11, grpc), batching, served model versions, the repository,
admin calls, metrics and tracing."""
