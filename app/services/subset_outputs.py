"""Cache of retraining outputs: a fixed-fraction plan's masks, seeds and trained measurements.

Downsampling, Datamodels and the LDS evaluation of any scoring estimator all train one model per
random subset of the training set and measure it on the queries (``"query"``, K x m) and, for
Downsampling's memorisation, on the training set (``"train"``, K x n). Which models get trained
depends only on the :class:`~app.estimators.valuation.SubsetSpec` (plan size, alpha, sampler seed,
training seed, effective recipe, solver, measured sets) and on the model, data, queries and
measurement; never on the method. So the outputs are stored once, as one artifact, under a key
hashing exactly those inputs plus the code version, and any later job that needs the same outputs
estimates from the artifact instead of retraining.

Entries live in the ``train_state`` table (``estimator`` column = :data:`NAMESPACE`), beside the
gradient estimators' train-side state; their keys never collide because the namespace is hashed in.
The worker looks entries up before it starts compute, and stores what a compute child (or the
merged shards) trained once it has validated it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.db.models import TrainStateEntry
from app.db.session import retry_transaction
from app.estimators import EstimatorError
from app.estimators.valuation import SubsetOutputs, SubsetPlan, SubsetSpec, choose_solver
from app.problems import ProblemError
from app.services import train_state
from app.services.models import meta_module
from app.services.train_state import code_version
from app.settings import Settings
from app.storage.artifacts import ArtifactStore, StoredArtifact

NAMESPACE = "subset-outputs"
RESERVED = ("masks", "seeds", "info")


def fingerprint(
    *,
    tenant_id: str,
    architecture: str,
    architecture_params: dict,
    task: str,
    loss: str,
    weights_sha256: str | None,
    train_sha256: str,
    initial_weights_sha256: str | None = None,
    query_sha256: str,
    query_rows: np.ndarray | list[int],
    measurement: str,
) -> dict[str, Any]:
    """The model, data, queries and measurement that retrained outputs depend on (plain JSON).

    Scoped by tenant: a cache hit must not tell one tenant that another holds the same model and data.
    """
    rows = np.ascontiguousarray(query_rows, dtype=np.int64)
    return {
        "tenant_id": tenant_id,
        "model": {
            "architecture": architecture,
            "architecture_params": architecture_params,
            "task": task,
            "loss": loss,
            "weights_sha256": weights_sha256,
            "initial_weights_sha256": initial_weights_sha256,
        },
        "train_dataset_sha256": train_sha256,
        "query_dataset_sha256": query_sha256,
        "query_rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest(),
        "n_query": int(rows.size),
        "measurement": measurement,
    }


def resolve_solver(architecture: str, architecture_params: dict, spec: SubsetSpec) -> str:
    """``spec.solver`` as the engine will resolve it ("auto" -> newton/batched/sequential), decided on a
    meta-device copy of the architecture (no weights, no data); unchanged when the engine would refuse it."""
    try:
        return choose_solver(meta_module(architecture, architecture_params), spec.recipe, spec.solver)
    except (EstimatorError, ProblemError):
        return spec.solver


def describe(spec: SubsetSpec, fingerprint: dict, solver: str, outputs: tuple[str, ...]) -> dict[str, Any]:
    plan = {**spec.describe(), "solver": solver, "outputs": sorted(outputs)}
    return {"namespace": NAMESPACE, "code": code_version(), **fingerprint, "plan": plan}


def cache_key(described: dict) -> str:
    raw = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Hit:
    key: str
    uri: str
    outputs: tuple[str, ...]
    train_seconds: float


@dataclass(frozen=True)
class Lookup:
    """Where a job's subset outputs are stored (``key``) and, when present, the entry to reuse.

    ``hit`` may be an entry with more measured sets than needed (a Downsampling-with-memorisation
    entry serves a query-only job); ``plan_key`` ignores the measured sets, to tell when two specs
    of one job (the method's and its LDS evaluation's) train the same models.
    """

    spec: SubsetSpec
    key: str
    plan_key: str
    described: dict
    hit: Hit | None


def _candidates(needed: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Measured sets whose entries hold every needed set, exact match first."""
    options = [("query",), ("query", "train")]
    return [o for o in options if set(needed) <= set(o)] if set(needed) <= {"query", "train"} else []


def lookup(
    settings: Settings,
    store: ArtifactStore,
    spec: SubsetSpec,
    fingerprint: dict,
    solver: str,
    *,
    reuse: bool = True,
) -> Lookup:
    described = describe(spec, fingerprint, solver, spec.outputs)
    key = cache_key(described)
    plan_key = cache_key(describe(spec, fingerprint, solver, ()))
    hit = None
    if reuse:
        keys = {cache_key(describe(spec, fingerprint, solver, o)): o for o in _candidates(spec.outputs)}

        def read(session) -> Hit | None:
            for candidate, outputs in keys.items():
                entry = session.get(TrainStateEntry, candidate)
                if entry is not None and entry.estimator == NAMESPACE and store.path(entry.uri).exists():
                    return Hit(candidate, entry.uri, outputs, entry.fit_seconds)
            return None

        hit = retry_transaction(settings, read)
    return Lookup(spec, key, plan_key, described, hit)


def to_arrays(plan: SubsetPlan, outputs: SubsetOutputs, info: dict) -> dict[str, np.ndarray]:
    return {
        "masks": plan.masks,
        "seeds": plan.seeds,
        **{name: np.asarray(value, dtype=np.float64) for name, value in outputs.arrays.items()},
        "info": np.array(json.dumps(info)),
    }


def load(store: ArtifactStore, uri: str) -> tuple[dict[str, np.ndarray], dict]:
    """An entry's arrays (masks, seeds and one array per measured set) and its info."""
    arrays = store.load_npz(uri)
    info = json.loads(str(arrays.pop("info")))
    return arrays, info


def load_outputs(store: ArtifactStore, hit: Hit, needed: tuple[str, ...]) -> tuple[SubsetPlan, SubsetOutputs]:
    arrays, info = load(store, hit.uri)
    plan = SubsetPlan(arrays["masks"], arrays["seeds"])
    kept = {k: info[k] for k in ("solver", "n_trained") if k in info}
    return plan, SubsetOutputs({name: arrays[name] for name in needed}, kept)


def save(
    settings: Settings,
    store: ArtifactStore,
    found: Lookup,
    plan: SubsetPlan,
    outputs: SubsetOutputs,
    train_seconds: float,
) -> StoredArtifact | None:
    """Store validated outputs of ``found.spec`` (trained by this job) under ``found.key``.

    Outputs are a deterministic function of the key, so when another job stored them first its
    entry is kept; a row whose file vanished is pointed at the new file.
    """
    if set(outputs.arrays) != set(found.spec.outputs) or set(outputs.arrays) & set(RESERVED):
        raise ValueError(f"outputs {sorted(outputs.arrays)} do not match the spec's {found.spec.outputs}")
    info = {
        "solver": outputs.info.get("solver"),
        "n_trained": outputs.info.get("n_trained"),
        "n_masks": len(plan),
        "train_seconds": round(float(train_seconds), 4),
        "key": found.key,
    }
    existing = retry_transaction(settings, lambda session: session.get(TrainStateEntry, found.key))
    if existing is not None and store.path(existing.uri).exists():
        return None
    stored = store.put_npz(**to_arrays(plan, outputs, info))
    train_state.record(settings, found.key, NAMESPACE, stored, float(train_seconds), found.described)
    return stored
