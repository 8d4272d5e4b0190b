"""Data-valuation benchmark: our retraining-based valuation vs pyDVL, side by side, in one run.

Three comparisons, each on one data split and one utility for every implementation:

* **TMC-Shapley** and **Data Banzhaf (MSR)** on breast cancer (``--n-train`` training
  points, the rest of the 569 as the validation set). Utility = validation accuracy of L2
  logistic regression, ``mean CE + wd/2 ||[W b]||^2`` trained to its minimiser: ours by the
  engine's batched Newton, pyDVL's by scikit-learn's L-BFGS on the equivalent objective
  (``C = 2 / (wd |S|)``, the bias as a penalised column; a subset with one class, which
  scikit-learn refuses, is solved by Newton in the adapter). U(empty) = 1/2 on both
  sides. A utility check on 218 subsets (TMC prefixes and Bernoulli halves) reports how
  many utilities differ between the two learners.
* **KNN-Shapley** (K = 5, Euclidean) on all of sklearn digits (standardised, 1,437
  training / 360 validation points): ours vs pyDVL's exact ``KNNShapleyValuation``.

Time to the same standard error: every Monte-Carlo run stops by its library's own rule on
the same statistic, the largest per-value standard error below a target (ours:
``tolerance``; pyDVL: ``AbsoluteStandardError(target, fraction=1)``), with the same
truncation for TMC (ours ``truncation`` = pyDVL ``RelativeTruncation(rtol, burn_in_fraction=0)``),
30 samples before the rule may fire, and a wall-clock cap on both. Each side checks its rule
at its own cadence (pyDVL after every sample, ours after every round of 256 retrains), so
each overshoots the target by a different amount; the times are therefore normalised to
the *mean* standard error ours reached, using stderr ~ 1/sqrt(samples):
``t_equal = t * (mean stderr / ours' mean stderr)^2``. The speed-up is the peer's
``t_equal`` over ours; ``learner s`` is the part of the peer's time inside its learner's
fit/predict (the speed-up against it is what batched retraining alone buys). "Equal
precision" is visible in the Spearman correlation of the peer's values with ours, next to
that of ours with a rerun of ours under another seed at the same target (the agreement two
independent runs of one estimator can have), and in ``|z| < 2``: the share of points whose
two estimates differ by less than two combined standard errors (95% for the same estimand).

Our runs are repeated ``--repeats`` times (same seed, so the same values; the median time
is reported); pyDVL's ``--peer-repeats`` times (default 1: they are the long ones). The KNN
times are medians of ``--repeats`` after one warm-up. opendataval is reported as not
available when it does not import (it pins torch~=2.1 and numpy<1.26; see RESULTS.md).

Usage::

    .venv/bin/python -m bench.valuation [--quick] [--methods tmc,msr,knn] [--repeats 3]
        [--threads 1] [--out bench/out/valuation.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before pyDVL imports tqdm

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _workloads import digits_split  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, init_model  # noqa: E402
from app.estimators.valuation import bernoulli_plan, permutation, spearman, train_subsets  # noqa: E402

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64)
METHODS = {"tmc": "tmc_shapley", "msr": "banzhaf_msr", "knn": "knn_shapley"}
MIN_SAMPLES = 30


# ----------------------------------------------------------------------------- data


def cancer_split(n_train: int, seed: int = 0):
    """Standardised breast cancer: n_train training rows, the rest validation (numpy float64/int64)."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    if not 2 <= n_train < len(y) - 1:
        raise SystemExit(f"--n-train must be in [2, {len(y) - 2}]")
    tr, va = perm[:n_train], perm[n_train:]
    X = (X - X[tr].mean(0)) / X[tr].std(0)
    return X[tr], y[tr].astype(np.int64), X[va], y[va].astype(np.int64)


def _recipe(wd: float) -> Recipe:
    return Recipe(optimizer="lbfgs", weight_decay=wd, num_checkpoints=0)


