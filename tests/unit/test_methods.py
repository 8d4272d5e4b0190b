"""Estimators against naive formulas, plus sign, orientation, cancellation and failure modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from app.estimators import (
    ORIENTATION,
    REGISTRY,
    SIGN_CONVENTION,
    Cancelled,
    Checkpoint,
    EstimatorError,
    InfluenceProblem,
    NumericalError,
    ProblemSize,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)
from app.estimators.gradients import flatten, trainable_names
from app.estimators.objectives import margin, per_example_loss, query_objective

CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
F64 = Runtime(dtype=torch.float64, chunk_size=7)
# the small MLP is not at a strict minimum: its Hessian needs damping to be positive definite
PARAMS = {"grad_dot": None, "grad_cos": None, "tracincp": None, "if_exact": {"damping": 0.5}}
MLP = {"in_features": 4, "hidden": [6], "num_classes": 3, "activation": "tanh"}


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
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(
            learning_rate=0.2, schedule="cosine", epochs=6, batch_size=8, num_checkpoints=3, weight_decay=1e-3
        ),
    )
    return model, res, x, y, qx, qy


def _problem(trained, **kw):
    model, res, x, y, qx, qy = trained
    base = dict(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x,
        train_y=y,
        query_x=qx,
        query_y=qy,
        checkpoints=res.checkpoints,
        weight_decay=1e-3,
    )
    base.update(kw)
    return InfluenceProblem(**base)


def _naive_grads(model, state, x, y, objective):
    model.load_state_dict(state)
    model.eval()
    params = dict(model.named_parameters())
    names = trainable_names(model)
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        objective(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([params[k].grad.reshape(-1) for k in names]))
    return torch.stack(rows)


def _train_loss(out, t):
    return per_example_loss(out, t, CLS)


def test_registry_contents_and_params():
    assert {"grad_dot", "grad_cos", "tracincp", "if_exact"} <= set(REGISTRY)
    for est in REGISTRY.values():
        assert dataclasses.is_dataclass(est.Params) and est.Params.__doc__ and est.summary
        est.Params()
    assert REGISTRY["tracincp"].needs_checkpoints and not REGISTRY["grad_cos"].supports_self_influence


def test_params_validate_with_pydantic():
    pydantic = pytest.importorskip("pydantic")
    from app.estimators import ARCHITECTURES

    for cls in [e.Params for e in REGISTRY.values()] + [a.Params for a in ARCHITECTURES.values()] + [Recipe]:
        ta = pydantic.TypeAdapter(cls)
        ta.json_schema()
        assert isinstance(ta.validate_python({}), cls)
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(REGISTRY["if_exact"].Params).validate_python({"damping": -1})
    with pytest.raises(pydantic.ValidationError):
        pydantic.TypeAdapter(Recipe).validate_python({"optimizer": "rmsprop"})


def test_tracincp_single_checkpoint_lr1_equals_grad_dot(trained):
    prob = _problem(trained, checkpoints=[Checkpoint(step=1, learning_rate=1.0, state=trained[1].weights)])
    rt = Runtime(chunk_size=7)  # float32
    a = get_estimator("tracincp").attribute(prob, None, want_self_influence=True, runtime=rt)
    b = get_estimator("grad_dot").attribute(prob, None, want_self_influence=True, runtime=rt)
    assert a.scores.shape == (5, 30) and a.scores.dtype == np.float32
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5 * np.abs(b.scores).max())
    np.testing.assert_allclose(a.self_influence, b.self_influence, rtol=1e-5)


def test_tracincp_equals_naive_sum_over_checkpoints(trained):
    model, res, x, y, qx, qy = trained
    assert len(res.checkpoints) == 3
    out = get_estimator("tracincp").attribute(_problem(trained), {}, want_self_influence=True, runtime=F64)
    S = torch.zeros(5, 30, dtype=torch.float64)
    si = torch.zeros(30, dtype=torch.float64)
    for ck in res.checkpoints:
        G = _naive_grads(model, ck.state, x, y, _train_loss)
        Q = _naive_grads(model, ck.state, qx, qy, _train_loss)
        S += ck.learning_rate * Q @ G.T
        si += ck.learning_rate * (G * G).sum(1)
    np.testing.assert_allclose(out.scores, S.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.self_influence, si.numpy(), rtol=1e-9)
    assert out.metadata["learning_rates"] == [ck.learning_rate for ck in res.checkpoints]
    unit = get_estimator("tracincp").attribute(
        _problem(trained), {"use_checkpoint_learning_rates": False}, runtime=F64
    )
    S1 = sum(
        _naive_grads(model, ck.state, qx, qy, _train_loss)
        @ _naive_grads(model, ck.state, x, y, _train_loss).T
        for ck in res.checkpoints
    )
    np.testing.assert_allclose(unit.scores, S1.numpy(), rtol=1e-9, atol=1e-12)


def test_grad_dot_metadata_and_self_influence(trained):
    model, res, x, y, qx, qy = trained
    out = get_estimator("grad_dot").attribute(_problem(trained), None, want_self_influence=True, runtime=F64)
    G = _naive_grads(model, res.weights, x, y, _train_loss)
    np.testing.assert_allclose(out.self_influence, (G * G).sum(1).numpy(), rtol=1e-10)
    md = out.metadata
    assert md["method"] == "grad_dot" and md["measurement"] == "loss"
    assert md["sign_convention"] == SIGN_CONVENTION and md["orientation"] == ORIENTATION
    only_self = get_estimator("grad_dot").attribute(
        _problem(trained), None, want_scores=False, want_self_influence=True, runtime=F64
    )
    assert only_self.scores is None
    np.testing.assert_allclose(only_self.self_influence, out.self_influence)


def test_grad_cos_equals_naive_cosine(trained):
    model, res, x, y, qx, qy = trained
    out = get_estimator("grad_cos").attribute(_problem(trained), None, runtime=F64)
    G = _naive_grads(model, res.weights, x, y, _train_loss)
    Q = _naive_grads(model, res.weights, qx, qy, _train_loss)
    cos = torch.nn.functional.cosine_similarity(Q[:, None, :], G[None, :, :], dim=-1)
    np.testing.assert_allclose(out.scores, cos.numpy(), rtol=1e-9, atol=1e-12)
    assert out.self_influence is None
    with pytest.raises(EstimatorError):
        get_estimator("grad_cos").attribute(_problem(trained), None, want_self_influence=True, runtime=F64)


def test_margin_measurement_sign(trained):
    model, res, x, y, qx, qy = trained
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    expected = torch.stack([2.0 - torch.logsumexp(logits[0, 1:], 0), 1.0 - torch.logsumexp(logits[1, :2], 0)])
    torch.testing.assert_close(margin(logits, labels), expected)
    torch.testing.assert_close(query_objective(logits, labels, CLS, "margin"), -expected)
    two = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(margin(two, torch.tensor([1])), torch.tensor([-2.0], dtype=torch.float64))

    out = get_estimator("grad_dot").attribute(_problem(trained, measurement="margin"), None, runtime=F64)
    G = _naive_grads(model, res.weights, x, y, _train_loss)
    Qm = _naive_grads(model, res.weights, qx, qy, lambda o, t: margin(o, t))  # gradient of +margin
    np.testing.assert_allclose(out.scores, (-(Qm @ G.T)).numpy(), rtol=1e-9, atol=1e-12)
    assert out.metadata["measurement"] == "margin"


def test_margin_on_regression_is_refused():
    model = init_model("linear", {"in_features": 2, "num_classes": 1}, 0)
    x = torch.randn(4, 2)
    prob = InfluenceProblem(
        model=model,
        task=REG,
        weights=model.state_dict(),
        train_x=x,
        train_y=torch.randn(4),
        query_x=x,
        query_y=torch.randn(4),
        measurement="margin",
    )
    with pytest.raises(EstimatorError) as e:
        get_estimator("grad_dot").attribute(prob, None)
    assert e.value.parameter == "/measurement"


def test_cancelled_from_progress_stops_the_method(trained):
    calls = []

    def progress(phase, done, total):
        calls.append((phase, done, total))
        if phase == "train_gradients" and done == 2:
            raise Cancelled()

    rt = Runtime(dtype=torch.float64, chunk_size=7, progress=progress)
    for name in ("grad_dot", "tracincp", "if_exact"):
        calls.clear()
        with pytest.raises(Cancelled):
            get_estimator(name).attribute(_problem(trained), PARAMS[name], runtime=rt)
        assert calls[-1][0] == "train_gradients" and calls[-1][1] == 2


def test_progress_units(trained):
    calls = []
    rt = Runtime(dtype=torch.float64, chunk_size=7, progress=lambda *a: calls.append(a))
    get_estimator("tracincp").attribute(_problem(trained), None, runtime=rt)
    train_calls = [c for c in calls if c[0] == "train_gradients"]
    assert train_calls[0] == ("train_gradients", 0, 15)  # 3 checkpoints x ceil(30/7) chunks
    assert train_calls[-1] == ("train_gradients", 15, 15) and len(train_calls) == 16
    assert [c for c in calls if c[0] == "query_gradients"][-1] == ("query_gradients", 3, 3)


def test_nan_weights_raise_numerical_error(trained):
    bad = {k: v.clone() for k, v in trained[1].weights.items()}
    bad[trainable_names(trained[0])[0]][0, 0] = float("nan")
    for name in ("grad_dot", "grad_cos", "if_exact"):
        with pytest.raises(NumericalError):
            get_estimator(name).attribute(_problem(trained, weights=bad), None, runtime=F64)
    ck = [Checkpoint(step=1, learning_rate=0.1, state=bad)]
    with pytest.raises(NumericalError):
        get_estimator("tracincp").attribute(_problem(trained, checkpoints=ck), None, runtime=F64)


def test_tracincp_needs_checkpoints(trained):
    est = get_estimator("tracincp")
    with pytest.raises(EstimatorError) as e:
        est.attribute(_problem(trained, checkpoints=[]), None)
    assert e.value.parameter == "/checkpoint_ids"
    with pytest.raises(EstimatorError):
        est.check(ProblemSize(n_train=10, n_query=1, n_parameters=10, n_checkpoints=0), est.Params())


@pytest.mark.parametrize("name", ["grad_dot", "tracincp", "if_exact"])
def test_shuffling_training_set_permutes_columns(trained, name):
    model, res, x, y, qx, qy = trained
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(5))
    a = get_estimator(name).attribute(_problem(trained), PARAMS[name], want_self_influence=True, runtime=F64)
    b = get_estimator(name).attribute(
        _problem(trained, train_x=x[perm], train_y=y[perm]),
        PARAMS[name],
        want_self_influence=True,
        runtime=F64,
    )
    np.testing.assert_allclose(b.scores, a.scores[:, perm.numpy()], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(b.self_influence, a.self_influence[perm.numpy()], rtol=1e-8, atol=1e-12)


def test_if_exact_equals_naive_formula(trained):
    model, res, x, y, qx, qy = trained
    wd, damping = 1e-3, 0.5
    out = get_estimator("if_exact").attribute(
        _problem(trained), {"damping": damping}, want_self_influence=True, runtime=F64
    )
    names = trainable_names(model)
    shapes = [res.weights[k].shape for k in names]

    def objective(flat):
        p, off = {}, 0
        for k, s in zip(names, shapes, strict=True):
            p[k] = flat[off : off + s.numel()].view(s)
            off += s.numel()
        return _train_loss(torch.func.functional_call(model, p, (x,)), y).mean() + 0.5 * wd * flat.dot(flat)

    model.eval()
    theta = flatten(res.weights, names)
    H = torch.autograd.functional.hessian(objective, theta) + damping * torch.eye(
        len(theta), dtype=theta.dtype
    )
    G = _naive_grads(model, res.weights, x, y, _train_loss)
    Q = _naive_grads(model, res.weights, qx, qy, _train_loss)
    Hinv = torch.linalg.inv(H)
    np.testing.assert_allclose(out.scores, (Q @ Hinv @ G.T / 30).numpy(), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(out.self_influence, (((G @ Hinv) * G).sum(1) / 30).numpy(), rtol=1e-7)
    assert out.metadata["normalisation"] == "1/n" and out.metadata["damping"] == damping
    assert out.metadata["objective_grad_norm"] >= 0


def test_if_exact_non_pd_hessian_names_damping():
    x, y = _data(10, 3)
    model = init_model("mlp", {"in_features": 4, "hidden": [16], "num_classes": 3}, 0).double()
    res = train(model, CLS, x, y, Recipe(learning_rate=0.1, epochs=3, batch_size=5))
    prob = InfluenceProblem(
        model=model,
        task=CLS,
        weights=res.weights,
        train_x=x,
        train_y=y,
        query_x=x[:2],
        query_y=y[:2],
        weight_decay=0.0,
    )
    with pytest.raises(NumericalError) as e:
        get_estimator("if_exact").attribute(prob, {"damping": 0.0}, runtime=F64)
    assert e.value.parameter == "/method/params/damping"
    assert "damping" in e.value.detail and "positive definite" in e.value.detail


def test_if_exact_check_refuses_too_many_parameters():
    est = get_estimator("if_exact")
    size = ProblemSize(n_train=100, n_query=1, n_parameters=6_573_130, n_checkpoints=0)
    with pytest.raises(EstimatorError) as e:
        est.check(size, est.Params())
    assert e.value.parameter == "/method/name" and "6573130" in e.value.detail
    est.check(size, est.Params(max_parameters=10_000_000))
    model = init_model("mlp", {"in_features": 4, "hidden": [64, 64], "num_classes": 3}, 0)
    prob = InfluenceProblem(
        model=model,
        task=CLS,
        weights=model.state_dict(),
        train_x=torch.randn(3, 4),
        train_y=torch.zeros(3, dtype=torch.long),
        query_x=torch.randn(1, 4),
        query_y=torch.zeros(1, dtype=torch.long),
    )
    with pytest.raises(EstimatorError) as e:
        est.attribute(prob, {"max_parameters": 1000})
    assert e.value.parameter == "/method/name"


def test_tracin_step_score_is_the_query_loss_drop_of_that_sgd_step():
    """ESTIMATORS.md 2.23, TracIn's definition: with batch-size-1 SGD at a small learning rate, the
    TracInCP score of z_i at the checkpoint before the step that trained on z_i (learning rate eta)
    equals the query-loss drop that step caused, to first order in eta (here within 1%)."""
    x, y = _data(40, 3, d=4, k=3)
    qx, qy = _data(3, 4, d=4, k=3)
    model = init_model("linear", {"in_features": 4, "num_classes": 3}, 0).double()
    names = trainable_names(model)
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    eta = 1e-3

    def query_loss(state):
        return per_example_loss(torch.func.functional_call(model, state, (qx,)), qy, CLS)

    checked = 0
    for i in np.random.default_rng(0).permutation(40)[:12]:
        before = {k: v.clone() for k, v in theta.items()}
        params = {k: before[k].clone().requires_grad_(True) for k in names}
        loss = per_example_loss(torch.func.functional_call(model, params, (x[i : i + 1],)), y[i : i + 1], CLS)
        grads = torch.autograd.grad(loss.sum(), [params[k] for k in names])
        theta = {**before, **{k: before[k] - eta * g for k, g in zip(names, grads, strict=True)}}
        drop = (query_loss(before) - query_loss(theta)).numpy()
        prob = InfluenceProblem(
            model=model, task=CLS, weights=theta, train_x=x, train_y=y, query_x=qx, query_y=qy,
            checkpoints=[Checkpoint(step=0, learning_rate=eta, state=before)],
        )  # fmt: skip
        score = get_estimator("tracincp").attribute(prob, {}, runtime=F64).scores[:, i]
        np.testing.assert_allclose(score, drop, rtol=1e-2)
        checked += int(np.all(np.abs(drop) > 1e-7))
    assert checked >= 10  # the drops are not all vanishing
