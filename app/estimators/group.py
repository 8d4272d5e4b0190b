"""Group influence: the effect of removing a whole set of training examples (ESTIMATORS.md 2.22).

Removing the group ``U`` from the objective ``(1/n) sum_i L(z_i) + weight_decay/2 ||theta||^2`` (the
other examples keep their weight ``1/n``, as in the pointwise scores) moves the minimiser by

* ``first``: ``dtheta = (1/n) H^-1 g_U`` with ``g_U = sum_{i in U} grad L(z_i)``; its effect on a query
  is the sum of the group's pointwise scores (Koh, Ang, Teo & Liang 2019). Any estimator;
* ``second``: ``dtheta = v + (1/n) H^-1 H_U v`` with ``v`` the first-order change and ``H_U`` the
  Hessian of the group's summed loss: the next term of the expansion below, which adds the
  interactions between the group's members (Basu, You & Feizi 2020);
* ``newton``: ``dtheta = (H - H_U/n)^-1 g_U / n``, one Newton step on the objective without the
  group. Exact for quadratic losses (ridge regression), whatever the group's size.

``H`` is the damped Hessian of the full objective at the trained weights. The group's score for a
query is ``g'^T dtheta`` (``g'`` the gradient of the query objective), so it has the sign and scale
of the pointwise scores: positive = removing the group raises the query loss (a proponent group).
The second and newton orders need the Hessian: ``if_exact``'s explicit one
(:class:`CholeskyGroupSolver`) or ``if_cg``'s Hessian-vector products (:class:`IterativeGroupSolver`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .base import EstimatorError, InfluenceProblem, NumericalError, Runtime
from .gradients import Ticker, objective_hessian, objective_value_and_gradient, query_gradients
from .ihvp import TrainingHessian, conjugate_gradient

GROUP_ORDERS = ("first", "second", "newton")
GROUPS_PARAMETER = "/output/groups"


def as_groups(
    groups: Mapping[str, Sequence[int]] | Sequence[Sequence[int]], n_train: int
) -> list[np.ndarray]:
    """Each group as an int64 index array; refuses empty groups, rows out of range and repeated rows.

    ``groups`` maps names to rows (a job's ``output.groups.members``) or lists them; an error names the
    group by its JSON pointer, ``/output/groups/members/<name or position>``.
    """
    named = groups.items() if isinstance(groups, Mapping) else enumerate(groups)
    out = []
    for name, rows in named:
        where = f"{GROUPS_PARAMETER}/members/{str(name).replace('~', '~0').replace('/', '~1')}"
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise EstimatorError(f"group {name!r} is empty", parameter=where)
        if idx.min() < 0 or idx.max() >= n_train:
            raise EstimatorError(f"group {name!r} has training rows outside [0, {n_train})", parameter=where)
        if np.unique(idx).size != idx.size:
            raise EstimatorError(f"group {name!r} lists a training row twice", parameter=where)
        out.append(idx)
    return out


def sum_over_groups(scores: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """First-order group scores, ``m x G``: each group's pointwise scores summed (float64)."""
    scores = np.asarray(scores)
    return np.stack([scores[:, idx].sum(axis=1, dtype=np.float64) for idx in groups], axis=1)


class CholeskyGroupSolver:
    """``if_exact``: solves with the damped Hessian's Cholesky factor; the group Hessians are formed
    explicitly (``p x p`` each), and newton factors ``H - H_U/n``."""

    def __init__(self, problem: InfluenceProblem, cholesky: torch.Tensor, runtime: Runtime) -> None:
        self.problem, self.runtime = problem, runtime
        self.L = cholesky.to(torch.float64)
        self._H: torch.Tensor | None = None

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(B, self.L)

    def _group_hessian(self, rows: np.ndarray) -> torch.Tensor:
        """``H_U / n``: the Hessian of the group's summed loss, over ``n``."""
        idx = torch.as_tensor(rows)
        return objective_hessian(
            self.problem.model, self.problem.weights, self.problem.train_x[idx], self.problem.train_y[idx],
            self.problem.task, 0.0, chunk_size=self.runtime.chunk_size, device=self.L.device,
            dtype=torch.float64,
        ) * (rows.size / self.problem.n_train)  # fmt: skip

    def group_product(self, rows: np.ndarray, v: torch.Tensor) -> torch.Tensor:
        return self._group_hessian(rows) @ v

    def newton(self, rows: np.ndarray, b: torch.Tensor, group: int) -> torch.Tensor:
        if self._H is None:
            self._H = self.L @ self.L.T
        factor, info = torch.linalg.cholesky_ex(self._H - self._group_hessian(rows))
        if int(info) != 0:
            raise _no_minimum(group)
        return torch.cholesky_solve(b, factor)


class IterativeGroupSolver:
    """``if_cg``: block conjugate gradients with Hessian-vector products; nothing ``p x p`` is formed.

    ``hessian`` is a :class:`~app.estimators.ihvp.TrainingHessian` (all rows or a subsample); the
    group's own products ``H_U v / n`` run over the group's rows only. Newton runs one CG per group
    on ``H + damping I - H_U/n``."""

    def __init__(self, hessian: TrainingHessian, n_train: int, damping: float, max_iter: int, rtol: float):
        self.hessian, self.n = hessian, n_train
        self.damping, self.max_iter, self.rtol = damping, max_iter, rtol

    def _cg(self, product, B: torch.Tensor):
        return conjugate_gradient(
            product, B, self.damping, self.max_iter, self.rtol, dtype=self.hessian.dtype
        )

    def _solution(self, res) -> torch.Tensor:
        if not res.converged:  # group scores carry no convergence flag: a partial solve would pass as one
            worst = float(res.relative_residual.max())
            raise NumericalError(
                f"conjugate gradient for the group terms stopped after {res.iterations} iterations at "
                f"relative residual {worst:.2g} (rtol {self.rtol:g}); raise max_iter or damping",
                parameter="/method/params/max_iter",
            )
        return res.x.to(torch.float64)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        return self._solution(self._cg(self.hessian.matmul, B))

    def group_product(self, rows: np.ndarray, v: torch.Tensor) -> torch.Tensor:
        # rows_matmul is alpha (mean over rows of the loss Hessian + weight_decay I) v + beta v
        share = rows.size / self.n
        out = self.hessian.rows_matmul(
            torch.as_tensor(rows), v, alpha=share, beta=-share * self.hessian.weight_decay
        )
        return out.to(torch.float64)

    def newton(self, rows: np.ndarray, b: torch.Tensor, group: int) -> torch.Tensor:
        try:
            res = self._cg(lambda V: self.hessian.matmul(V) - self.group_product(rows, V), b)
        except NumericalError as exc:
            raise _no_minimum(group, f" ({exc.detail})") from exc
        return self._solution(res)


def _no_minimum(group: int, why: str = "") -> NumericalError:
    return NumericalError(
        f"the Hessian without group {group} (H - H_U/n) is not positive definite{why}: removing it leaves "
        "the objective without a strict minimum. Increase damping, or use order 'second'",
        parameter="/method/params/damping",
    )


def group_gradients(
    problem: InfluenceProblem, groups: Sequence[np.ndarray], runtime: Runtime
) -> torch.Tensor:
    """``p x G`` (float64): each group's summed loss gradient over ``n``, ``g_U / n``."""
    dev = torch.device(runtime.device)
    out = []
    for idx in groups:
        rows = torch.as_tensor(idx)
        _, mean_grad = objective_value_and_gradient(
            problem.model, problem.weights, problem.train_x[rows], problem.train_y[rows], problem.task, 0.0,
            chunk_size=max(runtime.chunk_size, 1024), device=dev,
        )  # fmt: skip
        out.append(mean_grad.to(torch.float64) * (idx.size / problem.n_train))
    return torch.stack(out, 1)


def parameter_changes(
    problem: InfluenceProblem,
    solver: CholeskyGroupSolver | IterativeGroupSolver,
    groups: Sequence[np.ndarray],
    order: str,
    runtime: Runtime,
) -> torch.Tensor:
    """``G x p`` (float64): the change of the minimiser when each group is removed, to ``order``.

    First and second order solve for every group at once (one block of ``G`` right-hand sides, and
    second order a second block after each group's own Hessian product); newton solves once per
    group, with that group's matrix.
    """
    if order not in GROUP_ORDERS:
        raise EstimatorError(
            f"unknown group order {order!r}; use one of {', '.join(GROUP_ORDERS)}",
            parameter=f"{GROUPS_PARAMETER}/order",
        )
    ticker = Ticker(runtime, "group_influence", len(groups) + (0 if order == "first" else len(groups)))
    B = group_gradients(problem, groups, runtime)
    ticker.tick(len(groups))
    if order == "first":
        return solver.solve(B).T.contiguous()
    if order == "second":
        V = solver.solve(B)
        HV = torch.empty_like(V)
        for g, idx in enumerate(groups):
            HV[:, g] = solver.group_product(idx, V[:, g])
            ticker.tick()
        return (V + solver.solve(HV)).T.contiguous()
    changes = torch.empty(len(groups), B.shape[0], dtype=torch.float64, device=B.device)
    for g, idx in enumerate(groups):
        changes[g] = solver.newton(idx, B[:, g : g + 1], g).squeeze(1)
        ticker.tick()
    return changes


def hessian_group_scores(
    problem: InfluenceProblem,
    solver: CholeskyGroupSolver | IterativeGroupSolver,
    groups: Sequence[np.ndarray],
    order: str,
    runtime: Runtime,
) -> np.ndarray:
    """``m x G`` group scores of any order from ``solver`` (the estimators' ``group_scores``)."""
    changes = parameter_changes(problem, solver, groups, order, runtime)
    Q = query_gradients(problem, problem.weights, runtime)
    return group_scores_from_changes(Q, changes)


def group_scores_from_changes(query_gradients: torch.Tensor, changes: torch.Tensor) -> np.ndarray:
    """``m x G``: each query's first-order response ``g'^T dtheta`` to each group's removal."""
    return (query_gradients.to(torch.float64) @ changes.T).cpu().numpy()
