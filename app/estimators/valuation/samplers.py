"""Subset samplers: which subsets to retrain on, and with which training seed.

Every sampler is a pure function of its arguments: row ``k`` of a plan depends only
on ``(seed, k)`` (never on how many rows are asked for at once), so the service can
cut a plan into row ranges (shards), train each range on a different worker and
concatenate the outputs in row order.

* :class:`SubsetPlan` holds boolean ``masks`` (K x n; ``masks[k, i]`` = training
  example ``i`` is in subset ``k``), the training ``seeds`` (K) and optional
  per-row ``meta`` arrays (e.g. which point a leave-one-out row removed).
* Static plans: :func:`loo_plan`, :func:`fixed_fraction_plan` (Downsampling,
  Datamodels, LDS), :func:`bernoulli_plan` (MSR Banzhaf), :func:`exhaustive_plan`
  (all 2^n subsets).
* Round-based samplers (``next_plan(max_masks)`` then ``observe(plan, outputs)``):
  :class:`StreamSampler` (an endless static stream cut into rounds) and
  :class:`PermutationSampler` (TMC- and Beta-Shapley; truncation is decided online
  from the utilities of the prefixes already trained).

Training seeds: ``train_seed=<int>`` gives every row that seed ("shared": the
learner is then a deterministic function of the subset, which Shapley-type
axioms need); ``train_seed=None`` derives a distinct seed for each row from
``(seed, row)`` ("per mask": seed noise averages out over masks, as in Datamodels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base import EstimatorError

MAX_EXHAUSTIVE_N = 20
_SEED_MASK = 0x7FFF_FFFF

# Stream tags keep the random streams of different samplers apart for the same seed.
_TAG_FIXED, _TAG_BERNOULLI, _TAG_PERMUTATION, _TAG_TRAIN_SEED = 11, 12, 13, 14


def _row_rng(seed: int, tag: int, row: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, tag, int(row)]))


def derived_seed(seed: int, *keys: int) -> int:
    """A training seed derived deterministically from ``seed`` and integer ``keys`` (31-bit)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, _TAG_TRAIN_SEED, *(int(k) for k in keys)])
    return int(ss.generate_state(1, dtype=np.uint32)[0]) & _SEED_MASK


def training_seeds(rows: np.ndarray, *, seed: int, train_seed: int | None) -> np.ndarray:
    """Training seeds of plan ``rows``: ``train_seed`` for all, or derived per row when None."""
    rows = np.asarray(rows, dtype=np.int64)
    if train_seed is not None:
        return np.full(rows.shape, int(train_seed), dtype=np.int64)
    return np.array([derived_seed(seed, r) for r in rows], dtype=np.int64)


