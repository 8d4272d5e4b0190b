"""Service-facing retraining estimators, registered in :data:`app.estimators.base.REGISTRY`.

Each one exposes the three shardable pieces plus an in-process pipeline:

* ``plan(problem, params, ...)`` -> :class:`SubsetPlan` (static methods) or
  ``sampler(problem, params)`` -> a round sampler (adaptive methods);
* ``train_subsets(problem, params, plan, runtime)`` -> :class:`SubsetOutputs` for any
  row range of a plan (one shard);
* ``estimate(problem, params, ...)`` -> :class:`Attribution` from merged outputs;
* ``attribute(problem, params)`` runs sampler -> engine -> estimator in-process.

:class:`InfluenceProblem` has no validation set, and its recipe may be absent:

* the recipe is ``params.recipe``, else ``problem.recipe`` (the service fills it with
  the model's registered recipe), else ``Recipe()`` defaults with the problem's
  ``weight_decay``;
* the **query set doubles as the validation set**: utilities (``"accuracy"``, or
  ``"loss"`` meaning minus the mean loss) are computed on ``(query_x, query_y)``.

Pointwise methods (``loo``, ``downsampling``, ``datamodels``) return ``scores``
m x n in the problem's measurement (positive = proponent); valuation methods
(``shapley_exact``, ``tmc_shapley``, ``beta_shapley``, ``banzhaf_msr``,
``knn_shapley``) return ``values`` (n, positive = helpful) and ``values_stderr``
with ``scores = None``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from annotated_types import Ge, Gt, Le

from ..base import (
    Attribution,
    Estimator,
    EstimatorError,
    InfluenceProblem,
    NumericalError,
    ProblemSize,
    Runtime,
    register,
)
from ..gradients import as_params, column_range, metadata, numpy_dtype, validate_problem
from ..training import Recipe, validate_recipe
from .datamodels import datamodels_estimate
from .driver import RunResult, run_until
from .engine import SubsetOutputs, linear_layer, train_subsets
from .knn import knn_shapley, penultimate_embedder
from .samplers import (
    MAX_EXHAUSTIVE_N,
    PermutationSampler,
    PermutationSamples,
    StreamSampler,
    SubsetPlan,
    derived_seed,
    exhaustive_plan,
    fixed_fraction_plan,
    loo_plan,
)
from .semivalues import (
    DifferenceOfMeansAccumulator,
    PermutationAccumulator,
    beta_cardinality_weights,
    downsampling_estimate,
    exact_shapley,
    loo_estimate,
    mean_and_stderr,
    memorisation_estimate,
    msr_banzhaf_estimate,
    permutation_contributions,
    utility_table,
)


def _p(default: Any, description: str) -> Any:
    return field(default=default, metadata={"description": description})


# ----------------------------------------------------------------------------- parameters


@dataclass
class RetrainingParams:
    """How every subset is retrained (shared by all retraining estimators)."""

    recipe: Recipe | None = _p(
        None,
        "training recipe replayed on every subset; null: Recipe defaults with the problem's weight_decay. "
        "Pass the model's own recipe to retrain the way the model was trained",
    )
    solver: Literal["auto", "newton", "batched", "sequential"] = _p(
        "auto",
        "newton: exact minimiser for linear models (float64); batched: K models in lock-step with "
        "torch.func.vmap (SGD/Adam/AdamW); sequential: one model at a time; auto: newton for a linear "
        "model with an lbfgs recipe, else batched when the model has no buffers/dropout, else sequential",
    )
    train_seed: Annotated[int, Ge(0)] | None = _p(
        None, "initialisation/shuffling seed of every retrain; null: the recipe's seed"
    )
    seed_per_mask: bool = _p(
        False,
        "derive a different training seed for every subset from `seed` (seed noise then averages out "
        "over subsets); false keeps the learner a deterministic function of the subset",
    )
    seed: Annotated[int, Ge(0)] = _p(0, "seed of the subset sampler")
    n_models_per_batch: Annotated[int, Ge(1)] = _p(64, "models trained together (memory/speed trade-off)")


LOO_MIN_REPEATS_NONCONVEX = 5
"""ESTIMATORS.md 2.1: seeds per retrain, 1 for convex models, at least 5 for neural nets."""


@dataclass
class LOOParams(RetrainingParams):
    """Leave-one-out: retrain without each training example; score = q(D without i) - q(D)."""

    repeats: Annotated[int, Ge(1)] = _p(
        1,
        "train the full set and every leave-one-out set this many times (paired seeds) and average; "
        f"1 suffices for a linear (convex) model, use >= {LOO_MIN_REPEATS_NONCONVEX} for a neural net, "
        "whose seed-to-seed variation can exceed the effect of one point. With repeats > 1 the "
        "metadata reports the seed noise and the scores' standard errors",
    )


@dataclass
class DownsamplingParams(RetrainingParams):
    """Downsampling (Feldman & Zhang 2020): mean objective over subsets without i minus with i."""

    alpha: Annotated[float, Gt(0), Le(0.99)] = _p(0.7, "subset size as a fraction of n")
    n_masks: Annotated[int, Ge(4)] = _p(1000, "number of random subsets (models) to train")


@dataclass
class DatamodelsParams(RetrainingParams):
    """Datamodels (Ilyas et al. 2022): per-query sparse linear fit of the objective on subset masks."""

    alpha: Annotated[float, Gt(0), Le(0.99)] = _p(0.5, "subset size as a fraction of n")
    n_masks: Annotated[int, Ge(4)] = _p(1000, "number of random subsets (models) to train")
    regression: Literal["lasso", "ridge"] = _p("lasso", "LASSO (coordinate descent) or ridge fit")
    l1: Annotated[float, Ge(0)] | None = _p(
        None, "LASSO penalty; null: chosen per query on held-out masks (every 5th)"
    )
    l2: Annotated[float, Gt(0)] = _p(1e-3, "ridge penalty")
    max_train_rows: Annotated[int, Ge(1)] = _p(
        8192, "refuse larger training sets: the fit holds n x n float64 Gram matrices (0.5 GB at 8,192)"
    )


@dataclass
class UtilityParams(RetrainingParams):
    """Retraining data valuation against a utility on the query (validation) set."""

    utility: Literal["accuracy", "loss"] = _p(
        "accuracy", "utility on the query set: accuracy, or minus the mean loss ('loss', also for regression)"
    )


@dataclass
class ShapleyExactParams(UtilityParams):
    """Exact Data Shapley by training on all 2^n subsets (tiny training sets only)."""

    max_n: Annotated[int, Ge(1), Le(MAX_EXHAUSTIVE_N)] = _p(14, "refuse training sets larger than this")


@dataclass
class AdaptiveParams(UtilityParams):
    """Monte-Carlo valuation run in rounds until the standard errors are small or the budget is spent."""

    tolerance: Annotated[float, Ge(0)] = _p(
        0.0, "stop when the largest standard error falls below this (0: run the whole budget)"
    )
    max_retrains: Annotated[int, Ge(1)] = _p(2000, "budget: models trained")
    max_seconds: Annotated[float, Gt(0)] = _p(3600.0, "budget: wall-clock seconds")
    min_samples: Annotated[int, Ge(2)] = _p(30, "samples before the tolerance rule may stop the run")
    cache: bool = _p(True, "reuse the utility of a subset already trained (only with shared seeds)")


@dataclass
class TMCShapleyParams(AdaptiveParams):
    """TMC-Shapley (Ghorbani & Zou 2019): permutation sampling with truncation."""

    truncation: Annotated[float, Ge(0)] = _p(
        0.01, "stop a permutation once |U(D) - U(prefix)| <= truncation * |U(D)| (0: no truncation)"
    )


@dataclass
class BetaShapleyParams(AdaptiveParams):
    """Beta Shapley (Kwon & Zou 2022): permutation sampling reweighted by subset size."""

    alpha: Annotated[float, Gt(0)] = _p(16.0, "Beta alpha; alpha > beta favours small subsets")
    beta: Annotated[float, Gt(0)] = _p(1.0, "Beta beta")
    truncation: Annotated[float, Ge(0)] = _p(0.0, "as in tmc_shapley (0: no truncation)")


@dataclass
class BanzhafMSRParams(AdaptiveParams):
    """Data Banzhaf (Wang & Jia 2023) with the maximum-sample-reuse estimator."""


@dataclass
class KNNShapleyParams:
    """Exact KNN-Shapley (Jia et al. 2019) of a K-nearest-neighbour classifier; no retraining."""

    k: Annotated[int, Ge(1)] = _p(5, "neighbours K")
    metric: Literal["euclidean", "cosine"] = _p("euclidean", "distance between feature vectors")
    embedding: Literal["raw", "penultimate"] = _p(
        "raw", "features: the raw inputs, or the input of the model's last Linear layer at its weights"
    )
    per_query_scores: bool = _p(False, "also return the per-query values as scores (m x n)")
    chunk_size: Annotated[int, Ge(1)] = _p(256, "queries processed at once")


# ----------------------------------------------------------------------------- shared machinery


def effective_recipe(p: RetrainingParams, model_recipe: Recipe | dict | None, weight_decay: float) -> Recipe:
    """The recipe every subset is retrained with: ``p.recipe``, else the model's own (``model_recipe``,
    as :attr:`InfluenceProblem.recipe`), else defaults with ``weight_decay``; ``p.train_seed`` replaces
    its seed and no checkpoints are kept. Needs no tensors, so the service can key caches on it."""
    r = p.recipe if p.recipe is not None else model_recipe
    if r is None:
        r = Recipe(weight_decay=float(weight_decay))
    elif isinstance(r, dict):
        try:
            r = Recipe(**r)
        except TypeError as e:
            raise EstimatorError(f"invalid recipe: {e}", parameter="/method/params/recipe") from None
    validate_recipe(r)
    if p.train_seed is not None:
        r = dataclasses.replace(r, seed=int(p.train_seed))
    return dataclasses.replace(r, num_checkpoints=0)


def _recipe(problem: InfluenceProblem, p: RetrainingParams) -> Recipe:
    """The parameters' recipe, else the one the model was trained with, else defaults."""
    return effective_recipe(p, problem.recipe, problem.weight_decay)


