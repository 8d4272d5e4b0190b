"""Server-side architecture registry.

A model is submitted as an architecture *name* plus JSON parameters; the
service validates the parameters against the architecture's ``Params``
dataclass and builds the module here. Code is never accepted over HTTP:
operators add architectures by installing a package that exposes
:class:`Architecture` objects under the ``influence_service.architectures``
entry-point group (see :func:`load_entry_point_architectures`).

Every built-in model accepts flat inputs ``(b, n_features)`` (image models also
take ``(b, C, H, W)``) and works under ``torch.func.functional_call`` +
``vmap(grad)`` in eval mode (BatchNorm then uses its running statistics). A model built only
from ``nn.Sequential``, :class:`Residual` and the layers and row-independent modules that
:mod:`.layerwise` lists gets its per-example gradients in closed form from one batched pass instead
(same values, faster for convolutions); an installed architecture can use them too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt, MaxLen
from torch import nn

from .base import EstimatorError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "influence_service.architectures"


def _p(default: Any = dataclasses.MISSING, description: str = "", *, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"description": description})
    return field(default=default, metadata={"description": description})


MAX_LAYERS = 64  # hidden layers / conv blocks: each is a Python module built per job


@dataclass
class Architecture:
    """A named model family: its parameter dataclass and how to build it."""

    name: str
    summary: str
    Params: type
    build: Callable[[Any], nn.Module]
    n_features: Callable[[Any], int]
    n_outputs: Callable[[Any], int]


# ----------------------------------------------------------------------------- modules


class Reshape(nn.Module):
    """Reshape ``(b, C*H*W)`` or ``(b, C, H, W)`` input to ``(b, C, H, W)``."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.shape = (channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class GlobalMaxPool(nn.Module):
    """Max over the spatial dimensions: ``(b, C, H, W) -> (b, C)``; vmap-friendly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: ``(b, C, H, W) -> (b, C)``; vmap-friendly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


# ----------------------------------------------------------------------------- linear


@dataclass
class LinearParams:
    """Multinomial logistic regression (classification) or linear regression (num_classes=1)."""

    in_features: Annotated[int, Ge(1)] = _p(1, "number of input features")
    num_classes: Annotated[int, Ge(1)] = _p(2, "number of outputs: classes, or 1 for scalar regression")


def _build_linear(p: LinearParams) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(p.in_features, p.num_classes))


# ----------------------------------------------------------------------------- mlp


@dataclass
class MLPParams:
    """Fully connected network: in_features -> hidden[0] -> ... -> num_classes."""

    in_features: Annotated[int, Ge(1)] = _p(1, "number of input features")
    hidden: Annotated[list[Annotated[int, Ge(1)]], MaxLen(MAX_LAYERS)] = _p(
        description=f"widths of the hidden layers (at most {MAX_LAYERS})", factory=lambda: [64]
    )
    num_classes: Annotated[int, Ge(1)] = _p(2, "number of outputs: classes, or 1 for scalar regression")
    activation: Literal["relu", "tanh", "gelu"] = _p("relu", "activation after each hidden layer")


def _build_mlp(p: MLPParams) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = p.in_features
    for h in p.hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[p.activation]()]
        width = h
    layers.append(nn.Linear(width, p.num_classes))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- lora_mlp


class _ZeroInitLinear(nn.Linear):
    """A Linear layer whose (re)initialisation is all zeros: LoRA's up-projection B starts at 0."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class LoRALinear(nn.Module):
    """``x W^T + b + (alpha / rank) * B(A(x))`` with W, b frozen and only A (rank x d_in) and B
    (d_out x rank) trained (Hu et al., 2022).

    W and b are named ``weight`` and ``bias`` as in ``nn.Linear``, so an ``mlp`` state dict fills the
    frozen base; A and B are ``nn.Linear`` children (``lora_A``, ``lora_B``), so K-FAC, EK-FAC, LoGra
    and DataInf see one layer each. Retraining resets only A and B (B to zero, so a retrained model
    starts at the base), never the base.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features)  # a random base, initialised as nn.Linear does
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = _ZeroInitLinear(rank, out_features, bias=False)
        self.scale = float(alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias) + self.scale * self.lora_B(self.lora_A(x))

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


@dataclass
class LoRAMLPParams:
    """An ``mlp`` whose Linear layers are frozen and adapted by rank-``rank`` LoRA updates."""

    in_features: Annotated[int, Ge(1)] = _p(1, "number of input features")
    hidden: Annotated[list[Annotated[int, Ge(1)]], MaxLen(MAX_LAYERS)] = _p(
        description=f"widths of the hidden layers (at most {MAX_LAYERS})", factory=lambda: [64]
    )
    num_classes: Annotated[int, Ge(1)] = _p(2, "number of outputs: classes, or 1 for scalar regression")
    activation: Literal["relu", "tanh", "gelu"] = _p("relu", "activation after each hidden layer")
    rank: Annotated[int, Ge(1)] = _p(8, "rank r of each adapter (A is r x d_in, B is d_out x r)")
    alpha: Annotated[float, Gt(0)] = _p(8.0, "adapter scale numerator: the update is (alpha / rank) B A")


def _build_lora_mlp(p: LoRAMLPParams) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [p.in_features, *p.hidden, p.num_classes]
    for i, (d_in, d_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(LoRALinear(d_in, d_out, p.rank, p.alpha))
        if i < len(p.hidden):
            layers.append(_ACTIVATIONS[p.activation]())
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- cnn


@dataclass
class CNNParams:
    """Small conv net: per entry of ``channels`` a 3x3 conv + ReLU + 2x2 max-pool, then global
    average pooling and a linear classifier. Input is flat (b, C*H*W) or (b, C, H, W)."""

    in_channels: Annotated[int, Ge(1)] = _p(1, "input channels C")
    height: Annotated[int, Ge(1)] = _p(8, "input height H")
    width: Annotated[int, Ge(1)] = _p(8, "input width W")
    num_classes: Annotated[int, Ge(1)] = _p(10, "number of outputs")
    channels: Annotated[list[Annotated[int, Ge(1)]], MaxLen(MAX_LAYERS)] = _p(
        description=f"output channels of each conv block (at most {MAX_LAYERS})", factory=lambda: [16, 32]
    )


def _build_cnn(p: CNNParams) -> nn.Module:
    layers: list[nn.Module] = [Reshape(p.in_channels, p.height, p.width)]
    c, h, w = p.in_channels, p.height, p.width
    for out in p.channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [GlobalAvgPool(), nn.Linear(c, p.num_classes)]
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------- resnet9


@dataclass
class ResNet9Params:
    """The DAWNBench ResNet-9 (David Page): prep conv, layer1 conv+pool+residual, layer2 conv+pool,
    layer3 conv+pool+residual, global max pool, linear; conv-BatchNorm-ReLU blocks. About 6.57M
    parameters at the defaults. Input is flat (b, C*H*W) or (b, C, H, W)."""

    in_channels: Annotated[int, Ge(1)] = _p(3, "input channels C")
    height: Annotated[int, Ge(1)] = _p(32, "input height H")
    width: Annotated[int, Ge(1)] = _p(32, "input width W")
    num_classes: Annotated[int, Ge(1)] = _p(10, "number of outputs")
    base_channels: Annotated[int, Ge(1)] = _p(
        64, "channels of the prep layer; the three stages use 2x, 4x and 8x this"
    )


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def _pool_if_possible(h: int, w: int) -> tuple[list[nn.Module], int, int]:
    if h >= 2 and w >= 2:
        return [nn.MaxPool2d(2)], h // 2, w // 2
    return [], h, w


def _build_resnet9(p: ResNet9Params) -> nn.Module:
    w0 = p.base_channels
    h, w = p.height, p.width
    pool1, h, w = _pool_if_possible(h, w)
    pool2, h, w = _pool_if_possible(h, w)
    pool3, h, w = _pool_if_possible(h, w)
    return nn.Sequential(
        Reshape(p.in_channels, p.height, p.width),
        _conv_bn(p.in_channels, w0),  # prep
        nn.Sequential(
            _conv_bn(w0, 2 * w0), *pool1, Residual(_conv_bn(2 * w0, 2 * w0), _conv_bn(2 * w0, 2 * w0))
        ),
        nn.Sequential(_conv_bn(2 * w0, 4 * w0), *pool2),
        nn.Sequential(
            _conv_bn(4 * w0, 8 * w0), *pool3, Residual(_conv_bn(8 * w0, 8 * w0), _conv_bn(8 * w0, 8 * w0))
        ),
        GlobalMaxPool(),
        nn.Linear(8 * w0, p.num_classes),
    )


# ----------------------------------------------------------------------------- registry


def _chw(p: Any) -> int:
    return int(p.in_channels * p.height * p.width)


ARCHITECTURES: dict[str, Architecture] = {}
BUILTIN_ARCHITECTURES: frozenset[str] = frozenset({"linear", "mlp", "lora_mlp", "cnn", "resnet9"})


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Add ``arch`` to :data:`ARCHITECTURES` (refusing to shadow an existing name unless ``replace``)."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"expected an Architecture, got {type(arch).__name__}")
    if not dataclasses.is_dataclass(arch.Params):
        raise TypeError(f"architecture {arch.name!r}: Params must be a dataclass")
    if arch.name in ARCHITECTURES and not replace:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch
    return arch


for _arch in (
    Architecture(
        "linear",
        "linear model: multinomial logistic regression, or linear regression with num_classes=1",
        LinearParams,
        _build_linear,
        lambda p: int(p.in_features),
        lambda p: int(p.num_classes),
    ),
    Architecture(
        "mlp",
        "fully connected network with configurable hidden widths and activation",
        MLPParams,
        _build_mlp,
        lambda p: int(p.in_features),
        lambda p: int(p.num_classes),
    ),
    Architecture(
        "lora_mlp",
        "mlp with frozen Linear layers adapted by trained low-rank (LoRA) updates; upload the base and "
        "adapter weights (an mlp's weights fill the base)",
        LoRAMLPParams,
        _build_lora_mlp,
        lambda p: int(p.in_features),
        lambda p: int(p.num_classes),
    ),
    Architecture(
        "cnn",
        "small convolutional network (conv-ReLU-maxpool blocks, global average pool, linear)",
        CNNParams,
        _build_cnn,
        _chw,
        lambda p: int(p.num_classes),
    ),
    Architecture(
        "resnet9",
        "DAWNBench ResNet-9 with BatchNorm (about 6.57M parameters at 3x32x32, 10 classes)",
        ResNet9Params,
        _build_resnet9,
        _chw,
        lambda p: int(p.num_classes),
    ),
):
    register_architecture(_arch)


def get_architecture(name: str) -> Architecture:
    """The registered architecture called ``name``; EstimatorError(``/architecture/name``) if none."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise EstimatorError(
            f"unknown architecture {name!r}; available: {', '.join(sorted(ARCHITECTURES))}",
            parameter="/architecture/name",
        ) from None


