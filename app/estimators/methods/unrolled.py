"""Dynamic estimators that differentiate the model's own training run: HyDRA, SGD-influence, MAGIC
(ESTIMATORS.md 2.24, 2.25, 2.27).

All three score ``scores[j, i] = -d q_j(theta_T) / d w_i``: minus the derivative of query ``j``'s
objective after training with respect to the weight of training example ``i`` in every mini-batch
loss it entered, at ``w = 1`` (:mod:`..unroll` replays the run and sweeps backwards through it).
Removing ``i`` is ``w_i: 1 -> 0``, so the score is the first-order change of the query objective
when ``i`` is dropped from the run, positive for a proponent, as leave-one-out's.

* ``magic`` (Ilyas & Engstrom 2025): the exact metagradient through the recipe's optimizer (SGD with
  momentum, Adam, AdamW), by reverse-mode differentiation of the replayed run with stored segment
  starts (``O(sqrt(T))`` states) and recomputation.
* ``sgd_influence`` (Hara, Nitanda & Maehara 2019): the linearised "same SGD run, z_i skipped"
  counterfactual, ``u_t = (I - eta_t H_t) u_{t+1}`` swept backwards with one Hessian-vector product
  per step; defined for plain SGD (no momentum, no Adam). On such a run it is the same derivative as
  ``magic``, computed by the same sweep.
* ``hydra`` (Chen et al. 2021): the hypergradient ``d theta_T / d w_i``. Its practical form (the
  default, ``hessian: false``) drops the training Hessian from the recursion, leaving, for plain SGD,
  ``sum_t (eta_t / |B_t|) 1[i in B_t] g'(theta_T) . grad L(z_i; theta_t)``; ``hessian: true`` keeps it
  (then equal to ``magic``).

Self-influence is ``-d L(z_i; theta_T) / d w_i``: one sweep per block of training rows, its diagonal.
The train-side state is the replay's segment starts, checked against the registered weights: a
model the recipe does not reproduce (trained elsewhere, in another order, or on other data) is
refused, since its run cannot be differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
from annotated_types import Ge, Gt

from ..base import Attribution, Estimator, EstimatorError, InfluenceProblem, Runtime, TrainState, register
from ..gradients import (
    Ticker,
    as_params,
    metadata,
    n_chunks,
    numpy_dtype,
    per_sample_gradients,
    query_objective_fn,
    train_objective,
    validate_problem,
)
from ..unroll import MODEL_PARAMETER, Unroller, recipe_of


@dataclass
class UnrollParams:
    """Replay settings shared by the unrolled methods."""

    segment_length: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={
            "description": "optimizer steps between the states kept for the backward sweep (memory: "
            "T/K + K states; compute: one extra forward pass); null: ceil(sqrt(T))"
        },
    )
    replay_tolerance: Annotated[float, Gt(0)] = field(
        default=1e-3,
        metadata={
            "description": "largest relative L2 distance allowed between the replayed final weights "
            "and the registered ones; beyond it the model was not trained by this recipe on this "
            "training set and the job fails"
        },
    )


@dataclass
class MagicParams(UnrollParams):
    """MAGIC: the exact metagradient of the query objective through the replayed training run."""


@dataclass
class SGDInfluenceParams(UnrollParams):
    """SGD-influence: the linearised skip-one counterfactual of a plain-SGD run."""


@dataclass
class HydraParams(UnrollParams):
    """HyDRA: the hypergradient of the final weights with respect to each example's loss weight."""

    hessian: bool = field(
        default=False,
        metadata={
            "description": "keep the training Hessian in the recursion (exact, equal to magic); false: "
            "HyDRA's Hessian-free approximation (each step's gradient treated as constant)"
        },
    )


