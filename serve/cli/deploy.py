"""`torchship deploy kserve`: a Kubernetes bundle for an export, validated offline against the kserve SDK."""

from __future__ import annotations

from pathlib import Path

import click

from torchship.handlers.card import CARD_FILE, CardError
from torchship.handlers.formats import ORT_BACKENDS
from torchship.serve import runtimes
from torchship.serve.archive import ArchiveError
from torchship.serve.deploy import PROTOCOLS, SCALE_METRICS, DeployError, Resources, Scaling, write_bundle


@click.group("deploy")
def deploy_group():
    """Write Kubernetes deploy bundles (validated offline against the kserve SDK's model classes)."""


@deploy_group.command("kserve")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Bundle directory.")
@click.option(
    "--runtime",
    type=click.Choice(runtimes.CHOICES),
    default=runtimes.DEFAULT,
    show_default=True,
    help="KServe's TorchServe runtime with our .mar, or our OIP server in a custom container (oip).",
)
@click.option(
    "--storage-uri",
    default=None,
    help="torchserve: where you upload the bundle (s3://, gs://, pvc://...)  [default: pvc://models/NAME]",
)
@click.option("--image", default=None, help="oip: the image you build from the Dockerfile  [default: torchship-NAME]")
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="v2",
    show_default=True,
    help="torchserve: the InferenceService's protocolVersion.",
)
@click.option("--backend", type=click.Choice(ORT_BACKENDS), default="onnx", show_default=True)
@click.option("--cpu", default="1", show_default=True, help="CPU request = limit per replica; sizes its workers.")
@click.option("--memory", default="1Gi", show_default=True, help="Memory request = limit per replica.")
@click.option("--min-replicas", type=click.IntRange(0), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(1), default=3, show_default=True)
@click.option("--scale-metric", type=click.Choice(SCALE_METRICS), default="concurrency", show_default=True)
@click.option(
    "--scale-target",
    type=click.IntRange(1),
    default=None,
    help="Per replica  [default: the requests one pod batches at once: workers x measured batch size]",
)
@click.option(
    "--canary-traffic-percent",
    type=click.IntRange(0, 100),
    default=None,
    help="KServe's rollout: the share of traffic this revision gets while the last one keeps the rest",
)
def deploy_kserve_command(
    export_dir,
    out_dir,
    runtime,
    storage_uri,
    image,
    protocol,
    backend,
    cpu,
    memory,
    min_replicas,
    max_replicas,
    scale_metric,
    scale_target,
    canary_traffic_percent,
):
    """Write a KServe InferenceService bundle for EXPORT_DIR to OUT (Docker cannot run here: build it where it can)."""
    if not (Path(export_dir) / CARD_FILE).is_file():
        raise click.ClickException(f"{Path(export_dir) / CARD_FILE} not found: run `torchship export` first")
    try:
        files = write_bundle(
            export_dir,
            out_dir,
            bundle=runtimes.get(runtime).bundle,
            storage_uri=storage_uri,
            image=image,
            protocol=protocol,
            resources=Resources(cpu, memory),
            backend=backend,
            scaling=Scaling(min_replicas, max_replicas, scale_metric, scale_target, canary_traffic_percent),
        )
    except (DeployError, ArchiveError, CardError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    for f in files:
        click.echo(f"wrote {f}")
    click.echo(
        f"the InferenceService validates against the kserve SDK; apply it with: kubectl apply -f "
        f"{Path(out_dir) / 'inferenceservice.yaml'}"
    )
