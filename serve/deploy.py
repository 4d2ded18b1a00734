"""Kubernetes deploy bundles for KServe, and their validation against the kserve SDK's own model classes.

KServe's docs mis-indent fields of these manifests; a bundle is checked key by key at every level, so
a manifest that an API server would reject (or silently ignore a part of) is caught here, offline.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from torchship.handlers.card import ModelCard
from torchship.handlers.formats import served_files
from torchship.handlers.sizing import Cost, measure, queue_size, sized
from torchship.serve.archive import build_archive, model_config
from torchship.serve.settings import (
    ANY_ADDRESS,
    LOOPBACK,
    OIP_GRPC_PORT,
    OIP_HTTP_PORT,
    TORCHSERVE_PORTS,
    WORKER_LOG_LEVEL,
    torchserve_properties,
)
from torchship.serve.shipping import SHIPPED_NAME, copy_runtime

PROTOCOLS = ("v1", "v2")
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer (or our image) puts the model
# the OIP server's --cache_dir, an emptyDir: a restarted container (its OOM kill, a failed probe) neither optimizes
# nor measures the model again; a new pod does, on its own node's CPU
CACHE_MOUNT = "/var/cache/torchship"


class DeployError(Exception):
    """A bundle that cannot be written, or a manifest that does not validate; one line for the user."""


@dataclass(frozen=True)
class Scaling:
    min_replicas: int = 1
    max_replicas: int = 3
    metric: str = "concurrency"
    target: int | None = None  # None: what one pod can batch at once (pod_capacity)
    # KServe's pod-level rollout: this share of traffic goes to the revision this manifest makes, the rest stays on
    # the last ready one (in-process canary and shadow routes are the OIP server's own: `torchship serve route`)
    canary_percent: int | None = None


@dataclass(frozen=True)
class Resources:
    cpu: str = "1"
    memory: str = "1Gi"

    def spec(self) -> dict:
        return {
            "requests": {"cpu": self.cpu, "memory": self.memory},
            "limits": {"cpu": self.cpu, "memory": self.memory},
        }

    @property
    def cores(self) -> int:
        """Whole cores of the CPU request ("2", "1500m"): what the pod's workers are sized for."""
        cpu = self.cpu.strip()
        value = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        return max(1, int(value))


@dataclass(frozen=True)
class Capacity:
    """What one pod can batch, and the figures it came from: the manifest's concurrency settings state them."""

    workers: int
    max_batch: int
    batch1_ms: float
    batch8_ms: float
    batches: bool = True  # sizing.Cost.batches: False for a graph of one image a pass

    @property
    def concurrent(self) -> int:
        """Requests in flight that keep every worker's batches full: the autoscaler's target per pod."""
        return self.workers * self.max_batch

    def note(self) -> str:
        return (
            f"{self.workers} workers x batches of {self.max_batch} = {self.concurrent} requests in flight fill a "
            f"pod; measured when the bundle was written: {self.batch1_ms:.2f} ms at batch 1, {self.batch8_ms:.2f} "
            "ms at batch 8 (one thread), torchship.handlers.sizing"
        )


