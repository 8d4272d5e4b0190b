"""Per-example gradients of convolutional nets from one batched forward/backward pass.

``vmap(grad(...))`` back-propagates every example through its own copy of the network; for a
convolution that is a grouped convolution with one group per example, the slowest part of a
ResNet-9 gradient. But the per-example gradient of a layer's weight has a closed form in what the
ordinary batched backward pass already computes, the layer's input ``a_i`` and the gradient
``delta_i`` of the summed objective with respect to its output (``delta_i`` is example ``i``'s own
output gradient, because no layer mixes examples in eval mode):

* ``nn.Linear``: ``delta_i^T a_i`` summed over any middle dimensions (bias: ``delta_i`` summed);
* ``nn.Conv2d``: ``delta_i`` (``C_out x L``) times the unfolded input patches (``L x C_in k k``), one
  batched matrix product over the chunk (bias: ``delta_i`` summed over the ``L`` locations);
* ``nn.BatchNorm1d/2d`` with running statistics: ``sum delta_i * x^_i`` for the scale, ``sum delta_i``
  for the shift, ``x^`` the input normalised by the running statistics.

The closed forms rest on examples being independent, which an arbitrary ``forward`` need not
respect (a module may normalise over the batch). So they are used only for models built entirely
from modules known to treat rows independently: the containers ``nn.Sequential`` and
:class:`~app.estimators.architectures.Residual`, the layers above and parameter-free element-wise
and pooling modules (:data:`_ROW_INDEPENDENT`). Anything else, a module called twice (shared
weights) or an in-place change of a captured tensor falls back to ``vmap``: same answer, slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .architectures import GlobalAvgPool, GlobalMaxPool, Reshape, Residual

_ROW_INDEPENDENT: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU,
    nn.Softplus, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    Reshape, GlobalMaxPool, GlobalAvgPool,
)  # fmt: skip
"""Parameter-free modules whose output row ``i`` depends only on input row ``i`` (eval mode)."""

_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, Residual)
_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """The batched pass cannot give exact per-example gradients for this model (use ``vmap``)."""


def _row_independent_leaf(m: nn.Module) -> bool:
    if type(m) in _ROW_INDEPENDENT:
        return not any(True for _ in m.parameters(recurse=False)) and not getattr(m, "return_indices", False)
    if type(m) is nn.Flatten:
        return m.start_dim == 1
    if type(m) is nn.Linear:
        return True
    if type(m) is nn.Conv2d:
        return m.groups == 1
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return m.track_running_stats  # without running statistics eval mode normalises over the batch
    return False


def layer_plan(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]] | None:
    """The layers, ``(module name, module)``, owning the parameters ``names`` when every module of
    ``model`` is a known container, a supported layer or a row-independent module, none is reachable
    twice or carries hooks; None otherwise."""
    modules = dict(model.named_modules(remove_duplicate=False))
    if len({id(m) for m in modules.values()}) != len(modules):
        return None  # a shared module: its per-example gradient sums over its uses
    for m in modules.values():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return None
        if type(m) in _CONTAINERS:
            if any(True for _ in m.parameters(recurse=False)):
                return None
        elif m._modules or not _row_independent_leaf(m):
            return None
    plan: dict[str, nn.Module] = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        m = modules.get(owner)
        if m is None or type(m) not in _LAYERS or leaf not in ("weight", "bias"):
            return None
        plan[owner] = m
    return list(plan.items())


def conv_patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches of a convolution, ``(b, L, C_in * kh * kw)`` (L = output locations).

    Handles stride, dilation, numeric and string (``"same"``/``"valid"``) padding and
    the non-zero padding modes (the input is padded like the module does).
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    padding: Any = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2)


def input_rows(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """A linear or convolution layer's input as rows ``(b, T, d_in)`` (without a bias column): the
    unfolded patches of a convolution (``T`` output locations), the last axis of a linear layer's input
    (``T`` = the product of its middle axes, 1 for ``(b, d)`` rows)."""
    if isinstance(m, nn.Conv2d):
        return conv_patches(m, a)
    return a.reshape(a.shape[0], -1, a.shape[-1])


def output_rows(m: nn.Module, d: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to a linear or convolution layer's output as rows ``(b, T, d_out)``,
    matching :func:`input_rows`: example ``i``'s weight gradient is ``D_i^T A_i``."""
    if isinstance(m, nn.Conv2d):
        return (d.unsqueeze(0) if d.dim() == 3 else d).flatten(2).transpose(1, 2)
    return d.reshape(d.shape[0], -1, d.shape[-1])


