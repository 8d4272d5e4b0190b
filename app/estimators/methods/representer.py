"""Representer point selection (Yeh, Kim, Yen & Ravikumar, NeurIPS 2018; ESTIMATORS.md 2.19).

Features ``f_i`` are the inputs of the model's last ``nn.Linear`` layer (its
output must be the model's output: the logits), taken at the final weights in
eval mode, with a 1 appended so the bias is part of the head: ``f~ = [f; 1]``.
The head ``Theta`` (``c x (d + 1)``, weight and bias) is refitted on the frozen
features to stationarity of

    J(Theta) = (1/n) sum_i L(Theta f~_i, t_i) + l2 * ||Theta||_F^2

(cross-entropy against targets ``t_i``: by default, ``targets="model"``, the trained model's own
class probabilities ``softmax(Theta_0 f~_i)``, as in Yeh et al.'s reference code and dattri's
RPS, so that the refitted head explains the model's predictions; ``targets="labels"``: one-hot
training labels. On the bench MLP the model targets raise LDS 0.281 -> 0.304; on the L2 logistic
regression, whose head is already the labelled optimum, labels do better: LOO Pearson 0.624 vs
0.547. Float64 inexact Newton (conjugate gradients on analytic Hessian-vector products) from
the current head until the relative residual
``||grad J|| / (2 l2 ||Theta||)`` is at most ``tol``; that residual bounds the
relative error of the decomposition below, and a refit that cannot reach it
raises :class:`NumericalError`). Stationarity gives the
representer theorem

    Theta = sum_i alpha_i f~_i^T,   alpha_i = -(1/(2 l2 n)) dL(z_i)/dPhi_i = -(softmax(Phi_i) - t_i)/(2 l2 n),

so the refitted logits of any input decompose exactly over the training set:
``Phi(z') = Theta f~' = sum_i alpha_i (f~_i^T f~')``.

``scores[j, i] = alpha_{i, c_j} f~_i^T f~'_j`` where ``c_j`` is query ``j``'s label:
training example ``i``'s contribution to the refitted logit of the query's true
class. Positive = the example pushes the query towards its label (a proponent;
removing its contribution lowers that logit), for either ``measurement`` (the
logit decomposition does not depend on it; the metadata records this).
Self-influence: ``a_i f~_i^T f~_i >= 0`` with ``a_i = (1 - softmax(Theta f~_i)_{y_i}) / (2 l2 n)``,
the own-label representer weight against the training *label* at the refitted head (equal to
``alpha_{i, y_i}`` when ``targets="labels"``; with model targets ``alpha_{i, y_i}`` is near zero for a
mislabelled point the model has memorised, so it would not flag it). Large for mislabelled points.
Note that this explains the refitted head, not the trained network. Metadata ``head_fidelity`` says how
far apart they are on the training set (:func:`head_fidelity`: the share of training rows on which the
refitted head predicts the trained network's class, and the mean absolute difference of their logits,
each row centred since softmax ignores a shift); metadata ``warnings`` (a list of strings, empty when
there is nothing to say) flags an agreement below :data:`HEAD_AGREEMENT_WARNING`.
Classification only. Train-side state (:meth:`fit`): features ``F~`` (``n x (d+1)``),
``alpha`` (``n x c``) and ``Theta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import nn
from torch.func import functional_call

from ..base import Attribution, Estimator, EstimatorError, NumericalError, Runtime, TrainState, register
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    functional_state,
    metadata,
    n_chunks,
    numpy_dtype,
    validate_problem,
)

HEAD_AGREEMENT_WARNING = 0.95
"""A training-set prediction agreement between the refitted head and the trained network below this gets a
metadata warning (a heuristic: one row in 20 whose predicted class the explanation does not reproduce)."""


def head_fidelity(Fx: torch.Tensor, theta: torch.Tensor, theta0: torch.Tensor) -> dict[str, float]:
    """How well the refitted head ``theta`` reproduces the trained head ``theta0`` on the features ``Fx``.

    ``prediction_agreement``: share of rows whose arg-max class agrees; ``mean_abs_logit_difference``: mean
    over rows and classes of ``|Phi - Phi_0|`` after centring each row's logits (softmax ignores a shift);
    ``relative_logit_difference``: ``||Phi_c - Phi_0c||_F / ||Phi_0c||_F`` of the centred logits;
    ``mean_abs_model_logit``: mean ``|Phi_0c|``, for scale.
    """
    if Fx.shape[0] == 0:
        return {}
    Z0 = Fx @ theta0.T
    Z = Fx @ theta.T
    Z0 = Z0 - Z0.mean(dim=1, keepdim=True)
    Z = Z - Z.mean(dim=1, keepdim=True)
    diff = Z - Z0
    return {
        "prediction_agreement": float((Z.argmax(dim=1) == Z0.argmax(dim=1)).double().mean()),
        "mean_abs_logit_difference": float(diff.abs().mean()),
        "relative_logit_difference": float(
            torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(Z0).clamp_min(1e-300)
        ),
        "mean_abs_model_logit": float(Z0.abs().mean()),
    }


def _fidelity_warnings(fidelity: dict[str, float]) -> list[str]:
    agreement = fidelity.get("prediction_agreement")
    if agreement is None or agreement >= HEAD_AGREEMENT_WARNING:
        return []
    return [
        f"the L2-refitted last layer that representer points explain predicts the trained network's class "
        f"on only {agreement:.1%} of the training rows (mean absolute centred logit difference "
        f"{fidelity['mean_abs_logit_difference']:.3g}, against a mean absolute model logit of "
        f"{fidelity['mean_abs_model_logit']:.3g}): the scores explain that head, not the trained network; "
        "a smaller l2 (and targets='model') usually keeps the refit closer"
    ]


@dataclass
class RepresenterParams:
    """Representer points: refit the last layer with L2, decompose its logits over the training set."""

    l2: Annotated[float, Gt(0)] = field(
        default=1e-3,
        metadata={"description": "L2 coefficient lambda of the refit: (1/n) sum L + lambda ||Theta||^2"},
    )
    targets: Literal["model", "labels"] = field(
        default="model",
        metadata={
            "description": "refit targets: 'model' = the trained model's predicted class probabilities "
            "(Yeh et al.'s reference code and dattri: the head explains the model's predictions); "
            "'labels' = the training labels"
        },
    )
    max_iter: Annotated[int, Ge(1)] = field(
        default=2000, metadata={"description": "maximum Newton iterations of the last-layer refit"}
    )
    tol: Annotated[float, Gt(0)] = field(
        default=1e-8,
        metadata={
            "description": "the refit stops when ||grad J|| / (2 l2 ||Theta||) <= tol: the relative error of "
            "the decomposition Theta = sum_i alpha_i f_i^T"
        },
    )


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` module (in ``named_modules`` order): the output layer."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise EstimatorError(
            "representer needs a model whose output layer is nn.Linear", parameter="/method/name"
        )
    return found[-1]


def head_features(
    model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, runtime: Runtime, ticker: Ticker | None
) -> torch.Tensor:
    """``[f; 1]`` for every row of ``x``: the last linear layer's input plus a bias column (float64)."""
    model.eval()
    dev = torch.device(runtime.device)
    _, layer = last_linear(model)
    names, params, fixed = functional_state(model, state, device=dev, dtype=runtime.dtype)
    dt = params[names[0]].dtype
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    rows = []
    try:
        with torch.no_grad():
            for s in range(0, int(x.shape[0]), runtime.chunk_size):
                seen.clear()
                xs = x[s : s + runtime.chunk_size]
                xs = xs.to(dev, dt) if xs.is_floating_point() else xs.to(dev)
                out = functional_call(model, (params, fixed), (xs,))
                is_output = len(seen) == 1 and (seen[0][1] is out or torch.equal(seen[0][1], out))
                if not is_output or seen[0][0].dim() != 2:
                    raise EstimatorError(
                        "representer needs a model whose output is its last nn.Linear layer applied once to "
                        "(batch, features) inputs",
                        parameter="/method/name",
                    )
                f = seen[0][0].to(torch.float64)
                rows.append(torch.cat([f, torch.ones(f.shape[0], 1, dtype=torch.float64, device=dev)], 1))
                if ticker is not None:
                    ticker.tick()
    finally:
        handle.remove()
    if not rows:
        return torch.zeros(0, layer.in_features + 1, dtype=torch.float64, device=dev)
    return torch.cat(rows)


