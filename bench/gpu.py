"""GPU workload of the gradient-based estimators: ResNet-9 on CIFAR-shaped synthetic data.

One device, from the model and the data to the ``m x n`` score matrix (fit included), median of
``--repeats`` runs after a warm-up on a slice of the data (CUDA context, cuBLAS handles, kernels):

* ``tracin_rp``: projected-gradient attribution, TracIn-RP (``tracincp`` with one checkpoint and a
  sparse projection to ``--projection-dim``, ``--projection``: a count sketch by default, O(p) per
  gradient, or SRHT): every training and query gradient is formed, projected and scored;
* ``trak``: TRAK with the same projection (features, kernel, scores);
* ``ekfac``: EK-FAC influence, factors and eigenbases fitted on the training set, then scored.

Targets at the full size (20,000 train x 1,000 queries, projection 2,048, the 6.57M-parameter
DAWNBench ResNet-9): projected-gradient attribution under 3 s, EK-FAC fit + score under 20 s. The
weights are a seeded initialisation and the labels random: the cost of these estimators does not
depend on what the model has learned. Nothing is downloaded. The dense projections (Gaussian,
Rademacher) are not used here: their ``p x k`` matrix (13.5G entries at this size) is drawn on the
CPU, block by block, for every chunk of gradients.

Usage::

    python bench/gpu.py                                  # the full workload on the first CUDA device
    python bench/gpu.py --device cpu --quick             # smoke run: a narrow ResNet-9, small sets

Results are printed as a table and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app.estimators import Checkpoint, InfluenceProblem, Runtime, TaskSpec, get_estimator, init_model  # noqa: E402

TARGETS_S = {"tracin_rp": 3.0, "ekfac": 20.0}
"""Time targets (seconds) at the full size; TRAK is reported without one."""


def make_problem(n_train: int, n_query: int, base_channels: int, seed: int = 0) -> InfluenceProblem:
    """A seeded ResNet-9 and CIFAR-shaped Gaussian inputs (3 x 32 x 32, flat) with random labels."""
    arch = {"in_channels": 3, "height": 32, "width": 32, "num_classes": 10, "base_channels": base_channels}
    model = init_model("resnet9", arch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_query, 3 * 32 * 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_query,), generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return InfluenceProblem(
        model=model,
        task=TaskSpec("classification", "cross_entropy"),
        weights=state,
        train_x=x[:n_train],
        train_y=y[:n_train],
        query_x=x[n_train:],
        query_y=y[n_train:],
        weight_decay=5e-4,
        checkpoints=[Checkpoint(0, 0.1, state)],
    )


def methods(projection_dim: int, projection: str) -> dict[str, tuple[str, dict]]:
    sketch = {"projection_dim": projection_dim, "projection": projection, "seed": 0}
    return {
        "tracin_rp": ("tracincp", sketch),
        "trak": ("trak", {**sketch, "damping": 1e-3}),
        "ekfac": ("ekfac", {}),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, params: dict, problem: InfluenceProblem, runtime: Runtime, repeats: int) -> dict:
    """Median wall time of ``repeats`` full attributions, after one on a slice of the data."""
    est, dev = get_estimator(name), runtime.device
    warm = dataclasses.replace(problem, train_x=problem.train_x[:256], train_y=problem.train_y[:256],
                               query_x=problem.query_x[:32], query_y=problem.query_y[:32])  # fmt: skip
    est.attribute(warm, params, runtime=runtime)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, scores = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = est.attribute(problem, params, runtime=runtime).scores
        _sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    finite = bool(torch.isfinite(torch.as_tensor(scores)).all())
    return {"time_s": statistics.median(times), "times_s": times, "peak_gib": peak, "finite": finite,
            "shape": list(scores.shape)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    ap.add_argument(
        "--quick", action="store_true", help="smoke sizes: 256 x 32, base width 8, projection 256"
    )
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--projection-dim", type=int, default=2048)
    ap.add_argument("--projection", default="countsketch", choices=["countsketch", "srht"])
    ap.add_argument("--base-channels", type=int, default=64, help="ResNet-9 width (64: 6.57M parameters)")
    ap.add_argument("--chunk-size", type=int, default=512, help="rows per gradient chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="tracin_rp,trak,ekfac", help="comma-separated subset")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_query, args.base_channels, args.projection_dim = 256, 32, 8, 256
        args.chunk_size, args.repeats = 64, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu (and --quick) for a smoke run", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the CPU's float32 answers, not TF32's
    problem = make_problem(args.n_train, args.n_query, args.base_channels)
    n_params = sum(p.numel() for p in problem.model.parameters())
    runtime = Runtime(device=device, dtype=torch.float32, chunk_size=args.chunk_size)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"ResNet-9 ({n_params:,} parameters), {args.n_train:,} train x {args.n_query:,} queries, "
          f"projection {args.projection_dim}, {where}, torch {torch.__version__}")  # fmt: skip
    rows = []
    chosen = args.methods.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for label, (name, params) in methods(args.projection_dim, args.projection).items():
        if label not in chosen:
            continue
        r = measure(name, params, problem, runtime, args.repeats)
        target = TARGETS_S.get(label)
        met = None if target is None or args.quick else r["time_s"] < target and r["finite"]
        rows.append(
            {"method": label, "estimator": name, "params": params, "target_s": target, "met": met, **r}
        )
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        goal = "-" if target is None else f"< {target:g} s"
        print(f"  {label:10s} {r['time_s']:8.2f} s  peak {peak:>5s} GiB  target {goal}  met {met}")
        # written after every method: a run stopped by a time limit keeps what it measured
        report = {"device": where, "n_parameters": n_params, "args": vars(args), "rows": rows}
        out.write_text(json.dumps(report, indent=2))
    print(f"rows written to {out}")
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