def _problem(xt, yt, xv, yv, wd: float) -> InfluenceProblem:
    model = init_model("linear", {"in_features": xt.shape[1], "num_classes": int(yt.max()) + 1}, 0).double()
    t = torch.as_tensor
    return InfluenceProblem(
        model=model, task=CLS, weights=dict(model.state_dict()), train_x=t(xt), train_y=t(yt),
        query_x=t(xv), query_y=t(yv), weight_decay=wd,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the peer's learner


class PeerLogReg(ClassifierMixin, BaseEstimator):
    """Our objective, ``mean_S CE + wd/2 ||theta||^2`` for a 2-class softmax, as scikit-learn fits it.

    The 2-class minimiser is ``(-w/2, w/2)`` with ``w`` minimising ``mean_S logistic + wd/4 ||w||^2``,
    i.e. scikit-learn's ``C sum_S logistic + 1/2 ||w||^2`` with ``C = 2 / (wd |S|)`` on ``[x, 1]``
    without a separate intercept (so the bias is penalised as ours is). scikit-learn refuses a
    single class; that minimiser is found here by Newton. Time spent in fit/predict is summed in
    the class attributes (pyDVL clones the model for every fit)."""

    fit_seconds = 0.0
    fits = 0

    def __init__(self, weight_decay: float = 1e-2, tol: float = 1e-6) -> None:
        self.weight_decay = weight_decay
        self.tol = tol

    @staticmethod
    def _design(x: np.ndarray) -> np.ndarray:
        return np.hstack([x, np.ones((len(x), 1))])

    def fit(self, x, y):
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        xa, y = self._design(np.asarray(x)), np.asarray(y)
        self.classes_ = np.array([0, 1])
        if np.all(y == y[0]):
            self.w_ = self._one_class(xa, 2.0 * y[0] - 1.0)
        else:
            lr = LogisticRegression(C=2.0 / (self.weight_decay * len(y)), fit_intercept=False, tol=self.tol,
                                    max_iter=10_000)  # fmt: skip
            self.w_ = lr.fit(xa, y).coef_[0]
        type(self).fit_seconds += time.perf_counter() - t0
        type(self).fits += 1
        return self

    def _one_class(self, xa: np.ndarray, sign: float) -> np.ndarray:
        w, reg = np.zeros(xa.shape[1]), self.weight_decay / 2
        for _ in range(100):
            s = 1.0 / (1.0 + np.exp(sign * (xa @ w)))  # sigmoid of minus the signed margin
            g = -sign * (s @ xa) / len(xa) + reg * w
            if np.linalg.norm(g) < 1e-12:
                break
            h = (xa.T * (s * (1 - s))) @ xa / len(xa) + reg * np.eye(len(w))
            w = w - np.linalg.solve(h, g)
        return w

    def predict(self, x):
        t0 = time.perf_counter()
        out = (self._design(np.asarray(x)) @ self.w_ > 0).astype(np.int64)
        type(self).fit_seconds += time.perf_counter() - t0
        return out


def utility_check(xt, yt, xv, yv, wd: float, tol: float) -> dict:
    """Our utilities vs the peer learner's on 218 subsets: 4 permutations' prefixes (lengths 1-39, 100,
    200, n-1) and 50 Bernoulli(1/2) subsets."""
    n = len(yt)
    masks = []
    for w in range(4):
        order = permutation(n, 123, w)
        for length in [*range(1, 40), n // 3, 2 * n // 3, n - 1]:
            m = np.zeros(n, bool)
            m[order[:length]] = True
            masks.append(m)
    masks = np.concatenate([np.array(masks), bernoulli_plan(n, 50, seed=123).masks])
    pr = _problem(xt, yt, xv, yv, wd)
    ours = train_subsets(pr.model, CLS, _recipe(wd), pr.train_x, pr.train_y, masks, [0] * len(masks),
                         {"v": (pr.query_x, pr.query_y)}, {"v": "accuracy"})["v"]  # fmt: skip
    peer = np.array([(PeerLogReg(wd, tol).fit(xt[m], yt[m]).predict(xv) == yv).mean() for m in masks])
    return {
        "subsets": len(masks),
        "differ": int((peer != ours).sum()),
        "max_abs_diff": float(np.abs(peer - ours).max()),
    }


# ----------------------------------------------------------------------------- runs


def ours_retraining(method: str, data, wd: float, target: float, args, seed: int) -> dict:
    """One of our adaptive runs to max stderr < target (``est.run``: sampler -> engine -> estimator)."""
    est = get_estimator(METHODS[method])
    params = {
        "recipe": _recipe(wd), "utility": "accuracy", "tolerance": target, "max_retrains": 10**8,
        "max_seconds": args.max_seconds, "min_samples": MIN_SAMPLES, "seed": seed,
    }  # fmt: skip
    if method == "tmc":
        params["truncation"] = args.truncation
    problem = _problem(*data, wd)
    t0 = time.perf_counter()
    res = est.run(problem, params, F64)
    wall = time.perf_counter() - t0
    return {
        "time_s": wall, "values": res.values, "stderr": res.stderr, "samples": res.n_samples,
        "retrains": res.n_trained, "stopped_by": res.stopped_by,
    }  # fmt: skip


def pydvl_retraining(method: str, data, wd: float, target: float, args, seed: int) -> dict:
    """pyDVL's TMCShapleyValuation / MSRBanzhafValuation on the same utility, to the same rule."""
    from pydvl.valuation import (
        Dataset,
        ModelUtility,
        MSRBanzhafValuation,
        SupervisedScorer,
        TMCShapleyValuation,
    )
    from pydvl.valuation.samplers.truncation import RelativeTruncation
    from pydvl.valuation.stopping import AbsoluteStandardError, MaxTime

    xt, yt, xv, yv = data
    scorer = SupervisedScorer("accuracy", Dataset(xv, yv), default=0.5, range=(0.0, 1.0))  # U(empty) = 1/k
    utility = ModelUtility(PeerLogReg(wd, args.peer_tol), scorer, catch_errors=False, show_warnings=False)
    stop = AbsoluteStandardError(target, fraction=1.0, burn_in=MIN_SAMPLES) | MaxTime(args.max_seconds)
    if method == "tmc":
        trunc = RelativeTruncation(rtol=args.truncation, burn_in_fraction=0.0)
        val = TMCShapleyValuation(utility, truncation=trunc, is_done=stop, seed=seed, progress=False)
    else:
        val = MSRBanzhafValuation(utility, is_done=stop, seed=seed, progress=False)
    PeerLogReg.fit_seconds, PeerLogReg.fits = 0.0, 0
    t0 = time.perf_counter()
    val.fit(Dataset(xt, yt))
    wall = time.perf_counter() - t0
    r = val.result
    values, stderr, counts = (np.empty(len(yt)) for _ in range(3))
    values[r.indices], stderr[r.indices], counts[r.indices] = r.values, r.stderr, r.counts
    return {
        "time_s": wall, "values": values, "stderr": stderr,
        # TMC: every permutation updates every index once; MSR: one fit per sampled subset
        "samples": int(counts.max()) if method == "tmc" else PeerLogReg.fits,
        "retrains": PeerLogReg.fits, "fit_s": PeerLogReg.fit_seconds,
        "stopped_by": "converged" if bool(np.all(stderr < target)) else "max_seconds",
    }  # fmt: skip


def knn_runs(args) -> list[dict]:
    """Ours (the registered estimator) vs pyDVL's exact KNN-Shapley on all of digits."""
    xt, yt, xv, yv = digits_split(1437, 360)
    model = init_model("linear", {"in_features": 64, "num_classes": 10}, 0).double()
    problem = InfluenceProblem(
        model=model, task=CLS, weights=dict(model.state_dict()), train_x=xt, train_y=yt,
        query_x=xv, query_y=yv,
    )  # fmt: skip
    est = get_estimator("knn_shapley")
    impls = [("ours", lambda: np.asarray(est.attribute(problem, {"k": 5}, runtime=F64).values))]
    if not args.no_peers:
        impls.append(
            ("pyDVL KNNShapleyValuation", _pydvl_knn(xt.numpy(), yt.numpy(), xv.numpy(), yv.numpy()))
        )
    rows = []
    for impl, run in impls:
        values = run()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        rows.append({"method": "knn", "impl": impl, "time_s": statistics.median(times), "times_s": times,
                     "values": values, "samples": None, "retrains": None})  # fmt: skip
    ours = rows[0]["values"]
    for r in rows[1:]:
        r["max_abs_diff_vs_ours"] = float(np.abs(r["values"] - ours).max())
        r["spearman_vs_ours"] = _rho(r["values"], ours)
        r["speedup"] = r["time_s"] / rows[0]["time_s"]
    return rows


def _pydvl_knn(xt, yt, xv, yv):
    from pydvl.valuation import Dataset, KNNShapleyValuation
    from sklearn.neighbors import KNeighborsClassifier

    train, valid = Dataset(xt, yt), Dataset(xv, yv)

    def run() -> np.ndarray:
        val = KNNShapleyValuation(KNeighborsClassifier(n_neighbors=5), valid, progress=False)
        r = val.fit(train).result
        out = np.empty(len(yt))
        out[r.indices] = r.values
        return out

    return run


def opendataval_status() -> str:
    """Why opendataval is not in the table (it is reported, never run, here)."""
    if importlib.util.find_spec("opendataval") is None:
        return (
            "n/a: not installed (opendataval 1.3.0 requires torch~=2.1.0, torchvision~=0.16, numpy<1.26, "
            "pandas<2; see bench/RESULTS.md)"
        )
    try:
        importlib.import_module("opendataval.dataval")
    except ImportError as e:
        return f"n/a: installed but does not import ({type(e).__name__}: {e})"
    return "n/a: imports, but this benchmark has no adapter for it"


# ----------------------------------------------------------------------------- comparison and report


def compare(method: str, ours: list[dict], reseeded: dict, peers: list[dict]) -> list[dict]:
    """Rows with times normalised to ours' mean stderr, speed-ups and agreement."""
    o = dict(ours[0])
    o["time_s"] = statistics.median(r["time_s"] for r in ours)
    o["times_s"] = [r["time_s"] for r in ours]
    ref = float(np.mean(o["stderr"]))
    rerun = _rho(reseeded["values"], o["values"])
    rows = [{"method": method, "impl": "ours", **o, "spearman_vs_ours": None, "spearman_reseeded": rerun}]
    for p in peers:
        rows.append({"method": method, "impl": "pyDVL", **p,
                     "spearman_vs_ours": _rho(p["values"], o["values"])})  # fmt: skip
    for r in rows:
        r["mean_stderr"] = float(np.mean(r["stderr"]))
        r["max_stderr"] = float(np.max(r["stderr"]))
        r["time_equal_s"] = r["time_s"] * (r["mean_stderr"] / ref) ** 2
        if "fit_s" in r:  # the peer's learner alone (fit + predict), without its sampling and bookkeeping
            r["learner_equal_s"] = r["fit_s"] * (r["mean_stderr"] / ref) ** 2
        z = (r["values"] - o["values"]) / np.sqrt(np.asarray(r["stderr"]) ** 2 + np.asarray(o["stderr"]) ** 2)
        r["within_2se_of_ours"] = None if r["impl"] == "ours" else float(np.mean(np.abs(z) < 2))
    for r in rows[1:]:
        r["speedup"] = r["time_equal_s"] / rows[0]["time_equal_s"]
        r["speedup_vs_learner"] = r["learner_equal_s"] / rows[0]["time_equal_s"]
    return rows


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearman(a, b).item())


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = ["method", "implementation", "wall s", "samples", "retrains", "mean se", "max se", "s @ equal se",
            "learner s @ equal se", "speed-up", "Spearman vs ours", "|z| < 2", "stopped by"]  # fmt: skip
    lines = []
    for r in rows:
        sp = r.get("spearman_vs_ours")
        if r["impl"] == "ours" and r.get("spearman_reseeded") is not None:
            sp_s = f"(rerun {r['spearman_reseeded']:.3f})"
        else:
            sp_s = _f(sp, ".3f")
        if r["method"] == "knn" and r["impl"] != "ours":
            sp_s += f", max|d| {r['max_abs_diff_vs_ours']:.1e}"
        lines.append([
            METHODS[r["method"]], r["impl"], f"{r['time_s']:.2f}", _f(r.get("samples"), "d"),
            _f(r.get("retrains"), "d"), _f(r.get("mean_stderr"), ".2e"), _f(r.get("max_stderr"), ".2e"),
            _f(r.get("time_equal_s"), ".2f"), _f(r.get("learner_equal_s"), ".2f"),
            _f(r.get("speedup"), ".1f") + ("x" if r.get("speedup") else ""), sp_s,
            _f(r.get("within_2se_of_ours"), ".0%"), r.get("stopped_by", "exact"),
        ])  # fmt: skip
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))


