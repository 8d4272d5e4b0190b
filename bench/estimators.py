"""Estimator benchmark: our methods vs the peer libraries, side by side, on the same CPU workloads.

For every workload (see ``bench/_workloads.py``) and every method, runs our
implementation and each peer implementation of the same method with matched
hyper-parameters (``bench/_peers.py``) and prints one table per workload:

* ``time s``: wall time of the whole computation (fit + score, from the trained
  model and the data to the m x n score matrix), median of ``--repeats`` runs
  after one untimed warm-up run. The timed runs of a method's implementations are
  interleaved (round k runs each implementation once, in a rotated order), so a
  slow phase of a shared machine hits all of them alike; and the process runs
  with a steady allocator (``--allocator``), so no implementation's time depends
  on what ran before it;
* ``RSS MB``: peak resident-set growth of one extra (untimed) run: a sampler
  thread reads the process RSS (psutil) every 2 ms; baseline taken just before,
  after ``gc.collect()`` and ``malloc_trim``. This is where torch tensors show up;
* ``py MB``: ``tracemalloc`` peak of that same run (Python-side allocations
  only: torch's CPU allocator is invisible to it, numpy's is not);
* quality: the workload's ground-truth figure (LOO Pearson/Spearman, or LDS) of the
  warm-up run's scores, plus ``vs ours`` (mean over queries of the Pearson
  correlation between this implementation's scores and ours: an adapter check);
* ``peer/ours``: the peer's time divided by ours for the same method (> 1: we are faster).

A summary per workload names, for every method, the fastest peer and whether
the target holds: ours at least 2x faster than it with equal or better quality
(headline metric within ``--tolerance``). Everything is also written as JSON
(``--out``). Ground truth is cached in ``bench/out/`` (git-ignored).

Usage::

    .venv/bin/python bench/estimators.py [--quick] [--repeats 3] [--workloads logreg,mlp]
        [--methods if_exact,...] [--no-peers] [--threads 1] [--out bench/out/estimators.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before any peer imports tqdm

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import tracemalloc  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _peers  # noqa: E402
import _workloads  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from app.estimators import Runtime, get_estimator  # noqa: E402
from worker.sandbox import MALLOC_TUNABLES  # noqa: E402

METHOD_ORDER = [
    "if_exact", "if_cg", "if_lissa", "if_arnoldi", "ekfac", "tracincp", "grad_dot", "grad_cos",
    "trak", "datainf", "representer", "logra", "magic", "hydra", "source",
]  # fmt: skip

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def _trim() -> None:
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _RSSPeak:
    """Samples this process's RSS in a thread; ``peak - baseline`` in bytes."""

    def __init__(self, period: float = 0.002) -> None:
        self.proc = psutil.Process()
        self.period = period

    def __enter__(self):
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


# The allocator settings of the worker's job processes: memory freed by one run stays mapped for the
# next, so no run pays page faults for memory an earlier one had returned to the OS. With glibc's
# defaults the times depended on the order of the implementations: pyDVL's CG on the MLP took 3.9-4.4 s
# in a fresh process (1.1M minor faults per run, 2 s of it in the kernel) and 2.1-2.6 s after dattri's
# CG had run (under 100 faults).
STEADY_MALLOC = MALLOC_TUNABLES


def _steady_allocator(argv: list[str]) -> None:
    """Re-execute this script with :data:`STEADY_MALLOC` unless it already runs with it (glibc reads its
    tunables at start-up only)."""
    if _LIBC is None or STEADY_MALLOC in os.environ.get("GLIBC_TUNABLES", ""):
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), STEADY_MALLOC) if t)
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv],
              {**os.environ, "GLIBC_TUNABLES": tunables})  # fmt: skip


