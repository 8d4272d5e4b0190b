"""The retraining engine: train one model per subset mask and measure it.

``train_subsets(model, task, recipe, x, y, masks, seeds, eval_sets, measure)``
returns, for every mask row ``k``, the requested measurements of the model
trained on ``{i : masks[k, i]}`` with training seed ``seeds[k]``: per-example
query objectives (``"loss"``, or ``"margin"`` giving *minus* the margin, as
:func:`app.estimators.objectives.query_objective`) and scalar utilities
(``"accuracy"``, ``"neg_loss"`` = minus the mean loss) on named evaluation sets.

What "the same training" means (so that outputs are a deterministic function of
(mask, seed) and identical whether masks are trained together, alone, or split
into shards):

* **Initialisation**: the model factory called with the row's seed (for an
  ``nn.Module`` template: a deep copy whose modules' ``reset_parameters`` are
  called in ``modules()`` order under ``torch.manual_seed(seed)``; for the
  built-in architectures this equals ``init_model(arch, params, seed)``).
* **SGD / Adam / AdamW recipes** (``solver="batched"`` or ``"sequential"``): for
  every epoch ``e`` the learning rate is ``learning_rate_at(recipe, e)`` and the
  order is ``torch.randperm(n)`` from a ``torch.Generator`` seeded with the row's
  seed (one draw per epoch, exactly as :func:`app.estimators.training.train`),
  over *all* n training indices, cut into ``ceil(n / batch_size)`` batches. The
  loss of a batch is the mean loss over the batch members that are in the subset
  (zero when none is); the optimizer steps after every batch regardless (weight
  decay and momentum still act). Every subset therefore takes the same
  ``epochs * ceil(n / batch_size)`` steps, which lets K models train in lock-step
  (``torch.func.stack_module_state`` + ``functional_call`` + ``vmap`` over the
  model dimension, per-model sample weights ``mask / |S ∩ batch|``). With the full
  mask and ``seed = recipe.seed`` this reproduces ``train()``'s model.
  ``"sequential"`` runs the same schedule one model at a time on the selected rows
  (the fallback for models with buffers or dropout, e.g. BatchNorm, which cannot
  be vmapped in train mode; with BatchNorm a batch holding a single subset member
  contributes no gradient, as batch statistics need two rows).
* **L-BFGS recipes** on non-linear models: ``train()`` on the subset's rows
  (full batch, so this is exactly the subset objective), one model at a time.
* **Newton** (``solver="newton"``, the default for a linear model with an L-BFGS
  recipe): the exact minimiser of ``mean_{i in S} L(z_i) + weight_decay/2
  ||theta||^2``, in float64: closed form (batched solve) for linear regression,
  batched damped Newton with step halving for (multinomial) logistic regression,
  warm-started from the full-data minimiser, each model iterating until its own
  gradient norm is below ``newton_tol`` (so a model's iterates do not depend on
  which other models share its batch). Models are grouped by subset size and each
  touches only its own rows (padded to the group's largest subset), so the cost
  follows the subset sizes rather than n; two-class models are solved in the
  reduced parametrisation ``w = theta_1 - theta_0`` (same minimiser, a p- instead
  of a 2p-dimensional system).
* **Empty subsets** are not trained: their model is the uninformed predictor with
  all outputs 0 (uniform class probabilities, loss log k for cross-entropy,
  accuracy 1/k, regression prediction 0).
* **Accuracy** takes the lowest class index among logits within 1e-9 (relative)
  of the largest: classes missing from a subset have tied logits, which rounding
  would otherwise break differently in different batches.

On CPU, outputs for a row agree to rounding (about 1e-12 in float64) across
batch compositions; in practice they are usually bitwise identical.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..architectures import init_model
from ..base import EstimatorError, NumericalError, ProgressCallback, TaskSpec
from ..objectives import per_example_loss, query_objective
from ..training import Recipe, learning_rate_at, train, validate_recipe
from .samplers import SubsetPlan

Solver = Literal["auto", "newton", "batched", "sequential"]
SOLVERS = ("auto", "newton", "batched", "sequential")
PER_EXAMPLE = ("loss", "margin")
SCALAR = ("accuracy", "neg_loss")
ModelSpec = nn.Module | Callable[[int], nn.Module] | tuple[str, Any]
EvalSets = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

_EVAL_CHUNK = 4096


# ----------------------------------------------------------------------------- outputs


@dataclass
class SubsetOutputs:
    """Measurements per mask row: ``arrays[name]`` has K rows (K x m per-example, K scalars)."""

    arrays: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    def rows(self, lo: int, hi: int) -> SubsetOutputs:
        return SubsetOutputs({k: v[lo:hi] for k, v in self.arrays.items()}, dict(self.info))

    @staticmethod
    def concat(parts: Iterable[SubsetOutputs]) -> SubsetOutputs:
        """Merge shard outputs given in row order."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        keys = parts[0].arrays.keys()
        info = dict(parts[0].info)
        info["n_trained"] = sum(int(p.info.get("n_trained", 0)) for p in parts)
        return SubsetOutputs({k: np.concatenate([p.arrays[k] for p in parts]) for k in keys}, info)


