"""HyDRA, SGD-influence and MAGIC (ESTIMATORS.md 2.24, 2.25, 2.27): the replayed run, its metagradient
against finite differences and actual skip-one retraining through torch's own optimizers, and the
Hessian-free approximation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.estimators import (
    Cancelled,
    EstimatorError,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
)
from app.estimators.objectives import per_example_loss, query_objective
from app.estimators.training import _make_optimizer, learning_rate_at, train
from app.estimators.unroll import Unroller, batch_plan

stats = pytest.importorskip("scipy.stats")

F64 = Runtime(dtype=torch.float64, chunk_size=16)
CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
MLP = {"in_features": 5, "hidden": [4], "num_classes": 3}
RECIPES = {
    "sgd": Recipe(learning_rate=0.1, epochs=3, batch_size=8, weight_decay=1e-2, seed=3, num_checkpoints=0),
    "sgd-momentum-cosine": Recipe(
        learning_rate=0.05, momentum=0.9, schedule="cosine", epochs=3, batch_size=8, weight_decay=1e-2, seed=4
    ),
    "adam-step": Recipe(
        optimizer="adam",
        learning_rate=0.01,
        schedule="step",
        step_size=2,
        epochs=3,
        batch_size=8,
        weight_decay=1e-2,
        seed=5,
    ),  # fmt: skip
    "adamw": Recipe(optimizer="adamw", learning_rate=0.01, epochs=3, batch_size=8, weight_decay=0.1, seed=6),
}


def _data(n=60, m=4, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n + m,), generator=g)
    x = centres[y] + torch.randn(n + m, d, generator=g, dtype=torch.float64)
    return x[:n], y[:n], x[n:], y[n:]


def _trained(recipe: Recipe, arch="mlp", params=MLP, task=CLS, data=None, measurement="loss"):
    x, y, qx, qy = data if data is not None else _data()
    model = init_model(arch, params, recipe.seed).double()
    res = train(model, task, x, y, recipe)
    return InfluenceProblem(
        model=model, task=task, weights=res.weights, train_x=x, train_y=y, query_x=qx, query_y=qy,
        measurement=measurement, weight_decay=recipe.weight_decay, recipe=dataclasses.asdict(recipe),
        checkpoints=res.checkpoints,
    )  # fmt: skip


def _weighted_run(prob: InfluenceProblem, recipe: Recipe, w: torch.Tensor) -> torch.Tensor:
    """An independent reference: the recipe's run with torch's own optimizer on the weighted batch loss
    ``mean_{i in B} w_i L_i``; returns the queries' objectives after training."""
    arch_model = init_model("mlp", MLP, recipe.seed).double()
    opt = _make_optimizer(recipe, list(arch_model.parameters()))
    gen = torch.Generator().manual_seed(recipe.seed)
    n = prob.n_train
    for epoch in range(recipe.epochs):
        for group in opt.param_groups:
            group["lr"] = learning_rate_at(recipe, epoch)
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, recipe.batch_size):
            idx = perm[s : s + recipe.batch_size]
            loss = (
                w[idx] * per_example_loss(arch_model(prob.train_x[idx]), prob.train_y[idx], prob.task)
            ).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return query_objective(arch_model(prob.query_x), prob.query_y, prob.task, prob.measurement)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_replay_reproduces_the_trained_weights(name):
    recipe = RECIPES[name]
    prob = _trained(recipe)
    unroller = Unroller(prob, recipe, F64)
    assert len(unroller.steps) == recipe.epochs * 8  # ceil(60 / 8) batches per epoch
    starts, final = unroller.replay(unroller.segment_length(None))
    assert starts.shape == (5, unroller.state_size)  # ceil(sqrt(24)) = 5 steps per segment: 5 starts
    assert unroller.replay_error(final) < 1e-12
    assert torch.equal(unroller.final_state(starts, 5), final)


