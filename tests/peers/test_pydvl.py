"""if_exact / if_cg / if_lissa / if_arnoldi against pyDVL 0.10 (ESTIMATORS.md 2.10-2.13, section 9).

Adapter conversions (pyDVL -> ours):

* ``InfluenceMode.Up`` returns ``+g_test^T (H + reg I)^-1 g_train`` (already
  "positive = proponent", despite its docs) with ``H`` the Hessian of the *mean*
  loss over the fit loader, query-major; ours carries the ``1/n`` of the removal
  effect, so ``ours = pydvl / n``.
* pyDVL's loss has no L2 term, so ``regularization = weight_decay + damping``.
  For Arnoldi (``use_woodbury=False``) the regularisation is added to the kept
  eigenvalues of the data Hessian, which is exactly our ``lambda_k + damping`` with
  ``lambda_k`` the eigenvalues of the data Hessian + weight decay.
* The fit loader is a single batch of all training rows (pyDVL's Hessian operators
  average per-batch results unweighted), and ``influences()`` is called on
  training chunks of a few hundred rows (section 9).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
pydvl_torch = pytest.importorskip("pydvl.influence.torch")
pydvl_influence = pytest.importorskip("pydvl.influence")

import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from .workloads import (  # noqa: E402
    assert_sign_agreement,
    logreg_cancer,
    logreg_digits,
    mlp_digits,
    report,
    spearman_rows,
)

pytestmark = [
    pytest.mark.peers,
    # the peer libraries' own deprecation noise (torch.cuda.amp, pkg_resources, ...)
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

CHUNK = 200


def _fit_loader(w) -> DataLoader:
    return DataLoader(TensorDataset(w.train_x, w.train_y), batch_size=w.n)


def _pydvl_scores(inf, w) -> np.ndarray:
    """pyDVL influences -> our m x n scores (chunks of training rows, divided by n)."""
    up = pydvl_influence.InfluenceMode.Up
    parts = [
        inf.influences(w.query_x, w.query_y, w.train_x[s : s + CHUNK], w.train_y[s : s + CHUNK], mode=up)
        for s in range(0, w.n, CHUNK)
    ]
    out = torch.cat(parts, dim=1).detach().to(torch.float64).numpy()
    assert out.shape == (w.m, w.n)
    return out / w.n


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize("workload", [logreg_cancer, logreg_digits], ids=["cancer", "digits"])
def test_if_exact_matches_direct_influence(workload):
    w = workload()
    ours = w.ours("if_exact", {"damping": 0.0})
    inf = pydvl_torch.DirectInfluence(w.fresh_model(), F.cross_entropy, regularization=w.weight_decay)
    peer = _pydvl_scores(inf.fit(_fit_loader(w)), w)
    fig = report(f"if_exact vs pyDVL DirectInfluence ({w.name})", ours, peer)
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-9 * np.abs(peer).max())
    assert_sign_agreement(ours, peer)


def test_if_exact_damping_maps_to_regularization():
    """Our ``damping`` stacks on the weight decay: pyDVL regularization = weight_decay + damping."""
    w = logreg_cancer()
    ours = w.ours("if_exact", {"damping": 0.05})
    inf = pydvl_torch.DirectInfluence(w.fresh_model(), F.cross_entropy, regularization=w.weight_decay + 0.05)
    peer = _pydvl_scores(inf.fit(_fit_loader(w)), w)
    np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-9 * np.abs(peer).max())


# ----------------------------------------------------------------------------- CG


def test_if_cg_converged_matches_cg_influence():
    w = logreg_digits()
    ours = w.ours("if_cg", {"damping": 0.0, "max_iter": 300, "rtol": 1e-10})
    inf = pydvl_torch.CgInfluence(
        w.fresh_model(),
        F.cross_entropy,
        regularization=w.weight_decay,
        rtol=1e-10,
        atol=1e-12,
        maxiter=300,
        solve_simultaneously=True,
        warn_on_max_iteration=False,
    )
    peer = _pydvl_scores(inf.fit(_fit_loader(w)), w)
    fig = report(f"if_cg vs pyDVL CgInfluence, converged ({w.name})", ours, peer)
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-8 * np.abs(peer).max())


def test_if_cg_truncated_nonconvex_mlp():
    """A non-convex MLP (Hessian eigenvalues down to about -0.17) with damping 0.2 and only 15 CG
    iterations. pyDVL starts CG at x0 = b and we start at 0, so truncated iterates differ slightly;
    both are deterministic."""
    w = mlp_digits()
    damping, iters = 0.2, 15
    ours = w.ours("if_cg", {"damping": damping, "max_iter": iters, "rtol": 1e-12})
    inf = pydvl_torch.CgInfluence(
        w.fresh_model(),
        F.cross_entropy,
        regularization=w.weight_decay + damping,
        rtol=1e-12,
        atol=1e-14,
        maxiter=iters,
        warn_on_max_iteration=False,
    )
    peer = _pydvl_scores(inf.fit(_fit_loader(w)), w)
    fig = report(f"if_cg vs pyDVL CgInfluence, {iters} iterations, damping {damping} ({w.name})", ours, peer)
    exact = w.ours("if_exact", {"damping": damping})
    fig_exact = report(f"if_cg ({iters} it.) vs if_exact ({w.name})", ours, exact)
    assert fig["spearman_mean"] >= 0.95 and fig["spearman_min"] >= 0.9
    assert fig_exact["spearman_mean"] >= 0.95
    assert_sign_agreement(ours, peer)


# ----------------------------------------------------------------------------- LiSSA


def test_if_lissa_vs_lissa_influence():
    """Randomised on both sides (different mini-batch streams): agreement is statistical.

    Breast cancer logistic regression, lambda_max(H) ~ 0.40, lambda_min = weight decay 0.01;
    damping 0.01, scale 2, depth 1000 (contraction (1 - 0.02/2)^1000 ~ e^-10), batch 32.
    """
    w = logreg_cancer()
    damping, scale, depth, batch = 0.01, 2.0, 1000, 32
    ours = w.ours(
        "if_lissa", {"damping": damping, "scale": scale, "depth": depth, "batch_size": batch, "seed": 0}
    )
    torch.manual_seed(0)  # pyDVL draws its mini-batches from the global torch RNG
    inf = pydvl_torch.LissaInfluence(
        w.fresh_model(),
        F.cross_entropy,
        regularization=w.weight_decay + damping,
        maxiter=depth,
        scale=scale,
        dampen=0.0,
        rtol=1e-12,  # never stop early: run the same depth as ours
        warn_on_max_iteration=False,
    )
    peer = _pydvl_scores(inf.fit(DataLoader(TensorDataset(w.train_x, w.train_y), batch_size=batch)), w)
    exact = w.ours("if_exact", {"damping": damping})
    fig = report(f"if_lissa vs pyDVL LissaInfluence ({w.name})", ours, peer)
    fig_ours = report(f"if_lissa vs if_exact ({w.name})", ours, exact)
    fig_peer = report(f"pyDVL LissaInfluence vs if_exact ({w.name})", peer, exact)
    # measured: 0.94 / 0.96 / 0.95 (means); floors leave room for other seeds
    assert fig["spearman_mean"] >= 0.8
    assert fig_ours["spearman_mean"] >= 0.85 and fig_peer["spearman_mean"] >= 0.85
    # ours is no worse an estimate of the exact scores than pyDVL's
    assert fig_ours["spearman_mean"] >= fig_peer["spearman_mean"] - 0.05
    assert_sign_agreement(ours, exact, frac=0.9)


# ----------------------------------------------------------------------------- Arnoldi


def test_if_arnoldi_full_rank_matches_arnoldi_influence_and_exact():
    w = logreg_cancer()  # p = 62: rank = p reproduces the exact inverse
    ours = w.ours("if_arnoldi", {"rank": 62, "n_iter": 62})
    inf = pydvl_torch.ArnoldiInfluence(
        w.fresh_model(), F.cross_entropy, regularization=w.weight_decay, rank=62, tol=1e-10
    )
    peer = _pydvl_scores(inf.fit(_fit_loader(w)), w)
    exact = w.ours("if_exact")
    fig = report(f"if_arnoldi (rank p) vs pyDVL ArnoldiInfluence ({w.name})", ours, peer)
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(ours, peer, rtol=1e-6, atol=1e-9 * np.abs(peer).max())
    np.testing.assert_allclose(ours, exact, rtol=1e-6, atol=1e-9 * np.abs(exact).max())


def test_if_arnoldi_low_rank_same_subspace():
    """Rank 50 of p = 650 on digits. pyDVL's ARPACK (tol 1e-10) converges the top-50 eigenpairs; our
    Lanczos needs n_iter = 3 x rank here (the eigengap at 50 is ~1%), after which both keep the same
    subspace and agree to round-off. At our default n_iter = 2 x rank it has not converged yet (the
    figure is printed, not asserted). Both are far from exact IF at this rank (section 9)."""
    w = logreg_digits()
    rank = 50
    inf = pydvl_torch.ArnoldiInfluence(
        w.fresh_model(), F.cross_entropy, regularization=w.weight_decay, rank=rank, tol=1e-10
    )
    peer = _pydvl_scores(inf.fit(_fit_loader(w)), w)
    ours = w.ours("if_arnoldi", {"rank": rank, "n_iter": 3 * rank})
    fig = report(
        f"if_arnoldi rank {rank}, n_iter {3 * rank} vs pyDVL ArnoldiInfluence ({w.name})", ours, peer
    )
    assert fig["spearman_min"] >= 0.99
    np.testing.assert_allclose(ours, peer, rtol=1e-5, atol=1e-7 * np.abs(peer).max())

    short = w.ours("if_arnoldi", {"rank": rank, "n_iter": 2 * rank})
    report(f"if_arnoldi rank {rank}, n_iter {2 * rank} (unconverged) vs pyDVL ({w.name})", short, peer)
    exact = w.ours("if_exact")
    sp = spearman_rows(peer, exact)
    print(f"[peers] rank-{rank} Arnoldi (either library) vs exact IF: Spearman mean {sp.mean():.3f}")
