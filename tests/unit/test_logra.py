"""LoGra: in-backprop Kronecker projection vs explicit gradients, identity == Fisher-IF, state and shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.estimators import (
    EstimatorError,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)
from app.estimators.gradients import (
    per_sample_gradients,
    query_objective_fn,
    select_parameters,
    train_objective,
)
from app.estimators.methods.logra import LoGraParams, layer_projectors, linear_layers, projected_gradients

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=16)
MLP = {"in_features": 5, "hidden": [12, 9], "num_classes": 3, "activation": "tanh"}


def _data(n, seed, d=5, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(k, d, generator=g, dtype=torch.float64)[y] + torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.fixture(scope="module")
def trained():
    x, y = _data(40, 0)
    qx, qy = _data(6, 1)
    model = init_model("mlp", MLP, 0).double()
    res = train(model, CLS, x, y, Recipe(learning_rate=0.2, epochs=5, batch_size=10))
    return model, res.weights, x, y, qx, qy


def _problem(trained, **kw):
    model, w, x, y, qx, qy = trained
    base = dict(model=model, task=CLS, weights=w, train_x=x, train_y=y, query_x=qx, query_y=qy)
    base.update(kw)
    return InfluenceProblem(**base)


def _explicit_projection(model, state, x, y, objective, layers):
    """(P_in (x) P_out) vec([grad W, grad b]) per layer from the core's per-example gradients."""
    n = len(x)
    out = []
    for name, mod, kron in layers:
        names = [f"{name}.weight"] + ([f"{name}.bias"] if mod.bias is not None else [])
        G = torch.cat([g for _, _, g in per_sample_gradients(model, state, x, y, objective, names=names)])
        d_out, d_in = mod.out_features, mod.in_features
        W = G[:, : d_out * d_in].reshape(n, d_out, d_in)
        if mod.bias is not None:
            W = torch.cat([W, G[:, d_out * d_in :, None]], 2)  # [grad W | grad b] = delta [a; 1]^T
        vec = W.transpose(1, 2).reshape(n, -1)  # column-major vec
        kron_mat = torch.kron(kron.in_matrix(), kron.out_matrix())
        proj = (vec @ kron_mat.T).reshape(n, kron.k_in, kron.k_out).transpose(1, 2)  # back to k_out x k_in
        out.append(proj.reshape(n, -1))
    return torch.cat(out, 1)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "srht"])
def test_in_backprop_projection_equals_explicit_kronecker(trained, kind):
    model, w, x, y, qx, qy = trained
    layers = layer_projectors(
        model, LoGraParams(k_in=4, k_out=3, projection=kind, seed=7), "cpu", torch.float64
    )
    assert [(n, k.k_in, k.k_out) for n, _, k in layers] == [("1", 4, 3), ("3", 4, 3), ("5", 4, 3)]
    for obj in (train_objective(CLS), query_objective_fn(CLS, "margin")):
        got = torch.cat([g for _, _, g in projected_gradients(model, w, x, y, obj, layers, chunk_size=16)])
        ref = _explicit_projection(model, w, x, y, obj, layers)
        assert got.shape == (40, 36)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-10)
        print(f"logra {kind}: max |in-backprop - explicit| = {float((got - ref).abs().max()):.2e}")


class _TokenModel(nn.Module):
    """A linear layer applied per position of a (b, T, d) sequence, then a classifier."""

    def __init__(self, T=4, d=3, h=5, c=3):
        super().__init__()
        self.T, self.d = T, d
        self.tok = nn.Linear(d, h)
        self.head = nn.Linear(T * h, c, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x.reshape(x.shape[0], self.T, self.d))).flatten(1))


