"""TracInCP (Pruthi et al., NeurIPS 2020; ESTIMATORS.md 2.23).

``scores[j, i] = sum_t eta_t g'_{j,t} . g_{i,t}`` over the checkpoints ``t``,
where ``g'`` is the gradient of the query objective (loss, or minus the margin)
and ``g_i`` that of the training loss at checkpoint ``theta_t``, and ``eta_t`` is
the checkpoint's learning rate (or 1). Self-influence
``sum_t eta_t ||g_{i,t}||^2`` (mislabel detection). Plain gradients are used for
every optimizer; for Adam the true update is preconditioned, so the scores are
the SGD approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..base import Attribution, Estimator, EstimatorError, ProblemSize, Runtime, register
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


@dataclass
class TracInCPParams:
    """TracInCP: sum over checkpoints of learning-rate-weighted gradient dot products."""

    use_checkpoint_learning_rates: bool = field(
        default=True,
        metadata={"description": "weight checkpoint t by its learning rate eta_t; false uses eta_t = 1"},
    )


def _no_checkpoints() -> EstimatorError:
    return EstimatorError("tracincp needs at least one checkpoint", parameter="/checkpoint_ids")


@register
class TracInCP(Estimator):
    name = "tracincp"
    summary = "TracInCP: sum over checkpoints of eta_t * gradient dot products (Pruthi et al. 2020)"
    Params = TracInCPParams
    needs_checkpoints = True
    checkpoint_additive = True

    def check(self, problem_size: ProblemSize, params) -> None:
        if problem_size.n_checkpoints < 1:
            raise _no_checkpoints()

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
        ckpts = list(problem.checkpoints)
        if not ckpts:
            raise _no_checkpoints()
        etas = []
        for t, ck in enumerate(ckpts):
            check_state_finite(ck.state, what=f"checkpoint {t} (step {ck.step})", parameter="/checkpoint_ids")
            eta = ck.learning_rate if p.use_checkpoint_learning_rates else 1.0
            if eta is None or not math.isfinite(float(eta)):
                raise EstimatorError(
                    f"checkpoint {t} (step {ck.step}) has no usable learning rate ({eta!r}); "
                    "record it, or set use_checkpoint_learning_rates to false",
                    parameter="/method/params/use_checkpoint_learning_rates",
                )
            etas.append(float(eta))

        dtype = numpy_dtype(runtime.dtype)
        lo, hi = column_range(problem, train_range)
        n, m, T = hi - lo, problem.n_query, len(ckpts)
        scores = np.zeros((m, n), dtype=dtype) if want_scores else None
        self_inf = np.zeros(n, dtype=dtype) if want_self_influence else None
        qt = Ticker(runtime, "query_gradients", T * n_chunks(m, runtime.chunk_size)) if want_scores else None
        tt = Ticker(runtime, "train_gradients", T * n_chunks(n, runtime.chunk_size))
        if want_scores or want_self_influence:
            for ck, eta in zip(ckpts, etas, strict=True):
                Q = query_gradients(problem, ck.state, runtime, qt) if want_scores else None
                for start, stop, G in train_gradients(problem, ck.state, runtime, train_range):
                    if scores is not None:
                        scores[:, start:stop] += (eta * (Q @ G.T)).cpu().numpy()
                    if self_inf is not None:
                        self_inf[start:stop] += (eta * (G * G).sum(dim=1)).cpu().numpy()
                    tt.tick()
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="sum_t eta_t (no 1/n)"
                if p.use_checkpoint_learning_rates
                else "sum_t (eta_t = 1)",
                checkpoint_steps=[int(ck.step) for ck in ckpts],
                learning_rates=etas,
            ),
        )
