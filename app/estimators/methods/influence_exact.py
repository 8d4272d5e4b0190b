"""Influence functions with the exact Hessian (Koh & Liang 2017; ESTIMATORS.md 2.10).

``H`` is the Hessian of the training objective ``mean_i L(z_i) +
weight_decay/2 ||theta||^2`` at the final weights, plus ``damping * I``, formed
explicitly in float64 and Cholesky-factored once. Then

* ``scores[j, i] = (1/n) g'_j^T H^-1 g_i`` (first-order effect on the query
  objective of removing ``z_i``: positive = removal raises it);
* ``self_influence[i] = (1/n) g_i^T H^-1 g_i``.

Cost O(n p^2) for H and O(p^3) to factor, memory O(p^2): ``max_parameters``
guards against models that are too big.
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
    objective_hessian,
    objective_value_and_gradient,
    query_gradients,
    train_gradients,
    validate_problem,
)
from ..group import GROUP_ORDERS, CholeskyGroupSolver, as_groups, hessian_group_scores


@dataclass
class IFExactParams:
    """Exact-Hessian influence functions: (1/n) g'^T (H + damping I)^-1 g_i."""

    damping: Annotated[float, Ge(0)] = field(
        default=0.0,
        metadata={"description": "added to the Hessian's diagonal (on top of the model's weight decay)"},
    )
    max_parameters: Annotated[int, Ge(1)] = field(
        default=5000,
        metadata={"description": "refuse models with more trainable parameters (the Hessian is p x p)"},
    )


@register
class IFExact(Estimator):
    name = "if_exact"
    summary = "influence functions with the explicit Hessian and a Cholesky solve (Koh & Liang 2017)"
    Params = IFExactParams
    group_orders = GROUP_ORDERS

    def check(self, problem_size: ProblemSize, params) -> None:
        p = as_params(self.Params, params)
        if problem_size.n_parameters > p.max_parameters:
            raise EstimatorError(
                f"if_exact forms a p x p Hessian; this model has p = {problem_size.n_parameters} trainable "
                f"parameters, more than max_parameters = {p.max_parameters}. Use a smaller model, raise "
                "max_parameters, or choose a method that does not form the Hessian",
                parameter="/method/name",
            )

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """Cholesky factor of the damped Hessian of the training objective (float64)."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        model = problem.model
        self.check(
            ProblemSize(problem.n_train, problem.n_query, n_parameters(model), len(problem.checkpoints)), p
        )
        validate_problem(problem, need_queries=False)
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        if problem.n_train == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        wd = float(problem.weight_decay)
        dev = torch.device(runtime.device)
        H = objective_hessian(
            model,
            problem.weights,
            problem.train_x,
            problem.train_y,
            problem.task,
            wd,
            chunk_size=runtime.chunk_size,
            device=dev,
            dtype=torch.float64,
            progress=runtime.progress,
        )
        if p.damping:
            H.diagonal().add_(p.damping)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:
            lam_min = float(torch.linalg.eigvalsh(H)[0])
            scale = float(H.diagonal().abs().mean())
            needed = max(p.damping - lam_min, 0.0)  # lam_min may read >= 0 when H is borderline singular
            suggest = max(needed, p.damping) + max(0.1 * abs(lam_min), 1e-3 * scale, 1e-8)
            raise NumericalError(
                f"the Hessian of the training objective plus damping*I is not positive definite "
                f"(smallest eigenvalue {lam_min:.3g} with damping={p.damping:g}, weight_decay={wd:g}); "
                f"the model is not at a strict minimum (e.g. a non-convex or over-parameterised model). "
                f"Increase damping above {needed:.3g}, e.g. to {suggest:.3g}",
                parameter="/method/params/damping",
            )
        _, objective_grad = objective_value_and_gradient(
            model,
            problem.weights,
            problem.train_x,
            problem.train_y,
            problem.task,
            wd,
            chunk_size=max(runtime.chunk_size, 1024),
            device=dev,
        )
        return TrainState(
            tensors={"cholesky": L.cpu()},
            info={"objective_grad_norm": float(torch.linalg.vector_norm(objective_grad)), "weight_decay": wd},
        )

    def state_params(self, params) -> dict:
        return {"damping": as_params(self.Params, params).damping}

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
        L = state.tensors["cholesky"].to(dev, torch.float64)
        n = problem.n_train  # the 1/n of the removal effect uses the full training set
        lo, hi = column_range(problem, train_range)
        m, cols = problem.n_query, hi - lo
        dtype = numpy_dtype(runtime.dtype)

        S = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt)
            S = torch.cholesky_solve(Q.T.to(torch.float64), L)  # p x m: H^-1 g'_j
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None
        tt = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
        for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range):
            Gd = G.to(torch.float64)
            if scores is not None:
                scores[:, start:stop] = ((Gd @ S).T / n).cpu().numpy()
            if self_inf is not None:
                Z = torch.linalg.solve_triangular(L, Gd.T, upper=False)
                self_inf[start:stop] = ((Z * Z).sum(dim=0) / n).cpu().numpy()
            tt.tick()
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n",
                damping=p.damping,
                weight_decay=state.info["weight_decay"],
                objective_grad_norm=state.info["objective_grad_norm"],
            ),
        )

    def group_scores(self, problem, params, groups, order="first", *, runtime=None, state=None):
        """First, second or newton order from the explicit Hessian (:mod:`..group`)."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=True)
        idx = as_groups(groups, problem.n_train)
        state = state or self.fit(problem, p, runtime)
        cholesky = state.tensors["cholesky"].to(torch.device(runtime.device))
        solver = CholeskyGroupSolver(problem, cholesky, runtime)
        return hessian_group_scores(problem, solver, idx, order, runtime)
