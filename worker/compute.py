"""What a sandboxed compute child runs (worker/sandbox.py): the only place tenant weights and data meet torch.

Each task takes the assignment's JSON payload, the paths of its input artifacts and the output
folder; it writes arrays (``.npy``) and tensors (``.safetensors``) there and returns metadata as
plain JSON. Nothing here reads settings, the database or the broker: the supervisor passed in all
it needs and validates all it gets back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.estimators import (
    Checkpoint,
    Estimator,
    EstimatorError,
    InfluenceProblem,
    ProgressCallback,
    Recipe,
    Runtime,
    TaskSpec,
    TrainState,
    get_architecture,
    get_estimator,
    init_model,
    train,
)
from app.estimators.features import load_tensors, save_tensors
from app.estimators.sharding import ShardPlan, plan_shards, plan_subset_shards
from app.estimators.valuation import LDSParams, LDSSubsets, SubsetOutputs
from app.services.validation import validate_params

LDS_POINTER = "/evaluation/lds"


def shard_plans(
    sharding: dict, estimator: Estimator, n_train: int, n_checkpoints: int, budget: int | None
) -> list[ShardPlan]:
    """How to split a job: subset rows for retraining plans, else training rows x checkpoints.

    Pure, so the supervisor recomputes the child's decision from the one number it reports.
    """
    if budget is not None and sharding.get("subsets_per_shard"):
        return plan_subset_shards(budget, sharding["subsets_per_shard"])
    if not estimator.shardable_by_rows:
        return []
    return plan_shards(
        n_train,
        n_checkpoints,
        train_shard_size=sharding.get("train_shard_size"),
        by_checkpoint=bool(sharding.get("by_checkpoint")) and estimator.checkpoint_additive,
    )


def job_plans(
    sharding: dict,
    estimator: Estimator,
    n_train: int,
    n_checkpoints: int,
    budget: int | None,
    lds_masks: int | None = None,
) -> list[ShardPlan]:
    """The shards a job fans out into, or [] to run it as one task.

    The method's own shards (:func:`shard_plans`) plus, when an LDS evaluation has ``lds_masks``
    subsets to retrain, ``kind="lds"`` shards of ``subsets_per_shard`` of them (one shard when unset).
    A job fans out when its own work splits, or when its own work is one shard and the LDS subsets
    split; otherwise the single task also retrains the LDS subsets. Pure, like :func:`shard_plans`.
    """
    own = shard_plans(sharding, estimator, n_train, n_checkpoints, budget)
    per = sharding.get("subsets_per_shard")
    lds = (
        [dataclasses.replace(p, kind="lds") for p in plan_subset_shards(lds_masks, per or lds_masks)]
        if lds_masks
        else []
    )
    if len(own) > 1 or (len(own) == 1 and len(lds) > 1):
        return [dataclasses.replace(p, index=i) for i, p in enumerate(own + lds)]
    return []


def plain(value: Any) -> Any:
    """``value`` as JSON the supervisor accepts: numpy/torch scalars unwrapped, non-finite floats as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _labels(y: np.ndarray, task: str) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.long if task == "classification" else torch.float32)


def _model(spec: dict) -> torch.nn.Module:
    arch = get_architecture(spec["architecture"])
    params = validate_params(arch.Params, spec["architecture_params"], "/architecture/params")
    return init_model(arch, params, seed=int(spec["seed"]))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["X"], data["y"]


def read_state(path: Path) -> TrainState:
    """A cached train state, memory-mapped (copy-on-write): tensors are paged in as they are used."""
    tensors, metadata = load_tensors(path)
    return TrainState(tensors=tensors, info=json.loads(metadata.get("info", "{}")))


def _write_state(path: Path, state: TrainState, budget: int | None = None) -> None:
    """The state as safetensors, streamed from its (possibly memory-mapped) tensors in row blocks."""
    save_tensors(path, state.tensors, {"info": json.dumps(plain(state.info))}, budget=budget)