def _shared_seed(problem: InfluenceProblem, p: RetrainingParams) -> int | None:
    """The training seed of every subset, or None for per-mask seeds."""
    return None if p.seed_per_mask else _recipe(problem, p).seed


def starting_point(
    problem: InfluenceProblem, runtime: Runtime
) -> torch.nn.Module | Callable[[int], torch.nn.Module]:
    """What retraining starts from: the problem's initial weights for every seed when it has them;
    else a template whose trainable parameters each seed re-draws, and whose frozen ones (a LoRA
    base, a frozen feature extractor) hold the registered weights, since training never changed them."""
    model = copy.deepcopy(problem.model)
    with torch.no_grad():
        if problem.initial_weights is not None:
            model.load_state_dict(problem.initial_weights)
        else:
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    param.copy_(problem.weights[name])
    model = model.to(runtime.dtype)
    if problem.initial_weights is not None:
        return lambda _seed: copy.deepcopy(model)
    return model


class _Retraining(Estimator):
    """Common plumbing: recipe, eval sets and the call into the engine."""

    needs_checkpoints = False
    supports_self_influence = False
    shardable_by_rows = False
    valuation = False

    def _measure(self, problem: InfluenceProblem, p: Any, self_influence: bool, train_range) -> tuple:
        if self.valuation:
            kind = "accuracy" if p.utility == "accuracy" else "neg_loss"
            if kind == "accuracy" and problem.task.kind != "classification":
                raise EstimatorError(
                    "utility 'accuracy' needs a classification model; use 'loss'",
                    parameter="/method/params/utility",
                )
            return {"utility": (problem.query_x, problem.query_y)}, {"utility": kind}
        sets = {"query": (problem.query_x, problem.query_y)}
        measure = {"query": problem.measurement}
        if self_influence:
            lo, hi = column_range(problem, train_range)
            sets["train"] = (problem.train_x[lo:hi], problem.train_y[lo:hi])
            measure["train"] = problem.measurement
        return sets, measure

    def _validate(self, problem: InfluenceProblem) -> None:
        validate_problem(problem, need_queries=True)
        if problem.n_train == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        if problem.n_query == 0:
            raise EstimatorError(
                "retraining estimators need at least one query (the query set is also the validation set)",
                parameter="/query_dataset_id",
            )

    def train_subsets(
        self,
        problem: InfluenceProblem,
        params: Any,
        plan: SubsetPlan,
        runtime: Runtime | None = None,
        *,
        self_influence: bool = False,
        train_range: tuple[int, int] | None = None,
    ) -> SubsetOutputs:
        """Train every row of ``plan`` (or of a shard of it) and measure what :meth:`estimate` needs.

        Keys: ``"utility"`` (K) for valuation methods; ``"query"`` (K x m) and, with
        ``self_influence``, ``"train"`` (K x (hi - lo)) for pointwise methods.
        """
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        sets, measure = self._measure(problem, p, self_influence, train_range)
        return train_subsets(
            starting_point(problem, runtime),
            problem.task,
            _recipe(problem, p),
            problem.train_x,
            problem.train_y,
            plan.masks,
            plan.seeds,
            sets,
            measure,
            solver=p.solver,
            n_models_per_batch=p.n_models_per_batch,
            device=runtime.device,
            progress=runtime.progress,
        )

    def _metadata(self, problem: InfluenceProblem, p: Any, **extra: Any) -> dict[str, Any]:
        recipe = _recipe(problem, p)
        return metadata(
            self.name,
            problem,
            normalisation="none",
            recipe=dataclasses.asdict(recipe),
            validation_set="query set",
            **extra,
        )


