"""K-FAC and EK-FAC influence (ESTIMATORS.md 2.14) against explicit curvature matrices.

Exactness conditions used below (G = the empirical Fisher of a layer, ``E[vec g vec g^T]``
with ``g = sum_t delta_t a_t^T``; K-FAC = ``S (x) A``; EK-FAC = K-FAC's eigenbasis with the
Frobenius-optimal diagonal ``diag(Q^T G Q)``):

* K-FAC is exact for a layer when ``delta delta^T`` is the same matrix for every example
  (then ``E[dd^T (x) aa^T] = E[dd^T] (x) E[aa^T]``), e.g. one Linear layer with a scalar
  MSE output whose residuals all have the same magnitude. With ``|f - y| = 1/sqrt(2)`` the
  empirical Fisher ``4 r^2 E[a a^T]`` equals the Gauss-Newton matrix ``2 E[a a^T]``, which for
  a linear model is the exact Hessian: K-FAC and EK-FAC influence equal ``if_exact``.
* EK-FAC is exact when ``Q_S (x) Q_A`` diagonalises G (its refit diagonal is then G's
  spectrum), while K-FAC is not unless the spectrum is also a Kronecker product. Example:
  one Linear layer, scalar output, inputs ``+-s_j e_j`` in pairs sharing a residual magnitude
  ``r_j`` (distinct ``s_j``, distinct ``r_j``): A and G are both diagonal, not proportional.
* With a single training example every layer block is rank one, ``g g^T = S (x) A``: both
  equal the block-diagonal exact influence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.estimators import (
    EstimatorError,
    InfluenceProblem,
    NumericalError,
    Recipe,
    Runtime,
    TaskSpec,
    TrainState,
    get_estimator,
    init_model,
    train,
)
from app.estimators.gradients import per_sample_gradients, query_objective_fn, train_objective
from app.estimators.kfac import (
    KFACFactors,
    covariance_factors,
    flatten_layer_matrices,
    layer_matrices,
    output_hessian_roots,
    parameter_names,
    tracked_layers,
)
from app.estimators.kfac import _rotated_squares as kfac_rotated_squares
from app.estimators.objectives import per_example_loss

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
F64 = Runtime(dtype=torch.float64, chunk_size=7)
MLP = {"in_features": 4, "hidden": [6], "num_classes": 3, "activation": "tanh"}
METHODS = ["kfac", "ekfac"]


def _data(n, seed, d=4, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(k, d, generator=g, dtype=torch.float64)[y] + torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.fixture(scope="module")
def trained():
    x, y = _data(30, 0)
    qx, qy = _data(5, 1)
    model = init_model("mlp", MLP, 0).double()
    res = train(model, CLS, x, y, Recipe(learning_rate=0.2, epochs=6, batch_size=8, weight_decay=1e-3))
    return model, res.weights, x, y, qx, qy


def _problem(trained, **kw):
    model, weights, x, y, qx, qy = trained
    base = dict(
        model=model,
        task=CLS,
        weights=weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        weight_decay=1e-3,
    )
    base.update(kw)
    return InfluenceProblem(**base)


# ----------------------------------------------------------------------------- test-side references


def _layer_grads(model, weights, x, y, objective):
    """Per-example gradients by a plain autograd loop, flat in the tracked layout (weight, then bias)."""
    model.load_state_dict(weights)
    model.eval()
    layers, _ = tracked_layers(model)
    params = dict(model.named_parameters())
    names = parameter_names(layers)
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        objective(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([params[k].grad.reshape(-1) for k in names]))
    return torch.stack(rows), layers


def _block_slices(layers):
    out, off = [], 0
    for la in layers:
        out.append(slice(off, off + la.n_params))
        off += la.n_params
    return out


def _as_rowmajor(G, layers):
    """Flat gradients (tracked layout) with each layer's block in row-major (d_out, d_in) matrix order."""
    out = torch.cat([M.reshape(M.shape[0], -1) for M in layer_matrices(G, layers)], dim=1)
    back = [
        M.reshape(M.shape[0], la.d_out, la.d_in) for M, la in zip(_split(out, layers), layers, strict=True)
    ]
    torch.testing.assert_close(flatten_layer_matrices(back, layers), G, rtol=0, atol=0)
    return out


def _split(flat, layers):
    return [flat[:, sl] for sl in _block_slices(layers)]


def _spearman(a, b):
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------- exactness


def _linear_regression(residuals, x, qx, seed=0):
    model = init_model("linear", {"in_features": x.shape[1], "num_classes": 1}, seed).double()
    with torch.no_grad():
        f = model(x)[:, 0]
        qf = model(qx)[:, 0]
    g = torch.Generator().manual_seed(seed + 1)
    qy = qf + torch.randn(len(qx), generator=g, dtype=torch.float64)
    return model, f + residuals, qy


def test_kfac_and_ekfac_equal_exact_hessian_if_for_linear_regression_with_constant_residual_magnitude():
    g = torch.Generator().manual_seed(3)
    n, d = 40, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    qx = torch.randn(4, d, generator=g, dtype=torch.float64)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    model, y, qy = _linear_regression(signs / math.sqrt(2.0), x, qx)
    prob = InfluenceProblem(
        model=model,
        task=REG,
        weights=model.state_dict(),
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        weight_decay=0.01,
    )
    ref = get_estimator("if_exact").attribute(prob, {"damping": 0.05}, want_self_influence=True, runtime=F64)
    for name in METHODS:
        out = get_estimator(name).attribute(prob, {"damping": 0.05}, want_self_influence=True, runtime=F64)
        np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-8, atol=1e-12 * np.abs(ref.scores).max())
        np.testing.assert_allclose(out.self_influence, ref.self_influence, rtol=1e-8)


