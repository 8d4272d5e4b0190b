"""Exact KNN-Shapley (Jia et al., PVLDB 2019; ESTIMATORS.md 2.6), no retraining.

Utility of a subset S for query ``(x', y')``: ``U(S) = (1/K) * #{correct labels among the
min(K, |S|) nearest points of S}`` (``U(empty) = 0``), averaged over the queries.
Sorting the training points by distance to the query, ``alpha_1`` (nearest) ..
``alpha_n``, its exact Shapley values follow the recursion

    s(alpha_n) = 1[y_{alpha_n} = y'] / K * min(K, n) / n
    s(alpha_i) = s(alpha_{i+1}) + (1[y_{alpha_i} = y'] - 1[y_{alpha_{i+1}} = y']) / K * min(K, i) / i

(for n >= K the first line is ``1[...] / n``, the paper's form). Distance ties are
broken by training index (a stable sort), the same order :func:`knn_utility` uses.
Features are the raw inputs (flattened) or ``embed(x)``, e.g.
:func:`penultimate_embedder` (the input of a model's last Linear layer).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..base import NumericalError

Embed = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["knn_shapley", "knn_utility", "nearest_neighbours", "neighbour_order", "penultimate_embedder"]


EMBED_ROWS = 4096  # rows per forward pass of the embedding: its activations, not all n rows' at once


def _features(x: torch.Tensor, embed: Embed | None) -> torch.Tensor:
    parts = []
    with torch.no_grad():
        for start in range(0, int(x.shape[0]), EMBED_ROWS):
            chunk = x[start : start + EMBED_ROWS]
            f = embed(chunk) if embed is not None else chunk
            parts.append(f.reshape(f.shape[0], -1).to(torch.float64))
    features = torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)
    if not bool(torch.isfinite(features).all()):  # NaN distances would still give finite values
        raise NumericalError(
            "the KNN features contain NaN/inf (the model's activations overflow at these weights); "
            "use the raw inputs",
            parameter="/method/params/embedding",
        )
    return features


def _distances(q: torch.Tensor, t: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        qn = q / q.norm(dim=1, keepdim=True).clamp(min=1e-300)
        tn = t / t.norm(dim=1, keepdim=True).clamp(min=1e-300)
        return 1.0 - qn @ tn.T
    if metric == "euclidean":
        return torch.cdist(q, t)
    raise ValueError(f"unknown metric {metric!r}")


def neighbour_order(train_f: torch.Tensor, query_f: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """m x n training indices sorted from nearest to farthest for each query (stable in index)."""
    return torch.argsort(_distances(query_f, train_f, metric), dim=1, stable=True)


def nearest_neighbours(
    train_f: torch.Tensor, query_f: torch.Tensor, k: int, metric: str = "euclidean", chunk_size: int = 256
) -> torch.Tensor:
    """m x k indices of each query's ``k`` nearest training rows, nearest first; O(chunk_size x n) memory."""
    parts = [
        torch.topk(_distances(query_f[s : s + chunk_size], train_f, metric), k, dim=1, largest=False).indices
        for s in range(0, int(query_f.shape[0]), chunk_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long)


def knn_shapley(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    k: int = 5,
    *,
    metric: str = "euclidean",
    embed: Embed | None = None,
    chunk_size: int = 256,
    per_query: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Exact KNN-Shapley values (n,) averaged over the queries, and the m x n per-query values if asked.

    Positive = helpful (its presence raises the KNN classifier's probability of
    the right label). ``sum(values) = U(D) - U(empty) = U(D)``.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    tf = _features(train_x, embed)
    qf = _features(query_x, embed)
    ty = torch.as_tensor(train_y).reshape(-1)
    qy = torch.as_tensor(query_y).reshape(-1)
    n, m = tf.shape[0], qf.shape[0]
    ranks = torch.arange(1, n, dtype=torch.float64)  # i = 1..n-1
    step = torch.clamp(ranks, max=float(k)) / ranks / k  # min(K, i) / i / K
    total = torch.zeros(n, dtype=torch.float64)
    per = np.zeros((m, n)) if per_query else None
    for s in range(0, m, max(1, chunk_size)):
        order = neighbour_order(tf, qf[s : s + chunk_size], metric)  # (c, n)
        match = (ty[order] == qy[s : s + chunk_size].unsqueeze(1)).to(torch.float64)
        last = match[:, -1] * (min(k, n) / n / k)
        inc = (match[:, :-1] - match[:, 1:]) * step  # (c, n-1), position p <-> rank p+1
        tail = torch.flip(torch.cumsum(torch.flip(inc, [1]), dim=1), [1])  # sum_{q >= p} inc_q
        sorted_vals = torch.cat([last.unsqueeze(1) + tail, last.unsqueeze(1)], dim=1)
        vals = torch.zeros_like(sorted_vals).scatter_(1, order, sorted_vals)
        total += vals.sum(dim=0)
        if per is not None:
            per[s : s + chunk_size] = vals.numpy()
    return (total / max(m, 1)).numpy(), per


def knn_utility(
    masks: np.ndarray,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    k: int = 5,
    *,
    metric: str = "euclidean",
    embed: Embed | None = None,
) -> np.ndarray:
    """The KNN utility of each mask row (K,), averaged over queries (brute force, for validation)."""
    tf, qf = _features(train_x, embed), _features(query_x, embed)
    ty, qy = torch.as_tensor(train_y).reshape(-1), torch.as_tensor(query_y).reshape(-1)
    order = neighbour_order(tf, qf, metric).numpy()  # (m, n)
    match = (ty[torch.as_tensor(order)] == qy.unsqueeze(1)).numpy()  # (m, n) in sorted order
    M = np.asarray(masks, dtype=bool)
    out = np.zeros(M.shape[0])
    for r in range(M.shape[0]):
        inc = M[r][order]  # (m, n): is the j-th nearest in S
        rank_in_s = np.cumsum(inc, axis=1)
        top = inc & (rank_in_s <= k)
        out[r] = (top & match).sum(axis=1).mean() / k
    return out


def penultimate_embedder(
    model: nn.Module,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Embed:
    """``x -> input of the model's last nn.Linear`` at ``weights`` (eval mode, no gradients).

    ``device``/``dtype``: where and in what precision to run (default: the weights' own).
    """
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("the model has no Linear layer to take the penultimate features from")
    target = last[-1]
    state = dict(model.state_dict()) if weights is None else {**dict(model.state_dict()), **weights}
    dtype = dtype or next(p for p in model.parameters() if p.is_floating_point()).dtype
    state = {
        k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device)
        for k, v in state.items()
    }
    device = next(iter(state.values())).device

    def embed(x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = target.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                xd = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)
                functional_call(model, state, (xd,))
        finally:
            handle.remove()
            model.train(was_training)
        return captured[-1]

    return embed
