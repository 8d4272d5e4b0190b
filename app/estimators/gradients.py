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
from .layerwise import Unsupported, input_rows, layer_pass, layer_plan, layerwise_gradients, output_rows
from .objectives import check_measurement, per_example_loss, query_objective

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``objective(outputs, y) -> per-example values (b,)``."""

# Upper bound on (rows x Hessian columns) vectorised at once when forming a Hessian; bounds memory.
_HESSIAN_ROW_PARAM_BUDGET = 2**18
# Largest intermediates (elements) of one chunk of the closed-form MLP Hessian (ChainHessian.hessian_blocks).
_CHAIN_HESSIAN_ELEMENTS = 2**24
# Hessian columns vectorised at once: on CPU, small blocks of the reverse-over-reverse product run
# several times faster than one wide vmap (measured 2.5-3x on a 4,810-parameter MLP; same values).
_HESSIAN_COLUMN_CHUNK = 32


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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite (same answer as ``torch.isfinite(t).all()``).

    One cheap reduction first: a NaN or infinite element always makes the sum non-finite, so a
    finite sum proves the tensor finite; only a non-finite sum (NaN/inf, or overflow of huge
    finite values) falls back to the elementwise test."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise NumericalError(
            f"{what} contain {bad} non-finite (NaN/inf) values; the weights may have diverged "
            "(retrain with a lower learning rate), or the inputs contain NaN/inf or very large values "
            "(use float64 or standardise the features)"
        )


# ----------------------------------------------------------------------------- per-sample gradients

# Parameter-free leaf modules that act on each row independently (in eval mode) and keep (b, d) rows
# 2-D: a plain nn.Sequential of these and nn.Linear layers gets closed-form per-example gradients.
_ROWWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU,
    nn.Softplus, nn.Dropout,
)  # fmt: skip


def linear_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The leaf modules, in call order, of a model that is a plain ``nn.Sequential`` (nested
    Sequentials allowed) of ``nn.Linear`` layers, ``nn.Flatten(start_dim=1)`` and parameter-free
    row-wise activations (``_ROWWISE_MODULES``); None for any other model (subclasses, other layers,
    shared modules, modules with hooks).

    For such a model the per-example gradient of a linear layer is the outer product
    ``delta_i a_i^T`` of the output gradient and the input of example ``i`` (bias: ``delta_i``),
    which :func:`per_sample_gradients` computes from one batched forward/backward pass instead of
    vectorising the backward pass over examples.
    """
    if type(model) is not nn.Sequential:
        return None
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(prefix: str, seq: nn.Sequential) -> bool:
        for name, m in seq._modules.items():
            if m is None or id(m) in seen or m._forward_hooks or m._forward_pre_hooks:
                return False
            seen.add(id(m))
            full = f"{prefix}{name}"
            if type(m) is nn.Sequential:
                if not walk(full + ".", m):
                    return False
                continue
            if type(m) is nn.Linear:
                out.append((full, m))
                continue
            if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
                out.append((full, m))
                continue
            if (
                type(m) not in _ROWWISE_MODULES
                or any(True for _ in m.parameters())
                or any(True for _ in m.buffers())
            ):
                return False
            out.append((full, m))
        return True

    if model._forward_hooks or model._forward_pre_hooks or not walk("", model):
        return None
    return out


def rowwise_derivatives(mods: list[nn.Module], z: torch.Tensor, second: bool = True):
    """``(phi(z), phi'(z), phi''(z))`` of a run of row-wise modules of a :func:`linear_chain` (in eval
    mode); None derivatives when trivial (``phi''`` also when ``second`` is False). ReLU and tanh in
    closed form, anything else by autograd. Raises :class:`NotRowwise` when the run changes the shape."""
    mods = [m for m in mods if type(m) not in (nn.Identity, nn.Dropout, nn.Flatten)]  # identities here
    if not mods:
        return z, None, None
    if len(mods) == 1 and type(mods[0]) is nn.ReLU:
        return torch.relu(z), (z > 0).to(z.dtype), None
    if len(mods) == 1 and type(mods[0]) is nn.Tanh:
        t = torch.tanh(z)
        d1 = 1.0 - t * t
        return t, d1, (-2.0 * t * d1 if second else None)
    with torch.enable_grad():
        zt = z.detach().requires_grad_(True)
        out = zt
        for m in mods:
            out = m(out)
        if out.shape != z.shape:
            raise NotRowwise
        if not out.requires_grad:  # constant: phi' = phi'' = 0
            zero = torch.zeros_like(z)
            return out.detach(), zero, None
        (d1,) = torch.autograd.grad(out.sum(), zt, create_graph=second)
        d2 = None
        if second and d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), zt, allow_unused=True)
            if d2 is not None and not bool(d2.any()):
                d2 = None
    return out.detach(), d1.detach(), d2


def linear_chain_backprop(
    chain: list[tuple[str, nn.Module]],
    tensors: dict[str, torch.Tensor],
    xs: torch.Tensor,
    output_grads: Callable[[torch.Tensor], torch.Tensor],
) -> list[tuple[str, torch.Tensor, torch.Tensor]] | None:
    """One forward pass of a :func:`linear_chain` model (weights and biases in ``tensors``) over the
    rows ``xs``, then ``r`` output gradients per row back-propagated through it at once:
    ``output_grads(out)`` gives them as ``(b, r, k)``; returns, per linear layer in call order,
    ``(name, a, D)`` with ``a`` its input ``(b, d_in)`` and ``D`` the gradients with respect to its
    output ``(b, r, d_out)``. The rows are evaluated once, not once per gradient (e.g. K-FAC's
    pseudo-examples of the expected Fisher). None when rows do not reach a layer as ``(b, d)`` or a
    module is not row-wise."""
    layers: list[list] = []  # per linear layer: name, input, weight, phi' of the row-wise run after it
    pending: list[nn.Module] = []  # that run for the last layer, not yet applied

    def finish(z: torch.Tensor) -> torch.Tensor:
        h, layers[-1][3], _ = rowwise_derivatives(pending, z, second=False)
        return h

    with torch.no_grad():
        h = xs
        try:
            for name, m in chain:
                if type(m) is not nn.Linear:
                    if layers:
                        pending.append(m)
                    else:
                        h = m(h)
                    continue
                if layers:
                    h, pending = finish(h), []
                if h.dim() != 2:
                    return None
                W = tensors[f"{name}.weight"]
                bias = tensors.get(f"{name}.bias") if m.bias is not None else None
                layers.append([name, h, W, None])
                h = torch.nn.functional.linear(h, W, bias)
            if not layers:
                return None
            h = finish(h)
        except NotRowwise:
            return None
        D = output_grads(h)
        out = []
        for i in range(len(layers) - 1, -1, -1):
            name, a, W, d1 = layers[i]
            if d1 is not None:
                D = D * d1[:, None, :]
            out.append((name, a, D))
            if i:
                D = D @ W
        return out[::-1]