def test_ekfac_exact_when_its_eigenbasis_diagonalises_the_fisher_and_kfac_is_not():
    s = torch.tensor([0.5, 1.0, 1.5, 2.5], dtype=torch.float64)  # A's eigenvalues s^2/4 and 1 are distinct
    r = torch.tensor([0.3, 1.0, 0.5, 2.0], dtype=torch.float64)  # residual magnitude per pair
    x = torch.cat([torch.diag(s), -torch.diag(s)])
    residuals = torch.cat([r, -r * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)])
    g = torch.Generator().manual_seed(4)
    qx = torch.randn(3, 4, generator=g, dtype=torch.float64)
    model, y, qy = _linear_regression(residuals, x, qx, seed=2)
    weights = model.state_dict()
    prob = InfluenceProblem(
        model=model, task=REG, weights=weights, train_x=x, train_y=y, query_x=qx, query_y=qy, weight_decay=0.0
    )
    objective = lambda o, t: per_example_loss(o, t, REG)  # noqa: E731
    G, _ = _layer_grads(model, weights, x, y, objective)
    Q, _ = _layer_grads(model, weights, qx, qy, objective)
    n, damping = len(x), 1e-3
    P = torch.linalg.inv(G.T @ G / n + damping * torch.eye(G.shape[1], dtype=torch.float64))
    exact_scores, exact_self = (Q @ P @ G.T / n).numpy(), (((G @ P) * G).sum(1) / n).numpy()
    ek = get_estimator("ekfac").attribute(prob, {"damping": damping}, want_self_influence=True, runtime=F64)
    np.testing.assert_allclose(ek.scores, exact_scores, rtol=1e-8, atol=1e-12 * np.abs(exact_scores).max())
    np.testing.assert_allclose(ek.self_influence, exact_self, rtol=1e-8)
    k = get_estimator("kfac").attribute(prob, {"damping": damping}, runtime=F64)
    assert np.abs(k.scores - exact_scores).max() > 1e-2 * np.abs(exact_scores).max()


@pytest.mark.parametrize("name", METHODS)
def test_single_training_example_equals_block_diagonal_exact_influence(trained, name):
    model, weights, x, y, qx, qy = trained
    prob = _problem(trained, train_x=x[:1], train_y=y[:1], weight_decay=0.0)
    G, layers = _layer_grads(model, weights, x[:1], y[:1], lambda o, t: per_example_loss(o, t, CLS))
    Q, _ = _layer_grads(model, weights, qx, qy, lambda o, t: per_example_loss(o, t, CLS))
    damping = 1e-2
    ref = np.zeros((len(qx), 1))
    for sl in _block_slices(layers):
        Gb = G[:, sl]
        ref += (
            Q[:, sl] @ torch.linalg.solve(Gb.T @ Gb + damping * torch.eye(Gb.shape[1]).double(), Gb.T)
        ).numpy()
    out = get_estimator(name).attribute(prob, {"damping": damping}, runtime=F64)
    np.testing.assert_allclose(out.scores, ref, rtol=1e-8)


@pytest.mark.parametrize("route", ["factored", "rows", "materialised"])
def test_attribute_equals_the_explicit_formula_with_the_dense_blocks(trained, route, monkeypatch):
    """Whole pipeline (flat <-> matrix layout, heuristic damping + weight decay, 1/n) vs dense algebra,
    with the MLP's training gradients kept as factors D_i a~_i^T (its route), as layer rows (the route
    of nets of linear and convolution layers) or formed (every other model's)."""
    import app.estimators.methods.ekfac as ekfac_module

    if route != "factored":
        monkeypatch.setattr(ekfac_module, "gradient_factors", lambda *a, **kw: None)
    if route == "materialised":
        monkeypatch.setattr(ekfac_module, "per_sample_layer_rows", lambda *a, **kw: None)
    model, weights, x, y, qx, qy = trained
    prob = _problem(trained, measurement="margin")
    G, layers = _layer_grads(model, weights, x, y, lambda o, t: per_example_loss(o, t, CLS))
    Q, _ = _layer_grads(model, weights, qx, qy, query_objective_fn(CLS, "margin"))
    Gm, Qm = _as_rowmajor(G, layers), _as_rowmajor(Q, layers)
    for name in METHODS:
        est = get_estimator(name)
        state = est.fit(prob, None, F64)
        factors = KFACFactors(state)
        out = est.attribute(prob, None, want_self_influence=True, runtime=F64, state=state)
        scores, self_inf = np.zeros((len(qx), len(x))), np.zeros(len(x))
        for la, sl in zip(layers, _block_slices(layers), strict=True):
            shift = out.metadata["damping_used"][la.module] + 1e-3
            assert out.metadata["damping_used"][la.module] == pytest.approx(
                state.info["damping_heuristic"][la.module]
            )
            P = torch.linalg.inv(
                factors.dense_block(la) + shift * torch.eye(la.n_params, dtype=torch.float64)
            )
            scores += (Qm[:, sl] @ P @ Gm[:, sl].T).numpy() / len(x)
            self_inf += ((Gm[:, sl] @ P) * Gm[:, sl]).sum(1).numpy() / len(x)
        np.testing.assert_allclose(out.scores, scores, rtol=1e-8, atol=1e-12 * np.abs(scores).max())
        np.testing.assert_allclose(out.self_influence, self_inf, rtol=1e-8)
        assert out.metadata["normalisation"] == "1/n" and out.metadata["measurement"] == "margin"
        assert out.metadata["layers"] == ["1", "3"] and out.metadata["ignored_parameters"] == []


