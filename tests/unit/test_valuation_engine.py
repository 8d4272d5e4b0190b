"""The retraining engine: batched == alone == sharded == sequential, exactness of the Newton path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import app.estimators.valuation  # noqa: E402, F401  (importing it registers its estimators)
from app.estimators import Cancelled, EstimatorError, NumericalError, Recipe, TaskSpec, init_model, train
from app.estimators.objectives import per_example_loss, query_objective
from app.estimators.valuation import (
    SubsetOutputs,
    bernoulli_plan,
    choose_solver,
    loo_plan,
    reset_factory,
    ridge_fit_closed_form,
    ridge_loo_closed_form,
    train_subsets,
)

torch.set_num_threads(1)
CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
MLP = {"in_features": 4, "hidden": [8], "num_classes": 3, "activation": "tanh"}


def _data(n, seed, d=4, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(k, d, generator=g, dtype=torch.float64)[y] + torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.fixture(scope="module")
def mlp_setup():
    x, y = _data(40, 0)
    qx, qy = _data(15, 1)
    plan = bernoulli_plan(40, 12, seed=3, train_seed=None)
    plan.masks[0] = True
    plan.masks[1] = False  # an empty subset
    return x, y, qx, qy, plan


def _mlp_factory(seed):
    return init_model("mlp", MLP, seed).double()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batched_equals_alone_shards_and_sequential(mlp_setup, optimizer):
    x, y, qx, qy, plan = mlp_setup
    recipe = Recipe(
        optimizer=optimizer,
        learning_rate=0.05,
        momentum=0.5 if optimizer == "sgd" else 0.0,
        schedule="cosine",
        epochs=4,
        batch_size=16,
        weight_decay=1e-3,
    )
    sets = {"query": (qx, qy), "valid": (qx, qy)}
    measure = {"query": "margin", "valid": "accuracy"}

    def run(rows, **kw):
        return train_subsets(
            _mlp_factory, CLS, recipe, x, y, plan.masks[rows], plan.seeds[rows], sets, measure, **kw
        )

    everything = run(slice(0, 12), n_models_per_batch=12)
    assert everything.info["solver"] == "batched" and everything.info["n_trained"] == 11
    alone = SubsetOutputs.concat([run(slice(r, r + 1)) for r in range(12)])
    shards = SubsetOutputs.concat(
        [run(slice(0, 5), n_models_per_batch=2), run(slice(5, 12), n_models_per_batch=7)]
    )
    sequential = run(slice(0, 12), solver="sequential")
    for other, tol in [(alone, 1e-12), (shards, 1e-12), (sequential, 1e-10)]:
        np.testing.assert_allclose(other["query"], everything["query"], rtol=0, atol=tol)
        np.testing.assert_array_equal(other["valid"], everything["valid"])
    # the shards are bitwise identical to the single batch on CPU
    assert np.array_equal(shards["query"], everything["query"])
    assert shards.info["n_trained"] == 11


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_full_mask_reproduces_train(mlp_setup, optimizer):
    x, y, qx, qy, _ = mlp_setup
    recipe = Recipe(
        optimizer=optimizer, learning_rate=0.05, epochs=3, batch_size=16, weight_decay=1e-2, seed=5
    )
    model = _mlp_factory(5)
    train(model, CLS, x, y, recipe)
    with torch.no_grad():
        want = per_example_loss(model(qx), qy, CLS).numpy()
    for solver in ("batched", "sequential"):
        out = train_subsets(
            _mlp_factory,
            CLS,
            recipe,
            x,
            y,
            np.ones((1, 40), bool),
            [5],
            {"q": (qx, qy)},
            {"q": "loss"},
            solver=solver,
        )
        np.testing.assert_allclose(out["q"][0], want, rtol=0, atol=1e-12)


def test_reset_factory_replays_init_model():
    for arch, params in [("mlp", MLP), ("cnn", {"channels": [4]}), ("linear", {"in_features": 3})]:
        make = reset_factory(init_model(arch, params, 0).double())
        a, b = make(7).state_dict(), init_model(arch, params, 7).double().state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
        assert a[next(iter(a))].dtype == torch.float64


def test_newton_matches_lbfgs_and_is_shard_invariant():
    x, y = _data(30, 2, d=3)
    qx, qy = _data(20, 3, d=3)
    linear = {"in_features": 3, "num_classes": 3}
    recipe = Recipe(optimizer="lbfgs", weight_decay=0.05, epochs=200, lbfgs_tolerance=1e-12)
    template = init_model("linear", linear, 0).double()
    plan = bernoulli_plan(30, 9, seed=1)
    sets, measure = {"q": (qx, qy)}, {"q": "loss"}
    out = train_subsets(template, CLS, recipe, x, y, plan.masks, plan.seeds, sets, measure)
    assert out.info["solver"] == "newton" and out.info["newton_max_grad_norm"] < 1e-11
    for r in (0, 4):
        rows = torch.as_tensor(np.nonzero(plan.masks[r])[0])
        model = init_model("linear", linear, 0).double()
        train(model, CLS, x[rows], y[rows], recipe)
        with torch.no_grad():
            want = per_example_loss(model(qx), qy, CLS).numpy()
        np.testing.assert_allclose(out["q"][r], want, rtol=0, atol=1e-6)
    parts = SubsetOutputs.concat(
        [
            train_subsets(
                template,
                CLS,
                recipe,
                x,
                y,
                plan.masks[a:b],
                plan.seeds[a:b],
                sets,
                measure,
                n_models_per_batch=2,
            )
            for a, b in [(0, 4), (4, 9)]
        ]
    )
    np.testing.assert_allclose(parts["q"], out["q"], rtol=0, atol=1e-12)
    cold = train_subsets(template, CLS, recipe, x, y, plan.masks, plan.seeds, sets, measure, warm_start=False)
    np.testing.assert_allclose(cold["q"], out["q"], rtol=0, atol=1e-10)


def test_binary_newton_is_the_two_class_minimiser():
    """The reduced 2-class path (w = theta_1 - theta_0) gives the full softmax model's minimiser."""
    x, y = _data(40, 5, d=3, k=2)
    qx, qy = _data(25, 6, d=3, k=2)
    recipe = Recipe(optimizer="lbfgs", weight_decay=0.05, epochs=200, lbfgs_tolerance=1e-12)
    template = init_model("linear", {"in_features": 3, "num_classes": 2}, 0).double()
    plan = bernoulli_plan(40, 6, seed=2)
    plan.masks[1] = False
    plan.masks[1, :3] = True  # a tiny subset
    sets, measure = {"q": (qx, qy)}, {"q": "loss"}
    out = train_subsets(template, CLS, recipe, x, y, plan.masks, plan.seeds, sets, measure)
    assert out.info["newton_max_grad_norm"] < 1e-11
    for r in (0, 1):
        rows = torch.as_tensor(np.nonzero(plan.masks[r])[0])
        model = init_model("linear", {"in_features": 3, "num_classes": 2}, 0).double()
        train(model, CLS, x[rows], y[rows], recipe)
        with torch.no_grad():
            want = per_example_loss(model(qx), qy, CLS).numpy()
        np.testing.assert_allclose(out["q"][r], want, rtol=0, atol=1e-6)
    # the same problem solved in the full 2p-dimensional parametrisation
    from app.estimators.valuation import engine

    masks = torch.as_tensor(plan.masks)
    idx, W = engine._packed(masks)
    X = engine._features(x, True)[idx]
    full = engine._Multinomial.of(X, y[idx], W, 0.05, 2)
    theta, _ = engine._newton(full, torch.zeros(len(masks), 8, dtype=torch.float64), 1e-12, 100)
    reduced = engine._Binary.of(X, y[idx], W, 0.05)
    w, gnorm = engine._newton(reduced, torch.zeros(len(masks), 4, dtype=torch.float64), 1e-12, 100)
    torch.testing.assert_close(reduced.weights(w), full.weights(theta), rtol=0, atol=1e-10)
    assert float(gnorm.max()) < 1e-12


