"""Influence functions with conjugate-gradient iHVPs (Koh & Liang 2017, Martens 2010; ESTIMATORS.md 2.11).

Same quantity as ``if_exact`` without forming the Hessian:

* ``scores[j, i] = (1/n) g'_j^T (H + damping I)^-1 g_i``: one block CG solve
  ``(H + damping I) S = Q^T`` for all queries (Hessian-vector products by the
  Pearlmutter trick, :mod:`app.estimators.ihvp`), then a stream over the
  training gradients;
* ``self_influence[i] = (1/n) g_i^T (H + damping I)^-1 g_i``: one further CG solve
  per chunk of ``runtime.chunk_size`` training rows of the shard, i.e. about
  ``ceil(n_shard / chunk) x iterations`` Hessian passes over ``hessian_rows``
  rows. That is the expensive part; ask for it only when needed.

``H`` is the Hessian of ``mean_i L(z_i) + weight_decay/2 ||theta||^2``, on all
training rows or on a fixed random subsample of ``hessian_rows`` of them (seed 0).
Solves run in float64. Cost per CG iteration: one Hessian-vector product over
the rows for every unconverged column; memory O(p x (m + chunk)).
Nothing is cached (``fit`` returns None): the solve depends on the queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
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
    numpy_dtype,
    query_gradients,
    train_gradients,
    validate_problem,
)
from ..ihvp import TrainingHessian, conjugate_gradient, subsample_rows

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
        dtype = numpy_dtype(runtime.dtype)
        rows = subsample_rows(n, p.hessian_rows, HESSIAN_ROWS_SEED)
        hess = TrainingHessian(problem, runtime, rows=rows)

        solves = (1 if want_scores and m else 0) + (
            n_chunks(cols, runtime.chunk_size) if want_self_influence else 0
        )
        iterations, worst, converged = 0, 0.0, True

        def solve(B: torch.Tensor, ticker: Ticker) -> torch.Tensor:
            nonlocal iterations, worst, converged
            res = conjugate_gradient(hess.matmul, B, p.damping, p.max_iter, p.rtol, ticker=ticker)
            iterations = max(iterations, res.iterations)
            if res.relative_residual.numel():
                worst = max(worst, float(res.relative_residual.max()))
            converged = converged and res.converged
            return res.x

        S = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt)
        cg_ticker = Ticker(runtime, "cg", p.max_iter * solves)
        if want_scores:
            Qd = Q.T.to(hess.device, torch.float64)
            S = solve(Qd, cg_ticker) if m else Qd  # p x m: (H + damping I)^-1 g'_j
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None
        if want_scores or want_self_influence:
            tt = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
            for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range):
                Gd = G.to(hess.device, torch.float64)
                if scores is not None:
                    scores[:, start:stop] = ((Gd @ S).T / n).cpu().numpy()
                if self_inf is not None:
                    Z = solve(Gd.T, cg_ticker)
                    self_inf[start:stop] = ((Gd * Z.T).sum(dim=1) / n).cpu().numpy()
                tt.tick()
        for what, arr in (("scores", scores), ("self-influence", self_inf)):
            if arr is not None and not np.isfinite(arr).all():
                raise NumericalError(
                    f"if_cg {what} contain NaN/inf; increase damping (now {p.damping:g})",
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
