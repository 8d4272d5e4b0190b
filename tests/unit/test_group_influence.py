"""Group influence (ESTIMATORS.md 2.22) against actual retraining without the group.

Ridge regression: the objective is quadratic, so the retrained minimiser without a group has a
closed form written out here (normal equations), independent of the library's autodiff. Removing a
group keeps the other examples' weight 1/n, as the estimate assumes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.estimators import EstimatorError, InfluenceProblem, Runtime, TaskSpec, get_estimator, init_model
from app.estimators.group import CholeskyGroupSolver, as_groups, parameter_changes, sum_over_groups

stats = pytest.importorskip("scipy.stats")

REG = TaskSpec("regression", "mse")
CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=64)
WD = 0.05
N, D = 200, 5


def _ridge_problem() -> tuple[InfluenceProblem, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 10, D, generator=g, dtype=torch.float64) * torch.linspace(
        0.5, 2.0, D, dtype=torch.float64
    )
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        N + 10, generator=g, dtype=torch.float64
    )
    xa = torch.cat([x, torch.ones(N + 10, 1, dtype=torch.float64)], 1)
    theta = _ridge(xa[:N], y[:N], torch.ones(N, dtype=torch.float64))
    model = init_model("linear", {"in_features": D, "num_classes": 1}, 0).double()
    names = [k for k, _ in model.named_parameters()]
    assert names[0].endswith("weight") and names[1].endswith("bias")
    weights = {names[0]: theta[:D].reshape(1, D).clone(), names[1]: theta[D:].clone()}
    problem = InfluenceProblem(
        model=model, task=REG, weights=weights, train_x=x[:N], train_y=y[:N],
        query_x=x[N:], query_y=y[N:], weight_decay=WD,
    )  # fmt: skip
    return problem, xa, theta


def _ridge(xa: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """argmin (1/N) sum_i keep_i (xa_i theta - y_i)^2 + WD/2 ||theta||^2 (normal equations)."""
    A = 2.0 / N * (xa.T * keep) @ xa + WD * torch.eye(xa.shape[1], dtype=xa.dtype)
    return torch.linalg.solve(A, 2.0 / N * (xa.T * keep) @ y)


def _random_groups(seed: int, count: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(int(0.01 * N), int(0.3 * N) + 1, size=count)
    return [np.sort(rng.choice(N, size=s, replace=False)) for s in sizes]


@pytest.fixture(scope="module")
def ridge():
    problem, xa, theta = _ridge_problem()
    groups = _random_groups(1)
    actual = []
    for idx in groups:
        keep = torch.ones(N, dtype=torch.float64)
        keep[idx] = 0
        actual.append(_ridge(xa[:N], problem.train_y, keep) - theta)
    state = get_estimator("if_exact").fit(problem, {}, F64)
    solver = CholeskyGroupSolver(problem, state.tensors["cholesky"], F64)
    return problem, xa, theta, groups, torch.stack(actual), solver


def test_newton_order_is_exact_for_ridge_regression(ridge):
    problem, _, _, groups, actual, solver = ridge
    changes = parameter_changes(problem, solver, groups, "newton", F64)
    rel = (changes - actual).norm(dim=1) / actual.norm(dim=1)
    assert float(rel.max()) < 1e-8


def test_second_order_beats_first_order_on_large_groups(ridge):
    problem, _, _, groups, actual, solver = ridge
    first = parameter_changes(problem, solver, groups, "first", F64)
    second = parameter_changes(problem, solver, groups, "second", F64)
    large = [g for g, idx in enumerate(groups) if idx.size >= 0.1 * N]
    assert len(large) >= 10
    for g in large:
        assert float((second[g] - actual[g]).norm()) < float((first[g] - actual[g]).norm())
    # first order underestimates a large group's effect, as Koh et al. report
    assert float(np.median([float(first[g].norm() / actual[g].norm()) for g in large])) < 0.95


def test_first_order_group_scores_rank_the_actual_group_effects(ridge):
    problem, xa, theta, groups, actual, _ = ridge
    est = get_estimator("if_exact")
    scores = est.group_scores(problem, {}, groups, "first", runtime=F64)
    qa = xa[N:]
    loss = lambda t: (qa @ t - problem.query_y) ** 2  # noqa: E731
    effect = torch.stack([loss(theta + a) - loss(theta) for a in actual], 1).numpy()  # m x G
    rhos = [stats.spearmanr(scores[j], effect[j]).statistic for j in range(problem.n_query)]
    assert np.mean(rhos) >= 0.9, rhos
    newton = est.group_scores(problem, {}, groups, "newton", runtime=F64)
    assert np.mean(
        [stats.spearmanr(newton[j], effect[j]).statistic for j in range(problem.n_query)]
    ) >= np.mean(rhos)


def test_first_order_is_the_sum_of_pointwise_scores(ridge):
    problem, *_ = ridge
    groups = _random_groups(2, count=5)
    for name in ("if_exact", "grad_dot"):
        est = get_estimator(name)
        pointwise = est.attribute(problem, {}, runtime=F64).scores
        expected = np.stack([pointwise[:, idx].sum(1) for idx in groups], 1)
        np.testing.assert_allclose(est.group_scores(problem, {}, groups, runtime=F64), expected, rtol=1e-10)
    np.testing.assert_allclose(
        sum_over_groups(pointwise, [np.arange(N)]), pointwise.sum(1, keepdims=True), rtol=1e-12
    )


def test_second_order_of_a_single_example_adds_its_own_curvature(ridge):
    """One example: second order = (I + H^-1 H_i / n) times the pointwise IF change, to first order in 1/n."""
    problem, *_, solver = ridge
    first = parameter_changes(problem, solver, [np.array([3])], "first", F64)
    second = parameter_changes(problem, solver, [np.array([3])], "second", F64)
    newton = parameter_changes(problem, solver, [np.array([3])], "newton", F64)
    assert float((second - newton).norm()) < float((first - newton).norm()) * 0.05


def test_bad_groups_and_orders_are_refused(ridge):
    problem, *_ = ridge
    for groups, text in (([[]], "empty"), ([[0, N]], "outside"), ([[1, 1]], "twice")):
        with pytest.raises(EstimatorError, match=text) as info:
            as_groups(groups, N)
        assert info.value.parameter == "/output/groups/members/0"
    with pytest.raises(EstimatorError, match="'a/b' has training rows outside") as info:
        as_groups({"a/b": [N]}, N)
    assert info.value.parameter == "/output/groups/members/a~1b"
    with pytest.raises(EstimatorError, match="if_cg and if_exact give second") as info:
        get_estimator("grad_dot").group_scores(problem, {}, [[0, 1]], "second", runtime=F64)
    assert info.value.parameter == "/output/groups/order"


def test_newton_order_refuses_a_group_whose_removal_leaves_no_minimum():
    """Removing every example of an unregularised least-squares problem leaves a flat objective."""
    problem, *_ = _ridge_problem()
    problem.weight_decay = 0.0
    with pytest.raises(EstimatorError, match="not positive definite") as info:
        get_estimator("if_exact").group_scores(problem, {}, [np.arange(N)], "newton", runtime=F64)
    assert info.value.parameter == "/method/params/damping"


# ----------------------------------------------------------------------------- if_cg


def _mlp_problem() -> InfluenceProblem:
    """A tanh MLP trained briefly on blobs: non-convex, so damping keeps its Hessian positive definite."""
    from app.estimators import Recipe, train

    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (120,), generator=g)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)[y] + torch.randn(
        120, 4, generator=g, dtype=torch.float64
    )
    model = init_model("mlp", {"in_features": 4, "hidden": [8], "num_classes": 3, "activation": "tanh"}, 0)
    model = model.double()
    recipe = Recipe(learning_rate=0.2, epochs=20, batch_size=16, weight_decay=0.01, num_checkpoints=0)
    weights = train(model, CLS, x[:100], y[:100], recipe).weights
    return InfluenceProblem(
        model=model, task=CLS, weights=weights, train_x=x[:100], train_y=y[:100],
        query_x=x[100:], query_y=y[100:], weight_decay=0.01,
    )  # fmt: skip


@pytest.mark.parametrize("order", ["first", "second", "newton"])
def test_cg_group_orders_equal_the_explicit_hessian(ridge, order):
    """if_cg's Hessian-vector products and CG solves give if_exact's group scores, on ridge regression
    (where newton is also the retrained answer) and on a non-convex MLP at the same damping."""
    problem, xa, theta, groups, *_ = ridge
    cg = get_estimator("if_cg").group_scores(problem, {"rtol": 1e-12}, groups, order, runtime=F64)
    exact = get_estimator("if_exact").group_scores(problem, {"damping": 0.001}, groups, order, runtime=F64)
    np.testing.assert_allclose(cg, exact, rtol=1e-7, atol=1e-10 * np.abs(exact).max())
    mlp = _mlp_problem()
    mlp_groups = _random_groups(3, count=6)
    mlp_groups = [idx[idx < 100] for idx in mlp_groups if (idx < 100).sum() > 0]
    params = {"damping": 0.1}
    cg = get_estimator("if_cg").group_scores(mlp, {**params, "rtol": 1e-12}, mlp_groups, order, runtime=F64)
    exact = get_estimator("if_exact").group_scores(mlp, params, mlp_groups, order, runtime=F64)
    np.testing.assert_allclose(cg, exact, rtol=1e-6, atol=1e-9 * np.abs(exact).max())
    if order == "first":  # and first order is still the sum of if_cg's own pointwise scores
        pointwise = get_estimator("if_cg").attribute(mlp, {**params, "rtol": 1e-12}, runtime=F64).scores
        np.testing.assert_allclose(cg, sum_over_groups(pointwise, mlp_groups), rtol=1e-6)


def test_cg_newton_order_refuses_a_group_whose_removal_leaves_no_minimum():
    problem, *_ = _ridge_problem()
    problem.weight_decay = 0.0
    with pytest.raises(EstimatorError, match="without group 0 .* not positive definite") as info:
        get_estimator("if_cg").group_scores(problem, {"damping": 0.0}, [np.arange(N)], "newton", runtime=F64)
    assert info.value.parameter == "/method/params/damping"


@pytest.mark.parametrize("order", ["first", "second", "newton"])
def test_cg_group_terms_that_do_not_converge_fail_naming_max_iter(ridge, order):
    """Group scores carry no convergence flag, so an unfinished solve must not pass as a result. (One
    group: a block of at least p right-hand sides is solved exactly by one block-CG step.)"""
    problem, _, _, groups, *_ = ridge
    params = {"max_iter": 1, "rtol": 1e-12}
    with pytest.raises(EstimatorError, match="stopped after 1 iterations") as info:
        get_estimator("if_cg").group_scores(problem, params, groups[:1], order, runtime=F64)
    assert info.value.parameter == "/method/params/max_iter"
