"""if_cg, if_lissa, if_arnoldi, datainf and relatif against if_exact / explicit formulas, plus sharding,
orientation, sign (leave-k-out retraining), state reuse and failure modes (ESTIMATORS.md 2.11-2.17).

Fixtures (float64): a tiny tanh MLP (p = 131; its Hessian needs damping 0.05 to be positive definite)
and an L2-regularised 2-class logistic regression (p = 12, weight decay 0.1, condition number ~5).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from app.estimators import (
    REGISTRY,
    Cancelled,
    EstimatorError,
    InfluenceProblem,
    NumericalError,
    ProblemSize,
    Recipe,
    Runtime,
    TaskSpec,
    TrainState,
    get_estimator,
    init_model,
    train,
)
from app.estimators.gradients import (
    flatten,
    objective_hessian,
    objective_value_and_gradient,
    per_sample_gradients,
    select_parameters,
    trainable_names,
    unflatten,
)
from app.estimators.methods.datainf import SWAP_WARN_LAYER_SIZE, layer_groups, sherman_morrison_apply
from app.estimators.objectives import per_example_loss, query_objective

torch.set_num_threads(1)
stats = pytest.importorskip("scipy.stats")

CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
F64 = Runtime(dtype=torch.float64, chunk_size=32)
MLP = {"in_features": 4, "hidden": [16], "num_classes": 3, "activation": "tanh"}
MLP_WD, MLP_DAMPING = 1e-2, 0.05
LR_WD = 0.1
NEW = ["if_cg", "if_lissa", "if_arnoldi", "datainf", "relatif"]


def _blobs(n, seed, d=4, k=3, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centres = spread * torch.randn(k, d, generator=g, dtype=torch.float64)
    return centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


def _problem(model, task, weights, x, y, qx, qy, wd, **kw):
    return InfluenceProblem(
        model=model,
        task=task,
        weights=weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        weight_decay=wd,
        **kw,
    )


@pytest.fixture(scope="module")
def mlp():
    x, y = _blobs(80, 0)
    qx, qy = _blobs(6, 1)
    model = init_model("mlp", MLP, 0).double()
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(learning_rate=0.2, epochs=30, batch_size=16, weight_decay=MLP_WD, num_checkpoints=0),
    )
    return _problem(model, CLS, res.weights, x, y, qx, qy, MLP_WD)


@pytest.fixture(scope="module")
def logreg():
    x, y = _blobs(200, 0, d=5, k=2, spread=0.7)
    qx, qy = _blobs(4, 1, d=5, k=2, spread=0.7)
    model = init_model("linear", {"in_features": 5, "num_classes": 2}, 0).double()
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(
            optimizer="lbfgs",
            learning_rate=1.0,
            epochs=100,
            weight_decay=LR_WD,
            num_checkpoints=0,
            lbfgs_tolerance=1e-10,
        ),
    )
    prob = _problem(model, CLS, res.weights, x, y, qx, qy, LR_WD)
    H = objective_hessian(model, res.weights, x, y, CLS, LR_WD)
    return prob, H


def _lr_params(H):
    """Parameters under which every new estimator is accurate on the logistic regression."""
    ev = torch.linalg.eigvalsh(H)
    lam_max, kappa = float(ev[-1]), float(ev[-1] / ev[0])
    p = H.shape[0]
    return {
        "if_cg": {"damping": 0.0, "max_iter": 50},
        "if_lissa": {"damping": 0.0, "scale": 1.5 * lam_max, "depth": int(20 * kappa), "batch_size": 64},
        "if_arnoldi": {"damping": 0.0, "rank": p, "n_iter": p},
        "datainf": {},
        "relatif": {"damping": 0.0},
    }


def _grads(prob, x, y, objective, names=None):
    return torch.cat(
        [
            G
            for _, _, G in per_sample_gradients(
                prob.model, prob.weights, x, y, objective, chunk_size=64, names=names
            )
        ]
    )


def _train_grads(prob, names=None):
    return _grads(prob, prob.train_x, prob.train_y, lambda o, t: per_example_loss(o, t, prob.task), names)


def _query_grads(prob, names=None):
    return _grads(
        prob,
        prob.query_x,
        prob.query_y,
        lambda o, t: query_objective(o, t, prob.task, prob.measurement),
        names,
    )


# ----------------------------------------------------------------------------- if_cg


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_if_cg_equals_if_exact(mlp, measurement):
    prob = InfluenceProblem(**{**mlp.__dict__, "measurement": measurement})
    want_self = measurement == "loss"  # self-influence does not depend on the measurement
    ref = get_estimator("if_exact").attribute(
        prob, {"damping": MLP_DAMPING}, want_self_influence=want_self, runtime=F64
    )
    t = time.perf_counter()
    out = get_estimator("if_cg").attribute(
        prob, {"damping": MLP_DAMPING, "max_iter": 131}, want_self_influence=want_self, runtime=F64
    )
    dt = time.perf_counter() - t
    err = np.abs(out.scores - ref.scores).max() / np.abs(ref.scores).max()
    md = out.metadata
    print(
        f"\nif_cg vs if_exact ({measurement}, p=131, n=80, m=6): scores rel err {err:.1e}, "
        f"{md['cg_iterations']} iterations, {md['cg_solves']} solves, {dt:.2f}s"
    )
    assert out.scores.shape == (6, 80) and out.scores.dtype == np.float64
    assert err < 1e-6
    assert md["method"] == "if_cg" and md["normalisation"] == "1/n" and md["damping"] == MLP_DAMPING
    assert md["cg_converged"] and md["cg_max_relative_residual"] <= 1e-8 and md["cg_iterations"] <= 131
    if want_self:
        serr = np.abs(out.self_influence / ref.self_influence - 1).max()
        print(f"if_cg self-influence vs if_exact: rel err {serr:.1e}")
        assert serr < 1e-6 and md["cg_solves"] == 1 + 3  # queries + one per chunk of 32 training rows
    else:
        assert out.self_influence is None and md["cg_solves"] == 1


def test_if_cg_indefinite_hessian_names_damping(mlp):
    model = init_model("mlp", MLP, 2).double()  # random init, no weight decay: strongly non-convex
    prob = _problem(
        model, CLS, model.state_dict(), mlp.train_x[:40], mlp.train_y[:40], mlp.query_x, mlp.query_y, 0
    )
    with pytest.raises(NumericalError) as e:
        get_estimator("if_cg").attribute(prob, {"damping": 0.0}, runtime=F64)
    assert e.value.parameter == "/method/params/damping"
    assert "not positive definite" in e.value.detail and "Increase damping" in e.value.detail
    H = objective_hessian(model, prob.weights, prob.train_x, prob.train_y, CLS, 0.0)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    out = get_estimator("if_cg").attribute(prob, {"damping": 0.1 - lam_min, "max_iter": 200}, runtime=F64)
    assert out.metadata["cg_converged"]


def test_if_cg_hessian_subsample(logreg):
    prob, _ = logreg
    full = get_estimator("if_cg").attribute(prob, {"damping": 0.0}, runtime=F64)
    sub = get_estimator("if_cg").attribute(prob, {"damping": 0.0, "hessian_rows": 100}, runtime=F64)
    assert sub.metadata["hessian_rows"] == 100 and full.metadata["hessian_rows"] == 200
    rho = stats.spearmanr(sub.scores.ravel(), full.scores.ravel())[0]
    assert 0.9 < rho < 1.0


# ----------------------------------------------------------------------------- if_lissa


def test_if_lissa_close_to_exact_on_logistic_regression(logreg):
    prob, H = logreg
    ev = torch.linalg.eigvalsh(H)
    lam_max, kappa = float(ev[-1]), float(ev[-1] / ev[0])
    params = {
        "damping": 0.0,
        "scale": 1.5 * lam_max,
        "depth": int(20 * kappa),
        "repeats": 10,
        "batch_size": 64,
    }
    ref = get_estimator("if_exact").attribute(prob, {"damping": 0.0}, runtime=F64)
    t = time.perf_counter()
    out = get_estimator("if_lissa").attribute(
        prob, params, runtime=Runtime(dtype=torch.float64, chunk_size=256)
    )
    dt = time.perf_counter() - t
    err = np.linalg.norm(out.scores - ref.scores, axis=1) / np.linalg.norm(ref.scores, axis=1)
    print(
        f"\nif_lissa vs if_exact (logistic regression, kappa={kappa:.2f}, scale=1.5 lambda_max, depth="
        f"{params['depth']}, 10 repeats, batch 64): per-query relative error {np.round(err, 4)}, {dt:.2f}s"
    )
    assert err.max() < 0.05
    md = out.metadata
    assert abs(md["estimated_lambda_max"] - lam_max) < 1e-6 * lam_max and md["lissa_max_growth"] <= 1.0
    assert md["scale"] == params["scale"] and md["depth"] == params["depth"] and md["repeats"] == 10


def test_if_lissa_close_to_exact_on_mlp(mlp):
    """ESTIMATORS.md 2.12 on the CG test's model (damped tanh MLP, p = 131, n = 80): s = 1.5 lambda_max and
    r = 20 kappa of H + damping I, mini-batches of 64 rows drawn with replacement; per-query relative error
    of the score vector vs if_exact < 5 %.

    The doc's R = 10 repeats are not enough here: the error is the recursion's sampling variance (it falls
    as 1/sqrt(repeats x batch), no bias), and at R = 10 the worst query's error over seeds 0-4 was
    6.1-9.2 % with batch 64 (batch 16: 13-21 %, 32: 8-16 %, 128: 3.6-7.8 %, 256: 2.3-5.6 %). So this test
    uses R = 40 with batch 64: worst query over seeds 0-4 2.0-4.1 % (seed 0, used here: 2.0 %), ~10 s.
    """
    H = objective_hessian(mlp.model, mlp.weights, mlp.train_x, mlp.train_y, CLS, MLP_WD)
    ev = torch.linalg.eigvalsh(H) + MLP_DAMPING
    lam_max, kappa = float(ev[-1]), float(ev[-1] / ev[0])
    assert float(ev[0]) > 0  # the damped Hessian is positive definite (the raw one is not)
    params = {
        "damping": MLP_DAMPING,
        "scale": 1.5 * lam_max,
        "depth": int(20 * kappa),
        "repeats": 40,
        "batch_size": 64,
        "seed": 0,
    }
    ref = get_estimator("if_exact").attribute(mlp, {"damping": MLP_DAMPING}, runtime=F64)
    t = time.perf_counter()
    out = get_estimator("if_lissa").attribute(
        mlp, params, runtime=Runtime(dtype=torch.float64, chunk_size=256)
    )
    dt = time.perf_counter() - t
    err = np.linalg.norm(out.scores - ref.scores, axis=1) / np.linalg.norm(ref.scores, axis=1)
    print(
        f"\nif_lissa vs if_exact (MLP p=131, damping {MLP_DAMPING}, kappa={kappa:.1f}, scale=1.5 lambda_max, "
        f"depth={params['depth']}, 40 repeats, batch 64 of 80): per-query relative error {np.round(err, 4)}, "
        f"{dt:.2f}s"
    )
    assert out.scores.shape == (6, 80)
    assert err.max() < 0.05
    md = out.metadata
    assert md["lissa_max_growth"] <= 1.0 and md["depth"] == int(20 * kappa) and md["repeats"] == 40
    assert abs(md["estimated_lambda_max"] + MLP_DAMPING - lam_max) < 1e-3 * lam_max


def test_if_lissa_small_scale_or_indefinite_raises(logreg, mlp):
    prob, H = logreg
    lam_max = float(torch.linalg.eigvalsh(H)[-1])
    with pytest.raises(NumericalError) as e:
        get_estimator("if_lissa").attribute(
            prob, {"damping": 0.01, "scale": 0.5 * lam_max, "depth": 50}, runtime=F64
        )
    assert e.value.parameter == "/method/params/scale"
    assert "scale=" in e.value.detail and "damping=0.01" in e.value.detail
    model = init_model("mlp", MLP, 2).double()
    raw = _problem(
        model, CLS, model.state_dict(), mlp.train_x[:40], mlp.train_y[:40], mlp.query_x, mlp.query_y, 0
    )
    with pytest.raises(NumericalError) as e:
        get_estimator("if_lissa").attribute(raw, {"damping": 0.0, "scale": 100.0, "depth": 50}, runtime=F64)
    assert e.value.parameter == "/method/params/damping" and "not positive definite" in e.value.detail


# ----------------------------------------------------------------------------- if_arnoldi


def test_if_arnoldi_full_rank_equals_if_exact_and_reuses_state(mlp):
    ref = get_estimator("if_exact").attribute(
        mlp, {"damping": MLP_DAMPING}, want_self_influence=True, runtime=F64
    )
    est = get_estimator("if_arnoldi")
    params = {"rank": 131, "n_iter": 131, "damping": MLP_DAMPING}
    calls = []
    rt = Runtime(dtype=torch.float64, chunk_size=32, progress=lambda *a: calls.append(a))
    t = time.perf_counter()
    state = est.fit(mlp, params, rt)
    t_fit = time.perf_counter() - t
    assert isinstance(state, TrainState) and state.tensors["eigenvectors"].shape == (131, 131)
    assert state.tensors["eigenvalues"].dtype == torch.float64
    assert state.info["max_relative_residual"] < 1e-6 and state.info["converged_pairs"] == 131
    short = est.fit(mlp, {"rank": 20, "n_iter": 20}, F64).info  # Ritz pairs of a short run: the tail is rough
    assert 0 < short["converged_pairs"] < 20 and short["max_relative_residual"] > 1e-2
    assert sum(1 for c in calls if c[0] == "arnoldi") == 132  # 0..131
    calls.clear()
    t = time.perf_counter()
    a = est.attribute(mlp, params, want_self_influence=True, runtime=rt, state=state)
    t_attr = time.perf_counter() - t
    assert not [c for c in calls if c[0] == "arnoldi"]  # no Hessian pass with a cached state
    b = est.attribute(mlp, params, want_self_influence=True, runtime=F64, state=state)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.self_influence, b.self_influence)
    err = np.abs(a.scores - ref.scores).max() / np.abs(ref.scores).max()
    serr = np.abs(a.self_influence / ref.self_influence - 1).max()
    print(
        f"\nif_arnoldi rank=p vs if_exact: {err:.1e} (self {serr:.1e}); "
        f"fit {t_fit:.2f}s, attribute {t_attr:.3f}s"
    )
    assert err < 1e-6 and serr < 1e-6
    # damping is applied at attribution time: the state does not depend on it
    assert "damping" not in est.state_params(est.Params(**params))
    # without enough damping the negative eigenvalues of the non-convex MLP are refused
    with pytest.raises(NumericalError) as e:
        est.attribute(mlp, {**params, "damping": 0.0}, runtime=F64, state=state)
    assert e.value.parameter == "/method/params/damping" and "<= 0 after damping" in e.value.detail


def test_if_arnoldi_low_rank_and_parameter_checks(logreg):
    prob, H = logreg
    est = get_estimator("if_arnoldi")
    out = est.attribute(prob, {"rank": 3, "n_iter": 12}, runtime=F64)  # n_iter capped at p = 12
    ev, V = torch.linalg.eigh(H)
    Vk, lk = V[:, -3:], ev[-3:]
    G, Q = _train_grads(prob), _query_grads(prob)
    naive = (Q @ Vk / lk) @ (G @ Vk).T / prob.n_train
    np.testing.assert_allclose(out.scores, naive.numpy(), rtol=1e-7, atol=1e-10 * float(naive.abs().max()))
    assert out.metadata["rank"] == 3
    with pytest.raises(EstimatorError) as e:
        est.check(ProblemSize(10, 1, 1000, 0), est.Params(rank=50, n_iter=20))
    assert e.value.parameter == "/method/params/n_iter"
    est.check(ProblemSize(10, 1, 12, 0), est.Params(rank=50, n_iter=20))  # both capped at p = 12


def test_if_arnoldi_default_n_iter_is_three_times_rank(mlp):
    """ESTIMATORS.md 2.13: top-k Arnoldi eigenvalues match eigh to 1e-4 relative. n_iter=None means
    3 x rank (capped at p). Measured on this MLP, rank 10, seeds 0-4: max relative error of the top-10
    1e-13 to 5e-11 at n_iter 30 (3 x rank), but 7e-5 to 6.3e-2 at n_iter 20 (2 x rank; seed 0, used here,
    is the 6.3e-2 one, asserted > 1e-3 to show why the default is not 2 x rank)."""
    est = get_estimator("if_arnoldi")
    assert est.Params().n_iter is None and est.Params().rank == 50
    H = objective_hessian(mlp.model, mlp.weights, mlp.train_x, mlp.train_y, CLS, MLP_WD)
    ev = torch.linalg.eigvalsh(H)
    top = ev[torch.argsort(ev.abs(), descending=True)][:10]

    def rel_err(n_iter):
        state = est.fit(mlp, {"rank": 10, "n_iter": n_iter}, F64)
        assert state.info["n_iter"] == (30 if n_iter is None else n_iter)
        return float(((state.tensors["eigenvalues"] - top).abs() / top.abs()).max())

    default, twice = rel_err(None), rel_err(20)
    print(
        f"\nif_arnoldi top-10 eigenvalues vs eigh (MLP p=131): n_iter=None (30) {default:.1e}, 20 {twice:.1e}"
    )
    assert default < 1e-4 and twice > 1e-3

    # rank 50 (the default): n_iter resolves to 150 before it enters the cache key ...
    key = est.state_params(est.Params())
    assert key["n_iter"] == 150 and key == est.state_params(est.Params(n_iter=150))
    assert est.state_params(est.Params(n_iter=100)) != key
    # ... and in the metadata (a p = 2 x 81 = 162 logistic regression, so 150 is not capped at p)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 80, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), generator=g)
    model = init_model("linear", {"in_features": 80, "num_classes": 2}, 0).double()
    prob = _problem(model, CLS, model.state_dict(), x, y, x[:2], y[:2], LR_WD)
    md = est.attribute(prob, None, runtime=F64).metadata
    assert md["n_parameters"] == 162 and md["rank"] == 50 and md["n_iter"] == 150
    # capped at p: on the p = 131 MLP the default rank 50 runs 131 iterations
    assert est.fit(mlp, None, F64).info["n_iter"] == 131
    with pytest.raises(EstimatorError) as e:  # rank 50 > n_iter 20 < p: refused, naming n_iter
        est.check(ProblemSize(10, 1, 1000, 0), est.Params(n_iter=20))
    assert e.value.parameter == "/method/params/n_iter"
    est.check(ProblemSize(10, 1, 1000, 0), est.Params())


# ----------------------------------------------------------------------------- datainf


def test_sherman_morrison_block_equals_explicit_inverse():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(9, 5, generator=g, dtype=torch.float64)
    V = torch.randn(5, 3, generator=g, dtype=torch.float64)
    lam = 0.3
    explicit = sum(
        torch.linalg.solve(torch.outer(r, r) + lam * torch.eye(5, dtype=torch.float64), V) for r in G
    )
    torch.testing.assert_close(sherman_morrison_apply(G, lam, V), explicit, rtol=1e-10, atol=1e-12)


def test_datainf_equals_explicit_per_example_inverses(mlp):
    est = get_estimator("datainf")
    out = est.attribute(mlp, {"damping_scale": 0.1}, want_self_influence=True, runtime=F64)
    names = trainable_names(mlp.model)
    modules, idx = layer_groups(mlp.model, names)
    assert modules == ["1", "3"] and [len(i) for i in idx] == [80, 51]
    G, Q = _train_grads(mlp), _query_grads(mlp)
    n = mlp.n_train
    scores = torch.zeros(6, n, dtype=torch.float64)
    self_inf = torch.zeros(n, dtype=torch.float64)
    lambdas = []
    for ix in idx:
        Gl, Ql = G[:, ix], Q[:, ix]
        lam = 0.1 * float((Gl**2).mean())
        lambdas.append(lam)
        eye = torch.eye(len(ix), dtype=torch.float64)
        Ginv = sum(torch.linalg.inv(torch.outer(r, r) + lam * eye) for r in Gl) / n
        scores += Ql @ Ginv @ Gl.T / n
        self_inf += ((Gl @ Ginv) * Gl).sum(1) / n
    np.testing.assert_allclose(out.scores, scores.numpy(), rtol=1e-6, atol=1e-9 * float(scores.abs().max()))
    np.testing.assert_allclose(out.self_influence, self_inf.numpy(), rtol=1e-6)
    np.testing.assert_allclose(list(out.metadata["layer_damping"].values()), lambdas, rtol=1e-10)
    # layer selection: only the output layer
    last = est.attribute(mlp, {"layers": ["last"]}, runtime=F64)
    assert last.metadata["layers"] == ["3"] and last.metadata["layer_sizes"] == [51]
    with pytest.raises(EstimatorError) as e:
        est.attribute(mlp, {"layers": ["nope"]}, runtime=F64)
    assert e.value.parameter == "/method/params/layers"


def test_datainf_factored_path_equals_streamed_gradients(mlp, logreg, monkeypatch):
    """A plain MLP is scored from its per-layer gradient factors (kernel or small-layer products, no
    gradient matrix); any other model streams per-sample gradients. Both give the same numbers."""
    import app.estimators.methods.datainf as datainf_module

    est = get_estimator("datainf")
    for prob in (mlp, logreg[0]):
        for params, shard in (({}, None), ({"layers": ["last"]}, (13, 61))):
            fast = est.attribute(prob, params, want_self_influence=True, runtime=F64, train_range=shard)
            with monkeypatch.context() as mp:
                mp.setattr(datainf_module, "_FACTOR_ELEMENTS", 0)  # no factors: the streamed path
                slow = est.attribute(prob, params, want_self_influence=True, runtime=F64, train_range=shard)
            np.testing.assert_allclose(
                fast.scores, slow.scores, rtol=1e-9, atol=1e-12 * np.abs(slow.scores).max()
            )
            np.testing.assert_allclose(fast.self_influence, slow.self_influence, rtol=1e-9)
            assert fast.metadata["layer_damping"] == pytest.approx(slow.metadata["layer_damping"], rel=1e-12)
            assert set(slow.metadata["layer_route"].values()) == {"gradients"}
            assert "gradients" not in fast.metadata["layer_route"].values()
    # both routes of the factored path (kernel products for the wide first layer of a wider MLP,
    # small-layer products for the output layer) against the streamed path, in float32
    x, y = _blobs(60, 5)
    model = init_model("mlp", {**MLP, "hidden": [100]}, 0)
    wide = _problem(model, CLS, model.state_dict(), x.float(), y, mlp.query_x.float(), mlp.query_y, MLP_WD)
    a = est.attribute(wide, {}, want_self_influence=True, runtime=Runtime())
    assert a.metadata["layer_route"] == {"1": "kernel", "3": "layer_products"}
    with monkeypatch.context() as mp:
        mp.setattr(datainf_module, "_FACTOR_ELEMENTS", 0)
        b = est.attribute(wide, {}, want_self_influence=True, runtime=Runtime())
    assert a.scores.dtype == np.float32 and b.metadata["layer_route"] == {"1": "gradients", "3": "gradients"}
    np.testing.assert_allclose(a.scores, b.scores, rtol=2e-4, atol=1e-5 * np.abs(b.scores).max())
    np.testing.assert_allclose(a.self_influence, b.self_influence, rtol=2e-4)


def _datainf_vs_exact_gn(prob, layers, damping_scale):
    """Mean and min over queries of Spearman(DataInf, exact per-layer damped GN influence, same lambda_l)."""
    n = prob.n_train
    out = get_estimator("datainf").attribute(
        prob, {"layers": layers, "damping_scale": damping_scale}, runtime=F64
    )
    names = select_parameters(prob.model, layers)
    _, idx = layer_groups(prob.model, names)
    G, Q = _train_grads(prob, names), _query_grads(prob, names)
    exact = torch.zeros(prob.n_query, n, dtype=torch.float64)
    for ix, lam in zip(idx, out.metadata["layer_damping"].values(), strict=True):
        Gl = G[:, ix]
        GN = Gl.T @ Gl / n + lam * torch.eye(len(ix), dtype=torch.float64)
        exact += Q[:, ix] @ torch.linalg.solve(GN, Gl.T) / n
    rho = [stats.spearmanr(out.scores[j], exact[j].numpy())[0] for j in range(prob.n_query)]
    return float(np.mean(rho)), float(np.min(rho))


def test_datainf_rank_correlation_vs_exact_damped_gn(mlp):
    """DataInf's swap error (ESTIMATORS.md 2.15): good for a tiny layer, worse as the layer grows."""
    x, y = _blobs(200, 0)
    model = init_model("mlp", {**MLP, "hidden": [1]}, 0).double()  # bottleneck: output layer d = 6
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(learning_rate=0.2, epochs=30, batch_size=16, weight_decay=MLP_WD, num_checkpoints=0),
    )
    tiny = _problem(model, CLS, res.weights, x, y, mlp.query_x, mlp.query_y, MLP_WD)
    model9 = init_model("mlp", {**MLP, "hidden": [2]}, 0).double()  # output layer d = 9
    res9 = train(
        model9,
        CLS,
        x,
        y,
        Recipe(learning_rate=0.2, epochs=30, batch_size=16, weight_decay=MLP_WD, num_checkpoints=0),
    )
    nine = _problem(model9, CLS, res9.weights, x, y, mlp.query_x, mlp.query_y, MLP_WD)
    figures = {
        "d=6": _datainf_vs_exact_gn(tiny, ["last"], 0.1),
        "d=9": _datainf_vs_exact_gn(nine, ["last"], 0.1),
        "d=51": _datainf_vs_exact_gn(mlp, ["last"], 0.1),
        "d=51, damping_scale=1": _datainf_vs_exact_gn(mlp, ["last"], 1.0),
        "layers 80+51": _datainf_vs_exact_gn(mlp, None, 0.1),
    }
    print(f"\nDataInf vs exact per-layer damped GN influence, Spearman (mean, min over 6 queries): {figures}")
    assert figures["d=6"][0] >= 0.8 and figures["d=6"][1] >= 0.7
    assert figures["d=51"][0] < figures["d=6"][0] - 0.3  # the error grows with the layer size
    # the metadata warning's threshold (datainf.SWAP_WARN_LAYER_SIZE) sits between the good d = 6 and the
    # already poor d = 9
    assert figures["d=9"][0] < figures["d=6"][0] - 0.3
    assert 6 <= SWAP_WARN_LAYER_SIZE < 9
    assert figures["d=51, damping_scale=1"][0] > figures["d=51"][0]  # more damping, smaller swap error
    assert figures["layers 80+51"][0] >= 0.3


