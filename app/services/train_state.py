"""Cache of estimators' train-side state, so a second job on the same model and data skips that pass.

Split in two because the fit runs in the sandboxed compute child (worker/sandbox.py): the worker
looks the state up before it starts the child, and stores what the child fitted once it has
validated it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from app import estimators
from app.db.models import TrainStateEntry
from app.db.session import retry_transaction
from app.estimators import Estimator
from app.settings import Settings
from app.storage.artifacts import ArtifactStore, StoredArtifact


@cache
def code_version() -> str:
    """The package version and a digest of the estimator library's source.

    Cached states and retrained outputs are what this code computed: a deploy that changes a fit
    must miss them, and the package version alone rarely moves between deploys."""
    try:
        package = version("influence-service")
    except PackageNotFoundError:  # running from a source tree that is not installed
        package = "source"
    return f"{package}+{source_digest(Path(estimators.__file__).parent)}"


def source_digest(root: Path) -> str:
    """A digest of the names and contents of the ``.py`` files under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def has_train_state(estimator: Estimator) -> bool:
    return type(estimator).fit is not Estimator.fit


def state_key(estimator: Estimator, params, inputs: dict) -> tuple[str, dict]:
    described = {
        "estimator": estimator.name,
        "params": estimator.state_params(params),
        "code": code_version(),
        **inputs,
    }
    raw = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest(), described


@dataclass
class Lookup:
    """The cache key of one (estimator, params, inputs), and the stored state if there is one."""

    key: str
    described: dict
    uri: str | None
    fit_seconds: float | None


def lookup(
    settings: Settings, store: ArtifactStore, estimator: Estimator, params, inputs: dict
) -> Lookup | None:
    """None when the estimator has no train state; else its key and the cached file, if present."""
    if not has_train_state(estimator):
        return None
    key, described = state_key(estimator, params, inputs)

    def read(session) -> tuple[str, float | None] | None:
        entry = session.get(TrainStateEntry, key)
        return (entry.uri, entry.fit_seconds) if entry is not None else None

    cached = retry_transaction(settings, read)
    if cached is not None and store.path(cached[0]).exists():
        return Lookup(key, described, cached[0], cached[1])
    return Lookup(key, described, None, None)


def save(
    settings: Settings,
    store: ArtifactStore,
    found: Lookup,
    estimator: Estimator,
    staged: Path,
    fit_seconds: float,
    sha256: str | None = None,
) -> None:
    """Store a freshly fitted state under ``found.key``: its safetensors file, already validated and
    staged on the store's filesystem (:meth:`ArtifactStore.staging_file`; ``sha256`` when known), is
    committed as it is, never loaded or re-serialised."""
    stored = store.commit(staged, ".safetensors", sha256)
    record(settings, found.key, estimator.name, stored, fit_seconds, found.described)


def record(
    settings: Settings, key: str, namespace: str, stored: StoredArtifact, seconds: float, described: dict
) -> None:
    """Point the cache entry ``key`` at ``stored``: insert it, or repair a row whose file vanished."""

    def write(session) -> None:
        existing = session.get(TrainStateEntry, key)
        if existing is None:
            session.add(
                TrainStateEntry(
                    key=key,
                    estimator=namespace,
                    uri=stored.uri,
                    size_bytes=stored.size_bytes,
                    fit_seconds=seconds,
                    inputs=described,
                )
            )
        else:
            existing.uri, existing.size_bytes, existing.fit_seconds = stored.uri, stored.size_bytes, seconds

    try:
        retry_transaction(settings, write)  # a dropped connection must not fail the job it caches for
    except IntegrityError:
        pass  # another worker stored the same entry first
