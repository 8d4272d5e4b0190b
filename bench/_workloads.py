"""Workloads and ground truth for bench/estimators.py (CPU, sklearn digits).

Two workloads, built deterministically and cached under ``bench/out/``:

* ``logreg``: L2-regularised multinomial logistic regression (the ``linear``
  architecture, 64 standardised pixels -> 10 classes, p = 650) trained to the
  optimum (our L-BFGS, then damped Newton steps in float64 to |grad| < 1e-11).
  Quality = leave-one-out correlation (ESTIMATORS.md 4.1): for a subset of
  training points (the most influential ones by exact IF plus random ones) the
  model is retrained without each point *exactly* (float64 Newton from the
  optimum, gradient norm < 1e-11) and the change of every query's loss is
  recorded; a method's quality is the mean over queries of the Pearson and
  Spearman correlation between its scores and these changes on that subset.
* ``mlp``: a 64-64-10 ReLU MLP trained with our deterministic SGD recipe
  (momentum, weight decay, several checkpoints). Quality = linear datamodeling
  score (ESTIMATORS.md 4.2): M random half-size subsets, each retrained with the
  same recipe for several seeds; the ground truth is the seed-averaged query
  loss; LDS(z') = Spearman over subsets of (sum of the scores of the subset,
  minus the query loss), averaged over queries. A second figure, ``lds_same_run``, uses
  the counterfactual the unrolled methods (magic, sgd_influence, hydra) differentiate:
  the model's own run (its initialisation, batch order and schedule) with the
  subset's complement weighted 0 in every mini-batch loss, so it carries no seed noise.

Every method scores the query *loss* (``measurement="loss"``), in our sign
convention (positive = proponent), float32 model weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.estimators import Checkpoint, InfluenceProblem, Recipe, TaskSpec, init_model, learning_rate_at, train

OUT = Path(__file__).resolve().parent / "out"
CLS = TaskSpec("classification", "cross_entropy")


# ----------------------------------------------------------------------------- data


def digits_split(n_train: int, n_query: int, seed: int = 0):
    """Standardised sklearn digits: (train_x, train_y, query_x, query_y) as float64 / int64 tensors.

    Features are standardised with the training mean and std (constant pixels become 0). Queries are
    drawn from the examples that are not in the training set."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    if n_train + n_query > len(y):
        raise ValueError(f"digits has {len(y)} examples, {n_train} + {n_query} requested")
    tr, te = perm[:n_train], perm[n_train : n_train + n_query]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    sd[sd == 0] = 1.0
    X = (X - mu) / sd
    t = torch.tensor
    return t(X[tr]), t(y[tr]).long(), t(X[te]), t(y[te]).long()