class _Unrolled(Estimator):
    """Replay, cache the segment starts, sweep backwards per block of queries."""

    needs_checkpoints = False
    shardable_by_rows = False  # one backward sweep scores every training row at once

    def use_hessian(self, p: Any) -> bool:
        return True

    def check_recipe(self, recipe) -> None:
        return None

    def state_params(self, params) -> dict:
        return {"segment_length": as_params(self.Params, params).segment_length}

    def _unroller(self, problem: InfluenceProblem, runtime: Runtime) -> Unroller:
        recipe = recipe_of(problem)
        self.check_recipe(recipe)
        return Unroller(problem, recipe, runtime)

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """Replay the run; the states at segment starts, and how closely the replay reproduces the
        registered weights."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        return self._replay(self._unroller(problem, runtime), p, runtime)

    @staticmethod
    def _replay(unroller: Unroller, p: Any, runtime: Runtime) -> TrainState:
        problem = unroller.problem
        segment = unroller.segment_length(p.segment_length)
        starts, final = unroller.replay(segment, Ticker(runtime, "replay", len(unroller.steps)))
        return TrainState(
            tensors={"segment_starts": starts},
            info={
                "n_train": problem.n_train,
                "steps": len(unroller.steps),
                "segment_length": segment,
                "state_size": unroller.state_size,
                "replay_error": unroller.replay_error(final),
            },
        )

    def _checked_state(self, state: TrainState, unroller: Unroller, p: Any) -> tuple[torch.Tensor, int]:
        info = state.info
        expected = {
            "n_train": unroller.problem.n_train,
            "steps": len(unroller.steps),
            "state_size": unroller.state_size,
        }
        for key, want in expected.items():
            if info.get(key) != want:
                raise EstimatorError(
                    f"the cached replay has {key}={info.get(key)}, this problem {want}",
                    parameter="/method/params",
                )
        error = float(info["replay_error"])
        if not error <= p.replay_tolerance:
            raise EstimatorError(
                f"replaying the model's recipe does not reproduce its registered weights (relative "
                f"distance {error:.3g} > replay_tolerance {p.replay_tolerance:g}): the model was not "
                "trained by this recipe on this training set in this row order, so its run cannot be "
                "unrolled. Use the training set and recipe it was trained with, or a static method; if it "
                "was trained on another device (GPU rounding), raise replay_tolerance to accept the "
                "replayed run instead",
                parameter=MODEL_PARAMETER,
            )
        starts = state.tensors["segment_starts"].to(unroller.device, unroller.dtype)
        return starts, int(info["segment_length"])

    def _sweep_rows(self, unroller, starts, segment, hessian, x, y, objective, what, runtime, ticker):
        """Metagradients for the rows (x, y) under ``objective``, block by block: yields
        ``(start, stop, d q / d w)`` with ``d q / d w`` of shape ``(stop - start) x n``."""
        final = unroller.final_state(starts, segment)
        for start, stop, G in per_sample_gradients(
            unroller.model,
            unroller.final_state_dict(final),
            x,
            y,
            objective,
            chunk_size=runtime.chunk_size,
            device=unroller.device,
            dtype=unroller.dtype,
            what=what,
            names=unroller.names,
        ):
            yield start, stop, unroller.metagradients(starts, segment, G, hessian=hessian, ticker=ticker)

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
        validate_problem(problem, need_queries=want_scores)
        if train_range is not None and tuple(train_range) != (0, problem.n_train):
            raise EstimatorError(f"{self.name} scores all training rows at once", parameter="/train_range")
        unroller = self._unroller(problem, runtime)
        if state is None:
            state = self._replay(unroller, p, runtime)
        starts, segment = self._checked_state(state, unroller, p)
        hessian = self.use_hessian(p)
        n, m, T = problem.n_train, problem.n_query, len(unroller.steps)
        blocks = (n_chunks(m, runtime.chunk_size) if want_scores else 0) + (
            n_chunks(n, runtime.chunk_size) if want_self_influence else 0
        )
        ticker = Ticker(runtime, "unroll", blocks * T)
        dtype = numpy_dtype(runtime.dtype)
        scores = self_inf = None
        if want_scores:
            scores = np.zeros((m, n), dtype=dtype)
            objective = query_objective_fn(problem.task, problem.measurement)
            for start, stop, D in self._sweep_rows(
                unroller, starts, segment, hessian, problem.query_x, problem.query_y, objective,
                "queries", runtime, ticker,
            ):  # fmt: skip
                scores[start:stop] = (-D).cpu().numpy()
        if want_self_influence:
            self_inf = np.zeros(n, dtype=dtype)
            objective = train_objective(problem.task)
            for start, stop, D in self._sweep_rows(
                unroller, starts, segment, hessian, problem.train_x, problem.train_y, objective,
                "training examples", runtime, ticker,
            ):  # fmt: skip
                rows = torch.arange(start, stop, device=D.device)
                self_inf[start:stop] = (-D[rows - start, rows]).cpu().numpy()
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="-d q(theta_T) / d w_i, w_i the example's weight in each mini-batch "
                "mean loss it entered (no 1/n)",
                optimizer=unroller.recipe.optimizer,
                momentum=unroller.recipe.momentum,
                steps=T,
                segment_length=segment,
                replay_error=float(state.info["replay_error"]),
                hessian=hessian,
                self_influence_objective="training loss" if want_self_influence else None,
            ),
        )


@register
class Magic(_Unrolled):
    name = "magic"
    summary = (
        "MAGIC: exact metagradient of the query objective through the replayed training run "
        "(SGD/momentum/Adam/AdamW; Ilyas & Engstrom 2025)"
    )
    Params = MagicParams


@register
class SGDInfluence(_Unrolled):
    name = "sgd_influence"
    summary = (
        "SGD-influence: linearised skip-one counterfactual of a plain mini-batch SGD run, one "
        "backward sweep of Hessian-vector products (Hara et al. 2019)"
    )
    Params = SGDInfluenceParams

    def check_recipe(self, recipe) -> None:
        if recipe.optimizer != "sgd" or recipe.momentum > 0:
            used = recipe.optimizer if recipe.optimizer != "sgd" else f"sgd with momentum {recipe.momentum}"
            raise EstimatorError(
                f"sgd_influence models plain SGD steps (theta - eta g); this model was trained with "
                f"{used}: use magic, the exact metagradient through that optimizer",
                parameter="/method/name",
            )


@register
class Hydra(_Unrolled):
    name = "hydra"
    summary = (
        "HyDRA: hypergradient of the final weights w.r.t. each example's loss weight along the "
        "replayed run; Hessian-free by default (Chen et al. 2021)"
    )
    Params = HydraParams

    def use_hessian(self, p: Any) -> bool:
        return bool(p.hessian)
