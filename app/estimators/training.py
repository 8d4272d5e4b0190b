"""Deterministic training with checkpoints (for models the service trains itself).

The objective is ``mean_i L(z_i) + weight_decay/2 * ||theta||^2`` over all
trainable parameters, the same objective the influence estimators assume
(``InfluenceProblem.weight_decay``):

* ``sgd`` and ``adam`` use torch's coupled ``weight_decay``, which adds
  ``weight_decay * theta`` to the gradient, i.e. exactly the gradient of the
  L2 term above;
* ``adamw`` decays the weights *decoupled* from the adaptive step
  (``theta <- theta - lr * weight_decay * theta``); its fixed point is not the
  minimiser of the objective above, so influence functions that rely on
  optimality are only approximate for it;
* ``lbfgs`` minimises the objective directly, full batch, with a strong-Wolfe
  line search, evaluating the model in eval mode (dropout off, BatchNorm on its
  running statistics), i.e. exactly the objective the estimators
  differentiate. Meant for convex and other small models.

Learning-rate schedules are per epoch (the rate is constant within an epoch).
On CPU a fixed ``seed`` gives bitwise-identical weights on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from annotated_types import Ge, Gt, Le, Lt
from torch import nn

from .base import Checkpoint, EstimatorError, NumericalError, ProgressCallback, TaskSpec
from .objectives import per_example_loss

_EVAL_CHUNK = 4096


def _p(default, description: str):
    return field(default=default, metadata={"description": description})


@dataclass
class Recipe:
    """How the service trains a model: optimizer, learning-rate schedule, epochs and checkpoints.

    The objective is mean loss + weight_decay/2 * ||theta||^2 (adamw decays decoupled instead)."""

    optimizer: Literal["sgd", "adam", "adamw", "lbfgs"] = _p(
        "sgd", "sgd/adam (coupled L2), adamw (decoupled decay), or full-batch lbfgs"
    )
    learning_rate: Annotated[float, Gt(0)] = _p(
        0.1, "peak learning rate; for lbfgs the initial line-search step (1.0 is typical)"
    )
    momentum: Annotated[float, Ge(0), Lt(1)] = _p(0.0, "SGD momentum")
    schedule: Literal["constant", "cosine", "linear", "step"] = _p(
        "constant", "per-epoch learning-rate schedule (ignored by lbfgs)"
    )
    step_size: Annotated[int, Ge(1)] = _p(
        10, "schedule 'step': multiply the rate by gamma every step_size epochs"
    )
    gamma: Annotated[float, Gt(0)] = _p(0.1, "schedule 'step': decay factor")
    epochs: Annotated[int, Ge(1)] = _p(10, "passes over the data (lbfgs: maximum outer iterations)")
    batch_size: Annotated[int, Ge(1)] = _p(64, "mini-batch size (ignored by lbfgs, which is full batch)")
    weight_decay: Annotated[float, Ge(0)] = _p(
        0.0, "L2 coefficient: objective adds weight_decay/2 ||theta||^2"
    )
    seed: Annotated[int, Ge(0)] = _p(0, "seed for shuffling and any randomness in the model")
    num_checkpoints: Annotated[int, Ge(0), Le(10_000)] = _p(
        3,
        "checkpoints at evenly spaced epoch ends, at most one per epoch (the last: the final weights)",
    )
    lbfgs_tolerance: Annotated[float, Gt(0)] = _p(1e-9, "lbfgs stops when the gradient norm falls below this")


@dataclass
class TrainResult:
    """Final weights (CPU state dict incl. buffers), checkpoints, final mean training loss (eval mode,
    without the L2 term) and the per-epoch mean training loss."""

    weights: dict[str, torch.Tensor]
    checkpoints: list[Checkpoint]
    final_loss: float
    history: list[float]
    steps: int = 0
    grad_norm: float | None = None  # lbfgs only: objective gradient norm at the final weights


def validate_recipe(recipe: Recipe) -> None:
    """EstimatorError (``/recipe/<field>``) for values pydantic would also refuse."""
    checks = [
        ("optimizer", recipe.optimizer in ("sgd", "adam", "adamw", "lbfgs")),
        ("schedule", recipe.schedule in ("constant", "cosine", "linear", "step")),
        ("learning_rate", math.isfinite(recipe.learning_rate) and recipe.learning_rate > 0),
        ("momentum", 0 <= recipe.momentum < 1),
        ("step_size", recipe.step_size >= 1),
        ("gamma", recipe.gamma > 0),
        ("epochs", recipe.epochs >= 1),
        ("batch_size", recipe.batch_size >= 1),
        ("weight_decay", math.isfinite(recipe.weight_decay) and recipe.weight_decay >= 0),
        ("num_checkpoints", recipe.num_checkpoints >= 0),
        ("lbfgs_tolerance", recipe.lbfgs_tolerance > 0),
    ]
    for name, ok in checks:
        if not ok:
            raise EstimatorError(
                f"invalid recipe value {name}={getattr(recipe, name)!r}", parameter=f"/recipe/{name}"
            )


def learning_rate_at(recipe: Recipe, epoch: int) -> float:
    """Learning rate used throughout (0-based) ``epoch``."""
    lr, e, n = recipe.learning_rate, epoch, recipe.epochs
    if recipe.optimizer == "lbfgs" or recipe.schedule == "constant":
        return lr
    if recipe.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * e / n))
    if recipe.schedule == "linear":
        return lr * (1.0 - e / n)
    return lr * recipe.gamma ** (e // recipe.step_size)


def checkpoint_epochs(recipe: Recipe) -> list[int]:
    """Epoch counts (1-based) after which checkpoints are saved: ``ceil(k * epochs / K)``, k = 1..K.

    At most ``epochs`` distinct values; the last is always ``epochs``.
    """
    k, e = recipe.num_checkpoints, recipe.epochs
    return sorted({math.ceil(i * e / k) for i in range(1, k + 1)}) if k > 0 else []


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _diverged(what: str) -> NumericalError:
    return NumericalError(
        f"training diverged: {what} became NaN/inf; lower the learning rate (or standardise the inputs)",
        parameter="/recipe/learning_rate",
    )


def _batch(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=dev, dtype=dtype) if t.is_floating_point() else t.to(device=dev)


def _make_optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr, wd = recipe.learning_rate, recipe.weight_decay
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=wd)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.LBFGS(
        params,
        lr=lr,
        max_iter=20,
        tolerance_grad=recipe.lbfgs_tolerance,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )


@torch.no_grad()
def mean_loss(
    model: nn.Module, task: TaskSpec, x: torch.Tensor, y: torch.Tensor, *, device: torch.device | None = None
) -> float:
    """Mean training loss of ``model`` on (x, y) in eval mode (no L2 term)."""
    model.eval()
    dev = device or next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    total, n = 0.0, int(x.shape[0])
    for s in range(0, n, _EVAL_CHUNK):
        out = model(_batch(x[s : s + _EVAL_CHUNK], dev, dtype))
        total += float(per_example_loss(out, _batch(y[s : s + _EVAL_CHUNK], dev, dtype), task).sum())
    return total / max(n, 1)


def train(
    model: nn.Module,
    task: TaskSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    *,
    progress: ProgressCallback | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``model`` in place according to ``recipe`` and return its weights and checkpoints.

    Shuffling uses a ``torch.Generator`` seeded with ``recipe.seed`` and the global
    RNG is forked and seeded too (dropout etc.), so on CPU reruns are
    bitwise identical. Checkpoint ``learning_rate`` is the rate of the last
    optimizer step before it (TracInCP's eta_t; ``recipe.learning_rate`` for
    lbfgs); ``step`` counts optimizer steps. ``progress("training", epochs_done,
    epochs)`` is called after every epoch and may raise ``Cancelled``, which
    propagates. Raises :class:`NumericalError` (``/recipe/learning_rate``) when
    the loss or the weights become NaN/inf.
    """
    validate_recipe(recipe)
    n = int(x.shape[0])
    if n == 0:
        raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
    if int(y.shape[0]) != n:
        raise EstimatorError(
            f"training inputs have {n} rows but labels {int(y.shape[0])}", parameter="/train_dataset_id"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EstimatorError("the model has no trainable parameters", parameter="/architecture")
    dev = torch.device(device) if device is not None else params[0].device
    model.to(dev)
    dtype = params[0].dtype
    fork_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(recipe.seed)
        if recipe.optimizer == "lbfgs":
            checkpoints, history, steps, gnorm = _train_lbfgs(model, task, x, y, recipe, dev, dtype, progress)
        else:
            checkpoints, history, steps = _train_sgd(model, task, x, y, recipe, dev, dtype, progress)
            gnorm = None
    weights = _snapshot(model)
    for k, v in weights.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise _diverged(f"weight tensor {k!r}")
    final = mean_loss(model, task, x, y, device=dev)
    if not math.isfinite(final):
        raise _diverged("the final training loss")
    return TrainResult(weights, checkpoints, final, history, steps, gnorm)


def _train_sgd(model, task, x, y, recipe, dev, dtype, progress):
    n = int(x.shape[0])
    gen = torch.Generator().manual_seed(recipe.seed)
    opt = _make_optimizer(recipe, [p for p in model.parameters() if p.requires_grad])
    save_at = set(checkpoint_epochs(recipe))
    checkpoints: list[Checkpoint] = []
    history: list[float] = []
    steps = 0
    for epoch in range(recipe.epochs):
        lr = learning_rate_at(recipe, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, recipe.batch_size):
            idx = perm[s : s + recipe.batch_size]
            out = model(_batch(x[idx], dev, dtype))
            loss = per_example_loss(out, _batch(y[idx], dev, dtype), task).mean()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _diverged(f"the training loss (epoch {epoch + 1}, step {steps + 1})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            total += value * len(idx)
        history.append(total / n)
        if epoch + 1 in save_at:
            checkpoints.append(Checkpoint(step=steps, learning_rate=lr, state=_snapshot(model)))
        if progress is not None:
            progress("training", epoch + 1, recipe.epochs)
    return checkpoints, history, steps


def _train_lbfgs(model, task, x, y, recipe, dev, dtype, progress):
    n = int(x.shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(recipe, params)
    wd = recipe.weight_decay
    last_data = [math.nan]

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        data = 0.0
        for s in range(0, n, _EVAL_CHUNK):
            out = model(_batch(x[s : s + _EVAL_CHUNK], dev, dtype))
            part = per_example_loss(out, _batch(y[s : s + _EVAL_CHUNK], dev, dtype), task).sum() / n
            part.backward()
            data += float(part.detach())
        value = data
        if wd:
            reg = 0.5 * wd * sum((p * p).sum() for p in params)
            reg.backward()
            value += float(reg.detach())
        if not math.isfinite(value):
            raise _diverged("the training objective")
        last_data[0] = data
        return torch.tensor(value, dtype=torch.float64)

    save_at = checkpoint_epochs(recipe)
    checkpoints: list[Checkpoint] = []
    history: list[float] = []
    steps = 0
    gnorm = math.inf
    model.eval()
    for it in range(recipe.epochs):
        opt.step(closure)
        steps += 1
        closure()  # loss and gradient at the new point
        gnorm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
        if not math.isfinite(gnorm):
            raise _diverged("the objective gradient")
        history.append(last_data[0])
        done = gnorm < recipe.lbfgs_tolerance
        if it + 1 in save_at or (done and save_at):
            checkpoints.append(
                Checkpoint(step=steps, learning_rate=recipe.learning_rate, state=_snapshot(model))
            )
        if progress is not None:
            progress("training", recipe.epochs if done else it + 1, recipe.epochs)
        if done:
            break
    opt.zero_grad(set_to_none=True)
    return checkpoints, history, steps, gnorm
