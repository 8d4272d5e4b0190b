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
from app.estimators.sharding import ShardPlan, plan_shards, plan_subset_shards
from app.services.validation import validate_params


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
    with safe_open(str(path), framework="pt") as handle:
        info = json.loads((handle.metadata() or {}).get("info", "{}"))
        return TrainState(tensors={k: handle.get_tensor(k) for k in handle.keys()}, info=info)


def _write_state(path: Path, state: TrainState) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}
    save_file(tensors, str(path), metadata={"info": json.dumps(plain(state.info))})


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
    )
    estimator = get_estimator(payload["method"]["name"])
    params = validate_params(estimator.Params, payload["method"]["params"], "/method/params")
    return problem, estimator, params


def _runtime(spec: dict, problem: InfluenceProblem, progress: ProgressCallback) -> Runtime:
    """Chunk size bounded by the memory budget: a chunk of per-sample gradients is rows x p floats."""
    n_params = sum(p.numel() for p in problem.model.parameters())
    bytes_per_row = 4 * n_params * 4  # the gradient chunk plus vmap's intermediates, float32
    chunk = max(1, min(spec["chunk_size"], spec["memory_budget_bytes"] // max(bytes_per_row, 1)))
    return Runtime(device=_device(spec["device"]), chunk_size=int(chunk), progress=progress)


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
    _write_state(out / "state.safetensors", state)
    return state, {"fit_seconds": fit_seconds}


def _save_arrays(out: Path, **arrays: np.ndarray | None) -> None:
    for name, array in arrays.items():
        if array is not None:
            np.save(out / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)


def influence(payload: dict, inputs: dict[str, Path], out: Path, progress: ProgressCallback) -> dict:
    """A whole job: fit or load the train state, then either report that it fans out or attribute."""
    progress("loading", 0, 1)
    problem, estimator, params = _problem(payload, inputs)
    runtime = _runtime(payload["runtime"], problem, progress)
    state, state_meta = _state(estimator, params, problem, runtime, payload["fit_state"], inputs, out)
    budget = estimator.retrain_budget(problem, params)
    meta: dict[str, Any] = {"state": state_meta, "retrain_budget": budget}
    plans = shard_plans(payload["sharding"], estimator, problem.n_train, len(problem.checkpoints), budget)
    if len(plans) > 1:
        return meta
    started = time.perf_counter()
    attribution = estimator.attribute(
        problem,
        params,
        want_scores=True,
        want_self_influence=payload["self_influence"],
        runtime=runtime,
        state=state,
    )
    meta.update(
        compute_seconds=round(time.perf_counter() - started, 4),
        device=str(runtime.device),
        chunk_size=runtime.chunk_size,
        metadata=plain(attribution.metadata),
    )
    _save_arrays(
        out,
        scores=attribution.scores,
        self_influence=attribution.self_influence,
        values=attribution.values,
        values_stderr=attribution.values_stderr,
    )
    return meta


def shard(payload: dict, inputs: dict[str, Path], out: Path, progress: ProgressCallback) -> dict:
    """One shard of a fanned-out job: training rows (and checkpoints), or rows of a retraining plan."""
    progress("loading", 0, 1)
    problem, estimator, params = _problem(payload, inputs)
    runtime = _runtime(payload["runtime"], problem, progress)
    plan = payload["plan"]
    started = time.perf_counter()
    if plan["kind"] == "subsets":
        subsets = estimator.plan(problem, params, start=plan["train_lo"], stop=plan["train_hi"])
        outputs = estimator.train_subsets(problem, params, subsets, runtime)
        _save_arrays(out, **{f"subset.{name}": array for name, array in outputs.arrays.items()})
        return {
            "subsets": sorted(outputs.arrays),
            "info": plain(outputs.info),
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
    _save_arrays(out, scores=attribution.scores, self_influence=attribution.self_influence)
    return {"state": state_meta, "compute_seconds": round(time.perf_counter() - started, 4)}


def training(payload: dict, inputs: dict[str, Path], out: Path, progress: ProgressCallback) -> dict:
    """Train a registered model from its recipe; weights and checkpoints come back as safetensors."""
    task = payload["model"]["task"]
    x, y = _arrays(inputs["train"])
    result = train(
        _model(payload["model"]),
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
