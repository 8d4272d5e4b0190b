"""Per-sample gradients (vmap/grad) against a naive per-example autograd loop."""

from __future__ import annotations

import pytest
import torch

from app.estimators import TaskSpec, init_model
from app.estimators.gradients import (
    flatten,
    n_parameters,
    objective_hessian,
    objective_value_and_gradient,
    per_sample_gradients,
    trainable_names,
)
from app.estimators.objectives import per_example_loss, query_objective

CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")

CASES = {
    "linear": ({"in_features": 5, "num_classes": 3}, 5, 3),
    "mlp": ({"in_features": 5, "hidden": [7, 6], "num_classes": 3, "activation": "tanh"}, 5, 3),
    "cnn": ({"in_channels": 2, "height": 6, "width": 6, "num_classes": 3, "channels": [4, 5]}, 72, 3),
    "resnet9": (
        {"in_channels": 3, "height": 16, "width": 16, "num_classes": 4, "base_channels": 8},
        768,
        4,
    ),
}


def _model_and_state(name: str, seed: int = 0):
    params, _, _ = CASES[name]
    model = init_model(name, params, seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial running stats and affine params
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, state


def _data(name: str, n: int, seed: int = 0):
    _, d, k = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _naive(model, state, x, y, objective):
    model.load_state_dict(state)
    model.eval()
    names = trainable_names(model)
    params = dict(model.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        objective(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([params[k].grad.reshape(-1) for k in names]))
    return torch.stack(rows)


def _collect(it):
    return torch.cat([G for _, _, G in it])


@pytest.mark.parametrize("name", list(CASES))
def test_per_sample_gradients_match_naive_loop(name):
    model, state = _model_and_state(name)
    x, y = _data(name, 6)

    def obj(out, t):
        return per_example_loss(out, t, CLS)

    G = _collect(per_sample_gradients(model, state, x, y, obj, chunk_size=4, dtype=torch.float64))
    ref = _naive(model, state, x, y, obj)
    assert G.shape == (6, n_parameters(model))
    torch.testing.assert_close(G, ref, rtol=1e-9, atol=1e-11)


def test_margin_query_gradients_match_naive_loop():
    model, state = _model_and_state("mlp")
    x, y = _data("mlp", 5)

    def obj(out, t):
        return query_objective(out, t, CLS, "margin")

    G = _collect(per_sample_gradients(model, state, x, y, obj, chunk_size=2, dtype=torch.float64))
    torch.testing.assert_close(G, _naive(model, state, x, y, obj), rtol=1e-9, atol=1e-11)


def test_regression_gradients_match_naive_loop():
    model = init_model("linear", {"in_features": 4, "num_classes": 1}, 3).double()
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y = torch.randn(7, generator=g, dtype=torch.float64)

    def obj(out, t):
        return per_example_loss(out, t, REG)

    G = _collect(per_sample_gradients(model, state, x, y, obj, chunk_size=3))
    torch.testing.assert_close(G, _naive(model, state, x, y, obj), rtol=1e-10, atol=1e-12)
    # closed form for squared error: 2 (w.x + b - y) [x, 1]
    r = x @ state["1.weight"][0] + state["1.bias"][0] - y
    torch.testing.assert_close(G, 2 * r[:, None] * torch.cat([x, torch.ones(7, 1, dtype=x.dtype)], 1))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_chunk_size_invariance(name):
    model, state = _model_and_state(name)
    x, y = _data(name, 11, seed=4)

    def obj(out, t):
        return per_example_loss(out, t, CLS)

    results = []
    for cs in (1, 3, 11, 100):
        chunks = list(per_sample_gradients(model, state, x, y, obj, chunk_size=cs, dtype=torch.float64))
        assert [(a, b) for a, b, _ in chunks] == [(s, min(s + cs, 11)) for s in range(0, 11, cs)]
        results.append(torch.cat([G for _, _, G in chunks]))
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-14)


def test_dtype_and_model_weights_untouched():
    model, state = _model_and_state("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v + 0.5 for k, v in state.items()}
    x, y = _data("mlp", 3)
    G = _collect(
        per_sample_gradients(
            model, other, x, y, lambda o, t: per_example_loss(o, t, CLS), dtype=torch.float32
        )
    )
    assert G.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ref = _naive(
        init_model("mlp", CASES["mlp"][0], 0).double(), other, x, y, lambda o, t: per_example_loss(o, t, CLS)
    )
    torch.testing.assert_close(G.double(), ref, rtol=1e-4, atol=1e-5)


def test_objective_hessian_and_gradient_match_autograd():
    model, state = _model_and_state("mlp")
    x, y = _data("mlp", 9)
    names = trainable_names(model)
    shapes = [state[k].shape for k in names]
    wd = 0.03

    def f(flat):
        p, off = {}, 0
        for k, s in zip(names, shapes, strict=True):
            p[k] = flat[off : off + s.numel()].view(s)
            off += s.numel()
        out = torch.func.functional_call(model, p, (x,))
        return per_example_loss(out, y, CLS).mean() + 0.5 * wd * flat.dot(flat)

    theta = flatten(state, names)
    H_ref = torch.autograd.functional.hessian(f, theta)
    H = objective_hessian(model, state, x, y, CLS, wd, chunk_size=4)
    torch.testing.assert_close(H, H_ref, rtol=1e-9, atol=1e-11)
    value, g = objective_value_and_gradient(model, state, x, y, CLS, wd, chunk_size=4)
    torch.testing.assert_close(g, torch.func.grad(f)(theta), rtol=1e-10, atol=1e-12)
    assert value == pytest.approx(float(f(theta)), rel=1e-12)


def test_non_finite_gradients_raise_numerical_error():
    from app.estimators import NumericalError

    model, state = _model_and_state("linear")
    x, y = _data("linear", 4)
    x[2, 0] = float("nan")
    with pytest.raises(NumericalError, match="2..2|0..3"):
        _collect(
            per_sample_gradients(model, state, x, y, lambda o, t: per_example_loss(o, t, CLS), chunk_size=4)
        )
