"""Stored retraining outputs: the cache key, reuse by another method, the LDS summary, fan-out plans."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import app.estimators
from app.estimators import EstimatorError, InfluenceProblem, Recipe, TaskSpec, get_estimator, init_model
from app.estimators.sharding import ShardPlan
from app.estimators.valuation import (
    Datamodels,
    Downsampling,
    LDSParams,
    LDSSubsets,
    lds,
    lds_summary,
    returns_scores,
    reuse_outputs,
)
from app.services import subset_outputs
from worker.compute import job_plans

torch.set_num_threads(1)

MODEL_RECIPE = {"optimizer": "lbfgs", "learning_rate": 1.0, "epochs": 100, "weight_decay": 0.01, "seed": 0}
FINGERPRINT = dict(
    tenant_id="t1",
    architecture="linear",
    architecture_params={"in_features": 2, "num_classes": 2},
    task="classification",
    loss="cross_entropy",
    weights_sha256="a" * 64,
    train_sha256="b" * 64,
    query_sha256="c" * 64,
    query_rows=[0, 1, 2],
    measurement="loss",
)


def _key(estimator=None, params=None, *, self_influence=False, model_recipe=MODEL_RECIPE, wd=0.01, **fp):
    estimator = estimator or Downsampling()
    spec = estimator.subset_spec(
        params or {"n_masks": 20, "alpha": 0.5},
        model_recipe=model_recipe,
        weight_decay=wd,
        self_influence=self_influence,
    )
    fields = {**FINGERPRINT, **fp}
    solver = subset_outputs.resolve_solver(fields["architecture"], fields["architecture_params"], spec)
    fingerprint = subset_outputs.fingerprint(**fields)
    return subset_outputs.cache_key(subset_outputs.describe(spec, fingerprint, solver, spec.outputs))


def test_method_and_method_only_parameters_do_not_change_the_key():
    base = _key(Downsampling(), {"n_masks": 20, "alpha": 0.5})
    assert _key(Datamodels(), {"n_masks": 20, "alpha": 0.5}) == base
    assert _key(Datamodels(), {"n_masks": 20, "alpha": 0.5, "regression": "ridge", "l2": 0.5}) == base
    assert _key(Datamodels(), {"n_masks": 20, "alpha": 0.5, "l1": 0.01}) == base
    assert _key(LDSSubsets(), LDSParams(n_masks=20, alpha=0.5)) == base
    assert _key(Downsampling(), {"n_masks": 20, "alpha": 0.5, "n_models_per_batch": 3}) == base
    # the same recipe spelled three ways: the model's own, explicit params, ints for floats
    assert _key(Downsampling(), {"n_masks": 20, "alpha": 0.5, "recipe": MODEL_RECIPE}) == base
    assert _key(model_recipe={**MODEL_RECIPE, "learning_rate": 1}) == base
    assert _key(model_recipe={**MODEL_RECIPE, "num_checkpoints": 7}) == base  # checkpoints are never kept
    # "auto" resolves to newton for a linear model with an lbfgs recipe: the same models either way
    assert _key(Downsampling(), {"n_masks": 20, "alpha": 0.5, "solver": "newton"}) == base


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"n_masks": 21, "alpha": 0.5}},
        {"params": {"n_masks": 20, "alpha": 0.6}},
        {"params": {"n_masks": 20, "alpha": 0.5, "seed": 1}},
        {"params": {"n_masks": 20, "alpha": 0.5, "train_seed": 5}},
        {"params": {"n_masks": 20, "alpha": 0.5, "seed_per_mask": True}},
        {"params": {"n_masks": 20, "alpha": 0.5, "solver": "sequential"}},
        {"params": {"n_masks": 20, "alpha": 0.5, "recipe": {**MODEL_RECIPE, "weight_decay": 0.02}}},
        {"model_recipe": {**MODEL_RECIPE, "epochs": 50}},
        {"model_recipe": {**MODEL_RECIPE, "seed": 3}},
        {"model_recipe": None},
        {"self_influence": True},
        {"architecture_params": {"in_features": 2, "num_classes": 3}},
        {"architecture": "mlp", "architecture_params": {"in_features": 2, "hidden": [4], "num_classes": 2}},
        {"weights_sha256": "d" * 64},
        {"train_sha256": "d" * 64},
        {"query_sha256": "d" * 64},
        {"query_rows": [0, 1, 3]},
        {"query_rows": [0, 1]},
        {"measurement": "margin"},
        {"task": "regression", "loss": "mse"},
        {"tenant_id": "t2"},
    ],
)
def test_every_determining_input_changes_the_key(change):
    assert _key(**change) != _key()


def test_code_version_changes_the_key(monkeypatch):
    before = _key()
    monkeypatch.setattr(subset_outputs, "code_version", lambda: "other")
    assert _key() != before


def test_self_influence_needs_an_entry_with_train_outputs():
    assert subset_outputs._candidates(("query",)) == [("query",), ("query", "train")]
    assert subset_outputs._candidates(("query", "train")) == [("query", "train")]
    # Datamodels has no self-influence: asking for it does not change what it trains
    assert _key(Datamodels(), self_influence=True) == _key(Datamodels())


def test_resolved_solver():
    spec = Downsampling().subset_spec({}, model_recipe=MODEL_RECIPE, weight_decay=0.01)
    assert subset_outputs.resolve_solver("linear", FINGERPRINT["architecture_params"], spec) == "newton"
    sgd = Downsampling().subset_spec({}, model_recipe={"optimizer": "sgd"}, weight_decay=0.0)
    mlp = {"in_features": 2, "hidden": [4], "num_classes": 2}
    assert subset_outputs.resolve_solver("mlp", mlp, sgd) == "batched"
    bad = dataclasses.replace(sgd, solver="newton")  # refused by the engine: keyed as requested
    assert subset_outputs.resolve_solver("mlp", mlp, bad) == "newton"


def _problem(n=24, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n + m,), generator=g)
    x = torch.randn(n + m, 2, generator=g, dtype=torch.float64) + (2 * y[:, None] - 1) * 0.7
    model = init_model("linear", {"in_features": 2, "num_classes": 2}, 0).double()
    return InfluenceProblem(
        model=model,
        task=TaskSpec("classification", "cross_entropy"),
        weights=dict(model.state_dict()),
        train_x=x[:n],
        train_y=y[:n],
        query_x=x[n:],
        query_y=y[n:],
        weight_decay=0.05,
        recipe={"optimizer": "lbfgs", "weight_decay": 0.05},
    )


def _stored(spec, plan, outputs):
    info = {"solver": outputs.info["solver"], "n_trained": outputs.info["n_trained"]}
    arrays = subset_outputs.to_arrays(plan, outputs, info)
    arrays.pop("info")
    return arrays, info


def test_downsampling_from_datamodels_outputs_equals_training():
    """Outputs trained for datamodels, handed to downsampling, give exactly downsampling's own answer."""
    problem = _problem()
    params = {"n_masks": 16, "alpha": 0.5, "seed": 2}
    dm = Datamodels()
    _, dm_outputs = dm.attribute_with_outputs(problem, {**params, "regression": "ridge"})
    spec = dm.subset_spec(params, model_recipe=problem.recipe, weight_decay=problem.weight_decay)
    stored = _stored(spec, spec.plan(problem.n_train), dm_outputs)
    ds = Downsampling()
    reused, _ = ds.attribute_with_outputs(problem, params, stored=stored)
    fresh = ds.attribute(problem, params)
    np.testing.assert_array_equal(reused.scores, fresh.scores)
    assert reused.metadata["n_retrains"] == fresh.metadata["n_retrains"] == 16
    assert reused.metadata["solver"] == fresh.metadata["solver"] == "newton"
    # memorisation needs "train" outputs, which the datamodels entry lacks
    with pytest.raises(EstimatorError, match="train"):
        ds.attribute_with_outputs(problem, params, want_self_influence=True, stored=stored)
    # outputs of another plan are refused, not silently misused
    with pytest.raises(EstimatorError, match="masks"):
        ds.attribute_with_outputs(problem, {**params, "seed": 3}, stored=stored)


