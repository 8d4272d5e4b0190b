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
The second and newton orders need the explicit Hessian (``if_exact``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .base import EstimatorError, InfluenceProblem, NumericalError, Runtime
from .gradients import Ticker, objective_hessian, objective_value_and_gradient

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


def parameter_changes(
    problem: InfluenceProblem,
    cholesky: torch.Tensor,
    groups: Sequence[np.ndarray],
    order: str,
    runtime: Runtime,
) -> torch.Tensor:
    """``G x p`` (float64): the change of the minimiser when each group is removed, to ``order``.

    ``cholesky`` is the lower Cholesky factor of the damped Hessian ``H`` of the full objective.
    Cost per group: its rows' gradients and, beyond first order, their ``p x p`` Hessian; newton also
    factors ``H - H_U/n`` (``O(p^3)``).
    """
    if order not in GROUP_ORDERS:
        raise EstimatorError(
            f"unknown group order {order!r}; use one of {', '.join(GROUP_ORDERS)}",
            parameter=f"{GROUPS_PARAMETER}/order",
        )
    dev = cholesky.device
    L = cholesky.to(torch.float64)
    n = problem.n_train
    H = L @ L.T if order == "newton" else None
    changes = torch.empty(len(groups), L.shape[0], dtype=torch.float64, device=dev)
    ticker = Ticker(runtime, "group_influence", len(groups))
    for g, idx in enumerate(groups):
        rows = torch.as_tensor(idx)
        x, y, size = problem.train_x[rows], problem.train_y[rows], int(idx.size)
        _, mean_grad = objective_value_and_gradient(
            problem.model, problem.weights, x, y, problem.task, 0.0,
            chunk_size=max(runtime.chunk_size, 1024), device=dev,
        )  # fmt: skip
        g_u = (mean_grad.to(torch.float64) * (size / n)).unsqueeze(1)  # g_U / n
        if order == "first":
            changes[g] = torch.cholesky_solve(g_u, L).squeeze(1)
        else:
            H_u = objective_hessian(
                problem.model,
                problem.weights,
                x,
                y,
                problem.task,
                0.0,
                chunk_size=runtime.chunk_size,
                device=dev,
                dtype=torch.float64,
            ) * (size / n)  # fmt: skip  H_U / n
            if order == "second":
                v = torch.cholesky_solve(g_u, L)
                changes[g] = (v + torch.cholesky_solve(H_u @ v, L)).squeeze(1)
            else:
                changes[g] = _newton_step(H - H_u, g_u, g).squeeze(1)
        ticker.tick()
    return changes


def _newton_step(A: torch.Tensor, b: torch.Tensor, group: int) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise NumericalError(
            f"the Hessian without group {group} (H - H_U/n) is not positive definite: removing it leaves "
            "the objective without a strict minimum. Increase damping, or use order 'second'",
            parameter="/method/params/damping",
        )
    return torch.cholesky_solve(b, factor)


def group_scores_from_changes(query_gradients: torch.Tensor, changes: torch.Tensor) -> np.ndarray:
    """``m x G``: each query's first-order response ``g'^T dtheta`` to each group's removal."""
    return (query_gradients.to(torch.float64) @ changes.T).cpu().numpy()
