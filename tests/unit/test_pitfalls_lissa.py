"""LiSSA pitfall (ESTIMATORS.md 2.12): "keeps the autograd graph / memory growth".

if_lissa's recursion must run on plain tensors: no iterate, Hessian-vector product or estimate may carry
an autograd graph (even when the weights given require grad), and its memory must not grow with depth.
The probe wraps the Hessian-vector products that :func:`app.estimators.ihvp.lissa` calls: every step it
checks ``grad_fn``/``requires_grad`` and the process RSS; at steps 10, depth / 2 and depth it counts live
tensors (gc; tracemalloc does not see torch's allocations). Both the closed-form product of a one-layer
linear model and the autodiff (``torch.func.grad``) product, forced by disabling the closed forms, are
covered; a leaky control shows the probe sees a leak of one small tensor per step.
"""

from __future__ import annotations

import gc
import os
import resource
import sys

import numpy as np
import pytest
import torch

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, ihvp, init_model, train
from app.estimators.gradients import ChainHessian, GLMHead, objective_hessian
from app.estimators.methods import influence_lissa

torch.set_num_threads(1)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=256)  # self-influence of the 200 rows: one solve
WD = 0.1
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@pytest.fixture(scope="module")
def logreg():
    """L2 logistic regression (p = 12), as in test_influence_solvers."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    x = 0.7 * torch.randn(2, 5, generator=g, dtype=torch.float64)[y] + torch.randn(
        200, 5, generator=g, dtype=torch.float64
    )
    model = init_model("linear", {"in_features": 5, "num_classes": 2}, 0).double()
    recipe = Recipe(optimizer="lbfgs", learning_rate=1.0, epochs=100, weight_decay=WD, num_checkpoints=0)
    res = train(model, CLS, x, y, recipe)
    lam_max = float(torch.linalg.eigvalsh(objective_hessian(model, res.weights, x, y, CLS, WD))[-1])
    # weights that require grad: a graph built from them would follow the iterate through the recursion
    weights = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in res.weights.items()}
    prob = InfluenceProblem(
        model=model,
        task=CLS,
        weights=weights,
        train_x=x,
        train_y=y,
        query_x=x[:4],
        query_y=y[:4],
        weight_decay=WD,
    )
    return prob, lam_max


def _rss() -> int:
    """Resident set size in bytes: /proc/self/statm where there is one, else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _no_graph(t: torch.Tensor, what: str) -> None:
    assert t.grad_fn is None and not t.requires_grad, f"{what} carries an autograd graph"


def _run(monkeypatch, prob, lam_max, depth, leak=None, self_influence=False, count=True):
    """Run if_lissa with a probe around its Hessian-vector products; returns (estimates, tensor counts,
    RSS samples, attribution)."""
    real = ihvp.lissa  # not influence_lissa.lissa: that may be an earlier run's probe
    estimates, counts, rss = [], [], []

    def probe(hvp_batch, B, **kw):
        _no_graph(B, "the right-hand side")
        step = [0]
        counts.append([])  # per solve

        def hvp(idx, V, **kw2):
            _no_graph(V, "the LiSSA iterate")
            out = hvp_batch(idx, V, **kw2)
            _no_graph(out, "a Hessian-vector product")
            step[0] += 1
            if leak is not None:
                leak.append(out.clone())
            rss.append(_rss())
            if count and step[0] in (10, kw["depth"] // 2, kw["depth"]):
                counts[-1].append(_live_tensors())
            return out

        res = real(hvp, B, **kw)
        estimates.append(res.x)
        return res

    monkeypatch.setattr(influence_lissa, "lissa", probe)
    params = {"damping": 0.0, "scale": 1.5 * lam_max, "depth": depth, "batch_size": 32}
    out = get_estimator("if_lissa").attribute(prob, params, want_self_influence=self_influence, runtime=F64)
    return estimates, counts, np.asarray(rss), out


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed-form-hvp", "autodiff-hvp"])
def test_lissa_keeps_no_graph_and_memory_flat_in_depth(monkeypatch, logreg, closed_form):
    prob, lam_max = logreg
    if not closed_form:  # the generic torch.func path every non-MLP model takes (scores only: slower)
        monkeypatch.setattr(GLMHead, "of", classmethod(lambda cls, model, names=None: None))
        monkeypatch.setattr(ChainHessian, "of", classmethod(lambda cls, model, names=None: None))
    _run(monkeypatch, prob, lam_max, 50, self_influence=closed_form, count=False)  # warm-up: first calls
    gc.collect()
    est50, counts50, rss50, _ = _run(monkeypatch, prob, lam_max, 50, self_influence=closed_form)
    gc.collect()
    est500, counts500, rss500, out500 = _run(monkeypatch, prob, lam_max, 500, self_influence=closed_form)
    # the estimates and the returned arrays carry no graph
    assert len(est500) == (2 if closed_form else 1)  # the query solve (and one self-influence solve)
    for x in est50 + est500:
        _no_graph(x, "a LiSSA estimate")
    assert isinstance(out500.scores, np.ndarray) and np.isfinite(out500.scores).all()
    assert out500.metadata["depth"] == 500
    # live tensors per solve, at steps 10, depth/2 and depth: nothing accumulates from step 250 to 500,
    # and a 500-step solve gains no more tensors after step 10 than a 50-step one (a few are made once,
    # at the first per-column check)
    for c50, c500 in zip(counts50, counts500, strict=True):
        assert len(c500) == 3 and c500[2] == c500[1], counts500
        assert c500[2] - c500[0] <= max(c50[2] - c50[0], 0) + 1 <= 4, (counts50, counts500)
    mib = 2.0**-20
    print(
        f"\nif_lissa memory ({'closed-form' if closed_form else 'autodiff'} HVP): live tensors per solve at "
        f"steps 10/mid/end, depth 50 {counts50}, depth 500 {counts500}; peak RSS depth 500 - depth 50 = "
        f"{(rss500.max() - rss50.max()) * mib:+.2f} MiB, RSS growth over steps 50..500 = "
        f"{(rss500[-1] - rss500[len(rss500) // 10]) * mib:+.2f} MiB"
    )
    # RSS: the depth-500 run peaks no higher than the depth-50 run (+ 4 MiB of allocator noise), and
    # does not climb along its own recursion
    assert rss500.max() - rss50.max() < 4 * 2**20, (rss50.max(), rss500.max())
    assert rss500[-1] - rss500[len(rss500) // 10] < 4 * 2**20


def test_lissa_probe_detects_a_leak(monkeypatch, logreg):
    """Control: keeping one 12 x 4 product per step (what a retained graph would do at the least) shows up
    as tensor growth proportional to depth."""
    prob, lam_max = logreg
    leak: list[torch.Tensor] = []
    _, counts, _, _ = _run(monkeypatch, prob, lam_max, 500, leak=leak)
    assert len(leak) == 500
    assert counts[0][2] - counts[0][0] >= 500 - 10, counts
