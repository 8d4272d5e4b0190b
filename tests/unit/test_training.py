"""Deterministic training, schedules, checkpoints, L-BFGS convergence and failure modes."""

from __future__ import annotations

import math

import pytest
import torch

from app.estimators import Cancelled, NumericalError, Recipe, TaskSpec, init_model, train
from app.estimators.training import checkpoint_epochs, learning_rate_at

CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")


def _blobs(n=60, d=4, k=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centers = 2 * torch.randn(k, d, generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return x.to(dtype), y


def _mlp(seed=0):
    return init_model("mlp", {"in_features": 4, "hidden": [8], "num_classes": 3}, seed)


def test_same_seed_bitwise_identical_and_different_seed_differs():
    x, y = _blobs()
    recipe = Recipe(optimizer="sgd", learning_rate=0.05, momentum=0.9, epochs=3, batch_size=16, seed=7)
    a = train(_mlp(), CLS, x, y, recipe)
    b = train(_mlp(), CLS, x, y, recipe)
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.history == b.history and a.final_loss == b.final_loss
    c = train(_mlp(), CLS, x, y, Recipe(**{**recipe.__dict__, "seed": 8}))
    assert not all(torch.equal(a.weights[k], c.weights[k]) for k in a.weights)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adaptive_optimizers_are_deterministic_and_learn(optimizer):
    x, y = _blobs()
    recipe = Recipe(optimizer=optimizer, learning_rate=0.01, epochs=15, batch_size=16, weight_decay=1e-3)
    a = train(_mlp(), CLS, x, y, recipe)
    b = train(_mlp(), CLS, x, y, recipe)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.history[-1] < a.history[0]


def test_weights_are_cpu_detached_state_dict_and_last_checkpoint_is_final():
    x, y = _blobs()
    model = init_model(
        "cnn", {"in_channels": 1, "height": 2, "width": 2, "channels": [3], "num_classes": 3}, 0
    )
    res = train(model, CLS, x, y, Recipe(epochs=2, batch_size=32, num_checkpoints=2))
    assert set(res.weights) == set(model.state_dict())
    for v in res.weights.values():
        assert v.device.type == "cpu" and not v.requires_grad
    last = res.checkpoints[-1].state
    assert all(torch.equal(last[k], res.weights[k]) for k in last)
    assert len(res.history) == 2 and math.isfinite(res.final_loss)


@pytest.mark.parametrize(
    ("schedule", "expected_factors"),
    [
        ("constant", [1.0, 1.0, 1.0]),
        # checkpoints after epochs 2, 4, 6 -> last step used epoch index 1, 3, 5
        ("cosine", [0.5 * (1 + math.cos(math.pi * e / 6)) for e in (1, 3, 5)]),
        ("linear", [1 - e / 6 for e in (1, 3, 5)]),
        ("step", [1.0, 0.5, 0.25]),
    ],
)
def test_checkpoints_steps_and_learning_rates(schedule, expected_factors):
    x, y = _blobs(n=50)
    recipe = Recipe(
        learning_rate=0.2,
        schedule=schedule,
        step_size=2,
        gamma=0.5,
        epochs=6,
        batch_size=16,
        num_checkpoints=3,
    )
    res = train(_mlp(), CLS, x, y, recipe)
    assert checkpoint_epochs(recipe) == [2, 4, 6]
    assert [c.step for c in res.checkpoints] == [8, 16, 24]  # ceil(50/16) = 4 steps per epoch
    assert [c.learning_rate for c in res.checkpoints] == pytest.approx([0.2 * f for f in expected_factors])
    assert res.steps == 24


def test_checkpoint_count_edge_cases():
    assert checkpoint_epochs(Recipe(epochs=10, num_checkpoints=3)) == [4, 7, 10]
    assert checkpoint_epochs(Recipe(epochs=2, num_checkpoints=5)) == [1, 2]
    assert checkpoint_epochs(Recipe(epochs=5, num_checkpoints=0)) == []
    assert learning_rate_at(
        Recipe(schedule="step", step_size=3, gamma=0.1, learning_rate=1.0), 6
    ) == pytest.approx(0.01)
    x, y = _blobs(n=20)
    assert train(_mlp(), CLS, x, y, Recipe(epochs=2, num_checkpoints=0)).checkpoints == []


def test_lbfgs_converges_on_l2_logistic_regression():
    x, y = _blobs(n=120, d=4, k=3, seed=3, dtype=torch.float64)
    model = init_model("linear", {"in_features": 4, "num_classes": 3}, 0).double()
    wd = 1e-2
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(
            optimizer="lbfgs",
            learning_rate=1.0,
            epochs=50,
            weight_decay=wd,
            lbfgs_tolerance=1e-10,
            num_checkpoints=2,
        ),
    )
    model.load_state_dict(res.weights)
    model.zero_grad()
    params = list(model.parameters())
    obj = torch.nn.functional.cross_entropy(model(x), y) + 0.5 * wd * sum((p * p).sum() for p in params)
    grads = torch.autograd.grad(obj, params)
    gnorm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
    assert gnorm < 1e-6
    assert res.grad_norm is not None and res.grad_norm < 1e-6
    assert res.checkpoints and res.checkpoints[-1].learning_rate == 1.0
    assert all(torch.equal(res.checkpoints[-1].state[k], res.weights[k]) for k in res.weights)


def test_regression_training_reduces_mse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    model = init_model("linear", {"in_features": 3, "num_classes": 1}, 0)
    res = train(model, REG, x, y, Recipe(learning_rate=0.05, epochs=30, batch_size=16))
    assert res.final_loss < 1e-3


def test_huge_learning_rate_raises_numerical_error():
    g = torch.Generator().manual_seed(0)
    x = 10 * torch.randn(64, 3, generator=g)
    y = torch.randn(64, generator=g)
    model = init_model("linear", {"in_features": 3, "num_classes": 1}, 0)
    with pytest.raises(NumericalError) as e:
        train(model, REG, x, y, Recipe(learning_rate=1e6, epochs=50, batch_size=8))
    assert e.value.parameter == "/recipe/learning_rate"


def test_cancelled_from_progress_propagates():
    x, y = _blobs()
    calls = []

    def progress(phase, done, total):
        calls.append((phase, done, total))
        if done == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        train(_mlp(), CLS, x, y, Recipe(epochs=5), progress=progress)
    assert calls == [("training", 1, 5), ("training", 2, 5)]


def test_invalid_recipe_names_the_field():
    from app.estimators import EstimatorError

    x, y = _blobs(n=10)
    with pytest.raises(EstimatorError) as e:
        train(_mlp(), CLS, x, y, Recipe(batch_size=0))
    assert e.value.parameter == "/recipe/batch_size"