def make_params(arch: Architecture | str, params: Any = None) -> Any:
    """``params`` as an instance of ``arch.Params`` (accepts None, a dict, or an instance).

    No type validation beyond the dataclass constructor: the service validates
    user input with pydantic before it gets here.
    """
    a = get_architecture(arch) if isinstance(arch, str) else arch
    if params is None:
        return a.Params()
    if isinstance(params, a.Params):
        return params
    if isinstance(params, dict):
        try:
            return a.Params(**params)
        except TypeError as e:
            raise EstimatorError(
                f"invalid parameters for architecture {a.name!r}: {e}", parameter="/architecture/params"
            ) from None
    raise TypeError(f"params must be None, a dict or {a.Params.__name__}, not {type(params).__name__}")


def init_model(arch: Architecture | str, params: Any = None, seed: int = 0) -> nn.Module:
    """Build ``arch`` with deterministic initial weights for ``seed`` (global RNG left untouched)."""
    a = get_architecture(arch) if isinstance(arch, str) else arch
    p = make_params(a, params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return a.build(p)


def _as_architectures(obj: Any) -> list[Architecture] | None:
    if isinstance(obj, Architecture):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        items = list(obj)
        if items and all(isinstance(a, Architecture) for a in items):
            return items
    return None


def load_entry_point_architectures(group: str = ENTRY_POINT_GROUP) -> list[Architecture]:
    """Register :class:`Architecture` objects exposed by installed packages under ``group``.

    An entry point may name an Architecture, a list/dict of them, or a
    zero-argument callable returning either. Entry points that fail to load, give
    something else, or would shadow an existing name are skipped with a logged
    warning. Returns the architectures added (empty when there are none).
    """
    added: list[Architecture] = []
    for ep in importlib_metadata.entry_points(group=group):
        try:
            obj = ep.load()
            archs = _as_architectures(obj)
            if archs is None and callable(obj) and not isinstance(obj, type):
                archs = _as_architectures(obj())
        except Exception as e:  # a broken plugin must not take the service down
            log.warning("skipping architecture entry point %r: %s", ep.name, e)
            continue
        if archs is None:
            log.warning("skipping architecture entry point %r: it does not expose an Architecture", ep.name)
            continue
        for a in archs:
            if a.name in ARCHITECTURES:
                if ARCHITECTURES[a.name] is not a:
                    log.warning(
                        "skipping architecture %r from entry point %r: name already registered",
                        a.name,
                        ep.name,
                    )
                continue
            try:
                register_architecture(a)
            except (TypeError, ValueError) as e:
                log.warning("skipping architecture from entry point %r: %s", ep.name, e)
                continue
            added.append(a)
    return added
