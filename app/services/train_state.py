"""Cache of estimators' train-side state, so a second job on the same model and data skips that pass."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from safetensors import safe_open
from safetensors.torch import save_file
from sqlalchemy.exc import IntegrityError

from app.db.models import TrainStateEntry
from app.db.session import session_scope
from app.estimators import Estimator, InfluenceProblem, Runtime, TrainState
from app.settings import Settings
from app.storage.artifacts import ArtifactStore


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
class StateOutcome:
    state: TrainState | None
    info: dict  # for the result metadata: key, cache_hit, fit_seconds


def _load(store: ArtifactStore, uri: str) -> TrainState:
    with safe_open(str(store.path(uri)), framework="pt") as handle:
        info = json.loads((handle.metadata() or {}).get("info", "{}"))
        return TrainState(tensors={k: handle.get_tensor(k) for k in handle.keys()}, info=info)


def _save(store: ArtifactStore, state: TrainState):
    with store.staging_file(".safetensors") as staged:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}
        save_file(tensors, str(staged), metadata={"info": json.dumps(state.info)})
        return store.commit(staged, ".safetensors")


def get_or_fit(
    settings: Settings,
    store: ArtifactStore,
    estimator: Estimator,
    params,
    problem: InfluenceProblem,
    runtime: Runtime,
    inputs: dict,
) -> StateOutcome:
    """Load the state for (estimator, params, inputs) or compute and store it."""
    if not has_train_state(estimator):
        return StateOutcome(None, {})
    key, described = state_key(estimator, params, inputs)
    with session_scope(settings) as session:
        entry = session.get(TrainStateEntry, key)
        cached = (entry.uri, entry.fit_seconds) if entry is not None else None
    if cached is not None and store.path(cached[0]).exists():
        started = time.perf_counter()
        state = _load(store, cached[0])
        return StateOutcome(
            state,
            {
                "key": key,
                "cache_hit": True,
                "fit_seconds": cached[1],
                "load_seconds": round(time.perf_counter() - started, 4),
            },
        )
    started = time.perf_counter()
    state = estimator.fit(problem, params, runtime)
    fit_seconds = round(time.perf_counter() - started, 4)
    if state is None:
        return StateOutcome(None, {})
    stored = _save(store, state)
    try:
        with session_scope(settings) as session:
            existing = session.get(TrainStateEntry, key)
            if existing is None:
                session.add(
                    TrainStateEntry(
                        key=key,
                        estimator=estimator.name,
                        uri=stored.uri,
                        size_bytes=stored.size_bytes,
                        fit_seconds=fit_seconds,
                        inputs=described,
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
    return StateOutcome(state, {"key": key, "cache_hit": False, "fit_seconds": fit_seconds})