# ----------------------------------------------------------------------------- model factories


def reset_factory(template: nn.Module) -> Callable[[int], nn.Module]:
    """``seed -> module``: a deep copy of ``template`` re-initialised under ``torch.manual_seed(seed)``.

    Calls ``reset_parameters()`` (and ``reset_running_stats()``) of every module in
    ``modules()`` order, in float32, then casts each tensor back to the template's
    dtype: this replays the constructors' random draws, so for the built-in
    architectures ``make(seed)`` equals ``init_model(arch, params, seed).to(dtype)``.
    Frozen parameters (``requires_grad`` False: a LoRA base, a frozen feature extractor) keep the
    template's values exactly, since training never changes them. The global RNG is left untouched.
    """

    dtype = next((t.dtype for t in template.parameters() if t.is_floating_point()), torch.float32)

    def make(seed: int) -> nn.Module:
        model = copy.deepcopy(template).float()  # draw in float32, as the architectures' constructors do
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            with torch.no_grad():
                for m in model.modules():
                    if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                        m.reset_parameters()
                    if hasattr(m, "reset_running_stats") and callable(m.reset_running_stats):
                        m.reset_running_stats()
        model = model.to(dtype)
        with torch.no_grad():
            for param, kept in zip(model.parameters(), template.parameters(), strict=True):
                if not kept.requires_grad:
                    param.copy_(kept)
        return model

    return make


def model_factory(model: ModelSpec) -> Callable[[int], nn.Module]:
    """Normalise ``model`` (an nn.Module template, ``(arch_name, params)`` or ``seed -> module``)."""
    if isinstance(model, nn.Module):
        return reset_factory(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], str):
        arch, params = model
        return lambda seed: init_model(arch, params, int(seed))
    if callable(model):
        return model
    raise TypeError("model must be an nn.Module, (architecture, params) or a callable seed -> module")


def linear_layer(model: nn.Module) -> nn.Linear | None:
    """The model's only layer if it is ``Linear`` (optionally after Flatten/Identity), else None."""
    mods = list(model.modules())
    if not all(isinstance(m, nn.Sequential | nn.Flatten | nn.Identity | nn.Linear) for m in mods):
        return None
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        return None
    lin = linears[0]
    if not lin.weight.requires_grad or (lin.bias is not None and not lin.bias.requires_grad):
        return None
    if isinstance(model, nn.Sequential):
        flat: list[nn.Module] = []

        def walk(m: nn.Module) -> None:
            for c in m.children():
                walk(c) if isinstance(c, nn.Sequential) else flat.append(c)

        walk(model)
        if flat[-1] is not lin:
            return None
    return lin


def vmap_safe(model: nn.Module) -> bool:
    """No buffers and no dropout: train-mode forward is a pure function of parameters and inputs."""
    if any(True for _ in model.buffers()):
        return False
    return not any(isinstance(m, nn.modules.dropout._DropoutNd | nn.AlphaDropout) for m in model.modules())


def choose_solver(template: nn.Module, recipe: Recipe, solver: str) -> str:
    """Resolve ``solver`` ("auto" etc.) for this model and recipe; EstimatorError if impossible."""
    if solver not in SOLVERS:
        raise EstimatorError(f"unknown solver {solver!r}", parameter="/method/params/solver")
    linear = linear_layer(template) is not None
    iterative = recipe.optimizer != "lbfgs"
    if solver == "auto":
        if linear and not iterative:
            return "newton"
        return "batched" if iterative and vmap_safe(template) else "sequential"
    if solver == "newton" and not linear:
        raise EstimatorError(
            "solver 'newton' needs a linear model (a single Linear layer)", parameter="/method/params/solver"
        )
    if solver == "batched":
        if not iterative:
            raise EstimatorError(
                "solver 'batched' replays SGD/Adam/AdamW recipes; L-BFGS trains one model at a time",
                parameter="/method/params/solver",
            )
        if not vmap_safe(template):
            raise EstimatorError(
                "solver 'batched' needs a model without buffers or dropout (e.g. no BatchNorm); "
                "use 'sequential'",
                parameter="/method/params/solver",
            )
    return solver