def test_downsampling_self_influence_entry_serves_a_query_only_job():
    problem = _problem()
    params = {"n_masks": 16, "alpha": 0.5}
    ds = Downsampling()
    with_self, outputs = ds.attribute_with_outputs(problem, params, want_self_influence=True)
    assert set(outputs.arrays) == {"query", "train"} and with_self.self_influence is not None
    spec = ds.subset_spec(params, model_recipe=problem.recipe, weight_decay=0.05, self_influence=True)
    stored = _stored(spec, spec.plan(problem.n_train), outputs)
    reused, _ = ds.attribute_with_outputs(problem, params, stored=stored)
    assert reused.self_influence is None  # not asked for: the stored "train" is dropped
    np.testing.assert_array_equal(reused.scores, with_self.scores)
    again, _ = ds.attribute_with_outputs(problem, params, want_self_influence=True, stored=stored)
    np.testing.assert_array_equal(again.self_influence, with_self.self_influence)


def test_reuse_outputs_checks_shapes():
    problem = _problem()
    spec = Downsampling().subset_spec({"n_masks": 8}, model_recipe=problem.recipe, weight_decay=0.05)
    plan = spec.plan(problem.n_train)
    arrays = {"masks": plan.masks, "seeds": plan.seeds, "query": np.zeros((8, problem.n_query + 1))}
    with pytest.raises(EstimatorError, match="query"):
        reuse_outputs(spec, plan, arrays, {}, problem.n_query)
    arrays["query"] = np.full((8, problem.n_query), np.nan)
    with pytest.raises(EstimatorError, match="finite"):
        reuse_outputs(spec, plan, arrays, {}, problem.n_query)


