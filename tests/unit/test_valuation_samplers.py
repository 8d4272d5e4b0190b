"""Subset samplers: deterministic, row-addressable (shardable) and independent of round sizes."""

from __future__ import annotations

import numpy as np
import pytest

import app.estimators.valuation  # noqa: E402, F401  (importing it registers its estimators)
from app.estimators import EstimatorError
from app.estimators.valuation import (
    PermutationAccumulator,
    PermutationSampler,
    StreamSampler,
    SubsetPlan,
    bernoulli_plan,
    exhaustive_plan,
    fixed_fraction_plan,
    loo_plan,
    mask_codes,
    permutation,
    run_until,
)


def test_loo_plan_rows():
    plan = loo_plan(5, train_seed=7)
    assert len(plan) == 6 and plan.masks[0].all() and (plan.seeds == 7).all()
    assert list(plan.meta["removed"]) == [-1, 0, 1, 2, 3, 4]
    for r in range(1, 6):
        assert plan.masks[r].sum() == 4 and not plan.masks[r, r - 1]
    sub = loo_plan(5, indices=[3, 1])
    assert list(sub.meta["removed"]) == [-1, 3, 1] and not sub.masks[1, 3]


@pytest.mark.parametrize("make", [fixed_fraction_plan, bernoulli_plan])
def test_static_plans_are_row_addressable(make):
    full = make(30, 40, seed=3, train_seed=None)
    parts = [make(30, hi - lo, seed=3, start=lo, train_seed=None) for lo, hi in [(0, 7), (7, 25), (25, 40)]]
    merged = SubsetPlan.concat(parts)
    np.testing.assert_array_equal(merged.masks, full.masks)
    np.testing.assert_array_equal(merged.seeds, full.seeds)
    np.testing.assert_array_equal(full.rows(7, 25).masks, parts[1].masks)
    assert len(set(full.seeds.tolist())) == 40  # per-mask seeds differ
    assert (make(30, 5, seed=3, train_seed=11).seeds == 11).all()
    assert not np.array_equal(make(30, 5, seed=4).masks, full.masks[:5])


def test_fixed_fraction_size_and_bernoulli_rate():
    plan = fixed_fraction_plan(50, 200, alpha=0.7, seed=1)
    assert (plan.masks.sum(axis=1) == 35).all()
    plan = bernoulli_plan(50, 400, seed=1)
    assert abs(plan.masks.mean() - 0.5) < 0.02
    with pytest.raises(EstimatorError):
        fixed_fraction_plan(10, 3, alpha=1.5)


def test_exhaustive_plan_codes_and_limit():
    plan = exhaustive_plan(4)
    assert len(plan) == 16
    np.testing.assert_array_equal(mask_codes(plan.masks), np.arange(16))
    with pytest.raises(EstimatorError) as e:
        exhaustive_plan(21)
    assert e.value.parameter == "/method/params/max_n"


def test_plan_roundtrip_and_shard_ranges():
    plan = loo_plan(6)
    back = SubsetPlan.from_arrays(plan.to_arrays())
    np.testing.assert_array_equal(back.masks, plan.masks)
    np.testing.assert_array_equal(back.meta["removed"], plan.meta["removed"])
    assert plan.shard_ranges(3) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError):
        SubsetPlan(np.ones((2, 3), bool), [0])


def _drive(sampler, utility, max_masks):
    """Run a permutation sampler against a utility function of the mask; return completed walks."""
    walks = []
    while True:
        plan = sampler.next_plan(max_masks)
        if plan is None:
            break
        u = np.array([utility(m) for m in plan.masks])
        done = sampler.observe(plan, {"utility": u})
        walks += [
            (int(p[0]), tuple(p), tuple(np.round(pu, 12)))
            for p, pu in zip(done.perms, done.prefix_utilities, strict=True)
        ]
    return sorted(walks)


def _utility(mask):
    w = np.array([0.3, -0.1, 0.2, 0.05, 0.0, 0.25])
    return float(np.tanh((w * mask).sum() * 2))