# ----------------------------------------------------------------------------- measurements


def _check_measure(task: TaskSpec, measure: Mapping[str, str], eval_sets: EvalSets) -> None:
    for name, kind in measure.items():
        if name not in eval_sets:
            raise EstimatorError(f"measure names evaluation set {name!r}, which was not given")
        if kind not in PER_EXAMPLE + SCALAR:
            raise EstimatorError(f"unknown measurement {kind!r} for {name!r}")
        if kind in ("accuracy", "margin") and task.kind != "classification":
            raise EstimatorError(
                f"{kind!r} needs a classification model; use 'loss' for regression",
                parameter="/method/params/utility" if kind == "accuracy" else "/measurement",
            )


def _predicted_class(outputs: torch.Tensor) -> torch.Tensor:
    """Argmax with near-ties (within 1e-9 of the top logit, relative) given to the lowest class index.

    The logits of classes missing from a subset tie in exact arithmetic; a plain argmax would let
    rounding, which depends on the batch a model was trained in, choose among them."""
    top = outputs.max(dim=-1, keepdim=True).values
    near = outputs >= top - 1e-9 * top.abs().clamp(min=1.0)
    return near.to(torch.uint8).argmax(dim=-1)


def measure_outputs(outputs: torch.Tensor, y: torch.Tensor, task: TaskSpec, kind: str) -> torch.Tensor:
    """Measurement ``kind`` of model outputs (K, m, k) against labels (m,): (K, m) or (K,)."""
    K, m = outputs.shape[0], outputs.shape[1]
    if kind in SCALAR and kind == "accuracy":
        return (_predicted_class(outputs) == y.long().unsqueeze(0)).to(torch.float64).mean(dim=1)
    flat = outputs.reshape(K * m, *outputs.shape[2:])
    yy = y.repeat(K, *([1] * (y.dim() - 1))) if y.dim() > 1 else y.repeat(K)
    if kind == "neg_loss":
        return -per_example_loss(flat, yy, task).reshape(K, m).to(torch.float64).mean(dim=1)
    return query_objective(flat, yy, task, kind).reshape(K, m).to(torch.float64)


def _empty_measure(y: torch.Tensor, task: TaskSpec, kind: str, k: int) -> torch.Tensor:
    out = torch.zeros(1, y.shape[0], k, dtype=torch.float64)
    if kind == "accuracy":
        return torch.full((1,), 1.0 / k, dtype=torch.float64)
    yy = y.to(torch.float64) if y.is_floating_point() else y
    return measure_outputs(out, yy, task, kind)


# ----------------------------------------------------------------------------- Newton / closed form


def _features(x: torch.Tensor, bias: bool) -> torch.Tensor:
    f = x.reshape(x.shape[0], -1).to(torch.float64)
    return torch.cat([f, torch.ones(f.shape[0], 1, dtype=torch.float64)], dim=1) if bias else f


