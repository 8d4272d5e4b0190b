"""Representer points: the decomposition reproduces the refitted head, formula, state, shards, failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.estimators import (
    EstimatorError,
    InfluenceProblem,
    NumericalError,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)
from app.estimators.methods.representer import head_features

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=32)
MLP = {"in_features": 5, "hidden": [16], "num_classes": 3, "activation": "tanh"}


def _data(n, seed, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)[y] + torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.fixture(scope="module")
def trained():
    x, y = _data(120, 0)
    qx, qy = _data(7, 1)
    model = init_model("mlp", MLP, 0).double()
    res = train(model, CLS, x, y, Recipe(learning_rate=0.2, epochs=8, batch_size=16))
    return model, res.weights, x, y, qx, qy


def _problem(trained, **kw):
    model, w, x, y, qx, qy = trained
    base = dict(model=model, task=CLS, weights=w, train_x=x, train_y=y, query_x=qx, query_y=qy)
    base.update(kw)
    return InfluenceProblem(**base)


@pytest.mark.parametrize(("l2", "targets"), [(1e-3, "model"), (1e-2, "model"), (1e-3, "labels")])
def test_decomposition_reproduces_refitted_logits(trained, l2, targets):
    model, w, x, y, qx, qy = trained
    est = get_estimator("representer")
    state = est.fit(_problem(trained), {"l2": l2, "targets": targets}, F64)
    Fx, alpha, theta = state.tensors["features"], state.tensors["alpha"], state.tensors["theta"]
    assert Fx.shape == (120, 17) and alpha.shape == (120, 3) and theta.shape == (3, 17)
    torch.testing.assert_close(Fx[:, -1], torch.ones(120, dtype=torch.float64))  # bias column
    # features are the last layer's inputs
    model.load_state_dict(w)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(Fx[:, :-1], model[:3](x))
    for feats in (Fx, head_features(model, w, qx, F64, None)):
        logits = feats @ theta.T
        decomposed = (feats @ Fx.T) @ alpha  # sum_i alpha_i f_i^T f'
        rel = float((decomposed - logits).abs().max() / logits.abs().max())
        assert rel < 1e-5, rel
    print(f"representer l2={l2}: relative residual {state.info['refit_relative_residual']:.2e}")
    # stationarity of (1/n) sum CE(., t_i) + l2 ||theta||^2, t_i = the model's probabilities or one-hot labels
    with torch.no_grad():
        target = torch.softmax(model(x), 1) if targets == "model" else nn.functional.one_hot(y, 3).double()
    t = theta.clone().requires_grad_(True)
    obj = nn.functional.cross_entropy(Fx @ t.T, target) + l2 * (t * t).sum()
    (g,) = torch.autograd.grad(obj, t)
    assert float(g.norm()) < 1e-6 * float(theta.norm())
    # alpha = -(1/(2 l2 n)) (softmax - t): rows sum to zero (own-class entry >= 0 for labels)
    torch.testing.assert_close(alpha.sum(1), torch.zeros(120, dtype=torch.float64), atol=1e-12, rtol=0)
    expected = -(torch.softmax(Fx @ theta.T, 1) - target) / (2 * l2 * 120)
    torch.testing.assert_close(alpha, expected, rtol=1e-8, atol=1e-12)
    if targets == "labels":
        assert bool((alpha[torch.arange(120), y] >= 0).all())


def test_scores_and_self_influence_formula(trained):
    model, w, x, y, qx, qy = trained
    est = get_estimator("representer")
    state = est.fit(_problem(trained), None, F64)
    Fx, alpha = state.tensors["features"], state.tensors["alpha"]
    Fq = head_features(model, w, qx, F64, None)
    out = est.attribute(_problem(trained), None, want_self_influence=True, runtime=F64, state=state)
    expected = np.array([[float(alpha[i, qy[j]] * (Fx[i] @ Fq[j])) for i in range(120)] for j in range(7)])
    np.testing.assert_allclose(out.scores, expected, rtol=1e-10, atol=1e-14)
    # own-label weight against the training label at the refitted head (= alpha_{i, y_i} for labels)
    p_own = torch.softmax(Fx @ state.tensors["theta"].T, 1)[torch.arange(120), y]
    np.testing.assert_allclose(
        out.self_influence, ((1 - p_own) / (2 * 1e-3 * 120) * (Fx * Fx).sum(1)).numpy(), rtol=1e-10
    )
    lab = est.attribute(_problem(trained), {"targets": "labels"}, want_self_influence=True, runtime=F64)
    a_lab = est.fit(_problem(trained), {"targets": "labels"}, F64).tensors["alpha"]
    np.testing.assert_allclose(
        lab.self_influence, (a_lab[torch.arange(120), y] * (Fx * Fx).sum(1)).numpy(), rtol=1e-10
    )
    assert bool((out.self_influence >= 0).all())
    # a query's refitted true-class logit is the row sum of its scores
    logits = Fq @ state.tensors["theta"].T
    np.testing.assert_allclose(out.scores.sum(1), logits[torch.arange(7), qy].numpy(), rtol=1e-6)
    margin = est.attribute(_problem(trained, measurement="margin"), None, runtime=F64, state=state)
    np.testing.assert_allclose(margin.scores, out.scores)


def test_self_influence_flags_mislabelled_points(trained):
    model, w, x, y, qx, qy = trained
    flipped = torch.arange(0, 120, 12)
    y_bad = y.clone()
    y_bad[flipped] = (y_bad[flipped] + 1) % 3
    out = get_estimator("representer").attribute(
        _problem(trained, train_y=y_bad), None, want_scores=False, want_self_influence=True, runtime=F64
    )
    assert out.scores is None
    top = set(np.argsort(-out.self_influence)[:20].tolist())
    found = len(top & set(flipped.tolist()))
    print(f"representer: {found} of {len(flipped)} flipped labels in the top 20 self-influence")
    assert found >= 7


def test_state_reuse_and_train_range_shards(trained):
    est = get_estimator("representer")
    state = est.fit(_problem(trained), None, F64)
    full = est.attribute(_problem(trained), None, want_self_influence=True, runtime=F64)
    calls = []
    rt = Runtime(dtype=torch.float64, chunk_size=32, progress=lambda *a: calls.append(a))
    reused = est.attribute(_problem(trained), None, want_self_influence=True, runtime=rt, state=state)
    np.testing.assert_allclose(reused.scores, full.scores, rtol=1e-12)
    assert {c[0] for c in calls} == {"query_features"}  # no training pass, no refit
    parts = [
        est.attribute(
            _problem(trained), None, want_self_influence=True, runtime=F64, state=state, train_range=r
        )
        for r in [(0, 50), (50, 120)]
    ]
    np.testing.assert_allclose(np.concatenate([a.scores for a in parts], 1), full.scores, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([a.self_influence for a in parts]), full.self_influence)
    f32 = est.attribute(_problem(trained), None, runtime=Runtime(chunk_size=32))
    assert f32.scores.dtype == np.float32
    np.testing.assert_allclose(f32.scores, full.scores, rtol=1e-3, atol=1e-4 * np.abs(full.scores).max())


def test_shuffling_permutes_columns(trained):
    model, w, x, y, qx, qy = trained
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(5))
    est = get_estimator("representer")
    a = est.attribute(_problem(trained), None, want_self_influence=True, runtime=F64)
    b = est.attribute(
        _problem(trained, train_x=x[perm], train_y=y[perm]), None, want_self_influence=True, runtime=F64
    )
    np.testing.assert_allclose(
        b.scores, a.scores[:, perm.numpy()], rtol=1e-6, atol=1e-9 * np.abs(a.scores).max()
    )
    np.testing.assert_allclose(b.self_influence, a.self_influence[perm.numpy()], rtol=1e-6)


def test_refusals(trained):
    model, w, x, y, qx, qy = trained
    est = get_estimator("representer")
    with pytest.raises(NumericalError) as e:
        est.fit(_problem(trained), {"max_iter": 1, "tol": 1e-300}, F64)
    assert e.value.parameter == "/method/params/max_iter"
    squashed = nn.Sequential(nn.Linear(5, 3), nn.Tanh()).double()
    with pytest.raises(EstimatorError) as e:
        est.attribute(_problem(trained, model=squashed, weights=squashed.state_dict()), None, runtime=F64)
    assert e.value.parameter == "/method/name"
    reg = init_model("linear", {"in_features": 5, "num_classes": 1}, 0).double()
    prob = InfluenceProblem(
        model=reg,
        task=TaskSpec("regression", "mse"),
        weights=reg.state_dict(),
        train_x=x,
        train_y=x[:, 0],
        query_x=qx,
        query_y=qx[:, 0],
    )
    with pytest.raises(EstimatorError):
        est.attribute(prob, None, runtime=F64)
