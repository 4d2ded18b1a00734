"""The models and versions an OIP server serves, and where each request goes.

On disk: exports (a folder with meta.json and the model files), found below a repository folder or named one by one;
each card says the model's name and version. In the supervisor: the repository's state, one JSON document that every
worker applies (`State`). In a worker: the loaded versions and each model's route (`Repository`): the default version,
a canary share that a candidate answers, a shadow that a candidate also runs and is compared on. REST and gRPC look
requests up here; only versions whose proof passed may answer a client, an unproven one may only shadow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..card import CARD_FILE, CardError, ModelCard
from ..formats import FORMAT_BY_BACKEND, PROOF_FILE, digest

SCAN_DEPTH = 2  # REPOSITORY/NAME/VERSION/meta.json at the deepest


class RepositoryError(Exception):
    """A repository call that cannot be done: the message says why; the status is the HTTP one (404, 400, 409)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Route:
    """Where a model's requests go: the default version answers; a canary answers its share; a shadow runs on a
    copy of every request the default answers and is compared with it."""

    default: str
    canary: str | None = None
    canary_percent: float = 0.0
    shadow: str | None = None


@dataclass(frozen=True)
class Version:
    directory: str
    proven: bool
    reason: str = ""  # why it may not answer clients (no proof, a failed proof, files changed since)


@dataclass(frozen=True)
class ModelState:
    versions: dict[str, Version]
    route: Route
    # a load's configuration over the server's (Triton's load_model(config=...)): max_batch_size, max_batch_delay_ms
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class State:
    """The whole repository as the supervisor decided it: what every worker loads and routes, in one document."""

    generation: int = 0
    models: dict[str, ModelState] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> State:
        d = json.loads(text)
        models = {
            name: ModelState(
                {v: Version(**spec) for v, spec in m["versions"].items()}, Route(**m["route"]), m.get("overrides", {})
            )
            for name, m in d["models"].items()
        }
        return cls(d["generation"], models)

    def save(self, path: Path | str) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path | str) -> State:
        return cls.from_json(Path(path).read_text())

    def with_model(self, name: str, model: ModelState | None) -> State:
        models = {k: v for k, v in self.models.items() if k != name}
        if model is not None:
            models[name] = model
        return replace(self, generation=self.generation + 1, models=models)


def may_answer(versions: dict[str, Version], v: str) -> bool:
    """The one rule, at start, load and route alike: a version answers clients once its proof passed; a model none of
    whose versions has passed one is answered by any of them (unproven, and the index and the log say so)."""
    return versions[v].proven or not any(s.proven for s in versions.values())


def default_of(versions: dict[str, Version]) -> str:
    """The newest version that may answer clients."""
    return max((v for v in versions if may_answer(versions, v)), key=int)


# On disk


@dataclass(frozen=True)
class Export:
    name: str
    version: str
    directory: Path


def exports_below(root: Path | str, backend: str) -> list[Export]:
    """Every export below ROOT (ROOT itself, or up to SCAN_DEPTH folders down) holding BACKEND's model file."""
    root, found = Path(root), []
    for card_file in sorted([root / CARD_FILE, *root.glob(f"*/{CARD_FILE}"), *root.glob(f"*/*/{CARD_FILE}")]):
        directory = card_file.parent
        if not card_file.is_file() or not (directory / FORMAT_BY_BACKEND[backend].file).is_file():
            continue
        try:
            card = ModelCard.load(directory)
        except CardError as e:
            raise RepositoryError(f"{directory}: {e}") from None
        found.append(Export(card.name, card.version, directory.resolve()))
    seen: dict[tuple[str, str], Path] = {}
    for e in found:
        if (e.name, e.version) in seen:
            raise RepositoryError(
                f"{e.name} version {e.version} is in both {seen[e.name, e.version]} and "
                f"{e.directory}: export one of them with --version"
            )
        seen[e.name, e.version] = e.directory
    return found


