"""SOURCE (ESTIMATORS.md 2.26): EK-FAC spectral functions per checkpoint segment, checked against dense
matrix functions of the exact Gauss-Newton matrix, the EK-FAC influence function in its limit, and the
exact unrolled derivative (magic) of the run it approximates."""

from __future__ import annotations

import dataclasses

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
from app.estimators.gradients import per_sample_gradients, query_objective_fn, train_objective
from app.estimators.methods.source import segments

stats = pytest.importorskip("scipy.stats")

F64 = Runtime(dtype=torch.float64, chunk_size=32)
CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
WD = 1e-2


def _data(n=80, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 4, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n + 4,), generator=g)
    return x[:n], y[:n], x[n:], y[n:]


@pytest.fixture(scope="module")
def logreg():
    """Logistic regression, 5 epochs of SGD (not converged), a checkpoint every epoch."""
    x, y, qx, qy = _data()
    recipe = Recipe(learning_rate=0.1, epochs=5, batch_size=16, weight_decay=WD, num_checkpoints=5)
    model = init_model("linear", {"in_features": 5, "num_classes": 3}, 0).double()
    res = train(model, CLS, x, y, recipe)
    return InfluenceProblem(
        model, CLS, res.weights, x, y, qx, qy, checkpoints=res.checkpoints, weight_decay=WD,
        recipe=dataclasses.asdict(recipe),
    )  # fmt: skip


