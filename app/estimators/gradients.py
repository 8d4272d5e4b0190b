"""Per-sample gradients and exact Hessians: the core every gradient-based method shares.

Models are evaluated functionally (``torch.func.functional_call``) at a given
state dict, in eval mode, so the module's own weights are never used or
changed. Gradients are flattened over the *trainable* parameters in the order of
:func:`trainable_names`; buffers (e.g. BatchNorm running statistics) and frozen
parameters are passed through unchanged.

Only one chunk of per-sample gradients exists at a time: callers stream over
the training set and never hold an ``n x p`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from .base import (
    ORIENTATION,
    SIGN_CONVENTION,
    EstimatorError,
    InfluenceProblem,
    NumericalError,
    ProgressCallback,
    Runtime,
    TaskSpec,
)
from .objectives import check_measurement, per_example_loss, query_objective

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``objective(outputs, y) -> per-example values (b,)``."""

# Upper bound on (rows x Hessian columns) vectorised at once when forming a Hessian; bounds memory.
_HESSIAN_ROW_PARAM_BUDGET = 2**18


# ----------------------------------------------------------------------------- parameters


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in ``model.named_parameters()`` order (the flattening order)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def select_parameters(model: nn.Module, modules: list[str] | None) -> list[str]:
    """Trainable parameter names under the given module prefixes (layer selection); all when None.

    ``modules=["fc2"]`` keeps ``fc2.weight`` and ``fc2.bias``; ``"last"`` names the
    module holding the last trainable parameter (the output layer).
    """
    names = trainable_names(model)
    if modules is None:
        return names
    if "last" in modules:
        modules = [m for m in modules if m != "last"] + [names[-1].rsplit(".", 1)[0]]
    chosen = [n for n in names if any(n == m or n.startswith(m + ".") for m in modules)]
    if not chosen:
        raise EstimatorError(
            f"no trainable parameters under modules {modules}; the model has {names}",
            parameter="/method/params/layers",
        )
    return chosen


def n_parameters(model: nn.Module) -> int:
    """Number of trainable scalars ``p`` (the length of a flattened gradient)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flatten(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Concatenate ``state[name]`` for ``name`` in ``names`` into one 1-D tensor."""
    return torch.cat([state[n].reshape(-1) for n in names])