def test_multinomial_small_subset_step_is_the_newton_step():
    """Subsets with fewer rows than features take the Woodbury (s k)-square solve: same step."""
    from app.estimators.valuation import engine

    x, y = _data(30, 9, d=6, k=4)
    masks = torch.zeros(5, 30, dtype=torch.bool)
    for r in range(5):
        masks[r, r : r + 2 + r] = True  # 2..6 rows < p = 7
    idx, W = engine._packed(masks)
    problem = engine._Multinomial.of(engine._features(x, True)[idx], y[idx], W, 0.05, 4)
    theta = 0.3 * torch.randn(5, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, G, P = problem.derivatives(theta)
    primal = torch.linalg.solve(problem.hessian(P), G.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(problem.newton_step(P, G), primal, rtol=1e-9, atol=1e-12)


def test_newton_accuracy_is_batch_invariant_when_classes_are_missing():
    """Classes absent from a subset get tied logits; accuracy must not depend on the batch."""
    x, y = _data(30, 7, d=3)
    qx, qy = _data(40, 8, d=3)
    recipe = Recipe(optimizer="lbfgs", weight_decay=0.05)
    template = init_model("linear", {"in_features": 3, "num_classes": 3}, 0).double()
    order = np.random.default_rng(0).permutation(30)
    masks = np.zeros((12, 30), bool)
    for r in range(12):
        masks[r, order[: r + 1]] = True  # prefixes: the first ones hold one or two classes
    sets, measure = {"q": (qx, qy)}, {"q": "accuracy"}
    together = train_subsets(template, CLS, recipe, x, y, masks, [0] * 12, sets, measure)["q"]
    alone = [
        train_subsets(template, CLS, recipe, x, y, masks[r : r + 1], [0], sets, measure)["q"][0]
        for r in range(12)
    ]
    mixed = train_subsets(
        template, CLS, recipe, x, y, masks[::-1], [0] * 12, sets, measure, n_models_per_batch=5
    )["q"][::-1]
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, mixed)


@pytest.fixture(scope="module")
def ridge_small():
    g = torch.Generator().manual_seed(0)
    n, d = 200, 20
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 0.5 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    qx = torch.randn(10, d, generator=g, dtype=torch.float64)
    qy = qx @ w + 0.5
    return x, y, qx, qy


def test_ridge_closed_form_loo_is_exact(ridge_small):
    x, y, _, _ = ridge_small
    wd = 2 * 1e-2 / 199  # lambda = wd * (n - 1) / 2 = 1e-2 in the sum-of-squares convention
    theta = ridge_loo_closed_form(x, y, wd)
    for i in (0, 57, 199):
        keep = torch.arange(200) != i
        w, b = ridge_fit_closed_form(x[keep], y[keep], wd)
        np.testing.assert_allclose(theta[i, :, :-1], w, rtol=0, atol=1e-10)
        np.testing.assert_allclose(theta[i, :, -1], b, rtol=0, atol=1e-10)


def test_engine_loo_on_ridge_equals_sherman_morrison(ridge_small):
    x, y, qx, qy = ridge_small
    wd = 1e-4
    recipe = Recipe(optimizer="lbfgs", weight_decay=wd)
    template = init_model("linear", {"in_features": 20, "num_classes": 1}, 0).double()
    plan = loo_plan(200)
    out = train_subsets(template, REG, recipe, x, y, plan.masks, plan.seeds, {"q": (qx, qy)}, {"q": "loss"})
    assert out.info["solver"] == "newton"
    theta = ridge_loo_closed_form(x, y, wd)  # (n, 1, 21)
    pred = torch.einsum("mp,np->nm", torch.cat([qx, torch.ones(10, 1, dtype=torch.float64)], 1), theta[:, 0])
    np.testing.assert_allclose(out["q"][1:], ((pred - qy) ** 2).numpy(), rtol=1e-10, atol=1e-8)
    w, b = ridge_fit_closed_form(x, y, wd)
    np.testing.assert_allclose(out["q"][0], ((qx @ w[0] + b[0] - qy) ** 2).numpy(), rtol=1e-10, atol=1e-8)


def test_empty_subset_is_the_uninformed_predictor(mlp_setup):
    x, y, qx, qy, _ = mlp_setup
    sets = {"loss": (qx, qy), "margin": (qx, qy), "acc": (qx, qy), "nl": (qx, qy)}
    measure = {"loss": "loss", "margin": "margin", "acc": "accuracy", "nl": "neg_loss"}
    out = train_subsets(_mlp_factory, CLS, Recipe(), x, y, np.zeros((2, 40), bool), [0, 1], sets, measure)
    assert out.info["n_trained"] == 0
    np.testing.assert_allclose(out["loss"], math.log(3))
    np.testing.assert_allclose(out["margin"], math.log(2))  # minus (0 - logsumexp(0, 0))
    np.testing.assert_allclose(out["acc"], 1 / 3)
    np.testing.assert_allclose(out["nl"], -math.log(3))
    rx = torch.randn(5, 4, dtype=torch.float64)
    ry = torch.arange(5, dtype=torch.float64)
    reg = train_subsets(
        init_model("linear", {"in_features": 4, "num_classes": 1}, 0).double(),
        REG,
        Recipe(),
        rx,
        ry,
        np.zeros((1, 5), bool),
        [0],
        {"q": (rx, ry)},
        {"q": "loss"},
    )
    np.testing.assert_allclose(reg["q"][0], (ry**2).numpy())


def test_solver_selection():
    lin = init_model("linear", {"in_features": 3}, 0)
    mlp = init_model("mlp", MLP, 0)
    bn = init_model("resnet9", {"base_channels": 2, "height": 4, "width": 4}, 0)
    lbfgs, sgd = Recipe(optimizer="lbfgs"), Recipe()
    assert choose_solver(lin, lbfgs, "auto") == "newton"
    assert choose_solver(lin, sgd, "auto") == "batched"
    assert choose_solver(mlp, sgd, "auto") == "batched"
    assert choose_solver(mlp, lbfgs, "auto") == "sequential"
    assert choose_solver(bn, sgd, "auto") == "sequential"
    for model, recipe, solver in [(mlp, sgd, "newton"), (mlp, lbfgs, "batched"), (bn, sgd, "batched")]:
        with pytest.raises(EstimatorError) as e:
            choose_solver(model, recipe, solver)
        assert e.value.parameter == "/method/params/solver"


def test_sequential_fallback_with_batchnorm_is_deterministic(mlp_setup):
    x, y, qx, qy, plan = mlp_setup

    def factory(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()

    recipe = Recipe(learning_rate=0.1, epochs=2, batch_size=8)
    masks = plan.masks[2:5]
    a = train_subsets(factory, CLS, recipe, x, y, masks, [1, 2, 3], {"q": (qx, qy)}, {"q": "loss"})
    b = train_subsets(factory, CLS, recipe, x, y, masks, [1, 2, 3], {"q": (qx, qy)}, {"q": "loss"})
    assert a.info["solver"] == "sequential"
    np.testing.assert_array_equal(a["q"], b["q"])
    model = factory(4)
    train(model, CLS, x, y, Recipe(learning_rate=0.1, epochs=2, batch_size=8, seed=4))
    model.eval()
    with torch.no_grad():
        want = query_objective(model(qx), qy, CLS, "loss").numpy()
    full = train_subsets(
        factory, CLS, recipe, x, y, np.ones((1, 40), bool), [4], {"q": (qx, qy)}, {"q": "loss"}
    )
    np.testing.assert_allclose(full["q"][0], want, rtol=0, atol=1e-12)


def test_cancel_and_divergence(mlp_setup):
    x, y, qx, qy, plan = mlp_setup

    def cancel(phase, done, total):
        if done > 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train_subsets(
            _mlp_factory,
            CLS,
            Recipe(epochs=1),
            x,
            y,
            plan.masks,
            plan.seeds,
            {"q": (qx, qy)},
            {"q": "loss"},
            n_models_per_batch=2,
            progress=cancel,
        )
    with pytest.raises(NumericalError) as e:
        train_subsets(
            init_model("linear", {"in_features": 4, "num_classes": 3}, 0).double(),
            CLS,
            Recipe(learning_rate=1e300, epochs=3),
            x * 1e10,
            y,
            plan.masks[2:5],
            plan.seeds[2:5],
            {"q": (qx, qy)},
            {"q": "loss"},
        )
    assert e.value.parameter == "/recipe/learning_rate"
    with pytest.raises(EstimatorError):
        train_subsets(
            _mlp_factory,
            REG,
            Recipe(),
            x,
            y.double(),
            plan.masks[:1],
            [0],
            {"q": (qx, qy)},
            {"q": "accuracy"},
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_on_cuda_matches_cpu(mlp_setup):
    x, y, qx, qy, plan = mlp_setup
    recipe = Recipe(learning_rate=0.05, epochs=3, batch_size=16, weight_decay=1e-3)
    sets, measure = {"q": (qx, qy), "v": (qx, qy)}, {"q": "loss", "v": "accuracy"}
    cpu = train_subsets(_mlp_factory, CLS, recipe, x, y, plan.masks, plan.seeds, sets, measure)
    for solver in ("batched", "sequential"):
        gpu = train_subsets(
            _mlp_factory,
            CLS,
            recipe,
            x,
            y,
            plan.masks,
            plan.seeds,
            sets,
            measure,
            solver=solver,
            device="cuda",
        )
        np.testing.assert_allclose(gpu["q"], cpu["q"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(gpu["v"], cpu["v"])