def test_token_sum_and_bias_free_layers():
    torch.manual_seed(0)
    model = _TokenModel().double()
    x = torch.randn(10, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    w = model.state_dict()
    layers = layer_projectors(model, LoGraParams(k_in=3, k_out=2, seed=1), "cpu", torch.float64)
    assert [(n, k.d_in, k.d_out) for n, _, k in layers] == [("tok", 4, 5), ("head", 20, 3)]
    got = torch.cat([g for _, _, g in projected_gradients(model, w, x, y, train_objective(CLS), layers)])
    ref = _explicit_projection(model, w, x, y, train_objective(CLS), layers)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize(
    ("layers", "wd", "blocks"),
    [
        (None, 0.0, "full"),
        (["last"], 0.0, "full"),
        (["1", "5"], 0.0, "full"),
        (None, 0.05, "full"),
        (None, 0.0, "layer"),
        (["1", "5"], 0.05, "layer"),
    ],
)
def test_identity_projection_is_fisher_influence(trained, layers, wd, blocks):
    model, w, x, y, qx, qy = trained
    damping = 1e-2
    out = get_estimator("logra").attribute(
        _problem(trained, weight_decay=wd),
        {"projection": "identity", "damping": damping, "layers": layers, "blocks": blocks},
        want_self_influence=True,
        runtime=F64,
    )
    names = select_parameters(model, layers)
    G = torch.cat([g for _, _, g in per_sample_gradients(model, w, x, y, train_objective(CLS), names=names)])
    Q = torch.cat(
        [
            g
            for _, _, g in per_sample_gradients(
                model, w, qx, qy, query_objective_fn(CLS, "loss"), names=names
            )
        ]
    )
    n = len(x)
    Fisher = G.T @ G / n
    A = Fisher + (wd + damping * Fisher.diagonal().mean()) * torch.eye(len(Fisher), dtype=torch.float64)
    if blocks == "layer":  # the layers' parameters are contiguous: keep only each layer's diagonal block
        sizes = [m.weight.numel() + m.bias.numel() for _, m in linear_layers(model, layers)]
        A = torch.block_diag(*_diag_blocks(A, sizes))
    Ainv = torch.linalg.inv(A)
    np.testing.assert_allclose(out.scores, (Q @ Ainv @ G.T / n).numpy(), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(out.self_influence, (((G @ Ainv) * G).sum(1) / n).numpy(), rtol=1e-7)
    assert out.metadata["projected_dim"] == G.shape[1]
    assert out.metadata["damping_absolute"] == pytest.approx(damping * float(Fisher.diagonal().mean()))


def _diag_blocks(A, sizes):
    out, o = [], 0
    for k in sizes:
        out.append(A[o : o + k, o : o + k])
        o += k
    return out


@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_weight_decay_is_projected_identity(trained, blocks):
    """Projected curvature = P (F + weight_decay I) P^T + lambda I with P the explicit projection matrix
    (``blocks="layer"``: its diagonal blocks per layer)."""
    model, w, x, y, qx, qy = trained
    wd, damping = 0.03, 1e-2
    p = LoGraParams(
        k_in=4, k_out=3, projection="gaussian", damping=damping, seed=3, layers=["1", "5"], blocks=blocks
    )
    out = get_estimator("logra").attribute(_problem(trained, weight_decay=wd), p, runtime=F64)
    layers = layer_projectors(model, p, "cpu", torch.float64)
    parts = []
    for _, _, kron in layers:  # P: (k_out k_in) x (d_out d_in), projecting each unit gradient
        d_out, d_in = kron.d_out, kron.d_in
        E = torch.eye(d_out * d_in, dtype=torch.float64).reshape(-1, d_out, d_in)
        parts.append(kron.project_gradient(E).reshape(d_out * d_in, -1).T)
    P = torch.block_diag(*parts)
    G = torch.cat([g for _, _, g in projected_gradients(model, w, x, y, train_objective(CLS), layers)])
    Q = torch.cat(
        [g for _, _, g in projected_gradients(model, w, qx, qy, query_objective_fn(CLS, "loss"), layers)]
    )
    n = len(x)
    Fisher = G.T @ G / n
    A = (
        Fisher
        + wd * P @ P.T
        + damping * Fisher.diagonal().mean() * torch.eye(len(Fisher), dtype=torch.float64)
    )
    if blocks == "layer":
        A = torch.block_diag(*_diag_blocks(A, [k.dim for _, _, k in layers]))
    np.testing.assert_allclose(
        out.scores, (Q @ torch.linalg.solve(A, G.T) / n).numpy(), rtol=1e-7, atol=1e-12
    )


def test_state_reuse_shards_and_default_projection(trained):
    est = get_estimator("logra")
    params = {"k_in": 4, "k_out": 4}
    prob = _problem(trained, measurement="margin")
    state = est.fit(prob, params, F64)
    assert state.tensors["train_features"].shape == (40, 44)  # last layer: k_out capped at 3
    assert state.tensors["fisher_cholesky"].shape == (44, 44)
    full = est.attribute(prob, params, want_self_influence=True, runtime=F64)
    calls = []
    rt = Runtime(dtype=torch.float64, chunk_size=16, progress=lambda *a: calls.append(a))
    reused = est.attribute(prob, params, want_self_influence=True, runtime=rt, state=state)
    np.testing.assert_allclose(reused.scores, full.scores, rtol=1e-12)
    np.testing.assert_allclose(reused.self_influence, full.self_influence, rtol=1e-12)
    assert {c[0] for c in calls} == {"query_gradients"}
    parts = [
        est.attribute(prob, params, want_self_influence=True, runtime=F64, state=state, train_range=r)
        for r in [(0, 13), (13, 40)]
    ]
    np.testing.assert_allclose(np.concatenate([a.scores for a in parts], 1), full.scores, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([a.self_influence for a in parts]), full.self_influence)
    # defaults: k = 16 capped at the layer sizes (inputs 5+1, 12+1, 9+1; outputs 12, 9, 3)
    default = est.fit(prob, None, F64)
    assert [(d["k_in"], d["k_out"]) for d in default.info["layers"]] == [(6, 12), (13, 9), (10, 3)]
    assert bool((full.self_influence > 0).all())
    f32 = est.attribute(prob, params, runtime=Runtime(chunk_size=16))
    np.testing.assert_allclose(f32.scores, full.scores, rtol=2e-3, atol=2e-4 * np.abs(full.scores).max())


def test_shuffling_permutes_columns(trained):
    model, w, x, y, qx, qy = trained
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    est = get_estimator("logra")
    a = est.attribute(_problem(trained), {"k_in": 3, "k_out": 3}, want_self_influence=True, runtime=F64)
    b = est.attribute(
        _problem(trained, train_x=x[perm], train_y=y[perm]),
        {"k_in": 3, "k_out": 3},
        want_self_influence=True,
        runtime=F64,
    )
    np.testing.assert_allclose(b.scores, a.scores[:, perm.numpy()], rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(b.self_influence, a.self_influence[perm.numpy()], rtol=1e-8)


def test_layer_selection_errors(trained):
    model = trained[0]
    assert [n for n, _ in linear_layers(model, ["last"])] == ["5"]
    with pytest.raises(EstimatorError) as e:
        get_estimator("logra").attribute(_problem(trained), {"layers": ["7"]}, runtime=F64)
    assert e.value.parameter == "/method/params/layers"
    conv = init_model(
        "cnn", {"in_channels": 1, "height": 4, "width": 4, "num_classes": 2, "channels": [2]}, 0
    )
    assert [n for n, _ in linear_layers(conv, None)] == ["5"]
    big = init_model("mlp", {"in_features": 200, "hidden": [200], "num_classes": 200}, 0)
    prob = InfluenceProblem(
        model=big,
        task=CLS,
        weights=big.state_dict(),
        train_x=torch.randn(3, 200),
        train_y=torch.zeros(3, dtype=torch.long),
        query_x=torch.randn(1, 200),
        query_y=torch.zeros(1, dtype=torch.long),
    )
    with pytest.raises(EstimatorError) as e:
        get_estimator("logra").fit(prob, {"k_in": 65, "k_out": 65})
    assert e.value.parameter == "/method/params/k_in"


def test_unsupported_parameters_are_reported_as_ignored(trained):
    """LoGra projects only nn.Linear gradients: the conv layers of the 'cnn' architecture and the conv
    and BatchNorm parameters of 'resnet9' are listed in the metadata as ignored_parameters (as ekfac
    does), and the tracked ones account for the rest of the model's parameters."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    cnn = init_model(
        "cnn", {"in_channels": 1, "height": 4, "width": 4, "num_classes": 3, "channels": [2, 3]}, 0
    )
    res = init_model(
        "resnet9", {"in_channels": 1, "height": 4, "width": 4, "num_classes": 3, "base_channels": 2}, 0
    )
    for model in (cnn.double(), res.double()):
        prob = InfluenceProblem(
            model=model,
            task=CLS,
            weights=model.state_dict(),
            train_x=x,
            train_y=y,
            query_x=x[:2],
            query_y=y[:2],
        )
        md = get_estimator("logra").attribute(prob, {"k_in": 2, "k_out": 2}, runtime=F64).metadata
        linear = [k for k, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert [d["name"] for d in md["layers"]] == linear and len(linear) == 1
        expected = [
            f"{k}.{leaf}"
            for k, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))
            for leaf in ("weight", "bias")
            if getattr(m, leaf) is not None
        ]
        assert md["ignored_parameters"] == expected and expected
        assert all(model.get_parameter(n).requires_grad for n in expected)
        assert md["n_tracked_parameters"] == sum(
            q.numel() for q in model.get_submodule(linear[0]).parameters()
        )
        ignored = sum(model.get_parameter(n).numel() for n in expected)
        assert md["n_tracked_parameters"] + ignored == md["n_parameters"]
        bn = [k for k, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bn) == (0 if model is cnn else 8)  # resnet9: BatchNorm weight and bias are ignored too
        assert {f"{k}.{leaf}" for k in bn for leaf in ("weight", "bias")} <= set(expected)
    # an MLP with every linear layer selected ignores nothing; selecting the last layer ignores the others
    full = get_estimator("logra").attribute(_problem(trained), {"k_in": 2, "k_out": 2}, runtime=F64)
    assert full.metadata["ignored_parameters"] == []
    last = get_estimator("logra").attribute(
        _problem(trained), {"k_in": 2, "k_out": 2, "layers": ["last"]}, runtime=F64
    )
    assert last.metadata["ignored_parameters"] == ["1.weight", "1.bias", "3.weight", "3.bias"]