def _timed(run) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def measure_method(runs: dict, repeats: int, *, slow_s: float, use_tracemalloc: bool, trim: bool) -> dict:
    """Time every implementation of one method: a warm-up each (quality from its result), then
    ``repeats`` interleaved rounds (round ``k`` runs each implementation once, the order rotated by
    ``k``), then one memory run each (RSS sampler, plus tracemalloc unless disabled). ``trim``
    returns freed memory to the OS before every timed run (the default allocator's cold state).

    An implementation whose warm-up takes longer than ``slow_s`` is timed once, right after its
    warm-up, with the RSS sampler on (its overhead is negligible at that length), and no tracemalloc
    run. Returns, per name, the measurement or the exception its run raised."""
    out: dict = {}
    for name, run in runs.items():
        _trim()
        try:
            t0 = time.perf_counter()
            scores = np.asarray(run(), dtype=np.float64)
            warm = time.perf_counter() - t0
            out[name] = {"scores": scores, "warmup_s": warm, "times_s": [], "tracemalloc_peak_mb": None}
            if warm > slow_s:
                _trim()
                with _RSSPeak() as mem:
                    out[name]["times_s"].append(_timed(run))
                out[name]["rss_peak_delta_mb"] = mem.delta / 2**20
        except Exception as e:  # a peer that crashes is reported, not fatal
            out[name] = e
    fast = [n for n in runs if isinstance(out[n], dict) and not out[n]["times_s"]]
    for k in range(repeats):
        for name in fast[k % len(fast) :] + fast[: k % len(fast)] if fast else []:
            if trim:
                _trim()
            out[name]["times_s"].append(_timed(runs[name]))
    for name in fast:
        _trim()
        if use_tracemalloc:
            tracemalloc.start()
        with _RSSPeak() as mem:
            runs[name]()
        out[name]["rss_peak_delta_mb"] = mem.delta / 2**20
        if use_tracemalloc:
            out[name]["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    for m in out.values():
        if isinstance(m, dict):
            m["time_s"] = statistics.median(m["times_s"])
    return out


def _error(e: Exception) -> str:
    first = str(e).splitlines()[0][:150] if str(e) else ""
    return f"n/a: {type(e).__name__}: {first}"


def _corr_vs(a: np.ndarray, b: np.ndarray) -> float:
    vals = []
    for x, y in zip(a, b, strict=True):
        if np.std(x) > 0 and np.std(y) > 0:
            vals.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(vals)) if vals else float("nan")


def _fmt(v, spec: str = ".3f", na: str = "-") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return na
    return format(v, spec)


def _time_fmt(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.4f}" if t < 0.1 else (f"{t:.3f}" if t < 10 else f"{t:.1f}")