def pod_capacity(export_dir: Path, card: ModelCard, backend: str, resources: Resources) -> Capacity:
    """The shared sizing rule applied to the pod's CPUs and this model's measured cost."""
    workers = max(2, resources.cores // 2)
    cost = measure(export_dir, backend, card)
    return Capacity(workers, sized(cost, workers).max_batch, cost.batch1_ms, cost.batch8_ms, cost.batches)


def dns_name(name: str) -> str:
    """An InferenceService name is a DNS-1035 label: lowercase letters, digits and '-', starting with a letter."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    s = s if s[:1].isalpha() else f"m-{s}"
    return s[:63].rstrip("-")


def inference_service(name: str, predictor: dict, scaling: Scaling, capacity: Capacity | None = None) -> dict:
    """The manifest; with a capacity, the autoscaling target defaults to what one pod batches, and Knative's hard
    per-pod limit is twice that (a batch running and the next one forming, in every worker)."""
    target = scaling.target or (capacity.concurrent if capacity else 8)
    spec = {
        "minReplicas": scaling.min_replicas,
        "maxReplicas": scaling.max_replicas,
        "scaleMetric": scaling.metric,
        "scaleTarget": target,
    }
    if scaling.canary_percent is not None:
        spec["canaryTrafficPercent"] = scaling.canary_percent
    metadata = {"name": dns_name(name)}
    if capacity:
        spec["containerConcurrency"] = 2 * capacity.concurrent
        metadata["annotations"] = {"torchship.dev/capacity": capacity.note()}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": {**spec, **predictor}},
    }


def torchserve_bundle(
    export_dir: Path,
    out: Path,
    card: ModelCard,
    *,
    storage_uri: str | None = None,
    protocol: str = "v2",
    resources: Resources = Resources(),
    scaling: Scaling = Scaling(),
    backend: str = "onnx",
    image: str | None = None,
) -> list[Path]:
    """KServe's storage layout (config/config.properties, model-store/NAME.mar) and an InferenceService."""
    capacity = pod_capacity(export_dir, card, backend, resources)
    config = model_config(
        sized(Cost(capacity.batch1_ms, capacity.batch8_ms, capacity.batches), capacity.workers),
        worker_log_level=WORKER_LOG_LEVEL,
    )
    mar = build_archive(export_dir, out / "model-store", name=card.name, backend=backend, config=config)
    (out / "config").mkdir(parents=True, exist_ok=True)
    props = out / "config" / "config.properties"
    store = f"{MODEL_MOUNT}/model-store"
    ports = TORCHSERVE_PORTS
    props.write_text(
        "# KServe's TorchServe runtime starts TorchServe with this file from /mnt/models/config/. Tokens would be\n"
        "# generated inside the pod, out of clients' reach: the cluster's ingress (Istio / Knative) authenticates.\n"
        + torchserve_properties(
            inference=f"http://{ANY_ADDRESS}:{ports.inference}",
            management=f"http://{LOOPBACK}:{ports.management}",
            metrics=f"http://{ANY_ADDRESS}:{ports.metrics}",
            grpc_host=LOOPBACK,
            grpc_ports=(ports.grpc_inference, ports.grpc_management),
            model_store=store,
            models=[card.name],
            queue=queue_size(),
            token_auth=False,
            extra={"enable_metrics_api": "true"},
        )
    )
    model = {
        "modelFormat": {"name": "pytorch"},
        "protocolVersion": protocol,
        "storageUri": storage_uri or f"pvc://models/{card.name}",
        "resources": resources.spec(),
    }
    manifest = out / "inferenceservice.yaml"
    manifest.write_text(
        yaml.safe_dump(inference_service(card.name, {"model": model}, scaling, capacity), sort_keys=False)
    )
    return [mar, props, manifest]


def requirements() -> str:
    # kserve: only its protocol definitions (the gRPC messages) are used; numpy/Pillow/ONNX Runtime run the model.
    pins = [
        f"{p}=={version(p)}"
        for p in (
            "kserve",
            "onnxruntime",
            "numpy",
            "pillow",
            "hpack",
            "protobuf",
            "httptools",
            "uvloop",
            "orjson",
            "prometheus_client",
            "tokenizers",
        )
    ]
    return "# The OIP server without the training stack: no torch.\n" + "\n".join(pins) + "\n"


DOCKERFILE = """\
# torchship's Open Inference Protocol server over ONNX Runtime: no torch.
# Build: docker build -t {image} .    Run: docker run -p {http}:{http} -p {grpc}:{grpc} {image}
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY {package}/ {package}/
COPY model/ {mount}/
USER 1000
EXPOSE {http} {grpc}
# 0.0.0.0 inside the container: the pod's port is reached only through the cluster's ingress, which
# authenticates (Istio / Knative); the server itself has no authentication.
# {note}
CMD {cmd}
"""


def container_command(card: ModelCard, capacity: Capacity, backend: str = "onnx", host: str = ANY_ADDRESS) -> list:
    """The server as the pod runs it: its workers from the pod's CPUs; batch size and wait are measured again at start,
    on the pod's own CPU, by the same rule."""
    return [
        "python",
        "-m",
        f"{SHIPPED_NAME}.oip",
        "--model_dir",
        MODEL_MOUNT,
        "--model_name",
        card.name,
        "--http_port",
        str(OIP_HTTP_PORT),
        "--grpc_port",
        str(OIP_GRPC_PORT),
        "--host",
        host,
        "--workers",
        str(capacity.workers),
        "--backend",
        backend,
        "--cache_dir",
        CACHE_MOUNT,
    ]


def oip_bundle(
    export_dir: Path,
    out: Path,
    card: ModelCard,
    *,
    image: str | None = None,
    resources: Resources = Resources(),
    scaling: Scaling = Scaling(),
    backend: str = "onnx",
    storage_uri: str | None = None,
    protocol: str = "v2",
) -> list[Path]:
    """A Dockerfile for the torch-free server, its files, and an InferenceService with that custom container."""
    capacity = pod_capacity(export_dir, card, backend, resources)
    image = image or f"torchship-{dns_name(card.name)}:latest"
    out.mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir(exist_ok=True)
    package = copy_runtime(out)
    for f in served_files(card, backend):
        shutil.copy(export_dir / f, out / "model" / f)
    (out / "requirements.txt").write_text(requirements())
    cmd = container_command(card, capacity, backend)
    dockerfile = out / "Dockerfile"
    dockerfile.write_text(
        DOCKERFILE.format(
            image=image,
            http=OIP_HTTP_PORT,
            grpc=OIP_GRPC_PORT,
            package=SHIPPED_NAME,
            mount=MODEL_MOUNT,
            note=capacity.note(),
            cmd=json.dumps(cmd),
        )
    )
    probe = {"httpGet": {"path": f"/v2/models/{card.name}/ready", "port": OIP_HTTP_PORT}}
    container = {
        "name": "kserve-container",
        "image": image,
        "ports": [{"containerPort": OIP_HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": probe,
        "resources": resources.spec(),
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}],
    }
    predictor = {"containers": [container], "volumes": [{"name": "cache", "emptyDir": {}}]}
    manifest = out / "inferenceservice.yaml"
    manifest.write_text(yaml.safe_dump(inference_service(card.name, predictor, scaling, capacity), sort_keys=False))
    return [dockerfile, out / "requirements.txt", package, out / "model", manifest]


def write_bundle(export_dir: Path | str, out: Path | str, *, bundle, **options) -> list[Path]:
    """A runtime's bundle (`bundle`: its writer, runtimes.Runtime.bundle), its InferenceService checked against the
    kserve SDK before anything is kept."""
    export_dir, out = Path(export_dir), Path(out)
    card = ModelCard.load(export_dir)
    scaling = options.get("scaling", Scaling())
    if scaling.min_replicas > scaling.max_replicas:
        raise DeployError(f"--min-replicas {scaling.min_replicas} is more than --max-replicas {scaling.max_replicas}")
    out.mkdir(parents=True, exist_ok=True)
    files = bundle(export_dir, out, card, **options)
    problems = validate(yaml.safe_load((out / "inferenceservice.yaml").read_text()))
    if problems:
        raise DeployError(f"the InferenceService does not validate: {problems[0]}")
    return files


# Validation: walk a manifest against the SDK's generated classes (openapi_types, attribute_map).


def model_class(name: str):
    # lazily: kserve's SDK takes 4 s to import, and only checking a manifest needs it
    import kserve.models
    import kubernetes.client.models

    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)


