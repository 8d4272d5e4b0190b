"""Peak memory of TRAK's train-side features and of the train-state file (bench/RESULTS.md).

    python bench/features_memory.py [--n 500000] [--k 256] [--budgets none,2048,256,32] [--before DIR]

Each measurement runs in a fresh subprocess with one compute thread. A sampler thread reads
``RssAnon`` from ``/proc/self/status`` every 2 ms: anonymous resident memory, which the kernel
cannot drop. Pages of a memory-mapped feature file count as ``RssFile`` and can be written back and
evicted, so they are reported apart (``VmHWM``, the peak of both).

* ``trak``: fit + scores + self-influence of TRAK (countsketch projection to ``k``) on a synthetic
  linear model, ``n`` training examples, 8 queries, under each memory budget (``none``: no budget,
  everything in memory). ``--before DIR`` also runs the code in ``DIR`` (e.g. ``git archive <commit>
  app | tar -x -C DIR``) with no budget, as it was before the features were chunked.
* ``state``: a state holding an ``n x k`` float32 feature matrix: the worker's validation and storage
  of the child's file, the old way (load every tensor, check, re-serialise) and the new way (stream a
  copy, check it in blocks; ``worker/sandbox.py:copy_state_file``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class _Peak:
    """Peak RssAnon growth (sampled) and VmHWM growth over a block."""

    def __enter__(self) -> _Peak:
        with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
            fh.write("5")
        self.base_anon, self.base_rss = _status("RssAnon"), _status("VmRSS")
        self.peak, self.stop = self.base_anon, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.stop = True
        self.thread.join()

    def result(self) -> dict:
        return {
            "anon_mib": round((self.peak - self.base_anon) / 2**20),
            "hwm_mib": round((_status("VmHWM") - self.base_rss) / 2**20),
            "seconds": round(self.seconds, 1),
        }


def _child_trak(n: int, k: int, budget: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from app.estimators import InfluenceProblem, Runtime, TaskSpec, get_estimator, init_model

    d, classes, m = 64, 10, 8
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    model = init_model("linear", {"in_features": d, "num_classes": classes}, 0)
    weights = {name: v.detach().clone() for name, v in model.state_dict().items()}
    problem = InfluenceProblem(
        model=model, task=TaskSpec(), weights=weights, train_x=x, train_y=y,
        query_x=x[:m], query_y=y[:m], measurement="margin",
    )  # fmt: skip
    extra = {}
    if budget != "none":
        extra = {"memory_budget_bytes": int(float(budget) * 2**20), "scratch_dir": Path(tempfile.mkdtemp())}
    runtime = Runtime(chunk_size=4096, **extra)
    params = {"projection_dim": k, "projection": "countsketch"}
    with _Peak() as peak:
        out = get_estimator("trak").attribute(problem, params, want_self_influence=True, runtime=runtime)
    if extra:
        extra["scratch_dir"].rmdir()  # the mapped files were unlinked as soon as they were mapped
    return {**peak.result(), "checksum": [float(out.scores.sum()), float(out.self_influence.sum())]}


def _child_state(n: int, k: int, how: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from app.estimators.features import FeatureWriter, save_tensors
    from app.storage.formats import read_state_dict
    from worker.sandbox import copy_state_file

    folder = Path(tempfile.mkdtemp())
    writer = FeatureWriter(n, k, budget=32 * 2**20, scratch_dir=folder)
    g = torch.Generator().manual_seed(0)
    for _ in range(0, n, 50_000):
        writer.write(torch.randn(min(50_000, n - writer.filled), k, generator=g))
    tensors = {"features_0": writer.finish(), "kernel_inverse_0": torch.eye(k, dtype=torch.float64)}
    save_tensors(folder / "child.safetensors", tensors, {"info": "{}"})
    del tensors, writer
    with _Peak() as peak:
        if how == "old":  # runner._store_state before: load every tensor, check, re-serialise
            loaded = read_state_dict(
                folder / "child.safetensors", pointer="/state", max_bytes=2**40, allowed_dtypes=("F32", "F64")
            )
            save_file(loaded, str(folder / "stored.safetensors"), metadata={"info": "{}"})
            del loaded
        else:
            copy_state_file(
                folder / "child.safetensors", folder / "stored.safetensors", max_bytes=2**40, what="state"
            )
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return peak.result()


def _run(args: list[str], source: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        capture_output=True, text=True, cwd=source, env=env, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument(
        "--budgets", default="none,2048,256,32", help="MiB, comma-separated; none = no budget"
    )
    parser.add_argument("--before", type=Path, help="a source tree of the code before the change")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, k, option = args.child
        run = _child_trak if kind == "trak" else _child_state
        print(json.dumps(run(int(n), int(k), option)))
        return
    n, k = args.n, args.k
    print(f"n = {n}, k = {k}: features {n * k * 4 / 2**20:.0f} MiB float32, one thread")
    print("| what | budget MiB | peak anonymous MiB | peak RSS incl. mapped pages MiB | s |")
    print("|---|---|---|---|---|")
    rows = [("TRAK fit+score, before", "none", args.before)] if args.before else []
    rows += [("TRAK fit+score", b, ROOT) for b in args.budgets.split(",")]
    for label, budget, source in rows:
        r = _run(["trak", str(n), str(k), budget], source)
        print(f"| {label} | {budget} | {r['anon_mib']} | {r['hwm_mib']} | {r['seconds']} |")
        print(f"  (scores sum, self-influence sum: {r['checksum']})")
    for how in ("old", "new"):
        r = _run(["state", str(n), str(k), how], ROOT)
        label = "worker: validate + store the state file, " + (
            "load + re-serialise" if how == "old" else "stream + block check"
        )
        print(f"| {label} | - | {r['anon_mib']} | {r['hwm_mib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
