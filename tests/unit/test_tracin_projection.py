"""TracIn-RP, GAS and layer selection in ``tracincp``; cached train state and shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.estimators import (
    Checkpoint,
    EstimatorError,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)
from app.estimators.gradients import n_parameters, per_sample_gradients, select_parameters
from app.estimators.objectives import per_example_loss

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
F64 = Runtime(dtype=torch.float64, chunk_size=16)
MLP = {"in_features": 16, "hidden": [128], "num_classes": 3, "activation": "tanh"}  # p = 2563


def _data(n, seed, d=16, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(k, d, generator=g, dtype=torch.float64)[y] + torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return x, y


@pytest.fixture(scope="module")
def trained():
    x, y = _data(48, 0)
    qx, qy = _data(8, 1)
    model = init_model("mlp", MLP, 0).double()
    recipe = Recipe(learning_rate=0.1, epochs=4, batch_size=12, num_checkpoints=2, weight_decay=1e-3)
    res = train(model, CLS, x, y, recipe)
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


def _grads(model, state, x, y, objective, names=None):
    return torch.cat([G for _, _, G in per_sample_gradients(model, state, x, y, objective, names=names)])


def _loss(out, t):
    return per_example_loss(out, t, CLS)


def test_projected_scores_track_exact_scores(trained):
    model = trained[0]
    assert n_parameters(model) == 2563
    est = get_estimator("tracincp")
    exact = est.attribute(_problem(trained), None, want_self_influence=True, runtime=F64)
    proj = est.attribute(_problem(trained), {"projection_dim": 1024}, want_self_influence=True, runtime=F64)
    r = np.corrcoef(exact.scores.ravel(), proj.scores.ravel())[0, 1]
    r_self = np.corrcoef(exact.self_influence, proj.self_influence)[0, 1]
    print(f"TracIn-RP (rademacher, k=1024, p=2563): Pearson scores {r:.4f}, self-influence {r_self:.4f}")
    assert r >= 0.95 and r_self >= 0.95
    assert proj.metadata["projection"]["k"] == 1024 and proj.metadata["projection"]["kind"] == "rademacher"
    for kind in ("gaussian", "srht", "countsketch"):
        other = est.attribute(_problem(trained), {"projection_dim": 1024, "projection": kind}, runtime=F64)
        r = np.corrcoef(exact.scores.ravel(), other.scores.ravel())[0, 1]
        print(f"TracIn-RP ({kind}, k=1024): Pearson {r:.4f}")
        assert r >= 0.95
    # projection_dim >= p means no projection
    capped = est.attribute(_problem(trained), {"projection_dim": 10_000}, runtime=F64)
    np.testing.assert_allclose(capped.scores, exact.scores, rtol=1e-12)


def test_fit_state_is_reused_and_shards_concatenate(trained):
    est = get_estimator("tracincp")
    params = {"projection_dim": 64, "seed": 3}
    assert est.fit(_problem(trained), None, F64) is None
    state = est.fit(_problem(trained), params, F64)
    assert sorted(state.tensors) == ["train_features_0", "train_features_1"]
    assert state.tensors["train_features_0"].shape == (48, 64)
    calls = []
    rt = Runtime(dtype=torch.float64, chunk_size=16, progress=lambda *a: calls.append(a))
    full = est.attribute(_problem(trained), params, want_self_influence=True, runtime=F64)
    reused = est.attribute(_problem(trained), params, want_self_influence=True, runtime=rt, state=state)
    np.testing.assert_allclose(reused.scores, full.scores, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(reused.self_influence, full.self_influence, rtol=1e-12)
    assert not [c for c in calls if c[0] == "train_gradients"]  # no training-gradient pass
    for st in (None, state):
        parts = [
            est.attribute(
                _problem(trained), params, want_self_influence=True, runtime=F64, state=st, train_range=r
            )
            for r in [(0, 20), (20, 21), (21, 48)]
        ]
        np.testing.assert_allclose(np.concatenate([a.scores for a in parts], 1), full.scores, rtol=1e-12)
        np.testing.assert_allclose(np.concatenate([a.self_influence for a in parts]), full.self_influence)
    # checkpoint-additive: a job sharded by checkpoint sums to the whole
    ckpts = trained[1].checkpoints
    per_ck = [est.attribute(_problem(trained, checkpoints=[ck]), params, runtime=F64).scores for ck in ckpts]
    np.testing.assert_allclose(sum(per_ck), full.scores, rtol=1e-10, atol=1e-14)
    assert est.checkpoint_additive
    # ... also when each checkpoint shard reuses the state fitted on all checkpoints (as the service does)
    for ck, expected in zip(ckpts, per_ck, strict=True):
        got = est.attribute(_problem(trained, checkpoints=[ck]), params, runtime=F64, state=state)
        np.testing.assert_allclose(got.scores, expected, rtol=1e-12)
    with pytest.raises(EstimatorError):
        est.attribute(
            _problem(trained, train_x=trained[2][:10], train_y=trained[3][:10]), params, state=state
        )
    stranger = Checkpoint(step=999, learning_rate=0.1, state=ckpts[0].state)
    with pytest.raises(EstimatorError) as e:
        est.attribute(_problem(trained, checkpoints=[stranger]), params, runtime=F64, state=state)
    assert e.value.parameter == "/checkpoint_ids"


def test_gas_equals_cosine_with_one_checkpoint(trained):
    model, res, x, y, qx, qy = trained
    one = [Checkpoint(step=1, learning_rate=1.0, state=res.weights)]
    gas = get_estimator("tracincp").attribute(
        _problem(trained, checkpoints=one), {"normalize": "cosine"}, runtime=F64
    )
    G, Q = _grads(model, res.weights, x, y, _loss), _grads(model, res.weights, qx, qy, _loss)
    cos = torch.nn.functional.cosine_similarity(Q[:, None, :], G[None, :, :], dim=-1)
    np.testing.assert_allclose(gas.scores, cos.numpy(), rtol=1e-10, atol=1e-12)
    grad_cos = get_estimator("grad_cos").attribute(_problem(trained), None, runtime=F64)
    np.testing.assert_allclose(gas.scores, grad_cos.scores, rtol=1e-10, atol=1e-12)
    with pytest.raises(EstimatorError) as e:
        get_estimator("tracincp").attribute(
            _problem(trained), {"normalize": "cosine"}, want_self_influence=True, runtime=F64
        )
    assert e.value.parameter == "/method/params/normalize"
    # with several checkpoints: sum_t eta_t cos_t
    multi = get_estimator("tracincp").attribute(_problem(trained), {"normalize": "cosine"}, runtime=F64)
    expected = 0
    for ck in res.checkpoints:
        Gt, Qt = _grads(model, ck.state, x, y, _loss), _grads(model, ck.state, qx, qy, _loss)
        expected = expected + ck.learning_rate * torch.nn.functional.cosine_similarity(
            Qt[:, None, :], Gt[None, :, :], dim=-1
        )
    np.testing.assert_allclose(multi.scores, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_gas_is_invariant_to_rescaling_either_gradient():
    """Linear regression: moving a target so the residual scales by c scales that gradient by c."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    qx, qy = x[:3] + 0.1, torch.randn(3, generator=g, dtype=torch.float64)
    model = init_model("linear", {"in_features": 3, "num_classes": 1}, 0).double()
    w = {k: v.clone() for k, v in model.state_dict().items()}
    pred = lambda t: (t @ w["1.weight"].T)[:, 0] + w["1.bias"]  # noqa: E731
    c_train = torch.linspace(0.2, 5.0, 12, dtype=torch.float64)
    c_query = torch.tensor([3.0, 0.5, 7.0], dtype=torch.float64)
    y2 = pred(x) - c_train * (pred(x) - y)
    qy2 = pred(qx) - c_query * (pred(qx) - qy)
    ck = [Checkpoint(step=1, learning_rate=1.0, state=w)]

    def run(ty, tqy, params):
        prob = InfluenceProblem(
            model=model, task=REG, weights=w, train_x=x, train_y=ty, query_x=qx, query_y=tqy, checkpoints=ck
        )
        return get_estimator("tracincp").attribute(prob, params, runtime=F64).scores

    for params in (
        {"normalize": "cosine"},
        {"normalize": "cosine", "projection_dim": 3, "projection": "gaussian"},
    ):
        np.testing.assert_allclose(run(y2, qy2, params), run(y, qy, params), rtol=1e-10, atol=1e-12)
    dot, dot2 = run(y, qy, None), run(y2, qy2, None)
    np.testing.assert_allclose(dot2, dot * c_query.numpy()[:, None] * c_train.numpy()[None, :], rtol=1e-10)


