"""Gradient similarity at the final weights: Grad-Dot and Grad-Cos (ESTIMATORS.md 2.18, 2.23).

* ``grad_dot``: ``scores[j, i] = g'_j . g_i`` where ``g'`` is the gradient of the
  query objective (loss, or minus the margin) and ``g_i`` that of the training
  loss; self-influence ``||g_i||^2``. Equals TracInCP with the final weights as
  the only checkpoint and learning rate 1.
* ``grad_cos``: the cosine of the same two gradients (renormalised influence;
  zero when either gradient is zero). No self-influence (it would always be 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F

from ..base import Attribution, Estimator, EstimatorError, InfluenceProblem, Runtime, register
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    concat_factors,
    factor_inner,
    factor_sqnorms,
    gradient_factors,
    metadata,
    n_chunks,
    numpy_dtype,
    query_gradients,
    query_objective_fn,
    train_gradients,
    train_objective,
    validate_problem,
)


@dataclass
class GradDotParams:
    """Grad-Dot has no parameters."""


@dataclass
class GradCosParams:
    """Grad-Cos has no parameters."""


def _similarity(
    name: str,
    problem: InfluenceProblem,
    runtime: Runtime,
    *,
    cosine: bool,
    want_scores: bool,
    want_self_influence: bool,
    train_range: tuple[int, int] | None,
) -> Attribution:
    validate_problem(problem, need_queries=want_scores)
    check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
    dtype = numpy_dtype(runtime.dtype)
    lo, hi = column_range(problem, train_range)
    n, m = hi - lo, problem.n_query
    factored = _similarity_factored(
        problem, runtime, cosine=cosine, want_scores=want_scores,
        want_self_influence=want_self_influence, lo=lo, hi=hi,
    )  # fmt: skip
    if factored is not None:
        scores, self_inf = factored
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                name, problem, normalisation="none" if not cosine else "cosine (unit-norm gradients)"
            ),
        )
    Q = None
    if want_scores:
        qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
        Q = query_gradients(problem, problem.weights, runtime, qt)
        if cosine:
            Q = F.normalize(Q, dim=1)
    scores = np.zeros((m, n), dtype=dtype) if want_scores else None
    self_inf = np.zeros(n, dtype=dtype) if want_self_influence else None
    tt = Ticker(runtime, "train_gradients", n_chunks(n, runtime.chunk_size))
    if want_scores or want_self_influence:
        for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range):
            if self_inf is not None:
                self_inf[start:stop] = (G * G).sum(dim=1).cpu().numpy()
            if scores is not None:
                if cosine:
                    G = F.normalize(G, dim=1)
                scores[:, start:stop] = (Q @ G.T).cpu().numpy()
            tt.tick()
    return Attribution(
        scores=scores,
        self_influence=self_inf,
        metadata=metadata(
            name, problem, normalisation="none" if not cosine else "cosine (unit-norm gradients)"
        ),
    )


def _similarity_factored(
    problem: InfluenceProblem,
    runtime: Runtime,
    *,
    cosine: bool,
    want_scores: bool,
    want_self_influence: bool,
    lo: int,
    hi: int,
) -> tuple[np.ndarray | None, np.ndarray | None] | None:
    """The same scores from per-layer gradient factors (:func:`gradient_factors`), without forming
    any gradient; None when the model is not a plain chain of linear layers."""
    model, w = problem.model, problem.weights
    kw = {"chunk_size": runtime.chunk_size, "device": runtime.device, "dtype": runtime.dtype}
    what = "training examples" if lo == 0 else f"training examples (from row {lo})"
    tf = gradient_factors(
        model,
        w,
        problem.train_x[lo:hi],
        problem.train_y[lo:hi],
        train_objective(problem.task),
        what=what,
        **kw,
    )
    qf = gradient_factors(
        model, w, problem.query_x, problem.query_y, query_objective_fn(problem.task, problem.measurement),
        what="queries", **kw,
    )  # fmt: skip
    if tf is None or qf is None:
        return None
    dtype = numpy_dtype(runtime.dtype)
    n, m = hi - lo, problem.n_query
    Fq, qscale = None, None
    if want_scores:
        qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
        parts = []
        for _, _, f in qf:
            parts.append(f)
            qt.tick()
        Fq = concat_factors(parts)
        if cosine and Fq:  # F.normalize: divide by max(||g||, 1e-12)
            qscale = 1.0 / factor_sqnorms(Fq).sqrt().clamp_min(1e-12)
    scores = np.zeros((m, n), dtype=dtype) if want_scores else None
    self_inf = np.zeros(n, dtype=dtype) if want_self_influence else None
    tt = Ticker(runtime, "train_gradients", n_chunks(n, runtime.chunk_size))
    if want_scores or want_self_influence:
        for start, stop, Ft in tf:
            sq = factor_sqnorms(Ft) if (self_inf is not None or cosine) else None
            if self_inf is not None:
                self_inf[start:stop] = sq.cpu().numpy()
            if scores is not None and m:
                S = factor_inner(Fq, Ft)
                if cosine:
                    S = S * qscale[:, None] * (1.0 / sq.sqrt().clamp_min(1e-12))[None, :]
                scores[:, start:stop] = S.cpu().numpy()
            tt.tick()
    return scores, self_inf


@register
class GradDot(Estimator):
    name = "grad_dot"
    summary = "gradient dot product g'.g_i at the final weights (TracIn with one checkpoint, lr 1)"
    Params = GradDotParams

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
        as_params(self.Params, params)
        return _similarity(
            self.name,
            problem,
            runtime or Runtime(),
            cosine=False,
            want_scores=want_scores,
            want_self_influence=want_self_influence,
            train_range=train_range,
        )


@register
class GradCos(Estimator):
    name = "grad_cos"
    summary = "cosine similarity of query and training gradients at the final weights (renormalised)"
    Params = GradCosParams
    supports_self_influence = False

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
        as_params(self.Params, params)
        if want_self_influence:
            raise EstimatorError(
                "grad_cos has no self-influence (the cosine of a gradient with itself is always 1); "
                "use grad_dot or tracincp",
                parameter="/output/kind",
            )
        return _similarity(
            self.name,
            problem,
            runtime or Runtime(),
            cosine=True,
            want_scores=want_scores,
            want_self_influence=False,
            train_range=train_range,
        )


__all__ = ["GradCos", "GradCosParams", "GradDot", "GradDotParams"]