def print_table(wl, rows: list[dict], tol: float) -> list[dict]:
    qkeys = next((list(r["quality"]) for r in rows if r.get("quality")), [])
    head = ["method", "implementation", "time s", "RSS MB", "py MB", *qkeys, "vs ours", "peer/ours"]
    lines = []
    for r in rows:
        q = r.get("quality") or {}
        if r.get("error"):
            lines.append([r["method"], r["impl"], "n/a", "", "", *([""] * len(qkeys)), "", r["error"]])
            continue
        lines.append([
            r["method"], r["impl"], _time_fmt(r["time_s"]), _fmt(r["rss_peak_delta_mb"], ".1f"),
            _fmt(r["tracemalloc_peak_mb"], ".1f"), *[_fmt(q.get(k)) for k in qkeys],
            _fmt(r.get("corr_vs_ours")),
            _fmt(r.get("speed_ratio"), ".1f") + ("x" if r.get("speed_ratio") else ""),
        ])  # fmt: skip
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head) - 1)]
    print()
    print(f"== {wl.name}: {wl.description}")
    print(f"   quality: {wl.quality_name}; ground truth: {wl.info.get('ground_truth')}")
    print("   " + "  ".join(h.ljust(widths[i]) if i < len(widths) else h for i, h in enumerate(head)))
    prev = None
    for line in lines:
        if prev is not None and line[0] != prev:
            print()
        prev = line[0]
        cells = (str(c).ljust(widths[i]) if i < len(widths) else str(c) for i, c in enumerate(line))
        print("   " + "  ".join(cells))

    # summary: ours vs the fastest peer of each method
    summary = []
    headline = qkeys[0] if qkeys else None
    print()
    print(f"   target: ours >= 2x faster than the fastest peer, with {headline} >= peer's - {tol}")
    for method in dict.fromkeys(r["method"] for r in rows):
        ours = next((r for r in rows if r["method"] == method and r["impl"] == "ours"), None)
        peers = [r for r in rows if r["method"] == method and r["impl"] != "ours" and not r.get("error")]
        if ours is None or ours.get("error"):
            continue
        if not peers:
            print(f"   {method:12s} no peer ran")
            summary.append({"workload": wl.name, "method": method, "fastest_peer": None, "met": None})
            continue
        fastest = min(peers, key=lambda r: r["time_s"])
        ratio = fastest["time_s"] / ours["time_s"]
        qo, qp = ours["quality"][headline], fastest["quality"][headline]
        met = ratio >= 2.0 and qo >= qp - tol
        why = []
        if ratio < 2.0:
            why.append(f"only {ratio:.2f}x")
        if qo < qp - tol:
            why.append(f"quality {qo:.3f} < {qp:.3f}")
        print(
            f"   {method:12s} fastest peer {fastest['impl']:34s} {ratio:6.1f}x  {headline} ours {qo:.3f} "
            f"peer {qp:.3f}  -> {'MET' if met else 'NOT MET (' + ', '.join(why) + ')'}"
        )
        summary.append({
            "workload": wl.name, "method": method, "fastest_peer": fastest["impl"], "ratio": ratio,
            "quality_ours": qo, "quality_peer": qp, "met": met,
        })  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run (< 2 min)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per implementation, median reported (default 3; 1 with --quick)",
    )
    ap.add_argument("--workloads", default="logreg,mlp", help="comma-separated: logreg, mlp")
    ap.add_argument("--methods", default=None, help="comma-separated subset of methods (default: all)")
    ap.add_argument("--no-peers", action="store_true", help="time our methods only")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for everyone (default 1)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="quality slack for 'equal' (absolute)")
    ap.add_argument(
        "--slow",
        type=float,
        default=20.0,
        help="an implementation whose warm-up takes longer than this many seconds is timed once",
    )
    ap.add_argument("--no-tracemalloc", action="store_true", help="skip the extra tracemalloc run")
    ap.add_argument(
        "--allocator",
        choices=["steady", "default"],
        default="steady",
        help="steady (default): glibc keeps freed memory mapped (the script re-executes itself with "
        "GLIBC_TUNABLES set); default: glibc's defaults, and freed memory is returned to the OS before "
        "every timed run (times then depend on what ran before)",
    )
    ap.add_argument("--out", default=str(HERE / "out" / "estimators.json"), help="JSON output path")
    args = ap.parse_args(argv)
    if args.allocator == "steady":
        _steady_allocator(sys.argv[1:] if argv is None else list(argv))
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.quick:  # smoke run: warm-up + one timed run (with the RSS sampler), no extra memory run
        args.slow = 0.0

    torch.set_num_threads(args.threads)
    _peers.quiet()
    started = time.perf_counter()
    methods = None if args.methods is None else set(args.methods.split(","))
    results: dict = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "environment": _environment(args.threads),
        "workloads": {},
        "rows": [],
        "summary": [],
    }
    for wname in args.workloads.split(","):
        t0 = time.perf_counter()
        wl = _workloads.WORKLOADS[wname](quick=args.quick, log=lambda s: print(s, flush=True))
        results["workloads"][wname] = {"description": wl.description, "build_s": time.perf_counter() - t0,
                                       **_jsonable(wl.info)}  # fmt: skip
        rows: list[dict] = []
        for method in [m for m in METHOD_ORDER if m in wl.hp]:
            if methods is not None and method not in methods:
                continue
            hp = wl.hp[method]
            est = get_estimator(method)

            def ours_run(est=est, hp=hp, wl=wl):
                return est.attribute(wl.problem, hp, runtime=Runtime()).scores

            t_method = time.perf_counter()
            peers = [] if args.no_peers else _peers.PEERS.get(method, [])
            runs, errors = {"ours": ours_run}, {}
            for impl, fn in peers:
                try:
                    runs[impl] = _peers.make(method, impl, fn, wl, hp)
                except _peers.NotAvailable as e:
                    errors[impl] = f"n/a: {e}"
                except Exception as e:  # a peer that cannot be set up is reported, not fatal
                    errors[impl] = _error(e)
            print(f"   ... {wname} {method}: {', '.join(runs)}", end="", flush=True)
            measured = measure_method(runs, args.repeats, slow_s=args.slow, trim=args.allocator == "default",
                                      use_tracemalloc=not args.no_tracemalloc)  # fmt: skip
            print(f"  ({time.perf_counter() - t_method:.0f} s)", flush=True)
            ours = measured["ours"]
            ours_scores = ours["scores"] if isinstance(ours, dict) else None
            for impl in ["ours", *[n for n, _ in peers]]:
                row = {"workload": wname, "method": method, "impl": impl, "params": _jsonable(hp)}
                m = measured.get(impl)
                if impl in errors:
                    row["error"] = errors[impl]
                elif isinstance(m, Exception):
                    row["error"] = _error(m)
                    row["traceback"] = "".join(traceback.format_exception(m, limit=4))
                else:
                    scores = m.pop("scores")
                    row.update(m)
                    row["quality"] = wl.quality(scores)
                    if impl != "ours" and ours_scores is not None:
                        if scores.shape == ours_scores.shape:
                            row["corr_vs_ours"] = _corr_vs(scores, ours_scores)
                        row["speed_ratio"] = m["time_s"] / ours["time_s"]
                rows.append(row)
        results["rows"] += rows
        results["summary"] += print_table(wl, rows, args.tolerance)
        _write(args.out, results, started)
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.0f} s ({args.threads} thread(s), "
          f"repeats={args.repeats})")  # fmt: skip
    print(f"rows written to {_write(args.out, results, started)}")
    return 0


def _write(path: str, results: dict, started: float) -> Path:
    results["total_s"] = time.perf_counter() - started
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(results), indent=1))
    return out


def _environment(threads: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for lib in ("torch", "numpy", "captum", "traker", "dattri", "pyDVL", "kronfluence"):
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            libs[lib] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "cpu": cpu, "cpus": os.cpu_count(), "threads": threads,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "libraries": libs}  # fmt: skip


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