# ----------------------------------------------------------------------------- Frobenius error


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_ekfac_frobenius_error_is_at_most_kfacs_per_block(trained, fisher):
    model, weights, x, y, qx, qy = trained
    prob = _problem(trained)
    layers, _ = tracked_layers(model)
    cov = covariance_factors(prob, layers, F64, fisher=fisher, seed=3)
    labels = y if fisher == "empirical" else cov.labels
    assert labels is not None and labels.shape == y.shape
    if fisher == "true":
        assert not torch.equal(labels, y)
    G, _ = _layer_grads(model, weights, x, labels, lambda o, t: per_example_loss(o, t, CLS))
    Gm = _as_rowmajor(G, layers)
    n = len(x)
    params = {"fisher": fisher, "seed": 3}
    kf = KFACFactors(get_estimator("kfac").fit(prob, params, F64))
    ek = KFACFactors(get_estimator("ekfac").fit(prob, params, F64))
    for la, sl in zip(layers, _block_slices(layers), strict=True):
        exact = Gm[:, sl].T @ Gm[:, sl] / n
        e_k = float(torch.linalg.norm(exact - kf.dense_block(la)))
        e_e = float(torch.linalg.norm(exact - ek.dense_block(la)))
        norm = float(torch.linalg.norm(exact))
        print(
            f"[{fisher}] layer {la.module}: relative Frobenius error "
            f"K-FAC {e_k / norm:.4f}, EK-FAC {e_e / norm:.4f}"
        )
        assert e_e <= e_k * (1 + 1e-12)
        # K-FAC's factors are E[a a^T] and E[delta delta^T] (explicit from the test's own forward below)
    model.load_state_dict(weights)
    model.eval()
    s1 = model[1](x).detach().requires_grad_(True)
    s2 = model[3](model[2](s1))
    (d1, d2) = torch.autograd.grad(per_example_loss(s2, labels, CLS).sum(), [s1, s2])
    ones = torch.ones(n, 1, dtype=torch.float64)
    a1, a2 = torch.cat([x, ones], 1), torch.cat([model[2](s1).detach(), ones], 1)
    for la, a, d in zip(layers, [a1, a2], [d1, d2], strict=True):
        torch.testing.assert_close(cov.A[la.module], a.T @ a / n, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(cov.S[la.module], d.T @ d / n, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            kf.dense_block(la), torch.kron(d.T @ d / n, a.T @ a / n), rtol=1e-9, atol=1e-13
        )


# ----------------------------------------------------------------------------- ranking vs exact


def test_ekfac_vs_exact_damped_empirical_fisher_influence_on_digits_mlp():
    datasets = pytest.importorskip("sklearn.datasets")
    X, Y = datasets.load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(Y))
    tr, te = perm[:300], perm[300:310]
    x, y = torch.tensor(X[tr] / 16.0), torch.tensor(Y[tr]).long()
    qx, qy = torch.tensor(X[te] / 16.0), torch.tensor(Y[te]).long()
    model = init_model("mlp", {"in_features": 64, "hidden": [24], "num_classes": 10, "activation": "tanh"}, 0)
    model = model.double()
    wd = 1e-3
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(optimizer="adam", learning_rate=0.01, epochs=30, batch_size=32, weight_decay=wd),
    )
    prob = InfluenceProblem(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        weight_decay=wd,
    )
    rt = Runtime(dtype=torch.float64, chunk_size=100)
    G = torch.cat([g for _, _, g in per_sample_gradients(model, res.weights, x, y, train_objective(CLS))])
    Q = torch.cat([g for _, _, g in per_sample_gradients(model, res.weights, qx, qy, train_objective(CLS))])
    p, n = G.shape[1], len(x)
    assert 1500 <= p <= 2500
    fisher = G.T @ G / n  # the exact (all-layer, not block-diagonal) empirical Fisher / GN
    layers, _ = tracked_layers(model)
    figures = {}
    for damping in (1e-2, None):
        means = {}
        for name in METHODS:  # each against the exact influence with the same per-layer damping
            out = get_estimator(name).attribute(prob, {"damping": damping}, runtime=rt)
            shift = out.metadata["damping_used"]
            diag = torch.cat([torch.full((la.n_params,), shift[la.module] + wd) for la in layers]).double()
            exact = Q @ torch.linalg.solve(fisher + torch.diag(diag), G.T) / n
            means[name] = np.mean([_spearman(exact[j], out.scores[j]) for j in range(len(qx))])
        dot = Q @ G.T  # no curvature at all: the baseline, against EK-FAC's reference
        means["grad_dot"] = np.mean([_spearman(exact[j], dot[j]) for j in range(len(qx))])
        figures[damping] = means
        print(
            f"digits MLP p={p} n={n}, damping={damping}: mean Spearman vs exact damped EF influence "
            + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
        )
    assert figures[1e-2]["ekfac"] >= 0.9
    assert figures[1e-2]["ekfac"] >= figures[1e-2]["grad_dot"] + 0.1
    assert figures[None]["ekfac"] >= figures[None]["grad_dot"] + 0.1