def test_float32_replay_of_a_float32_run():
    recipe = RECIPES["sgd-momentum-cosine"]
    x, y, qx, qy = _data()
    model = init_model("mlp", MLP, recipe.seed)
    res = train(model, CLS, x.float(), y, recipe)
    prob = InfluenceProblem(
        model, CLS, res.weights, x.float(), y, qx.float(), qy, recipe=dataclasses.asdict(recipe)
    )
    out = get_estimator("magic").attribute(prob, None, runtime=Runtime(chunk_size=16))
    assert out.metadata["replay_error"] < 1e-6 and out.scores.dtype == np.float32


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_magic_equals_finite_differences_of_weighted_retraining(name):
    """ESTIMATORS.md 2.27: central differences of the run retrained with weight 1 +- eps (torch.optim,
    not our replay) match the metagradient to relative error < 1e-3 (measured: ~1e-8)."""
    recipe = RECIPES[name]
    prob = _trained(recipe)
    out = get_estimator("magic").attribute(prob, None, runtime=F64)
    eps = 1e-5
    for i in (0, 7, 31):
        up, down = (
            torch.ones(prob.n_train, dtype=torch.float64),
            torch.ones(prob.n_train, dtype=torch.float64),
        )
        up[i], down[i] = 1 + eps, 1 - eps
        fd = -(_weighted_run(prob, recipe, up) - _weighted_run(prob, recipe, down)).numpy() / (2 * eps)
        err = np.abs(out.scores[:, i] - fd).max() / np.abs(fd).max()
        assert err < 1e-3, (i, err)
    assert out.metadata["optimizer"] == recipe.optimizer and out.metadata["hessian"] is True