def _packed(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each subset's row indices padded to the largest subset (K, s), and mean-loss weights (K, s).

    Padding rows weigh 0, so a model touches only its own rows: a group of small subsets (TMC
    prefixes) costs in proportion to their sizes rather than to n."""
    sizes = masks.sum(dim=1)
    s = int(sizes.max())
    idx = torch.argsort((~masks).to(torch.uint8), dim=1, stable=True)[:, :s]
    valid = torch.arange(s).unsqueeze(0) < sizes.unsqueeze(1)
    return idx, valid.to(torch.float64) / sizes.unsqueeze(1).to(torch.float64)


def _rows(t: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    return t if r is None else t[r]


def _spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``A^-1 b`` for symmetric positive definite A (K, d, d), b (K, d)."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        raise NumericalError(
            "the logistic-regression Hessian is not positive definite; use weight_decay > 0",
            parameter="/recipe/weight_decay",
        )
    return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)


class _Multinomial:
    """``sum_i W_i CE_i + wd/2 ||theta||^2`` over packed rows X (K, s, p); theta flat (K, k p).

    ``r`` selects models (None: all); :meth:`take` drops converged ones for good, so the common
    calls need no gather."""

    gscale = 1.0

    def __init__(self, X, Y, W, wd, k):
        self.X, self.Y, self.W, self.wd, self.k = X, Y, W, wd, k

    @classmethod
    def of(cls, X, y, W, wd, k):
        return cls(X, torch.nn.functional.one_hot(y.long(), k).to(torch.float64), W, wd, k)

    def take(self, keep):
        return _Multinomial(self.X[keep], self.Y[keep], self.W[keep], self.wd, self.k)

    def _logp(self, th, r):
        logits = torch.bmm(_rows(self.X, r), th.view(th.shape[0], self.k, -1).transpose(1, 2))
        return torch.log_softmax(logits, dim=-1)

    def _value(self, th, r, logp):
        nll = -(_rows(self.Y, r) * logp).sum(-1)
        return (_rows(self.W, r) * nll).sum(-1) + 0.5 * self.wd * (th * th).sum(1)

    def value(self, th, r=None):
        return self._value(th, r, self._logp(th, r))

    def derivatives(self, th):
        """Objective, gradient (K, k p) and what :meth:`newton_step` needs (the probabilities)."""
        logp = self._logp(th, None)
        P = logp.exp()
        G = torch.bmm(((P - self.Y) * self.W.unsqueeze(-1)).transpose(1, 2), self.X)
        return self._value(th, None, logp), G.reshape(th.shape[0], -1) + self.wd * th, P

    def hessian(self, P):
        """``sum_i W_i (diag(p_i) - p_i p_i^T) (x) x_i x_i^T + wd I``, one symmetric block at a time."""
        X, W = self.X, self.W
        K, k, p = P.shape[0], self.k, X.shape[2]
        Xt = X.transpose(1, 2)
        H = torch.empty(K, k, p, k, p, dtype=torch.float64)
        for a in range(k):
            for b in range(a, k):
                coef = W * ((P[:, :, a] if a == b else 0.0) - P[:, :, a] * P[:, :, b])
                blk = torch.bmm(Xt * coef.unsqueeze(1), X)
                H[:, a, :, b, :] = blk
                if a != b:
                    H[:, b, :, a, :] = blk
        return H.reshape(K, k * p, k * p) + self.wd * torch.eye(k * p, dtype=torch.float64)

    def newton_step(self, P, G):
        """``H^-1 G``: from the (k p)-square Hessian, or, when the subsets have fewer rows than
        features, from the (s k)-square Woodbury form ``(wd I + J^T J)^-1 = (I - J^T (wd I + J J^T)^-1 J)
        / wd``, ``J`` stacking ``sqrt(W_i) B_i^T (x) x_i`` with ``B_i B_i^T = diag(p_i) - p_i p_i^T``
        (``B_i = diag(sqrt p_i) - p_i sqrt(p_i)^T``): small subsets (TMC prefixes) of many-class
        models then cost ``(s k)^3`` instead of ``(k p)^3``."""
        K, s, p = self.X.shape
        if s >= p:
            return _spd_solve(self.hessian(P), G)
        k = self.k
        rp = P.sqrt()
        B = torch.diag_embed(rp) - P.unsqueeze(-1) * rp.unsqueeze(-2)  # (K, s, k, k): B[i, a, c]
        B = B * self.W.sqrt()[:, :, None, None]
        gram = torch.bmm(self.X, self.X.transpose(1, 2))  # (K, s, s)
        M = torch.einsum("kiac,kjad,kij->kicjd", B, B, gram).reshape(K, s * k, s * k)
        M = M + self.wd * torch.eye(s * k, dtype=torch.float64)
        g = G.view(K, k, p)
        Jg = torch.einsum("kiac,kia->kic", B, torch.bmm(self.X, g.transpose(1, 2))).reshape(K, s * k)
        v = _spd_solve(M, Jg).view(K, s, k)
        JTv = torch.bmm(torch.einsum("kiac,kic->kai", B, v), self.X)  # (K, k, p)
        return (g - JTv).reshape(K, -1) / self.wd

    def weights(self, th):
        return th.view(th.shape[0], self.k, -1)


class _Binary:
    """Two-class softmax regression in its reduced form.

    With both class vectors penalised, the two gradient blocks sum to ``wd (theta_0 + theta_1)``,
    so the minimiser is ``(-w/2, w/2)`` with ``w`` the minimiser of
    ``sum_i W_i softplus(-(2 y_i - 1) w.x_i) + wd/4 ||w||^2``: a p-dimensional Newton problem
    instead of a 2p-dimensional one (a quarter of the Hessian work, an eighth of the Cholesky).
    Gradient norms are those of the full parametrisation (sqrt 2 times the reduced one)."""

    gscale = math.sqrt(2.0)

    def __init__(self, X, sign, W, wd):
        self.X, self.sign, self.W, self.wd = X, sign, W, wd

    @classmethod
    def of(cls, X, y, W, wd):
        return cls(X, 2.0 * y.to(torch.float64) - 1.0, W, wd)

    def take(self, keep):
        return _Binary(self.X[keep], self.sign[keep], self.W[keep], self.wd)

    def _z(self, w, r):
        return torch.bmm(_rows(self.X, r), w.unsqueeze(-1)).squeeze(-1)

    def _value(self, w, r, z):
        loss = -torch.nn.functional.logsigmoid(_rows(self.sign, r) * z)
        return (_rows(self.W, r) * loss).sum(-1) + 0.25 * self.wd * (w * w).sum(1)

    def value(self, w, r=None):
        return self._value(w, r, self._z(w, r))

    def derivatives(self, w):
        z = self._z(w, None)
        sig = torch.sigmoid(z)
        resid = self.W * (sig - 0.5 * (self.sign + 1.0))
        G = torch.bmm(resid.unsqueeze(1), self.X).squeeze(1) + 0.5 * self.wd * w
        return self._value(w, None, z), G, sig

    def hessian(self, sig):
        c = self.W * sig * (1.0 - sig)
        H = torch.bmm(self.X.transpose(1, 2) * c.unsqueeze(1), self.X)
        return H + 0.5 * self.wd * torch.eye(self.X.shape[2], dtype=torch.float64)

    def newton_step(self, sig, G):
        return _spd_solve(self.hessian(sig), G)

    def weights(self, w):
        return torch.stack([-0.5 * w, 0.5 * w], dim=1)


def _logistic_problem(X, y, W, wd, k):
    return _Binary.of(X, y, W, wd) if k == 2 else _Multinomial.of(X, y, W, wd, k)


def _newton(problem, theta0, tol, max_iter):
    """Batched damped Newton (Armijo step halving); returns (theta (K, d), gradient norms (K,)).

    Every model iterates until its own gradient norm is below ``tol``, so its iterates do not
    depend on which other models share the batch; converged models leave the batch."""
    theta = theta0.clone()
    pos = torch.arange(theta.shape[0])  # the rows of theta still in `problem`
    th = theta.clone()
    gnorm = torch.full((theta.shape[0],), math.inf, dtype=torch.float64)
    for it in range(max_iter + 1):
        if pos.numel() == 0:
            break
        f, G, state = problem.derivatives(th)
        g = problem.gscale * G.norm(dim=1)
        gnorm[pos] = g
        keep = g > tol
        if not bool(keep.any()) or it == max_iter:
            break
        if not bool(keep.all()):
            theta[pos[~keep]] = th[~keep]
            problem, pos = problem.take(keep), pos[keep]
            th, f, G, state = th[keep], f[keep], G[keep], state[keep]
        step = problem.newton_step(state, G)
        dec = (G * step).sum(dim=1)
        slack = 1e-13 * f.abs().clamp(min=1.0)
        new = th - step
        pending = problem.value(new) > f - 1e-4 * dec + slack
        t = torch.ones(th.shape[0], dtype=torch.float64)
        for _ls in range(59):
            pi = torch.nonzero(pending).reshape(-1)
            if pi.numel() == 0:
                break
            t[pi] *= 0.5
            cand = th[pi] - t[pi, None] * step[pi]
            ok = problem.value(cand, pi) <= f[pi] - 1e-4 * t[pi] * dec[pi] + slack[pi]
            new[pi[ok]] = cand[ok]
            pending[pi[ok]] = False
        if bool(pending.any()):  # no decrease possible: at the optimum to rounding
            go = ~pending
            theta[pos[pending]] = th[pending]
            problem, pos, new = problem.take(go), pos[go], new[go]
        th = new
    theta[pos] = th
    return theta, gnorm


def _ridge_closed_form(X, Yt, W, wd, n_out):
    """Weighted least squares (mean loss over outputs) + wd/2||theta||^2; theta (K, n_out, p)."""
    c = 2.0 / n_out
    A = c * torch.einsum("kn,np,nq->kpq", W, X, X)
    B = c * torch.einsum("kn,np,no->kpo", W, X, Yt)
    if wd > 0:
        A = A + wd * torch.eye(X.shape[1], dtype=torch.float64)
        sol = torch.linalg.solve(A, B)
    else:
        sol = torch.linalg.pinv(A, hermitian=True) @ B  # minimum-norm minimiser
    return sol.transpose(1, 2)


_last_start: tuple | None = None


def _newton_start(template, task, recipe, x, y, tol, max_iter, warm_start):
    """Initial iterate shared by every Newton group, in the solver's parametrisation (1, d): the
    full-data minimiser (warm start) or zeros.

    The minimiser of the last call is reused while ``x`` and ``y`` are the same, unmodified tensors
    and the settings match: adaptive methods call the engine once per round with the same data."""
    global _last_start
    lin = linear_layer(template)
    k, bias = lin.out_features, lin.bias is not None
    X = _features(x, bias)
    d = X.shape[1] if k == 2 else k * X.shape[1]
    if task.kind != "classification" or not warm_start or recipe.weight_decay <= 0:
        return torch.zeros(1, d, dtype=torch.float64)
    key = (x._version, y._version, k, bias, float(recipe.weight_decay), tol, max_iter)
    cached = _last_start
    if cached is not None and cached[0]() is x and cached[1]() is y and cached[2] == key:
        return cached[3]
    full = torch.full((1, x.shape[0]), 1.0 / x.shape[0], dtype=torch.float64)
    problem = _logistic_problem(X.unsqueeze(0), y.unsqueeze(0), full, float(recipe.weight_decay), k)
    theta0, _ = _newton(problem, torch.zeros(1, d, dtype=torch.float64), tol, max_iter)
    _last_start = (weakref.ref(x), weakref.ref(y), key, theta0)
    return theta0


def _train_newton(template, task, recipe, x, y, masks, tol, max_iter, theta0):
    """Exact minimisers for the rows of ``masks``: (theta (K, k, p), gradient norms, bias)."""
    lin = linear_layer(template)
    bias = lin.bias is not None
    X = _features(x, bias)
    k = lin.out_features
    wd = float(recipe.weight_decay)
    if task.kind == "regression":
        cnt = masks.sum(dim=1, keepdim=True).to(torch.float64)
        W = masks.to(torch.float64) / cnt
        Yt = y.to(torch.float64).reshape(x.shape[0], -1)
        if Yt.shape[1] != k:
            Yt = Yt.expand(-1, k) if Yt.shape[1] == 1 else Yt
        theta = _ridge_closed_form(X, Yt, W, wd, k)
        return theta, torch.zeros(masks.shape[0], dtype=torch.float64), bias
    if wd <= 0:
        raise EstimatorError(
            "exact (Newton) retraining of logistic regression needs weight_decay > 0 (small subsets are "
            "separable and have no minimiser); set the recipe's weight_decay or use an SGD recipe",
            parameter="/recipe/weight_decay",
        )
    idx, W = _packed(masks)
    problem = _logistic_problem(X[idx], y[idx], W, wd, k)
    theta, gnorm = _newton(problem, theta0.expand(masks.shape[0], -1), tol, max_iter)
    return problem.weights(theta), gnorm, bias


def _newton_outputs(theta, bias, x_eval):
    return torch.einsum("mp,kcp->kmc", _features(x_eval, bias), theta)


# ----------------------------------------------------------------------------- iterative training


def _optimizer(recipe: Recipe, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    lr, wd = recipe.learning_rate, recipe.weight_decay
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=wd)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _as_input(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=dev, dtype=dtype) if t.is_floating_point() else t.to(device=dev)


def _train_batched(factory, task, recipe, x, y, masks, seeds, dev):
    """Train len(seeds) models in lock-step; returns (meta module, stacked params, stacked buffers)."""
    models = [factory(int(s)).to(dev) for s in seeds]
    dtype = next(p for p in models[0].parameters() if p.is_floating_point()).dtype
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    base.train()
    del models
    opt = _optimizer(recipe, list(params.values()))
    n, bs = x.shape[0], recipe.batch_size
    xd, yd = _as_input(x, dev, dtype), _as_input(y, dev, dtype)
    mf = masks.to(device=dev, dtype=dtype)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def model_loss(p, b, xb, yb, wb):
        out = functional_call(base, (p, b), (xb,))
        return (per_example_loss(out, yb, task) * wb).sum()

    batched_loss = vmap(model_loss)
    for epoch in range(recipe.epochs):
        lr = learning_rate_at(recipe, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(dev)
        for s in range(0, n, bs):
            idx = perms[:, s : s + bs]  # (K, b)
            wb = torch.gather(mf, 1, idx)
            wb = wb / wb.sum(dim=1, keepdim=True).clamp(min=1.0)
            losses = batched_loss(params, buffers, xd[idx], yd[idx], wb)
            if not bool(torch.isfinite(losses).all()):
                bad = int(torch.nonzero(~torch.isfinite(losses))[0, 0])
                raise NumericalError(
                    f"retraining diverged: the loss of subset row {bad} became NaN/inf (epoch {epoch + 1}); "
                    "lower the learning rate or standardise the inputs",
                    parameter="/recipe/learning_rate",
                )
            opt.zero_grad(set_to_none=False)
            losses.sum().backward()
            opt.step()
    detached = {k: v.detach() for k, v in params.items()}
    for k, v in detached.items():
        if not bool(torch.isfinite(v).all()):
            raise NumericalError(
                f"retraining diverged: weights {k!r} became NaN/inf", parameter="/recipe/learning_rate"
            )
    base.eval()
    return base, detached, buffers, dtype


@torch.no_grad()
def _batched_outputs(base, params, buffers, x_eval, dtype, dev):
    def fwd(p, b, xe):
        return functional_call(base, (p, b), (xe,))

    f = vmap(fwd, in_dims=(0, 0, None))
    parts = [
        f(params, buffers, _as_input(x_eval[s : s + _EVAL_CHUNK], dev, dtype))
        for s in range(0, x_eval.shape[0], _EVAL_CHUNK)
    ]
    return torch.cat(parts, dim=1).to(torch.float64)


def _train_sequential(factory, task, recipe, x, y, mask, seed, dev) -> nn.Module:
    model = factory(int(seed)).to(dev)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if recipe.optimizer == "lbfgs":
        rows = torch.nonzero(mask).reshape(-1)
        train(model, task, x[rows], y[rows], dataclasses.replace(recipe, seed=int(seed), num_checkpoints=0))
        return model
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = _optimizer(recipe, params)
    n, bs = x.shape[0], recipe.batch_size
    # BatchNorm cannot normalise a batch of one in train mode: such batches contribute no gradient
    min_rows = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(int(seed))
        for epoch in range(recipe.epochs):
            lr = learning_rate_at(recipe, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, bs):
                idx = perm[s : s + bs]
                sel = idx[mask[idx]]
                opt.zero_grad(set_to_none=False)
                if sel.numel() >= min_rows:
                    out = model(_as_input(x[sel], dev, dtype))
                    loss = per_example_loss(out, _as_input(y[sel], dev, dtype), task).mean()
                    if not math.isfinite(float(loss.detach())):
                        raise NumericalError(
                            f"retraining diverged (epoch {epoch + 1}); lower the learning rate",
                            parameter="/recipe/learning_rate",
                        )
                    loss.backward()
                opt.step()
    return model


@torch.no_grad()
def _module_outputs(model, x_eval, dev):
    model.eval()
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    parts = [
        model(_as_input(x_eval[s : s + _EVAL_CHUNK], dev, dtype))
        for s in range(0, x_eval.shape[0], _EVAL_CHUNK)
    ]
    return torch.cat(parts, dim=0).unsqueeze(0).to(torch.float64)


# ----------------------------------------------------------------------------- entry point


def train_subsets(
    model: ModelSpec,
    task: TaskSpec,
    recipe: Recipe,
    x: torch.Tensor,
    y: torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    seeds: Iterable[int],
    eval_sets: EvalSets,
    measure: Mapping[str, str],
    *,
    solver: str = "auto",
    n_models_per_batch: int = 64,
    device: torch.device | str | None = None,
    progress: ProgressCallback | None = None,
    newton_tol: float = 1e-12,
    newton_max_iter: int = 100,
    warm_start: bool = True,
) -> SubsetOutputs:
    """Train one model per mask row and measure each on the named evaluation sets.

    ``measure`` maps an evaluation-set name to ``"loss"`` / ``"margin"`` (per example:
    the query objective, i.e. the loss or *minus* the margin, array K x m) or
    ``"accuracy"`` / ``"neg_loss"`` (scalar utility, array K). See the module
    docstring for the exact training semantics. ``progress("retraining", done, K)``
    is called after every group of models and may raise :class:`~app.estimators.base.Cancelled`.
    """
    validate_recipe(recipe)
    masks_t = torch.as_tensor(np.ascontiguousarray(masks), dtype=torch.bool)
    seeds_l = [int(s) for s in seeds]
    K, n = masks_t.shape if masks_t.dim() == 2 else (0, 0)
    if masks_t.dim() != 2 or n != x.shape[0] or len(seeds_l) != K:
        raise EstimatorError(f"masks must be K x n with n = {x.shape[0]} rows and one seed per mask")
    if y.shape[0] != n:
        raise EstimatorError(
            f"training inputs have {n} rows but labels {y.shape[0]}", parameter="/train_dataset_id"
        )
    _check_measure(task, measure, eval_sets)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    factory = model_factory(model)
    template = factory(seeds_l[0] if seeds_l else 0)
    chosen = choose_solver(template, recipe, solver)
    template.eval()
    with torch.no_grad():
        probe = template(_as_input(x[:1], torch.device("cpu"), next(template.parameters()).dtype))
    k_out = int(probe.shape[-1]) if probe.dim() > 1 else 1
    started = time.perf_counter()
    result: dict[str, torch.Tensor] = {}
    for name, kind in measure.items():
        ex, _ = eval_sets[name]
        shape = (K, ex.shape[0]) if kind in PER_EXAMPLE else (K,)
        result[name] = torch.full(shape, math.nan, dtype=torch.float64)
    sizes = masks_t.sum(dim=1)
    empty = torch.nonzero(sizes == 0).reshape(-1)
    for name, kind in measure.items():
        ex, ey = eval_sets[name]
        if empty.numel():
            result[name][empty] = _empty_measure(ey, task, kind, k_out)
    todo = torch.nonzero(sizes > 0).reshape(-1)
    info: dict[str, Any] = {"solver": chosen, "n_trained": int(todo.numel()), "n_masks": K}
    report = progress or (lambda phase, done, total: None)
    report("retraining", 0, K)
    done = int(empty.numel())

    def record(rows: torch.Tensor, outputs_by_set: dict[str, torch.Tensor]) -> None:
        for name, kind in measure.items():
            ey = eval_sets[name][1]
            ey = ey.to(torch.float64) if ey.is_floating_point() else ey
            outputs = outputs_by_set[name].to(device="cpu", dtype=torch.float64)
            result[name][rows] = measure_outputs(outputs, ey.cpu(), task, kind)

    group = max(1, int(n_models_per_batch))
    if chosen == "newton":
        max_g = 0.0
        theta0 = _newton_start(template, task, recipe, x, y, newton_tol, newton_max_iter, warm_start)
        order = todo[torch.argsort(sizes[todo], stable=True)]  # similar sizes per group: little padding
        for s in range(0, order.numel(), group):
            rows = order[s : s + group]
            theta, gnorm, bias = _train_newton(
                template, task, recipe, x, y, masks_t[rows], newton_tol, newton_max_iter, theta0
            )
            max_g = max(max_g, float(gnorm.max()) if gnorm.numel() else 0.0)
            record(rows, {nm: _newton_outputs(theta, bias, eval_sets[nm][0]) for nm in measure})
            done += rows.numel()
            report("retraining", done, K)
        info["newton_max_grad_norm"] = max_g
        if max_g > max(1e3 * newton_tol, 1e-6):
            raise NumericalError(
                f"Newton retraining did not converge (gradient norm {max_g:.3g}); raise weight_decay",
                parameter="/recipe/weight_decay",
            )
    elif chosen == "batched":
        for s in range(0, todo.numel(), group):
            rows = todo[s : s + group]
            base, params, buffers, dtype = _train_batched(
                factory, task, recipe, x, y, masks_t[rows], [seeds_l[r] for r in rows.tolist()], dev
            )
            record(
                rows,
                {nm: _batched_outputs(base, params, buffers, eval_sets[nm][0], dtype, dev) for nm in measure},
            )
            done += rows.numel()
            report("retraining", done, K)
    else:
        for r in todo.tolist():
            trained = _train_sequential(factory, task, recipe, x, y, masks_t[r], seeds_l[r], dev)
            record(torch.tensor([r]), {nm: _module_outputs(trained, eval_sets[nm][0], dev) for nm in measure})
            done += 1
            report("retraining", done, K)
    info["seconds"] = time.perf_counter() - started
    return SubsetOutputs({k: v.numpy() for k, v in result.items()}, info)


def train_plan(
    model: ModelSpec,
    task: TaskSpec,
    recipe: Recipe,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: SubsetPlan,
    eval_sets: EvalSets,
    measure: Mapping[str, str],
    **kwargs: Any,
) -> SubsetOutputs:
    """:func:`train_subsets` on a :class:`SubsetPlan`'s masks and seeds."""
    return train_subsets(model, task, recipe, x, y, plan.masks, plan.seeds, eval_sets, measure, **kwargs)


__all__ = [
    "SOLVERS",
    "SubsetOutputs",
    "choose_solver",
    "linear_layer",
    "measure_outputs",
    "model_factory",
    "reset_factory",
    "train_plan",
    "train_subsets",
    "vmap_safe",
]
