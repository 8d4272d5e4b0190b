"""TracInCP pitfall (ESTIMATORS.md 2.18): Adam updates are not eta * g.

The training recipe travels with the problem (``InfluenceProblem.recipe``, filled by the worker from the
model's stored recipe); tracincp records the optimizer and warns when it is adam/adamw (or lbfgs).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, init_model, train

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=32)
MLP = {"in_features": 4, "hidden": [8], "num_classes": 3, "activation": "tanh"}


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)[y] + torch.randn(
        n, 4, generator=g, dtype=torch.float64
    )
    return x, y


def _trained(optimizer: str) -> tuple[InfluenceProblem, Recipe]:
    x, y = _data(40, 0)
    qx, qy = _data(5, 1)
    model = init_model("mlp", MLP, 0).double()
    lr = 1.0 if optimizer == "lbfgs" else (0.05 if optimizer.startswith("adam") else 0.2)
    recipe = Recipe(optimizer=optimizer, learning_rate=lr, epochs=6, batch_size=8, num_checkpoints=3)
    res = train(model, CLS, x, y, recipe)
    problem = InfluenceProblem(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        checkpoints=res.checkpoints,
        recipe=asdict(recipe),
    )
    return problem, recipe


@pytest.mark.parametrize(("optimizer", "label"), [("adam", "Adam"), ("adamw", "AdamW")])
def test_tracincp_warns_for_adam_recipes(optimizer, label):
    problem, recipe = _trained(optimizer)
    assert len(problem.checkpoints) == 3
    est = get_estimator("tracincp")
    out = est.attribute(problem, {}, want_self_influence=True, runtime=F64)
    md = out.metadata
    assert md["optimizer"] == optimizer
    assert len(md["warnings"]) == 1
    text = md["warnings"][0]
    assert f"trained with {label}" in text
    assert "plain-gradient (SGD) TracIn approximation" in text
    assert "effective per-parameter step sizes" in text
    # the checkpoints carry the nominal (recipe) rate, which the warning says is not Adam's step size
    assert md["learning_rates"] == [recipe.learning_rate] * 3
    # the warning is the only difference: the same problem without a recipe gives the same numbers
    problem.recipe = None
    bare = est.attribute(problem, {}, want_self_influence=True, runtime=F64)
    assert bare.metadata["optimizer"] is None and bare.metadata["warnings"] == []
    np.testing.assert_array_equal(out.scores, bare.scores)
    np.testing.assert_array_equal(out.self_influence, bare.self_influence)


def test_tracincp_no_warning_for_sgd_and_warns_for_lbfgs():
    sgd, _ = _trained("sgd")
    md = get_estimator("tracincp").attribute(sgd, {"projection_dim": 8}, runtime=F64).metadata
    assert md["optimizer"] == "sgd" and md["warnings"] == []
    lbfgs, _ = _trained("lbfgs")
    md = get_estimator("tracincp").attribute(lbfgs, {"normalize": "cosine"}, runtime=F64).metadata
    assert md["optimizer"] == "lbfgs" and len(md["warnings"]) == 1
    assert "L-BFGS" in md["warnings"][0] and "initial line-search step" in md["warnings"][0]