def test_datainf_on_lora_adapters_error_grows_with_the_rank():
    """ESTIMATORS.md 2.15's LoRA toy: a linear base pretrained on one task, a rank-r LoRA adapter
    fine-tuned on another (lora_mlp without hidden layers: DataInf layers A, r x 8, and B, 3 x r).
    DataInf vs exact per-layer damped GN influence at the same lambda_l, for r = 1, 2, 4, 8."""
    xa, ya = _blobs(400, 10, d=8)
    base = init_model("linear", {"in_features": 8, "num_classes": 3}, 0).double()
    pretrained = train(
        base, CLS, xa, ya, Recipe(learning_rate=0.2, epochs=20, batch_size=32, num_checkpoints=0)
    )
    x, y = _blobs(200, 0, d=8)
    qx, qy = _blobs(20, 1, d=8)
    figures = {}
    for damping_scale in (0.1, 1.0):
        for rank in (1, 2, 4, 8):
            model = init_model(
                "lora_mlp", {"in_features": 8, "hidden": [], "num_classes": 3, "rank": rank}, 0
            )
            model = model.double()
            model.load_state_dict(pretrained.weights, strict=False)
            recipe = Recipe(
                learning_rate=0.1, epochs=30, batch_size=16, weight_decay=MLP_WD, num_checkpoints=0
            )
            res = train(model, CLS, x, y, recipe)
            prob = _problem(model, CLS, res.weights, x, y, qx, qy, MLP_WD)
            figures[(damping_scale, rank)] = _datainf_vs_exact_gn(prob, None, damping_scale)
    print(f"\nDataInf vs exact damped GN on LoRA adapters, Spearman (mean, min over 20 queries): {figures}")
    for ds in (0.1, 1.0):
        mean = [figures[(ds, r)][0] for r in (1, 2, 4, 8)]
        assert mean[0] > mean[1] > mean[2] and mean[3] < mean[1]  # the swap error grows with the rank
        assert mean[0] - mean[3] >= 0.15
    assert all(figures[(1.0, r)][0] > figures[(0.1, r)][0] for r in (1, 2, 4, 8))  # damping shrinks it