class _CachedTrainer:
    """``plan -> outputs`` that trains each distinct (mask, seed) once (deterministic learners)."""

    def __init__(self, estimator: _Retraining, problem, params, runtime, enabled: bool) -> None:
        self.estimator, self.problem, self.params, self.runtime = estimator, problem, params, runtime
        self.enabled = enabled
        self.cache: dict[tuple[bytes, int], float] = {}
        self.solver: str | None = None

    def __call__(self, plan: SubsetPlan) -> SubsetOutputs:
        if not self.enabled:
            out = self.estimator.train_subsets(self.problem, self.params, plan, self.runtime)
            self.solver = out.info.get("solver")
            return out
        keys = [(np.packbits(m).tobytes(), int(s)) for m, s in zip(plan.masks, plan.seeds, strict=True)]
        missing: dict[tuple[bytes, int], int] = {}
        for r, key in enumerate(keys):
            if key not in self.cache and key not in missing:
                missing[key] = r
        trained = 0
        if missing:
            rows = list(missing.values())
            sub = SubsetPlan(plan.masks[rows], plan.seeds[rows])
            out = self.estimator.train_subsets(self.problem, self.params, sub, self.runtime)
            self.solver = out.info.get("solver")
            trained = int(out.info.get("n_trained", len(rows)))
            for key, value in zip(missing, out["utility"], strict=True):
                self.cache[key] = float(value)
        utility = np.array([self.cache[k] for k in keys], dtype=np.float64)
        return SubsetOutputs({"utility": utility}, {"n_trained": trained, "solver": self.solver})


def _slice_values(values: np.ndarray, stderr: np.ndarray, problem, train_range, dtype):
    lo, hi = column_range(problem, train_range)
    return values[lo:hi].astype(dtype), stderr[lo:hi].astype(dtype)


# ----------------------------------------------------------------------------- pointwise


@register
class LOO(_Retraining):
    name = "loo"
    summary = "leave-one-out retraining: q(D without z_i) - q(D) for every query (Cook 1977)"
    Params = LOOParams
    supports_self_influence = True
    shardable_by_rows = True

    def plan(self, problem: InfluenceProblem, params: Any, *, train_range=None) -> SubsetPlan:
        """The full set plus each training index in ``train_range`` removed (x ``repeats`` seeds)."""
        p = as_params(self.Params, params)
        lo, hi = column_range(problem, train_range)
        base = loo_plan(problem.n_train, indices=range(lo, hi), train_seed=_recipe(problem, p).seed)
        if p.repeats == 1:
            return base
        parts = []
        for rep in range(p.repeats):
            seed = _recipe(problem, p).seed if rep == 0 else derived_seed(p.seed, rep)
            parts.append(SubsetPlan(base.masks, np.full(len(base), seed), dict(base.meta), dict(base.info)))
        return SubsetPlan.concat(parts)

    def estimate(
        self,
        problem: InfluenceProblem,
        params: Any,
        plan: SubsetPlan,
        outputs: SubsetOutputs,
        *,
        runtime: Runtime | None = None,
        train_range=None,
        want_scores: bool = True,
    ) -> Attribution:
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        dtype = numpy_dtype(runtime.dtype)
        lo, hi = column_range(problem, train_range)
        scores, idx = loo_estimate(plan, outputs["query"])
        if not np.array_equal(idx, np.arange(lo, hi)):
            raise EstimatorError("the leave-one-out plan does not cover the requested training range")
        self_inf = None
        if "train" in outputs.arrays:
            tr = outputs["train"]  # (K, hi - lo)
            removed = plan.meta["removed"]
            full = tr[removed == -1].mean(axis=0)
            self_inf = np.array([tr[removed == i, i - lo].mean() - full[i - lo] for i in range(lo, hi)])
            self_inf = self_inf.astype(dtype)
        noise, stderr = _loo_noise(problem, p, plan, outputs["query"], scores)
        return Attribution(
            scores=scores.astype(dtype) if want_scores else None,
            self_influence=self_inf,
            metadata=self._metadata(
                problem,
                p,
                repeats=p.repeats,
                solver=outputs.info.get("solver"),
                n_retrains=outputs.info.get("n_trained"),
                **noise,
            ),
            scores_stderr=stderr.astype(dtype) if want_scores and stderr is not None else None,
        )

    def attribute(
        self,
        problem,
        params=None,
        *,
        want_scores=True,
        want_self_influence=False,
        runtime=None,
        state=None,
        train_range=None,
    ):
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        self._validate(problem)
        plan = self.plan(problem, p, train_range=train_range)
        outputs = self.train_subsets(
            problem, p, plan, runtime, self_influence=want_self_influence, train_range=train_range
        )
        return self.estimate(
            problem, p, plan, outputs, runtime=runtime, train_range=train_range, want_scores=want_scores
        )


