"""Datamodels on a real learner: LDS on held-out masks against exact influence functions
(ESTIMATORS.md 2.9 self-check, 4.2).

L2-regularised logistic regression (2-class softmax ``linear`` model, float64) on 100 standardised
breast-cancer rows, 10 queries from the rest; every subset is retrained exactly by the engine's
Newton solver, so the held-out outputs carry no seed noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer

from app.estimators import (
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)
from app.estimators.base import REGISTRY
from app.estimators.valuation import LDSSubsets, lds

torch.set_num_threads(1)


CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64)
WD = 1e-3
N_TRAIN, N_QUERY = 100, 10


def _problem(measurement: str) -> tuple[InfluenceProblem, Recipe]:
    X, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_QUERY]
    X = (X - X[tr].mean(0)) / X[tr].std(0)
    x, qx = torch.tensor(X[tr]), torch.tensor(X[te])
    y_tr, y_q = torch.tensor(y[tr]).long(), torch.tensor(y[te]).long()
    recipe = Recipe(
        optimizer="lbfgs",
        learning_rate=1.0,
        epochs=100,
        weight_decay=WD,
        lbfgs_tolerance=1e-10,
        num_checkpoints=0,
    )
    model = init_model("linear", {"in_features": X.shape[1], "num_classes": 2}, 0).double()
    weights = train(model, CLS, x, y_tr, recipe).weights
    problem = InfluenceProblem(
        model=model,
        task=CLS,
        weights=weights,
        train_x=x,
        train_y=y_tr,
        query_x=qx,
        query_y=y_q,
        weight_decay=WD,
        measurement=measurement,
    )
    return problem, recipe


def test_datamodel_lds_beats_exact_influence_on_held_out_masks():
    """ESTIMATORS.md 2.9: "LDS of the datamodel on held-out masks (it should be the best number in the
    table for that model class)". Datamodels (LASSO, l1 chosen per query, 1,000 masks at alpha 0.5,
    seed 1) against if_exact at the same optimum, both scored on 100 other alpha = 0.5 masks (seed 99).

    Measured, margin measurement (the paper's), weight decay 1e-3: LDS datamodel 0.851 vs IF 0.749
    (+0.102; the datamodel better on 10 of 10 queries; ridge 0.845). Four other train/query splits:
    +0.162, +0.107, +0.024, +0.043 (LASSO). Weight decay 1e-2 (closer to linear, IF's home ground):
    +0.025, +0.053, +0.020, +0.003, +0.019 over the five splits (IF 0.832-0.924).
    Not asserted: with the loss as the measurement the linear datamodel is *not* the best number:
    at weight decay 1e-3 it scored +0.006, -0.012, -0.029, -0.092, -0.170 against IF (LASSO; ridge
    -0.08 to -0.19), because the loss is a non-linear function of the margin, which is what the
    datamodel fits linearly; with 2,000 masks and weight decay 1e-2 it drew level (0.884 vs 0.878).
    """
    problem, recipe = _problem("margin")
    params = {"recipe": recipe}
    if_att = get_estimator("if_exact").attribute(problem, {}, runtime=F64)
    assert if_att.metadata["objective_grad_norm"] < 1e-8  # IF needs the optimum
    dm = REGISTRY["datamodels"].attribute(problem, {**params, "n_masks": 1000, "seed": 1}, runtime=F64)
    assert dm.metadata["solver"] == "newton" and dm.scores.shape == (N_QUERY, N_TRAIN)

    held_out = LDSSubsets()
    plan = held_out.plan(problem, {**params, "seed": 99, "n_masks": 100})
    q = held_out.train_subsets(problem, params, plan, F64)["query"]
    lds_dm, lds_if = lds(dm.scores, plan.masks, q), lds(if_att.scores, plan.masks, q)
    assert np.isfinite(lds_dm).all() and np.isfinite(lds_if).all()
    assert lds_dm.mean() >= 0.8
    assert lds_dm.mean() >= lds_if.mean() + 0.05, (lds_dm.mean(), lds_if.mean())
    assert (lds_dm > lds_if).mean() >= 0.7


def test_training_sets_whose_gram_matrix_is_over_the_cap_are_refused_at_submit():
    """The LASSO/ridge fit holds n x n float64 Gram matrices: 20,000 rows would be 3.2 GB each."""
    from app.estimators import EstimatorError, ProblemSize, get_estimator

    est = get_estimator("datamodels")
    est.check(ProblemSize(8192, 10, 100, 0), {})
    with pytest.raises(EstimatorError) as info:
        est.check(ProblemSize(20_000, 10, 100, 0), {})
    assert info.value.parameter == "/method/params/max_train_rows" and "3.2 GB" in str(info.value)
    est.check(ProblemSize(20_000, 10, 100, 0), {"max_train_rows": 20_000})