def _problem(payload: dict, inputs: dict[str, Path]) -> tuple[InfluenceProblem, Estimator, Any]:
    task = payload["model"]["task"]
    train_x, train_y = _arrays(inputs["train"])
    query_x, query_y = (train_x, train_y) if inputs["query"] == inputs["train"] else _arrays(inputs["query"])
    rows = np.asarray(payload["query_rows"], dtype=np.int64)
    problem = InfluenceProblem(
        model=_model(payload["model"]),
        task=TaskSpec(kind=task, loss=payload["model"]["loss"]),
        weights=_weights(inputs["weights"]),
        train_x=torch.as_tensor(train_x),
        train_y=_labels(train_y, task),
        query_x=torch.as_tensor(query_x[rows]),
        query_y=_labels(query_y[rows], task),
        measurement=payload["measurement"],
        checkpoints=[
            Checkpoint(
                step=c["step"], learning_rate=c["learning_rate"], state=_weights(inputs[f"checkpoint_{i}"])
            )
            for i, c in enumerate(payload["checkpoints"])
        ],
        weight_decay=payload["weight_decay"],
        recipe=payload["recipe"],
        initial_weights=_weights(inputs["initial_weights"]) if "initial_weights" in inputs else None,
    )
    estimator = get_estimator(payload["method"]["name"])
    params = validate_params(estimator.Params, payload["method"]["params"], "/method/params")
    return problem, estimator, params


