"""Influence functions with LiSSA iHVPs (Agarwal et al. 2017, as used by Koh & Liang; ESTIMATORS.md 2.12).

``scores[j, i] = (1/n) g'_j^T s_j`` with ``s_j`` the LiSSA estimate of
``(H + damping I)^-1 g'_j``: the recursion
``h_t = g' + h_{t-1} - (H_t h_{t-1} + damping h_{t-1}) / scale`` over ``depth``
mini-batch Hessians ``H_t`` (``batch_size`` random training rows each, with
replacement; Pearlmutter products, :func:`app.estimators.ihvp.lissa`), result
``h_depth / scale``, averaged over ``repeats``. All queries share the
mini-batches. Self-influence ``(1/n) g_i^T s_i`` runs the same recursion (same
seed) for every chunk of training rows of the shard, i.e. ``ceil(n_shard /
chunk)`` times the query cost; each column depends only on the seed, so shards agree.

Before the recursion the largest and smallest eigenvalues of the damped Hessian
are estimated with 20 Lanczos steps on a random subsample of at most 1024 rows;
a ``scale`` below the largest, or a negative smallest (negative curvature that
``damping`` does not cover), is refused with a :class:`NumericalError` instead of
returning a diverged series. During the recursion, NaN/inf or norm growth beyond
the bound of a contracting series also fails (naming ``scale``; the bound is checked
for the whole block every step and per query every 10 steps).
Cost O(repeats x depth x batch_size x p) per solve; the recursion runs in the
runtime's precision (float32 by default: its rounding is orders of magnitude
below the method's sampling error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from annotated_types import Ge, Gt

from ..base import Attribution, Estimator, EstimatorError, NumericalError, Runtime, register
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    metadata,
    n_chunks,
    query_gradients,
    validate_problem,
)
from ..ihvp import (
    TrainingHessian,
    extreme_eigenvalues,
    lissa,
    product_dtype,
    solver_scores,
    subsample_rows,
)

SCALE_CHECK_ROWS = 1024
SCALE_CHECK_STEPS = 20


@dataclass
class IFLissaParams:
    """Influence functions with LiSSA (stochastic Neumann series) inverse-Hessian-vector products."""

    damping: Annotated[float, Ge(0)] = field(
        default=0.001,
        metadata={"description": "added to the Hessian's diagonal (on top of the model's weight decay)"},
    )
    scale: Annotated[float, Gt(0)] = field(
        default=10.0,
        metadata={
            "description": "must exceed the largest eigenvalue of the damped Hessian (else divergence)"
        },
    )
    depth: Annotated[int, Ge(1)] = field(
        default=1000,
        metadata={
            "description": "recursion steps per repeat; needs several times scale / smallest eigenvalue"
        },
    )
    repeats: Annotated[int, Ge(1)] = field(
        default=1, metadata={"description": "independent recursions averaged (reduces variance)"}
    )
    batch_size: Annotated[int, Ge(1)] = field(
        default=32, metadata={"description": "training rows per mini-batch Hessian"}
    )
    seed: Annotated[int, Ge(0)] = field(default=0, metadata={"description": "seed for the mini-batches"})


class CheckedLissa:
    """LiSSA solves ``(H + damping I)^-1 B`` whose ``scale`` and ``damping`` were checked first.

    The check (ESTIMATORS.md 2.12 pitfalls) estimates the extreme eigenvalues of the Hessian on a
    subsample and refuses, with a :class:`NumericalError` naming the parameter, a series that would diverge.
    """

    def __init__(self, problem, runtime: Runtime, p: IFLissaParams) -> None:
        self.params, self.n = p, problem.n_train
        self.hess = TrainingHessian(problem, runtime, dtype=product_dtype(runtime))
        self.max_growth = 0.0
        sub = subsample_rows(self.n, SCALE_CHECK_ROWS, p.seed)
        sub = torch.arange(self.n) if sub is None else sub
        ct = Ticker(runtime, "lissa_scale_check", 1)
        self.lam_min, self.lam_max = extreme_eigenvalues(
            lambda V: self.hess.rows_matmul(sub, V),
            self.hess.p,
            SCALE_CHECK_STEPS,
            p.seed,
            device=self.hess.device,
        )
        ct.tick()
        lam_min, lam_max = self.lam_min, self.lam_max
        if p.scale < lam_max + p.damping:
            raise NumericalError(
                f"LiSSA needs scale above the largest eigenvalue of the damped Hessian, estimated at "
                f"{lam_max + p.damping:.4g} (largest Hessian eigenvalue ~{lam_max:.4g} plus "
                f"damping={p.damping:g}); "
                f"scale={p.scale:g} would make the series diverge. Increase scale, e.g. to "
                f"{2 * (lam_max + p.damping):.3g}",
                parameter="/method/params/scale",
            )
        if lam_min + p.damping <= 0:
            raise NumericalError(
                f"the Hessian of the training objective plus damping*I is not positive definite (an "
                f"eigenvalue <= {lam_min:.3g}, damping={p.damping:g}, estimated on {len(sub)} rows); LiSSA "
                "would diverge. "
                f"Increase damping well above {-lam_min:.3g}",
                parameter="/method/params/damping",
            )

    def solve(self, B: torch.Tensor, ticker: Ticker) -> torch.Tensor:
        """``(H + damping I)^-1 B`` for a ``p x r`` block; the same mini-batches for every call (``seed``)."""
        p = self.params
        res = lissa(
            self.hess.rows_matmul,
            B,
            n_rows=self.n,
            damping=p.damping,
            scale=p.scale,
            depth=p.depth,
            repeats=p.repeats,
            batch_size=p.batch_size,
            seed=p.seed,
            ticker=ticker,
            dtype=self.hess.dtype,
            affine=True,
        )
        self.max_growth = max(self.max_growth, res.max_growth)
        return res.x

    def metadata(self) -> dict:
        return {
            "estimated_lambda_max": self.lam_max,
            "estimated_lambda_min": self.lam_min,
            "lissa_max_growth": self.max_growth,
            "hessian_vector_passes": self.hess.products,
        }


@register
class IFLissa(Estimator):
    name = "if_lissa"
    summary = "influence functions with LiSSA stochastic inverse-Hessian-vector products (Koh & Liang 2017)"
    Params = IFLissaParams

    def state_params(self, params) -> dict:
        return {}

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
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        lo, hi = column_range(problem, train_range)
        m, cols = problem.n_query, hi - lo
        solver = CheckedLissa(problem, runtime, p)
        solves = (1 if want_scores and m else 0) + (
            n_chunks(cols, runtime.chunk_size) if want_self_influence else 0
        )

        Q = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt)
        lt = Ticker(runtime, "lissa", solves * p.repeats * p.depth)
        scores, self_inf = solver_scores(
            problem,
            runtime,
            train_range,
            solver.solve,
            lt,
            Q,
            device=solver.hess.device,
            want_self_influence=want_self_influence,
            method=self.name,
            fix=f"increase scale (now {p.scale:g}) or damping",
            parameter="/method/params/scale",
        )
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n",
                damping=p.damping,
                weight_decay=float(problem.weight_decay),
                scale=p.scale,
                depth=p.depth,
                repeats=p.repeats,
                batch_size=p.batch_size,
                seed=p.seed,
                lissa_solves=solves,
                **solver.metadata(),
            ),
        )
