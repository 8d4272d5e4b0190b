"""G-Shapley (Ghorbani & Zou 2019; ESTIMATORS.md 2.5): Data Shapley with "training on a prefix" replaced
by one SGD step per point.

For a random permutation ``pi`` of the training set, start from the run's initial point ``theta_0``
(the problem's initial weights, else the architecture's initialisation under the recipe's seed, as
retraining starts) and take one step per point in permutation order,
``theta_j = theta_{j-1} - eta (grad L(z_{pi_j}; theta_{j-1}) + weight_decay theta_{j-1})``; the
marginal of ``pi_j`` is ``U(theta_j) - U(theta_{j-1})`` with ``U`` the utility on the query
(validation) set: minus the mean loss (differentiable, the default) or the accuracy. Values are the
mean marginals over permutations, with Monte-Carlo standard errors; every permutation's marginals sum
to ``U(theta_n) - U(theta_0)``. No retraining: ``P n`` gradients and utility evaluations, permutations
run side by side (``vmap`` over a batch of parameter vectors). As ``eta -> 0`` the values divided by
``eta`` tend to the gradient dot product at ``theta_0`` with the mean query loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import torch
from annotated_types import Ge, Gt
from torch.func import functional_call, grad, vmap

from ..base import Attribution, Estimator, EstimatorError, NumericalError, Runtime, register
from ..gradients import (
    Ticker,
    as_params,
    column_range,
    flatten,
    functional_state,
    metadata,
    numpy_dtype,
    trainable_names,
    unflatten,
    validate_problem,
)
from ..objectives import per_example_loss
from ..training import Recipe
from .engine import measure_outputs, model_factory, vmap_safe
from .methods import _p, starting_point
from .semivalues import mean_and_stderr, permutation_marginals


@dataclass
class GShapleyParams:
    """G-Shapley: permutation sampling where each prefix is one more SGD step from the initial point."""

    learning_rate: Annotated[float, Gt(0)] | None = _p(
        None, "step size of the single pass (one step per point); null: the recipe's learning rate"
    )
    permutations: Annotated[int, Ge(2)] = _p(
        100, "budget: permutations (single passes over the training set)"
    )
    tolerance: Annotated[float, Ge(0)] = _p(
        0.0, "stop once the largest standard error falls below this (0: run every permutation)"
    )
    min_permutations: Annotated[int, Ge(2)] = _p(
        16, "permutations before the tolerance rule may stop the run"
    )
    batch: Annotated[int, Ge(1)] = _p(16, "permutations run side by side")
    utility: Literal["loss", "accuracy"] = _p(
        "loss", "utility on the query set: minus the mean loss (differentiable), or accuracy"
    )
    seed: Annotated[int, Ge(0)] = _p(0, "seed of the permutations")


@register
class GShapley(Estimator):
    name = "g_shapley"
    summary = (
        "G-Shapley: Monte-Carlo Data Shapley with each prefix's training replaced by one SGD step per "
        "point from the initial weights (Ghorbani & Zou 2019)"
    )
    Params = GShapleyParams
    needs_checkpoints = False
    supports_self_influence = False
    shardable_by_rows = False
    values_only = True  # data values, no per-query scores (see returns_scores)
    group_orders = ()

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
        validate_problem(problem, need_queries=True)
        if problem.n_query == 0:
            raise EstimatorError(
                "g_shapley needs queries (its validation set)", parameter="/query_dataset_id"
            )
        if p.utility == "accuracy" and problem.task.kind != "classification":
            raise EstimatorError(
                "utility 'accuracy' needs a classification model; use 'loss'",
                parameter="/method/params/utility",
            )
        if not vmap_safe(problem.model):
            raise EstimatorError(
                "g_shapley runs permutations side by side and needs a model without dropout or batch norm",
                parameter="/model_id",
            )
        recipe = _recipe(problem)
        eta = float(p.learning_rate if p.learning_rate is not None else recipe.learning_rate)
        wd = float(problem.weight_decay)
        dev, dtype = torch.device(runtime.device), runtime.dtype
        start = model_factory(starting_point(problem, runtime))(recipe.seed)
        names = trainable_names(problem.model)
        _, params0, fixed = functional_state(start, start.state_dict(), device=dev, dtype=dtype, names=names)
        theta0 = flatten(params0, names)
        shapes = [params0[k].shape for k in names]
        model = problem.model.eval()

        def forward(theta, x):
            return functional_call(model, (unflatten(theta, names, shapes), fixed), (x,))

        def loss_one(theta, x, y):
            out = forward(theta, x.unsqueeze(0))
            return (
                per_example_loss(out, y.unsqueeze(0), problem.task).sum() + 0.5 * wd * (theta * theta).sum()
            )

        step_grads = vmap(grad(loss_one))
        x = _as(problem.train_x, dev, dtype)
        y = problem.train_y.to(dev)
        qx, qy = _as(problem.query_x, dev, dtype), problem.query_y.to(dev)
        kind = "neg_loss" if p.utility == "loss" else "accuracy"

        def utilities(thetas: torch.Tensor) -> np.ndarray:
            outputs = vmap(forward, in_dims=(0, None))(thetas, qx)
            return measure_outputs(outputs, qy, problem.task, kind).cpu().numpy()

        n = problem.n_train
        gen = np.random.default_rng(p.seed)
        perms = np.stack([gen.permutation(n) for _ in range(p.permutations)])
        prefix = np.zeros((p.permutations, n + 1))
        started = time.perf_counter()
        ticker = Ticker(runtime, "g_shapley", p.permutations * n)
        done, stopped_by = p.permutations, "permutations"
        with torch.no_grad():
            for b0 in range(0, p.permutations, p.batch):
                b1 = min(b0 + p.batch, p.permutations)
                thetas = theta0.expand(b1 - b0, -1).clone()
                order = torch.as_tensor(perms[b0:b1], device=dev)
                prefix[b0:b1, 0] = utilities(thetas)
                for j in range(n):
                    rows = order[:, j]
                    thetas = thetas - eta * step_grads(thetas, x[rows], y[rows])
                    prefix[b0:b1, j + 1] = utilities(thetas)
                    ticker.tick(b1 - b0)
                if not np.isfinite(prefix[b0:b1]).all():
                    raise NumericalError(
                        f"the single SGD pass diverged (learning rate {eta:g}); lower learning_rate",
                        parameter="/method/params/learning_rate",
                    )
                if p.tolerance > 0 and b1 >= p.min_permutations and b1 < p.permutations:
                    _, err = mean_and_stderr(permutation_marginals(perms[:b1], prefix[:b1]))
                    if err.max() < p.tolerance:
                        done, stopped_by = b1, "converged"
                        break
        perms, prefix = perms[:done], prefix[:done]
        values, stderr = mean_and_stderr(permutation_marginals(perms, prefix))
        lo, hi = column_range(problem, train_range)
        out_dtype = numpy_dtype(runtime.dtype)
        return Attribution(
            scores=None,
            self_influence=None,
            values=values[lo:hi].astype(out_dtype),
            values_stderr=stderr[lo:hi].astype(out_dtype),
            metadata=metadata(
                self.name,
                problem,
                normalisation="mean marginal utility over permutations (the values sum to the mean "
                "U(theta_n) - U(theta_0))",
                utility=p.utility,
                validation_set="query set",
                learning_rate=eta,
                weight_decay=wd,
                permutations=done,
                stopped_by=stopped_by,
                utility_start=float(prefix[:, 0].mean()),
                utility_end=float(prefix[:, -1].mean()),
                stderr_max=float(stderr.max()),
                seconds=time.perf_counter() - started,
            ),
        )


def _recipe(problem) -> Recipe:
    """The model's recipe (its seed draws the initial point, its rate is the default step), else defaults."""
    r = problem.recipe
    if isinstance(r, dict):
        try:
            return Recipe(**r)
        except TypeError as e:
            raise EstimatorError(f"invalid recipe: {e}", parameter="/model_id") from None
    return r if r is not None else Recipe(weight_decay=float(problem.weight_decay))


def _as(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=dev, dtype=dtype) if t.is_floating_point() else t.to(device=dev)
