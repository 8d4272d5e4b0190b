"""Cache of estimators' train-side state, so a second job on the same model and data skips that pass.

Split in two because the fit runs in the sandboxed compute child (worker/sandbox.py): the worker
looks the state up before it starts the child, and stores what the child fitted once it has
validated it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from safetensors.torch import save_file
from sqlalchemy.exc import IntegrityError

from app.db.models import TrainStateEntry
from app.db.session import session_scope
from app.estimators import Estimator, TrainState
from app.settings import Settings
from app.storage.artifacts import ArtifactStore, StoredArtifact


def code_version() -> str:
    try:
        return version("influence-service")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "source"


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
    with session_scope(settings) as session:
        entry = session.get(TrainStateEntry, key)
        cached = (entry.uri, entry.fit_seconds) if entry is not None else None
    if cached is not None and store.path(cached[0]).exists():
        return Lookup(key, described, cached[0], cached[1])
    return Lookup(key, described, None, None)


def _save(store: ArtifactStore, state: TrainState) -> StoredArtifact:
    with store.staging_file(".safetensors") as staged:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}
        save_file(tensors, str(staged), metadata={"info": json.dumps(state.info)})
        return store.commit(staged, ".safetensors")


def save(
    settings: Settings,
    store: ArtifactStore,
    found: Lookup,
    estimator: Estimator,
    state: TrainState,
    fit_seconds: float,
) -> None:
    """Store a freshly fitted (and already validated) state under ``found.key``."""
    stored = _save(store, state)
    try:
        with session_scope(settings) as session:
            existing = session.get(TrainStateEntry, found.key)
            if existing is None:
                session.add(
                    TrainStateEntry(
                        key=found.key,
                        estimator=estimator.name,
                        uri=stored.uri,
                        size_bytes=stored.size_bytes,
                        fit_seconds=fit_seconds,
                        inputs=found.described,
                    )
                )
            else:  # a stale row whose file vanished
                existing.uri, existing.size_bytes, existing.fit_seconds = (
                    stored.uri,
                    stored.size_bytes,
                    fit_seconds,
                )
    except IntegrityError:
        pass  # another worker stored the same state first
