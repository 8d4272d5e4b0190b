"""Arnoldi influence functions (Schioppa et al., AAAI 2022; ESTIMATORS.md 2.13).

``fit`` runs ``n_iter`` Arnoldi (Lanczos with full re-orthogonalisation) steps on
the Hessian of ``mean_i L(z_i) + weight_decay/2 ||theta||^2`` (Pearlmutter
products over all rows, or a seeded subsample of ``hessian_rows``) and keeps the
top-``rank`` eigenpairs by magnitude ``(lambda_j, v_j)``: the cacheable train
state (``p x rank`` float64, independent of ``damping``). Then

* ``scores[j, i] = (1/n) sum_k (v_k . g'_j)(v_k . g_i) / (lambda_k + damping)``
* ``self_influence[i] = (1/n) sum_k (v_k . g_i)^2 / (lambda_k + damping)``

i.e. ``H^-1 ~ V diag(1 / (lambda + damping)) V^T`` on the retained subspace;
directions outside it (the low-curvature ones) are dropped, which is the
method's known weakness. A retained eigenvalue with ``lambda_k + damping <= 0``
(negative curvature) is refused. ``rank`` and ``n_iter`` are capped at ``p``;
``n_iter`` defaults (``None``) to ``3 x rank``: on the unit tests' tanh MLP (p = 131, rank 10, seeds
0-4) the top-10 eigenvalues are off by up to 6 % (relative) after ``2 x rank`` steps and by at most
5e-11 after ``3 x rank``. ``None`` is resolved before it
enters the cache key (:meth:`IFArnoldi.state_params`), so ``n_iter=None`` and ``n_iter=3*rank`` share
a cached state; the metadata's ``n_iter`` is the resolved (and capped) value.
With ``rank = p`` on a positive-definite Hessian the scores equal ``if_exact``'s.
Cost: ``n_iter`` Hessian passes + O(n_iter^2 p) once; O((n + m) rank p) per job.
The Hessian products run in the runtime's precision (float32 by default), the
Lanczos basis and its re-orthogonalisation in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from annotated_types import Ge

from ..base import (
    Attribution,
    Estimator,
    EstimatorError,
    NumericalError,
    ProblemSize,
    Runtime,
    TrainState,
    register,
)
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    metadata,
    n_chunks,
    n_parameters,
    numpy_dtype,
    query_gradients,
    train_gradients,
    validate_problem,
)
from ..ihvp import TrainingHessian, arnoldi, product_dtype, subsample_rows


@dataclass
class IFArnoldiParams:
    """Arnoldi influence: (1/n) sum_k (v_k.g')(v_k.g_i)/(lambda_k + damping) over the top-rank eigenpairs."""

    rank: Annotated[int, Ge(1)] = field(
        default=50,
        metadata={
            "description": "eigenpairs kept (largest |eigenvalue|); capped at the number of parameters"
        },
    )
    n_iter: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={
            "description": "Arnoldi iterations (Hessian-vector passes), >= rank; null = 3 x rank (capped "
            "at the number of parameters); 2-4 x rank is typical, 2 x rank can leave the top eigenvalues "
            "unconverged"
        },
    )
    damping: Annotated[float, Ge(0)] = field(
        default=0.0,
        metadata={"description": "added to every retained eigenvalue (on top of the model's weight decay)"},
    )
    seed: Annotated[int, Ge(0)] = field(
        default=0, metadata={"description": "seed for the random start vector and the row subsample"}
    )
    hessian_rows: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={
            "description": "Hessian-vector products use a seeded random subsample of this many training "
            "rows; null = all rows"
        },
    )


LEADING_RESIDUAL_LIMIT = 0.1  # beyond this even the top eigenpair is noise: fail, naming n_iter
CONVERGED_RESIDUAL = 1e-2


DEFAULT_ITER_FACTOR = 3  # n_iter=None -> 3 x rank