def test_sgd_influence_equals_skipping_the_example_on_linear_regression():
    """ESTIMATORS.md 2.25: linear regression with MSE, one epoch of mini-batch SGD: every later step is
    affine and does not involve z_j, so the linearised parameter change equals actually skipping z_j
    (same batches minus j) to float error; the score is the query gradient times that change. Over
    several epochs z_j recurs and the equality is first order."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        50, generator=g, dtype=torch.float64
    )
    qx, qy = (
        torch.randn(5, 6, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    )
    linear = ("linear", {"in_features": 6, "num_classes": 1})
    figures = {}
    for epochs in (1, 4):
        recipe = Recipe(
            learning_rate=0.05, epochs=epochs, batch_size=5, weight_decay=1e-2, seed=2, num_checkpoints=0
        )
        prob = _trained(recipe, *linear, REG, (x, y, qx, qy))
        out = get_estimator("sgd_influence").attribute(prob, None, runtime=F64)
        theta_T = torch.cat([prob.weights[k].reshape(-1) for k in ("1.weight", "1.bias")])
        # d q / d theta at theta_T for the linear model (x, 1): 2 (x.theta - y) (x, 1)
        rows = torch.cat([qx, torch.ones(5, 1, dtype=torch.float64)], dim=1)
        gq = 2 * (rows @ theta_T - qy)[:, None] * rows
        first_order = np.zeros_like(out.scores)
        for j in range(50):
            w = torch.ones(50, dtype=torch.float64)
            w[j] = 0.0
            delta = _linear_run_parameters(prob, recipe, w, linear) - theta_T
            first_order[:, j] = (gq @ delta).numpy()
        figures[epochs] = (
            float(np.abs(out.scores - first_order).max() / np.abs(first_order).max()),
            min(stats.pearsonr(out.scores[q], first_order[q])[0] for q in range(5)),
        )
    print(
        "\nSGD-influence vs g'.(theta_-j - theta), skipping z_j, (relative max error, min Pearson) "
        f"by epochs: {figures}"
    )
    assert figures[1][0] < 1e-10
    assert figures[4][1] > 0.9


def _linear_run_parameters(prob, recipe, w, linear) -> torch.Tensor:
    """Final (weight, bias) of the linear model trained by torch.optim with per-example weights ``w``."""
    model = init_model(*linear, recipe.seed).double()
    opt = _make_optimizer(recipe, list(model.parameters()))
    gen = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.epochs):
        perm = torch.randperm(prob.n_train, generator=gen)
        for s in range(0, prob.n_train, recipe.batch_size):
            idx = perm[s : s + recipe.batch_size]
            loss = (w[idx] * per_example_loss(model(prob.train_x[idx]), prob.train_y[idx], REG)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_hydra_full_recursion_equals_the_difference_of_two_runs_on_a_quadratic_loss():
    """ESTIMATORS.md 2.24: linear regression (quadratic loss), fixed batch order, three epochs: HyDRA's
    full recursion equals (q(run with w_i = 1 + eps) - q(run with w_i = 1)) / eps, both runs by
    torch.optim, to 1e-6 relative."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.randn(3, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        40, generator=g, dtype=torch.float64
    )
    qx, qy = (
        torch.randn(3, 3, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    linear = ("linear", {"in_features": 3, "num_classes": 1})
    recipe = Recipe(learning_rate=0.05, epochs=3, batch_size=4, weight_decay=1e-2, seed=1, num_checkpoints=0)
    prob = _trained(recipe, *linear, REG, (x, y, qx, qy))
    out = get_estimator("hydra").attribute(prob, {"hessian": True}, runtime=F64)
    rows = torch.cat([qx, torch.ones(3, 1, dtype=torch.float64)], dim=1)

    def query_losses(w):
        return ((rows @ _linear_run_parameters(prob, recipe, w, linear) - qy) ** 2).numpy()

    base, eps = query_losses(torch.ones(40, dtype=torch.float64)), 1e-7
    for i in (0, 13, 39):
        w = torch.ones(40, dtype=torch.float64)
        w[i] += eps
        difference = -(query_losses(w) - base) / eps
        assert np.abs(out.scores[:, i] - difference).max() <= 1e-6 * np.abs(difference).max(), i


def test_sgd_influence_ranks_like_skip_one_retraining_of_an_mlp():
    """Hara et al.'s counterfactual on a non-convex run (4 epochs, MLP): the linearised scores rank the
    actual skip-one changes of the query loss (Spearman >= 0.95 for every query)."""
    recipe = Recipe(learning_rate=0.1, epochs=4, batch_size=10, weight_decay=1e-2, seed=0, num_checkpoints=0)
    prob = _trained(recipe)
    out = get_estimator("sgd_influence").attribute(prob, None, runtime=F64)
    base = _weighted_run(prob, recipe, torch.ones(prob.n_train, dtype=torch.float64))
    actual = np.zeros_like(out.scores)
    for j in range(prob.n_train):
        w = torch.ones(prob.n_train, dtype=torch.float64)
        w[j] = 0.0
        actual[:, j] = (_weighted_run(prob, recipe, w) - base).numpy()
    rho = [stats.spearmanr(out.scores[q], actual[q])[0] for q in range(prob.n_query)]
    print(f"\nSGD-influence vs skip-one retraining, Spearman per query: {np.round(rho, 4)}")
    assert min(rho) >= 0.95


def test_sgd_influence_and_hydra_with_hessian_equal_magic_on_plain_sgd():
    prob = _trained(RECIPES["sgd"])
    magic = get_estimator("magic").attribute(prob, None, runtime=F64, want_self_influence=True)
    for name, params in (("sgd_influence", None), ("hydra", {"hessian": True})):
        out = get_estimator(name).attribute(prob, params, runtime=F64, want_self_influence=True)
        np.testing.assert_allclose(out.scores, magic.scores, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(out.self_influence, magic.self_influence, rtol=1e-12, atol=1e-15)


def test_hydra_hessian_free_is_the_sum_of_step_gradients():
    """Plain SGD: Hessian-free HyDRA = sum_t (eta_t / |B_t|) 1[i in B_t] g'(theta_T) . grad L(z_i; theta_t),
    with theta_t recorded from torch's own optimizer."""
    recipe = RECIPES["sgd"]
    prob = _trained(recipe)
    model = init_model("mlp", MLP, recipe.seed).double()
    opt = _make_optimizer(recipe, list(model.parameters()))
    expected_dirs = []  # (rows, lr, per-example gradients at theta_t)
    for step in batch_plan(recipe, prob.n_train):
        rows = []
        for i in step.rows.tolist():
            model.zero_grad()
            per_example_loss(model(prob.train_x[i : i + 1]), prob.train_y[i : i + 1], CLS).sum().backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        expected_dirs.append((step.rows, step.learning_rate, torch.stack(rows)))
        opt.zero_grad()
        per_example_loss(model(prob.train_x[step.rows]), prob.train_y[step.rows], CLS).mean().backward()
        opt.step()
    model.zero_grad()
    q = query_objective(model(prob.query_x), prob.query_y, CLS, "loss")
    params = list(model.parameters())
    gq = torch.stack([
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(q[j], params, retain_graph=True)])
        for j in range(prob.n_query)
    ])  # fmt: skip
    expected = torch.zeros(prob.n_query, prob.n_train, dtype=torch.float64)
    for rows, lr, G in expected_dirs:
        expected[:, rows] += lr / len(rows) * (gq @ G.T)
    out = get_estimator("hydra").attribute(prob, None, runtime=F64)
    assert out.metadata["hessian"] is False
    np.testing.assert_allclose(out.scores, expected.numpy(), rtol=1e-9, atol=1e-13)


def test_hydra_hessian_free_error_shrinks_with_the_learning_rate():
    """ESTIMATORS.md 2.24: the Hessian-free error (vs the full recursion) shrinks as eta -> 0."""
    errors = []
    for lr in (0.3, 0.03, 0.003):
        prob = _trained(dataclasses.replace(RECIPES["sgd"], learning_rate=lr))
        free = get_estimator("hydra").attribute(prob, None, runtime=F64).scores
        full = get_estimator("hydra").attribute(prob, {"hessian": True}, runtime=F64).scores
        errors.append(float(np.linalg.norm(free - full) / np.linalg.norm(full)))
    print(f"\nHyDRA Hessian-free relative error at lr 0.3 / 0.03 / 0.003: {np.round(errors, 5)}")
    assert errors[0] > 5 * errors[1] and errors[1] > 5 * errors[2] and errors[2] < 0.05


def test_self_influence_is_the_diagonal_of_scoring_the_training_set():
    prob = _trained(RECIPES["adam-step"])
    prob = dataclasses.replace(prob, query_x=prob.train_x, query_y=prob.train_y)
    for name in ("magic", "hydra"):
        out = get_estimator(name).attribute(prob, None, runtime=F64, want_self_influence=True)
        np.testing.assert_allclose(out.self_influence, np.diag(out.scores), rtol=1e-10, atol=1e-14)
        assert out.self_influence.mean() > 0  # an example's own loss falls when it is trained on


def test_cached_replay_and_segment_lengths_give_the_same_scores():
    prob = _trained(RECIPES["sgd-momentum-cosine"])
    est = get_estimator("magic")
    state = est.fit(prob, None, F64)
    assert set(state.tensors) == {"segment_starts"} and state.info["steps"] == 24
    want = est.attribute(prob, None, runtime=F64, state=state).scores
    for segment in (1, 7, 24, 1000):
        got = est.attribute(prob, {"segment_length": segment}, runtime=F64).scores
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_measurement_margin():
    prob = _trained(RECIPES["sgd"], measurement="margin")
    out = get_estimator("magic").attribute(prob, None, runtime=F64)
    up, down = torch.ones(prob.n_train, dtype=torch.float64), torch.ones(prob.n_train, dtype=torch.float64)
    up[3], down[3] = 1 + 1e-5, 1 - 1e-5
    recipe = RECIPES["sgd"]
    fd = -(_weighted_run(prob, recipe, up) - _weighted_run(prob, recipe, down)).numpy() / 2e-5
    np.testing.assert_allclose(out.scores[:, 3], fd, rtol=1e-4, atol=1e-9)
    assert out.metadata["measurement"] == "margin"


def _refused(prob, name="magic", params=None) -> EstimatorError:
    with pytest.raises(EstimatorError) as info:
        get_estimator(name).attribute(prob, params, runtime=F64)
    return info.value


def test_refusals_name_what_to_change():
    prob = _trained(RECIPES["sgd"])
    err = _refused(dataclasses.replace(prob, recipe=None))
    assert err.parameter == "/model_id" and "recipe" in err.detail
    lbfgs = dataclasses.asdict(dataclasses.replace(RECIPES["sgd"], optimizer="lbfgs"))
    err = _refused(dataclasses.replace(prob, recipe=lbfgs))
    assert err.parameter == "/model_id" and "L-BFGS" in err.detail
    other_seed = dataclasses.asdict(dataclasses.replace(RECIPES["sgd"], seed=9))
    err = _refused(dataclasses.replace(prob, recipe=other_seed))
    assert err.parameter == "/model_id" and "does not reproduce" in err.detail
    shuffled = torch.randperm(prob.n_train, generator=torch.Generator().manual_seed(0))
    err = _refused(dataclasses.replace(prob, train_x=prob.train_x[shuffled], train_y=prob.train_y[shuffled]))
    assert "row order" in err.detail
    err = _refused(_trained(RECIPES["adamw"]), "sgd_influence")
    assert err.parameter == "/method/name" and "magic" in err.detail
    dropout = dataclasses.replace(
        prob, model=torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.1))
    )
    assert "dropout" in _refused(dropout).detail
    assert _refused(prob, "magic", {"replay_tolerance": 1e-30}).parameter == "/model_id"