def test_lds_plan_is_the_datamodels_plan():
    problem = _problem()
    lp = LDSParams(n_masks=12, alpha=0.5, seed=4)
    lds_plan = LDSSubsets().plan(problem, lp)
    dm_plan = Datamodels().plan(problem, {"n_masks": 12, "alpha": 0.5, "seed": 4})
    np.testing.assert_array_equal(lds_plan.masks, dm_plan.masks)
    np.testing.assert_array_equal(lds_plan.seeds, dm_plan.seeds)
    spec = LDSSubsets().subset_spec(lp, model_recipe=problem.recipe, weight_decay=0.05)
    np.testing.assert_array_equal(spec.plan(problem.n_train).masks, lds_plan.masks)


def test_lds_summary_matches_lds():
    rng = np.random.default_rng(0)
    masks = rng.random((30, 10)) < 0.5
    scores = rng.normal(size=(4, 10))
    q = -(masks @ scores.T) + 0.1 * rng.normal(size=(30, 4))
    q[:, 3] = 1.0  # a constant query: undefined LDS
    per = lds(scores, masks, q)
    summary = lds_summary(scores, masks, q)
    assert summary["n_queries"] == 4 and summary["n_defined"] == 3 and summary["n_masks"] == 30
    assert summary["per_query"][3] is None
    np.testing.assert_allclose(summary["per_query"][:3], per[:3])
    assert summary["mean"] == pytest.approx(np.nanmean(per)) and summary["mean"] > 0.9
    assert summary["stderr"] == pytest.approx(np.std(per[:3], ddof=1) / np.sqrt(3))
    short = lds_summary(scores, masks, q, per_query_limit=2)
    assert "per_query" not in short and len(short["quartiles"]) == 5


def test_which_estimators_return_scores():
    assert returns_scores(get_estimator("if_exact"), {})
    assert returns_scores(get_estimator("datamodels"), {})
    assert not returns_scores(get_estimator("banzhaf_msr"), {})
    assert not returns_scores(get_estimator("tmc_shapley"), {})
    assert not returns_scores(get_estimator("knn_shapley"), {})
    assert returns_scores(get_estimator("knn_shapley"), {"per_query_scores": True})


def test_job_plans_fan_out_lds_subsets():
    ds, exact = get_estimator("downsampling"), get_estimator("if_exact")
    # one task: nothing splits (the task also retrains the LDS subsets)
    assert job_plans({}, exact, 100, 1, None, 30) == []
    assert job_plans({}, ds, 100, 1, 40, 30) == []
    # the LDS subsets split: the method's single shard plus LDS shards
    plans = job_plans({"subsets_per_shard": 10}, exact, 100, 1, None, 30)
    assert [(p.kind, p.train_lo, p.train_hi) for p in plans] == [
        ("train_rows", 0, 100),
        ("lds", 0, 10),
        ("lds", 10, 20),
        ("lds", 20, 30),
    ]
    assert [p.index for p in plans] == [0, 1, 2, 3]
    # the method splits: the LDS subsets come along as one shard
    plans = job_plans({"train_shard_size": 50}, exact, 100, 1, None, 30)
    assert [p.kind for p in plans] == ["train_rows", "train_rows", "lds"]
    # cached outputs (budget None): downsampling runs as one task, whatever the sharding asks
    assert job_plans({"subsets_per_shard": 10}, ds, 100, 1, None, None) == []
    assert job_plans({"subsets_per_shard": 10}, ds, 100, 1, 40, None) == [
        ShardPlan(i, 10 * i, 10 * i + 10, None, "subsets") for i in range(4)
    ]
    # a method that cannot be split by rows keeps everything in one task
    assert job_plans({"subsets_per_shard": 10}, get_estimator("knn_shapley"), 100, 1, None, 30) == []


def test_recipe_defaults_follow_the_model():
    p = Downsampling().subset_spec({"train_seed": 9}, model_recipe=None, weight_decay=0.3)
    assert p.recipe == dataclasses.replace(Recipe(weight_decay=0.3), seed=9, num_checkpoints=0)
    assert p.train_seed == 9
    assert (
        Downsampling().subset_spec({"seed_per_mask": True}, model_recipe=None, weight_decay=0).train_seed
        is None
    )


def test_the_code_version_follows_the_estimator_source(tmp_path):
    """Cache keys carry a digest of app/estimators: editing a fit, or adding a module, makes a new key
    even when the package version stays."""
    from app.services.train_state import code_version, source_digest

    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "m.py").write_text("SCALE = 1\n")
    first = source_digest(tmp_path)
    (tmp_path / "methods" / "m.py").write_text("SCALE = 2\n")
    edited = source_digest(tmp_path)
    (tmp_path / "extra.py").write_text("")
    assert len({first, edited, source_digest(tmp_path)}) == 3
    assert code_version().endswith("+" + source_digest(Path(app.estimators.__file__).parent))