def check_basis_memory(
    rank: int, n_iter: int | None, p: int, budget_bytes: int, *, prefix: str = "/method/params"
) -> None:
    """Arnoldi holds its float64 basis (p x (n_iter + 1)) and the kept eigenvectors (p x rank) whole."""
    k, it = effective_rank(rank, n_iter, p, prefix=prefix)
    needed = 8 * p * (it + 1 + k)
    if needed > budget_bytes:
        raise EstimatorError(
            f"Arnoldi holds p x (n_iter + 1 + rank) float64 values: {needed / 2**30:.3g} GiB for p = {p}, "
            f"n_iter = {it}, rank = {k}, over the worker's memory budget ({budget_bytes / 2**30:.3g} GiB); "
            "lower n_iter and rank, or use a method that keeps no p-sized basis (if_cg, ekfac)",
            parameter=f"{prefix}/n_iter",
        )


def resolved_n_iter(rank: int, n_iter: int | None) -> int:
    """``n_iter``, or ``DEFAULT_ITER_FACTOR x rank`` for ``None`` (before capping at ``p``)."""
    return DEFAULT_ITER_FACTOR * int(rank) if n_iter is None else int(n_iter)


def effective_rank(
    rank: int, n_iter: int | None, p: int, *, prefix: str = "/method/params"
) -> tuple[int, int]:
    """``(rank, n_iter)`` capped at ``p`` (``n_iter=None``: ``3 x rank``); EstimatorError (naming
    ``n_iter``) when ``n_iter < rank``."""
    n_iter = resolved_n_iter(rank, n_iter)
    k, it = min(int(rank), p), min(n_iter, p)
    if it < k:
        raise EstimatorError(
            f"n_iter={n_iter} is smaller than rank={rank}: Arnoldi needs at least rank iterations "
            f"(2-4 x rank is typical); raise n_iter to >= {k} or lower rank",
            parameter=f"{prefix}/n_iter",
        )
    return k, it


def fit_arnoldi(
    problem,
    runtime: Runtime,
    *,
    rank: int,
    n_iter: int | None,
    seed: int,
    hessian_rows: int | None,
) -> TrainState:
    """Top eigenpairs of the training objective's Hessian as a :class:`TrainState` (also used by relatif)."""
    validate_problem(problem, need_queries=False)
    check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
    n = problem.n_train
    if n == 0:
        raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
    p = n_parameters(problem.model)
    k, it = effective_rank(rank, n_iter, p)
    hess = TrainingHessian(
        problem, runtime, rows=subsample_rows(n, hessian_rows, seed), dtype=product_dtype(runtime)
    )
    ticker = Ticker(runtime, "arnoldi", it)
    res = arnoldi(hess.matmul, hess.p, k, it, seed, device=hess.device, ticker=ticker)
    if not bool(torch.isfinite(res.eigenvalues).all()) or not bool(torch.isfinite(res.eigenvectors).all()):
        raise NumericalError("Arnoldi eigenpairs contain NaN/inf", parameter="/method/params/n_iter")
    relative = (res.residuals / res.eigenvalues.abs().clamp_min(torch.finfo(torch.float64).tiny)).cpu()
    if float(relative[0]) > LEADING_RESIDUAL_LIMIT:
        raise NumericalError(
            f"Arnoldi did not converge: the leading eigenpair's relative residual is "
            f"{float(relative[0]):.2g}"
            f" after {res.iterations} iterations; raise n_iter (2-4 x rank is typical)",
            parameter="/method/params/n_iter",
        )
    return TrainState(
        tensors={"eigenvalues": res.eigenvalues.cpu(), "eigenvectors": res.eigenvectors.cpu()},
        info={
            "weight_decay": float(problem.weight_decay),
            "rank": k,
            "n_iter": it,
            "iterations": res.iterations,
            "restarts": res.restarts,
            "hessian_rows": hess.n_rows,
            # How far the retained pairs are from true eigenpairs: ||H v - lambda v|| / |lambda|.
            "max_relative_residual": float(relative.max()),
            "converged_pairs": int((relative <= CONVERGED_RESIDUAL).sum()),
        },
    )


