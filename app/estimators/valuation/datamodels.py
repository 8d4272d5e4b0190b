"""Datamodels (Ilyas et al. 2022): per-query linear surrogates of "train on S, measure query j",
fitted by LASSO (coordinate descent) or ridge in torch, and the Linear Datamodeling Score.

For query ``j`` with objective ``q_j`` (loss or minus margin) the fit is
``q_j(S) ~ b_j + sum_{i in S} beta_ji``; the score is ``-beta_ji`` (including ``z_i``
lowers the query objective by ``-beta_ji``: positive = proponent).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["datamodels_estimate", "lasso_fit", "lds", "lds_summary", "rankdata", "ridge_fit", "spearman"]


def _centre(X: torch.Tensor, Y: torch.Tensor):
    xm, ym = X.mean(dim=0), Y.mean(dim=0)
    return X - xm, Y - ym, xm, ym


def ridge_fit(masks: np.ndarray, outputs: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of each output column on the masks, with intercept.

    Minimises ``(1/2K) ||y - b - X beta||^2 + (l2/2) ||beta||^2`` per column; returns
    ``(coef m x n, intercept m)``.
    """
    X = torch.as_tensor(np.asarray(masks), dtype=torch.float64)
    Y = torch.as_tensor(np.asarray(outputs), dtype=torch.float64).reshape(X.shape[0], -1)
    K = X.shape[0]
    Xc, Yc, xm, ym = _centre(X, Y)
    A = Xc.T @ Xc / K + l2 * torch.eye(X.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(A, Xc.T @ Yc / K)  # (n, m)
    intercept = ym - xm @ coef
    return coef.T.numpy(), intercept.numpy()


def _lasso_cd(G, C, lam, beta, max_iter, tol):
    """Covariance-form coordinate descent for all columns at once.

    Minimises ``(1/2) b^T G b - C^T b + lam ||b||_1`` column-wise, with G = X^T X / K and
    C = X^T y / K (centred). ``lam`` (m,), ``beta`` (n, m) warm start. Returns (beta, sweeps).
    The O(n m) coordinate updates run on float64 numpy views of the tensors (far lower
    per-call overhead than torch for these tiny vectors); the O(K n^2) Gram products are torch.
    """
    Gn, Cn, lamn = G.numpy(), C.numpy(), lam.numpy()
    b = beta.numpy().copy()
    n = Gn.shape[0]
    diag = np.maximum(np.diagonal(Gn).copy(), 1e-300)
    # Fixed-size masks have constant row sums, so the centred design annihilates the all-ones
    # direction: the fit ignores a common shift of beta and only the penalty pins it (at minus the
    # median). Coordinate moves crawl along that flat direction, so take the exact shift each sweep.
    flat = float(np.abs(Gn.sum(axis=1)).max()) <= 1e-12 * float(diag.max())
    grad_part = Gn @ b  # (n, m) = G beta
    for sweep in range(1, max_iter + 1):
        if flat:
            b -= np.median(b, axis=0, keepdims=True)
            grad_part = Gn @ b
        max_change = 0.0
        for j in range(n):
            old = b[j].copy()
            rho = Cn[j] - grad_part[j] + diag[j] * old
            new = np.sign(rho) * np.maximum(np.abs(rho) - lamn, 0.0) / diag[j]
            delta = new - old
            change = float(np.abs(delta).max())
            if change > 0.0:
                b[j] = new
                grad_part += np.outer(Gn[:, j], delta)
                max_change = max(max_change, change)
        if max_change <= tol * max(1.0, float(np.abs(b).max())):
            return torch.from_numpy(b), sweep
    return torch.from_numpy(b), max_iter


def lasso_fit(
    masks: np.ndarray,
    outputs: np.ndarray,
    l1: float | np.ndarray,
    *,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """LASSO of each output column on the masks, with intercept (sklearn's objective).

    Minimises ``(1/2K) ||y - b - X beta||^2 + l1 ||beta||_1`` per column by cyclic
    coordinate descent on the Gram matrix; ``l1`` is a scalar or one value per
    column. Returns ``(coef m x n, intercept m, info)``.
    """
    X = torch.as_tensor(np.asarray(masks), dtype=torch.float64)
    Y = torch.as_tensor(np.asarray(outputs), dtype=torch.float64).reshape(X.shape[0], -1)
    K, m = X.shape[0], Y.shape[1]
    Xc, Yc, xm, ym = _centre(X, Y)
    G, C = Xc.T @ Xc / K, Xc.T @ Yc / K
    lam = torch.as_tensor(np.broadcast_to(np.asarray(l1, dtype=np.float64), (m,)).copy())
    beta, sweeps = _lasso_cd(G, C, lam, torch.zeros(X.shape[1], m, dtype=torch.float64), max_iter, tol)
    intercept = ym - xm @ beta
    return beta.T.numpy(), intercept.numpy(), {"sweeps": sweeps, "l1": lam.numpy()}


def _select_l1(X, Y, grid_size: int, holdout_every: int, max_iter: int, tol: float) -> np.ndarray:
    """Per-column l1 from a log grid by held-out MSE (every ``holdout_every``-th row is held out)."""
    K = X.shape[0]
    hold = np.arange(K) % holdout_every == holdout_every - 1
    Xt, Yt = X[~hold], Y[~hold]
    Xh, Yh = X[hold], Y[hold]
    Xc, Yc, xm, ym = _centre(Xt, Yt)
    G, C = Xc.T @ Xc / Xt.shape[0], Xc.T @ Yc / Xt.shape[0]
    lam_max = C.abs().max(dim=0).values.clamp(min=1e-12)  # (m,)
    ratios = np.logspace(0, -4, grid_size)
    beta = torch.zeros(X.shape[1], Y.shape[1], dtype=torch.float64)
    best = torch.full((Y.shape[1],), math.inf, dtype=torch.float64)
    best_lam = lam_max.clone()
    for r in ratios:  # warm-started path from large to small penalties
        lam = lam_max * float(r)
        beta, _ = _lasso_cd(G, C, lam, beta, max_iter, tol)
        pred = (Xh - xm) @ beta + ym
        mse = ((Yh - pred) ** 2).mean(dim=0)
        better = mse < best
        best = torch.where(better, mse, best)
        best_lam = torch.where(better, lam, best_lam)
    return best_lam.numpy()


def datamodels_estimate(
    masks: np.ndarray,
    q: np.ndarray,
    *,
    regression: str = "lasso",
    l1: float | None = None,
    l2: float = 1e-3,
    max_iter: int = 1000,
    tol: float = 1e-8,
    grid_size: int = 12,
    holdout_every: int = 5,
) -> tuple[np.ndarray, dict]:
    """Datamodel scores m x n = ``-coef`` of the per-query regression of ``q`` (K x m) on the masks.

    ``regression="lasso"`` with ``l1=None`` picks each query's penalty from a log grid
    (``lambda_max * 10^[0..-4]``) by the MSE on held-out masks (every
    ``holdout_every``-th row), then refits on all masks; ``"ridge"`` uses ``l2``.
    ``info`` carries the intercepts and penalties.
    """
    q = np.asarray(q, dtype=np.float64)
    q2 = q.reshape(q.shape[0], -1)
    if regression == "ridge":
        coef, intercept = ridge_fit(masks, q2, l2)
        return -coef, {"intercept": intercept, "l2": l2}
    if regression != "lasso":
        raise ValueError(f"unknown regression {regression!r}")
    if l1 is None:
        X = torch.as_tensor(np.asarray(masks), dtype=torch.float64)
        Y = torch.as_tensor(q2, dtype=torch.float64)
        lam = _select_l1(X, Y, grid_size, max(2, holdout_every), max_iter, tol)
    else:
        lam = np.full(q2.shape[1], float(l1))
    coef, intercept, info = lasso_fit(masks, q2, lam, max_iter=max_iter, tol=tol)
    return -coef, {"intercept": intercept, "l1": lam, "sweeps": info["sweeps"]}


# ----------------------------------------------------------------------------- LDS


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..K along axis 0, ties get their average rank (scipy's "average")."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        return _rank1(a)
    return np.stack([_rank1(a[:, j]) for j in range(a.shape[1])], axis=1)


def _rank1(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    ranks = np.empty(v.size, dtype=np.float64)
    start = 0
    while start < v.size:
        stop = start + 1
        while stop < v.size and sv[stop] == sv[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + stop - 1) + 1.0
        start = stop
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Spearman correlation (NaN where a column is constant)."""
    ra, rb = rankdata(a), rankdata(b)
    ra = ra.reshape(ra.shape[0], -1) - ra.reshape(ra.shape[0], -1).mean(axis=0)
    rb = rb.reshape(rb.shape[0], -1) - rb.reshape(rb.shape[0], -1).mean(axis=0)
    den = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(axis=0) / np.where(den > 0, den, 1.0), np.nan)


def lds(scores: np.ndarray, masks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear Datamodeling Score per query (TRAK paper; ESTIMATORS.md 4.2).

    ``scores`` m x n (positive = proponent), ``masks`` K x n, ``q`` K x m query
    objectives of models trained on the masks (average seeds first if any). The
    attribution predicts ``g_j(S) = sum_{i in S} scores[j, i]``, a prediction of how
    much S *lowers* q_j, so ``LDS_j = Spearman_k(g_j(S_k), -q_j(S_k))``. NaN for a
    query whose outputs or predictions are constant; report ``np.nanmean``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    M = np.asarray(masks, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64).reshape(M.shape[0], -1)
    if scores.shape != (q.shape[1], M.shape[1]):
        raise ValueError(f"scores must be m x n = {(q.shape[1], M.shape[1])}, got {scores.shape}")
    return spearman(M @ scores.T, -q)


def lds_summary(scores: np.ndarray, masks: np.ndarray, q: np.ndarray, *, per_query_limit: int = 1000) -> dict:
    """:func:`lds` per query and its mean over the queries where it is defined, as plain JSON.

    ``stderr`` is the standard error of that mean across queries (null with fewer than two);
    ``per_query`` lists every query's LDS (null where undefined) when there are at most
    ``per_query_limit`` queries, else quartiles replace it.
    """
    values = lds(scores, masks, q)
    defined = values[np.isfinite(values)]
    n = int(defined.size)
    out: dict = {
        "mean": float(defined.mean()) if n else None,
        "stderr": float(defined.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "n_queries": int(values.size),
        "n_defined": n,
        "n_masks": int(np.asarray(masks).shape[0]),
    }
    if values.size <= per_query_limit:
        out["per_query"] = [float(v) if math.isfinite(v) else None for v in values]
    elif n:
        out["quartiles"] = [float(v) for v in np.quantile(defined, [0.0, 0.25, 0.5, 0.75, 1.0])]
    return out
