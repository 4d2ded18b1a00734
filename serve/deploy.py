"""Kubernetes deploy bundles for KServe, and their validation against the kserve SDK's own model classes.

KServe's docs mis-indent fields of these manifests; a bundle is checked key by key at every level, so
a manifest that an API server would reject (or silently ignore a part of) is caught here, offline.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from torchship.runtime.card import CARD_FILE, FORMAT_BY_BACKEND, ModelCard
from torchship.serve.archive import ModelConfig, build_archive
from torchship.serve.shipping import SHIPPED_NAME, copy_runtime

RUNTIMES = ("torchserve", "kserve")
PROTOCOLS = ("v1", "v2")
SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")
HTTP_PORT, GRPC_PORT = 8080, 8081


class DeployError(Exception):
    """A bundle that cannot be written, or a manifest that does not validate; one line for the user."""


@dataclass(frozen=True)
class Scaling:
    min_replicas: int = 1
    max_replicas: int = 3
    metric: str = "concurrency"
    target: int = 8


@dataclass(frozen=True)
class Resources:
    cpu: str = "1"
    memory: str = "1Gi"

    def spec(self) -> dict:
        return {"requests": {"cpu": self.cpu, "memory": self.memory},
                "limits": {"cpu": self.cpu, "memory": self.memory}}  # fmt: skip


def dns_name(name: str) -> str:
    """An InferenceService name is a DNS-1035 label: lowercase letters, digits and '-', starting with a letter."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    s = s if s[:1].isalpha() else f"m-{s}"
    return s[:63].rstrip("-")


def inference_service(name: str, predictor: dict, scaling: Scaling) -> dict:
    predictor = {"minReplicas": scaling.min_replicas, "maxReplicas": scaling.max_replicas,
                 "scaleMetric": scaling.metric, "scaleTarget": scaling.target, **predictor}  # fmt: skip
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": dns_name(name)}, "spec": {"predictor": predictor}}  # fmt: skip


# KServe's storage initializer puts storageUri's content in /mnt/models; TorchServe reads this config there.
TORCHSERVE_PROPERTIES = """\
# KServe's TorchServe runtime starts TorchServe with this file from /mnt/models/config/.
inference_address=http://0.0.0.0:{http}
management_address=http://127.0.0.1:8081
metrics_address=http://0.0.0.0:8082
grpc_inference_port=7070
grpc_management_port=7071
enable_metrics_api=true
metrics_mode=prometheus
model_store=/mnt/models/model-store
load_models={name}={name}.mar
enable_model_api=false
allowed_urls=file:///mnt/models/model-store/.*
max_request_size=10485760
job_queue_size=1024
install_py_dep_per_model=false
# Tokens would be generated inside the pod, out of clients' reach: authenticate at the cluster's ingress
# (Istio / Knative) instead, as KServe's own TorchServe examples do.
disable_token_authorization=true
"""


def torchserve_bundle(export_dir: Path, out: Path, card: ModelCard, *, storage_uri: str, protocol: str,
                      resources: Resources, scaling: Scaling, backend: str = "onnx") -> list[Path]:  # fmt: skip
    """KServe's storage layout (config/config.properties, model-store/NAME.mar) and an InferenceService."""
    mar = build_archive(export_dir, out / "model-store", name=card.name, backend=backend, config=ModelConfig())
    (out / "config").mkdir(parents=True, exist_ok=True)
    props = out / "config" / "config.properties"
    props.write_text(TORCHSERVE_PROPERTIES.format(http=HTTP_PORT, name=card.name))
    model = {"modelFormat": {"name": "pytorch"}, "protocolVersion": protocol, "storageUri": storage_uri,
             "resources": resources.spec()}  # fmt: skip
    manifest = out / "inferenceservice.yaml"
    manifest.write_text(yaml.safe_dump(inference_service(card.name, {"model": model}, scaling), sort_keys=False))
    return [mar, props, manifest]


def requirements() -> str:
    from importlib.metadata import version

    pins = [f"{p}=={version(p)}" for p in ("kserve", "onnxruntime", "numpy", "pillow")]
    return "# The KServe runtime without the training stack: no torch.\n" + "\n".join(pins) + "\n"


