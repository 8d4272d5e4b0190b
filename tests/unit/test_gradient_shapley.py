"""G-Shapley (ESTIMATORS.md 2.5): telescoping per permutation, the small-step limit (gradient dot product
at the initial point), and the vmapped permutations against a plain torch.optim loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.estimators import (
    EstimatorError,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
)

F64 = Runtime(dtype=torch.float64, chunk_size=32)
CLS = TaskSpec("classification", "cross_entropy")
MLP = {"in_features": 4, "hidden": [5], "num_classes": 3}


def _problem(wd=0.0, recipe_seed=3) -> InfluenceProblem:
    g = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (36,), generator=g)
    x = centres[y] + torch.randn(36, 4, generator=g, dtype=torch.float64)
    model = init_model("mlp", MLP, recipe_seed).double()
    recipe = Recipe(learning_rate=0.1, weight_decay=wd, seed=recipe_seed)
    return InfluenceProblem(
        model, CLS, model.state_dict(), x[:30], y[:30], x[30:], y[30:], weight_decay=wd,
        recipe=dataclasses.asdict(recipe),
    )  # fmt: skip


def _initial(prob) -> torch.nn.Module:
    return init_model("mlp", MLP, prob.recipe["seed"]).double()


def test_each_permutation_telescopes_and_values_sum_to_the_mean_utility_gain():
    prob = _problem(wd=1e-2)
    out = get_estimator("g_shapley").attribute(prob, {"permutations": 12, "batch": 5}, runtime=F64)
    md = out.metadata
    assert out.scores is None and out.values.shape == (30,) and np.isfinite(out.values_stderr).all()
    np.testing.assert_allclose(out.values.sum(), md["utility_end"] - md["utility_start"], rtol=1e-10)
    with torch.no_grad():
        start = -F.cross_entropy(_initial(prob)(prob.query_x), prob.query_y).item()
    assert md["utility_start"] == pytest.approx(start, rel=1e-12)


def test_the_permutations_equal_a_plain_sgd_loop():
    """One permutation, batch 1, torch.optim.SGD with coupled weight decay: the same prefix utilities."""
    prob = _problem(wd=1e-2)
    out = get_estimator("g_shapley").attribute(
        prob, {"permutations": 2, "batch": 2, "seed": 5, "learning_rate": 0.05}, runtime=F64
    )
    gen = np.random.default_rng(5)  # the estimator's permutations
    perms = np.stack([gen.permutation(30) for _ in range(2)])
    marginals = np.zeros((2, 30))
    for k, perm in enumerate(perms):
        model = _initial(prob)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-2)

        def utility(model=model):
            with torch.no_grad():
                return -F.cross_entropy(model(prob.query_x), prob.query_y).item()

        before = utility()
        for i in perm:
            opt.zero_grad()
            F.cross_entropy(model(prob.train_x[i : i + 1]), prob.train_y[i : i + 1]).backward()
            opt.step()
            after = utility()
            marginals[k, i] = after - before
            before = after
    np.testing.assert_allclose(out.values, marginals.mean(axis=0), rtol=1e-8, atol=1e-14)


def test_small_steps_tend_to_the_gradient_dot_product_at_the_initial_point():
    """ESTIMATORS.md 2.5: values / eta -> grad(mean query loss)(theta_0) . grad L(z_i; theta_0), with
    error O(eta)."""
    prob = _problem(wd=0.0)
    at_start = dataclasses.replace(prob, weights=_initial(prob).state_dict())
    dot = get_estimator("grad_dot").attribute(at_start, None, runtime=F64).scores.mean(axis=0)
    errors = []
    for eta in (1e-2, 1e-3):
        out = get_estimator("g_shapley").attribute(
            prob, {"permutations": 4, "batch": 4, "learning_rate": eta}, runtime=F64
        )
        errors.append(float(np.abs(out.values / eta - dot).max() / np.abs(dot).max()))
    print(
        f"\nG-Shapley / eta vs grad-dot at theta_0, relative error at eta 1e-2 / 1e-3: {np.round(errors, 5)}"
    )
    assert errors[1] < errors[0] / 5 and errors[1] < 0.02


def test_accuracy_utility_refusals_and_divergence():
    prob = _problem()
    out = get_estimator("g_shapley").attribute(prob, {"permutations": 3, "utility": "accuracy"}, runtime=F64)
    assert out.metadata["utility"] == "accuracy" and 0 <= out.metadata["utility_end"] <= 1
    reg = dataclasses.replace(prob, task=TaskSpec("regression", "mse"), train_y=prob.train_y.double())
    with pytest.raises(EstimatorError) as info:
        get_estimator("g_shapley").attribute(reg, {"utility": "accuracy"}, runtime=F64)
    assert info.value.parameter == "/method/params/utility"
    with pytest.raises(EstimatorError) as info:
        get_estimator("g_shapley").attribute(
            dataclasses.replace(prob, train_x=prob.train_x * 1e10),
            {"permutations": 2, "learning_rate": 1e300},
            runtime=F64,
        )
    assert (
        info.value.code == "numerical-instability" and info.value.parameter == "/method/params/learning_rate"
    )


def test_the_tolerance_stops_once_the_largest_standard_error_is_below_it():
    prob = _problem()
    base = {"permutations": 64, "batch": 8, "learning_rate": 0.05}
    full = get_estimator("g_shapley").attribute(prob, base, runtime=F64)
    assert full.metadata["stopped_by"] == "permutations" and full.metadata["permutations"] == 64
    tol = float(full.values_stderr.max()) * 1.5  # reached before all 64 permutations ran
    early = get_estimator("g_shapley").attribute(prob, {**base, "tolerance": tol}, runtime=F64)
    md = early.metadata
    assert md["stopped_by"] == "converged" and 16 <= md["permutations"] < 64 and md["permutations"] % 8 == 0
    assert early.values_stderr.max() < tol
    # the same permutations as the full run's first ones, so the values are the running means
    first = get_estimator("g_shapley").attribute(
        prob, {**base, "permutations": md["permutations"]}, runtime=F64
    )
    np.testing.assert_allclose(early.values, first.values, rtol=1e-12)
