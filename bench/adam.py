"""TracInCP on an Adam-trained MLP, with and without ``adam_preconditioning``, beside magic (the exact
metagradient of the same run), SOURCE, EK-FAC and grad_dot: time and LDS. ``--optimizer sgd`` trains
with plain SGD instead (short runs that stop before convergence are SOURCE's case).

Workload (CPU, sklearn digits, deterministic): a 64-32-10 ReLU MLP trained by our recipe (Adam lr
3e-3, or SGD lr 0.05; ``--epochs`` epochs of batches of 32, weight decay 1e-3, 5 checkpoints) on
``--n`` rows. Quality = linear datamodeling score: ``--subsets`` random half-size subsets, each
retrained by the same recipe for ``--seeds`` seeds (vmapped over models); LDS = Spearman over subsets
of the summed scores against minus the seed-averaged query loss, averaged over queries. Times: median
of ``--repeats`` runs, one thread, after a warm-up run.

Usage: python bench/adam.py [--optimizer adam|sgd] [--n 600] [--queries 50] [--subsets 50] [--seeds 2]
       [--epochs 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workloads import digits_split  # noqa: E402
from lora import lds, timed  # noqa: E402

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, init_model, train  # noqa: E402
from app.estimators.valuation.engine import train_subsets  # noqa: E402

CLS = TaskSpec("classification", "cross_entropy")
ARCH = {"in_features": 64, "hidden": [32], "num_classes": 10}
METHODS = {
    "tracincp": ("plain gradients", {}),
    "tracincp ": ("adam_preconditioning", {"adam_preconditioning": True}),
    "magic": ("exact metagradient of the run", {}),
    "source": ("5 checkpoint segments", {}),
    "ekfac": ("damping heuristic", {}),
    "grad_dot": ("final weights", {}),
}


def workload(args) -> tuple[InfluenceProblem, np.ndarray, np.ndarray]:
    x, y, qx, qy = digits_split(args.n, args.queries)
    x, qx = x.float(), qx.float()
    recipe = Recipe(
        optimizer=args.optimizer, learning_rate=3e-3 if args.optimizer == "adam" else 0.05,
        epochs=args.epochs, batch_size=32, weight_decay=1e-3, num_checkpoints=5,
    )  # fmt: skip
    model = init_model("mlp", ARCH, seed=recipe.seed)
    res = train(model, CLS, x, y, recipe)
    problem = InfluenceProblem(
        model=model, task=CLS, weights=res.weights, train_x=x, train_y=y, query_x=qx, query_y=qy,
        checkpoints=res.checkpoints, weight_decay=recipe.weight_decay, recipe=dataclasses.asdict(recipe),
    )  # fmt: skip
    rng = np.random.default_rng(123)
    masks = np.zeros((args.subsets, args.n), dtype=bool)
    for row in masks:
        row[rng.choice(args.n, args.n // 2, replace=False)] = True
    started = time.perf_counter()
    outputs = np.zeros((args.subsets, args.queries))
    retrain = dataclasses.replace(recipe, num_checkpoints=0)
    for s in range(args.seeds):
        seeds = [1000 * (j + 1) + s for j in range(args.subsets)]
        out = train_subsets(
            ("mlp", ARCH), CLS, retrain, x, y, masks, seeds, {"query": (qx, qy)}, {"query": "loss"}
        )
        outputs += out["query"] / args.seeds
    print(f"LDS ground truth: {args.subsets} subsets x {args.seeds} seeds retrained in "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    return problem, masks, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--n", type=int, default=600, help="training rows")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--subsets", type=int, default=50, help="LDS subsets")
    ap.add_argument("--seeds", type=int, default=2, help="retraining seeds per subset")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    problem, masks, outputs = workload(args)
    p = sum(t.numel() for t in problem.model.parameters())
    machine = platform.processor() or platform.machine()
    print(f"mlp 64-32-10 ({p} parameters) trained by {args.optimizer} for {args.epochs} epochs, "
          f"n = {args.n}, m = {args.queries}; {machine}, torch {torch.__version__}")  # fmt: skip
    print("\n| method | variant | time s | LDS |\n|---|---|---|---|")
    for key, (variant, params) in METHODS.items():
        if params.get("adam_preconditioning") and args.optimizer != "adam":
            continue
        est = get_estimator(key.strip())
        seconds, out = timed(
            lambda est=est, params=params: est.attribute(problem, params, runtime=Runtime()), args.repeats
        )
        print(f"| {key.strip()} | {variant} | {seconds:.4g} | {lds(out.scores, masks, outputs):.3f} |")


if __name__ == "__main__":
    main()