def unflatten(flat: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` (views into ``flat``)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for n, s in zip(names, shapes, strict=True):
        k = math.prod(s)
        out[n] = flat[offset : offset + k].view(s)
        offset += k
    return out


def _resolve_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def functional_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    names: list[str] | None = None,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split ``state`` into (names, differentiated tensors, fixed tensors) on ``device``/``dtype``.

    ``names`` selects the parameters to differentiate (default: all trainable ones,
    see :func:`select_parameters`); fixed tensors are the buffers and every other
    parameter; a buffer missing from ``state`` is taken from the module. Floating
    tensors are cast to ``dtype`` (default: that of the first differentiated tensor).
    """
    dev = _resolve_device(device)
    names = trainable_names(model) if names is None else list(names)
    if not names:
        raise EstimatorError("the model has no trainable parameters")
    params: dict[str, torch.Tensor] = {}
    module_params = dict(model.named_parameters())
    for n in names:
        if n not in state:
            raise EstimatorError(f"the weights lack tensor {n!r} required by the architecture")
        t = state[n]
        if tuple(t.shape) != tuple(module_params[n].shape):
            raise EstimatorError(
                f"tensor {n!r} has shape {tuple(t.shape)}, the architecture expects "
                f"{tuple(module_params[n].shape)}"
            )
        params[n] = t
    if dtype is None:
        dtype = params[names[0]].dtype if params[names[0]].is_floating_point() else torch.float32
    params = {n: t.detach().to(device=dev, dtype=dtype) for n, t in params.items()}
    fixed: dict[str, torch.Tensor] = {}
    trainable = set(names)
    for n, p in module_params.items():
        if n not in trainable:
            fixed[n] = state.get(n, p)
    for n, b in model.named_buffers():
        fixed[n] = state.get(n, b)
    fixed = {
        n: (t.detach().to(device=dev, dtype=dtype) if t.is_floating_point() else t.detach().to(device=dev))
        for n, t in fixed.items()
    }
    return names, params, fixed


def _to_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NumericalError(
            f"{what} contain {bad} non-finite (NaN/inf) values; the weights may have diverged "
            "(retrain with a lower learning rate), or the inputs contain NaN/inf or very large values "
            "(use float64 or standardise the features)"
        )


# ----------------------------------------------------------------------------- per-sample gradients


def per_sample_gradients(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    *,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    what: str = "examples",
    names: list[str] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, G)`` with ``G[i - start] = d objective(f(x_i), y_i) / d theta`` flattened.

    ``G`` has shape ``(stop - start, p)`` on ``device`` in ``dtype``, columns in
    :func:`trainable_names` order (restricted to ``names`` when given, e.g. from
    :func:`select_parameters`). The model is put in eval mode. ``what`` names
    the rows in error messages (e.g. "training examples"). Raises
    :class:`NumericalError` when a chunk holds NaN/inf.
    """
    if chunk_size < 1:
        raise EstimatorError("chunk_size must be at least 1", parameter="/chunk_size")
    dev = _resolve_device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype, names=names)
    dt = params[names[0]].dtype

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, fixed), (xi.unsqueeze(0),))
        return objective(out, yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    n = int(x.shape[0])
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        xs = _to_input(x[start:stop], dev, dt)
        ys = _to_input(y[start:stop], dev, dt)
        g = per_sample(params, xs, ys)
        G = torch.cat([g[k].reshape(stop - start, -1) for k in names], dim=1)
        _check_finite(G, f"per-example gradients of {what} {start}..{stop - 1}")
        yield start, stop, G


def objective_value_and_gradient(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    task: TaskSpec,
    weight_decay: float = 0.0,
    *,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> tuple[float, torch.Tensor]:
    """Value and flat gradient of ``mean_i L(z_i) + weight_decay/2 ||theta||^2`` (eval mode)."""
    dev = _resolve_device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype)
    dt = params[names[0]].dtype
    n = int(x.shape[0])

    def total(p: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return per_example_loss(functional_call(model, (p, fixed), (xs,)), ys, task).sum()

    g_fn = torch.func.grad_and_value(total)
    value = 0.0
    gsum = torch.zeros(sum(t.numel() for t in params.values()), device=dev, dtype=dt)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        g, v = g_fn(params, _to_input(x[start:stop], dev, dt), _to_input(y[start:stop], dev, dt))
        gsum += flatten(g, names)
        value += float(v)
    theta = flatten(params, names)
    gsum = gsum / n + weight_decay * theta
    value = value / n + 0.5 * weight_decay * float(theta.dot(theta))
    _check_finite(gsum, "the objective gradient")
    return value, gsum


def objective_hessian(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    task: TaskSpec,
    weight_decay: float = 0.0,
    *,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Exact ``p x p`` Hessian of ``mean_i L(z_i) + weight_decay/2 ||theta||^2`` (default float64).

    Accumulated over chunks of ``chunk_size`` rows with reverse-over-reverse
    autodiff (``torch.func.jacrev`` of ``torch.func.grad``) on a flat-parameter
    function; the Hessian columns are vectorised in blocks so that rows x
    columns stays bounded. ``progress("hessian", done, total)`` is called after
    every chunk.
    """
    dev = _resolve_device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype)
    shapes = [params[k].shape for k in names]
    flat0 = flatten(params, names)
    p = flat0.numel()
    n = int(x.shape[0])
    rows = max(1, min(chunk_size, n))
    cols = max(1, min(p, _HESSIAN_ROW_PARAM_BUDGET // rows))

    def total(flat: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (unflatten(flat, names, shapes), fixed), (xs,))
        return per_example_loss(out, ys, task).sum()

    h_fn = jacrev(grad(total), chunk_size=cols)
    H = torch.zeros(p, p, device=dev, dtype=dtype)
    n_chunks = math.ceil(n / rows)
    if progress is not None:
        progress("hessian", 0, n_chunks)
    for i, start in enumerate(range(0, n, rows)):
        stop = min(start + rows, n)
        Hc = h_fn(flat0, _to_input(x[start:stop], dev, dtype), _to_input(y[start:stop], dev, dtype))
        _check_finite(Hc, f"Hessian contributions of training examples {start}..{stop - 1}")
        H += Hc
        if progress is not None:
            progress("hessian", i + 1, n_chunks)
    H /= max(n, 1)
    H = 0.5 * (H + H.T)
    if weight_decay:
        H.diagonal().add_(weight_decay)
    return H


# ----------------------------------------------------------------------------- helpers for methods


def n_chunks(n: int, chunk_size: int) -> int:
    return math.ceil(n / chunk_size) if n > 0 else 0


class Ticker:
    """Counts work units of one phase and reports them through ``runtime.progress``."""

    def __init__(self, runtime: Runtime, phase: str, total: int) -> None:
        self.runtime, self.phase, self.total, self.done = runtime, phase, total, 0
        runtime.progress(phase, 0, total)

    def tick(self, k: int = 1) -> None:
        self.done += k
        self.runtime.progress(self.phase, self.done, self.total)


def validate_problem(problem: InfluenceProblem, *, need_queries: bool = True) -> None:
    """Shape and measurement checks shared by all methods."""
    check_measurement(problem.task, problem.measurement)
    if problem.train_x.shape[0] != problem.train_y.shape[0]:
        raise EstimatorError(
            f"training inputs have {problem.train_x.shape[0]} rows but labels {problem.train_y.shape[0]}",
            parameter="/train_dataset_id",
        )
    if need_queries and problem.query_x.shape[0] != problem.query_y.shape[0]:
        raise EstimatorError(
            f"query inputs have {problem.query_x.shape[0]} rows but labels {problem.query_y.shape[0]}",
            parameter="/query_dataset_id",
        )
    if problem.weight_decay < 0 or not math.isfinite(problem.weight_decay):
        raise EstimatorError("weight_decay must be a finite number >= 0", parameter="/weight_decay")


def check_state_finite(state: dict[str, Any], *, what: str, parameter: str | None) -> None:
    """NumericalError if any floating tensor of a state dict holds NaN/inf."""
    for k, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NumericalError(
                f"{what} contain NaN/inf in tensor {k!r}; training probably diverged "
                "(retrain with a lower learning rate)",
                parameter=parameter,
            )


def train_objective(task: TaskSpec) -> Objective:
    """Per-example training loss as an :data:`Objective`."""
    return lambda out, y: per_example_loss(out, y, task)


def query_objective_fn(task: TaskSpec, measurement: str) -> Objective:
    """Per-example query objective (loss, or minus margin) as an :data:`Objective`."""
    return lambda out, y: query_objective(out, y, task, measurement)


def query_gradients(
    problem: InfluenceProblem,
    state: dict[str, torch.Tensor],
    runtime: Runtime,
    ticker: Ticker | None = None,
    names: list[str] | None = None,
) -> torch.Tensor:
    """The ``m x p`` matrix of query-objective gradients at ``state`` (on the runtime device)."""
    rows = []
    for _, _, G in per_sample_gradients(
        problem.model,
        state,
        problem.query_x,
        problem.query_y,
        query_objective_fn(problem.task, problem.measurement),
        chunk_size=runtime.chunk_size,
        device=runtime.device,
        dtype=runtime.dtype,
        what="queries",
        names=names,
    ):
        rows.append(G)
        if ticker is not None:
            ticker.tick()
    if not rows:
        p = (
            n_parameters(problem.model)
            if names is None
            else sum(dict(problem.model.named_parameters())[k].numel() for k in names)
        )
        return torch.zeros(0, p, device=_resolve_device(runtime.device), dtype=runtime.dtype)
    return torch.cat(rows, dim=0)


def column_range(problem: InfluenceProblem, train_range: tuple[int, int] | None) -> tuple[int, int]:
    """Validated ``(lo, hi)`` training columns of a shard (all of them when ``train_range`` is None)."""
    n = problem.n_train
    lo, hi = (0, n) if train_range is None else (int(train_range[0]), int(train_range[1]))
    if not 0 <= lo <= hi <= n:
        raise EstimatorError(f"train_range {train_range} is outside [0, {n}]", parameter="/train_range")
    return lo, hi


def train_gradients(
    problem: InfluenceProblem,
    state: dict[str, torch.Tensor],
    runtime: Runtime,
    train_range: tuple[int, int] | None = None,
    names: list[str] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Stream ``(start, stop, G)`` chunks of training-loss gradients at ``state``.

    With ``train_range=(lo, hi)`` only rows ``lo..hi-1`` are computed and
    ``start``/``stop`` are relative to ``lo`` (column indices of the shard's output).
    """
    lo, hi = column_range(problem, train_range)
    return per_sample_gradients(
        problem.model,
        state,
        problem.train_x[lo:hi],
        problem.train_y[lo:hi],
        train_objective(problem.task),
        chunk_size=runtime.chunk_size,
        device=runtime.device,
        dtype=runtime.dtype,
        what="training examples" if lo == 0 else f"training examples (from row {lo})",
        names=names,
    )


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype for scores computed in ``dtype`` (float32 for types numpy lacks, e.g. bfloat16)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return np.dtype(np.float32)


def metadata(name: str, problem: InfluenceProblem, *, normalisation: str, **extra: Any) -> dict[str, Any]:
    """The metadata every :class:`Attribution` carries."""
    return {
        "method": name,
        "measurement": problem.measurement,
        "sign_convention": SIGN_CONVENTION,
        "orientation": ORIENTATION,
        "normalisation": normalisation,
        "n_train": problem.n_train,
        "n_query": problem.n_query,
        "n_parameters": n_parameters(problem.model),
        **extra,
    }


def as_params(params_cls: type, params: Any) -> Any:
    """``params`` as an instance of ``params_cls``: accepts None (defaults), a dict or an instance."""
    if params is None:
        return params_cls()
    if isinstance(params, params_cls):
        return params
    if isinstance(params, dict):
        try:
            return params_cls(**params)
        except TypeError as e:
            raise EstimatorError(f"invalid method parameters: {e}", parameter="/method/params") from None
    raise TypeError(f"params must be None, a dict or {params_cls.__name__}, not {type(params).__name__}")


def warm_up() -> None:
    """Pay torch.func's one-off initialisation (about a second) on a tiny CPU model.

    Celery forks a fresh child per job; calling this in the parent before the fork
    means no child pays it again. Never touches CUDA.
    """
    tiny = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    objective = train_objective(TaskSpec())
    x, y = torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)
    for _ in per_sample_gradients(tiny, tiny.state_dict(), x, y, objective, chunk_size=2):
        pass