def _runtime(
    spec: dict, problem: InfluenceProblem, progress: ProgressCallback, scratch: Path | None = None
) -> Runtime:
    """Chunk size bounded by the memory budget: a chunk of per-sample gradients is rows x p floats.

    The same budget bounds the train-side features kept in RAM; larger ones are memory-mapped files
    in ``scratch`` (the child's scratch folder, removed by the supervisor afterwards).
    """
    n_params = sum(p.numel() for p in problem.model.parameters())
    bytes_per_row = 4 * n_params * 4  # the gradient chunk plus vmap's intermediates, float32
    budget = int(spec["memory_budget_bytes"])
    chunk = max(1, min(spec["chunk_size"], budget // max(bytes_per_row, 1)))
    return Runtime(
        device=_device(spec["device"]),
        chunk_size=int(chunk),
        progress=progress,
        memory_budget_bytes=budget,
        scratch_dir=scratch,
    )


def _state(
    estimator: Estimator,
    params: Any,
    problem: InfluenceProblem,
    runtime: Runtime,
    fit: bool,
    inputs: dict[str, Path],
    out: Path,
) -> tuple[TrainState | None, dict | None]:
    """The cached state when the supervisor passed one, else a fresh fit written to ``state.safetensors``."""
    started = time.perf_counter()
    if "state" in inputs:
        state = read_state(inputs["state"])
        return state, {"load_seconds": round(time.perf_counter() - started, 4)}
    if not fit:
        return None, None
    state = estimator.fit(problem, params, runtime)
    if state is None:
        return None, None
    fit_seconds = round(time.perf_counter() - started, 4)
    _write_state(out / "state.safetensors", state, runtime.memory_budget_bytes)
    return state, {"fit_seconds": fit_seconds}


def _save_arrays(out: Path, **arrays: np.ndarray | None) -> None:
    for name, array in arrays.items():
        if array is not None:
            np.save(out / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)


def _lds(payload: dict) -> dict | None:
    """The job's LDS evaluation: ``{"params", "n_masks", "train"}`` (train: retrain its subsets here)."""
    return (payload.get("evaluation") or {}).get("lds")


def _lds_masks_to_train(payload: dict) -> int | None:
    lds = _lds(payload)
    return int(lds["n_masks"]) if lds and lds["train"] else None


def _train_lds(
    problem: InfluenceProblem, lds: dict, runtime: Runtime, start: int = 0, stop: int | None = None
) -> SubsetOutputs:
    """Retrain rows ``start..stop-1`` of the LDS evaluation's subsets (progress phase ``lds-...``)."""
    estimator = LDSSubsets()
    params = validate_params(LDSParams, lds["params"], LDS_POINTER)
    report = runtime.progress
    lds_runtime = dataclasses.replace(
        runtime, progress=lambda phase, done, total: report(f"lds-{phase}", done, total)
    )
    try:
        plan = estimator.plan(problem, params, start=start, stop=stop)
        return estimator.train_subsets(problem, params, plan, lds_runtime)
    except EstimatorError as exc:  # name the evaluation's fields, not the method's
        if exc.parameter and exc.parameter.startswith("/method/params"):
            exc.parameter = LDS_POINTER + exc.parameter[len("/method/params") :]
        raise


def _save_outputs(out: Path, prefix: str, outputs: SubsetOutputs) -> dict:
    _save_arrays(out, **{f"{prefix}.{name}": array for name, array in outputs.arrays.items()})
    return {"names": sorted(outputs.arrays), "info": plain(outputs.info)}


def _stored_outputs(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A cached subset-outputs artifact (masks, seeds, measured sets, info) the supervisor passed in."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(str(arrays.pop("info")))


def influence(payload: dict, inputs: dict[str, Path], out: Path, progress: ProgressCallback) -> dict:
    """A whole job: fit or load the train state, then either report that it fans out or attribute.

    Fixed-fraction retraining methods (``payload["subsets"]``) estimate from the cached outputs the
    supervisor passed (``inputs["subset_outputs"]``), else train and write their outputs
    (``subset.<name>.npy``) for the cache; an LDS evaluation whose subsets must be trained writes
    theirs as ``lds.<name>.npy``.
    """
    progress("loading", 0, 1)
    problem, estimator, params = _problem(payload, inputs)
    runtime = _runtime(payload["runtime"], problem, progress, out.parent)
    state, state_meta = _state(estimator, params, problem, runtime, payload["fit_state"], inputs, out)
    cached = "subset_outputs" in inputs
    budget = None if cached else estimator.retrain_budget(problem, params)
    meta: dict[str, Any] = {"state": state_meta, "retrain_budget": budget}
    plans = job_plans(
        payload["sharding"],
        estimator,
        problem.n_train,
        len(problem.checkpoints),
        budget,
        _lds_masks_to_train(payload),
    )
    if plans:
        return meta
    started = time.perf_counter()
    if payload.get("subsets") is not None:
        attribution, outputs = estimator.attribute_with_outputs(
            problem,
            params,
            want_self_influence=payload["self_influence"],
            runtime=runtime,
            stored=_stored_outputs(inputs["subset_outputs"]) if cached else None,
        )
        if not cached:
            meta["subset_outputs"] = _save_outputs(out, "subset", outputs)
    else:
        attribution = estimator.attribute(
            problem,
            params,
            want_scores=True,
            want_self_influence=payload["self_influence"],
            runtime=runtime,
            state=state,
        )
    group_scores = None
    if payload.get("groups"):
        group_scores = estimator.group_scores(
            problem,
            params,
            payload["groups"]["rows"],
            payload["groups"]["order"],
            runtime=runtime,
            state=state,
        )
    meta.update(
        compute_seconds=round(time.perf_counter() - started, 4),
        device=str(runtime.device),
        chunk_size=runtime.chunk_size,
        metadata=plain(attribution.metadata),
    )
    if _lds_masks_to_train(payload):
        started = time.perf_counter()
        lds_outputs = _train_lds(problem, _lds(payload), runtime)
        meta["lds"] = {
            **_save_outputs(out, "lds", lds_outputs),
            "seconds": round(time.perf_counter() - started, 4),
        }
    _save_arrays(
        out,
        scores=attribution.scores,
        scores_stderr=attribution.scores_stderr,
        self_influence=attribution.self_influence,
        values=attribution.values,
        values_stderr=attribution.values_stderr,
        group_scores=group_scores,
    )
    return meta


def estimate(payload: dict, inputs: dict[str, Path], out: Path, progress: ProgressCallback) -> dict:
    """A fanned-out retraining job's estimate from the outputs its shards trained, merged and checked by
    the supervisor (``inputs["merged_outputs"]``): the estimator's arithmetic on the tenant's problem."""
    progress("merging", 0, 1)
    problem, estimator, params = _problem(payload, inputs)
    arrays, info = _stored_outputs(inputs["merged_outputs"])
    started = time.perf_counter()
    plan = estimator.plan(problem, params)
    attribution = estimator.estimate(problem, params, plan, SubsetOutputs(arrays, info))
    _save_arrays(
        out,
        scores=attribution.scores,
        scores_stderr=attribution.scores_stderr,
        self_influence=attribution.self_influence,
        values=attribution.values,
        values_stderr=attribution.values_stderr,
    )
    seconds = round(time.perf_counter() - started, 4)
    return {"compute_seconds": seconds, "metadata": plain(attribution.metadata)}


def shard(payload: dict, inputs: dict[str, Path], out: Path, progress: ProgressCallback) -> dict:
    """One shard of a fanned-out job: training rows (and checkpoints), or rows of a retraining plan."""
    progress("loading", 0, 1)
    problem, estimator, params = _problem(payload, inputs)
    runtime = _runtime(payload["runtime"], problem, progress, out.parent)
    plan = payload["plan"]
    started = time.perf_counter()
    if plan["kind"] in ("subsets", "lds"):
        if plan["kind"] == "lds":
            outputs = _train_lds(problem, _lds(payload), runtime, plan["train_lo"], plan["train_hi"])
        else:
            subsets = estimator.plan(problem, params, start=plan["train_lo"], stop=plan["train_hi"])
            want_self = payload["self_influence"] and estimator.supports_self_influence
            outputs = estimator.train_subsets(problem, params, subsets, runtime, self_influence=want_self)
        saved = _save_outputs(out, "subset", outputs)
        return {
            "subsets": saved["names"],
            "info": saved["info"],
            "compute_seconds": round(time.perf_counter() - started, 4),
        }
    state, state_meta = _state(estimator, params, problem, runtime, payload["fit_state"], inputs, out)
    if plan["checkpoint_indices"] is not None:
        problem = dataclasses.replace(
            problem, checkpoints=[problem.checkpoints[i] for i in plan["checkpoint_indices"]]
        )
    attribution = estimator.attribute(
        problem,
        params,
        want_scores=True,
        want_self_influence=payload["self_influence"],
        runtime=runtime,
        state=state,
        train_range=(plan["train_lo"], plan["train_hi"]),
    )
    _save_arrays(
        out,
        scores=attribution.scores,
        self_influence=attribution.self_influence,
        scores_stderr=attribution.scores_stderr,
    )
    return {
        "state": state_meta,
        "metadata": plain(attribution.metadata),
        "compute_seconds": round(time.perf_counter() - started, 4),
    }


def training(payload: dict, inputs: dict[str, Path], out: Path, progress: ProgressCallback) -> dict:
    """Train a registered model from its recipe (and its initial weights, when it has them); weights and
    checkpoints come back as safetensors."""
    task = payload["model"]["task"]
    x, y = _arrays(inputs["train"])
    model = _model(payload["model"])
    if "initial_weights" in inputs:
        model.load_state_dict(_weights(inputs["initial_weights"]))
    result = train(
        model,
        TaskSpec(kind=task, loss=payload["model"]["loss"]),
        torch.as_tensor(x),
        _labels(y, task),
        validate_params(Recipe, payload["recipe"], "/recipe"),
        progress=progress,
        device=_device(payload["device"]),
    )

    def save(state: dict[str, torch.Tensor], name: str) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / name))

    save(result.weights, "weights.safetensors")
    for i, checkpoint in enumerate(result.checkpoints):
        save(checkpoint.state, f"checkpoint_{i}.safetensors")
    return {
        "checkpoints": [
            {"step": int(c.step), "learning_rate": float(c.learning_rate)} for c in result.checkpoints
        ]
    }