@dataclass
class LayerPass:
    """What one batched pass gives per layer of a :func:`layer_plan`: its input, the gradient of the
    summed objective with respect to its output, and (batch norm) the running statistics it used."""

    inputs: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]


def layer_pass(
    plan: list[tuple[str, nn.Module]],
    model: nn.Module,
    params: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    objective: Objective,
) -> LayerPass | None:
    """One forward/backward pass of the rows ``xs`` through a model accepted by :func:`layer_plan`;
    None when the objective ignores the model's output (every gradient is zero). Raises
    :class:`Unsupported` when the pass shows the closed forms do not apply (a layer called twice, a
    captured tensor changed in place)."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name: str):
        def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in captured or len(inputs) != 1:
                raise Unsupported
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is None or m.running_var is None:
                    raise Unsupported
                stats[name] = (m.running_mean, m.running_var)  # the functional call's buffers
            captured[name] = (inputs[0], output, inputs[0]._version, output._version)

        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in plan]
    try:
        leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        with torch.enable_grad():
            loss = objective(functional_call(model, (leaves, fixed), (xs,)), ys).sum()
            if len(captured) != len(plan):
                raise Unsupported
            for a, out, va, vo in captured.values():
                if a._version != va or out._version != vo:
                    raise Unsupported
            if not loss.requires_grad:
                return None
            deltas = torch.autograd.grad(loss, [captured[name][1] for name, _ in plan])
    finally:
        for h in handles:
            h.remove()
    return LayerPass(
        inputs={name: captured[name][0].detach() for name, _ in plan},
        output_grads={name: d for (name, _), d in zip(plan, deltas, strict=True)},
        stats=stats,
    )


def _batchnorm_scale_gradient(
    m: nn.Module, a: torch.Tensor, d: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, out: torch.Tensor
) -> None:
    """Eval-mode batch norm: the scale multiplies the input normalised by the running statistics."""
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
    out.copy_((d * xhat).flatten(2).sum(2) if a.dim() > 2 else d * xhat)


def _bias_gradient(m: nn.Module, d: torch.Tensor, out: torch.Tensor) -> None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):  # channels second
        out.copy_(d.flatten(2).sum(2) if d.dim() > 2 else d)
    else:  # D_i^T 1
        out.copy_(output_rows(m, d).sum(1))


def layerwise_gradients(
    plan: list[tuple[str, nn.Module]],
    model: nn.Module,
    params: dict[str, torch.Tensor],
    fixed: dict[str, torch.Tensor],
    names: list[str],
    xs: torch.Tensor,
    ys: torch.Tensor,
    objective: Objective,
) -> torch.Tensor:
    """Per-example gradients ``(b, p)`` of the parameters ``names`` (columns in that order) for a
    model accepted by :func:`layer_plan`, from one :func:`layer_pass` (which may raise
    :class:`Unsupported`)."""
    b, width = int(xs.shape[0]), sum(params[n].numel() for n in names)
    dt = params[names[0]].dtype
    lp = layer_pass(plan, model, params, fixed, xs, ys, objective)
    if lp is None:
        return torch.zeros(b, width, dtype=dt, device=xs.device)
    modules = dict(plan)
    G = torch.empty(b, width, dtype=dt, device=xs.device)
    off = 0
    for n in names:
        owner, _, leaf = n.rpartition(".")
        width = params[n].numel()
        cols = G[:, off : off + width]
        m, a, d = modules[owner], lp.inputs[owner], lp.output_grads[owner]
        if leaf == "bias":
            _bias_gradient(m, d, cols)
        elif owner in lp.stats:
            _batchnorm_scale_gradient(m, a, d, *lp.stats[owner], cols)
        else:  # D_i^T A_i, one batched product written in place
            D = output_rows(m, d)
            torch.bmm(D.transpose(1, 2), input_rows(m, a), out=cols.view(b, D.shape[2], -1))
        off += width
    return G
