"""The runtimes `torchship serve` starts, behind one interface, registered here and nowhere else.

Each is a module with the same functions (start_with, stop, status, key, load_target, card, curl_example) and a deploy
bundle writer; the CLI, the load test, the page's relay and the bench look a runtime up here by name, or by what an
instance's state directory recorded, instead of branching on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torchship.serve import deploy, oip, torchserve


@dataclass(frozen=True)
class Runtime:
    name: str
    summary: str
    start: Callable  # (process.StartOptions) -> the instance's config, once it is ready
    stop: Callable[[Path | str], bool]
    status: Callable[[Path | str], dict]
    key: Callable[[Path | str, str], str]  # a token for `Authorization: Bearer`, or ServerError
    target: Callable[[Path | str], object]  # what `torchship loadtest` sends to (client.Target)
    card: Callable  # (config) -> the served model's card
    curl: Callable  # (config, sample request body) -> a working curl line
    bundle: Callable[..., list[Path]]  # a Kubernetes deploy bundle (deploy.write_bundle)


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime(
            "torchserve",
            "TorchServe 0.12 with our handler (archived upstream in 2025; kept for its users)",
            torchserve.start_with,
            torchserve.stop,
            torchserve.status,
            torchserve.key,
            torchserve.load_target,
            torchserve.card,
            torchserve.curl_example,
            deploy.torchserve_bundle,
        ),
        Runtime(
            "oip",
            "our Open Inference Protocol server (KServe v2 over REST and gRPC): the production path",
            oip.start_with,
            oip.stop,
            oip.status,
            oip.key,
            oip.load_target,
            oip.card,
            oip.curl_example,
            deploy.oip_bundle,
        ),
    )
}
ALIASES = {"kserve": "oip"}  # its first name: `--runtime kserve`, `make serve RUNTIME=kserve` keep working
CHOICES = (*RUNTIMES, *ALIASES)
DEFAULT = "torchserve"


def get(name: str) -> Runtime:
    return RUNTIMES[ALIASES.get(name, name)]


def recorded(state_dir: Path | str) -> Runtime:
    """The runtime of the instance STATE_DIR records (TorchServe when nothing says otherwise)."""
    try:
        name = json.loads((Path(state_dir) / "instance.json").read_text()).get("runtime", DEFAULT)
    except (OSError, ValueError, AttributeError):
        name = DEFAULT
    return get(name if name in CHOICES else DEFAULT)