def _loo_noise(
    problem: InfluenceProblem, p: LOOParams, plan: SubsetPlan, q: np.ndarray, scores
) -> tuple[dict, np.ndarray | None]:
    """Seed-noise diagnostics of a leave-one-out run (ESTIMATORS.md 2.1 pitfall), and the scores'
    standard errors (m x n_removed, None with one repeat).

    ``convex_model``: the model is a single linear layer (its L2-regularised objective is convex).
    A non-convex model with fewer than :data:`LOO_MIN_REPEATS_NONCONVEX` repeats gets a
    ``warnings`` entry. With ``repeats > 1`` (the plan being ``repeats`` equal blocks, one seed
    each): ``seed_noise``, the across-seed standard deviation (ddof 1) of the full-data query
    objective ``q(D)``, averaged over queries (how far one retraining moves on the seed alone);
    ``stderr_mean`` / ``stderr_max``, the standard errors of the averaged scores from the paired
    per-seed differences ``q_r(D without i) - q_r(D)``; ``mean_abs_score``; and
    ``resolved_fraction``, the share of scores with ``|score| > 2 stderr``.
    """
    convex = linear_layer(problem.model) is not None
    out: dict[str, Any] = {"convex_model": convex}
    if not convex and p.repeats < LOO_MIN_REPEATS_NONCONVEX:
        out["warnings"] = [
            f"leave-one-out on a non-convex model with repeats = {p.repeats}: the seed-to-seed variation "
            "of a retrained network is usually larger than the effect of removing one point, so these "
            f"scores are mostly seed noise. Use repeats >= {LOO_MIN_REPEATS_NONCONVEX} (the metadata then "
            "reports the noise floor), or the LDS instead of LOO to evaluate estimators (ESTIMATORS.md 2.1)"
        ]
    R = int(p.repeats)
    K = len(plan)
    if R < 2 or K % R:
        return out, None
    removed = np.asarray(plan.meta["removed"]).reshape(R, K // R)
    seeds = plan.seeds.reshape(R, K // R)
    if not (
        (removed == removed[0]).all() and (seeds == seeds[:, :1]).all() and (removed[0] == -1).sum() == 1
    ):
        return out, None  # not the blocks LOO.plan makes: no paired differences
    qb = np.asarray(q, dtype=np.float64).reshape(R, K // R, -1)  # (R, rows per block, m)
    full = qb[:, removed[0] == -1, :][:, 0, :]  # (R, m)
    diffs = qb[:, removed[0] >= 0, :] - full[:, None, :]  # (R, n_removed, m), rows in removed order
    order = np.argsort(removed[0][removed[0] >= 0], kind="stable")
    stderr = diffs[:, order, :].std(axis=0, ddof=1).T / np.sqrt(R)  # (m, n_removed) like the scores
    abs_scores = np.abs(np.asarray(scores, dtype=np.float64)).reshape(stderr.shape)
    out.update(
        seed_noise=float(full.std(axis=0, ddof=1).mean()),
        stderr_mean=float(stderr.mean()) if stderr.size else 0.0,
        stderr_max=float(stderr.max()) if stderr.size else 0.0,
        mean_abs_score=float(abs_scores.mean()) if abs_scores.size else 0.0,
        resolved_fraction=float((abs_scores > 2 * stderr).mean()) if stderr.size else 0.0,
    )
    return out, stderr


@dataclass(frozen=True)
class SubsetSpec:
    """Everything about a fixed-fraction retraining plan that determines its trained outputs, and
    nothing about the method that consumes them: Downsampling, Datamodels and the LDS evaluation
    with equal specs (on the same model, data, queries and measurement) train identical models.

    ``train_seed`` None means per-mask seeds derived from ``seed``; ``outputs`` names the measured
    sets (``"query"``, plus ``"train"`` for Downsampling's memorisation). ``solver`` is as requested
    (the service resolves ``"auto"`` before keying on it).
    """

    n_masks: int
    alpha: float
    seed: int
    train_seed: int | None
    recipe: Recipe
    solver: str
    outputs: tuple[str, ...] = ("query",)

    def plan(self, n: int, *, start: int = 0, stop: int | None = None) -> SubsetPlan:
        """Rows ``start..stop-1`` (default: all) of the plan over ``n`` training examples."""
        stop = self.n_masks if stop is None else min(int(stop), self.n_masks)
        return fixed_fraction_plan(
            n, max(0, stop - start), alpha=self.alpha, seed=self.seed, start=start, train_seed=self.train_seed
        )

    def describe(self) -> dict[str, Any]:
        """Plain JSON (numbers normalised, so ``1`` and ``1.0`` describe the same recipe)."""
        recipe = {
            f.name: float(v) if isinstance(f.default, float) else v
            for f, v in ((f, getattr(self.recipe, f.name)) for f in dataclasses.fields(self.recipe))
        }
        return {
            "sampler": "fixed_fraction",
            "n_masks": int(self.n_masks),
            "alpha": float(self.alpha),
            "seed": int(self.seed),
            "train_seed": "per-mask" if self.train_seed is None else int(self.train_seed),
            "recipe": recipe,
            "solver": self.solver,
            "outputs": sorted(self.outputs),
        }


def reuse_outputs(
    spec: SubsetSpec, plan: SubsetPlan, arrays: dict[str, np.ndarray], info: dict, n_query: int
) -> SubsetOutputs:
    """Stored outputs of ``spec`` checked against this problem's ``plan`` (K rows, m queries, n columns),
    reduced to the sets ``spec`` measures (a stored ``"train"`` is dropped when not asked for)."""
    K, n = plan.masks.shape
    masks, seeds = arrays.get("masks"), arrays.get("seeds")
    if (
        masks is None
        or seeds is None
        or not (
            np.array_equal(np.asarray(masks, dtype=bool), plan.masks) and np.array_equal(seeds, plan.seeds)
        )
    ):
        raise EstimatorError("stored subset outputs do not match the plan's masks and seeds")
    shapes = {"query": (K, n_query), "train": (K, n)}
    picked = {}
    for name in spec.outputs:
        value = arrays.get(name)
        if value is None or value.shape != shapes[name] or not np.isfinite(value).all():
            raise EstimatorError(
                f"stored subset outputs lack a finite {name!r} array of shape {shapes[name]}"
            )
        picked[name] = np.asarray(value, dtype=np.float64)
    kept = {k: info[k] for k in ("solver", "n_trained") if k in info}
    return SubsetOutputs(picked, kept)


class _RandomSubsets(_Retraining):
    """Downsampling and Datamodels: a fixed-fraction plan of ``n_masks`` rows."""

    def retrain_budget(self, problem: InfluenceProblem, params: Any) -> int:
        return as_params(self.Params, params).n_masks

    def subset_spec(
        self,
        params: Any,
        *,
        model_recipe: Recipe | dict | None,
        weight_decay: float,
        self_influence: bool = False,
    ) -> SubsetSpec:
        """What determines this job's trained outputs (no tensors needed): the service's cache key."""
        p = as_params(self.Params, params)
        recipe = effective_recipe(p, model_recipe, weight_decay)
        want_train = self_influence and self.supports_self_influence
        return SubsetSpec(
            n_masks=int(p.n_masks),
            alpha=float(p.alpha),
            seed=int(p.seed),
            train_seed=None if p.seed_per_mask else int(recipe.seed),
            recipe=recipe,
            solver=p.solver,
            outputs=("query", "train") if want_train else ("query",),
        )

    def attribute_with_outputs(
        self,
        problem: InfluenceProblem,
        params: Any,
        *,
        want_self_influence: bool = False,
        runtime: Runtime | None = None,
        stored: tuple[dict[str, np.ndarray], dict] | None = None,
    ) -> tuple[Attribution, SubsetOutputs]:
        """:meth:`attribute` that also returns the trained outputs (for the service's cache), or that
        estimates from ``stored`` ``(arrays, info)`` outputs of the same spec without training."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        self._validate(problem)
        plan = self.plan(problem, p)
        want_self = want_self_influence and self.supports_self_influence
        if stored is not None:
            spec = self.subset_spec(
                p,
                model_recipe=problem.recipe,
                weight_decay=problem.weight_decay,
                self_influence=want_self,
            )
            outputs = reuse_outputs(spec, plan, stored[0], stored[1], problem.n_query)
        else:
            outputs = self.train_subsets(problem, p, plan, runtime, self_influence=want_self)
        return self.estimate(problem, p, plan, outputs, runtime=runtime), outputs

    def plan(self, problem: InfluenceProblem, params: Any, *, start: int = 0, stop: int | None = None):
        """Rows ``start..stop-1`` (default: all ``n_masks``) of the fixed-fraction stream."""
        p = as_params(self.Params, params)
        stop = p.n_masks if stop is None else min(int(stop), p.n_masks)
        return fixed_fraction_plan(
            problem.n_train,
            max(0, stop - start),
            alpha=p.alpha,
            seed=p.seed,
            start=start,
            train_seed=_shared_seed(problem, p),
        )

    def attribute(
        self,
        problem,
        params=None,
        *,
        want_scores=True,
        want_self_influence=False,
        runtime=None,
        state=None,
        train_range=None,
    ):
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        self._validate(problem)
        plan = self.plan(problem, p)
        want_self = want_self_influence and self.supports_self_influence
        outputs = self.train_subsets(
            problem, p, plan, runtime, self_influence=want_self, train_range=train_range
        )
        return self.estimate(
            problem, p, plan, outputs, runtime=runtime, train_range=train_range, want_scores=want_scores
        )


@register
class Downsampling(_RandomSubsets):
    name = "downsampling"
    summary = "Downsampling / subsampled influence and memorisation (Feldman & Zhang 2020)"
    Params = DownsamplingParams
    supports_self_influence = True

    def estimate(
        self, problem, params, plan, outputs, *, runtime=None, train_range=None, want_scores=True
    ) -> Attribution:
        """Scores m x n (``train_range`` columns); self-influence = memorisation if outputs have "train".

        Standard errors (``sqrt(s_in^2/K_in + s_out^2/K_out)`` per (query, point) pair, from
        :func:`difference_of_means`) are summarised in the metadata: ``stderr_max`` / ``stderr_mean``
        over all pairs, ``k_in_min`` / ``k_out_min`` (the fewest subsets any point was in / out of),
        and ``self_influence_stderr_max`` / ``_mean`` for the returned memorisation values; the
        per-pair errors are the Attribution's ``scores_stderr``.
        NumericalError when some point was in (or out of) fewer than two subsets."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        dtype = numpy_dtype(runtime.dtype)
        lo, hi = column_range(problem, train_range)
        scores, stderr = downsampling_estimate(plan.masks, outputs["query"])
        if not np.isfinite(stderr).all():
            raise NumericalError(
                "some training example was in (or out of) fewer than two of the sampled subsets; "
                "raise n_masks or move alpha away from 0 and 1",
                parameter="/method/params/n_masks",
            )
        self_inf = None
        extra: dict[str, Any] = {}
        if "train" in outputs.arrays:
            train_q = outputs["train"]  # K x n, or K x (hi - lo) when measured on the range only
            if train_q.shape[1] == problem.n_train:
                mem, mem_se = (a[lo:hi] for a in memorisation_estimate(plan.masks, train_q))
            else:
                mem, mem_se = memorisation_estimate(plan.masks[:, lo:hi], train_q)
            self_inf = mem.astype(dtype)
            extra = {
                "self_influence_stderr_max": float(mem_se.max()) if mem_se.size else 0.0,
                "self_influence_stderr_mean": float(mem_se.mean()) if mem_se.size else 0.0,
            }
        k_in = plan.masks.sum(axis=0)
        return Attribution(
            scores=scores[:, lo:hi].astype(dtype) if want_scores else None,
            scores_stderr=stderr[:, lo:hi].astype(dtype) if want_scores else None,
            self_influence=self_inf,
            metadata=self._metadata(
                problem,
                p,
                alpha=p.alpha,
                n_masks=len(plan),
                stderr_max=float(stderr.max()) if stderr.size else 0.0,
                stderr_mean=float(stderr.mean()) if stderr.size else 0.0,
                # the rarest point's subset counts: its pairs carry the largest standard errors
                k_in_min=int(k_in.min()) if k_in.size else 0,
                k_out_min=int((len(plan) - k_in).min()) if k_in.size else 0,
                solver=outputs.info.get("solver"),
                n_retrains=outputs.info.get("n_trained"),
                **extra,
            ),
        )


@register
class Datamodels(_RandomSubsets):
    name = "datamodels"
    summary = "Datamodels: per-query LASSO of the objective on subset masks (Ilyas et al. 2022)"
    Params = DatamodelsParams

    def check(self, problem_size: ProblemSize, params) -> None:
        self._check_rows(problem_size.n_train, as_params(self.Params, params))

    @staticmethod
    def _check_rows(n: int, p: DatamodelsParams) -> None:
        if n > p.max_train_rows:
            raise EstimatorError(
                f"datamodels fits on n x n Gram matrices of the subset masks: n = {n} training rows need "
                f"{8 * n * n / 1e9:.1f} GB each, over max_train_rows = {p.max_train_rows}. Use a smaller "
                "training set, or raise max_train_rows on workers with the memory",
                parameter="/method/params/max_train_rows",
            )

    def estimate(
        self, problem, params, plan, outputs, *, runtime=None, train_range=None, want_scores=True
    ) -> Attribution:
        p = as_params(self.Params, params)
        self._check_rows(problem.n_train, p)
        runtime = runtime or Runtime()
        dtype = numpy_dtype(runtime.dtype)
        lo, hi = column_range(problem, train_range)
        scores, info = datamodels_estimate(
            plan.masks, outputs["query"], regression=p.regression, l1=p.l1, l2=p.l2
        )
        extra = {"l1": [float(v) for v in info["l1"]]} if "l1" in info else {"l2": p.l2}
        return Attribution(
            scores=scores[:, lo:hi].astype(dtype) if want_scores else None,
            self_influence=None,
            metadata=self._metadata(
                problem,
                p,
                alpha=p.alpha,
                n_masks=len(plan),
                regression=p.regression,
                solver=outputs.info.get("solver"),
                n_retrains=outputs.info.get("n_trained"),
                **extra,
            ),
        )


# ----------------------------------------------------------------------------- LDS evaluation


@dataclass
class LDSParams(RetrainingParams):
    """The retrained subsets an LDS evaluation (ESTIMATORS.md 4.2) compares a score matrix against."""

    alpha: Annotated[float, Gt(0), Le(0.99)] = _p(0.5, "subset size as a fraction of n")
    n_masks: Annotated[int, Ge(4)] = _p(100, "number of random subsets (models) to train")


class LDSSubsets(_RandomSubsets):
    """The subsets of an LDS evaluation: a fixed-fraction plan retrained like Datamodels' (same
    :class:`SubsetSpec`, so the two share stored outputs). Not a registered estimator."""

    name = "lds"
    summary = "retrained subsets for the Linear Datamodeling Score"
    Params = LDSParams
    supports_self_influence = False


def returns_scores(estimator: Estimator, params: Any) -> bool:
    """Whether ``estimator`` with ``params`` returns an m x n score matrix (what the LDS evaluates):
    not the valuation methods, whose attribution is a vector of data values."""
    if getattr(estimator, "values_only", False):
        return False
    if isinstance(estimator, KNNShapley):
        return bool(as_params(KNNShapleyParams, params).per_query_scores)
    return True


# ----------------------------------------------------------------------------- valuation


class _Valuation(_Retraining):
    valuation = True
    values_only = True  # data values (see returns_scores)
    group_orders = ()  # data values, no per-query scores to group

    def _finish(self, problem, p, values, stderr, train_range, runtime, **extra) -> Attribution:
        if not (np.isfinite(values).all() and np.isfinite(stderr).all()):
            raise NumericalError(
                "too few samples for a standard error: some training example was seen fewer than twice "
                "in (or out of) the sampled subsets; raise max_retrains",
                parameter="/method/params/max_retrains",
            )
        dtype = numpy_dtype(runtime.dtype)
        v, s = _slice_values(values, stderr, problem, train_range, dtype)
        return Attribution(
            scores=None,
            self_influence=None,
            values=v,
            values_stderr=s,
            metadata=self._metadata(problem, p, utility=p.utility, **extra),
        )


@register
class ShapleyExact(_Valuation):
    name = "shapley_exact"
    summary = "exact Data Shapley by retraining on all 2^n subsets (n <= max_n)"
    Params = ShapleyExactParams

    def check(self, problem_size: ProblemSize, params) -> None:
        p = as_params(self.Params, params)
        if problem_size.n_train > p.max_n:
            raise EstimatorError(
                f"shapley_exact trains 2^n models; n = {problem_size.n_train} exceeds max_n = {p.max_n}. "
                "Use tmc_shapley, banzhaf_msr or knn_shapley",
                parameter="/method/params/max_n",
            )

    def plan(self, problem: InfluenceProblem, params: Any) -> SubsetPlan:
        p = as_params(self.Params, params)
        self.check(ProblemSize(problem.n_train, problem.n_query, 0, 0), p)
        return exhaustive_plan(problem.n_train, train_seed=_recipe(problem, p).seed, max_n=p.max_n)

    def estimate(self, problem, params, plan, outputs, *, runtime=None, train_range=None) -> Attribution:
        p = as_params(self.Params, params)
        table = utility_table(plan, outputs["utility"])
        values = exact_shapley(table)
        return self._finish(
            problem,
            p,
            values,
            np.zeros_like(values),
            train_range,
            runtime or Runtime(),
            u_full=float(table[-1]),
            u_empty=float(table[0]),
            n_retrains=outputs.info.get("n_trained"),
            solver=outputs.info.get("solver"),
        )

    def attribute(
        self,
        problem,
        params=None,
        *,
        want_scores=True,
        want_self_influence=False,
        runtime=None,
        state=None,
        train_range=None,
    ):
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        self._validate(problem)
        plan = self.plan(problem, p)
        return self.estimate(
            problem,
            p,
            plan,
            self.train_subsets(problem, p, plan, runtime),
            runtime=runtime,
            train_range=train_range,
        )


class _Adaptive(_Valuation):
    def sampler(self, problem: InfluenceProblem, params: Any):
        raise NotImplementedError

    def accumulator(self, problem: InfluenceProblem, params: Any):
        raise NotImplementedError

    def trainer(self, problem, params, runtime=None):
        """``plan -> outputs`` for :func:`run_until` (with the utility cache when seeds are shared)."""
        p = as_params(self.Params, params)
        return _CachedTrainer(self, problem, p, runtime or Runtime(), p.cache and not p.seed_per_mask)

    def run(
        self, problem, params, runtime=None, *, trainer=None, sampler=None, accumulator=None
    ) -> RunResult:
        """:func:`run_until` with this method's sampler and accumulator (or the fresh ones passed, to
        inspect afterwards); ``trainer`` defaults to :meth:`trainer` (the service can pass one that
        shards every round over workers)."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        self._validate(problem)
        return run_until(
            sampler if sampler is not None else self.sampler(problem, p),
            trainer if trainer is not None else self.trainer(problem, p, runtime),
            accumulator if accumulator is not None else self.accumulator(problem, p),
            tolerance=p.tolerance,
            max_retrains=p.max_retrains,
            max_seconds=p.max_seconds,
            batch_size=p.n_models_per_batch * 4,
            min_samples=p.min_samples,
            progress=runtime.progress,
        )

    def attribute(
        self,
        problem,
        params=None,
        *,
        want_scores=True,
        want_self_influence=False,
        runtime=None,
        state=None,
        train_range=None,
    ):
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        trainer = self.trainer(problem, p, runtime)
        self._validate(problem)
        sampler, acc = self.sampler(problem, p), self.accumulator(problem, p)
        res = self.run(problem, p, runtime, trainer=trainer, sampler=sampler, accumulator=acc)
        return self._finish(
            problem,
            p,
            res.values,
            res.stderr,
            train_range,
            runtime,
            n_samples=res.n_samples,
            n_retrains=res.n_retrains,
            n_trained=res.n_trained,
            rounds=res.n_rounds,
            seconds=res.seconds,
            stopped_by=res.stopped_by,
            max_stderr=float(np.max(res.stderr)) if res.stderr.size else 0.0,
            solver=trainer.solver,
            **self._run_metadata(p, sampler, acc, res),
        )

    def _run_metadata(self, p, sampler, accumulator, res: RunResult) -> dict[str, Any]:
        return {}


class _PermutationMethod(_Adaptive):
    def sampler(self, problem, params) -> PermutationSampler:
        p = as_params(self.Params, params)
        return PermutationSampler(
            problem.n_train,
            seed=p.seed,
            train_seed=_shared_seed(problem, p),
            truncation=p.truncation,
            # whole walks per round without truncation; with it, about 8 prefixes per walk per round
            in_flight=max(
                1, p.n_models_per_batch * 4 // (max(1, problem.n_train - 1) if p.truncation == 0 else 8)
            ),
            # the budget less the full-set row: walks that could not finish are never started
            max_rows=p.max_retrains - 1,
        )

    def _weights(self, n: int, p) -> np.ndarray | None:
        return None

    def _run_metadata(self, p, sampler: PermutationSampler, accumulator: PermutationAccumulator, res):
        out = _truncation_metadata(
            sampler.n, np.concatenate(accumulator.truncated_at) if accumulator.truncated_at else []
        )
        if sampler.u_full is not None:
            out.update(u_full=sampler.u_full, u_empty=sampler.u_empty)
            if self._weights(sampler.n, p) is None:
                # Shapley: each untruncated walk telescopes to U(D) - U(empty); a walk truncated at a
                # prefix within truncation * |U(D)| of U(D) misses at most that much
                out["efficiency_gap"] = float(sampler.u_full - sampler.u_empty - res.values.sum())
        return out

    def accumulator(self, problem, params) -> PermutationAccumulator:
        p = as_params(self.Params, params)
        return PermutationAccumulator(problem.n_train, self._weights(problem.n_train, p))

    def estimate(self, problem, params, samples: PermutationSamples, *, runtime=None, train_range=None):
        """Values from completed permutation walks (merged across rounds and shards)."""
        p = as_params(self.Params, params)
        values, stderr = mean_and_stderr(
            permutation_contributions(
                samples.perms, samples.prefix_utilities, self._weights(problem.n_train, p)
            )
        )
        return self._finish(
            problem,
            p,
            values,
            stderr,
            train_range,
            runtime or Runtime(),
            n_samples=samples.n_walks,
            **_truncation_metadata(problem.n_train, samples.truncated_at),
        )


def _truncation_metadata(n: int, truncated_at) -> dict[str, float]:
    """``truncated_walks``: the share of walks stopped early; ``zeroed_marginals``: the share of
    (walk, point) marginals set to 0 by truncation (the late points whose values it biases)."""
    t = np.asarray(truncated_at, dtype=np.float64).reshape(-1)
    if t.size == 0:
        return {"truncated_walks": 0.0, "zeroed_marginals": 0.0}
    return {
        "truncated_walks": float((t < n).mean()),
        "zeroed_marginals": float(((n - t) / max(n, 1)).mean()),
    }


@register
class TMCShapley(_PermutationMethod):
    name = "tmc_shapley"
    summary = "truncated Monte-Carlo Data Shapley by permutation sampling (Ghorbani & Zou 2019)"
    Params = TMCShapleyParams


@register
class BetaShapley(_PermutationMethod):
    name = "beta_shapley"
    summary = "Beta(alpha, beta) Shapley semivalue by reweighted permutation sampling (Kwon & Zou 2022)"
    Params = BetaShapleyParams

    def _weights(self, n: int, p) -> np.ndarray:
        return beta_cardinality_weights(n, p.alpha, p.beta)


@register
class BanzhafMSR(_Adaptive):
    name = "banzhaf_msr"
    summary = "Data Banzhaf values with the maximum-sample-reuse estimator (Wang & Jia 2023)"
    Params = BanzhafMSRParams

    def sampler(self, problem, params) -> StreamSampler:
        p = as_params(self.Params, params)
        return StreamSampler(
            problem.n_train, "bernoulli", seed=p.seed, train_seed=_shared_seed(problem, p), alpha=0.5
        )

    def retrain_budget(self, problem: InfluenceProblem, params: Any) -> int:
        """Sharded runs use the fixed budget ``max_retrains`` (the tolerance stop is in-process only)."""
        return as_params(self.Params, params).max_retrains

    def plan(self, problem, params, *, start: int = 0, stop: int | None = None) -> SubsetPlan:
        """Rows ``start..stop-1`` (default: ``max_retrains``) of the Bernoulli(1/2) stream."""
        from .samplers import bernoulli_plan

        p = as_params(self.Params, params)
        stop = p.max_retrains if stop is None else int(stop)
        return bernoulli_plan(
            problem.n_train,
            max(0, stop - start),
            seed=p.seed,
            start=start,
            train_seed=_shared_seed(problem, p),
        )

    def accumulator(self, problem, params) -> DifferenceOfMeansAccumulator:
        return DifferenceOfMeansAccumulator(problem.n_train, "utility")

    def estimate(self, problem, params, plan, outputs, *, runtime=None, train_range=None) -> Attribution:
        p = as_params(self.Params, params)
        values, stderr = msr_banzhaf_estimate(plan.masks, outputs["utility"])
        return self._finish(
            problem, p, values, stderr, train_range, runtime or Runtime(), n_samples=len(plan)
        )


# ----------------------------------------------------------------------------- KNN-Shapley


@register
class KNNShapley(Estimator):
    name = "knn_shapley"
    summary = "exact KNN-Shapley of a KNN classifier on raw or penultimate features (Jia et al. 2019)"
    Params = KNNShapleyParams
    needs_checkpoints = False
    supports_self_influence = False
    shardable_by_rows = False

    def attribute(
        self,
        problem,
        params=None,
        *,
        want_scores=True,
        want_self_influence=False,
        runtime=None,
        state=None,
        train_range=None,
    ):
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=True)
        if problem.task.kind != "classification":
            raise EstimatorError("knn_shapley needs a classification task", parameter="/method/name")
        if problem.n_query == 0:
            raise EstimatorError(
                "knn_shapley needs queries (its validation set)", parameter="/query_dataset_id"
            )
        embed = penultimate_embedder(problem.model, problem.weights) if p.embedding == "penultimate" else None
        started = time.perf_counter()
        runtime.progress("knn_shapley", 0, 1)
        values, per = knn_shapley(
            problem.train_x,
            problem.train_y,
            problem.query_x,
            problem.query_y,
            p.k,
            metric=p.metric,
            embed=embed,
            chunk_size=p.chunk_size,
            per_query=p.per_query_scores and want_scores,
        )
        runtime.progress("knn_shapley", 1, 1)
        dtype = numpy_dtype(runtime.dtype)
        lo, hi = column_range(problem, train_range)
        return Attribution(
            scores=per[:, lo:hi].astype(dtype) if per is not None else None,
            self_influence=None,
            values=values[lo:hi].astype(dtype),
            values_stderr=np.zeros(hi - lo, dtype=dtype),
            metadata=metadata(
                self.name,
                problem,
                normalisation="mean over queries",
                k=p.k,
                metric=p.metric,
                embedding=p.embedding,
                validation_set="query set",
                utility_full=float(values.sum()),
                seconds=time.perf_counter() - started,
            ),
        )


ESTIMATOR_CLASSES: tuple[type[Estimator], ...] = (
    LOO,
    Downsampling,
    Datamodels,
    ShapleyExact,
    TMCShapley,
    BetaShapley,
    BanzhafMSR,
    KNNShapley,
)
"""The registered classes, in the order of :data:`VALUATION_ESTIMATORS`."""

__all__ = [
    "ESTIMATOR_CLASSES",
    "LOO",
    "AdaptiveParams",
    "BanzhafMSR",
    "BetaShapley",
    "Datamodels",
    "Downsampling",
    "KNNShapley",
    "LDSParams",
    "LDSSubsets",
    "RetrainingParams",
    "ShapleyExact",
    "SubsetSpec",
    "TMCShapley",
    "UtilityParams",
    "effective_recipe",
    "returns_scores",
    "reuse_outputs",
]
