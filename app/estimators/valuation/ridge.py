"""Closed-form ridge regression and its exact leave-one-out (ground truth for tests and LOO checks).

The objective is the service's (training.py): ``mean_{i in S} mean_k (x~_i theta_k - y_ik)^2 +
weight_decay/2 ||theta||^2`` with ``x~ = [x, 1]`` (the bias is regularised too). Setting the
gradient to zero gives ``(X~^T X~ + lam_S I) theta = X~^T y`` with ``lam_S = weight_decay * |S| * k / 2``,
so every leave-one-out fit shares ``B = X~^T X~ + lam_{n-1} I`` and Sherman–Morrison gives

    theta_{-i} = t - B^-1 x~_i r_i / (1 - h_ii),
    t = B^-1 X~^T y,  r_i = y_i - x~_i^T t,  h_ii = x~_i^T B^-1 x~_i

(``t`` is the full-data fit with the leave-one-out penalty ``lam_{n-1}``, not the full-data model).
"""

from __future__ import annotations

import torch

__all__ = ["ridge_fit_closed_form", "ridge_loo_closed_form"]


def _design(x: torch.Tensor, bias: bool) -> torch.Tensor:
    f = x.reshape(x.shape[0], -1).to(torch.float64)
    return torch.cat([f, torch.ones(f.shape[0], 1, dtype=torch.float64)], dim=1) if bias else f


def _targets(y: torch.Tensor) -> torch.Tensor:
    y = y.to(torch.float64)
    return y.reshape(y.shape[0], -1)


def ridge_fit_closed_form(x: torch.Tensor, y: torch.Tensor, weight_decay: float, *, bias: bool = True):
    """Full-data minimiser as ``(weight (k, d), bias (k,) or None)``."""
    X, Y = _design(x, bias), _targets(y)
    lam = weight_decay * X.shape[0] * Y.shape[1] / 2.0
    theta = torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=torch.float64), X.T @ Y).T
    return (theta[:, :-1], theta[:, -1]) if bias else (theta, None)


def ridge_loo_closed_form(x: torch.Tensor, y: torch.Tensor, weight_decay: float, *, bias: bool = True):
    """Leave-one-out minimisers for every i, by Sherman–Morrison: ``theta (n, k, p)`` with p = d (+1)."""
    X, Y = _design(x, bias), _targets(y)
    n, k = X.shape[0], Y.shape[1]
    lam = weight_decay * (n - 1) * k / 2.0
    B = X.T @ X + lam * torch.eye(X.shape[1], dtype=torch.float64)
    L = torch.linalg.cholesky(B)
    t = torch.cholesky_solve(X.T @ Y, L)  # (p, k)
    U = torch.cholesky_solve(X.T, L)  # (p, n): B^-1 x_i
    h = (X * U.T).sum(dim=1)  # (n,)
    r = Y - X @ t  # (n, k)
    theta = t.T.unsqueeze(0) - (r / (1.0 - h).unsqueeze(1)).unsqueeze(2) * U.T.unsqueeze(1)  # (n, k, p)
    return theta
