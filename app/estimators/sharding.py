"""Split one attribution into shards (training-row ranges x checkpoint groups) and merge them back.

Pure and deterministic, so the service can fan a job out over any number of
workers and a notebook can do the same in a loop. Merging is exact: shards over
different rows are concatenated, shards over different checkpoints (for
estimators whose scores are a sum over checkpoints) are added.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ShardPlan:
    """Rows ``lo..hi-1`` of the training set (``kind="train_rows"``) or of a retraining plan's subsets
    (``kind="subsets"``), for some checkpoints."""

    index: int
    train_lo: int
    train_hi: int
    checkpoint_indices: tuple[int, ...] | None  # None: every checkpoint (or the method uses none)
    kind: str = "train_rows"


def plan_subset_shards(n_subsets: int, subsets_per_shard: int) -> list[ShardPlan]:
    """Contiguous ranges of a retraining plan's subset rows."""
    size = max(1, int(subsets_per_shard))
    return [
        ShardPlan(i, lo, min(lo + size, n_subsets), None, "subsets")
        for i, lo in enumerate(range(0, n_subsets, size))
    ]


def plan_shards(
    n_train: int,
    n_checkpoints: int,
    *,
    train_shard_size: int | None,
    by_checkpoint: bool,
) -> list[ShardPlan]:
    """Row ranges of at most ``train_shard_size`` (None: all rows), once per checkpoint if asked."""
    size = n_train if not train_shard_size else max(1, int(train_shard_size))
    ranges = [(lo, min(lo + size, n_train)) for lo in range(0, n_train, size)] or [(0, 0)]
    groups: list[tuple[int, ...] | None] = (
        [(t,) for t in range(n_checkpoints)] if by_checkpoint and n_checkpoints > 1 else [None]
    )
    plans = []
    for group in groups:
        for lo, hi in ranges:
            plans.append(ShardPlan(len(plans), lo, hi, group))
    return plans


def merge_shards(
    n_query: int,
    n_train: int,
    parts: Iterable[tuple[ShardPlan, np.ndarray | None, np.ndarray | None]],
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Assemble full (m x n scores, n self-influence) from shard outputs; missing parts stay None."""
    scores = self_influence = None
    for plan, part_scores, part_self in parts:
        cols = slice(plan.train_lo, plan.train_hi)
        if part_scores is not None:
            if scores is None:
                scores = np.zeros((n_query, n_train), dtype=part_scores.dtype)
            scores[:, cols] += part_scores
        if part_self is not None:
            if self_influence is None:
                self_influence = np.zeros(n_train, dtype=part_self.dtype)
            self_influence[cols] += part_self
    return scores, self_influence


def merge_metadata(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One metadata dict for a job from its row shards' (each ran the method on its own columns).

    A value every shard reports alike is kept. Otherwise: ``warnings`` become the union in first-seen
    order; flags (``cg_converged``) hold only if they hold in every shard; numbers (residuals,
    iteration counts, errors) take the worst, the largest; anything else keeps every shard's value,
    in shard order, so nothing a shard reported is lost.
    """
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        if all(v == values[0] for v in values):
            merged[key] = values[0]
        elif key == "warnings" and all(isinstance(v, list) for v in values):
            merged[key] = list(dict.fromkeys(w for v in values for w in v))
        elif all(isinstance(v, bool) for v in values):
            merged[key] = all(values)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            merged[key] = max(values)
        else:
            merged[key] = {"per_shard": values}
    return merged