def _linear_chain_factors(
    chain: list[tuple[str, nn.Module]],
    params: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    names: list[str],
    xs: torch.Tensor,
    ys: torch.Tensor,
    objective: Objective,
) -> list[tuple[str, torch.Tensor, torch.Tensor]] | None:
    """One batched forward/backward pass of a :func:`linear_chain` model: for every linear layer with
    a selected parameter, ``(name, a, delta)`` with ``a`` the layer input ``(b, d_in)`` and ``delta``
    the gradient of example ``i``'s objective with respect to the layer output ``(b, d_out)``.

    ``objective`` must return one value per example that depends on that example's row only (the
    :data:`Objective` contract), so ``d sum_j objective_j / d out_i`` is example ``i``'s output
    gradient. None when an input turns out not to be ``(b, d)`` rows (the caller then vectorises).
    """
    b = int(xs.shape[0])
    selected = set(names)
    tensors = {**fixed, **params}
    with torch.enable_grad():
        h = xs
        records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, m in chain:
            if type(m) is not nn.Linear:
                h = m(h)
                continue
            if h.dim() != 2:
                return None
            wname, bname = f"{name}.weight", f"{name}.bias"
            W = tensors[wname]
            bias = tensors.get(bname) if m.bias is not None else None
            wanted = wname in selected or (bias is not None and bname in selected)
            if wanted:
                W = W.detach().requires_grad_(True)  # makes this layer's output part of the graph
            a = h
            h = torch.nn.functional.linear(h, W, bias)
            if wanted:
                records[name] = (a.detach(), h)
        values = objective(h, ys)
        if values.shape != (b,):
            return None
        deltas = torch.autograd.grad(values.sum(), [o for _, o in records.values()]) if records else ()
    return [(name, a, d) for (name, (a, _)), d in zip(records.items(), deltas, strict=True)]


def _linear_chain_gradients(
    chain: list[tuple[str, nn.Module]],
    params: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    names: list[str],
    xs: torch.Tensor,
    ys: torch.Tensor,
    objective: Objective,
) -> torch.Tensor | None:
    """Per-example gradients ``(b, p)`` of a :func:`linear_chain` model from one batched pass:
    ``delta_i a_i^T`` (weight) and ``delta_i`` (bias) per layer, columns in ``names`` order."""
    factors = _linear_chain_factors(chain, params, fixed, names, xs, ys, objective)
    if factors is None:
        return None
    b = int(xs.shape[0])
    by_layer = {name: (a, d) for name, a, d in factors}
    widths = []
    for k in names:
        layer, leaf = k.rsplit(".", 1)
        a, d = by_layer[layer]
        widths.append(d.shape[1] * a.shape[1] if leaf == "weight" else d.shape[1])
    G = torch.empty(b, sum(widths), dtype=factors[0][2].dtype, device=factors[0][2].device)
    off = 0
    for k, width in zip(names, widths, strict=True):  # written in place: no concatenation
        layer, leaf = k.rsplit(".", 1)
        a, d = by_layer[layer]
        if leaf == "weight":
            torch.mul(
                d[:, :, None], a[:, None, :], out=G[:, off : off + width].view(b, d.shape[1], a.shape[1])
            )
        else:
            G[:, off : off + width] = d
        off += width
    return G


GradientFactors = list[tuple[torch.Tensor, torch.Tensor]]
"""Per selected linear layer ``(A~, D)``: ``A~`` ``(b, c)`` holds the layer input (when its weight is
selected) and a column of ones (when its bias is), ``D`` ``(b, d_out)`` the output gradient; the
example's gradient restricted to the layer is ``D_i A~_i^T``, so inner products factor per layer."""


def gradient_factors(
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
) -> Iterator[tuple[int, int, GradientFactors]] | None:
    """Like :func:`per_sample_gradients` but yielding :data:`GradientFactors` instead of ``(b, p)``
    rows, for a :func:`linear_chain` model whose rows reach every linear layer as ``(b, d)``;
    None for any other model (use :func:`per_sample_gradients`).

    ``g_i . g'_j = sum_l (D_i . D'_j) (A~_i . A~'_j)`` (:func:`factor_inner`): TracIn-style scores
    cost ``O(m n sum_l (d_in + d_out))`` instead of ``O(m n p)`` and no gradient is materialised.
    Raises :class:`NumericalError` when a chunk's factors hold NaN/inf.
    """
    if chunk_size < 1:
        raise EstimatorError("chunk_size must be at least 1", parameter="/chunk_size")
    chain = linear_chain(model)
    if chain is None:
        return None
    first_linear = next((i for i, (_, m) in enumerate(chain) if type(m) is nn.Linear), None)
    flattened = any(type(m) is nn.Flatten for _, m in chain[: first_linear or 0])
    if not (x.dim() == 2 or flattened):
        return None
    dev = _resolve_device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype, names=names)
    dt = params[names[0]].dtype
    selected = set(names)

    def chunks() -> Iterator[tuple[int, int, GradientFactors]]:
        n = int(x.shape[0])
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            xs = _to_input(x[start:stop], dev, dt)
            ys = _to_input(y[start:stop], dev, dt)
            raw = _linear_chain_factors(chain, params, fixed, names, xs, ys, objective)
            if raw is None:  # cannot happen for (b, d) rows; kept as a guard
                raise EstimatorError("gradient factors need (batch, features) inputs")
            out: GradientFactors = []
            for name, a, d in raw:
                cols = [a] if f"{name}.weight" in selected else []
                if f"{name}.bias" in selected:
                    cols.append(torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device))
                A = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
                _check_finite(A, f"layer inputs of {what} {start}..{stop - 1}")
                _check_finite(d, f"per-example gradients of {what} {start}..{stop - 1}")
                out.append((A, d))
            yield start, stop, out

    return chunks()


def concat_factors(parts: list[GradientFactors]) -> GradientFactors:
    """Stack the factors of consecutive chunks."""
    if not parts:
        return []
    return [
        (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts]))
        for i in range(len(parts[0]))
    ]


def factor_inner(Fq: GradientFactors, Ft: GradientFactors) -> torch.Tensor:
    """``(m, b)`` matrix of gradient inner products ``g'_j . g_i`` from factors."""
    out = None
    for (Aq, Dq), (At, Dt) in zip(Fq, Ft, strict=True):
        term = (Dq @ Dt.T) * (Aq @ At.T)
        out = term if out is None else out + term
    return out


def factor_sqnorms(Ft: GradientFactors) -> torch.Tensor:
    """``(b,)`` squared gradient norms ``||g_i||^2`` from factors."""
    out = None
    for A, D in Ft:
        term = (D * D).sum(dim=1) * (A * A).sum(dim=1)
        out = term if out is None else out + term
    return out


