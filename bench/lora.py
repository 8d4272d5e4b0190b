"""Influence on LoRA adapters (DataInf's setting, ESTIMATORS.md 2.15): our estimators side by side with
pyDVL's per-example DataInf, on a lora_mlp fine-tuned from a pretrained base.

Workload (CPU, sklearn digits, deterministic): a 64-64-10 ReLU MLP pretrained on the digits 0-4 only;
rank-``--rank`` LoRA adapters on both layers (the base frozen) fine-tuned by our SGD recipe on all ten
digits (``--n`` rows, 3 checkpoints). Quality = linear datamodeling score: ``--subsets`` random
half-size subsets, each retrained from the same initial weights (base + initial adapters) with the
fine-tuning recipe for ``--seeds`` seeds, vmapped over models; LDS = Spearman over subsets of the summed
scores against minus the seed-averaged query loss, averaged over queries. Times: median of
``--repeats`` runs, one thread, after a warm-up run.

Usage: python bench/lora.py [--rank 4] [--n 600] [--queries 50] [--subsets 50] [--seeds 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workloads import digits_split  # noqa: E402

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, init_model, train  # noqa: E402
from app.estimators.valuation.engine import train_subsets  # noqa: E402

CLS = TaskSpec("classification", "cross_entropy")
BASE = {"in_features": 64, "hidden": [64], "num_classes": 10, "activation": "relu"}
METHODS = {  # the Hessian-based ones need damping: the fine-tuned adapters are not at a minimum
    "datainf": {"damping_scale": 0.1},
    "if_exact": {"damping": 0.05},
    "if_cg": {"damping": 0.05, "max_iter": 100, "rtol": 1e-8},
    "ekfac": {"damping": None, "seed": 0},
    "logra": {"k_in": 8, "k_out": 8, "damping": 1e-3, "seed": 0},
    "grad_dot": {},
    "tracincp": {},
    "trak": {"projection_dim": 256, "seed": 0, "damping": 0.0, "use_checkpoints": True},
}


def workload(args) -> tuple[InfluenceProblem, np.ndarray, np.ndarray]:
    """The fine-tuned problem (with its initial weights) and the LDS masks and outputs."""
    x, y, qx, qy = (t.float() if t.is_floating_point() else t for t in digits_split(args.n, args.queries))
    base = init_model("mlp", BASE, seed=0)
    low = y < 5
    pre = Recipe(
        optimizer="sgd", learning_rate=0.05, momentum=0.9, epochs=20, batch_size=64, num_checkpoints=0
    )
    pretrained = train(base, CLS, x[low], y[low], pre)
    model = init_model("lora_mlp", {**BASE, "rank": args.rank, "alpha": float(args.rank)}, seed=1)
    model.load_state_dict(pretrained.weights, strict=False)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(
        optimizer="sgd", learning_rate=0.02, momentum=0.9, epochs=15, batch_size=32, weight_decay=1e-3,
        num_checkpoints=3,
    )  # fmt: skip
    tuned = train(model, CLS, x, y, recipe)
    problem = InfluenceProblem(
        model=model, task=CLS, weights=tuned.weights, train_x=x, train_y=y, query_x=qx, query_y=qy,
        checkpoints=tuned.checkpoints, weight_decay=recipe.weight_decay, initial_weights=initial,
    )  # fmt: skip
    rng = np.random.default_rng(123)
    masks = np.zeros((args.subsets, args.n), dtype=bool)
    for row in masks:
        row[rng.choice(args.n, args.n // 2, replace=False)] = True
    template = init_model("lora_mlp", {**BASE, "rank": args.rank, "alpha": float(args.rank)}, seed=1)
    template.load_state_dict(initial)
    started = time.perf_counter()
    outputs = np.zeros((args.subsets, args.queries))
    retrain = dataclasses.replace(recipe, num_checkpoints=0)
    for s in range(args.seeds):
        out = train_subsets(
            lambda _seed: copy.deepcopy(template), CLS, retrain, x, y, masks, [1000 + s] * args.subsets,
            {"query": (qx, qy)}, {"query": "loss"},
        )  # fmt: skip
        outputs += out["query"] / args.seeds
    print(f"LDS ground truth: {args.subsets} subsets x {args.seeds} seeds retrained from the initial "
          f"weights in {time.perf_counter() - started:.1f} s")  # fmt: skip
    return problem, masks, outputs


def lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> float:
    from scipy.stats import spearmanr

    pred = np.asarray(scores, dtype=np.float64) @ masks.T.astype(np.float64)  # m x M
    return float(np.mean([spearmanr(pred[j], -outputs[:, j]).statistic for j in range(pred.shape[0])]))


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def pydvl_datainf(problem: InfluenceProblem, lambdas: dict[str, float]):
    """pyDVL's InverseHarmonicMeanInfluence, layer-wise with our lambda_l, fit on one row per batch."""
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import InverseHarmonicMeanInfluence
    from torch.utils.data import DataLoader, TensorDataset

    model = copy.deepcopy(problem.model)
    model.load_state_dict(problem.weights)
    model.eval()
    x, y, qx, qy = problem.train_x, problem.train_y, problem.query_x, problem.query_y
    # our layers, one per adapter matrix (pyDVL's LAYER_WISE would merge a module's A and B)
    blocks = OrderedDict((layer, [f"{layer}.weight"]) for layer in lambdas)

    def run() -> np.ndarray:
        inf = InverseHarmonicMeanInfluence(
            model, F.cross_entropy, regularization={**lambdas, "__unused__": None}, block_structure=blocks,
        ).fit(DataLoader(TensorDataset(x, y), batch_size=1))  # fmt: skip
        factors = inf.influence_factors(qx, qy)
        cols = [
            inf.influences_from_factors(factors, x[s : s + 256], y[s : s + 256], mode=InfluenceMode.Up)
            for s in range(0, len(y), 256)
        ]
        return torch.cat(cols, dim=1).detach().double().numpy() / len(y)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--n", type=int, default=600, help="fine-tuning rows")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--subsets", type=int, default=50, help="LDS subsets")
    ap.add_argument("--seeds", type=int, default=2, help="retraining seeds per subset")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    problem, masks, outputs = workload(args)
    n_adapters = sum(p.numel() for p in problem.model.parameters() if p.requires_grad)
    machine = platform.processor() or platform.machine()
    print(f"lora_mlp 64-64-10, rank {args.rank}: {n_adapters} adapter parameters (base frozen); "
          f"n = {args.n}, m = {args.queries}; {machine}, torch {torch.__version__}")  # fmt: skip
    rows = []
    ours_datainf = None
    for name, params in METHODS.items():
        est = get_estimator(name)
        seconds, out = timed(
            lambda est=est, params=params: est.attribute(problem, params, runtime=Runtime()), args.repeats
        )
        rows.append((name, "ours", seconds, lds(out.scores, masks, outputs), ""))
        if name == "datainf":
            ours_datainf = out
    try:
        run = pydvl_datainf(problem, ours_datainf.metadata["layer_damping"])
        seconds, peer = timed(run, max(1, args.repeats - 2))
        gap = np.abs(peer - ours_datainf.scores).max() / np.abs(peer).max()
        rows.append(
            (
                "datainf",
                "pyDVL InverseHarmonicMean",
                seconds,
                lds(peer, masks, outputs),
                f"max|diff|/max = {gap:.1e}",
            )
        )
    except ImportError as exc:
        rows.append(
            ("datainf", "pyDVL InverseHarmonicMean", float("nan"), float("nan"), f"not installed: {exc}")
        )
    print("\n| method | implementation | time s | LDS | note |\n|---|---|---|---|---|")
    for name, impl, seconds, quality, note in rows:
        print(f"| {name} | {impl} | {seconds:.4g} | {quality:.3f} | {note} |")
    ours = next(r for r in rows if r[0] == "datainf" and r[1] == "ours")
    peer = rows[-1]
    if np.isfinite(peer[2]):
        print(f"\ndatainf: ours {peer[2] / ours[2]:.1f}x faster than pyDVL's per-example DataInf")


if __name__ == "__main__":
    main()
