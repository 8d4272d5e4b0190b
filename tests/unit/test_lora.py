"""lora_mlp: an mlp whose Linear layers are frozen and adapted by trained low-rank updates (Hu et al.),
the setting DataInf was designed for (ESTIMATORS.md 2.15). Only the adapters are trained, differentiated,
preconditioned and retrained; the frozen base always holds the registered weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.func import functional_call

from app.estimators import (
    REGISTRY,
    EstimatorError,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)
from app.estimators.gradients import trainable_names
from app.estimators.objectives import per_example_loss
from app.estimators.valuation.engine import reset_factory, train_subsets
from app.estimators.valuation.methods import starting_point

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=16)
BASE = {"in_features": 4, "hidden": [8], "num_classes": 3, "activation": "tanh"}
LORA = {**BASE, "rank": 2, "alpha": 2.0}
WD = 1e-2
FINE_TUNING = Recipe(learning_rate=0.1, epochs=20, batch_size=16, weight_decay=WD, num_checkpoints=2)


def _blobs(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.randn(3, 4, generator=g, dtype=torch.float64) + shift
    return centres[y] + torch.randn(n, 4, generator=g, dtype=torch.float64), y


@pytest.fixture(scope="module")
def pretrained():
    """A base mlp trained on one task: the frozen base of every LoRA model here."""
    x, y = _blobs(200, 10)
    base = init_model("mlp", BASE, 0).double()
    return train(base, CLS, x, y, Recipe(learning_rate=0.2, epochs=15, batch_size=32, num_checkpoints=0))


def _lora_on(pretrained, seed=0) -> torch.nn.Module:
    model = init_model("lora_mlp", LORA, seed).double()
    missing, unexpected = model.load_state_dict(pretrained.weights, strict=False)
    assert sorted(missing) == ["1.lora_A.weight", "1.lora_B.weight", "3.lora_A.weight", "3.lora_B.weight"]
    assert unexpected == []
    return model


@pytest.fixture(scope="module")
def finetuned(pretrained):
    """The LoRA adapters fine-tuned on a second, shifted task, with two checkpoints."""
    x, y = _blobs(60, 0, shift=0.5)
    model = _lora_on(pretrained)
    return model, train(model, CLS, x, y, FINE_TUNING), x, y


def _problem(finetuned, **kw) -> InfluenceProblem:
    model, res, x, y = finetuned
    qx, qy = _blobs(5, 1, shift=0.5)
    return InfluenceProblem(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        weight_decay=WD,
        **kw,
    )


def test_the_base_is_frozen_and_the_adapters_start_at_zero(pretrained):
    model = _lora_on(pretrained)
    assert trainable_names(model) == [
        "1.lora_A.weight",
        "1.lora_B.weight",
        "3.lora_A.weight",
        "3.lora_B.weight",
    ]
    n_adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_adapters == 2 * (4 + 8) + 2 * (8 + 3)  # rank x (d_in + d_out) per layer
    base = init_model("mlp", BASE, 0).double()
    base.load_state_dict(pretrained.weights)
    x, _ = _blobs(7, 3)
    with torch.no_grad():  # B = 0: the adapted model is the base until it is fine-tuned
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    layer = model[1]
    assert layer.scale == 1.0 and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert init_model("lora_mlp", {**LORA, "alpha": 8.0}, 0)[1].scale == 4.0


def test_fine_tuning_trains_only_the_adapters(pretrained, finetuned):
    _, res, x, y = finetuned
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):
        assert torch.equal(res.weights[name], pretrained.weights[name]), name
    assert all(res.weights[f"{layer}.lora_B.weight"].abs().max() > 1e-3 for layer in (1, 3))
    assert res.history[-1] < res.history[0]


def test_retraining_starts_from_the_registered_base(finetuned):
    """Retraining-based estimators re-initialise and train the adapters only: the base they start from
    is the registered one, not the architecture's random initial draw."""
    prob = _problem(finetuned)
    fresh = init_model("lora_mlp", LORA, 0).double()
    assert not torch.equal(fresh[1].weight, prob.weights["1.weight"])  # the module's own base differs
    prob = InfluenceProblem(**{**prob.__dict__, "model": fresh})
    template = starting_point(prob, F64)
    for seed in (0, 5):
        model = reset_factory(template)(seed)
        state = model.state_dict()
        for name in ("1.weight", "1.bias", "3.weight", "3.bias"):
            assert torch.equal(state[name], prob.weights[name]), name
        assert state["1.lora_B.weight"].abs().max() == 0 and state["3.lora_B.weight"].abs().max() == 0
        assert state["1.lora_A.weight"].abs().max() > 0
    a, b = reset_factory(template)(0), reset_factory(template)(5)
    assert not torch.equal(a[1].lora_A.weight, b[1].lora_A.weight)  # the seed draws the adapters