class GLMHead:
    """A model whose trainable parameters are one ``nn.Linear`` output layer applied to fixed features.

    That is a :func:`linear_chain` whose only linear layer is its last module (e.g. the ``linear``
    architecture: flatten + linear): multinomial logistic regression, linear regression. The outputs
    are linear in the parameters, so the Hessian of the training loss is exactly
    ``sum_i Lambda_i (x) a~_i a~_i^T`` (``a~`` = the layer input, plus a 1 when the bias is trainable;
    ``Lambda_i`` = the loss Hessian with respect to the outputs: ``diag(p) - p p^T`` for cross-entropy,
    ``(2/k) I`` for the mean squared error over ``k`` outputs), which :func:`objective_hessian` and
    :class:`~app.estimators.ihvp.TrainingHessian` evaluate in closed form instead of by autodiff.

    Parameter order is the flattening order: weight ``(k, d)`` row-major, then the bias ``(k,)``.
    """

    def __init__(self, chain: list[tuple[str, nn.Module]], name: str, layer: nn.Linear, bias: bool) -> None:
        self.prefix = [m for _, m in chain[:-1]]
        self.name, self.layer, self.bias = name, layer, bias
        self.k, self.d = int(layer.out_features), int(layer.in_features)
        self.d1 = self.d + (1 if bias else 0)
        self.p = self.k * self.d1

    @classmethod
    def of(cls, model: nn.Module, names: list[str] | None = None) -> GLMHead | None:
        chain = linear_chain(model)
        if chain is None:
            return None
        linears = [(n, m) for n, m in chain if type(m) is nn.Linear]
        if len(linears) != 1 or chain[-1][1] is not linears[0][1]:
            return None
        name, layer = linears[0]
        names = trainable_names(model) if names is None else list(names)
        wname, bname = f"{name}.weight", f"{name}.bias"
        if names == [wname, bname] and layer.bias is not None:
            return cls(chain, name, layer, True)
        if names == [wname]:
            return cls(chain, name, layer, False)
        return None

    def features(self, xs: torch.Tensor, params: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor]):
        """``(A~, outputs)`` for a chunk: the layer input with the bias column, and the model outputs.

        None when the input does not reach the layer as ``(b, d)`` rows."""
        h = xs
        with torch.no_grad():
            for m in self.prefix:
                h = m(h)
            if h.dim() != 2:
                return None
            tensors = {**fixed, **params}
            W = tensors[f"{self.name}.weight"]
            b = tensors.get(f"{self.name}.bias") if self.layer.bias is not None else None
            out = torch.nn.functional.linear(h, W, b)
            if self.bias:
                h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], dim=1)
        return h, out

    def output_hessian(self, out: torch.Tensor, ys: torch.Tensor, task: TaskSpec):
        """``Lambda_i`` as ``("ce", p)`` (softmax probabilities, ``(b, k)``) or ``("mse", 2/k)``;
        None when the labels do not have the shape the closed form assumes."""
        b = out.shape[0]
        if task.kind == "classification":
            if ys.dim() != 1 or ys.shape[0] != b or ys.is_floating_point():
                return None
            return "ce", torch.softmax(out, dim=1)
        if not (ys.shape == out.shape or (self.k == 1 and ys.dim() == 1 and ys.shape[0] == b)):
            return None
        return "mse", 2.0 / self.k

    def to_blocks(self, V: torch.Tensor) -> torch.Tensor:
        """Flat ``(p, r)`` -> ``(k, d1, r)`` (bias as the last input column)."""
        k, d, r = self.k, self.d, V.shape[1]
        Wv = V[: k * d].reshape(k, d, r)
        return torch.cat([Wv, V[k * d :].reshape(k, 1, r)], dim=1) if self.bias else Wv

    def from_blocks(self, B: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`."""
        k, d = self.k, self.d
        r = B.shape[2]
        if not self.bias:
            return B.reshape(k * d, r)
        return torch.cat([B[:, :d, :].reshape(k * d, r), B[:, d, :]], dim=0)

    def permutation(self) -> torch.Tensor:
        """Index map from the block layout ``(o, j)`` (j over d1) to the flattening order."""
        idx = torch.arange(self.p).reshape(self.k, self.d1)
        return self.from_blocks(idx[:, :, None])[:, 0]

    def hessian_sum(self, A: torch.Tensor, lam) -> torch.Tensor:
        """``sum_i Lambda_i (x) a~_i a~_i^T`` over the rows of ``A`` in block layout ``(k, d1, k, d1)``."""
        k, d1 = self.k, self.d1
        H = torch.zeros(k, d1, k, d1, dtype=A.dtype, device=A.device)
        kind, val = lam
        if kind == "mse":
            B = (A.T @ A) * val
            for o in range(k):
                H[o, :, o, :] = B
            return H
        P = val
        for o in range(k):
            for q in range(o, k):
                w = P[:, o] * ((1.0 if o == q else 0.0) - P[:, q])
                B = A.T @ (w[:, None] * A)
                H[o, :, q, :] = B
                if q != o:
                    H[q, :, o, :] = B
        return H

    def hvp_sum(self, A: torch.Tensor, lam, Vb: torch.Tensor) -> torch.Tensor:
        """``sum_i (Lambda_i (x) a~_i a~_i^T) V`` for ``Vb`` in block layout ``(k, d1, r)``."""
        b, (k, d1, r) = A.shape[0], Vb.shape
        Z = (A @ Vb.permute(1, 0, 2).reshape(d1, k * r)).reshape(b, k, r)  # Z[i, o, c] = a~_i . V_o,c
        kind, val = lam
        if kind == "mse":
            Y = Z * val
        else:
            P = val[:, :, None]
            Y = P * Z - P * (P * Z).sum(dim=1, keepdim=True)
        return (A.T @ Y.reshape(b, k * r)).reshape(d1, k, r).permute(1, 0, 2)


# ChainHessian products (see ChainHessian.layout): blocks of at least this many columns use the
# (features, rows, columns) layout, or the (features, columns, rows) one over at least this many rows.
_CHAIN_FEATURE_MAJOR_COLUMNS = 16
_CHAIN_ROWS_LAST_ROWS = 256
# Rows x columns x the widest layer held by one intermediate. Intermediates that stay in the caches:
# 2**22 ran 1.5x faster than 2**24 (Intel Xeon); 2**21 another 1.16x for if_cg on the bench MLP (AMD
# EPYC: chunks of 256 rows x 100 columns instead of 512). The (features, columns, rows) layout: chunks
# of 128 rows ran 1.2x faster than 256 (Intel Xeon, the same product).
_CHAIN_ELEMENTS = 2**21
_CHAIN_ROWS_LAST_ELEMENTS = 2**20


class _ChainLayer:
    """One ``nn.Linear`` of a :class:`ChainHessian`: where its parameters sit in the flat vector."""

    def __init__(self, name: str, layer: nn.Linear, offsets: dict[str, int], elementwise: list[nn.Module]):
        self.name, self.out, self.inp = name, int(layer.out_features), int(layer.in_features)
        self.w_off = offsets.get(f"{name}.weight")  # None: the weight is fixed
        self.b_off = offsets.get(f"{name}.bias") if layer.bias is not None else None
        self.has_bias = layer.bias is not None
        self.after = elementwise  # the row-wise modules between this layer and the next one
        self.trainable = self.w_off is not None or self.b_off is not None
        # columns of the layer input used by the parameter block: [input if weight] + [1 if bias]
        self.cols = (self.inp if self.w_off is not None else 0) + (1 if self.b_off is not None else 0)


class _ChainRows:
    """The V-independent quantities of a chunk of rows (see :meth:`ChainHessian.prepare`)."""

    __slots__ = (
        "a", "a_aug", "d1", "s", "delta", "probs", "probs_scaled", "mse", "b", "aT", "deltaT", "d1T", "sT",
        "probsT", "probsT_scaled",
    )  # fmt: skip

    def __init__(self, b: int) -> None:
        self.b = b
        self.a: list[torch.Tensor] = []  # layer inputs (b, in)
        self.a_aug: list[torch.Tensor | None] = []  # [input | 1] restricted to the trained columns
        self.d1: list[torch.Tensor | None] = []  # phi'(z) of the modules after each layer (None: identity)
        self.s: list[torch.Tensor | None] = []  # phi''(z) * dL/dphi (None: zero, e.g. ReLU)
        self.delta: list[torch.Tensor] = []  # dL/dz per layer (b, out)
        self.probs: torch.Tensor | None = None  # softmax outputs (cross-entropy)
        self.probs_scaled: torch.Tensor | None = None  # the same times the scale of the products
        self.mse: float | None = None  # the constant output Hessian 2/k (squared error), times the scale
        self.probsT: torch.Tensor | None = None  # (k, b) layouts of the two above
        self.probsT_scaled: torch.Tensor | None = None


class ChainHessian:
    """Exact Hessian-vector products of the training loss of a :func:`linear_chain` model in closed form.

    The model is ``z_l = a_l W_l^T + b_l``, ``a_{l+1} = phi_l(z_l)`` (``phi_l``: the row-wise
    modules after layer ``l``, identity if none), loss ``L(a_{L+1}, y)`` (cross-entropy or squared
    error). Pearlmutter's R-operator along a direction ``V = (dW_l, db_l)`` gives, per example,

    * forward: ``Rz_l = Ra_l W_l^T + a_l dW_l^T + db_l``, ``Ra_{l+1} = phi_l'(z_l) Rz_l``;
    * at the output: ``Re = Lambda Ra_{L+1}`` (``Lambda = diag(p) - p p^T``, or ``(2/k) I``);
    * backward: ``Rdelta_l = phi_l'(z_l) Re_l + phi_l''(z_l) e_l Rz_l``,
      ``H V |_{W_l} = Rdelta_l^T a_l + delta_l^T Ra_l``, ``H V |_{b_l} = sum Rdelta_l``,
      ``Re_{l-1} = Rdelta_l W_l + delta_l dW_l``,

    with ``delta_l = dL/dz_l`` and ``e_l = dL/da_{l+1}`` from the ordinary backward pass. The
    ``r`` columns of ``V`` go through as one batch, so each step is one matrix product over
    ``rows x r``: the exact Hessian (not Gauss-Newton: the ``delta_l dW_l``, ``delta^T Ra`` and
    ``phi''`` terms are included) at about six multiply-adds per parameter, row and column, without
    the autograd graph of reverse-over-reverse. ``phi'`` and ``phi''`` of the row-wise modules are
    taken by autograd once per chunk of rows (:meth:`prepare`), not per product.
    """

    def __init__(self, chain: list[tuple[str, nn.Module]], names: list[str], model: nn.Module) -> None:
        sizes = {k: v.numel() for k, v in model.named_parameters()}
        offsets, off = {}, 0
        for k in names:
            offsets[k] = off
            off += sizes[k]
        self.p = off
        first = next(i for i, (_, m) in enumerate(chain) if type(m) is nn.Linear)
        self.prefix = [m for _, m in chain[:first]]
        self.layers: list[_ChainLayer] = []
        for i, (name, m) in enumerate(chain):
            if type(m) is not nn.Linear:
                continue
            after = []
            for _, m2 in chain[i + 1 :]:
                if type(m2) is nn.Linear:
                    break
                after.append(m2)
            self.layers.append(_ChainLayer(name, m, offsets, after))
        trained = [i for i, ly in enumerate(self.layers) if ly.trainable]
        self.first = trained[0]
        self.width = max(max(ly.out, ly.inp) for ly in self.layers)

    @classmethod
    def of(cls, model: nn.Module, names: list[str] | None = None) -> ChainHessian | None:
        """The closed form for a :func:`linear_chain` model whose differentiated parameters (``names``,
        default all trainable ones) all belong to its linear layers; None otherwise."""
        chain = linear_chain(model)
        if chain is None:
            return None
        names = trainable_names(model) if names is None else list(names)
        linear_params = {
            f"{n}.{k}" for n, m in chain if type(m) is nn.Linear for k, _ in m.named_parameters()
        }
        if not names or not set(names) <= linear_params or len(set(names)) != len(names):
            return None
        return cls(chain, names, model)

    def prepare(
        self,
        xs: torch.Tensor,
        ys: torch.Tensor,
        params: dict[str, torch.Tensor],
        fixed: dict[str, torch.Tensor],
        task: TaskSpec,
        scale: float = 1.0,
    ) -> _ChainRows | None:
        """Forward and backward pass of a chunk of rows (the quantities every product reuses); None
        when the rows do not fit the closed form (inputs that do not reach the layers as ``(b, d)``
        rows, labels of another shape). The loss derivatives are multiplied by ``scale``, so products
        with these rows come out multiplied by it (e.g. ``1/n`` for a mean) at no extra cost."""
        tensors = {**fixed, **params}
        b = int(xs.shape[0])
        ctx = _ChainRows(b)
        z_list = []
        with torch.no_grad():
            h = xs
            for m in self.prefix:
                h = m(h)
            for ly in self.layers:
                if h.dim() != 2:
                    return None
                W = tensors[f"{ly.name}.weight"]
                bias = tensors.get(f"{ly.name}.bias") if ly.has_bias else None
                ctx.a.append(h)
                ctx.a_aug.append(None)  # built on first use (_augmented)
                z = torch.nn.functional.linear(h, W, bias)
                z_list.append(z)
                try:
                    h, d1, d2 = rowwise_derivatives(ly.after, z)
                except NotRowwise:
                    return None
                ctx.d1.append(d1)
                ctx.s.append(d2)  # multiplied by e below
            out = h
            # dL/d(output) and the output Hessian
            if task.kind == "classification":
                if out.dim() != 2 or ys.dim() != 1 or ys.shape[0] != b or ys.is_floating_point():
                    return None
                ctx.probs = torch.softmax(out, dim=1)
                e = ctx.probs.clone()
                e[torch.arange(b, device=e.device), ys.long()] -= 1.0
                e.mul_(scale)
                ctx.probs_scaled = ctx.probs * scale
            else:
                k = out.shape[1] if out.dim() == 2 else 1
                if ys.shape == out.shape:
                    y2 = ys
                elif k == 1 and ys.dim() == 1 and ys.shape[0] == b:
                    y2 = ys[:, None]
                else:
                    return None
                ctx.mse = scale * 2.0 / k
                e = ctx.mse * (out - y2.to(out.dtype))
            # ordinary backward pass: delta_l = dL/dz_l, e = dL/d(output of layer l's modules)
            deltas: list[torch.Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
            for i in range(len(self.layers) - 1, self.first - 1, -1):
                ly = self.layers[i]
                d1, d2 = ctx.d1[i], ctx.s[i]
                deltas[i] = e if d1 is None else d1 * e
                ctx.s[i] = None if d2 is None else d2 * e
                if i > self.first:
                    e = deltas[i] @ tensors[f"{ly.name}.weight"]
            for i in range(self.first):
                ctx.s[i] = None
            ctx.delta = deltas
            # feature-major (features, rows) copies for the layouts of _hvp_feature_major and _hvp_rows_last
            ctx.aT = [a.T for a in ctx.a]
            ctx.deltaT = [None if d is None else d.T for d in deltas]
            ctx.d1T = [None if d is None else d.T.contiguous() for d in ctx.d1]
            ctx.sT = [None if d is None else d.T.contiguous() for d in ctx.s]
            if ctx.probs is not None:
                ctx.probsT = ctx.probs.T.contiguous()
                ctx.probsT_scaled = ctx.probs_scaled.T.contiguous()
        return ctx

    @staticmethod
    def layout(r: int, n_rows: int) -> str:
        """The layout of the intermediates of a product with ``r`` columns over ``n_rows`` rows in all
        (see :meth:`hvp_sum`)."""
        if r < _CHAIN_FEATURE_MAJOR_COLUMNS:
            return "rows"
        return "columns" if n_rows >= _CHAIN_ROWS_LAST_ROWS else "features"

    def chunk_rows(self, r: int, n_rows: int, chunk_size: int) -> int:
        """Rows per chunk of a product with ``r`` columns over ``n_rows`` rows: a power of two, or
        ``chunk_size`` times one, as many as the layout's element budget allows (few distinct values,
        so prepared chunks are reused)."""
        per_row = max(1, r * self.width)
        if self.layout(r, n_rows) == "columns":
            rows = 1
            while 2 * rows * per_row <= _CHAIN_ROWS_LAST_ELEMENTS and 2 * rows <= chunk_size:
                rows *= 2
        else:
            limit = max(1, _CHAIN_ELEMENTS // per_row)
            rows = chunk_size
            while rows < n_rows and 2 * rows <= limit:
                rows *= 2
        return max(1, min(rows, n_rows))

    def hvp_sum(
        self,
        ctxs: list[_ChainRows],
        V: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        layout: str | None = None,
    ) -> torch.Tensor:
        """``sum_i H_i V`` over the rows of every prepared chunk in ``ctxs`` for ``V`` (p, r),
        contiguous: the summed (not averaged) Hessian of the rows' losses, without weight decay.

        Three layouts of the intermediate ``R`` quantities, same values (:meth:`layout` picks one;
        ``layout`` forces it, for tests): ``"rows"`` (rows, columns, features) for narrow blocks (a
        few large matrix products, e.g. Arnoldi's single vectors); ``"features"`` (features, rows,
        columns) for wide blocks over few rows (LiSSA's mini-batches), where the parameter blocks of
        ``V`` and of the result are used in place; ``"columns"`` (features, columns, rows) for wide
        blocks over many rows, where every step is one 2-D matrix product and ``V`` and the result
        are permuted once per call (1.2x faster than ``"features"`` for 100 columns over 1,400 rows)."""
        layout = layout or self.layout(int(V.shape[1]), sum(c.b for c in ctxs))
        if layout == "columns":
            return self._hvp_rows_last(ctxs, V, tensors)
        step = self._hvp_row_major if layout == "rows" else self._hvp_feature_major
        out = step(ctxs[0], V, tensors)
        for ctx in ctxs[1:]:
            out.add_(step(ctx, V, tensors))
        return out

    def _augmented(self, ctx: _ChainRows, i: int) -> torch.Tensor:
        """Layer ``i``'s input restricted to its trained columns: ``[a | 1]``, ``a`` or ``1``."""
        if ctx.a_aug[i] is None:
            ly, a = self.layers[i], ctx.a[i]
            cols = ([a] if ly.w_off is not None else []) + (
                [torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)] if ly.b_off is not None else []
            )
            ctx.a_aug[i] = cols[0] if len(cols) == 1 else torch.cat(cols, 1)
        return ctx.a_aug[i]

    def _hvp_row_major(
        self, ctx: _ChainRows, V: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        b, r = ctx.b, int(V.shape[1])
        out = torch.empty(self.p, r, dtype=V.dtype, device=V.device)  # every block is written below
        L = len(self.layers)
        Rz: list[torch.Tensor | None] = [None] * L
        Ra_in: list[torch.Tensor | None] = [None] * L  # R of each layer's input, (b, r, in)
        Ra = None
        for i in range(self.first, L):
            ly = self.layers[i]
            Ra_in[i] = Ra
            z = None
            if ly.trainable:  # Dz[j, c, o] = dW~_c[o, j]: weight columns, then the bias
                Dz = torch.empty(ly.cols, r, ly.out, dtype=V.dtype, device=V.device)
                if ly.w_off is not None:
                    Dz[: ly.inp].copy_(
                        V[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r).permute(1, 2, 0)
                    )
                if ly.b_off is not None:
                    Dz[-1].copy_(V[ly.b_off : ly.b_off + ly.out].T)
                z = (self._augmented(ctx, i) @ Dz.view(ly.cols, r * ly.out)).view(b, r, ly.out)
            if Ra is not None:
                W = tensors[f"{ly.name}.weight"]
                prod = Ra.view(b * r, ly.inp) @ W.T
                z = prod.view(b, r, ly.out) if z is None else z.add_(prod.view(b, r, ly.out))
            if z is None:
                Ra = None
                continue
            d1 = ctx.d1[i]
            if ctx.s[i] is not None:
                Rz[i] = z
                Ra = z * d1[:, None, :]
            else:
                Ra = z if d1 is None else z.mul_(d1[:, None, :])
        # output Hessian times R(output)
        if Ra is None:
            return out.zero_()
        if ctx.probs is not None:  # scale (diag(p) - p p^T) R: scale p * R - p (sum scale p * R)
            P = ctx.probs[:, None, :]
            Re = ctx.probs_scaled[:, None, :] * Ra
            Re.sub_(P * Re.sum(dim=2, keepdim=True))
        else:
            Re = Ra.mul_(ctx.mse)
        for i in range(L - 1, self.first - 1, -1):
            ly = self.layers[i]
            d1 = ctx.d1[i]
            Rd = Re if d1 is None else Re.mul_(d1[:, None, :])
            if ctx.s[i] is not None:
                Rd.addcmul_(Rz[i], ctx.s[i][:, None, :])
            if ly.trainable:
                G1 = (Rd.view(b, r * ly.out).T @ self._augmented(ctx, i)).view(r, ly.out, ly.cols)
                if ly.w_off is not None:
                    blk = out[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r)
                    blk.copy_(G1[:, :, : ly.inp].permute(1, 2, 0))
                    if Ra_in[i] is not None:
                        G2 = (ctx.delta[i].T @ Ra_in[i].view(b, r * ly.inp)).view(ly.out, r, ly.inp)
                        blk.add_(G2.permute(0, 2, 1))
                if ly.b_off is not None:
                    out[ly.b_off : ly.b_off + ly.out].copy_(G1[:, :, -1].T)
            if i == self.first:
                break
            W = tensors[f"{ly.name}.weight"]
            Re = (Rd.view(b * r, ly.out) @ W).view(b, r, ly.inp)
            if ly.w_off is not None:
                De = V[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r).permute(0, 2, 1)
                Re.view(b, r * ly.inp).addmm_(ctx.delta[i], De.reshape(ly.out, r * ly.inp))
        return out

    def _hvp_feature_major(
        self, ctx: _ChainRows, V: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        b, r = ctx.b, int(V.shape[1])
        out = torch.empty(self.p, r, dtype=V.dtype, device=V.device)  # every block is written below
        L = len(self.layers)
        Rz: list[torch.Tensor | None] = [None] * L
        Ra_in: list[torch.Tensor | None] = [None] * L  # R of each layer's input, (in, b, r)
        Ra = None
        for i in range(self.first, L):
            ly = self.layers[i]
            Ra_in[i] = Ra
            z = None
            if ly.w_off is not None:
                z = torch.matmul(ctx.a[i], V[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r))
            if ly.b_off is not None:
                vb = V[ly.b_off : ly.b_off + ly.out][:, None, :]
                z = vb.expand(ly.out, b, r).clone() if z is None else z.add_(vb)
            if Ra is not None:
                W = tensors[f"{ly.name}.weight"]
                if z is None:
                    z = (W @ Ra.view(ly.inp, b * r)).view(ly.out, b, r)
                else:
                    z.view(ly.out, b * r).addmm_(W, Ra.view(ly.inp, b * r))
            if z is None:
                Ra = None
                continue
            d1 = None if ctx.d1T[i] is None else ctx.d1T[i][:, :, None]
            if ctx.sT[i] is not None:
                Rz[i] = z
                Ra = z * d1
            else:
                Ra = z if d1 is None else z.mul_(d1)
        if Ra is None:
            return out.zero_()
        if ctx.probsT is not None:
            P = ctx.probsT[:, :, None]
            Re = ctx.probsT_scaled[:, :, None] * Ra
            Re.sub_(P * Re.sum(dim=0, keepdim=True))
        else:
            Re = Ra.mul_(ctx.mse)
        for i in range(L - 1, self.first - 1, -1):
            ly = self.layers[i]
            d1 = None if ctx.d1T[i] is None else ctx.d1T[i][:, :, None]
            Rd = Re if d1 is None else Re.mul_(d1)
            if ctx.sT[i] is not None:
                Rd.addcmul_(Rz[i], ctx.sT[i][:, :, None])
            if ly.w_off is not None:
                blk = out[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r)
                torch.matmul(ctx.aT[i], Rd, out=blk)
                if Ra_in[i] is not None:
                    blk.add_(torch.matmul(ctx.deltaT[i], Ra_in[i]).permute(1, 0, 2))
            if ly.b_off is not None:
                torch.sum(Rd, dim=1, out=out[ly.b_off : ly.b_off + ly.out])
            if i == self.first:
                break
            W = tensors[f"{ly.name}.weight"]
            Re = (W.T @ Rd.view(ly.out, b * r)).view(ly.inp, b, r)
            if ly.w_off is not None:
                Vw = V[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r)
                Re.baddbmm_(ctx.delta[i].expand(ly.inp, b, ly.out), Vw.permute(1, 0, 2))
        return out

    def _hvp_rows_last(
        self, ctxs: list[_ChainRows], V: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``sum_i H_i V`` over the rows of every chunk in ``ctxs``, with the intermediates laid out as
        (features, columns, rows): every step of every chunk is one 2-D matrix product (no batched
        ones); a layer's weight and bias blocks act together through its input with a column of ones
        (no separate bias passes); the parameter blocks of ``V`` are permuted once per call and those
        of the result accumulated over all chunks as the outputs of long products, put in place once
        at the end."""
        r, L = int(V.shape[1]), len(self.layers)
        dt, dev = V.dtype, V.device
        v_fwd: list = [None] * L  # V's weight and bias columns as (out, r, cols)
        v_delta: list = [None] * L  # V's weight block as (in, r, out), for the delta term
        # accumulated sums over the rows, each a long 2-D product output (a 10-wide one, e.g. the
        # output layer's (in * r, out), runs ~5x slower in MKL than its transpose):
        g_fwd: list = [None] * L  # [a | 1]^T R-delta, (cols, out, r)
        g_delta: list = [None] * L  # delta^T R-a, (out, in, r): the weight block's own layout
        for i in range(self.first, L):
            ly = self.layers[i]
            if not ly.trainable:
                continue
            v_fwd[i] = torch.empty(ly.out, r, ly.cols, dtype=dt, device=dev)
            g_fwd[i] = torch.zeros(ly.cols, ly.out, r, dtype=dt, device=dev)
            if ly.w_off is not None:
                Vw = V[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r)
                v_fwd[i][:, :, : ly.inp].copy_(Vw.permute(0, 2, 1))
                if i > self.first:
                    v_delta[i] = Vw.permute(1, 2, 0).contiguous()
                    g_delta[i] = torch.zeros(ly.out, ly.inp, r, dtype=dt, device=dev)
            if ly.b_off is not None:
                v_fwd[i][:, :, -1].copy_(V[ly.b_off : ly.b_off + ly.out])
        for ctx in ctxs:
            b = ctx.b
            Rz: list = [None] * L
            Ra_in: list = [None] * L  # R of each layer's input, (in, r, b)
            Ra = None
            for i in range(self.first, L):
                ly = self.layers[i]
                Ra_in[i] = Ra
                z = None
                if v_fwd[i] is not None:
                    z = (v_fwd[i].view(ly.out * r, ly.cols) @ self._augmented(ctx, i).T).view(ly.out, r, b)
                if Ra is not None:
                    W = tensors[f"{ly.name}.weight"]
                    if z is None:
                        z = (W @ Ra.view(ly.inp, r * b)).view(ly.out, r, b)
                    else:
                        z.view(ly.out, r * b).addmm_(W, Ra.view(ly.inp, r * b))
                if z is None:
                    Ra = None
                    continue
                d1 = ctx.d1T[i]
                if ctx.sT[i] is not None:
                    Rz[i] = z
                    Ra = z * d1[:, None, :]
                else:
                    Ra = z if d1 is None else z.mul_(d1[:, None, :])
            if Ra is None:
                continue
            if ctx.probs is not None:
                P = ctx.probsT[:, None, :]
                Re = ctx.probsT_scaled[:, None, :] * Ra
                Re.sub_(P * Re.sum(dim=0, keepdim=True))
            else:
                Re = Ra.mul_(ctx.mse)
            for i in range(L - 1, self.first - 1, -1):
                ly = self.layers[i]
                d1 = ctx.d1T[i]
                Rd = Re if d1 is None else Re.mul_(d1[:, None, :])
                if ctx.sT[i] is not None:
                    Rd.addcmul_(Rz[i], ctx.sT[i][:, None, :])
                if g_fwd[i] is not None:
                    aug = self._augmented(ctx, i)
                    g_fwd[i].view(ly.cols, ly.out * r).addmm_(aug.T, Rd.view(ly.out * r, b).T)
                if g_delta[i] is not None and Ra_in[i] is not None:
                    g_delta[i].view(ly.out, ly.inp * r).addmm_(ctx.deltaT[i], Ra_in[i].view(ly.inp * r, b).T)
                if i == self.first:
                    break
                W = tensors[f"{ly.name}.weight"]
                Re = (W.T @ Rd.view(ly.out, r * b)).view(ly.inp, r, b)
                if v_delta[i] is not None:
                    Re.view(ly.inp * r, b).addmm_(v_delta[i].view(ly.inp * r, ly.out), ctx.deltaT[i])
        out = torch.zeros(self.p, r, dtype=dt, device=dev)  # blocks of untrained layers stay zero
        for i in range(self.first, L):
            ly = self.layers[i]
            if ly.w_off is not None:
                blk = out[ly.w_off : ly.w_off + ly.out * ly.inp].view(ly.out, ly.inp, r)
                blk.copy_(g_fwd[i][: ly.inp].permute(1, 0, 2))
                if g_delta[i] is not None:
                    blk.add_(g_delta[i])
            if ly.b_off is not None:
                out[ly.b_off : ly.b_off + ly.out].copy_(g_fwd[i][-1])
        return out

    def hessian_blocks(
        self, ctx: _ChainRows, tensors: dict[str, torch.Tensor]
    ) -> dict[tuple[int, int], torch.Tensor]:
        """The summed Hessian of the rows of ``ctx`` (without weight decay) as blocks ``(l, m)``, ``l <=
        m`` over trained layers: ``(out_l * cols_l, out_m * cols_m)``, rows ``(r, s)`` as ``W_l[r, s]``, for
        ``l < m``, the compact form of :meth:`_pair_products` for ``l = m`` (sum blocks of several
        chunks as they are, then :meth:`add_blocks`).

        With ``H_m = d^2 L / dz_m^2`` per row (back-propagated: ``H_l = D_l W_{l+1}^T H_{l+1} W_{l+1}
        D_l + diag(phi_l'' e_l)``, ``D_l = diag(phi_l')``, from the output Hessian), ``J_ml = dz_m /
        dz_l`` and ``A_ml = d(input of m) / dz_l``, the block of weights ``W_l[r, s]``, ``W_m[p, q]``
        (``s``, ``q`` over inputs with a column of ones for the bias) is
        ``sum_i (J_ml^T H_m)[r, p] a~_l[s] a~_m[q] + delta_m[p] A_ml[q, r] a~_l[s]``: the second term
        (``l < m`` only, weight columns ``q``) is the part Gauss-Newton drops. Each term is one matrix
        product over the rows.
        """
        b, L = ctx.b, len(self.layers)
        dt, dev = ctx.a[self.first].dtype, ctx.a[self.first].device
        k = self.layers[-1].out
        if ctx.probs is not None:  # the output Hessian: scale (diag(p) - p p^T), or 2 scale / k I
            out_h = torch.diag_embed(ctx.probs_scaled) - ctx.probs_scaled[:, :, None] * ctx.probs[:, None, :]
        else:
            out_h = torch.eye(k, dtype=dt, device=dev).expand(b, k, k) * ctx.mse
        hess: list[torch.Tensor] = [out_h] * L
        for i in range(L - 1, self.first - 1, -1):
            if i < L - 1:
                W = tensors[f"{self.layers[i + 1].name}.weight"]
                hess[i] = W.T @ hess[i + 1] @ W
            d1 = ctx.d1[i]
            if d1 is not None:
                hess[i] = d1[:, :, None] * hess[i] * d1[:, None, :]
            if ctx.s[i] is not None:
                hess[i] = hess[i] + torch.diag_embed(ctx.s[i])
        trained = [i for i in range(self.first, L) if self.layers[i].trainable]
        blocks: dict[tuple[int, int], torch.Tensor] = {}
        for lo in trained:  # the lower layer l of the docstring; hi is m
            A_lo, out_lo = self._augmented(ctx, lo), self.layers[lo].out
            blocks[(lo, lo)] = self._pair_products(hess[lo], A_lo)
            d1 = ctx.d1[lo]  # Ain = A_ml: d(input of layer hi) / dz_lo, (b, inp_hi, out_lo)
            eye = torch.eye(out_lo, dtype=dt, device=dev)
            Ain = torch.diag_embed(d1) if d1 is not None else eye.expand(b, out_lo, out_lo)
            for hi in range(lo + 1, L):
                ly = self.layers[hi]
                Jt = Ain.transpose(1, 2) @ tensors[f"{ly.name}.weight"].T  # J_ml^T, (b, out_lo, out_hi)
                if hi in trained:
                    A_hi = self._augmented(ctx, hi)
                    c_lo, c_hi = A_lo.shape[1], A_hi.shape[1]
                    gn = (Jt @ hess[hi]).reshape(b, out_lo * ly.out)  # (r, p)
                    pairs = (A_lo[:, :, None] * A_hi[:, None, :]).reshape(b, c_lo * c_hi)  # (s, q)
                    blk = (gn.T @ pairs).view(out_lo, ly.out, c_lo, c_hi).permute(0, 2, 1, 3).contiguous()
                    if ly.w_off is not None:
                        left = (ctx.delta[hi][:, :, None] * A_lo[:, None, :]).reshape(
                            b, ly.out * c_lo
                        )  # (p, s)
                        rest = (left.T @ Ain.reshape(b, ly.inp * out_lo)).view(ly.out, c_lo, ly.inp, out_lo)
                        blk[:, :, :, : ly.inp] += rest.permute(3, 1, 0, 2)
                    blocks[(lo, hi)] = blk.view(out_lo * c_lo, ly.out * c_hi)
                d1 = ctx.d1[hi]
                Ain = Jt.transpose(1, 2) if d1 is None else d1[:, :, None] * Jt.transpose(1, 2)
        return blocks

    def hessian_row_elements(self) -> int:
        """Elements per row of the largest intermediates of :meth:`hessian_blocks` (its per-layer
        ``H_l`` and one pair of layers' products), to bound its rows per chunk."""
        trained = [ly for ly in self.layers[self.first :] if ly.trainable]
        held = sum(ly.out * ly.out for ly in self.layers[self.first :])
        widest = 0
        for a, lo in enumerate(trained):
            widest = max(widest, (lo.out * (lo.out + 1) + lo.cols * (lo.cols + 1)) // 2)
            for hi in trained[a + 1 :]:
                pair = 2 * lo.out * hi.out + lo.cols * hi.cols + hi.out * lo.cols + hi.inp * lo.out
                widest = max(widest, pair)
        return held + widest

    @staticmethod
    def _pair_products(h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``sum_i h_i (x) a~_i a~_i^T`` for symmetric ``h_i`` (b, o, o), as the ``(o(o+1)/2, c(c+1)/2)``
        products of the distinct pairs ``o <= o'`` and ``c <= c'`` only (:meth:`_expand_pairs`)."""
        o, c = h.shape[1], A.shape[1]
        ro, co = torch.triu_indices(o, o, device=h.device)
        rc, cc = torch.triu_indices(c, c, device=h.device)
        return h[:, ro, co].T @ (A[:, rc] * A[:, cc])

    @staticmethod
    def _expand_pairs(U: torch.Tensor, o: int, c: int) -> torch.Tensor:
        """The ``(o * c, o * c)`` block, entry ``[(r, s), (p, q)]`` = ``U[pair(r, p), pair(s, q)]``."""

        def pair(n: int) -> torch.Tensor:
            rows, cols = torch.triu_indices(n, n, device=U.device)
            index = torch.empty(n, n, dtype=torch.long, device=U.device)
            index[rows, cols] = torch.arange(rows.numel(), device=U.device)
            index[cols, rows] = index[rows, cols]
            return index

        po, pc = pair(o), pair(c)
        return U[po[:, None, :, None], pc[None, :, None, :]].reshape(o * c, o * c)

    def add_blocks(self, H: torch.Tensor, blocks: dict[tuple[int, int], torch.Tensor]) -> None:
        """Add :meth:`hessian_blocks` (summed over chunks) into the flat ``p x p`` matrix ``H``, both
        triangles: each block's weight and bias parts go to their slices of ``H``."""
        for (lo, hi), blk in blocks.items():
            lay_lo, lay_hi = self.layers[lo], self.layers[hi]
            if lo == hi:
                blk = self._expand_pairs(blk, lay_lo.out, lay_lo.cols)
            blk = blk.view(lay_lo.out, lay_lo.cols, lay_hi.out, lay_hi.cols)
            for cols_lo, at_lo, width_lo in self._column_groups(lo):
                for cols_hi, at_hi, width_hi in self._column_groups(hi):
                    part = blk[:, cols_lo, :, cols_hi].reshape(lay_lo.out * width_lo, lay_hi.out * width_hi)
                    rows, cols = slice(at_lo, at_lo + part.shape[0]), slice(at_hi, at_hi + part.shape[1])
                    H[rows, cols] += part
                    if lo != hi:
                        H[cols, rows] += part.T

    def _column_groups(self, i: int) -> list[tuple[slice, int, int]]:
        """``(columns of the augmented input, flat offset, width)`` of layer ``i``'s trained weight
        (``W[o, j]`` at ``offset + o * inp + j``) and bias (``b[o]`` at ``offset + o``)."""
        ly, groups = self.layers[i], []
        if ly.w_off is not None:
            groups.append((slice(0, ly.inp), ly.w_off, ly.inp))
        if ly.b_off is not None:
            groups.append((slice(ly.cols - 1, ly.cols), ly.b_off, 1))
        return groups


class NotRowwise(Exception):
    """A module of a :func:`linear_chain` changed the shape of its rows (the closed forms do not apply)."""


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

    Three routes, one answer: a plain MLP (:func:`linear_chain`) and a net of linear, convolution and
    batch-norm layers in known containers (:func:`~app.estimators.layerwise.layer_plan`) get their
    per-example gradients in closed form from one batched forward/backward pass; any other model by
    ``vmap(grad(...))`` over the rows.
    """
    if chunk_size < 1:
        raise EstimatorError("chunk_size must be at least 1", parameter="/chunk_size")
    dev = _resolve_device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype, names=names)
    dt = params[names[0]].dtype
    chain = linear_chain(model)
    plan = None if chain is not None else layer_plan(model, names)

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, fixed), (xi.unsqueeze(0),))
        return objective(out, yi.unsqueeze(0)).sum()

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))
    n = int(x.shape[0])
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        xs = _to_input(x[start:stop], dev, dt)
        ys = _to_input(y[start:stop], dev, dt)
        G = None if chain is None else _linear_chain_gradients(chain, params, fixed, names, xs, ys, objective)
        if G is None and plan is not None:
            try:
                G = layerwise_gradients(plan, model, params, fixed, names, xs, ys, objective)
            except Unsupported:
                plan = None  # the pass showed the closed forms do not apply: vmap from here on
        if G is None:
            g = per_sample(params, xs, ys)
            G = torch.cat([g[k].reshape(stop - start, -1) for k in names], dim=1)
        _check_finite(G, f"per-example gradients of {what} {start}..{stop - 1}")
        yield start, stop, G


def per_sample_layer_rows(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    *,
    names: list[str],
    chunk_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    what: str = "examples",
) -> Iterator[tuple[int, int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] | None:
    """Per-example gradients of the linear and convolution layers owning ``names``, kept as rows: per
    chunk ``(start, stop, {module: (A, D)})`` with ``A`` ``(b, T, d_in)`` the layer's input rows and ``D``
    ``(b, T, d_out)`` its output-gradient rows (:func:`~app.estimators.layerwise.input_rows`), so that
    example ``i``'s weight gradient is ``D_i^T A_i`` and its bias gradient ``D_i^T 1``. None when
    :func:`~app.estimators.layerwise.layer_plan` refuses the model or a module owning ``names`` is
    not a linear or convolution layer; the first chunk raises
    :class:`~app.estimators.layerwise.Unsupported` when the pass refuses it."""
    plan = layer_plan(model, names)
    if plan is None or any(not isinstance(m, (nn.Linear, nn.Conv2d)) for _, m in plan):
        return None
    dev = _resolve_device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype, names=names)
    dt = params[names[0]].dtype

    def chunks() -> Iterator[tuple[int, int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
        for start in range(0, int(x.shape[0]), chunk_size):
            stop = min(start + chunk_size, int(x.shape[0]))
            xs, ys = _to_input(x[start:stop], dev, dt), _to_input(y[start:stop], dev, dt)
            lp = layer_pass(plan, model, params, fixed, xs, ys, objective)
            rows = {}
            for name, m in plan:
                if lp is None:  # the objective ignores the output: zero gradients
                    A = torch.zeros(stop - start, 1, m.weight[0].numel(), dtype=dt, device=dev)
                    D = torch.zeros(stop - start, 1, m.weight.shape[0], dtype=dt, device=dev)
                else:
                    A, D = input_rows(m, lp.inputs[name]), output_rows(m, lp.output_grads[name])
                    for t in (A, D):  # the gradient is D_i^T A_i
                        _check_finite(t, f"per-example gradients of {what} {start}..{stop - 1}")
                rows[name] = (A, D)
            yield start, stop, rows

    return chunks()


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
    columns stays bounded. For a one-layer linear model (:class:`GLMHead`:
    logistic/softmax or linear regression) the chunks are summed in closed form
    instead, ``sum_i Lambda_i (x) a~_i a~_i^T`` (the same matrix, about 10x
    faster); for a deeper :func:`linear_chain` MLP, layer block by layer block
    (:meth:`ChainHessian.hessian_blocks`: the same matrix, 8.6x faster on the
    4,810-parameter bench MLP). ``progress("hessian", done, total)`` is called
    after every chunk.
    """
    dev = _resolve_device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype)
    shapes = [params[k].shape for k in names]
    flat0 = flatten(params, names)
    p = flat0.numel()
    n = int(x.shape[0])
    rows = max(1, min(chunk_size, n))
    cols = max(1, min(p, _HESSIAN_COLUMN_CHUNK, _HESSIAN_ROW_PARAM_BUDGET // rows))

    def total(flat: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (unflatten(flat, names, shapes), fixed), (xs,))
        return per_example_loss(out, ys, task).sum()

    h_fn = jacrev(grad(total), chunk_size=cols)
    glm = GLMHead.of(model, names)
    chain = None if glm is not None else ChainHessian.of(model, names)
    if chain is not None:  # the closed form's intermediates grow with the layers' widths
        rows = max(1, min(rows, _CHAIN_HESSIAN_ELEMENTS // chain.hessian_row_elements()))
    chain_blocks: dict[tuple[int, int], torch.Tensor] = {}
    autodiff_rows = False
    H = torch.zeros(p, p, device=dev, dtype=dtype)
    Hb = None if glm is None else torch.zeros(glm.k, glm.d1, glm.k, glm.d1, device=dev, dtype=dtype)
    n_chunks = math.ceil(n / rows)
    if progress is not None:
        progress("hessian", 0, n_chunks)
    for i, start in enumerate(range(0, n, rows)):
        stop = min(start + rows, n)
        xs, ys = _to_input(x[start:stop], dev, dtype), _to_input(y[start:stop], dev, dtype)
        closed = None
        if glm is not None:
            feats = glm.features(xs, params, fixed)
            lam = None if feats is None else glm.output_hessian(feats[1], ys, task)
            if lam is not None:
                closed = glm.hessian_sum(feats[0], lam)
        ctx = None if chain is None else chain.prepare(xs, ys, params, fixed, task)
        if closed is not None:
            _check_finite(closed, f"Hessian contributions of training examples {start}..{stop - 1}")
            Hb += closed
        elif ctx is not None:
            for key, block in chain.hessian_blocks(ctx, {**fixed, **params}).items():
                _check_finite(block, f"Hessian contributions of training examples {start}..{stop - 1}")
                chain_blocks[key] = block if key not in chain_blocks else chain_blocks[key].add_(block)
        else:
            autodiff_rows = True
            Hc = h_fn(flat0, xs, ys)
            _check_finite(Hc, f"Hessian contributions of training examples {start}..{stop - 1}")
            H += Hc
        if progress is not None:
            progress("hessian", i + 1, n_chunks)
    if Hb is not None:
        perm = glm.permutation().to(dev)  # flat index -> block index
        H += Hb.reshape(p, p)[perm][:, perm]
    if chain_blocks:
        chain.add_blocks(H, chain_blocks)
    H /= max(n, 1)
    if autodiff_rows:  # the closed forms are symmetric as computed
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
