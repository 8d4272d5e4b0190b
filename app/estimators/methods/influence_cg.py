"""Influence functions with conjugate-gradient iHVPs (Koh & Liang 2017, Martens 2010; ESTIMATORS.md 2.11).

Same quantity as ``if_exact`` without forming the Hessian:

* ``scores[j, i] = (1/n) g'_j^T (H + damping I)^-1 g_i``: one block CG solve
  ``(H + damping I) S = Q^T`` for all queries at once (the ``m`` right-hand sides
  share one Krylov space: one Hessian product of the search block per iteration,
  and far fewer iterations than one CG per query; Hessian-vector products by the
  Pearlmutter trick, :mod:`app.estimators.ihvp`), then a stream over the
  training gradients;
* ``self_influence[i] = (1/n) g_i^T (H + damping I)^-1 g_i``: one further CG solve
  per chunk of ``runtime.chunk_size`` training rows of the shard, i.e. about
  ``ceil(n_shard / chunk) x iterations`` Hessian passes over ``hessian_rows``
  rows. That is the expensive part; ask for it only when needed.

``H`` is the Hessian of ``mean_i L(z_i) + weight_decay/2 ||theta||^2``, on all
training rows or on a fixed random subsample of ``hessian_rows`` of them (seed 0).
Hessian products and CG's blocks run in the runtime's precision (float32 by
default; the small matrices of the recurrences in float64); ``rtol`` bounds CG's
recursive residual. Cost per CG
iteration: one Hessian-vector product over the rows for every unconverged
column; memory O(p x (m + chunk)).
Nothing is cached (``fit`` returns None): the solve depends on the queries.

Group influence of every order (:mod:`app.estimators.group`) solves with the same operator: one
block solve for all groups' gradients (first), a second one after each group's own Hessian
product over its rows (second), or one CG per group on ``H + damping I - H_U/n`` (newton).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from annotated_types import Ge, Gt

from ..base import Attribution, Estimator, EstimatorError, Runtime, register
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
from ..group import GROUP_ORDERS, IterativeGroupSolver, as_groups, hessian_group_scores
from ..ihvp import TrainingHessian, conjugate_gradient, product_dtype, solver_scores, subsample_rows

HESSIAN_ROWS_SEED = 0


@dataclass
class IFCGParams:
    """Influence functions with conjugate-gradient solves: (1/n) g'^T (H + damping I)^-1 g_i."""

    damping: Annotated[float, Ge(0)] = field(
        default=0.001,
        metadata={"description": "added to the Hessian's diagonal (on top of the model's weight decay)"},
    )
    max_iter: Annotated[int, Ge(1)] = field(
        default=100,
        metadata={"description": "maximum CG iterations per solve (each is one Hessian-vector pass)"},
    )
    rtol: Annotated[float, Gt(0)] = field(
        default=1e-8,
        metadata={"description": "stop a column when ||residual|| <= rtol * ||right-hand side||"},
    )
    hessian_rows: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={
            "description": "Hessian-vector products use a fixed random subsample of this many training "
            "rows (seed 0); null = all rows"
        },
    )


@register
class IFCG(Estimator):
    name = "if_cg"
    summary = (
        "influence functions with conjugate-gradient inverse-Hessian-vector products "
        "(Koh & Liang 2017; no explicit Hessian)"
    )
    Params = IFCGParams
    group_orders = GROUP_ORDERS

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
        rows = subsample_rows(n, p.hessian_rows, HESSIAN_ROWS_SEED)
        hess = TrainingHessian(problem, runtime, rows=rows, dtype=product_dtype(runtime))

        solves = (1 if want_scores and m else 0) + (
            n_chunks(cols, runtime.chunk_size) if want_self_influence else 0
        )
        iterations, worst, converged = 0, 0.0, True

        def solve(B: torch.Tensor, ticker: Ticker) -> torch.Tensor:
            nonlocal iterations, worst, converged
            res = conjugate_gradient(
                hess.matmul, B, p.damping, p.max_iter, p.rtol, ticker=ticker, dtype=hess.dtype
            )
            iterations = max(iterations, res.iterations)
            if res.relative_residual.numel():
                worst = max(worst, float(res.relative_residual.max()))
            converged = converged and res.converged
            return res.x

        Q = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt)
        cg_ticker = Ticker(runtime, "cg", p.max_iter * solves)
        scores, self_inf = solver_scores(
            problem,
            runtime,
            train_range,
            solve,
            cg_ticker,
            Q,
            device=hess.device,
            want_self_influence=want_self_influence,
            method=self.name,
            fix=f"increase damping (now {p.damping:g})",
            parameter="/method/params/damping",
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
                max_iter=p.max_iter,
                rtol=p.rtol,
                cg_solves=solves,
                cg_iterations=iterations,
                cg_max_relative_residual=worst,
                cg_converged=converged,
                hessian_rows=hess.n_rows,
                hessian_vector_passes=hess.products,
            ),
        )

    def group_scores(self, problem, params, groups, order="first", *, runtime=None, state=None):
        """Any order with CG solves and Hessian-vector products (:class:`..group.IterativeGroupSolver`)."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=True)
        idx = as_groups(groups, problem.n_train)
        rows = subsample_rows(problem.n_train, p.hessian_rows, HESSIAN_ROWS_SEED)
        hess = TrainingHessian(problem, runtime, rows=rows, dtype=product_dtype(runtime))
        solver = IterativeGroupSolver(hess, problem.n_train, p.damping, p.max_iter, p.rtol)
        return hessian_group_scores(problem, solver, idx, order, runtime)