def _relative_residual(theta: torch.Tensor, g: torch.Tensor, l2: float) -> float:
    """``||grad J|| / (2 l2 ||Theta||)``: the relative error of ``Theta = sum_i alpha_i f~_i^T``."""
    return float(torch.linalg.vector_norm(g)) / max(2.0 * l2 * float(torch.linalg.vector_norm(theta)), 1e-300)


def _conjugate_gradient(hvp, b: torch.Tensor, max_iter: int, rtol: float = 1e-13) -> torch.Tensor:
    x = torch.zeros_like(b)
    r = b.clone()
    d = r.clone()
    rr = float((r * r).sum())
    stop = rtol * rtol * rr
    for _ in range(max_iter):
        if rr <= stop:
            break
        Hd = hvp(d)
        step = rr / float((d * Hd).sum())
        x = x + step * d
        r = r - step * Hd
        rr_new = float((r * r).sum())
        d = r + (rr_new / rr) * d
        rr = rr_new
    return x


def refit_head(
    Fx: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor, l2: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, float, int]:
    """Minimise ``J = mean CE(Theta f~_i, t_i) + l2 ||Theta||^2`` in float64 (``y``: class indices, or
    ``n x c`` target probabilities ``t``).

    Inexact Newton from ``theta0``: each step solves ``H s = -grad J`` by conjugate gradients on
    analytic Hessian-vector products (``H V = (1/n) S^T F~ + 2 l2 V``, ``S = P * Z - P * rowsum(P * Z)``,
    ``Z = F~ V^T``, ``P`` = softmax), to the relative residual ``min(0.5, sqrt(||grad J||))``
    (superlinear convergence), then backtracks (Armijo); ``J`` is strictly convex. Stops when
    ``||grad J|| / (2 l2 ||Theta||) <= tol`` or after ``max_iter`` Newton steps. Returns
    ``(Theta, that relative residual, Newton steps)``.
    """
    n, c = int(Fx.shape[0]), int(theta0.shape[0])
    Fx = Fx.to(torch.float64)
    T = y.to(torch.float64) if y.dim() == 2 else F.one_hot(y.long(), c).to(torch.float64)

    def evaluate(th: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        Z = Fx @ th.T
        lse = torch.logsumexp(Z, dim=1)
        value = float((lse - (T * Z).sum(dim=1)).mean()) + l2 * float((th * th).sum())
        P = torch.exp(Z - lse[:, None])
        return value, (P - T).T @ Fx / n + 2.0 * l2 * th, P

    theta = theta0.detach().to(torch.float64).clone()
    value, g, P = evaluate(theta)
    iters = 0
    while iters < max_iter and _relative_residual(theta, g, l2) > tol:
        gnorm = float(torch.linalg.vector_norm(g))

        def hvp(V: torch.Tensor, P: torch.Tensor = P) -> torch.Tensor:
            PZ = P * (Fx @ V.T)
            return (PZ - P * PZ.sum(dim=1, keepdim=True)).T @ Fx / n + 2.0 * l2 * V

        step = _conjugate_gradient(
            hvp, -g, max_iter=min(theta.numel(), 500), rtol=max(min(0.5, gnorm**0.5), 1e-14)
        )
        slope = float((g * step).sum())
        t = 1.0
        while True:
            new = theta + t * step
            v_new, g_new, P_new = evaluate(new)
            if v_new <= value + 1e-4 * t * slope:
                break
            # rounding floor near the optimum: J no longer resolves the decrease; the gradient does
            if abs(v_new - value) <= 1e-13 * abs(value) and float(torch.linalg.vector_norm(g_new)) < gnorm:
                break
            t *= 0.5
            if t < 1e-10:
                break
        theta, value, g, P = new, v_new, g_new, P_new
        iters += 1
    return theta, _relative_residual(theta, g, l2), iters


def _trained_head(problem, name: str, dev: torch.device) -> torch.Tensor:
    """The trained output layer as ``[W, b]`` (``c x (d + 1)``, float64; b = 0 without a bias)."""
    prefix = f"{name}." if name else ""
    W = problem.weights[prefix + "weight"].to(dev, torch.float64)
    b = problem.weights.get(prefix + "bias")
    b = torch.zeros(W.shape[0], dtype=torch.float64, device=dev) if b is None else b.to(dev, torch.float64)
    return torch.cat([W, b[:, None]], 1)


@register
class Representer(Estimator):
    name = "representer"
    summary = "representer points: L2-refitted last layer decomposed over training features (Yeh et al. 2018)"
    Params = RepresenterParams

    @staticmethod
    def _check_task(problem) -> None:
        if problem.task.kind != "classification":
            raise EstimatorError(
                "representer decomposes class logits; it does not support regression models",
                parameter="/method/name",
            )

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """Training features, refitted head ``Theta`` and representer weights ``alpha``."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        self._check_task(problem)
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        dev = torch.device(runtime.device)
        name, layer = last_linear(problem.model)
        tt = Ticker(runtime, "train_features", n_chunks(n, runtime.chunk_size))
        Fx = head_features(problem.model, problem.weights, problem.train_x, runtime, tt)
        theta0 = _trained_head(problem, name, dev)
        y = problem.train_y.to(dev).long()
        if p.targets == "model":  # soft targets: the model's own class probabilities (its head is the output)
            target = torch.softmax(Fx @ theta0.T, dim=1)
        else:
            target = F.one_hot(y, theta0.shape[0]).to(torch.float64)
        runtime.progress("refit", 0, 1)
        theta, resid, iters = refit_head(Fx, target, theta0, p.l2, p.max_iter, p.tol)
        runtime.progress("refit", 1, 1)
        if not bool(torch.isfinite(theta).all()):
            raise NumericalError("the last-layer refit diverged; increase l2", parameter="/method/params/l2")
        if not resid <= p.tol:
            raise NumericalError(
                "the last-layer refit stopped at relative residual ||grad J||/(2 l2 ||Theta||) = "
                f"{resid:.3g} "
                f"> tol = {p.tol:g} after {iters} iterations; the representer decomposition needs a "
                "stationary point: raise max_iter, raise tol, or increase l2",
                parameter="/method/params/max_iter",
            )
        fidelity = head_fidelity(Fx, theta, theta0)
        dL = torch.softmax(Fx @ theta.T, dim=1) - target  # dL_i / dPhi_i for cross-entropy
        alpha = -dL / (2.0 * p.l2 * n)
        return TrainState(
            tensors={"features": Fx.cpu(), "alpha": alpha.cpu(), "theta": theta.cpu()},
            info={
                "n_train": n,
                "refit_relative_residual": resid,
                "refit_iterations": iters,
                "l2": p.l2,
                "targets": p.targets,
                "head_fidelity": fidelity,
            },
        )

    def attribute(
        self,
        problem,
        params=None,
        *,
        want_scores=True,
        want_self_influence=False,
        runtime=None,
        state=None,
        train_range=None,
    ):
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=want_scores)
        self._check_task(problem)
        if state is None:
            state = self.fit(problem, p, runtime)
        if state.info.get("n_train") != problem.n_train or state.info.get("targets", "labels") != p.targets:
            raise EstimatorError(
                "the cached representer state does not match this problem's training set",
                parameter="/method/params",
            )
        dev = torch.device(runtime.device)
        fidelity = state.info.get("head_fidelity")
        if fidelity is None:  # a state cached before the figure existed: all n rows of features are in it
            theta0 = _trained_head(problem, last_linear(problem.model)[0], dev)
            fidelity = head_fidelity(
                state.tensors["features"].to(dev, torch.float64),
                state.tensors["theta"].to(dev, torch.float64),
                theta0,
            )
        lo, hi = column_range(problem, train_range)
        m = problem.n_query
        dtype = numpy_dtype(runtime.dtype)
        Fs = state.tensors["features"][lo:hi].to(dev, torch.float64)
        alpha = state.tensors["alpha"][lo:hi].to(dev, torch.float64)
        scores = self_inf = None
        if want_scores:
            qt = Ticker(runtime, "query_features", n_chunks(m, runtime.chunk_size))
            Fq = head_features(problem.model, problem.weights, problem.query_x, runtime, qt)
            c = problem.query_y.to(dev).long()
            if m and (int(c.min()) < 0 or int(c.max()) >= alpha.shape[1]):
                raise EstimatorError(
                    "query labels outside the model's classes", parameter="/query_dataset_id"
                )
            scores = ((Fq @ Fs.T) * alpha[:, c].T).cpu().numpy().astype(dtype)
        if want_self_influence:
            # the own-label weight against the training *label* at the refitted head, whatever the refit
            # targets: (1 - softmax(Theta f~_i)_{y_i}) / (2 l2 n) >= 0 (equal to alpha_{i, y_i} for labels)
            yt = problem.train_y[lo:hi].to(dev).long()
            theta = state.tensors["theta"].to(dev, torch.float64)
            p_own = torch.softmax(Fs @ theta.T, dim=1).gather(1, yt[:, None])[:, 0]
            a_own = (1.0 - p_own) / (2.0 * p.l2 * problem.n_train)
            self_inf = (a_own * (Fs * Fs).sum(dim=1)).cpu().numpy().astype(dtype)
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="alpha = -(1/(2 l2 n)) dL/dPhi; score = alpha_{i,y'} f~_i.f~'",
                l2=p.l2,
                targets=p.targets,
                refit_relative_residual=state.info["refit_relative_residual"],
                refit_iterations=state.info["refit_iterations"],
                explains="the query's true-class logit of the L2-refitted last layer (any measurement)",
                head_fidelity=fidelity,
                warnings=_fidelity_warnings(fidelity),
            ),
        )
