"""FastIF (Guo et al. 2021; ESTIMATORS.md 2.16): LiSSA influence restricted to the nearest neighbours.

For each query ``j`` the ``k_candidates`` training rows nearest to it in feature space (the input of
the model's last ``nn.Linear``, or the raw input) form its candidate set ``C_j``; ``scores[j, i]`` is
the LiSSA influence ``(1/n) g_i^T s_j`` of :mod:`.influence_lissa` for ``i`` in ``C_j`` and 0
elsewhere: the method's premise is that far-away points have negligible influence (which can miss a
mislabeled point far from its class; ESTIMATORS.md 2.16 pitfalls). Per-example gradients are computed
only for the union of the candidate sets, so the train-side cost is ``O(|U| p)`` instead of ``O(n p)``.

With ``k_candidates >= n`` and the same LiSSA parameters the scores equal ``if_lissa``'s (the same
``s_j``, seeded mini-batches). Self-influence is ``if_lissa``'s: a training point is its own nearest
neighbour. Candidate selection uses the whole training set's features (cheap: one forward pass), so a
row shard scores exactly the candidates inside its range and shards agree with the unsharded run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
from annotated_types import Ge

from ..base import Attribution, Estimator, EstimatorError, NumericalError, Runtime, register
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    metadata,
    n_chunks,
    numpy_dtype,
    per_sample_gradients,
    query_gradients,
    train_objective,
    validate_problem,
)
from ..ihvp import product_dtype, solver_scores
from ..valuation.knn import nearest_neighbours, penultimate_embedder
from .influence_lissa import CheckedLissa, IFLissaParams

NON_CANDIDATES = (
    "0: FastIF treats the training rows outside a query's k_candidates nearest neighbours as having no "
    "influence on it"
)


@dataclass
class FastIFParams(IFLissaParams):
    """FastIF: LiSSA influence functions scored only on each query's nearest training neighbours."""

    k_candidates: Annotated[int, Ge(1)] = field(
        default=1000,
        metadata={"description": "training rows scored per query (its nearest neighbours); >= n: all"},
    )
    features: Literal["penultimate", "input"] = field(
        default="penultimate",
        metadata={
            "description": "space of the kNN filter: the input of the last Linear layer, or the raw input"
        },
    )
    metric: Literal["euclidean", "cosine"] = field(
        default="euclidean", metadata={"description": "distance of the kNN filter"}
    )


def candidate_sets(problem, p: FastIFParams, runtime: Runtime, ticker: Ticker) -> torch.Tensor:
    """m x k indices of each query's nearest training rows (k = min(k_candidates, n)), nearest first."""
    if p.features == "penultimate":
        try:
            embed = penultimate_embedder(
                problem.model, problem.weights, device=runtime.device, dtype=runtime.dtype
            )
        except ValueError as exc:
            raise EstimatorError(
                f"{exc}; use features 'input'", parameter="/method/params/features"
            ) from None
    else:
        embed = None

    def features(x: torch.Tensor) -> torch.Tensor:
        rows = []
        for s in range(0, int(x.shape[0]), runtime.chunk_size):
            xs = x[s : s + runtime.chunk_size]
            f = embed(xs) if embed is not None else xs.to(runtime.device)
            rows.append(f.reshape(f.shape[0], -1).to(torch.float64))
            ticker.tick()
        return torch.cat(rows)

    train_f, query_f = features(problem.train_x), features(problem.query_x)
    if not (torch.isfinite(train_f).all() and torch.isfinite(query_f).all()):
        raise NumericalError(
            "the kNN features contain NaN/inf; use features 'input'", parameter="/method/params/features"
        )
    k = min(p.k_candidates, problem.n_train)
    return nearest_neighbours(train_f, query_f, k, p.metric, runtime.chunk_size).cpu()


@register
class FastIF(Estimator):
    name = "fastif"
    summary = (
        "FastIF: LiSSA influence functions on each query's k nearest training neighbours (Guo et al. 2021)"
    )
    Params = FastIFParams

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
        dev, cdt = solver.hess.device, product_dtype(runtime)
        fix, parameter = f"increase scale (now {p.scale:g}) or damping", "/method/params/scale"

        scores, rows = None, torch.zeros(0, dtype=torch.long)
        if want_scores:
            kt = Ticker(
                runtime, "knn_features", n_chunks(n, runtime.chunk_size) + n_chunks(m, runtime.chunk_size)
            )
            cand = candidate_sets(problem, p, runtime, kt)
            inside = (cand >= lo) & (cand < hi)
            rows = torch.unique(cand[inside])  # the shard's rows some query scores, sorted
            # member[j, u]: row rows[u] is a candidate of query j
            member = torch.zeros(m, len(rows), dtype=torch.bool)
            member[
                torch.arange(m).unsqueeze(1).expand_as(cand)[inside], torch.searchsorted(rows, cand[inside])
            ] = True
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt)
            lt = Ticker(runtime, "lissa", (1 if m else 0) * p.repeats * p.depth)
            S = (solver.solve(Q.T.to(dev, torch.float64), lt) if m else Q.T).to(dev, cdt)
            scores = np.zeros((m, cols), dtype=numpy_dtype(runtime.dtype))
            gt = Ticker(runtime, "candidate_gradients", n_chunks(len(rows), runtime.chunk_size))
            for start, stop, G in per_sample_gradients(
                problem.model,
                problem.weights,
                problem.train_x[rows],
                problem.train_y[rows],
                train_objective(problem.task),
                chunk_size=runtime.chunk_size,
                device=runtime.device,
                dtype=runtime.dtype,
                what="candidate training examples",
            ):
                block = ((G.to(dev, cdt) @ S).T / n).cpu()
                block = torch.where(member[:, start:stop], block, torch.zeros((), dtype=block.dtype))
                scores[:, (rows[start:stop] - lo).numpy()] = block.numpy()
                gt.tick()
            if not np.isfinite(scores).all():
                raise NumericalError(f"{self.name} scores contain NaN/inf; {fix}", parameter=parameter)

        self_inf = None
        if want_self_influence:
            st = Ticker(
                runtime, "lissa_self_influence", n_chunks(cols, runtime.chunk_size) * p.repeats * p.depth
            )
            _, self_inf = solver_scores(
                problem,
                runtime,
                train_range,
                solver.solve,
                st,
                None,
                device=dev,
                want_self_influence=True,
                method=self.name,
                fix=fix,
                parameter=parameter,
            )
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n",
                non_candidate_scores=NON_CANDIDATES,
                k_candidates=min(p.k_candidates, n),
                features=p.features,
                metric=p.metric,
                candidate_gradient_rows=len(rows),
                damping=p.damping,
                weight_decay=float(problem.weight_decay),
                scale=p.scale,
                depth=p.depth,
                repeats=p.repeats,
                batch_size=p.batch_size,
                seed=p.seed,
                **solver.metadata(),
            ),
        )