DOCKERFILE = """\
# The torchship KServe runtime: the Open Inference Protocol over ONNX Runtime, no torch.
# Build: docker build -t {image} .    Run: docker run -p {http}:{http} -p {grpc}:{grpc} {image}
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY {package}/ {package}/
COPY model/ /mnt/models/
USER 1000
EXPOSE {http} {grpc}
# 0.0.0.0 inside the container: the pod's port is reached only through the cluster's ingress, which
# authenticates (Istio / Knative); the runtime itself has no authentication.
CMD {cmd}
"""


def container_command(card: ModelCard, model_dir: str = "/mnt/models", host: str = "0.0.0.0") -> list[str]:
    return ["python", "-m", f"{SHIPPED_NAME}.kserve_model", "--model_dir", model_dir, "--model_name", card.name,
            "--http_port", str(HTTP_PORT), "--grpc_port", str(GRPC_PORT), "--host", host]  # fmt: skip


def kserve_bundle(export_dir: Path, out: Path, card: ModelCard, *, image: str, resources: Resources,
                  scaling: Scaling, backend: str = "onnx") -> list[Path]:  # fmt: skip
    """A Dockerfile for the torch-free runtime, its files, and an InferenceService with that custom container."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir(exist_ok=True)
    package = copy_runtime(out)
    for f in (CARD_FILE, FORMAT_BY_BACKEND[backend].file):
        shutil.copy(export_dir / f, out / "model" / f)
    (out / "requirements.txt").write_text(requirements())
    cmd = container_command(card) + ([] if backend == "onnx" else ["--backend", backend])
    dockerfile = out / "Dockerfile"
    dockerfile.write_text(
        DOCKERFILE.format(image=image, http=HTTP_PORT, grpc=GRPC_PORT, cmd=json.dumps(cmd), package=SHIPPED_NAME)
    )
    container = {
        "name": "kserve-container",
        "image": image,
        "ports": [{"containerPort": HTTP_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": f"/v2/models/{card.name}/ready", "port": HTTP_PORT}},
        "resources": resources.spec(),
    }
    manifest = out / "inferenceservice.yaml"
    manifest.write_text(yaml.safe_dump(inference_service(card.name, {"containers": [container]}, scaling),
                                       sort_keys=False))  # fmt: skip
    return [dockerfile, out / "requirements.txt", package, out / "model", manifest]


def write_bundle(export_dir: Path | str, out: Path | str, *, runtime: str, storage_uri: str | None = None,
                 image: str | None = None, protocol: str = "v2", resources: Resources = Resources(),
                 scaling: Scaling = Scaling(), backend: str = "onnx") -> list[Path]:  # fmt: skip
    export_dir, out = Path(export_dir), Path(out)
    card = ModelCard.load(export_dir)
    if scaling.min_replicas > scaling.max_replicas:
        raise DeployError(f"--min-replicas {scaling.min_replicas} is more than --max-replicas {scaling.max_replicas}")
    out.mkdir(parents=True, exist_ok=True)
    if runtime == "torchserve":
        files = torchserve_bundle(export_dir, out, card, storage_uri=storage_uri or f"pvc://models/{card.name}",
                                  protocol=protocol, resources=resources, scaling=scaling, backend=backend)  # fmt: skip
    else:
        files = kserve_bundle(export_dir, out, card, image=image or f"torchship-{dns_name(card.name)}:latest",
                              resources=resources, scaling=scaling, backend=backend)  # fmt: skip
    problems = validate(yaml.safe_load((out / "inferenceservice.yaml").read_text()))
    if problems:
        raise DeployError(f"the InferenceService does not validate: {problems[0]}")
    return files


# Validation: walk a manifest against the SDK's generated classes (openapi_types, attribute_map).


def model_class(name: str):
    import kserve.models
    import kubernetes.client.models

    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name, None)


def misplaced(cls, key: str) -> str:
    """Where a key that is unknown here does belong, one level down: the docs' mis-indentation."""
    import difflib

    owners = [cls.attribute_map[attr] for attr, sub in cls.openapi_types.items()
              if (sub_cls := model_class(sub)) is not None and key in sub_cls.attribute_map.values()]  # fmt: skip
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
    problems = [f"{path}.{key}: not a field of {type_name}{misplaced(cls, key)}".lstrip(".")
                for key in doc if key not in by_json]  # fmt: skip
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