def test_last_layer_equals_explicit_gradient_dot_and_factorisation(trained):
    model, res, x, y, qx, qy = trained
    ck = res.checkpoints[-1]
    prob = _problem(trained, checkpoints=[ck])
    out = get_estimator("tracincp").attribute(
        prob, {"layers": ["last"]}, want_self_influence=True, runtime=F64
    )
    names = select_parameters(model, ["last"])
    assert names == ["3.weight", "3.bias"]
    G, Q = _grads(model, ck.state, x, y, _loss, names), _grads(model, ck.state, qx, qy, _loss, names)
    eta = ck.learning_rate
    np.testing.assert_allclose(out.scores, (eta * Q @ G.T).numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out.self_influence, (eta * (G * G).sum(1)).numpy(), rtol=1e-10)
    # the fast factorisation (delta.delta')(a.a' + 1): a = hidden activations, delta = softmax - onehot
    model.load_state_dict(ck.state)
    model.eval()
    with torch.no_grad():
        a, aq = model[:3](x), model[:3](qx)
        d = torch.softmax(model[3](a), 1) - torch.nn.functional.one_hot(y, 3)
        dq = torch.softmax(model[3](aq), 1) - torch.nn.functional.one_hot(qy, 3)
    fast = eta * (dq @ d.T) * (aq @ a.T + 1)
    np.testing.assert_allclose(out.scores, fast.numpy(), rtol=1e-10, atol=1e-14)
    assert out.metadata["n_selected_parameters"] == 128 * 3 + 3
    with pytest.raises(EstimatorError) as e:
        get_estimator("tracincp").attribute(prob, {"layers": ["nope"]}, runtime=F64)
    assert e.value.parameter == "/method/params/layers"


