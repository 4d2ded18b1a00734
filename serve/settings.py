"""Deployment facts, stated once: the ports each runtime listens on, the body limit, the queue, TorchServe's hardened
config.properties. `serve start` and `deploy` both read them (the Open Inference Protocol server's own defaults live
in the runtime it ships with, and are imported here)."""

from __future__ import annotations

from dataclasses import dataclass

from torchship.handlers.limits import MAX_REQUEST_BYTES
from torchship.handlers.oip.config import GRPC_PORT as OIP_GRPC_PORT
from torchship.handlers.oip.config import HTTP_PORT as OIP_HTTP_PORT
from torchship.handlers.oip.config import LOOPBACK

__all__ = ["LOOPBACK", "MAX_REQUEST_BYTES", "OIP_GRPC_PORT", "OIP_HTTP_PORT"]  # the runtime's facts, read from here
ANY_ADDRESS = "0.0.0.0"  # inside a pod: reached only through the cluster's authenticating ingress


@dataclass(frozen=True)
class TorchServePorts:
    """TorchServe binds all five, gRPC included whether used or not: a second instance needs its own."""

    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


TORCHSERVE_PORTS = TorchServePorts()
OIP_PORTS = (OIP_HTTP_PORT, OIP_GRPC_PORT)  # REST, gRPC: KServe's ports for a custom predictor container
WORKER_LOG_LEVEL = "WARNING"  # TorchServe's worker logs two INFO lines per request through a pipe (bench/NOTES.md)


def torchserve_properties(
    *,
    inference: str,
    management: str,
    metrics: str,
    grpc_host: str,
    grpc_ports: tuple[int, int],
    model_store: str,
    models: list[str],
    queue: int,
    token_auth: bool,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    cors_origin: str | None = None,
    extra: dict | None = None,
) -> str:
    """config.properties with our hardening: no model registration over HTTP (ShellTorch, CVE-2023-43654), URLs only
    from our own store, bounded bodies and queue, Prometheus metrics, no per-model pip installs."""
    lines = {
        "inference_address": inference,
        "management_address": management,
        "metrics_address": metrics,
        "grpc_inference_address": grpc_host,
        "grpc_inference_port": str(grpc_ports[0]),
        "grpc_management_address": grpc_host,
        "grpc_management_port": str(grpc_ports[1]),
        "model_store": model_store,
        "load_models": ",".join(f"{m}={m}.mar" for m in models),
        "enable_model_api": "false",
        "allowed_urls": f"file://{model_store}/.*",
        "max_request_size": str(max_request_bytes),
        "max_response_size": str(max_request_bytes),
        "job_queue_size": str(queue),
        "disable_token_authorization": "false" if token_auth else "true",
        "metrics_mode": "prometheus",
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
        "async_logging": "true",
    }
    if cors_origin:  # TorchServe sends these on every answer; no origin at all is allowed otherwise
        lines.update(
            cors_allowed_origin=cors_origin,
            cors_allowed_methods="POST, OPTIONS",
            cors_allowed_headers="Authorization, Content-Type, X-TopK",
        )
    lines.update(extra or {})
    return "\n".join(f"{k}={v}" for k, v in lines.items()) + "\n"