# ----------------------------------------------------------------------------- relatif


def test_relatif_identity_hessian():
    """With H^-1 = I (a hand-made state): l-relative = theta-relative = g'.g_i / ||g_i||."""
    x, y = _blobs(20, 3)
    qx, qy = _blobs(3, 4)
    model = init_model("mlp", MLP, 0).double()
    prob = _problem(model, CLS, model.state_dict(), x, y, qx, qy, 0.0)
    G, Q = _train_grads(prob), _query_grads(prob)
    p = G.shape[1]
    expected = (Q @ G.T / G.norm(dim=1)).numpy()
    est = get_estimator("relatif")
    states = {
        "arnoldi": TrainState(
            {"eigenvalues": torch.ones(p, dtype=torch.float64), "eigenvectors": torch.eye(p)}
        ),
        "exact": TrainState({"cholesky": torch.eye(p, dtype=torch.float64)}),
    }
    for inverse, state in states.items():
        for variant in ("l", "theta"):
            params = {"inverse": inverse, "variant": variant, "damping": 0.0}
            out = est.attribute(prob, params, want_self_influence=True, runtime=F64, state=state)
            np.testing.assert_allclose(out.scores, expected, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(out.self_influence, G.norm(dim=1).numpy(), rtol=1e-10)
            assert out.metadata["variant"] == variant and out.metadata["inverse"] == inverse


def test_relatif_invariant_to_scaling_a_training_gradient():
    """Linear regression: changing y_i so its residual is multiplied by c multiplies g_i by c and leaves H
    unchanged; RelatIF's column i stays, IF's column i scales by c."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        30, generator=g, dtype=torch.float64
    )
    model = init_model("linear", {"in_features": 3, "num_classes": 1}, 0).double()
    w = {k: v.clone() for k, v in model.state_dict().items()}
    w["1.weight"] = torch.tensor([[0.9, -1.8, 0.4]], dtype=torch.float64)
    w["1.bias"] = torch.tensor([0.1], dtype=torch.float64)
    qx, qy = x[:4] + 0.5, y[:4]
    base = _problem(model, REG, w, x, y, qx, qy, 1e-2)
    fx = (x @ w["1.weight"][0] + w["1.bias"]).detach()
    for c in (3.0, 0.25):
        y2 = y.clone()
        y2[7] = fx[7] - c * (fx[7] - y[7])
        scaled = _problem(model, REG, w, x, y2, qx, qy, 1e-2)
        for variant in ("l", "theta"):
            a = get_estimator("relatif").attribute(base, {"variant": variant}, runtime=F64)
            b = get_estimator("relatif").attribute(scaled, {"variant": variant}, runtime=F64)
            np.testing.assert_allclose(b.scores, a.scores, rtol=1e-9, atol=1e-12)
        ia = get_estimator("if_exact").attribute(base, {"damping": 0.001}, runtime=F64)
        ib = get_estimator("if_exact").attribute(scaled, {"damping": 0.001}, runtime=F64)
        np.testing.assert_allclose(ib.scores[:, 7], c * ia.scores[:, 7], rtol=1e-9)
        np.testing.assert_allclose(np.delete(ib.scores, 7, 1), np.delete(ia.scores, 7, 1), rtol=1e-9)


def test_relatif_equals_naive_formula(mlp):
    damping = MLP_DAMPING
    names = trainable_names(mlp.model)
    H = objective_hessian(mlp.model, mlp.weights, mlp.train_x, mlp.train_y, CLS, MLP_WD)
    Hinv = torch.linalg.inv(H + damping * torch.eye(H.shape[0], dtype=H.dtype))
    G, Q = _train_grads(mlp, names), _query_grads(mlp, names)
    num = Q @ Hinv @ G.T
    quad = ((G @ Hinv) * G).sum(1)
    expected = {"l": num / quad.sqrt(), "theta": num / (G @ Hinv).norm(dim=1)}
    expected_self = {"l": quad.sqrt(), "theta": quad / (G @ Hinv).norm(dim=1)}
    est = get_estimator("relatif")
    for inverse, extra in (("exact", {}), ("arnoldi", {"rank": 131, "n_iter": 131})):
        base = {"inverse": inverse, "damping": damping, **extra}
        state = est.fit(mlp, base, F64)
        for variant in ("l", "theta"):
            out = est.attribute(
                mlp, {**base, "variant": variant}, want_self_influence=True, runtime=F64, state=state
            )
            np.testing.assert_allclose(out.scores, expected[variant].numpy(), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(out.self_influence, expected_self[variant].numpy(), rtol=1e-6)
    with pytest.raises(EstimatorError) as e:
        est.check(ProblemSize(10, 1, 10_000, 0), est.Params())
    assert e.value.parameter == "/method/params/inverse"
    est.check(ProblemSize(10, 1, 10_000, 0), est.Params(inverse="arnoldi"))


# ----------------------------------------------------------------------------- all new estimators


def test_new_estimators_registered_with_params():
    pydantic = pytest.importorskip("pydantic")
    for name in NEW:
        est = REGISTRY[name]
        assert est.summary and est.Params.__doc__ and est.supports_self_influence
        ta = pydantic.TypeAdapter(est.Params)
        ta.json_schema()
        ta.validate_python({})
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(REGISTRY["if_cg"].Params).validate_python({"hessian_rows": 0})
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(REGISTRY["if_lissa"].Params).validate_python({"scale": 0})
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(REGISTRY["relatif"].Params).validate_python({"variant": "x"})
    defaults = {
        "if_cg": {"damping": 0.001, "max_iter": 100, "rtol": 1e-8, "hessian_rows": None},
        "if_lissa": {
            "damping": 0.001,
            "scale": 10.0,
            "depth": 1000,
            "repeats": 1,
            "batch_size": 32,
            "seed": 0,
        },
        "if_arnoldi": {"rank": 50, "n_iter": None, "damping": 0.0, "seed": 0, "hessian_rows": None},
        "datainf": {"damping_scale": 0.1, "layers": None},
    }
    for name, d in defaults.items():
        assert {k: getattr(REGISTRY[name].Params(), k) for k in d} == d


@pytest.mark.parametrize("name", NEW)
def test_train_range_shards_concatenate(logreg, name):
    prob, H = logreg
    params = _lr_params(H)[name]
    if name == "if_lissa":
        params = {**params, "depth": 10}
    est = get_estimator(name)
    rt = Runtime(dtype=torch.float64, chunk_size=64)
    state = est.fit(prob, params, rt)
    full = est.attribute(prob, params, want_self_influence=True, runtime=rt, state=state)
    parts = [
        est.attribute(prob, params, want_self_influence=True, runtime=rt, state=state, train_range=r)
        for r in ((0, 70), (70, 71), (71, 200))
    ]
    assert parts[0].scores.shape == (4, 70) and parts[1].self_influence.shape == (1,)
    np.testing.assert_allclose(
        np.concatenate([p.scores for p in parts], 1), full.scores, rtol=1e-9, atol=1e-15
    )
    np.testing.assert_allclose(
        np.concatenate([p.self_influence for p in parts]), full.self_influence, rtol=1e-9, atol=1e-15
    )
    only_self = est.attribute(
        prob, params, want_scores=False, want_self_influence=True, runtime=rt, state=state
    )
    assert only_self.scores is None
    np.testing.assert_allclose(only_self.self_influence, full.self_influence, rtol=1e-9)
    empty = est.attribute(prob, params, want_self_influence=True, runtime=rt, state=state, train_range=(5, 5))
    assert empty.scores.shape == (4, 0) and empty.self_influence.shape == (0,)
    with pytest.raises(EstimatorError) as e:
        est.attribute(prob, params, runtime=rt, state=state, train_range=(0, 201))
    assert e.value.parameter == "/train_range"


@pytest.mark.parametrize("name", NEW)
def test_shuffling_training_set_permutes_columns(logreg, name):
    prob, H = logreg
    params = _lr_params(H)[name]
    if name == "if_lissa":
        params = {**params, "repeats": 5}
    perm = torch.randperm(prob.n_train, generator=torch.Generator().manual_seed(5))
    shuffled = InfluenceProblem(
        **{**prob.__dict__, "train_x": prob.train_x[perm], "train_y": prob.train_y[perm]}
    )
    rt = Runtime(dtype=torch.float64, chunk_size=64)
    a = get_estimator(name).attribute(prob, params, want_self_influence=name != "if_lissa", runtime=rt)
    b = get_estimator(name).attribute(shuffled, params, want_self_influence=name != "if_lissa", runtime=rt)
    if name == "if_lissa":
        # LiSSA's mini-batches are drawn by row index, so a shuffle changes the random estimate (by about
        # its accuracy, a few %): the columns must still follow the permutation
        same = np.corrcoef(b.scores.ravel(), a.scores[:, perm.numpy()].ravel())[0, 1]
        unpermuted = np.corrcoef(b.scores.ravel(), a.scores.ravel())[0, 1]
        print(f"\nif_lissa after a shuffle: correlation {same:.4f} permuted, {unpermuted:.3f} unpermuted")
        assert same > 0.99 and abs(unpermuted) < 0.5
        return
    np.testing.assert_allclose(b.scores, a.scores[:, perm.numpy()], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(b.self_influence, a.self_influence[perm.numpy()], rtol=1e-7, atol=1e-12)


def test_float32_runtime(logreg):
    prob, H = logreg
    for name in NEW:
        params = _lr_params(H)[name]
        if name == "if_lissa":
            params = {**params, "depth": 10}
        cheap = name not in ("if_cg", "if_lissa")  # their self-influence is one solve per chunk
        a = get_estimator(name).attribute(
            prob, params, want_self_influence=cheap, runtime=Runtime(chunk_size=64)
        )
        b = get_estimator(name).attribute(prob, params, want_self_influence=cheap, runtime=F64)
        assert a.scores.dtype == np.float32 and (not cheap or a.self_influence.dtype == np.float32)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3, atol=1e-4 * np.abs(b.scores).max())


def _retrain(prob, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Damped Newton from the full-data optimum on the kept rows (mean over them + weight decay)."""
    names = trainable_names(prob.model)
    shapes = [prob.weights[k].shape for k in names]
    x, y = prob.train_x[keep], prob.train_y[keep]

    def state(theta):
        return {**prob.weights, **{k: v.clone() for k, v in unflatten(theta, names, shapes).items()}}

    theta = flatten(prob.weights, names).clone()
    for _ in range(30):
        f0, g = objective_value_and_gradient(prob.model, state(theta), x, y, CLS, LR_WD)
        if float(g.norm()) < 1e-11:
            return state(theta)
        H = objective_hessian(prob.model, state(theta), x, y, CLS, LR_WD)
        step, t = torch.linalg.solve(H, g), 1.0
        while (
            t > 1e-8
            and objective_value_and_gradient(prob.model, state(theta - t * step), x, y, CLS, LR_WD)[0] > f0
        ):
            t /= 2
        theta = theta - t * step
    raise AssertionError("Newton did not converge")


def _query_losses(prob, weights) -> torch.Tensor:
    out = torch.func.functional_call(prob.model, weights, (prob.query_x,))
    return per_example_loss(out, prob.query_y, CLS)


def test_sign_convention_by_leave_k_out_retraining(logreg):
    """Removing a query's top-k proponents (k = 5% of n) raises its loss, and more than removing k random
    points; every new estimator agrees in sign with if_exact on the entries that matter."""
    prob, H = logreg
    n, k = prob.n_train, 10
    base = _query_losses(prob, prob.weights)
    rng = np.random.default_rng(0)
    random_rise = []
    for _ in range(3):
        drop = rng.choice(n, k, replace=False)
        keep = torch.tensor(np.setdiff1d(np.arange(n), drop))
        random_rise.append((_query_losses(prob, _retrain(prob, keep)) - base).numpy())
    random_rise = np.mean(random_rise, 0)
    exact = get_estimator("if_exact").attribute(prob, {"damping": 0.0}, runtime=F64).scores
    big = np.abs(exact) >= np.quantile(np.abs(exact), 0.5, axis=1, keepdims=True)
    cache: dict[tuple, np.ndarray] = {}
    report = {}
    for name in NEW:
        scores = get_estimator(name).attribute(prob, _lr_params(H)[name], runtime=F64).scores
        agreement = float((np.sign(scores[big]) == np.sign(exact[big])).mean())
        rises = []
        for j in range(prob.n_query):
            top = tuple(sorted(np.argsort(-scores[j])[:k].tolist()))
            if top not in cache:
                keep = torch.tensor(np.setdiff1d(np.arange(n), top))
                cache[top] = (_query_losses(prob, _retrain(prob, keep)) - base).numpy()
            rises.append(cache[top][j])
        report[name] = (round(agreement, 3), np.round(rises, 4).tolist())
        assert agreement >= (0.9 if name == "datainf" else 0.99), (name, agreement)
        assert all(r > 0 for r in rises), (name, rises)
        assert all(r > rr for r, rr in zip(rises, random_rise, strict=True)), (name, rises, random_rise)
    print(
        f"\nsign agreement with if_exact (top half |score|) and query-loss rise after removing the top-{k} "
        f"proponents: {report}; random removal: {np.round(random_rise, 4).tolist()}"
    )


OTHERS = {
    "grad_dot": {},
    "kfac": {"damping": 1e-3},
    "ekfac": {"damping": 1e-3},
    "logra": {"k_in": 6, "k_out": 2, "projection": "identity", "damping": 1e-3},
    "trak": {"projection": "identity", "use_checkpoints": False},
    "representer": {"l2": LR_WD},
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_sign_convention_of_the_other_scoring_methods_by_retraining(logreg, name):
    """ESTIMATORS.md 3.6 for the estimators not tied to if_exact above: retraining without a query's
    top-k proponents raises its loss, and by more than removing k random points (mean of 3 draws)."""
    prob, _ = logreg
    n, k = prob.n_train, 10
    base = _query_losses(prob, prob.weights)
    rng = np.random.default_rng(0)
    random_rise = np.mean(
        [
            (
                _query_losses(prob, _retrain(prob, torch.tensor(np.setdiff1d(np.arange(n), drop)))) - base
            ).numpy()
            for drop in (rng.choice(n, k, replace=False) for _ in range(3))
        ],
        0,
    )
    scores = get_estimator(name).attribute(prob, OTHERS[name], runtime=F64).scores
    rises = []
    for j in range(prob.n_query):
        keep = torch.tensor(np.setdiff1d(np.arange(n), np.argsort(-scores[j])[:k]))
        rises.append(float((_query_losses(prob, _retrain(prob, keep)) - base)[j]))
    assert all(r > 0 for r in rises), rises
    assert all(r > rr for r, rr in zip(rises, random_rise, strict=True)), (rises, random_rise)


@pytest.mark.parametrize("name,phase", [("if_cg", "cg"), ("if_lissa", "lissa"), ("if_arnoldi", "arnoldi")])
def test_cancel_during_solver(logreg, name, phase):
    prob, H = logreg
    calls = []

    def progress(ph, done, total):
        calls.append((ph, done, total))
        if ph == phase and done == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        get_estimator(name).attribute(
            prob,
            {**_lr_params(H)[name], "max_iter": 50} if name == "if_cg" else _lr_params(H)[name],
            runtime=Runtime(dtype=torch.float64, progress=progress),
        )
    assert calls[-1][:2] == (phase, 2)


def test_nan_weights_raise_numerical_error(logreg):
    prob, H = logreg
    bad = {k: v.clone() for k, v in prob.weights.items()}
    bad["1.weight"][0, 0] = float("nan")
    broken = InfluenceProblem(**{**prob.__dict__, "weights": bad})
    for name in NEW:
        with pytest.raises(NumericalError):
            get_estimator(name).attribute(broken, _lr_params(H)[name], runtime=F64)


@pytest.mark.parametrize(
    "name,params",
    [
        ("if_arnoldi", {"rank": 6, "n_iter": 12}),
        ("datainf", {}),
        ("relatif", {"inverse": "exact"}),
        ("relatif", {"inverse": "arnoldi", "rank": 6, "n_iter": 12}),
    ],
)
def test_train_state_survives_the_service_cache_format(logreg, tmp_path, name, params):
    """Saved as safetensors + JSON info (like app/services/train_state.py), the state gives equal scores."""
    import json

    from safetensors.torch import load_file, save_file

    prob, _ = logreg
    est = get_estimator(name)
    state = est.fit(prob, params, F64)
    path = tmp_path / "state.safetensors"
    save_file({k: v.contiguous() for k, v in state.tensors.items()}, str(path))
    loaded = TrainState(tensors=load_file(str(path)), info=json.loads(json.dumps(state.info)))
    a = est.attribute(prob, params, want_self_influence=True, runtime=F64, state=state)
    b = est.attribute(prob, params, want_self_influence=True, runtime=F64, state=loaded)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.self_influence, b.self_influence)
    if name == "datainf":
        with pytest.raises(EstimatorError) as e:
            est.attribute(
                prob, {"layers": ["1"]}, runtime=F64, state=TrainState(loaded.tensors, {"parameters": []})
            )
        assert e.value.parameter == "/method/params/layers"