@pytest.mark.parametrize(
    "params",
    [
        {"projection_dim": 128},
        {"normalize": "cosine", "projection_dim": 128, "projection": "srht"},
        {"layers": ["1"]},
    ],
)
def test_shuffling_permutes_columns(trained, params):
    model, res, x, y, qx, qy = trained
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(5))
    self_inf = params.get("normalize") != "cosine"
    est = get_estimator("tracincp")
    a = est.attribute(_problem(trained), params, want_self_influence=self_inf, runtime=F64)
    b = est.attribute(
        _problem(trained, train_x=x[perm], train_y=y[perm]), params, want_self_influence=self_inf, runtime=F64
    )
    np.testing.assert_allclose(b.scores, a.scores[:, perm.numpy()], rtol=1e-10, atol=1e-13)
    if self_inf:
        np.testing.assert_allclose(b.self_influence, a.self_influence[perm.numpy()], rtol=1e-10)


def test_params_schema():
    pydantic = pytest.importorskip("pydantic")
    ta = pydantic.TypeAdapter(get_estimator("tracincp").Params)
    ok = ta.validate_python(
        {"projection_dim": 256, "projection": "srht", "normalize": "cosine", "layers": ["last"]}
    )
    assert ok.projection_dim == 256 and ok.layers == ["last"]
    for bad in ({"projection_dim": 0}, {"normalize": "l2"}, {"projection": "identity"}, {"seed": -1}):
        with pytest.raises(pydantic.ValidationError):
            ta.validate_python(bad)