@pytest.mark.parametrize("truncation", [0.0, 0.05])
def test_permutation_walks_do_not_depend_on_round_sizes(truncation):
    a = _drive(PermutationSampler(6, seed=2, truncation=truncation, in_flight=3, max_walks=12), _utility, 4)
    b = _drive(
        PermutationSampler(6, seed=2, truncation=truncation, in_flight=12, max_walks=12), _utility, 100
    )
    assert len(a) == 12 and a == b


def test_permutation_walk_prefixes_and_truncation():
    s = PermutationSampler(6, seed=0, truncation=0.0, in_flight=2, max_walks=2)
    first = s.next_plan(10)
    assert list(first.meta["length"]) == [0, 6]
    s.observe(first, {"utility": np.array([0.0, 1.0])})
    plan = s.next_plan(100)
    assert len(plan) == 10  # 2 walks x prefixes of length 1..5
    for r in range(len(plan)):
        perm = permutation(6, 0, int(plan.meta["walk"][r]))
        expect = np.zeros(6, bool)
        expect[perm[: plan.meta["length"][r]]] = True
        np.testing.assert_array_equal(plan.masks[r], expect)
    done = s.observe(plan, {"utility": plan.masks.sum(axis=1) / 6.0})
    assert done.n_walks == 2 and (done.truncated_at == 6).all()
    np.testing.assert_allclose(done.prefix_utilities[:, -1], 1.0)
    assert s.next_plan(10) is None and s.exhausted
    # truncation: the utility reaches U(D) after 2 points, the rest get marginal 0
    t = PermutationSampler(6, seed=0, truncation=0.01, in_flight=1, max_walks=1)
    t.observe(t.next_plan(5), {"utility": np.array([0.0, 1.0])})
    got = None
    while got is None or got.n_walks == 0:
        plan = t.next_plan(1)
        got = t.observe(plan, {"utility": np.minimum(plan.masks.sum(axis=1) / 2.0, 1.0)})
    assert got.truncated_at[0] == 2
    np.testing.assert_allclose(got.prefix_utilities[0], [0, 0.5, 1, 1, 1, 1, 1])


def test_stream_sampler_limits_and_seeds():
    s = StreamSampler(10, "bernoulli", seed=5, train_seed=None, limit=25)
    rows = []
    while (plan := s.next_plan(10)) is not None:
        rows.append(plan)
    merged = SubsetPlan.concat(rows)
    assert len(merged) == 25 and s.exhausted
    np.testing.assert_array_equal(merged.masks, bernoulli_plan(10, 25, seed=5).masks)
    np.testing.assert_array_equal(merged.seeds, bernoulli_plan(10, 25, seed=5, train_seed=None).seeds)


def test_permutation_budget_leaves_no_walk_half_trained():
    """A budget stop must not strand walks: 32 walks in flight (the registered TMC's with truncation)
    of n = 50 points, 8 prefixes each per round, used to spend a 1,000-row budget on 32 unfinished walks
    and return none when the utility never truncates. Measured before ``max_rows``: 0 walks here; with
    the registered tmc_shapley's defaults (2,000 retrains) 32 walks for n = 50, 0 for n = 100 and 200
    (3 for n = 100 with a tanh utility that sometimes truncates). Now: 20 walks, 980 of 999 rows used."""
    n = 50

    def trainer(plan):  # U(S) = |S| / n never comes within 1 % of U(D) = 1 before the last point
        return {"utility": plan.masks.sum(axis=1) / n}

    def run(max_rows):
        sampler = PermutationSampler(n, seed=0, truncation=0.01, in_flight=32, max_rows=max_rows)
        return sampler, run_until(sampler, trainer, PermutationAccumulator(n), max_retrains=1000)

    _, unbounded = run(None)
    assert unbounded.n_samples == 0 and unbounded.n_retrains == 1000  # the stranded budget
    sampler, bounded = run(999)  # the budget less the full-set row
    assert bounded.n_samples == 999 // (n - 1) == 20
    assert bounded.n_retrains == 1 + 20 * (n - 1) and bounded.stopped_by == "max_retrains"
    assert sampler.out_of_budget and sampler.rows_handed_out == 20 * (n - 1)
    np.testing.assert_allclose(bounded.values.sum(), 1.0, rtol=0, atol=1e-12)  # every walk telescopes