def test_one_segment_with_a_long_horizon_is_the_ekfac_influence_function(logreg):
    """ESTIMATORS.md 2.26: with L = 1 and eta K -> inf SOURCE reduces to (damped) IF."""
    long = dataclasses.replace(
        logreg, checkpoints=[Checkpoint(step=10**9, learning_rate=1.0, state=logreg.weights)], recipe=None
    )
    for damping in (0.0, 0.05):
        src = get_estimator("source").attribute(
            long, {"damping": damping}, runtime=F64, want_self_influence=True
        )
        ekfac = get_estimator("ekfac").attribute(
            logreg, {"damping": damping}, runtime=F64, want_self_influence=True
        )
        np.testing.assert_allclose(src.scores, ekfac.scores, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(src.self_influence, ekfac.self_influence, rtol=1e-10)


def _flat_grads(prob, state, x, y, objective) -> torch.Tensor:
    return torch.cat(
        [G for _, _, G in per_sample_gradients(prob.model, state, x, y, objective, dtype=torch.float64)]
    )


def test_segments_apply_dense_matrix_functions_of_the_exact_gauss_newton():
    """Linear regression: with fisher='expected' EK-FAC is the exact Gauss-Newton matrix
    (2/n) X~^T X~ + wd I, so SOURCE must equal sum_l (1/n) [r_l(G) S_{l+1}(G) ... S_L(G) g']^T g_il with
    dense eigh functions (G is the same at every checkpoint here; the gradients g_il are not)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        40, generator=g, dtype=torch.float64
    )
    qx, qy = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    recipe = Recipe(learning_rate=0.05, epochs=4, batch_size=8, weight_decay=WD, num_checkpoints=2)
    model = init_model("linear", {"in_features": 4, "num_classes": 1}, 0).double()
    res = train(model, REG, x, y, recipe)
    prob = InfluenceProblem(
        model, REG, res.weights, x, y, qx, qy, checkpoints=res.checkpoints, weight_decay=WD,
        recipe=dataclasses.asdict(recipe),
    )  # fmt: skip
    out = get_estimator("source").attribute(prob, {"fisher": "expected"}, runtime=F64)
    segs, _ = segments(prob, prob.checkpoints)
    xt = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    lam, Qm = torch.linalg.eigh(2 * xt.T @ xt / 40 + WD * torch.eye(5, dtype=torch.float64))
    v = _flat_grads(prob, prob.weights, qx, qy, query_objective_fn(REG, "loss")).T
    expected = torch.zeros(3, 40, dtype=torch.float64)
    for ck, seg in reversed(list(zip(prob.checkpoints, segs, strict=True))):
        horizon = seg.steps * seg.learning_rate
        reach = Qm @ torch.diag(-torch.expm1(-horizon * lam) / lam) @ Qm.T
        G = _flat_grads(prob, ck.state, x, y, train_objective(REG))
        expected += (reach @ v).T @ G.T / 40
        v = Qm @ torch.diag(torch.exp(-horizon * lam)) @ Qm.T @ v
    assert [s.steps for s in segs] == [10, 10]
    np.testing.assert_allclose(
        out.scores, expected.numpy(), rtol=1e-9, atol=1e-12 * expected.abs().max().item()
    )


def test_segments_follow_the_recipe_schedule(logreg):
    segs, source = segments(logreg, logreg.checkpoints)
    assert [s.steps for s in segs] == [5] * 5 and source.startswith("recipe")
    cosine = dataclasses.asdict(
        Recipe(learning_rate=0.1, momentum=0.5, schedule="cosine", epochs=5, batch_size=16)
    )
    segs, _ = segments(dataclasses.replace(logreg, recipe=cosine), logreg.checkpoints)
    np.testing.assert_allclose(
        [s.learning_rate for s in segs], [0.1 * 0.5 * (1 + np.cos(np.pi * e / 5)) / 0.5 for e in range(5)]
    )
    segs, source = segments(dataclasses.replace(logreg, recipe=None), logreg.checkpoints)
    assert [s.learning_rate for s in segs] == [0.1] * 5 and source == "checkpoint learning rates"


def test_closer_to_the_unrolled_derivative_than_the_influence_function_on_an_unconverged_run(logreg):
    """Five epochs of SGD stop short of the optimum: SOURCE, which unrolls the segments, ranks training
    points like the exact metagradient of the run (magic) better than EK-FAC's influence function."""
    magic = get_estimator("magic").attribute(logreg, None, runtime=F64).scores
    src = get_estimator("source").attribute(logreg, None, runtime=F64).scores
    ekfac = get_estimator("ekfac").attribute(logreg, {"damping": 0.0}, runtime=F64).scores

    def rho(s):
        return float(np.mean([stats.spearmanr(s[j], magic[j])[0] for j in range(len(s))]))

    print(f"\nSpearman with magic: source {rho(src):.4f}, ekfac {rho(ekfac):.4f}")
    assert rho(src) >= 0.99 and rho(src) > rho(ekfac)


def test_full_batch_descent_on_a_quadratic_matches_the_unrolled_run_to_first_order_in_eta():
    """ESTIMATORS.md 2.26: linear regression (quadratic), full-batch gradient descent, a checkpoint every
    step: SOURCE's error against the exact discrete derivative (magic) shrinks like eta at a fixed
    horizon eta T."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        30, generator=g, dtype=torch.float64
    )
    qx, qy = (
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    errors = []
    for eta, steps in ((0.04, 25), (0.01, 100)):
        recipe = Recipe(
            learning_rate=eta, epochs=steps, batch_size=30, weight_decay=WD, num_checkpoints=steps
        )
        model = init_model("linear", {"in_features": 4, "num_classes": 1}, 0).double()
        res = train(model, REG, x, y, recipe)
        prob = InfluenceProblem(
            model, REG, res.weights, x, y, qx, qy, checkpoints=res.checkpoints, weight_decay=WD,
            recipe=dataclasses.asdict(recipe),
        )  # fmt: skip
        src = get_estimator("source").attribute(prob, {"fisher": "expected"}, runtime=F64).scores
        exact = get_estimator("magic").attribute(prob, None, runtime=F64).scores
        errors.append(float(np.linalg.norm(src - exact) / np.linalg.norm(exact)))
    print(f"\nSOURCE vs the unrolled derivative, relative error at eta 0.04 / 0.01: {np.round(errors, 5)}")
    assert errors[1] < errors[0] / 3 and errors[1] < 0.02


def test_self_influence_shards_and_refusals(logreg):
    est = get_estimator("source")
    on_train = dataclasses.replace(logreg, query_x=logreg.train_x, query_y=logreg.train_y)
    whole = est.attribute(on_train, None, runtime=F64, want_self_influence=True)
    np.testing.assert_allclose(whole.self_influence, np.diag(whole.scores), rtol=1e-10)
    state = est.fit(on_train, None, F64)
    part = est.attribute(
        on_train, None, runtime=F64, want_self_influence=True, state=state, train_range=(20, 50)
    )
    np.testing.assert_allclose(part.scores, whole.scores[:, 20:50], rtol=1e-12)
    np.testing.assert_allclose(part.self_influence, whole.self_influence[20:50], rtol=1e-12)
    with pytest.raises(EstimatorError) as info:
        est.attribute(dataclasses.replace(logreg, checkpoints=[]), None, runtime=F64)
    assert info.value.parameter == "/checkpoint_ids"
    twice = [
        logreg.checkpoints[0],
        dataclasses.replace(logreg.checkpoints[1], step=logreg.checkpoints[0].step),
    ]
    with pytest.raises(EstimatorError, match="increasing steps"):
        est.attribute(dataclasses.replace(logreg, checkpoints=twice), None, runtime=F64)