def summary(rows: list[dict], target: float) -> list[dict]:
    out = []
    print(f"\ntarget: ours >= {target:g}x faster than the fastest peer at equal precision")
    for method in dict.fromkeys(r["method"] for r in rows):
        peers = [r for r in rows if r["method"] == method and r["impl"] != "ours"]
        if not peers:
            continue
        best = min(peers, key=lambda r: r.get("time_equal_s", r["time_s"]))
        ratio = best["speedup"]
        learner = best.get("speedup_vs_learner")
        out.append({"method": METHODS[method], "fastest_peer": best["impl"], "speedup": ratio,
                    "speedup_vs_learner": learner, "met": ratio >= target})  # fmt: skip
        extra = "" if learner is None else f" (vs its learner's time alone: {learner:.1f}x)"
        print(f"  {METHODS[method]:12s} vs {best['impl']:28s} {ratio:7.1f}x{extra}  -> "
              f"{'MET' if ratio >= target else 'NOT MET'}")  # fmt: skip
    return out


def _environment(threads: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    libs = {}
    for lib in ("torch", "numpy", "scikit-learn", "pyDVL", "opendataval"):
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            libs[lib] = None
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"python": platform.python_version(), "cpu": cpu, "cpus": os.cpu_count(), "threads": threads,
            "load_average": os.getloadavg(), "libraries": libs}  # fmt: skip


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: n = 200, looser targets, 1 repeat (~1 min)"
    )
    ap.add_argument("--methods", default="tmc,msr,knn", help="comma-separated subset of tmc, msr, knn")
    ap.add_argument("--n-train", type=int, default=None, help="breast-cancer training points (default 300)")
    ap.add_argument("--weight-decay", type=float, default=1e-2, help="L2 coefficient of the objective")
    ap.add_argument(
        "--tmc-target", type=float, default=None,
        help="TMC: stop when the largest stderr < this (default 0.004; --quick 0.008)",
    )  # fmt: skip
    ap.add_argument(
        "--msr-target", type=float, default=None,
        help="Banzhaf: stop when the largest stderr < this (default 6e-4; --quick 1.5e-3)",
    )  # fmt: skip
    ap.add_argument("--truncation", type=float, default=0.01, help="TMC truncation (relative to U(D))")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="wall-clock cap of every run")
    ap.add_argument("--peer-tol", type=float, default=1e-6, help="scikit-learn L-BFGS tolerance of the peer")
    ap.add_argument("--repeats", type=int, default=None, help="our runs and KNN runs (median; default 3)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="pyDVL TMC/Banzhaf runs (median time)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed (the rerun of ours uses seed + 1)")
    ap.add_argument("--no-peers", action="store_true", help="time our methods only")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for everyone (default 1)")
    ap.add_argument("--speedup-target", type=float, default=5.0, help="speed-up the summary checks")
    ap.add_argument("--out", default=str(HERE / "out" / "valuation.json"), help="JSON output path")
    args = ap.parse_args(argv)
    args.n_train = args.n_train or (200 if args.quick else 300)
    args.tmc_target = args.tmc_target or (0.008 if args.quick else 0.004)
    args.msr_target = args.msr_target or (1.5e-3 if args.quick else 6e-4)
    args.repeats = args.repeats or (1 if args.quick else 3)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods: {sorted(unknown)}")

    from threadpoolctl import threadpool_limits

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "argv": sys.argv[1:],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": _environment(args.threads), "opendataval": opendataval_status(), "rows": [],
    }  # fmt: skip
    with threadpool_limits(args.threads):
        data = cancer_split(args.n_train, args.seed)
        wd = args.weight_decay
        print(f"breast cancer: {len(data[1])} training / {len(data[3])} validation points; "
              f"L2 logistic regression (wd={wd}), utility = validation accuracy")  # fmt: skip
        if not args.no_peers and {"tmc", "msr"} & set(methods):
            results["utility_check"] = utility_check(*data, wd, args.peer_tol)
            print(f"utility check (ours vs the peer's learner, sklearn tol {args.peer_tol:g}): "
                  f"{results['utility_check']}")  # fmt: skip
        for method in [m for m in ("tmc", "msr") if m in methods]:
            target = args.tmc_target if method == "tmc" else args.msr_target
            print(f"... {METHODS[method]}: until max stderr < {target:g}", flush=True)
            ours = [ours_retraining(method, data, wd, target, args, args.seed) for _ in range(args.repeats)]
            print(
                f"    ours {[round(r['time_s'], 2) for r in ours]} s, {ours[0]['samples']} samples",
                flush=True,
            )
            reseeded = ours_retraining(method, data, wd, target, args, args.seed + 1)
            peers = []
            if not args.no_peers:
                runs = [
                    pydvl_retraining(method, data, wd, target, args, args.seed)
                    for _ in range(args.peer_repeats)
                ]
                peer = dict(runs[0])
                peer["time_s"] = statistics.median(r["time_s"] for r in runs)
                peer["times_s"] = [r["time_s"] for r in runs]
                peers.append(peer)
                print(f"    pyDVL {peer['times_s']} s, {peer['samples']} samples", flush=True)
            results["rows"] += compare(method, ours, reseeded, peers)
        if "knn" in methods:
            print("... knn_shapley on digits (1437 / 360)", flush=True)
            results["rows"] += knn_runs(args)
    print_table(results["rows"])
    print(f"\nopendataval: {results['opendataval']}")
    results["summary"] = summary(results["rows"], args.speedup_target)
    results["total_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=_json_default))
    print(f"\ntotal {results['total_s']:.0f} s; rows written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
