"""Service-facing retraining estimators: registry, parameters, orientation, sharding and failure modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from app.estimators import (
    Cancelled,
    EstimatorError,
    InfluenceProblem,
    ProblemSize,
    Recipe,
    Runtime,
    TaskSpec,
    init_model,
    valuation,
)
from app.estimators.base import REGISTRY
from app.estimators.valuation import SubsetOutputs, SubsetPlan

torch.set_num_threads(1)


CLS = TaskSpec("classification", "cross_entropy")
REG = TaskSpec("regression", "mse")
F64 = Runtime(dtype=torch.float64)
LBFGS = Recipe(optimizer="lbfgs", weight_decay=0.05)
RETRAINING = (
    "loo",
    "downsampling",
    "datamodels",
    "shapley_exact",
    "tmc_shapley",
    "beta_shapley",
    "banzhaf_msr",
)


def _problem(n=7, m=12, seed=0, task=CLS, arch="linear", params=None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n + m,), generator=g)
    x = torch.randn(n + m, 2, generator=g, dtype=torch.float64) + (2 * y[:, None] - 1) * 0.7
    if task.kind == "regression":
        y = x @ torch.tensor([1.0, -2.0], dtype=torch.float64)
    model = init_model(
        arch, params or {"in_features": 2, "num_classes": 2 if task.kind == "classification" else 1}, 0
    )
    model = model.double()
    return InfluenceProblem(
        model=model,
        task=task,
        weights=dict(model.state_dict()),
        train_x=x[:n],
        train_y=y[:n],
        query_x=x[n:],
        query_y=y[n:],
        weight_decay=0.05,
    )


def test_registry_and_params():
    pydantic = pytest.importorskip("pydantic")
    assert set(valuation.VALUATION_ESTIMATORS) <= set(REGISTRY)
    for name in valuation.VALUATION_ESTIMATORS:
        est = REGISTRY[name]
        assert est.summary and est.Params.__doc__ and not est.needs_checkpoints
        ta = pydantic.TypeAdapter(est.Params)
        ta.json_schema()
        assert isinstance(ta.validate_python({}), est.Params)
        if name != "knn_shapley":
            for piece in ("train_subsets", "estimate"):
                assert callable(getattr(est, piece))
            assert callable(getattr(est, "plan", None)) or callable(getattr(est, "sampler", None))
    p = pydantic.TypeAdapter(REGISTRY["tmc_shapley"].Params).validate_python(
        {"recipe": {"optimizer": "lbfgs", "weight_decay": 0.1}, "utility": "loss", "truncation": 0.0}
    )
    assert isinstance(p.recipe, Recipe) and p.recipe.weight_decay == 0.1
    bad = [
        ("downsampling", {"alpha": 0}),
        ("tmc_shapley", {"tolerance": -1}),
        ("banzhaf_msr", {"utility": "f1"}),
        ("loo", {"solver": "magic"}),
        ("knn_shapley", {"k": 0}),
        ("shapley_exact", {"max_n": 30}),
        ("tmc_shapley", {"recipe": {"optimizer": "rmsprop"}}),
    ]
    for name, value in bad:
        with pytest.raises(pydantic.ValidationError):
            pydantic.TypeAdapter(REGISTRY[name].Params).validate_python(value)
    assert REGISTRY["loo"].shardable_by_rows and not REGISTRY["tmc_shapley"].shardable_by_rows
    assert REGISTRY["loo"].supports_self_influence and not REGISTRY["banzhaf_msr"].supports_self_influence


@pytest.mark.parametrize("name", ["loo", "downsampling", "datamodels"])
def test_pointwise_outputs(name):
    problem = _problem()
    att = REGISTRY[name].attribute(
        problem, {"recipe": LBFGS, "n_masks": 40} if name != "loo" else {"recipe": LBFGS}, runtime=F64
    )
    assert att.scores.shape == (12, 7) and att.scores.dtype == np.float64 and att.values is None
    md = att.metadata
    assert (
        md["method"] == name and md["validation_set"] == "query set" and md["recipe"]["optimizer"] == "lbfgs"
    )
    f32 = REGISTRY[name].attribute(
        problem, {"recipe": LBFGS, "n_masks": 40} if name != "loo" else {"recipe": LBFGS}
    )
    assert f32.scores.dtype == np.float32


@pytest.mark.parametrize("name", ["shapley_exact", "tmc_shapley", "beta_shapley", "banzhaf_msr"])
def test_valuation_outputs_and_orientation(name):
    """Values come back per training example and permute with the training set (fixture 7)."""
    problem = _problem()
    params = {"recipe": LBFGS} if name == "shapley_exact" else {"recipe": LBFGS, "max_retrains": 300}
    att = REGISTRY[name].attribute(problem, params, runtime=F64)
    assert att.scores is None and att.values.shape == (7,) and att.values_stderr.shape == (7,)
    assert np.isfinite(att.values).all() and (att.values_stderr >= 0).all()
    if name == "shapley_exact":
        perm = np.array([3, 0, 6, 1, 5, 2, 4])
        shuffled = dataclasses.replace(problem, train_x=problem.train_x[perm], train_y=problem.train_y[perm])
        again = REGISTRY[name].attribute(shuffled, params, runtime=F64)
        np.testing.assert_allclose(again.values, att.values[perm], rtol=0, atol=1e-12)
        part = REGISTRY[name].attribute(problem, params, runtime=F64, train_range=(2, 5))
        np.testing.assert_array_equal(part.values, att.values[2:5])


def test_adaptive_rounds_can_be_sharded():
    """The service's loop: each round's plan split into row shards, trained apart, merged, observed."""
    problem = _problem(n=6)
    est = REGISTRY["tmc_shapley"]
    params = {"recipe": LBFGS, "max_retrains": 200, "truncation": 0.05, "cache": False}
    whole = est.attribute(problem, params, runtime=F64)

    def sharded(plan: SubsetPlan) -> SubsetOutputs:
        parts = [est.train_subsets(problem, params, plan.rows(a, b), F64) for a, b in plan.shard_ranges(7)]
        return SubsetOutputs.concat(parts)

    res = est.run(problem, params, F64, trainer=sharded)
    np.testing.assert_allclose(res.values, whole.values, rtol=0, atol=1e-12)
    assert res.n_retrains == whole.metadata["n_retrains"] <= 200


def test_tmc_default_budget_completes_walks_on_larger_sets():
    """Registered tmc_shapley at its defaults (max_retrains 2000, truncation 0.01) on n = 200 with a
    utility that never truncates: 0 completed walks (so a NumericalError) before the sampler reserved
    budget for the walks it opens; now floor(1999 / 199) = 10."""
    problem = _problem(n=200)

    def trainer(plan):
        return {"utility": plan.masks.sum(axis=1) / 200}

    res = REGISTRY["tmc_shapley"].run(problem, {"recipe": LBFGS}, F64, trainer=trainer)
    assert res.n_samples == 10 and res.stopped_by == "max_retrains" and res.n_retrains == 1 + 10 * 199
    assert np.isfinite(res.stderr).all()


def test_regression_valuation_uses_loss_utility():
    problem = _problem(n=5, task=REG)
    with pytest.raises(EstimatorError) as e:
        REGISTRY["shapley_exact"].attribute(problem, {"recipe": LBFGS}, runtime=F64)
    assert e.value.parameter == "/method/params/utility"
    att = REGISTRY["shapley_exact"].attribute(problem, {"recipe": LBFGS, "utility": "loss"}, runtime=F64)
    md = att.metadata
    assert abs(att.values.sum() - (md["u_full"] - md["u_empty"])) < 1e-12 and md["u_full"] > md["u_empty"]


def test_default_recipe_trains_batched_mlp():
    mlp = {"in_features": 2, "hidden": [4], "num_classes": 2}
    problem = _problem(arch="mlp", params=mlp)
    att = REGISTRY["banzhaf_msr"].attribute(problem, {"max_retrains": 32, "seed_per_mask": True}, runtime=F64)
    assert att.metadata["solver"] == "batched" and att.metadata["recipe"]["optimizer"] == "sgd"
    assert att.metadata["recipe"]["weight_decay"] == problem.weight_decay
    assert att.metadata["n_trained"] == att.metadata["n_retrains"]  # no cache with per-mask seeds
    plan = REGISTRY["banzhaf_msr"].plan(problem, {"seed_per_mask": True}, stop=10)
    assert len(set(plan.seeds.tolist())) == 10
    plan = REGISTRY["banzhaf_msr"].plan(problem, {"train_seed": 9}, stop=10)
    assert (plan.seeds == 9).all()


def test_failure_modes():
    problem = _problem()
    with pytest.raises(EstimatorError) as e:
        REGISTRY["shapley_exact"].check(ProblemSize(30, 5, 10, 0), {"max_n": 14})
    assert e.value.parameter == "/method/params/max_n"
    empty_queries = dataclasses.replace(problem, query_x=problem.query_x[:0], query_y=problem.query_y[:0])
    with pytest.raises(EstimatorError) as e:
        REGISTRY["banzhaf_msr"].attribute(empty_queries, {"recipe": LBFGS})
    assert e.value.parameter == "/query_dataset_id"
    with pytest.raises(EstimatorError) as e:
        REGISTRY["loo"].attribute(problem, {"recipe": Recipe(optimizer="lbfgs", weight_decay=0.0)})
    assert e.value.parameter == "/recipe/weight_decay"
    with pytest.raises(EstimatorError):
        REGISTRY["knn_shapley"].attribute(_problem(task=REG), {})

    def cancel(phase, done, total):
        if done >= 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        REGISTRY["tmc_shapley"].attribute(
            problem, {"recipe": LBFGS}, runtime=Runtime(dtype=torch.float64, progress=cancel)
        )


@pytest.mark.parametrize("name", [n for n in RETRAINING if hasattr(REGISTRY[n], "plan")])
@pytest.mark.parametrize("recipe", [None, {"seed": 7, "epochs": 3}], ids=["no-recipe", "recipe"])
def test_plans_need_only_the_sizes_and_the_recipe(name, recipe):
    """The worker's merge plans a fanned-out retraining job from the job's sizes and recipe alone
    (``worker.runner._PlanProblem``: it loads no tensors); that plan is the one the full problem gives."""
    from worker.runner import _PlanProblem

    problem = dataclasses.replace(_problem(n=9, m=4), recipe=recipe)
    params = REGISTRY[name].Params()
    full = REGISTRY[name].plan(problem, params)
    sized = REGISTRY[name].plan(_PlanProblem(9, 4, recipe, 0.05), params)
    np.testing.assert_array_equal(sized.masks, full.masks)
    np.testing.assert_array_equal(sized.seeds, full.seeds)
    assert len(sized) == len(full)