# ----------------------------------------------------------------------------- convolutions


def _explicit_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``(b, L, C*kh*kw)`` by slicing, independent of F.unfold."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = [0, 0, 0, 0]
        else:
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    else:
        ph, pw = conv.padding
        pads = [pw, pw, ph, ph]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, pads, mode=mode)
    H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = []
    for i in range(H):
        for j in range(W):
            win = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            cols.append(win.reshape(x.shape[0], -1))
    return torch.stack(cols, dim=1)


def _explicit_conv_factors(model, weights, x, y):
    """A, S and per-example gradient matrices of every Conv2d/Linear of a Sequential, by hand."""
    model.load_state_dict(weights)
    model.eval()
    h, records = x, []
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            a = _explicit_patches(m, h) if isinstance(m, nn.Conv2d) else h.reshape(h.shape[0], 1, -1)
            if m.bias is not None:
                a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
            h = m(h)
            h.retain_grad()
            records.append((a.detach(), h))
        else:
            h = m(h)
    per_example_loss(h, y, CLS).sum().backward()
    out = []
    for a, s in records:
        d = s.grad.flatten(2).transpose(1, 2) if s.dim() == 4 else s.grad.reshape(s.shape[0], 1, -1)
        n, T = a.shape[0], a.shape[1]
        A = torch.einsum("btj,btk->jk", a, a) / (n * T)
        S = torch.einsum("bto,btp->op", d, d) / n
        out.append((A, S, torch.einsum("bto,btj->boj", d, a)))
    return out


def _custom_conv_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()