def damped_eigenvalues(
    state: TrainState, damping: float, p: int, *, parameter: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, lambda + damping)`` from an Arnoldi state; NumericalError if any damped eigenvalue is <= 0."""
    V = state.tensors["eigenvectors"].to(torch.float64)
    lam = state.tensors["eigenvalues"].to(torch.float64) + damping
    if V.shape[0] != p:
        raise EstimatorError(
            f"the cached Arnoldi state has {V.shape[0]} parameters but the model has {p}",
            parameter="/model_id",
        )
    bad = lam <= 0
    if bool(bad.any()):
        worst = float(lam[bad].min() - damping)
        raise NumericalError(
            f"{int(bad.sum())} of the {lam.numel()} retained Hessian eigenvalues are <= 0 after damping "
            f"(most negative {worst:.3g}, damping={damping:g}): the Hessian has negative curvature (a "
            f"non-convex model or weights not at a minimum). Increase damping above {-worst:.3g}",
            parameter=parameter,
        )
    return V, lam


@register
class IFArnoldi(Estimator):
    name = "if_arnoldi"
    summary = "Arnoldi influence: low-rank eigendecomposition of the Hessian (Schioppa et al. 2022)"
    Params = IFArnoldiParams

    def check(self, problem_size: ProblemSize, params) -> None:
        p = as_params(self.Params, params)
        effective_rank(p.rank, p.n_iter, problem_size.n_parameters)

    def check_memory(self, problem_size: ProblemSize, params, budget_bytes: int) -> None:
        p = as_params(self.Params, params)
        check_basis_memory(p.rank, p.n_iter, problem_size.n_parameters, budget_bytes)

    def state_params(self, params) -> dict:
        p = as_params(self.Params, params)
        # n_iter=None resolves here, so it shares a cache entry with the explicit 3 x rank
        return {
            "rank": p.rank,
            "n_iter": resolved_n_iter(p.rank, p.n_iter),
            "seed": p.seed,
            "hessian_rows": p.hessian_rows,
        }

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        p = as_params(self.Params, params)
        return fit_arnoldi(
            problem,
            runtime or Runtime(),
            rank=p.rank,
            n_iter=p.n_iter,
            seed=p.seed,
            hessian_rows=p.hessian_rows,
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
        validate_problem(problem, need_queries=want_scores)
        state = state or self.fit(problem, p, runtime)
        dev = torch.device(runtime.device)
        V, lam = damped_eigenvalues(
            state, p.damping, n_parameters(problem.model), parameter="/method/params/damping"
        )
        V, lam = V.to(dev), lam.to(dev)
        n = problem.n_train
        lo, hi = column_range(problem, train_range)
        m, cols = problem.n_query, hi - lo
        dtype = numpy_dtype(runtime.dtype)

        W = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt)
            W = (Q.to(torch.float64) @ V) / lam  # m x k
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None
        if want_scores or want_self_influence:
            tt = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
            for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range):
                GV = G.to(torch.float64) @ V  # b x k
                if scores is not None:
                    scores[:, start:stop] = ((W @ GV.T) / n).cpu().numpy()
                if self_inf is not None:
                    self_inf[start:stop] = (((GV * GV) / lam).sum(dim=1) / n).cpu().numpy()
                tt.tick()
        for what, arr in (("scores", scores), ("self-influence", self_inf)):
            if arr is not None and not np.isfinite(arr).all():
                raise NumericalError(
                    f"if_arnoldi {what} contain NaN/inf; increase damping (now {p.damping:g})",
                    parameter="/method/params/damping",
                )
        ev = state.tensors["eigenvalues"]
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n",
                damping=p.damping,
                weight_decay=state.info.get("weight_decay", float(problem.weight_decay)),
                rank=int(ev.numel()),
                n_iter=state.info.get(
                    "n_iter", min(resolved_n_iter(p.rank, p.n_iter), n_parameters(problem.model))
                ),
                arnoldi_iterations=state.info.get("iterations"),
                arnoldi_restarts=state.info.get("restarts"),
                hessian_rows=state.info.get("hessian_rows"),
                eigenvalue_largest=float(ev.max()) if ev.numel() else None,
                eigenvalue_smallest_retained=float(ev.min()) if ev.numel() else None,
            ),
        )