def test_divergent_replay_fails_loudly():
    recipe = dataclasses.replace(RECIPES["sgd"], learning_rate=1e4)
    x, y, qx, qy = _data()
    model = init_model("mlp", MLP, recipe.seed).double()
    prob = InfluenceProblem(
        model, CLS, model.state_dict(), x * 1e3, y, qx, qy, recipe=dataclasses.asdict(recipe)
    )
    err = _refused(prob)
    assert err.code == "numerical-instability" and err.parameter == "/model_id"


def test_gradient_of_the_replay_matches_torch_autograd_through_the_whole_run():
    """The segment sweep (vmapped VJPs, recomputed states) equals plain autograd through the unrolled
    run for one query, built here as one differentiable graph."""
    recipe = RECIPES["adam-step"]
    prob = _trained(recipe)
    unroller = Unroller(prob, recipe, F64)
    w = torch.ones(prob.n_train, dtype=torch.float64, requires_grad=True)
    state = unroller.initial_state()
    for step in unroller.steps:
        state = unroller.step_fn(step)(state, w[step.rows])
    params = unroller.params(unroller.theta(state))
    out = torch.func.functional_call(prob.model, (params, unroller.fixed), (prob.query_x[:1],))
    F.cross_entropy(out, prob.query_y[:1]).backward()
    scores = get_estimator("magic").attribute(prob, {"segment_length": 4}, runtime=F64).scores
    np.testing.assert_allclose(scores[0], -w.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_the_replay_stays_within_the_memory_budget():
    prob = _trained(RECIPES["adamw"])  # 24 steps, 3 x 39 state numbers (theta, m, v)
    tight = Runtime(dtype=torch.float64, chunk_size=16, memory_budget_bytes=10 * 117 * 8)
    out = get_estimator("magic").attribute(prob, None, runtime=tight)  # 5 starts + 5 states fit
    assert out.metadata["segment_length"] == 5
    with pytest.raises(EstimatorError) as info:
        get_estimator("magic").attribute(prob, {"segment_length": 24}, runtime=tight)  # 1 + 24 do not
    assert info.value.parameter == "/method/params/segment_length" and "sqrt(T)" in info.value.detail
    with pytest.raises(EstimatorError, match="too large to unroll"):
        get_estimator("magic").attribute(
            prob, None, runtime=dataclasses.replace(tight, memory_budget_bytes=1000)
        )


def test_cancelled_mid_sweep_stops_the_method():
    prob = _trained(RECIPES["sgd"])
    phases = []

    def progress(phase, done, total):
        phases.append((phase, done, total))
        if phase == "unroll" and done == 5:
            raise Cancelled()

    with pytest.raises(Cancelled):
        get_estimator("magic").attribute(prob, None, runtime=dataclasses.replace(F64, progress=progress))
    assert ("replay", 24, 24) in phases and phases[-1] == ("unroll", 5, 24)


def test_tracincp_with_adam_preconditioning_uses_the_optimizers_second_moments():
    """TracInCP on an Adam run with adam_preconditioning: sum_t eta_t g'_t . (g_{i,t} / (sqrt(v_hat_t) +
    eps)), with v_t read from torch.optim.Adam's own state at each checkpoint of an independent run."""
    recipe = dataclasses.replace(RECIPES["adam-step"], num_checkpoints=3)
    x, y, qx, qy = _data()
    model = init_model("mlp", MLP, recipe.seed).double()
    res = train(model, CLS, x, y, recipe)
    prob = InfluenceProblem(
        model, CLS, res.weights, x, y, qx, qy, checkpoints=res.checkpoints, weight_decay=recipe.weight_decay,
        recipe=dataclasses.asdict(recipe),
    )  # fmt: skip
    # the reference: torch.optim.Adam's exp_avg_sq at the checkpoint steps
    ref = init_model("mlp", MLP, recipe.seed).double()
    opt = _make_optimizer(recipe, list(ref.parameters()))
    want_steps = {int(c.step) for c in res.checkpoints}
    scales = {}
    for step in batch_plan(recipe, prob.n_train):
        for group in opt.param_groups:
            group["lr"] = step.learning_rate
        opt.zero_grad()
        per_example_loss(ref(x[step.rows]), y[step.rows], CLS).mean().backward()
        opt.step()
        if step.count in want_steps:
            v = torch.cat([opt.state[q]["exp_avg_sq"].reshape(-1) for q in ref.parameters()])
            scales[step.count] = 1.0 / ((v / (1 - 0.999**step.count)).sqrt() + 1e-8)
    from app.estimators.gradients import per_sample_gradients, query_objective_fn, train_objective

    expected = torch.zeros(prob.n_query, prob.n_train, dtype=torch.float64)
    self_expected = torch.zeros(prob.n_train, dtype=torch.float64)
    for ck in res.checkpoints:
        G = torch.cat([g for _, _, g in per_sample_gradients(model, ck.state, x, y, train_objective(CLS))])
        Q = torch.cat(
            [g for _, _, g in per_sample_gradients(model, ck.state, qx, qy, query_objective_fn(CLS, "loss"))]
        )
        s = scales[int(ck.step)]
        expected += ck.learning_rate * (Q @ (G * s).T)
        self_expected += ck.learning_rate * (G * G * s).sum(dim=1)
    est = get_estimator("tracincp")
    out = est.attribute(prob, {"adam_preconditioning": True}, runtime=F64, want_self_influence=True)
    np.testing.assert_allclose(out.scores, expected.numpy(), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(out.self_influence, self_expected.numpy(), rtol=1e-9)
    assert out.metadata["warnings"] == [] and out.metadata["adam_preconditioning"] is True
    plain = est.attribute(prob, None, runtime=F64)
    assert plain.metadata["warnings"] and not np.allclose(plain.scores, out.scores)
    # TracIn-RP: the cached state carries the scales; k >= p is the exact answer again
    params = {"adam_preconditioning": True, "projection_dim": 10_000}
    np.testing.assert_allclose(est.attribute(prob, params, runtime=F64).scores, expected.numpy(), rtol=1e-9)
    rp = {"adam_preconditioning": True, "projection_dim": 16}
    state = est.fit(prob, rp, F64)
    assert "adam_scale_0" in state.tensors
    np.testing.assert_allclose(
        est.attribute(prob, rp, runtime=F64, state=state).scores,
        est.attribute(prob, rp, runtime=F64).scores,
        rtol=1e-10,
    )
    sgd = _trained(dataclasses.replace(RECIPES["sgd"], num_checkpoints=2))
    with pytest.raises(EstimatorError) as info:  # an SGD run has no second moments
        est.attribute(sgd, {"adam_preconditioning": True}, runtime=F64)
    assert info.value.parameter == "/method/params/adam_preconditioning"