def _key(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the workload object


@dataclass
class Workload:
    name: str
    description: str
    problem: InfluenceProblem
    quality_name: str
    quality: Callable[[np.ndarray], dict[str, float]]
    """scores (m x n, our convention) -> {"metric": value, ...}; the first key is the headline."""
    hp: dict[str, Any]
    """hyper-parameters shared by ours and the peers, per method"""
    info: dict[str, Any] = field(default_factory=dict)
    peer_hp: dict[str, Any] = field(default_factory=dict)
    """peer-only settings per method (e.g. dattri RPS's epochs), not passed to ours"""

    @property
    def n(self) -> int:
        return self.problem.n_train


# ----------------------------------------------------------------------------- analytic softmax regression


class SoftmaxObjective:
    """``sum_i w_i CE_i / denom + wd/2 ||Theta||^2`` for Theta = [W | b] (k x (d+1)), float64, analytic."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int, wd: float) -> None:
        self.xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        self.onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)
        self.k, self.d1, self.wd = k, self.xa.shape[1], wd
        self.p = k * self.d1

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        return self.xa @ theta.view(self.k, -1).T

    def losses(self, theta: torch.Tensor) -> torch.Tensor:
        z = self.logits(theta)
        return torch.logsumexp(z, 1) - (z * self.onehot).sum(1)

    def value(self, theta, w, denom) -> float:
        return float((w * self.losses(theta)).sum() / denom + 0.5 * self.wd * theta.dot(theta))

    def per_example_grads(self, theta: torch.Tensor) -> torch.Tensor:
        """(n, p): gradient of each CE_i with respect to Theta (row-major)."""
        P = torch.softmax(self.logits(theta), 1)
        return ((P - self.onehot)[:, :, None] * self.xa[:, None, :]).reshape(len(P), -1)

    def grad(self, theta, w, denom) -> torch.Tensor:
        P = torch.softmax(self.logits(theta), 1)
        return (((P - self.onehot) * w[:, None]).T @ self.xa / denom).reshape(-1) + self.wd * theta

    def data_hessian_sum(self, theta, w) -> torch.Tensor:
        """sum_i w_i d^2 CE_i / dTheta^2 (p x p, without 1/denom or wd)."""
        n, k, d1 = len(w), self.k, self.d1
        P = torch.softmax(self.logits(theta), 1)
        A = (torch.diag_embed(P) - P[:, :, None] * P[:, None, :]) * w[:, None, None]
        XA = (A[:, :, :, None] * self.xa[:, None, None, :]).reshape(n, k * k * d1)
        return (XA.T @ self.xa).reshape(k, k, d1, d1).permute(0, 2, 1, 3).reshape(self.p, self.p)

    def example_hessian(self, theta, i: int) -> torch.Tensor:
        P = torch.softmax(self.logits(theta)[i], 0)
        A = torch.diag(P) - torch.outer(P, P)
        return torch.kron(A, torch.outer(self.xa[i], self.xa[i]))

    def hessian(self, theta, w, denom) -> torch.Tensor:
        return self.data_hessian_sum(theta, w) / denom + self.wd * torch.eye(self.p, dtype=theta.dtype)

    def newton(self, theta, w, denom, tol: float, max_iter: int = 100) -> torch.Tensor:
        for _ in range(max_iter):
            g = self.grad(theta, w, denom)
            if float(g.norm()) < tol:
                return theta
            step = torch.linalg.solve(self.hessian(theta, w, denom), g)
            f0, t = self.value(theta, w, denom), 1.0
            while t > 1e-10:
                new = theta - t * step
                if self.value(new, w, denom) <= f0 + 1e-14 * abs(f0):
                    break
                t /= 2
            theta = new
        raise RuntimeError(f"Newton did not converge: |g| = {float(self.grad(theta, w, denom).norm()):.3g}")


def _theta_to_state(theta: torch.Tensor, k: int, d: int) -> dict[str, torch.Tensor]:
    T = theta.view(k, d + 1)
    return {"1.weight": T[:, :d].clone(), "1.bias": T[:, d].clone()}


def _state_to_theta(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["1.weight"], state["1.bias"][:, None]], 1).reshape(-1)


def _corr_rows(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean over rows of Pearson and Spearman correlation (rows with constant input count as 0)."""
    from scipy import stats

    pe, sp = [], []
    for a, b in zip(pred, truth, strict=True):
        if np.std(a) == 0 or np.std(b) == 0 or not np.isfinite(a).all():
            pe.append(0.0)
            sp.append(0.0)
            continue
        pe.append(float(stats.pearsonr(a, b)[0]))
        sp.append(float(stats.spearmanr(a, b)[0]))
    return float(np.mean(pe)), float(np.mean(sp))


# ----------------------------------------------------------------------------- workload 1: logreg + LOO


def logreg_workload(quick: bool = False, log=print) -> Workload:
    cfg = {
        "workload": "logreg",
        "n_train": 300 if quick else 1400,
        "n_query": 10 if quick else 100,
        "wd": 1e-2,
        "n_top": 15 if quick else 50,
        "n_random": 15 if quick else 50,
        "tol": 1e-11,
        "version": 1,
    }
    x, y, qx, qy = digits_split(cfg["n_train"], cfg["n_query"])
    n, d = x.shape
    k, wd = 10, cfg["wd"]
    model64 = init_model("linear", {"in_features": d, "num_classes": k}, seed=0).double()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"logreg_loo_{_key(cfg)}.npz"
    obj = SoftmaxObjective(x, y, k, wd)
    ones = torch.ones(n, dtype=torch.float64)
    if path.exists():
        z = np.load(path)
        theta = torch.tensor(z["theta"])
        chosen, actual = z["chosen"], z["actual"]
        log(f"[logreg] LOO ground truth loaded from {path.relative_to(OUT.parent.parent)}")
    else:
        t0 = time.perf_counter()
        res = train(
            model64, CLS, x, y,
            Recipe(optimizer="lbfgs", learning_rate=1.0, epochs=200, weight_decay=wd,
                   lbfgs_tolerance=1e-9, num_checkpoints=0),
        )  # fmt: skip
        theta = obj.newton(_state_to_theta(res.weights), ones, float(n), cfg["tol"])
        # exact IF (analytic, float64) picks the most influential training points
        H = obj.hessian(theta, ones, float(n))
        L = torch.linalg.cholesky(H)
        Gq = SoftmaxObjective(qx, qy, k, wd).per_example_grads(theta)
        Gt = obj.per_example_grads(theta)
        tau = (Gq @ torch.cholesky_solve(Gt.T, L)).numpy() / n  # m x n
        share = np.abs(tau) / np.abs(tau).sum(1, keepdims=True)
        top = np.argsort(-share.sum(0))[: cfg["n_top"]]
        rest = np.setdiff1d(np.arange(n), top)
        rnd = np.random.default_rng(1).choice(rest, cfg["n_random"], replace=False)
        chosen = np.sort(np.concatenate([top, rnd]))
        # exact LOO: fixed-Hessian Newton iterations from the optimum with H_{-i}, then verified
        Hsum = obj.data_hessian_sum(theta, ones)
        qobj = SoftmaxObjective(qx, qy, k, wd)
        before = qobj.losses(theta)
        actual = np.empty((len(qy), len(chosen)))
        eye = wd * torch.eye(obj.p, dtype=torch.float64)
        for c, i in enumerate(chosen):
            w = ones.clone()
            w[i] = 0.0
            Hi = (Hsum - obj.example_hessian(theta, int(i))) / (n - 1) + eye
            Li = torch.linalg.cholesky(Hi)
            th = theta.clone()
            for _ in range(60):
                g = obj.grad(th, w, n - 1.0)
                if float(g.norm()) < cfg["tol"]:
                    break
                th = th - torch.cholesky_solve(g[:, None], Li)[:, 0]
            else:
                th = obj.newton(th, w, n - 1.0, cfg["tol"])
            assert float(obj.grad(th, w, n - 1.0).norm()) < cfg["tol"]
            actual[:, c] = (qobj.losses(th) - before).numpy()
        np.savez(path, theta=theta.numpy(), chosen=chosen, actual=actual)
        log(
            f"[logreg] LOO ground truth: {len(chosen)} exact retrains x {len(qy)} queries in "
            f"{time.perf_counter() - t0:.1f} s -> {path.relative_to(OUT.parent.parent)}"
        )
    grad_norm = float(obj.grad(theta, ones, float(n)).norm())
    model = init_model("linear", {"in_features": d, "num_classes": k}, seed=0)
    weights = {kk: v.float() for kk, v in _theta_to_state(theta, k, d).items()}
    problem = InfluenceProblem(
        model=model, task=CLS, weights=weights,
        train_x=x.float(), train_y=y, query_x=qx.float(), query_y=qy,
        measurement="loss", checkpoints=[Checkpoint(step=0, learning_rate=1.0, state=weights)],
        weight_decay=wd,
    )  # fmt: skip
    # curvature figures for LiSSA's scale and the reports
    H = obj.hessian(theta, ones, float(n))
    ev = torch.linalg.eigvalsh(H)
    lam_max_batch = 0.0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # LiSSA mini-batch Hessians (32 rows) have larger top eigenvalues than H
        idx = torch.randint(n, (32,), generator=g)
        sub = SoftmaxObjective(x[idx], y[idx], k, wd)
        Hb = sub.data_hessian_sum(theta, torch.ones(32, dtype=torch.float64)) / 32
        lam_max_batch = max(lam_max_batch, float(torch.linalg.eigvalsh(Hb)[-1]) + wd)

    def quality(scores: np.ndarray) -> dict[str, float]:
        pe, sp = _corr_rows(np.asarray(scores, dtype=np.float64)[:, chosen], actual)
        return {"loo_pearson": pe, "loo_spearman": sp}

    scale = float(2.0 ** math.ceil(math.log2(1.2 * lam_max_batch)))
    hp = {
        "if_exact": {"damping": 0.0},
        "if_cg": {"damping": 0.0, "max_iter": 100, "rtol": 1e-8},
        "if_lissa": {"damping": 0.0, "scale": scale, "depth": 200 if quick else 1000, "repeats": 1,
                     "batch_size": 32, "seed": 0},
        "if_arnoldi": {"rank": 50, "n_iter": 100, "damping": 0.0, "seed": 0},
        "ekfac": {"fisher": "expected", "damping": None, "seed": 0},
        "grad_dot": {},
        "grad_cos": {},
        "trak": {"projection_dim": 128 if quick else 512, "projection": "rademacher", "seed": 0,
                 "damping": 0.0, "use_checkpoints": False},
        "datainf": {"damping_scale": 0.1},
        "representer": {"l2": 1e-3},
        "logra": {"k_in": 16, "k_out": 16, "projection": "gaussian", "damping": 1e-3, "seed": 0},
        "magic": {},
        "hydra": {},
        "source": {"fisher": "expected"},
    }  # fmt: skip
    info = {
        **{kk: v for kk, v in cfg.items() if kk != "version"},
        "p": obj.p,
        "objective_grad_norm": grad_norm,
        "hessian_eigenvalues": [float(ev[0]), float(ev[-1])],
        "lissa_batch_lambda_max": lam_max_batch,
        "ground_truth": (
            f"{len(chosen)} exact LOO retrains ({cfg['n_top']} top-|IF| + {cfg['n_random']} random)"
        ),
    }
    return Workload(
        "logreg",
        f"L2 logistic regression (linear 64->10, p={obj.p}, wd={wd}) on digits, n={n}, m={len(qy)}",
        problem,
        "LOO Pearson / Spearman",
        quality,
        hp,
        info,
        peer_hp={"representer": {"epoch": 300 if quick else 3000}},
    )


# ----------------------------------------------------------------------------- workload 2: MLP + LDS


def mlp_arch(quick: bool = False) -> dict:
    return {"in_features": 64, "hidden": [16 if quick else 64], "num_classes": 10, "activation": "relu"}


def _mlp_recipe(seed: int, epochs: int) -> Recipe:
    return Recipe(
        optimizer="sgd", learning_rate=0.05, momentum=0.9, schedule="cosine", epochs=epochs,
        batch_size=64, weight_decay=1e-3, seed=seed, num_checkpoints=5,
    )  # fmt: skip


def _masked_run(arch: dict, recipe: Recipe, x, y, keep: np.ndarray) -> torch.nn.Module:
    """The recipe's own run (seeded init, shuffling, schedule; torch.optim) with the rows outside
    ``keep`` weighted 0 in every mini-batch mean loss: the same batches, minus those rows."""
    model = init_model("mlp", arch, seed=recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=recipe.learning_rate, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    w = torch.as_tensor(keep, dtype=torch.float32)
    gen = torch.Generator().manual_seed(recipe.seed)
    n = len(y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for epoch in range(recipe.epochs):
            for group in opt.param_groups:
                group["lr"] = learning_rate_at(recipe, epoch)
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, recipe.batch_size):
                idx = perm[s : s + recipe.batch_size]
                loss = (
                    w[idx] * torch.nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
                ).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model


@torch.no_grad()
def _query_losses(model, state, qx, qy) -> np.ndarray:
    model.load_state_dict(state)
    model.eval()
    return torch.nn.functional.cross_entropy(model(qx), qy, reduction="none").double().numpy()


def mlp_workload(quick: bool = False, log=print) -> Workload:
    arch = mlp_arch(quick)
    cfg = {
        "workload": "mlp",
        "n_train": 300 if quick else 1400,
        "n_query": 10 if quick else 100,
        "arch": arch,
        "epochs": 20,
        "subsets": 20 if quick else 100,
        "seeds": 1 if quick else 3,
        "alpha": 0.5,
        "version": 1,
    }
    x, y, qx, qy = digits_split(cfg["n_train"], cfg["n_query"])
    x, qx = x.float(), qx.float()
    n = len(y)
    model = init_model("mlp", arch, seed=0)
    recipe = _mlp_recipe(0, cfg["epochs"])
    res = train(model, CLS, x, y, recipe)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"mlp_lds_{_key(cfg)}.npz"
    if path.exists():
        z = np.load(path)
        masks, outputs = z["masks"], z["outputs"]
        log(f"[mlp] LDS ground truth loaded from {path.relative_to(OUT.parent.parent)}")
    else:
        t0 = time.perf_counter()
        rng = np.random.default_rng(123)
        M, size = cfg["subsets"], int(cfg["alpha"] * n)
        masks = np.zeros((M, n), dtype=bool)
        outputs = np.zeros((M, len(qy)))
        for j in range(M):
            masks[j, rng.choice(n, size, replace=False)] = True
            idx = torch.from_numpy(np.flatnonzero(masks[j]))
            for s in range(cfg["seeds"]):
                m = init_model("mlp", arch, seed=1000 * (j + 1) + s)
                r = train(m, CLS, x[idx], y[idx], _mlp_recipe(1000 * (j + 1) + s, cfg["epochs"]))
                outputs[j] += _query_losses(m, r.weights, qx, qy) / cfg["seeds"]
        np.savez(path, masks=masks, outputs=outputs)
        log(
            f"[mlp] LDS ground truth: {M} subsets x {cfg['seeds']} seeds retrained in "
            f"{time.perf_counter() - t0:.1f} s -> {path.relative_to(OUT.parent.parent)}"
        )
    same_path = OUT / f"mlp_lds_same_run_{_key(cfg)}.npz"
    if same_path.exists():
        same_run = np.load(same_path)["outputs"]
    else:
        t0 = time.perf_counter()
        same_run = np.zeros_like(outputs)
        for j in range(len(masks)):
            m = _masked_run(arch, recipe, x, y, masks[j])
            same_run[j] = _query_losses(m, m.state_dict(), qx, qy)
        np.savez(same_path, outputs=same_run)
        seconds = time.perf_counter() - t0
        log(f"[mlp] same-run LDS ground truth: {len(masks)} masked replays in {seconds:.1f} s")
    problem = InfluenceProblem(
        model=model, task=CLS, weights=res.weights, train_x=x, train_y=y, query_x=qx, query_y=qy,
        measurement="loss", checkpoints=res.checkpoints, weight_decay=1e-3,
        recipe=dataclasses.asdict(recipe),
    )  # fmt: skip
    Mf = masks.astype(np.float64)

    def quality(scores: np.ndarray) -> dict[str, float]:
        pred = np.asarray(scores, dtype=np.float64) @ Mf.T  # m x M: sum of the subset's scores
        # a proponent's presence lowers the query loss: compare with minus the loss
        _, sp = _corr_rows(pred, -outputs.T)
        _, same = _corr_rows(pred, -same_run.T)
        return {"lds": sp, "lds_same_run": same}

    model.load_state_dict(res.weights)
    with torch.no_grad():
        acc = float((model(qx).argmax(1) == qy).float().mean())
    p = sum(v.numel() for v in model.parameters())
    # the SGD-trained MLP is not at a minimum: the damping keeps H + damping I positive definite
    # (smallest eigenvalue of H incl. weight decay ~ -0.004 for the full model)
    damp = 0.1 if quick else 0.01
    hp = {
        "if_exact": {"damping": damp},
        "if_cg": {"damping": damp, "max_iter": 100, "rtol": 1e-8},
        "if_lissa": {"damping": damp, "scale": 4.0, "depth": 100 if quick else 1000, "repeats": 1,
                     "batch_size": 32, "seed": 0},
        "if_arnoldi": {"rank": 50, "n_iter": 100, "damping": damp, "seed": 0},
        "ekfac": {"fisher": "expected", "damping": None, "seed": 0},
        "tracincp": {},
        "grad_dot": {},
        "grad_cos": {},
        "trak": {"projection_dim": 128 if quick else 512, "projection": "rademacher", "seed": 0,
                 "damping": 0.0, "use_checkpoints": True},
        "datainf": {"damping_scale": 0.1},
        "representer": {"l2": 1e-3},
        "logra": {"k_in": 16, "k_out": 16, "projection": "gaussian", "damping": 1e-3, "seed": 0},
        "magic": {},
        "hydra": {},
        "source": {"fisher": "expected"},
    }  # fmt: skip
    info = {
        **{kk: v for kk, v in cfg.items() if kk != "version"},
        "p": p,
        "query_accuracy": acc,
        "checkpoints": [(c.step, c.learning_rate) for c in res.checkpoints],
        "ground_truth": f"LDS: {cfg['subsets']} subsets (alpha={cfg['alpha']}) x {cfg['seeds']} seeds",
    }
    return Workload(
        "mlp",
        f"MLP 64-{arch['hidden'][0]}-10 (p={p}, SGD, {len(res.checkpoints)} checkpoints) on digits, n={n}, "
        f"m={len(qy)}",
        problem,
        "LDS (Spearman)",
        quality,
        hp,
        info,
        peer_hp={"representer": {"epoch": 300 if quick else 3000}},
    )


WORKLOADS = {"logreg": logreg_workload, "mlp": mlp_workload}

__all__ = ["OUT", "WORKLOADS", "Workload", "digits_split", "logreg_workload", "mlp_workload"]