def test_retraining_from_initial_weights_replays_the_fine_tuning(pretrained, finetuned):
    """With the initial weights the model was fine-tuned from, retraining on the full set replays that
    fine-tuning exactly (same start, same seed); without them it re-draws the adapters."""
    model, res, x, y = finetuned
    prob = _problem(finetuned, initial_weights=_lora_on(pretrained).state_dict())
    full = np.ones((2, len(x)), dtype=bool)
    measure = {"eval_sets": {"query": (prob.query_x, prob.query_y)}, "measure": {"query": "loss"}}
    seeds = [FINE_TUNING.seed, FINE_TUNING.seed + 1]
    replayed = train_subsets(starting_point(prob, F64), CLS, FINE_TUNING, x, y, full, seeds, **measure)
    with torch.no_grad():
        fine_tuned = per_example_loss(functional_call(model, res.weights, (prob.query_x,)), prob.query_y, CLS)
    np.testing.assert_allclose(replayed["query"][0], fine_tuned.numpy(), rtol=1e-8)
    assert not np.allclose(replayed["query"][1], replayed["query"][0])  # another seed: other batches
    prob.initial_weights = None
    redrawn = train_subsets(starting_point(prob, F64), CLS, FINE_TUNING, x, y, full[:1], seeds[:1], **measure)
    assert not np.allclose(redrawn["query"][0], fine_tuned.numpy(), rtol=1e-3)


def test_every_estimator_runs_on_the_adapters(pretrained, finetuned):
    """Every estimator runs on lora_mlp (gradient methods differentiate the adapters only, retraining
    methods retrain them only, unrolled ones replay the fine-tuning from its initial weights); the
    iterative inverse-Hessian agrees with the exact one on them."""
    _, res, _, _ = finetuned
    prob = _problem(
        finetuned,
        checkpoints=res.checkpoints,
        recipe=dataclasses.asdict(FINE_TUNING),
        initial_weights=_lora_on(pretrained).state_dict(),
    )
    n_adapters = 46
    damped = {"damping": 0.1}  # 20 epochs leave the adapters short of a minimum: curvature -0.06
    params = {name: damped for name in ("if_exact", "if_cg", "if_lissa", "fastif", "if_arnoldi", "relatif")}
    refused = {}
    for name in sorted(REGISTRY):
        try:
            out = get_estimator(name).attribute(prob, params.get(name), runtime=F64)
        except EstimatorError as exc:
            refused[name] = exc.detail
            continue
        result = out.scores if out.scores is not None else out.values
        assert result is not None and np.isfinite(result).all(), name
    # representer needs a plain nn.Linear output layer; exact Shapley caps n at 14
    assert sorted(refused) == ["representer", "shapley_exact"], refused
    exact = get_estimator("if_exact").attribute(prob, damped, runtime=F64)
    assert exact.metadata["n_parameters"] == n_adapters
    cg = get_estimator("if_cg").attribute(prob, {**damped, "max_iter": 200}, runtime=F64)
    np.testing.assert_allclose(cg.scores, exact.scores, rtol=1e-5, atol=1e-7 * np.abs(exact.scores).max())
    assert get_estimator("magic").attribute(prob, None, runtime=F64).metadata["replay_error"] < 1e-12
    layers = get_estimator("ekfac").attribute(prob, None, runtime=F64).metadata["layers"]
    assert layers == ["1.lora_A", "1.lora_B", "3.lora_A", "3.lora_B"]
