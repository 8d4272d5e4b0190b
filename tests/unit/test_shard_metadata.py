"""merge_metadata: a fanned-out job reports what its row shards' estimators reported."""

from __future__ import annotations

from app.estimators.sharding import merge_metadata


def test_equal_values_are_kept_and_differing_ones_merged_by_kind():
    parts = [
        {
            "normalisation": "1/n",
            "layer_damping": {"1": 0.1},
            "warnings": ["a", "b"],
            "cg_converged": True,
            "cg_max_relative_residual": 1e-7,
            "iterations": 12,
            "route": "dense",
        },
        {
            "normalisation": "1/n",
            "layer_damping": {"1": 0.1},
            "warnings": ["b", "c"],
            "cg_converged": False,
            "cg_max_relative_residual": 3e-4,
            "iterations": 20,
            "route": "rows",
            "only_here": 1,
        },
    ]
    assert merge_metadata(parts) == {
        "normalisation": "1/n",
        "layer_damping": {"1": 0.1},
        "warnings": ["a", "b", "c"],  # union, first-seen order
        "cg_converged": False,  # holds only where it holds in every shard
        "cg_max_relative_residual": 3e-4,  # the worst
        "iterations": 20,
        "route": {"per_shard": ["dense", "rows"]},  # nothing a shard said is lost
        "only_here": 1,
    }


def test_one_shard_or_none():
    assert merge_metadata([{"warnings": ["x"], "k": 1}]) == {"warnings": ["x"], "k": 1}
    assert merge_metadata([]) == {}
    assert merge_metadata([{}, {}]) == {}
