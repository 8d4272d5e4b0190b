"""Shared workloads and helpers for the peer-library cross-checks (tests/peers).

Every workload is trained with the library's own :func:`app.estimators.train`
and handed to *both* our estimator and the peer on the same weights and data.
The helpers here never call a peer library; each test module converts the
peer's output to our conventions at its adapter boundary (ESTIMATORS.md s.0):

* query-major ``scores[query, train]``;
* positive = proponent (removing the training point raises the query loss);
* IF scores carry the ``1/n`` of the removal effect, with ``H`` the Hessian of
  ``mean loss + weight_decay/2 ||theta||^2``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from app.estimators import (
    Checkpoint,
    InfluenceProblem,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)

CLS = TaskSpec("classification", "cross_entropy")
F64 = Runtime(dtype=torch.float64, chunk_size=256)


@dataclass
class Workload:
    """A trained model plus its data, in float64 (inputs float64, labels int64)."""

    name: str
    model: nn.Module
    weights: dict[str, torch.Tensor]
    train_x: torch.Tensor
    train_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    weight_decay: float
    checkpoints: list[Checkpoint] = field(default_factory=list)
    grad_norm: float | None = None

    @property
    def n(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def m(self) -> int:
        return int(self.query_x.shape[0])

    def problem(self, *, measurement: str = "loss", checkpoints: bool = False) -> InfluenceProblem:
        return InfluenceProblem(
            model=self.model,
            task=CLS,
            weights=self.weights,
            train_x=self.train_x,
            train_y=self.train_y,
            query_x=self.query_x,
            query_y=self.query_y,
            measurement=measurement,
            checkpoints=list(self.checkpoints) if checkpoints else [],
            weight_decay=self.weight_decay,
        )

    def ours(self, method: str, params=None, **problem_kw) -> np.ndarray:
        """Our scores (m x n, float64 runtime)."""
        out = get_estimator(method).attribute(self.problem(**problem_kw), params, runtime=F64)
        return np.asarray(out.scores, dtype=np.float64)

    def fresh_model(self, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A deep copy of the architecture loaded with ``state`` (default: final weights), float64, eval."""
        m = copy.deepcopy(self.model).double()
        m.load_state_dict(state if state is not None else self.weights)
        m.eval()
        for p in m.parameters():
            p.requires_grad_(True)
        return m


# ----------------------------------------------------------------------------- data


def _split(X: np.ndarray, y: np.ndarray, n_train: int, n_query: int, seed: int):
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:n_train], perm[n_train : n_train + n_query]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0  # constant pixels in digits
    X = (X - mu) / sd
    t = torch.tensor
    return t(X[tr]), t(y[tr]).long(), t(X[te]), t(y[te]).long()


def _load(name: str):
    from sklearn import datasets

    if name == "digits":
        return datasets.load_digits(return_X_y=True)
    return datasets.load_breast_cancer(return_X_y=True)


def _lbfgs_workload(name: str, dataset: str, n_train: int, n_query: int, wd: float) -> Workload:
    X, y = _load(dataset)
    x, yy, qx, qy = _split(X.astype(np.float64), y, n_train, n_query, seed=0)
    k = int(y.max()) + 1
    model = init_model("linear", {"in_features": x.shape[1], "num_classes": k}, seed=0).double()
    res = train(
        model,
        CLS,
        x,
        yy,
        Recipe(
            optimizer="lbfgs",
            learning_rate=1.0,
            epochs=200,
            weight_decay=wd,
            lbfgs_tolerance=1e-9,
            num_checkpoints=0,
        ),
    )
    return Workload(name, model, res.weights, x, yy, qx, qy, wd, grad_norm=res.grad_norm)


@functools.cache
def logreg_cancer() -> Workload:
    """Binary L2 logistic regression (2-class softmax ``linear``) on breast cancer: p = 62, n = 400."""
    return _lbfgs_workload("logreg-cancer", "breast_cancer", 400, 8, 1e-2)


@functools.cache
def logreg_digits() -> Workload:
    """10-class L2 logistic regression on digits: p = 650, n = 500, trained to the optimum."""
    return _lbfgs_workload("logreg-digits", "digits", 500, 8, 1e-2)


MLP_PARAMS = {"in_features": 64, "hidden": [16], "num_classes": 10, "activation": "tanh"}


@functools.cache
def mlp_digits() -> Workload:
    """64-16-10 tanh MLP on digits (p = 1210, n = 500) trained by SGD with a cosine schedule;
    three checkpoints with different learning rates (for TracInCP) plus the final weights."""
    X, y = _load("digits")
    x, yy, qx, qy = _split(X.astype(np.float64), y, 500, 8, seed=1)
    model = init_model("mlp", MLP_PARAMS, seed=0).double()
    wd = 1e-3
    res = train(
        model,
        CLS,
        x,
        yy,
        Recipe(
            optimizer="sgd",
            learning_rate=0.1,
            momentum=0.0,
            schedule="cosine",
            epochs=12,
            batch_size=32,
            weight_decay=wd,
            seed=0,
            num_checkpoints=3,
        ),
    )
    return Workload("mlp-digits", model, res.weights, x, yy, qx, qy, wd, checkpoints=res.checkpoints)


# ----------------------------------------------------------------------------- comparisons


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-query (per-row) Spearman rank correlation of two m x n score matrices."""
    from scipy import stats

    assert a.shape == b.shape, (a.shape, b.shape)
    return np.array([stats.spearmanr(a[j], b[j])[0] for j in range(a.shape[0])])


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape, (a.shape, b.shape)
    return np.array([np.corrcoef(a[j], b[j])[0, 1] for j in range(a.shape[0])])


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (a scale-aware elementwise error)."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def report(label: str, ours: np.ndarray, peer: np.ndarray) -> dict[str, float]:
    """Print and return the agreement figures of two m x n score matrices."""
    sp = spearman_rows(ours, peer)
    pe = pearson_rows(ours, peer)
    fig = {
        "spearman_mean": float(sp.mean()),
        "spearman_min": float(sp.min()),
        "pearson_mean": float(pe.mean()),
        "max_rel_err": rel_err(ours, peer),
    }
    print(
        f"\n[peers] {label}: Spearman mean {fig['spearman_mean']:.4f} (min {fig['spearman_min']:.4f}), "
        f"Pearson mean {fig['pearson_mean']:.4f}, max |diff|/max|peer| {fig['max_rel_err']:.2e}"
    )
    return fig


def assert_sign_agreement(ours: np.ndarray, peer: np.ndarray, frac: float = 1.0) -> None:
    """The sign convention survives the adapter: the largest-|score| entries agree in sign."""
    for j in range(ours.shape[0]):
        top = np.argsort(-np.abs(peer[j]))[:10]
        agree = float((np.sign(ours[j, top]) == np.sign(peer[j, top])).mean())
        assert agree >= frac, f"query {j}: sign agreement {agree:.2f} on the top-10 |score| entries"