@pytest.mark.parametrize("which", ["cnn", "custom"])
def test_conv_factors_from_hooks_match_explicit_patches(which):
    g = torch.Generator().manual_seed(7)
    if which == "cnn":
        model = init_model(
            "cnn", {"in_channels": 2, "height": 5, "width": 5, "num_classes": 3, "channels": [3, 4]}, 0
        )
        model = model.double()
        x = torch.randn(9, 2 * 5 * 5, generator=g, dtype=torch.float64)
    else:
        model = _custom_conv_model()
        x = torch.randn(9, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    weights = model.state_dict()
    prob = InfluenceProblem(
        model=model, task=CLS, weights=weights, train_x=x, train_y=y, query_x=x, query_y=y
    )
    layers, _ = tracked_layers(model)
    cov = covariance_factors(prob, layers, Runtime(dtype=torch.float64, chunk_size=4))
    explicit = _explicit_conv_factors(model, weights, x, y)
    assert len(explicit) == len(layers) == len(cov.layers)
    # the shared core's per-example gradients, in matrix form, are sum_t delta_t a_t^T (the KFC convention)
    G = torch.cat(
        [
            c
            for _, _, c in per_sample_gradients(
                model, weights, x, y, train_objective(CLS), names=parameter_names(layers)
            )
        ]
    )
    for la, (A, S, Gm), M in zip(layers, explicit, layer_matrices(G, layers), strict=True):
        torch.testing.assert_close(cov.A[la.module], A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(cov.S[la.module], S, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(M, Gm, rtol=1e-10, atol=1e-13)
    if which == "custom":
        assert [la.bias is not None for la in layers] == [True, False, True]
        assert cov.positions == {"0": 9, "2": 9, "5": 1}


def test_end_to_end_on_cnn_and_resnet9():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 16, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    cnn = init_model(
        "cnn", {"in_channels": 1, "height": 4, "width": 4, "num_classes": 3, "channels": [2, 3]}, 0
    )
    res = init_model(
        "resnet9", {"in_channels": 1, "height": 4, "width": 4, "num_classes": 3, "base_channels": 2}, 0
    )
    for model in (cnn, res):
        with torch.no_grad():  # non-trivial BatchNorm running statistics
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        prob = InfluenceProblem(
            model=model,
            task=CLS,
            weights=model.state_dict(),
            train_x=x,
            train_y=y,
            query_x=x[:2],
            query_y=y[:2],
        )
        rt = Runtime(chunk_size=4)  # float32
        for name in METHODS:
            out = get_estimator(name).attribute(prob, None, want_self_influence=True, runtime=rt)
            assert out.scores.shape == (2, 10) and out.scores.dtype == np.float32
            assert np.isfinite(out.scores).all() and (out.self_influence > 0).all()
            md = out.metadata
            bn = [
                f"{k}.{leaf}"
                for k, m in model.named_modules()
                if isinstance(m, nn.BatchNorm2d)
                for leaf in ("weight", "bias")
            ]
            assert md["ignored_parameters"] == bn
            convs = [k for k, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            assert md["layers"] == convs
            assert (
                md["n_tracked_parameters"] + sum(model.get_parameter(k).numel() for k in bn)
                == md["n_parameters"]
            )
        if model is res:
            assert len(bn) == 16 and all(p.bias is None for p in model.modules() if isinstance(p, nn.Conv2d))
    sub = get_estimator("ekfac").attribute(prob, {"layers": ["4", "last"]}, runtime=Runtime(chunk_size=4))
    assert sub.metadata["layers"] == [k for k in convs if k.startswith("4.")] + ["6"]


@pytest.mark.parametrize("fisher", ["empirical", "true", "expected"])
def test_conv_eigenvalues_from_layer_rows_equal_those_from_formed_gradients(fisher, monkeypatch):
    """EK-FAC's refit eigenvalues of a conv net come from each example's layer rows (``D_i``, ``A~_i``,
    layerwise.layer_pass), rotated before or after forming ``D_i^T A~_i`` by cost; they equal those
    from the formed per-example gradients of the shared core, for every Fisher, over several chunks."""
    import app.estimators.kfac as kfac_module

    g = torch.Generator().manual_seed(11)
    model = init_model(
        "resnet9", {"in_channels": 2, "height": 8, "width": 8, "num_classes": 3, "base_channels": 2}, 0
    ).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(13, 2 * 8 * 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    prob = InfluenceProblem(
        model=model, task=CLS, weights=model.state_dict(), train_x=x, train_y=y, query_x=x[:2], query_y=y[:2]
    )
    rt = Runtime(dtype=torch.float64, chunk_size=5)
    streams = []

    def spy(*a, **kw):
        streams.append(layer_rows(*a, **kw))
        return streams[-1]

    layer_rows = kfac_module.per_sample_layer_rows
    monkeypatch.setattr(kfac_module, "per_sample_layer_rows", spy)
    rows = KFACFactors(get_estimator("ekfac").fit(prob, {"fisher": fisher, "seed": 2}, rt))
    assert streams and all(s is not None for s in streams)
    monkeypatch.setattr(kfac_module, "per_sample_layer_rows", lambda *a, **kw: None)
    formed = KFACFactors(get_estimator("ekfac").fit(prob, {"fisher": fisher, "seed": 2}, rt))
    for la in rows.layers:
        torch.testing.assert_close(rows.eigenvalues(la), formed.eigenvalues(la), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("T, d_in, d_out", [(1, 20, 3), (4, 18, 6), (50, 4, 3)])
def test_rotated_squares_equal_the_rotated_formed_gradients(T, d_in, d_out):
    g = torch.Generator().manual_seed(T)
    A = torch.randn(6, T, d_in, generator=g, dtype=torch.float64)
    D = torch.randn(6, T, d_out, generator=g, dtype=torch.float64)
    QA = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64)).Q
    QS = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64)).Q
    expected = sum((QS.T @ D[i].T @ A[i] @ QA) ** 2 for i in range(6))
    torch.testing.assert_close(kfac_rotated_squares(A, D, QA, QS), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["cnn", "resnet9"])
def test_conv_scores_and_self_influence_from_layer_rows_equal_those_from_formed_gradients(arch, monkeypatch):
    """A conv net's training gradients reach the scores and self-influence as layer rows (``D_i^T A~_i``,
    formed for the scores, rotated as rows for the self-influence where cheaper): the same numbers
    as from formed per-example gradients; conv biases (cnn) and none (resnet9), several chunks."""
    import app.estimators.methods.ekfac as ekfac_module

    g = torch.Generator().manual_seed(12)
    params = {"in_channels": 2, "height": 8, "width": 8, "num_classes": 3}
    model = init_model(
        arch, {**params, "channels": [3, 5]} if arch == "cnn" else {**params, "base_channels": 2}, 0
    )
    x = torch.randn(11, 2 * 8 * 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (11,), generator=g)
    model = model.double()
    prob = InfluenceProblem(
        model=model, task=CLS, weights=model.state_dict(), train_x=x, train_y=y, query_x=x[:3], query_y=y[:3]
    )
    rt = Runtime(dtype=torch.float64, chunk_size=4)
    for name in METHODS:
        est = get_estimator(name)
        state = est.fit(prob, None, rt)
        rows = est.attribute(prob, None, want_self_influence=True, runtime=rt, state=state)
        with monkeypatch.context() as mp:
            mp.setattr(ekfac_module, "per_sample_layer_rows", lambda *a, **kw: None)
            formed = est.attribute(prob, None, want_self_influence=True, runtime=rt, state=state)
        np.testing.assert_allclose(
            rows.scores, formed.scores, rtol=1e-9, atol=1e-12 * np.abs(formed.scores).max()
        )
        np.testing.assert_allclose(rows.self_influence, formed.self_influence, rtol=1e-9)


# ----------------------------------------------------------------------------- state, shards, ordering


@pytest.mark.parametrize("name", METHODS)
def test_state_reuse_skips_the_factor_passes(trained, name):
    calls = []
    rt = Runtime(dtype=torch.float64, chunk_size=7, progress=lambda *a: calls.append(a))
    est = get_estimator(name)
    full = est.attribute(_problem(trained), None, want_self_influence=True, runtime=rt)
    phases = {c[0] for c in calls}
    factor_phases = {"covariance", "eigendecomposition"} | ({"lambda"} if name == "ekfac" else set())
    assert phases == factor_phases | {"query_gradients", "train_gradients"}
    assert ("covariance", 5, 5) in calls and ("eigendecomposition", 2, 2) in calls
    calls.clear()
    state = est.fit(_problem(trained), None, rt)
    assert {c[0] for c in calls} == factor_phases
    assert isinstance(state, TrainState) and all(t.dtype == torch.float64 for t in state.tensors.values())
    info = state.info
    assert info["variant"] == name and info["fisher"] == "empirical" and info["n"] == 30
    assert [la["module"] for la in info["layers"]] == ["1", "3"] and set(info["damping_heuristic"]) == {
        "1",
        "3",
    }
    calls.clear()
    again = est.attribute(_problem(trained), None, want_self_influence=True, runtime=rt, state=state)
    assert {c[0] for c in calls} == {"query_gradients", "train_gradients"}
    np.testing.assert_array_equal(again.scores, full.scores)
    np.testing.assert_array_equal(again.self_influence, full.self_influence)
    other = "ekfac" if name == "kfac" else "kfac"
    with pytest.raises(EstimatorError):
        get_estimator(other).attribute(_problem(trained), None, runtime=rt, state=state)
    assert est.state_params({"damping": 0.3}) == est.state_params(None)  # damping is applied at scoring time


@pytest.mark.parametrize("name", METHODS)
def test_train_range_shards_concatenate_and_shuffling_permutes_columns(trained, name):
    model, weights, x, y, qx, qy = trained
    est = get_estimator(name)
    params = {"fisher": "true", "seed": 1}
    state = est.fit(_problem(trained), params, F64)
    full = est.attribute(_problem(trained), params, want_self_influence=True, runtime=F64, state=state)
    parts = [
        est.attribute(
            _problem(trained), params, want_self_influence=True, runtime=F64, state=state, train_range=r
        )
        for r in [(0, 11), (11, 11), (11, 30)]
    ]
    assert parts[1].scores.shape == (5, 0)
    np.testing.assert_allclose(
        np.concatenate([p.scores for p in parts], 1), full.scores, rtol=1e-12, atol=1e-15
    )
    np.testing.assert_allclose(
        np.concatenate([p.self_influence for p in parts]), full.self_influence, rtol=1e-12
    )
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(5))
    emp = est.attribute(_problem(trained), None, want_self_influence=True, runtime=F64)
    shuffled = est.attribute(
        _problem(trained, train_x=x[perm], train_y=y[perm]), None, want_self_influence=True, runtime=F64
    )
    np.testing.assert_allclose(shuffled.scores, emp.scores[:, perm.numpy()], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(shuffled.self_influence, emp.self_influence[perm.numpy()], rtol=1e-8)


def test_true_fisher_is_seeded_and_independent_of_chunk_size(trained):
    est = get_estimator("ekfac")
    a = est.attribute(_problem(trained), {"fisher": "true", "seed": 2}, runtime=F64)
    b = est.attribute(
        _problem(trained), {"fisher": "true", "seed": 2}, runtime=Runtime(dtype=torch.float64, chunk_size=64)
    )
    c = est.attribute(_problem(trained), {"fisher": "true", "seed": 9}, runtime=F64)
    e = est.attribute(_problem(trained), None, runtime=F64)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-13)
    assert not np.allclose(a.scores, c.scores) and not np.allclose(a.scores, e.scores)
    assert a.metadata["fisher"] == "true" and e.metadata["fisher"] == "empirical"


def test_true_fisher_is_the_gauss_newton_in_expectation():
    """Sampled labels follow the model: for MSE, y ~ N(f, 1/2) makes delta = 2(f - y) independent of the
    input with E[delta^2] = 2 (the GN 2 E[a a^T]); for cross-entropy, y ~ softmax(z) gives
    E[delta delta^T] = E[diag(p) - p p^T] (the GN's output Hessian)."""
    g = torch.Generator().manual_seed(11)
    n = 4000
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    rt = Runtime(dtype=torch.float64, chunk_size=1000)
    for task, k in ((REG, 1), (CLS, 3)):
        model = init_model("linear", {"in_features": 3, "num_classes": k}, 0).double()
        y = torch.zeros(n, dtype=torch.float64) if k == 1 else torch.zeros(n, dtype=torch.long)
        prob = InfluenceProblem(
            model=model,
            task=task,
            weights=model.state_dict(),
            train_x=x,
            train_y=y,
            query_x=x[:1],
            query_y=y[:1],
        )
        layers, _ = tracked_layers(model)
        S = covariance_factors(prob, layers, rt, fisher="true", seed=0).S["1"]
        if k == 1:
            expected = torch.full((1, 1), 2.0, dtype=torch.float64)
        else:
            with torch.no_grad():
                p = torch.softmax(model(x), -1)
            expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
        err = float(torch.linalg.norm(S - expected) / torch.linalg.norm(expected))
        print(f"true Fisher S vs its expectation ({task.loss}, n={n}): relative error {err:.3f}")
        assert err < 0.1


def test_output_hessian_roots_square_to_the_loss_output_hessian():
    g = torch.Generator().manual_seed(3)
    out = torch.randn(6, 4, generator=g, dtype=torch.float64)
    L = output_hessian_roots(out, CLS)  # row c = column c of L
    p = torch.softmax(out, -1)
    hess = torch.func.vmap(torch.func.hessian(lambda z: torch.logsumexp(z, -1)))(out)  # CE's, any label
    torch.testing.assert_close(L.transpose(1, 2) @ L, hess)
    torch.testing.assert_close(L.transpose(1, 2) @ L, torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    Lr = output_hessian_roots(out, REG)  # (1/k) sum_j (f_j - y_j)^2 has Hessian (2/k) I
    torch.testing.assert_close(Lr.transpose(1, 2) @ Lr, torch.eye(4, dtype=torch.float64).expand(6, 4, 4) / 2)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_expected_fisher_is_the_exact_gauss_newton(chunk_size):
    """fisher='expected' is the sampled true Fisher's expectation taken exactly: for one Linear layer
    with cross-entropy, S = E[diag(p) - p p^T], A = E[a~ a~^T] and the refit eigenvalues are the exact
    diagonal of the layer's Gauss-Newton matrix E[(diag(p) - p p^T) (x) a~ a~^T] in the Kronecker
    eigenbasis (whatever the chunking; the generic per-example route agrees with the factored one)."""
    g = torch.Generator().manual_seed(12)
    n, d, k = 23, 3, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    model = init_model("linear", {"in_features": d, "num_classes": k}, 0).double()
    prob = InfluenceProblem(
        model=model, task=CLS, weights=model.state_dict(), train_x=x, train_y=y, query_x=x[:2], query_y=y[:2]
    )
    rt = Runtime(dtype=torch.float64, chunk_size=chunk_size)
    layers, _ = tracked_layers(model)
    cov = covariance_factors(prob, layers, rt, fisher="expected")
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    torch.testing.assert_close(cov.S["1"], H.mean(0))
    torch.testing.assert_close(cov.A["1"], a.T @ a / n)
    state = get_estimator("ekfac").fit(prob, {"fisher": "expected"}, rt)
    f = KFACFactors(state)
    Q = torch.kron(f["1/QS"], f["1/QA"])
    GN = torch.einsum("nij,nk,nl->ikjl", H, a, a).reshape(k * (d + 1), k * (d + 1)) / n
    torch.testing.assert_close(f.eigenvalues(layers[0]).reshape(-1), torch.diagonal(Q.T @ GN @ Q))
    # the same through the hooked pass and the generic (vmap) per-example route
    import app.estimators.kfac as kfac_module

    orig = kfac_module.gradient_factors, kfac_module._chain_blocks
    kfac_module.gradient_factors = kfac_module._chain_blocks = lambda *a, **kw: None
    try:
        generic = KFACFactors(get_estimator("ekfac").fit(prob, {"fisher": "expected"}, rt))
    finally:
        kfac_module.gradient_factors, kfac_module._chain_blocks = orig
    torch.testing.assert_close(generic.eigenvalues(generic.layers[0]), f.eigenvalues(layers[0]))


@pytest.mark.parametrize("fisher", ["empirical", "true", "expected"])
@pytest.mark.parametrize("task", ["cls", "reg"])
def test_linear_chain_route_equals_the_hooked_passes(fisher, task, monkeypatch):
    """A plain MLP's factors come from one forward pass and its pseudo-examples' output gradients
    back-propagated in closed form (_chain_blocks); they equal those of the hooked passes (forward
    hooks, autograd, each pseudo-example evaluated) for every Fisher: A, S, the sampled labels and
    EK-FAC's refit eigenvalues. ReLU, GELU and tanh, a frozen bias, an untracked (frozen) layer,
    several chunks."""
    import app.estimators.kfac as kfac_module

    g = torch.Generator().manual_seed(5)
    n, k = 29, 3
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (
        torch.randint(0, k, (n,), generator=g)
        if task == "cls"
        else torch.randn(n, k, generator=g, dtype=torch.float64)
    )
    model = nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.GELU(), nn.Dropout(0.1), nn.Linear(5, 5), nn.Tanh(),
        nn.Linear(5, k),
    ).double()  # fmt: skip
    model[2].bias.requires_grad_(False)
    model[5].weight.requires_grad_(False)  # not tracked, still back-propagated through
    prob = InfluenceProblem(
        model=model, task=CLS if task == "cls" else REG, weights=model.state_dict(), train_x=x, train_y=y,
        query_x=x[:2], query_y=y[:2],
    )  # fmt: skip
    rt = Runtime(dtype=torch.float64, chunk_size=8)
    layers, _ = tracked_layers(model)
    assert [la.module for la in layers] == ["0", "2", "7"] and layers[1].bias is None
    routes = []

    def spy(*a, **kw):
        routes.append(chain_blocks(*a, **kw) is not None)
        return chain_blocks(*a, **kw)

    chain_blocks = kfac_module._chain_blocks
    monkeypatch.setattr(kfac_module, "_chain_blocks", spy)
    fast_cov = covariance_factors(prob, layers, rt, fisher=fisher, seed=3)
    fast = KFACFactors(get_estimator("ekfac").fit(prob, {"fisher": fisher, "seed": 3}, rt))
    assert routes == [True] * 3  # covariances twice, eigenvalues once
    monkeypatch.setattr(kfac_module, "_chain_blocks", lambda *a, **kw: None)
    hooked_cov = covariance_factors(prob, layers, rt, fisher=fisher, seed=3)
    hooked = KFACFactors(get_estimator("ekfac").fit(prob, {"fisher": fisher, "seed": 3}, rt))
    for la in layers:
        torch.testing.assert_close(fast_cov.A[la.module], hooked_cov.A[la.module], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fast_cov.S[la.module], hooked_cov.S[la.module], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fast.eigenvalues(la), hooked.eigenvalues(la), rtol=1e-10, atol=1e-14)
    assert fast_cov.positions == hooked_cov.positions
    if fisher == "true":
        torch.testing.assert_close(fast_cov.labels, hooked_cov.labels)


def test_expected_fisher_for_mse_makes_kfac_and_ekfac_the_exact_influence():
    """For one Linear layer with the mse loss the Gauss-Newton matrix is (2/k) I (x) E[a~ a~^T], a
    Kronecker product: with fisher='expected' both K-FAC and EK-FAC influence equal the exact
    (damped) Gauss-Newton influence, deterministically (the sampled 'true' Fisher only on average)."""
    g = torch.Generator().manual_seed(4)
    n, d, k = 19, 3, 2
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, k, generator=g, dtype=torch.float64)
    qx, qy = x[:3] + 0.1, y[:3] - 0.2
    model = init_model("linear", {"in_features": d, "num_classes": k}, 0).double()
    prob = InfluenceProblem(model=model, task=REG, weights=model.state_dict(), train_x=x, train_y=y,
                            query_x=qx, query_y=qy)  # fmt: skip
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    GN = torch.kron(torch.eye(k, dtype=x.dtype) * (2.0 / k), a.T @ a / n)
    w = model.state_dict()
    G = torch.cat([gg for _, _, gg in per_sample_gradients(model, w, x, y, train_objective(REG))])
    qobj = query_objective_fn(REG, "loss")
    Gq = torch.cat([gg for _, _, gg in per_sample_gradients(model, w, qx, qy, qobj)])
    # the flat layout is (weight row-major, bias); reorder GN's (row, [x, 1]) layout to it
    layers, _ = tracked_layers(model)
    perm = flatten_layer_matrices([torch.arange(k * (d + 1)).reshape(1, k, d + 1)], layers)[0]
    GNf = GN[perm][:, perm]
    exact = (Gq @ torch.linalg.solve(GNf + 0.05 * torch.eye(len(perm), dtype=x.dtype), G.T) / n).numpy()
    for name in METHODS:
        got = get_estimator(name).attribute(prob, {"fisher": "expected", "damping": 0.05}, runtime=F64)
        np.testing.assert_allclose(got.scores, exact, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- failures and parameters


def test_non_finite_factors_name_damping_and_bad_layers_name_layers(trained):
    est = get_estimator("ekfac")
    state = est.fit(_problem(trained), None, F64)
    bad = TrainState(tensors={k: v.clone() for k, v in state.tensors.items()}, info=state.info)
    bad.tensors["1/lambda"][0, 0] = float("nan")
    with pytest.raises(NumericalError) as e:
        est.attribute(_problem(trained), None, runtime=F64, state=bad)
    assert e.value.parameter == "/method/params/damping"
    with pytest.raises(EstimatorError) as e:
        est.attribute(_problem(trained), {"layers": ["nope"]}, runtime=F64)
    assert e.value.parameter == "/method/params/layers"
    nan_weights = {k: v.clone() for k, v in trained[1].items()}
    nan_weights["1.weight"][0, 0] = float("nan")
    with pytest.raises(NumericalError):
        est.attribute(_problem(trained, weights=nan_weights), None, runtime=F64)


def test_frozen_and_uncalled_modules_are_ignored():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Net().double()
    model.a.bias.requires_grad_(False)
    x, y = _data(12, 3, d=3, k=2)
    prob = InfluenceProblem(
        model=model, task=CLS, weights=model.state_dict(), train_x=x, train_y=y, query_x=x[:2], query_y=y[:2]
    )
    out = get_estimator("ekfac").attribute(prob, {"damping": 0.1}, runtime=F64)
    md = out.metadata
    assert md["layers"] == ["a", "b"] and md["ignored_parameters"] == ["unused.weight", "unused.bias"]
    assert "unused" in md["skipped_modules"] and md["n_tracked_parameters"] == 4 * 3 + 2 * 5


def test_params_validate_with_pydantic():
    pydantic = pytest.importorskip("pydantic")
    from app.estimators import REGISTRY

    for name in METHODS:
        ta = pydantic.TypeAdapter(REGISTRY[name].Params)
        assert ta.validate_python({}).damping is None and ta.validate_python({}).fisher == "empirical"
        assert ta.validate_python({"damping": 0.1, "layers": ["1"], "fisher": "true", "seed": 3}).seed == 3
        for bad in ({"damping": -1.0}, {"fisher": "exact"}, {"seed": -1}, {"layers": "1"}):
            with pytest.raises(pydantic.ValidationError):
                ta.validate_python(bad)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
@pytest.mark.parametrize("scale", [1e-22, 1e-13])
def test_scores_that_overflow_the_compute_precision_fail_naming_the_damping(name, scale):
    """Without damping, a feature nearly absent from training but present in the queries makes the
    curvature nearly singular: the preconditioned query gradients are inf in float64 (1e-22), or, with
    EK-FAC at 1e-13 on this machine, finite there but NaN in the float32 scores. The job must fail
    naming damping either way, not return a NaN matrix."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g)
    x[:, 2] = scale
    qx = torch.randn(4, 3, generator=g)
    qx[:, 2] = 1.0
    y, qy = torch.randint(0, 2, (40,), generator=g), torch.randint(0, 2, (4,), generator=g)
    model = init_model("linear", {"in_features": 3, "num_classes": 2}, 0)
    prob = InfluenceProblem(
        model=model, task=CLS, weights=model.state_dict(), train_x=x, train_y=y, query_x=qx, query_y=qy
    )
    with pytest.raises(NumericalError) as info:
        get_estimator(name).attribute(prob, {"damping": 0.0}, runtime=Runtime(dtype=torch.float32))
    assert info.value.parameter.endswith("/damping")