def misplaced(cls, key: str) -> str:
    """Where a key that is unknown here does belong, one level down: the docs' mis-indentation."""
    owners = [
        cls.attribute_map[attr]
        for attr, sub in cls.openapi_types.items()
        if (sub_cls := model_class(sub)) is not None and key in sub_cls.attribute_map.values()
    ]
    if owners:  # KServe's model spec first: the one every predictor of ours uses
        return f" (it belongs under {'model' if 'model' in owners else owners[0]}: mis-indented?)"
    close = difflib.get_close_matches(key, list(cls.attribute_map.values()), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def validate(doc, type_name: str = "V1beta1InferenceService", path: str = "") -> list[str]:
    """Every problem found: keys unknown at their level, required fields missing, values of the wrong kind."""
    where = path or "(top)"
    if type_name.startswith("list["):
        if not isinstance(doc, list):
            return [f"{where}: expected a list"]
        return [p for i, item in enumerate(doc) for p in validate(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict("):
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(doc, dict):
            return [f"{where}: expected a mapping"]
        return [p for k, v in doc.items() for p in validate(v, inner, f"{path}.{k}")]
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in primitive:
        ok = isinstance(doc, primitive[type_name]) and not (type_name == "int" and isinstance(doc, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {type(doc).__name__}"]
    cls = model_class(type_name)
    if cls is None:  # object, Quantity-like strings, date-times: any value
        return []
    if not isinstance(doc, dict):
        return [f"{where}: expected a {type_name} mapping, got {type(doc).__name__}"]
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    problems = [
        f"{path}.{key}: not a field of {type_name}{misplaced(cls, key)}".lstrip(".")
        for key in doc
        if key not in by_json
    ]
    try:
        cls(**{by_json[k]: v for k, v in doc.items() if k in by_json})  # the SDK refuses missing required fields
    except ValueError as e:
        problems.append(f"{where}: {type_name}: {' '.join(str(e).split())[:200]}")
    except TypeError:
        pass
    for key, value in doc.items():
        if key in by_json:
            problems += validate(value, cls.openapi_types[by_json[key]], f"{path}.{key}".lstrip("."))
    return problems
