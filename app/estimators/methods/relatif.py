"""RelatIF: relative influence (Barshan, Brunet & Dziugaite, AISTATS 2020; ESTIMATORS.md 2.17).

With ``H`` the Hessian of ``mean_i L(z_i) + weight_decay/2 ||theta||^2`` plus ``damping I``:

* ``variant="l"`` (l-relative): ``scores[j, i] = g'_j^T H^-1 g_i / sqrt(g_i^T H^-1 g_i)``;
* ``variant="theta"`` (theta-relative): ``scores[j, i] = g'_j^T H^-1 g_i / ||H^-1 g_i||``.

The influence is divided by a measure of how much ``z_i`` moves the model at
all, so globally influential points (outliers, mislabeled ones) stop topping
every query's list; scaling a training point's gradient by ``c`` leaves its
score unchanged. There is no ``1/n`` factor (it would only rescale all scores).
A training point with a zero gradient scores 0.

``self_influence[i]`` is the same score with ``z_i`` as its own query (its
training-loss gradient): ``sqrt(g_i^T H^-1 g_i)`` for ``l``, ``g_i^T H^-1 g_i /
||H^-1 g_i||`` for ``theta``.

``H^-1 g_i`` is needed for every training point, so ``H^-1`` is factored once
(the cacheable train state): ``inverse="exact"`` is the Cholesky factor of the
explicit damped Hessian (as ``if_exact``, p <= max_parameters, O(p^2) per
gradient); ``inverse="arnoldi"`` keeps the top-``rank`` eigenpairs
(as ``if_arnoldi``, ``H^-1 ~ V diag(1/(lambda + damping)) V^T``; directions outside
the retained subspace are ignored, also in the denominators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

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
    column_range,
    metadata,
    n_chunks,
    n_parameters,
    numpy_dtype,
    query_gradients,
    train_gradients,
    validate_problem,
)
from .influence_arnoldi import (
    check_basis_memory,
    damped_eigenvalues,
    effective_rank,
    fit_arnoldi,
    resolved_n_iter,
)
from .influence_exact import IFExact, IFExactParams


@dataclass
class RelatIFParams:
    """RelatIF: influence divided by sqrt(g_i^T H^-1 g_i) (variant l) or ||H^-1 g_i|| (variant theta)."""

    variant: Literal["l", "theta"] = field(
        default="l",
        metadata={"description": "l: divide by sqrt(g_i^T H^-1 g_i); theta: divide by ||H^-1 g_i||"},
    )
    damping: Annotated[float, Ge(0)] = field(
        default=0.001,
        metadata={"description": "added to the Hessian's diagonal (on top of the model's weight decay)"},
    )
    inverse: Literal["exact", "arnoldi"] = field(
        default="exact",
        metadata={
            "description": "exact: Cholesky of the explicit Hessian (p <= max_parameters); "
            "arnoldi: top-rank eigenpairs"
        },
    )
    max_parameters: Annotated[int, Ge(1)] = field(
        default=5000,
        metadata={"description": "inverse=exact: refuse models with more trainable parameters (H is p x p)"},
    )
    rank: Annotated[int, Ge(1)] = field(
        default=50, metadata={"description": "inverse=arnoldi: eigenpairs kept (capped at p)"}
    )
    n_iter: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={
            "description": "inverse=arnoldi: Arnoldi iterations, >= rank; null = 3 x rank (capped at p)"
        },
    )
    seed: Annotated[int, Ge(0)] = field(
        default=0, metadata={"description": "inverse=arnoldi: seed for the start vector and row subsample"}
    )
    hessian_rows: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={
            "description": "inverse=arnoldi: random subsample of training rows for the Hessian; null = all"
        },
    )


@register
class RelatIF(Estimator):
    name = "relatif"
    summary = "RelatIF: influence relative to each training point's total effect (Barshan et al. 2020)"
    Params = RelatIFParams

    def check(self, problem_size: ProblemSize, params) -> None:
        p = as_params(self.Params, params)
        if p.inverse == "exact" and problem_size.n_parameters > p.max_parameters:
            raise EstimatorError(
                f"relatif with inverse='exact' forms a p x p Hessian; this model has p = "
                f"{problem_size.n_parameters} trainable parameters, more than max_parameters = "
                f"{p.max_parameters}. Use inverse='arnoldi' or raise max_parameters",
                parameter="/method/params/inverse",
            )
        if p.inverse == "arnoldi":
            effective_rank(p.rank, p.n_iter, problem_size.n_parameters)

    def check_memory(self, problem_size: ProblemSize, params, budget_bytes: int) -> None:
        p = as_params(self.Params, params)
        if p.inverse == "arnoldi":
            check_basis_memory(p.rank, p.n_iter, problem_size.n_parameters, budget_bytes)

    def state_params(self, params) -> dict:
        p = as_params(self.Params, params)
        if p.inverse == "exact":
            return {"inverse": "exact", "damping": p.damping}
        return {
            "inverse": "arnoldi",
            "rank": p.rank,
            "n_iter": resolved_n_iter(p.rank, p.n_iter),  # None shares state with the explicit 3 x rank
            "seed": p.seed,
            "hessian_rows": p.hessian_rows,
        }

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """Cholesky factor of ``H + damping I`` (exact) or the top eigenpairs of ``H`` (arnoldi)."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        self.check(ProblemSize(problem.n_train, problem.n_query, n_parameters(problem.model), 0), p)
        if p.inverse == "exact":
            st = IFExact().fit(
                problem, IFExactParams(damping=p.damping, max_parameters=p.max_parameters), runtime
            )
            st.info["inverse"] = "exact"
            return st
        st = fit_arnoldi(
            problem, runtime, rank=p.rank, n_iter=p.n_iter, seed=p.seed, hessian_rows=p.hessian_rows
        )
        st.info["inverse"] = "arnoldi"
        return st

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
        n_params = n_parameters(problem.model)
        if p.inverse == "exact":
            if "cholesky" not in state.tensors:
                raise EstimatorError(
                    "the cached state is not an exact-Hessian factor", parameter="/method/params/inverse"
                )
            L = state.tensors["cholesky"].to(dev, torch.float64)
            if L.shape[0] != n_params:
                raise EstimatorError(
                    f"the cached factor has {L.shape[0]} parameters but the model has {n_params}",
                    parameter="/model_id",
                )

            def inverse(Bt: torch.Tensor) -> torch.Tensor:  # p x r -> H^-1 B
                return torch.cholesky_solve(Bt, L)

            def quad_and_norm(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                Z = torch.cholesky_solve(G.T, L)  # p x b
                return (G.T * Z).sum(dim=0), torch.linalg.vector_norm(Z, dim=0)

            extra = {"inverse": "exact"}
        else:
            if "eigenvectors" not in state.tensors:
                raise EstimatorError(
                    "the cached state is not an Arnoldi factorisation", parameter="/method/params/inverse"
                )
            V, lam = damped_eigenvalues(state, p.damping, n_params, parameter="/method/params/damping")
            V, lam = V.to(dev), lam.to(dev)

            def inverse(Bt: torch.Tensor) -> torch.Tensor:
                return V @ ((V.T @ Bt) / lam[:, None])

            def quad_and_norm(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                C = (G @ V) / lam.sqrt()  # b x k, V orthonormal: ||H^-1 g|| = ||(V^T g) / lam||
                return (C * C).sum(dim=1), torch.linalg.vector_norm(C / lam.sqrt(), dim=1)

            extra = {
                "inverse": "arnoldi",
                "rank": int(lam.numel()),
                "arnoldi_iterations": state.info.get("iterations"),
            }

        lo, hi = column_range(problem, train_range)
        m, cols = problem.n_query, hi - lo
        dtype = numpy_dtype(runtime.dtype)
        S = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt)
            S = inverse(Q.T.to(dev, torch.float64))  # p x m
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None
        zero_rows = 0
        if want_scores or want_self_influence:
            tt = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
            for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range):
                Gd = G.to(dev, torch.float64)
                quad, norm = quad_and_norm(Gd)
                quad = quad.clamp_min(0.0)
                denom = quad.sqrt() if p.variant == "l" else norm
                ok = denom > 0
                zero_rows += int((~ok).sum())
                safe = torch.where(ok, denom, torch.ones_like(denom))
                if scores is not None:
                    num = (Gd @ S).T  # m x b
                    scores[:, start:stop] = torch.where(ok[None, :], num / safe[None, :], 0.0).cpu().numpy()
                if self_inf is not None:
                    self_inf[start:stop] = torch.where(ok, quad / safe, 0.0).cpu().numpy()
                tt.tick()
        for what, arr in (("scores", scores), ("self-influence", self_inf)):
            if arr is not None and not np.isfinite(arr).all():
                raise NumericalError(
                    f"relatif {what} contain NaN/inf; increase damping (now {p.damping:g})",
                    parameter="/method/params/damping",
                )
        denominator = "sqrt(g_i^T H^-1 g_i)" if p.variant == "l" else "||H^-1 g_i||"
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation=f"relative: g'^T H^-1 g_i / {denominator} (no 1/n); H includes damping",
                variant=p.variant,
                damping=p.damping,
                weight_decay=state.info.get("weight_decay", float(problem.weight_decay)),
                zero_gradient_rows=zero_rows,
                self_influence_definition=f"g_i^T H^-1 g_i / {denominator} (z_i as its own query)",
                **extra,
            ),
        )
