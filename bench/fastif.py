"""FastIF against the LiSSA influence it filters: recall@100, LDS and time as k_candidates varies.

ESTIMATORS.md 2.16 asks for the recall@100 of the full method's top 100 as k_candidates varies. On the
bench MLP workload (``_workloads.mlp_workload``: its model, queries, LiSSA settings and LDS ground truth)
this prints, for ``if_lissa`` and ``fastif`` at several k_candidates:

* ``time s``: median of ``--repeats`` runs after a warm-up, one thread;
* ``grad rows``: training rows whose gradient was computed (the union of the candidate sets);
* ``recall@100``: mean over queries of the share of ``if_lissa``'s top 100 among FastIF's top 100
  (FastIF ranks its candidates only), and the same against ``if_exact`` (exact inverse Hessian);
* ``LDS``: the workload's linear datamodeling score.

A second table repeats the timing for 1, 10 and all queries at one k_candidates: the fewer the queries,
the smaller the union of their candidates. A third does so on the training set tiled ``--tile`` times
with jitter (same model), where the per-example gradients rather than LiSSA's s_test dominate.
Timings within a table are interleaved (one run of each variant per round) so drift hits all alike.

Usage: python bench/fastif.py [--quick] [--repeats 3] [--k 22,88,350] [--features penultimate|input]
                           [--tile 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workloads import mlp_workload  # noqa: E402

from app.estimators import Runtime, get_estimator  # noqa: E402

RT = Runtime(chunk_size=256)


def interleaved(runs: dict, repeats: int) -> dict:
    """name -> (median seconds, last result); a warm-up of each, then ``repeats`` rounds of one run each."""
    outs = {name: fn() for name, fn in runs.items()}
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(times[name]), outs[name]) for name in runs}


def recall_at(full: np.ndarray, filtered: np.ndarray, k: int = 100) -> float:
    """Mean over queries of |top-k(full) & top-k(filtered)| / k; ``filtered`` ranks its nonzero entries."""
    shares = []
    for j in range(full.shape[0]):
        top = np.argsort(-full[j])[:k]
        candidates = np.flatnonzero(filtered[j])
        got = candidates[np.argsort(-filtered[j, candidates])[:k]]
        shares.append(len(np.intersect1d(top, got)) / k)
    return float(np.mean(shares))


def speed_table(problem, lissa_hp: dict, fastif, k: int, repeats: int) -> None:
    """if_lissa vs fastif at one k_candidates for 1, 10 and all queries of ``problem``."""
    print(f"| queries | if_lissa s | fastif s (k={k}) | speed-up | grad rows |")
    print("|---|---|---|---|---|")
    for m in sorted({1, min(10, problem.n_query), problem.n_query}):
        sub = dataclasses.replace(problem, query_x=problem.query_x[:m], query_y=problem.query_y[:m])
        t = interleaved(
            {
                "if_lissa": lambda sub=sub: get_estimator("if_lissa").attribute(sub, lissa_hp, runtime=RT),
                "fastif": fastif(sub, k),
            },
            repeats,
        )
        (base_s, _), (seconds, out) = t["if_lissa"], t["fastif"]
        rows = out.metadata["candidate_gradient_rows"]
        print(f"| {m} | {base_s:.2f} | {seconds:.2f} | {base_s / seconds:.2f}x | {rows} |")


def tiled(problem, times: int, seed: int = 0):
    """The training set repeated ``times`` times, each copy after the first jittered by N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    x, y = problem.train_x, problem.train_y
    copies = [x] + [x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(times - 1)]
    return dataclasses.replace(problem, train_x=torch.cat(copies), train_y=y.repeat(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small workload (n=300, 10 queries)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", default=None, help="comma-separated k_candidates (default: n/64, n/16, n/4)")
    ap.add_argument("--features", default="penultimate", choices=["penultimate", "input"])
    ap.add_argument("--tile", type=int, default=16, help="copies of the training set in the third table")
    args = ap.parse_args()
    torch.set_num_threads(1)

    w = mlp_workload(args.quick)
    problem, n = w.problem, w.n
    ks = [int(k) for k in args.k.split(",")] if args.k else [max(1, n // 64), n // 16, n // 4]
    lissa_hp = w.hp["if_lissa"]
    exact = get_estimator("if_exact").attribute(problem, w.hp["if_exact"], runtime=RT).scores

    def fastif(prob, k: int):
        params = {**lissa_hp, "k_candidates": k, "features": args.features}
        return lambda: get_estimator("fastif").attribute(prob, params, runtime=RT)

    runs = {"if_lissa": lambda: get_estimator("if_lissa").attribute(problem, lissa_hp, runtime=RT)}
    runs.update({k: fastif(problem, k) for k in ks})
    t = interleaved(runs, args.repeats)
    lissa_s, lissa = t["if_lissa"]

    print(f"# {w.description}; LiSSA {lissa_hp}; kNN on {args.features} features")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread\n")
    print(
        "| method | k_candidates | time s | vs if_lissa | grad rows "
        "| recall@100 (if_lissa) | recall@100 (if_exact) | LDS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    lds = w.quality(lissa.scores)["lds"]
    print(
        f"| if_lissa | n = {n} | {lissa_s:.2f} | 1.00x | {n} | 1.000 "
        f"| {recall_at(exact, lissa.scores):.3f} | {lds:.3f} |"
    )
    for k in ks:
        seconds, out = t[k]
        rows = out.metadata["candidate_gradient_rows"]
        print(
            f"| fastif | {k} | {seconds:.2f} | {lissa_s / seconds:.2f}x | {rows} "
            f"| {recall_at(lissa.scores, out.scores):.3f} | {recall_at(exact, out.scores):.3f} "
            f"| {w.quality(out.scores)['lds']:.3f} |"
        )

    print(f"\n## the workload's training set, n = {n}")
    speed_table(problem, lissa_hp, fastif, n // 16, args.repeats)
    big = tiled(problem, args.tile)
    print(f"\n## its training set tiled {args.tile}x with jitter, n = {big.n_train}")
    speed_table(big, lissa_hp, fastif, n // 16, args.repeats)


if __name__ == "__main__":
    main()