@dataclass
class SubsetPlan:
    """Subsets to train on: ``masks`` (K x n bool), ``seeds`` (K int64), per-row ``meta`` arrays.

    ``info`` describes the plan as a whole (JSON-serialisable). Any row range of a
    plan (:meth:`rows`) can be trained on its own; outputs are merged in row order.
    """

    masks: np.ndarray
    seeds: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        if self.masks.ndim != 2:
            raise ValueError(f"masks must be K x n, got shape {self.masks.shape}")
        self.seeds = np.asarray(self.seeds, dtype=np.int64).reshape(-1)
        if self.seeds.shape[0] != self.masks.shape[0]:
            raise ValueError(f"{self.masks.shape[0]} masks but {self.seeds.shape[0]} seeds")
        self.meta = {k: np.asarray(v) for k, v in self.meta.items()}
        for k, v in self.meta.items():
            if v.shape[:1] != (self.masks.shape[0],):
                raise ValueError(f"meta[{k!r}] has {v.shape[:1]} rows, expected {self.masks.shape[0]}")

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def n_points(self) -> int:
        return int(self.masks.shape[1])

    def rows(self, lo: int, hi: int) -> SubsetPlan:
        """Rows ``lo..hi-1`` (a shard)."""
        return SubsetPlan(
            self.masks[lo:hi], self.seeds[lo:hi], {k: v[lo:hi] for k, v in self.meta.items()}, dict(self.info)
        )

    def shard_ranges(self, rows_per_shard: int) -> list[tuple[int, int]]:
        """``(lo, hi)`` row ranges of at most ``rows_per_shard`` rows covering the plan."""
        size = max(1, int(rows_per_shard))
        return [(lo, min(lo + size, len(self))) for lo in range(0, len(self), size)]

    @staticmethod
    def concat(plans: Iterable[SubsetPlan]) -> SubsetPlan:
        plans = list(plans)
        if not plans:
            raise ValueError("nothing to concatenate")
        keys = set(plans[0].meta)
        return SubsetPlan(
            np.concatenate([p.masks for p in plans]),
            np.concatenate([p.seeds for p in plans]),
            {k: np.concatenate([p.meta[k] for p in plans]) for k in keys},
            dict(plans[0].info),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``); ``info`` is not included."""
        return {"masks": self.masks, "seeds": self.seeds, **{f"meta_{k}": v for k, v in self.meta.items()}}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> SubsetPlan:
        meta = {k[5:]: np.asarray(v) for k, v in arrays.items() if k.startswith("meta_")}
        return SubsetPlan(arrays["masks"], arrays["seeds"], meta, dict(info or {}))


def _check_n(n: int) -> int:
    n = int(n)
    if n < 1:
        raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
    return n


# ----------------------------------------------------------------------------- static plans


def loo_plan(
    n: int, *, indices: Iterable[int] | None = None, train_seed: int = 0, include_full: bool = True
) -> SubsetPlan:
    """Leave-one-out: the full set (``meta["removed"] = -1``) then, for each index, the set without it.

    ``indices`` defaults to all n points, giving n + 1 masks. Every row uses ``train_seed``.
    """
    n = _check_n(n)
    idx = np.arange(n) if indices is None else np.asarray(list(indices), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError("leave-one-out indices out of range")
    removed = np.concatenate([[-1], idx]) if include_full else idx
    masks = np.ones((removed.size, n), dtype=bool)
    rows = np.nonzero(removed >= 0)[0]
    masks[rows, removed[rows]] = False
    return SubsetPlan(
        masks,
        np.full(removed.size, int(train_seed), dtype=np.int64),
        {"removed": removed.astype(np.int64)},
        {"sampler": "loo", "n": n},
    )


def subset_size(n: int, alpha: float) -> int:
    """``round(alpha * n)``, the size of every fixed-fraction subset."""
    if not 0.0 < alpha < 1.0:
        raise EstimatorError(f"alpha must be in (0, 1), got {alpha}", parameter="/method/params/alpha")
    return int(min(n, max(0, round(alpha * n))))


def fixed_fraction_plan(
    n: int, n_masks: int, *, alpha: float = 0.5, seed: int = 0, start: int = 0, train_seed: int | None = 0
) -> SubsetPlan:
    """Rows ``start..start+n_masks-1`` of the stream of uniform subsets of size ``round(alpha n)``.

    Used by Downsampling (alpha 0.7), Datamodels and LDS (alpha 0.5).
    """
    n = _check_n(n)
    s = subset_size(n, alpha)
    rows = np.arange(start, start + int(n_masks), dtype=np.int64)
    masks = np.zeros((rows.size, n), dtype=bool)
    for r, row in enumerate(rows):
        masks[r, _row_rng(seed, _TAG_FIXED, row).permutation(n)[:s]] = True
    return SubsetPlan(
        masks,
        training_seeds(rows, seed=seed, train_seed=train_seed),
        {"row": rows},
        {"sampler": "fixed_fraction", "n": n, "alpha": alpha, "seed": seed},
    )


def bernoulli_plan(
    n: int, n_masks: int, *, p: float = 0.5, seed: int = 0, start: int = 0, train_seed: int | None = 0
) -> SubsetPlan:
    """Rows of the stream of subsets with independent inclusion probability ``p`` (MSR Banzhaf: 1/2)."""
    n = _check_n(n)
    rows = np.arange(start, start + int(n_masks), dtype=np.int64)
    masks = np.zeros((rows.size, n), dtype=bool)
    for r, row in enumerate(rows):
        masks[r] = _row_rng(seed, _TAG_BERNOULLI, row).random(n) < p
    return SubsetPlan(
        masks,
        training_seeds(rows, seed=seed, train_seed=train_seed),
        {"row": rows},
        {"sampler": "bernoulli", "n": n, "p": p, "seed": seed},
    )


def exhaustive_plan(n: int, *, train_seed: int = 0, max_n: int = MAX_EXHAUSTIVE_N) -> SubsetPlan:
    """All 2^n subsets; row ``c`` is the subset whose bit ``i`` is set iff point ``i`` is in it."""
    n = _check_n(n)
    if n > max_n:
        raise EstimatorError(
            f"exact enumeration trains 2^n models; n = {n} exceeds the limit of {max_n}",
            parameter="/method/params/max_n",
        )
    codes = np.arange(2**n, dtype=np.int64)
    masks = ((codes[:, None] >> np.arange(n)) & 1).astype(bool)
    return SubsetPlan(
        masks,
        np.full(codes.size, int(train_seed), dtype=np.int64),
        {"code": codes},
        {"sampler": "exhaustive", "n": n},
    )


def mask_codes(masks: np.ndarray) -> np.ndarray:
    """Integer code of each mask (bit i = point i), for n <= 62."""
    masks = np.asarray(masks, dtype=bool)
    if masks.shape[1] > 62:
        raise ValueError("mask codes need n <= 62")
    return (masks.astype(np.int64) << np.arange(masks.shape[1], dtype=np.int64)).sum(axis=1)


def permutation(n: int, seed: int, index: int) -> np.ndarray:
    """The ``index``-th random permutation of ``range(n)`` for ``seed``."""
    return _row_rng(seed, _TAG_PERMUTATION, index).permutation(n)


# ----------------------------------------------------------------------------- round-based samplers


@dataclass
class StreamSamples:
    """Completed samples of a static stream: the plan rows and their outputs (a dict of arrays)."""

    plan: SubsetPlan
    outputs: dict[str, np.ndarray]


class StreamSampler:
    """A static plan stream (``fixed_fraction`` or ``bernoulli``) served in rounds.

    ``next_plan(max_masks)`` returns the next rows of the stream (never more than
    ``limit`` in total); ``observe`` passes them through as :class:`StreamSamples`.
    """

    def __init__(
        self,
        n: int,
        kind: str = "bernoulli",
        *,
        seed: int = 0,
        train_seed: int | None = 0,
        alpha: float = 0.5,
        limit: int | None = None,
    ) -> None:
        if kind not in ("bernoulli", "fixed_fraction"):
            raise ValueError(f"unknown stream kind {kind!r}")
        self.n, self.kind, self.seed, self.train_seed, self.alpha = _check_n(n), kind, seed, train_seed, alpha
        self.limit = limit
        self.next_row = 0

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.next_row >= self.limit

    def next_plan(self, max_masks: int) -> SubsetPlan | None:
        count = max(1, int(max_masks))
        if self.limit is not None:
            count = min(count, self.limit - self.next_row)
        if count <= 0:
            return None
        if self.kind == "bernoulli":
            plan = bernoulli_plan(
                self.n, count, p=self.alpha, seed=self.seed, start=self.next_row, train_seed=self.train_seed
            )
        else:
            plan = fixed_fraction_plan(
                self.n,
                count,
                alpha=self.alpha,
                seed=self.seed,
                start=self.next_row,
                train_seed=self.train_seed,
            )
        self.next_row += count
        return plan

    def observe(self, plan: SubsetPlan, outputs: dict[str, np.ndarray]) -> StreamSamples:
        return StreamSamples(plan, outputs)


@dataclass
class PermutationSamples:
    """Completed permutation walks.

    ``perms`` (P x n): the orders; ``prefix_utilities`` (P x (n+1)): U of the first
    j points for j = 0..n (after truncation the remaining entries repeat the
    utility at the truncation point, so those points get marginal 0);
    ``truncated_at`` (P): the prefix length at which the walk was truncated (n: never).
    """

    perms: np.ndarray
    prefix_utilities: np.ndarray
    truncated_at: np.ndarray

    @property
    def n_walks(self) -> int:
        return int(self.perms.shape[0])


class _Walk:
    __slots__ = ("index", "perm", "utilities", "known", "truncated_at", "pending")

    def __init__(self, index: int, perm: np.ndarray, u_empty: float, u_full: float) -> None:
        n = perm.size
        self.index, self.perm = index, perm
        self.utilities = np.full(n + 1, np.nan)
        self.utilities[0], self.utilities[n] = u_empty, u_full
        self.known = 0  # utilities[0..known] are final
        self.truncated_at = n
        self.pending = 0  # prefix lengths known+1..pending have been handed out


class PermutationSampler:
    """Permutation walks for TMC-Shapley and Beta Shapley, trained in rounds.

    The first round trains the empty set and the full set (U(empty), U(D)). Every
    later round hands out, for up to ``in_flight`` walks, the next prefixes whose
    utilities are unknown (prefix lengths 1..n-1; the length-n prefix is D, whose
    utility U(D) is reused, so each untruncated walk telescopes exactly to
    U(D) - U(empty)). After ``observe``, each walk is scanned in order: once
    ``|U(D) - U(prefix)| <= truncation * |U(D)|`` the walk stops and the remaining
    points get marginal 0 (Ghorbani & Zou 2019); prefixes handed out beyond that
    point are wasted. ``truncation = 0`` disables truncation, and then every walk
    is handed out whole in one round.

    Walk ``w`` uses :func:`permutation` ``(n, seed, w)``; training seeds are
    ``train_seed`` for every prefix, or derived from ``(seed, w, prefix length)``
    when ``train_seed`` is None. Results therefore do not depend on ``max_masks``,
    ``in_flight`` or how the rounds are sharded, only on the utilities.

    ``max_rows`` (None: no limit) caps the prefix rows handed out after the first
    round (a run's retraining budget less the full set). A walk is opened only while
    the rows left can finish it and every walk already open (``n - 1`` prefixes each,
    the worst case without truncation), so a budget stop never leaves walks half
    trained: without it, ``in_flight`` walks advancing a few prefixes per round could
    spend a budget below ``in_flight * (n - 1)`` without completing any walk.
    :attr:`out_of_budget` tells that the sampler stopped for this reason.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        train_seed: int | None = 0,
        truncation: float = 0.0,
        in_flight: int = 64,
        max_walks: int | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.n = _check_n(n)
        if truncation < 0 or not math.isfinite(truncation):
            raise EstimatorError("truncation must be >= 0", parameter="/method/params/truncation")
        self.seed, self.train_seed, self.truncation = seed, train_seed, float(truncation)
        self.in_flight, self.max_walks = max(1, int(in_flight)), max_walks
        self.max_rows = None if max_rows is None else max(0, int(max_rows))
        self.rows_handed_out = 0  # prefix rows after the first round
        self.out_of_budget = False
        self.u_empty: float | None = None
        self.u_full: float | None = None
        self._started = False
        self._next_walk = 0
        self._walks: list[_Walk] = []

    @property
    def exhausted(self) -> bool:
        return (
            self._started
            and not self._walks
            and self.max_walks is not None
            and self._next_walk >= self.max_walks
        )

    def _can_open(self) -> bool:
        """Whether the row budget can finish every open walk and one more (without truncation)."""
        if self.max_rows is None:
            return True
        reserved = sum(self.n - 1 - w.pending for w in self._walks)
        return self.rows_handed_out + reserved + self.n - 1 <= self.max_rows

    def _seed_for(self, walk: int, length: int) -> int:
        if self.train_seed is not None:
            return int(self.train_seed)
        return derived_seed(self.seed, walk, length)

    def next_plan(self, max_masks: int) -> SubsetPlan | None:
        n = self.n
        if not self._started:
            masks = np.zeros((2, n), dtype=bool)
            masks[1] = True
            seeds = [self._seed_for(-1, 0), self._seed_for(-1, n)]
            return SubsetPlan(
                masks,
                seeds,
                {"walk": np.array([-1, -1]), "length": np.array([0, n])},
                {"sampler": "permutation", "n": n, "seed": self.seed},
            )
        if n == 1:
            # a single point: its value U(D) - U(empty) is exact; emit two identical walks (stderr 0)
            if self._next_walk:
                return None
            for _ in range(2):
                w = _Walk(self._next_walk, np.zeros(1, np.int64), self.u_empty, self.u_full)
                self._walks.append(w)
                self._next_walk += 1
            return SubsetPlan(
                np.zeros((0, 1), bool), [], {"walk": np.zeros(0, np.int64), "length": np.zeros(0, np.int64)}
            )
        budget = max(1, int(max_masks))
        lookahead = n - 1 if self.truncation == 0 else None
        rows_walk: list[int] = []
        rows_len: list[int] = []
        # open new walks while there is room
        while (
            len(self._walks) < self.in_flight
            and (self.max_walks is None or self._next_walk < self.max_walks)
            and self._can_open()
        ):
            self._walks.append(
                _Walk(self._next_walk, permutation(n, self.seed, self._next_walk), self.u_empty, self.u_full)
            )
            self._next_walk += 1
        open_walks = [w for w in self._walks if w.pending < n - 1]
        if not open_walks:
            if not self._walks and not self._can_open():
                self.out_of_budget = self.max_walks is None or self._next_walk < self.max_walks
            return None
        per_walk = lookahead or max(1, budget // len(open_walks))
        for w in open_walks:
            if len(rows_len) >= budget and rows_len:
                break
            take = min(per_walk, n - 1 - w.pending, max(1, budget - len(rows_len)))
            for length in range(w.pending + 1, w.pending + take + 1):
                rows_walk.append(w.index)
                rows_len.append(length)
            w.pending += take
        self.rows_handed_out += len(rows_len)
        masks = np.zeros((len(rows_len), n), dtype=bool)
        walk_by_index = {w.index: w for w in self._walks}
        for r, (wi, length) in enumerate(zip(rows_walk, rows_len, strict=True)):
            masks[r, walk_by_index[wi].perm[:length]] = True
        return SubsetPlan(
            masks,
            [self._seed_for(wi, length) for wi, length in zip(rows_walk, rows_len, strict=True)],
            {"walk": np.array(rows_walk, dtype=np.int64), "length": np.array(rows_len, dtype=np.int64)},
            {"sampler": "permutation", "n": n, "seed": self.seed},
        )

    def observe(self, plan: SubsetPlan, outputs: dict[str, np.ndarray]) -> PermutationSamples:
        """Record the utilities of ``plan``'s prefixes; return the walks completed by them."""
        u = np.asarray(outputs["utility"], dtype=np.float64).reshape(-1)
        if u.size != len(plan):
            raise ValueError(f"{len(plan)} plan rows but {u.size} utilities")
        n = self.n
        if not self._started:
            lengths = plan.meta["length"]
            self.u_empty = float(u[np.nonzero(lengths == 0)[0][0]])
            self.u_full = float(u[np.nonzero(lengths == n)[0][0]])
            self._started = True
            return PermutationSamples(np.zeros((0, n), np.int64), np.zeros((0, n + 1)), np.zeros(0, np.int64))
        walk_by_index = {w.index: w for w in self._walks}
        for wi, length, value in zip(plan.meta["walk"], plan.meta["length"], u, strict=True):
            w = walk_by_index.get(int(wi))
            if w is not None and w.truncated_at == n:
                w.utilities[int(length)] = value
        tol = self.truncation * abs(self.u_full)
        done: list[_Walk] = []
        for w in self._walks:
            while w.truncated_at == n and w.known < n - 1 and not np.isnan(w.utilities[w.known + 1]):
                w.known += 1
                if self.truncation > 0 and abs(self.u_full - w.utilities[w.known]) <= tol:
                    w.truncated_at = w.known
                    w.utilities[w.known + 1 :] = w.utilities[w.known]
            if w.truncated_at < n or w.known >= n - 1:
                done.append(w)
        self._walks = [w for w in self._walks if w not in done]
        done.sort(key=lambda w: w.index)
        return PermutationSamples(
            np.array([w.perm for w in done], dtype=np.int64).reshape(len(done), n),
            np.array([w.utilities for w in done], dtype=np.float64).reshape(len(done), n + 1),
            np.array([w.truncated_at for w in done], dtype=np.int64),
        )