def proof(directory: Path | str, backend: str) -> Version:
    """Whether this export's proof passed for the file it would serve, unchanged since (the proof records each
    file's sha256): only then may the version answer clients."""
    directory = Path(directory)
    report = directory / PROOF_FILE
    if not report.is_file():
        return Version(str(directory), False, f"no proof in {directory}: run `torchship verify {directory}`")
    try:
        r = json.loads(report.read_text())
    except ValueError:
        return Version(str(directory), False, f"{report} is not a proof report")
    if not r.get("passed"):
        failed = sorted({c["backend"] for c in r.get("checks", []) if not c.get("passed")})
        return Version(str(directory), False, f"its proof failed ({', '.join(failed) or 'see ' + str(report)})")
    name = FORMAT_BY_BACKEND[backend].file
    recorded = (r.get("files") or {}).get(name)
    if recorded is None:
        return Version(str(directory), False, f"the proof in {report} records no digest of {name}: verify it again")
    if recorded != digest(directory / name):
        return Version(str(directory), False, f"{name} changed since its proof: verify it again")
    return Version(str(directory), True)


# In a worker


class Model:
    """A model's loaded versions and its route."""

    def __init__(self, name: str, versions: dict, route: Route):
        self.name, self.versions, self.route = name, versions, route
        self.routed = 0  # requests routed without a version: the canary takes an exact share of them

    def pick(self, version: str | None):
        """(the version that answers, the one that shadows it or None)."""
        if version:
            if version not in self.versions:
                raise RepositoryError(
                    f"{self.name} has no version {version[:32]!r}: it serves "
                    f"{', '.join(sorted(self.versions, key=int))}",
                    404,
                )
            return self.versions[version], None
        route = self.route
        chosen = route.default
        if route.canary:
            self.routed += 1
            p = route.canary_percent
            if int(self.routed * p / 100) > int((self.routed - 1) * p / 100):
                chosen = route.canary
        shadow = route.shadow if route.shadow and route.shadow != chosen else None
        return self.versions[chosen], self.versions.get(shadow) if shadow else None


class Repository:
    """Every model a worker serves; `models` is replaced whole, so a request sees one route or the next, never half."""

    def __init__(self, state: State | None = None):
        self.models: dict[str, Model] = {}
        self.state = state or State()  # what the supervisor last committed (the index reads it)
        self.generation = self.state.generation
        self.ready = False

    def model(self, name: str) -> Model:
        m = self.models.get(name)
        if m is None:
            raise RepositoryError(
                # Triton's phrase first: its clients (and its examples) look for it; then ours
                f"Request for unknown model: {name[:64]!r} is not found (no model of that name here; this server has "
                f"{', '.join(sorted(self.models)) or 'none'})",
                404,
            )
        return m

    def get(self, name: str, version: str | None = None):
        return self.model(name).pick(version or None)

    def served(self):
        for m in self.models.values():
            yield from m.versions.values()

    def index(self, state: State | None = None) -> list[dict]:
        """The repository extension's index: every version, READY, with its role and anything against it."""
        out = []
        for name, m in sorted((state or self.state).models.items()):
            for v, spec in sorted(m.versions.items(), key=lambda kv: int(kv[0])):
                role = (
                    "default"
                    if v == m.route.default
                    else "canary"
                    if v == m.route.canary
                    else "shadow"
                    if v == m.route.shadow
                    else ""
                )
                reason = "; ".join(x for x in (role, spec.reason) if x)
                out.append({"name": name, "version": v, "state": "READY", "reason": reason})
        return out


def agreement(card: ModelCard, default, candidate) -> tuple[bool, float]:
    """A shadow's verdict on one request: whether the candidate answered every row alike (the same top-1 label; for
    values, within 1e-4 relative) and the largest element-wise difference of the batches' outputs (a classifier's
    probabilities: responses.batch_outputs)."""
    a, b = np.asarray(default, np.float64), np.asarray(candidate, np.float64)
    if a.shape != b.shape:
        return False, float("inf")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    if card.task == "classify":
        rows = len(a)
        return bool((a.reshape(rows, -1).argmax(1) == b.reshape(rows, -1).argmax(1)).all()), diff
    return diff <= 1e-4 * max(1.0, float(np.abs(a).max(initial=0.0))), diff
