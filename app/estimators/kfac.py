"""Kronecker-factored curvature (K-FAC, EK-FAC) for ``nn.Linear`` and ``nn.Conv2d`` layers.

ESTIMATORS.md 2.14. The Gauss-Newton / Fisher matrix ``G`` of the training loss
is approximated block-diagonally over the *tracked* layers (every ``nn.Linear``
and ``nn.Conv2d`` with a trainable weight, optionally restricted to module
prefixes). A layer's per-example gradient is the matrix

    ``Gm_i = sum_t delta_it a~_it^T``   (``d_out x d_in``),

where ``a~`` is the layer input with a constant 1 appended when the layer has a
trainable bias (the last column of ``Gm`` is then the bias gradient), ``delta`` is
the gradient of the example's loss with respect to the layer's pre-activation
output and ``t`` runs over the layer's *positions*: one for a Linear layer on
``(b, d)`` inputs, the ``L = H_out * W_out`` output locations of a convolution
(its input seen as unfolded ``C_in * kh * kw`` patches, the KFC construction of
Grosse & Martens 2016), the middle dimensions of a Linear layer applied to
``(b, ..., d)``, and every call of a module that runs more than once per forward.
Rows of ``Gm`` follow the weight's first axis and columns its flattened
remaining axes (``C_in, kh, kw`` order, matching ``F.unfold``), then the bias.

Factors (accumulated in float64 over training chunks, model in eval mode at
``problem.weights``)::

    A = (1/n) sum_i (1/T) sum_t a~_it a~_it^T      (mean over positions)
    S = (1/n) sum_i       sum_t delta_it delta_it^T (sum over positions)

so that ``A (x) S`` is KFC's ``T * E_t[a a^T] (x) E_t[delta delta^T]`` (for a
Linear layer simply ``E[a a^T] (x) E[delta delta^T]``). With ``vec`` the
row-major flattening of ``Gm`` (the order of the flattened parameter gradient),
K-FAC is ``G_l ~ S (x) A``. Eigendecompose ``A = Q_A diag(e_A) Q_A^T`` and
``S = Q_S diag(e_S) Q_S^T`` (float64; eigenvalues clipped at 0). K-FAC's
eigenvalues are ``Lambda = outer(e_S, e_A)``; EK-FAC refits them in the same
eigenbasis from the per-example gradients (George et al. 2018)::

    Lambda = (1/n) sum_i (Q_S^T Gm_i Q_A) ** 2    (elementwise)

which is ``diag((Q_S (x) Q_A)^T G_l (Q_S (x) Q_A))``: the Frobenius-optimal
diagonal in that basis, so ``||G_l - G_EKFAC||_F <= ||G_l - G_KFAC||_F``. The
per-example gradients of that pass come from the shared core
(:func:`~app.estimators.gradients.per_sample_gradients`), not from the hooks.

Preconditioning a layer gradient ``Gm`` with shift ``s``::

    (G_l + s I)^-1 vec(Gm) = vec(Q_S [(Q_S^T Gm Q_A) / (Lambda + s)] Q_A^T)

The Fisher is ``"empirical"`` (labels are the training labels) or ``"true"``
(labels sampled once per example from the model's predictive distribution,
seeded): a categorical draw from the softmax for classification; for the
``mse`` loss ``(1/k) sum_j (f_j - y_j)^2`` a Gaussian ``y ~ N(f, k/2 I)``, the
distribution whose negative log-likelihood that loss is, so the expected true
Fisher is exactly the Gauss-Newton matrix. Samples depend on the seed and the
example index only, not on the chunk size. The same labels are used by both
passes. ``"expected"`` takes that expectation exactly instead of sampling one label:
the Gauss-Newton matrix of an example is ``J^T L L^T J`` with ``L`` the square root of
the loss's output Hessian (``L[:, c] = sqrt(p_c) (e_c - p)`` for the softmax cross-entropy,
``sqrt(2/k) I`` for the mse loss), so every example contributes ``k`` pseudo-examples whose
output gradients are the columns of ``L`` (the objective ``<out, L[:, c]>``), each with the
example's layer inputs; ``S`` and ``Lambda`` sum over them. No sampling noise, ``k`` times the
backward work (meant for a moderate number of outputs ``k``).

Everything else (BatchNorm affine parameters, embeddings, grouped
convolutions, modules whose forward never runs) is ignored; see
:func:`tracked_layers` and :func:`ignored_parameters`.

Both passes read ``a~`` and ``delta`` from forward hooks and autograd, except for a plain MLP
(:func:`~app.estimators.gradients.linear_chain`) whose tracked layers are all its linear ones:
there each example is evaluated once and its pseudo-examples' output gradients are
back-propagated in closed form (:func:`_chain_blocks`), the same factors at a fraction of the
work; scoring then keeps the training gradients as their factors ``delta_i a~_i^T``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from .base import EstimatorError, InfluenceProblem, NumericalError, Runtime, TaskSpec, TrainState
from .gradients import (
    Ticker,
    all_finite,
    functional_state,
    gradient_factors,
    linear_chain,
    linear_chain_backprop,
    n_chunks,
    per_sample_gradients,
    per_sample_layer_rows,
    train_objective,
    trainable_names,
)
from .layerwise import Unsupported, input_rows, output_rows
from .objectives import per_example_loss

FisherType = Literal["empirical", "true", "expected"]
DAMPING_POINTER = "/method/params/damping"
LAYERS_POINTER = "/method/params/layers"
HEURISTIC_FRACTION = 0.1
"""``damping=None`` uses ``HEURISTIC_FRACTION * mean(Lambda_l)`` per layer (kronfluence's heuristic)."""
EXPECTED_ROWS_FACTOR = 16
"""``fisher="expected"`` runs up to this many times ``chunk_size`` pseudo-example rows at once (fewer,
larger steps: the per-step overhead dominates small models)."""


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class KFACLayer:
    """One tracked module: where its parameters live and the shape of its gradient matrix."""

    module: str
    """module path in ``model.named_modules()`` (``""`` for the root)"""
    kind: Literal["linear", "conv2d"]
    weight: str
    bias: str | None
    """the bias parameter's name, or None when the layer has no trainable bias (no 1 is appended)"""
    d_out: int
    d_in: int
    """columns of the gradient matrix, including the bias column"""

    @property
    def param_names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])

    @property
    def n_params(self) -> int:
        return self.d_out * self.d_in

    def to_info(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> KFACLayer:
        return cls(**info)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _param_name(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def tracked_layers(
    model: nn.Module, layers: list[str] | None = None
) -> tuple[list[KFACLayer], dict[str, str]]:
    """The K-FAC layers of ``model`` (in module order) and the skipped candidate modules with reasons.

    Candidates are the ``nn.Linear`` and ``nn.Conv2d`` modules (subclasses
    included) under the module prefixes ``layers`` (all when None; ``"last"``
    names the last candidate with a trainable weight). A candidate is skipped
    when its weight is frozen or tied to another module's, or when it is a
    grouped convolution. Raises :class:`EstimatorError` (``/method/params/layers``)
    when nothing is tracked.
    """
    trainable = set(trainable_names(model))
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and _param_name(name, "weight") in trainable
    ]
    if layers is not None:
        prefixes = list(layers)
        if not prefixes:
            raise EstimatorError("layers must name at least one module prefix", parameter=LAYERS_POINTER)
        if "last" in prefixes:
            prefixes = [p for p in prefixes if p != "last"] + ([candidates[-1][0]] if candidates else [])
        selected = [(name, m) for name, m in model.named_modules() if _under(name, prefixes)]
    else:
        selected = list(model.named_modules())
    tracked: list[KFACLayer] = []
    skipped: dict[str, str] = {}
    for name, m in selected:
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w_name = _param_name(name, "weight")
        if w_name not in trainable:
            skipped[name or "<root>"] = (
                "weight is frozen" if not m.weight.requires_grad else "weight is tied to another module"
            )
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            skipped[name or "<root>"] = f"grouped convolution (groups={m.groups}) is not supported"
            continue
        b_name = _param_name(name, "bias")
        bias = b_name if (m.bias is not None and b_name in trainable) else None
        d_out = int(m.weight.shape[0])
        d_in = int(m.weight[0].numel()) + (1 if bias else 0)
        kind: Literal["linear", "conv2d"] = "conv2d" if isinstance(m, nn.Conv2d) else "linear"
        tracked.append(KFACLayer(name, kind, w_name, bias, d_out, d_in))
    if not tracked:
        names = [n or "<root>" for n, _ in candidates]
        where = "the model" if layers is None else f"modules {layers}"
        why = f" (skipped: {skipped})" if skipped else ""
        raise EstimatorError(
            f"no trainable nn.Linear or nn.Conv2d module under {where}{why}; the candidates are {names}",
            parameter=LAYERS_POINTER,
        )
    return tracked, skipped


def parameter_names(layers: list[KFACLayer]) -> list[str]:
    """The tracked parameters in the flat layout used throughout: per layer its weight, then its bias."""
    return [n for layer in layers for n in layer.param_names]


def ignored_parameters(model: nn.Module, layers: list[KFACLayer]) -> list[str]:
    """Trainable parameters outside the tracked layers (e.g. BatchNorm affine): they get no curvature
    block and do not contribute to the scores."""
    kept = set(parameter_names(layers))
    return [n for n in trainable_names(model) if n not in kept]


def layer_matrices(G: torch.Tensor, layers: list[KFACLayer]) -> list[torch.Tensor]:
    """Split flat gradients ``(b, p_tracked)`` (layout of :func:`parameter_names`) into per-layer
    gradient matrices ``(b, d_out, d_in)`` with the bias as the last column."""
    b = G.shape[0]
    out, off = [], 0
    for layer in layers:
        d_w = layer.d_in - (1 if layer.bias else 0)
        k = layer.d_out * d_w
        w = G[:, off : off + k].reshape(b, layer.d_out, d_w)
        off += k
        if layer.bias:
            w = torch.cat([w, G[:, off : off + layer.d_out].reshape(b, layer.d_out, 1)], dim=2)
            off += layer.d_out
        out.append(w)
    if off != G.shape[1]:
        raise ValueError(f"gradient has {G.shape[1]} columns, the tracked layers {off}")
    return out


def flatten_layer_matrices(mats: list[torch.Tensor], layers: list[KFACLayer]) -> torch.Tensor:
    """Inverse of :func:`layer_matrices`: ``(b, p_tracked)``."""
    parts = []
    for M, layer in zip(mats, layers, strict=True):
        b = M.shape[0]
        if layer.bias:
            parts += [M[:, :, :-1].reshape(b, -1), M[:, :, -1].reshape(b, -1)]
        else:
            parts.append(M.reshape(b, -1))
    return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------- layer inputs


def with_ones_column(a: torch.Tensor) -> torch.Tensor:
    """``a`` with a column of ones appended (the bias as the last input of a layer's gradient matrix)."""
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)], dim=-1)


# ----------------------------------------------------------------------------- Fisher labels


class FisherLabels:
    """Labels for the Fisher: the training labels, or samples from the model's predictive distribution.

    Random numbers are drawn once for all ``n`` examples from a CPU generator seeded
    with ``seed``, so a sample depends on the example's index only.
    """

    def __init__(self, task: TaskSpec, fisher: FisherType, seed: int, n: int) -> None:
        if fisher not in ("empirical", "true", "expected"):
            raise EstimatorError(f"unknown fisher {fisher!r}", parameter="/method/params/fisher")
        self.task, self.fisher, self.seed, self.n = task, fisher, int(seed), n
        self._noise: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None  # the sampled labels of all n examples (true Fisher)

    def __call__(self, out: torch.Tensor, y: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.fisher == "empirical":
            return y
        out = out.detach()
        b = stop - start
        if self._noise is None:
            g = torch.Generator().manual_seed(self.seed)
            if self.task.kind == "classification":
                self._noise = torch.rand(self.n, generator=g, dtype=torch.float64)
            else:
                self._noise = torch.randn(self.n, *out.shape[1:], generator=g, dtype=torch.float64)
        noise = self._noise[start:stop].to(out.device)
        if self.task.kind == "classification":
            cdf = torch.softmax(out.to(torch.float64), dim=-1).cumsum(dim=-1)
            sample = (cdf < noise.unsqueeze(-1)).sum(dim=-1).clamp(max=out.shape[-1] - 1).long()
        else:
            k = max(1, math.prod(out.shape[1:]))
            sample = (out.to(torch.float64) + math.sqrt(k / 2.0) * noise).to(out.dtype)
        if self.labels is None:
            self.labels = torch.zeros(self.n, *sample.shape[1:], dtype=sample.dtype)
        self.labels[start:stop] = sample.reshape(b, *sample.shape[1:]).cpu()
        return sample


def output_hessian_roots(out: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """``(b, k, k)``: per example the columns ``L[:, c]`` of a square root of the loss's Hessian with
    respect to the (flattened) output, ``L L^T = d^2 loss / d out^2`` (the expected Fisher's factor).

    Softmax cross-entropy: ``L[:, c] = sqrt(p_c) (e_c - p)`` (``L L^T = diag(p) - p p^T`` since
    ``sum_c p_c = 1``); mse ``(1/k) sum_j (f_j - y_j)^2``: ``sqrt(2/k) I``. Float64.
    """
    out = out.detach().to(torch.float64).reshape(out.shape[0], -1)
    b, k = out.shape
    if task.kind == "classification":
        p = torch.softmax(out, dim=-1)
        eye = torch.eye(k, dtype=out.dtype, device=out.device)
        # row c of the result is column c of L: sqrt(p_c) (e_c - p)
        return p.sqrt().unsqueeze(-1) * (eye.unsqueeze(0) - p.unsqueeze(1))
    return math.sqrt(2.0 / k) * torch.eye(k, dtype=out.dtype, device=out.device).expand(b, k, k)


def linear_output_objective(out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``<out_i, v_i>`` per row: its output gradient is ``v_i`` (the pseudo-examples of ``"expected"``)."""
    return (out.reshape(out.shape[0], -1) * v.reshape(v.shape[0], -1).to(out.dtype)).sum(dim=-1)


def _example_step(chunk_size: int, k: int) -> int:
    """Examples per step of the ``"expected"`` Fisher, whose ``k`` pseudo-examples each make ``k``
    rows: at most ``chunk_size`` examples and about ``EXPECTED_ROWS_FACTOR * chunk_size`` rows."""
    return max(1, min(chunk_size, EXPECTED_ROWS_FACTOR * chunk_size // max(k, 1)))


# ----------------------------------------------------------------------------- pass 1: covariances


@dataclass
class Covariances:
    """Output of :func:`covariance_factors` (float64, on the runtime device)."""

    A: dict[str, torch.Tensor]
    S: dict[str, torch.Tensor]
    positions: dict[str, int]
    """positions ``T`` per example of each layer (summed over calls)"""
    uncalled: list[str]
    """tracked modules whose forward never ran (dropped from ``layers``)"""
    layers: list[KFACLayer]
    labels: torch.Tensor | None = None
    """labels the Fisher used: the sampled ones (true Fisher) or None (the training labels)"""
    n: int = 0


def _cdt(dtype: torch.dtype) -> torch.dtype:
    """Computation dtype for factor algebra: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _steps(n: int, chunk_size: int, step: int) -> list[tuple[int, int, bool]]:
    """``(start, stop, ends a chunk)``: chunks of ``chunk_size`` examples, cut into steps of ``step``."""
    return [
        (s0, min(s0 + step, start + chunk_size, n), s0 + step >= min(start + chunk_size, n))
        for start in range(0, n, chunk_size)
        for s0 in range(start, min(start + chunk_size, n), step)
    ]


def _fisher_targets(
    problem: InfluenceProblem, fisher: FisherType, labels: Any
) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """``(out, start, stop) -> (b, r, k)``: the output gradients of examples ``start:stop`` whose outer
    products make the Fisher: the ``k`` columns of ``L`` (``"expected"``), or the loss gradient at
    ``labels`` (a :class:`FisherLabels`, which samples them for the true Fisher, or a tensor)."""
    task = problem.task

    def targets(out: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if fisher == "expected":
            return output_hessian_roots(out, task).to(out.dtype)
        if isinstance(labels, FisherLabels):
            ys = labels(out, _to(problem.train_y[start:stop], out.device, out.dtype), start, stop)
        else:
            ys = _to(labels[start:stop], out.device, out.dtype)
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(per_example_loss(o, ys, task).sum(), o)
        return g.reshape(g.shape[0], 1, -1)

    return targets


def _chain_blocks(
    problem: InfluenceProblem,
    layers: list[KFACLayer],
    runtime: Runtime,
    fisher: FisherType,
    targets: Callable[[torch.Tensor, int, int], torch.Tensor],
) -> Iterator[tuple[int, int, bool, list[tuple[torch.Tensor, torch.Tensor]]]] | None:
    """The factors of both passes of a :func:`~app.estimators.gradients.linear_chain` model whose tracked
    layers are all its linear ones, without hooks: per step of examples ``(start, stop, ends a
    chunk, [(a~, D)] per tracked layer)`` with ``a~`` the layer input ``(b, d_in)`` (a column of ones
    for a tracked bias) and ``D`` the output gradients of the step's ``r`` pseudo-examples per example
    ``(b, r, d_out)`` (:func:`_fisher_targets`), in the factor dtype. Each example is evaluated once,
    not once per pseudo-example. None for any other model (the hooked pass)."""
    chain = linear_chain(problem.model)
    if chain is None or not problem.n_train:
        return None
    linear = {name: m for name, m in chain if type(m) is nn.Linear}
    if any(la.kind != "linear" or la.module not in linear for la in layers):
        return None
    dev = torch.device(runtime.device)
    _, params, fixed = functional_state(problem.model, problem.weights, device=dev, dtype=runtime.dtype)
    tensors = {**fixed, **params}
    dt = next(iter(params.values())).dtype
    acc = _cdt(dt)
    k = linear[list(linear)[-1]].out_features if fisher == "expected" else 1
    steps = _steps(problem.n_train, runtime.chunk_size, _example_step(runtime.chunk_size, k))

    def block(s0: int, s1: int):
        xs = _to(problem.train_x[s0:s1], dev, dt)
        res = linear_chain_backprop(chain, tensors, xs, lambda out: targets(out, s0, s1))
        if res is None:
            return None
        by_name = {name: (a, D) for name, a, D in res}
        factors = []
        for la in layers:
            a, D = by_name[la.module]
            a = a.to(acc)
            factors.append((with_ones_column(a) if la.bias else a, D.to(acc)))
        return factors

    first = block(*steps[0][:2])
    if first is None:
        return None

    def blocks():
        for i, (s0, s1, last) in enumerate(steps):
            yield s0, s1, last, first if i == 0 else block(s0, s1)

    return blocks()


def covariance_factors(
    problem: InfluenceProblem,
    layers: list[KFACLayer],
    runtime: Runtime,
    *,
    fisher: FisherType = "empirical",
    seed: int = 0,
    ticker: Ticker | None = None,
) -> Covariances:
    """Pass 1: ``A_l`` and ``S_l`` of every tracked layer over the training set.

    Forward hooks on a private copy of ``problem.model`` (eval mode, evaluated at
    ``problem.weights`` with ``functional_call``) record each tracked module's input
    and register a tensor hook on its output that records ``delta``; the per-example
    losses of a chunk are summed and differentiated once (examples do not
    interact in eval mode). ``ticker`` ticks once per chunk.
    """
    dev = torch.device(runtime.device)
    n = problem.n_train
    A = {la.module: torch.zeros(la.d_in, la.d_in, dtype=torch.float64, device=dev) for la in layers}
    S = {la.module: torch.zeros(la.d_out, la.d_out, dtype=torch.float64, device=dev) for la in layers}
    sampler = FisherLabels(problem.task, fisher, seed, n)
    blocks = _chain_blocks(problem, layers, runtime, fisher, _fisher_targets(problem, fisher, sampler))
    if blocks is not None:  # a plain MLP: no hooks, no copy of the model
        for _, _, last, factors in blocks:
            for la, (a, D) in zip(layers, factors, strict=True):
                D2 = D.reshape(-1, la.d_out)
                A[la.module] += (a.T @ a).to(torch.float64)
                S[la.module] += (D2.T @ D2).to(torch.float64)
            if ticker is not None and last:
                ticker.tick()
        _symmetric_means(A, S, n)
        return Covariances(A, S, {la.module: 1 for la in layers}, [], list(layers), sampler.labels, n)
    model = copy.deepcopy(problem.model).eval()
    modules = dict(model.named_modules())
    names, params, fixed = functional_state(model, problem.weights, device=dev, dtype=runtime.dtype)
    dt = params[names[0]].dtype
    for layer in layers:
        params[layer.weight].requires_grad_(True)
    weights = [params[layer.weight] for layer in layers]
    acc = _cdt(dt)
    positions: dict[str, int] = {}
    called: set[str] = set()
    inputs: dict[str, list[torch.Tensor]] = {}
    grads: dict[str, dict[int, torch.Tensor]] = {}
    handles = []

    def forward_hook(layer: KFACLayer):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            k = len(inputs[layer.module])
            inputs[layer.module].append(args[0].detach())

            def save(g: torch.Tensor) -> None:
                grads[layer.module][k] = g.detach()

            if out.requires_grad:
                out.register_hook(save)

        return hook

    expected = fisher == "expected"
    k_out = 1
    if expected and n:
        with torch.no_grad():  # before the hooks: the number of outputs k
            probe = functional_call(model, (params, fixed), (_to(problem.train_x[:1], dev, dt),))
        k_out = max(1, probe[0].numel())
    step = _example_step(runtime.chunk_size, k_out) if expected else runtime.chunk_size
    steps = _steps(n, runtime.chunk_size, step)

    def reset() -> None:
        for layer in layers:
            inputs[layer.module], grads[layer.module] = [], {}

    try:
        for layer in layers:
            handles.append(modules[layer.module].register_forward_hook(forward_hook(layer)))
        with torch.enable_grad():
            for s0, s1, last in steps:
                reset()
                xs = _to(problem.train_x[s0:s1], dev, dt)
                reps = 1
                if expected:  # k pseudo-examples per example, output gradients = the columns of L
                    with torch.no_grad():
                        V = output_hessian_roots(functional_call(model, (params, fixed), (xs,)), problem.task)
                    reset()
                    reps = V.shape[1]
                    xs = xs.repeat_interleave(reps, dim=0)
                    out = functional_call(model, (params, fixed), (xs,))
                    loss = linear_output_objective(out, V.reshape(-1, V.shape[2])).sum()
                else:
                    ys = _to(problem.train_y[s0:s1], dev, dt)
                    out = functional_call(model, (params, fixed), (xs,))
                    ys = sampler(out, ys, s0, s1)
                    loss = per_example_loss(out, ys, problem.task).sum()
                if loss.requires_grad:  # False only when no tracked module ran
                    torch.autograd.grad(loss, weights, allow_unused=True)
                for layer in layers:
                    calls = inputs[layer.module]
                    if not calls:
                        continue
                    called.add(layer.module)
                    m = modules[layer.module]
                    a_parts, d_parts = [], []
                    for k, c in enumerate(calls):
                        ak = input_rows(m, c).to(acc)
                        gk = grads[layer.module].get(k)
                        if gk is None:  # this call's output did not reach the loss
                            dk = torch.zeros(*ak.shape[:2], layer.d_out, dtype=acc, device=dev)
                        else:
                            dk = output_rows(m, gk).to(acc)
                        a_parts.append(ak)
                        d_parts.append(dk)
                    a, d = torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=1)
                    if layer.bias:
                        a = with_ones_column(a)
                    T = a.shape[1]
                    positions[layer.module] = T
                    # the pseudo-examples of one example share its inputs: count them once
                    a2, d2 = a[::reps].reshape(-1, layer.d_in), d.reshape(-1, layer.d_out)
                    A[layer.module] += (a2.T @ a2).to(torch.float64) / T
                    S[layer.module] += (d2.T @ d2).to(torch.float64)
                if ticker is not None and last:
                    ticker.tick()
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
        grads.clear()
    uncalled = [la.module for la in layers if la.module not in called] if n else []
    kept = [la for la in layers if la.module not in uncalled]
    for la in layers:
        if la.module in uncalled:
            A.pop(la.module)
            S.pop(la.module)
    _symmetric_means(A, S, n)
    return Covariances(A, S, positions, uncalled, kept, sampler.labels, n)


def _symmetric_means(A: dict[str, torch.Tensor], S: dict[str, torch.Tensor], n: int) -> None:
    """Sums over the training set -> symmetrised means, in place."""
    for k in A:
        A[k] = 0.5 * (A[k] + A[k].T) / max(n, 1)
        S[k] = 0.5 * (S[k] + S[k].T) / max(n, 1)


def _to(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise NumericalError(
            f"{what} contain NaN/inf; the weights or inputs may hold very large values (use float64, "
            "standardise the features), or the damping is too small for the curvature (increase damping)",
            parameter=DAMPING_POINTER,
        )


# ----------------------------------------------------------------------------- eigendecomposition


def eigendecompose(
    cov: Covariances, ticker: Ticker | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(e_A, Q_A, e_S, Q_S)`` per layer (float64, eigenvalues ascending and clipped at 0)."""
    out = {}
    for layer in cov.layers:
        A, S = cov.A[layer.module], cov.S[layer.module]
        _check_finite(A, f"the input covariance of layer {layer.module!r}")
        _check_finite(S, f"the output-gradient covariance of layer {layer.module!r}")
        try:
            eA, QA = torch.linalg.eigh(A)
            eS, QS = torch.linalg.eigh(S)
        except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
            raise NumericalError(
                f"eigendecomposition of the factors of layer {layer.module!r} failed ({e})",
                parameter=DAMPING_POINTER,
            ) from None
        out[layer.module] = (eA.clamp(min=0), QA, eS.clamp(min=0), QS)
        if ticker is not None:
            ticker.tick()
    return out


# ----------------------------------------------------------------------------- the factors


class KFACFactors:
    """Eigenbases and eigenvalues of every tracked layer, read from (or written to) a :class:`TrainState`.

    Tensor keys: ``"{module}/QA"``, ``"{module}/eA"``, ``"{module}/QS"``,
    ``"{module}/eS"`` and, for EK-FAC, ``"{module}/lambda"`` (``d_out x d_in``).
    """

    def __init__(self, state: TrainState, device: torch.device | str | None = None) -> None:
        info = state.info
        try:
            self.layers = [KFACLayer.from_info(d) for d in info["layers"]]
            self.variant: str = info["variant"]
        except (KeyError, TypeError) as e:
            raise EstimatorError(f"the train state is not a K-FAC state (missing {e})") from None
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.info = info
        self.tensors: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            keys = ["QA", "eA", "QS", "eS"] + (["lambda"] if self.variant == "ekfac" else [])
            for k in keys:
                key = f"{layer.module}/{k}"
                if key not in state.tensors:
                    raise EstimatorError(f"the train state lacks tensor {key!r}")
                t = state.tensors[key].to(device=dev, dtype=torch.float64)
                _check_finite(t, f"the K-FAC factors ({key})")
                self.tensors[key] = t

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def eigenvalues(self, layer: KFACLayer) -> torch.Tensor:
        """``Lambda`` of the layer, ``(d_out, d_in)``: refitted (EK-FAC) or ``outer(e_S, e_A)`` (K-FAC)."""
        m = layer.module
        if self.variant == "ekfac":
            return self.tensors[f"{m}/lambda"]
        return torch.outer(self.tensors[f"{m}/eS"], self.tensors[f"{m}/eA"])

    def heuristic_damping(self) -> dict[str, float]:
        """``0.1 * mean(Lambda_l)`` per layer (1.0 where a layer's curvature is identically zero)."""
        out = {}
        for layer in self.layers:
            v = HEURISTIC_FRACTION * float(self.eigenvalues(layer).mean())
            out[layer.module] = v if v > 0 else 1.0
        return out

    def shifts(self, damping: float | None, weight_decay: float = 0.0) -> dict[str, float]:
        """The diagonal shift per layer: ``damping`` (or the heuristic when None) plus ``weight_decay``."""
        if damping is None:
            base = self.heuristic_damping()
        else:
            base = {la.module: float(damping) for la in self.layers}
        return {k: v + float(weight_decay) for k, v in base.items()}

    def rotate(self, layer: KFACLayer, M: torch.Tensor) -> torch.Tensor:
        """``Q_S^T M Q_A`` for a batch ``(b, d_out, d_in)``."""
        m = layer.module
        QA, QS = self.tensors[f"{m}/QA"].to(M.dtype), self.tensors[f"{m}/QS"].to(M.dtype)
        return QS.T @ M @ QA

    def unrotate(self, layer: KFACLayer, P: torch.Tensor) -> torch.Tensor:
        """``Q_S P Q_A^T`` (inverse of :meth:`rotate`)."""
        m = layer.module
        QA, QS = self.tensors[f"{m}/QA"].to(P.dtype), self.tensors[f"{m}/QS"].to(P.dtype)
        return QS @ P @ QA.T

    def precondition(self, G: torch.Tensor, shifts: dict[str, float]) -> torch.Tensor:
        """``(G_kfac + diag(shift_l) I)^-1 g`` for flat gradients ``(b, p_tracked)``, layer by layer."""
        return flatten_layer_matrices(self.precondition_layers(G, shifts), self.layers)

    def precondition_layers(self, G: torch.Tensor, shifts: dict[str, float]) -> list[torch.Tensor]:
        """:meth:`precondition` as per-layer gradient matrices ``(b, d_out, d_in)``."""
        out = []
        for layer, M in zip(self.layers, layer_matrices(G, self.layers), strict=True):
            denom = (self.eigenvalues(layer) + shifts[layer.module]).to(M.dtype)
            out.append(self.unrotate(layer, self.rotate(layer, M) / denom))
        return out

    def quadratic_factors(self, factors: list[tuple[torch.Tensor, torch.Tensor]], shifts: dict[str, float]):
        """:meth:`quadratic` for rank-one layer gradients ``D_i a~_i^T`` given as ``(A~, D)`` per layer
        (:func:`~app.estimators.gradients.gradient_factors`): the rotated gradient is
        ``(Q_S^T D_i)(Q_A^T a~_i)^T``, so ``sum (Q_S^T D_i)^2 / Lambda (Q_A^T a~_i)^2`` per row."""
        total = None
        for layer, (A, D) in zip(self.layers, factors, strict=True):
            m = layer.module
            QA, QS = self.tensors[f"{m}/QA"].to(A.dtype), self.tensors[f"{m}/QS"].to(A.dtype)
            inv = 1.0 / (self.eigenvalues(layer) + shifts[m]).to(A.dtype)
            term = (((D @ QS).square_() @ inv) * (A @ QA).square_()).sum(dim=1)
            total = term if total is None else total + term
        return total

    def quadratic(self, G: torch.Tensor, shifts: dict[str, float]) -> torch.Tensor:
        """``g^T (G_kfac + diag(shift_l) I)^-1 g`` for each row of flat gradients ``(b, p_tracked)``."""
        total = torch.zeros(G.shape[0], dtype=G.dtype, device=G.device)
        for layer, M in zip(self.layers, layer_matrices(G, self.layers), strict=True):
            denom = (self.eigenvalues(layer) + shifts[layer.module]).to(M.dtype)
            total += (self.rotate(layer, M) ** 2 / denom).sum(dim=(1, 2))
        return total

    def quadratic_rows(
        self, rows: list[tuple[torch.Tensor, torch.Tensor]], shifts: dict[str, float]
    ) -> torch.Tensor:
        """:meth:`quadratic` for layer gradients given as rows ``(A~, D)`` per layer, ``(b, T, d_in)`` with
        the bias column when the layer has one and ``(b, T, d_out)``: each example's rotated gradient
        comes from its rows (:func:`rotated_gradients`), never from the formed gradient when that
        costs more."""
        total = None
        for layer, (A, D) in zip(self.layers, rows, strict=True):
            m = layer.module
            R = rotated_gradients(
                A, D, self.tensors[f"{m}/QA"].to(A.dtype), self.tensors[f"{m}/QS"].to(A.dtype)
            )
            part = (R.square_() / (self.eigenvalues(layer) + shifts[m]).to(R.dtype)).sum(dim=(1, 2))
            total = part if total is None else total + part
        return total

    def dense_block(self, layer: KFACLayer | str) -> torch.Tensor:
        """The explicit ``p_l x p_l`` curvature block ``(Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T``
        in the row-major order of the layer's gradient matrix (for tests and small layers only)."""
        if isinstance(layer, str):
            layer = next(la for la in self.layers if la.module == layer)
        m = layer.module
        Q = torch.kron(self.tensors[f"{m}/QS"], self.tensors[f"{m}/QA"])
        return Q @ torch.diag(self.eigenvalues(layer).reshape(-1)) @ Q.T


# ----------------------------------------------------------------------------- pass 2 and the pipeline


def _lambda_sources(
    problem: InfluenceProblem, runtime: Runtime, labels: torch.Tensor | None, expected: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any, int]]:
    """``(x, y, objective, rows per chunk)`` blocks whose per-example gradients make the Fisher of
    pass 2: the whole training set with its (or the sampled) labels, or (``expected``) blocks of
    ``chunk_size`` examples expanded into their ``k`` pseudo-examples each (inputs repeated, targets
    the columns of ``L``)."""
    if not expected:
        y = problem.train_y if labels is None else labels
        yield problem.train_x, y, train_objective(problem.task), runtime.chunk_size
        return
    dev = torch.device(runtime.device)
    model = copy.deepcopy(problem.model).eval()
    _, params, fixed = functional_state(model, problem.weights, device=dev, dtype=runtime.dtype)
    dt = next(iter(params.values())).dtype
    for start in range(0, problem.n_train, runtime.chunk_size):
        x = problem.train_x[start : start + runtime.chunk_size]
        with torch.no_grad():
            V = output_hessian_roots(
                functional_call(model, (params, fixed), (_to(x, dev, dt),)), problem.task
            )
        k = V.shape[1]
        rows = EXPECTED_ROWS_FACTOR * runtime.chunk_size
        yield x.repeat_interleave(k, dim=0), V.reshape(-1, V.shape[2]).cpu(), linear_output_objective, rows


def rotated_gradients(A: torch.Tensor, D: torch.Tensor, QA: torch.Tensor, QS: torch.Tensor) -> torch.Tensor:
    """``Q_S^T D_i^T A_i Q_A`` ``(b, d_out, d_in)`` for a chunk of examples whose layer gradients are
    given as rows, ``A`` ``(b, T, d_in)`` and ``D`` ``(b, T, d_out)``. The rows are rotated first,
    ``(D_i Q_S)^T (A_i Q_A)``, when that is cheaper than rotating the formed gradient: for a
    convolution with few output locations ``T`` and many input channels (ResNet-9's 512-channel
    4 x 4 layers: 32x fewer operations), never for a wide map of narrow channels."""
    T, d_in, d_out = A.shape[1], A.shape[2], D.shape[2]
    if T * (d_in * d_in + d_out * d_out) < d_in * d_out * (d_in + d_out):
        return torch.bmm((D @ QS).transpose(1, 2), A @ QA)
    return QS.T @ torch.bmm(D.transpose(1, 2), A) @ QA


def _rotated_squares(A: torch.Tensor, D: torch.Tensor, QA: torch.Tensor, QS: torch.Tensor) -> torch.Tensor:
    """``sum_i (Q_S^T D_i^T A_i Q_A)^2`` over the chunk (float64, ``d_out x d_in``)."""
    return rotated_gradients(A, D, QA, QS).square_().sum(dim=0).to(torch.float64)


def fit_lambda(
    problem: InfluenceProblem,
    layers: list[KFACLayer],
    eig: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    runtime: Runtime,
    *,
    labels: torch.Tensor | None = None,
    expected: bool = False,
    ticker: Ticker | None = None,
) -> dict[str, torch.Tensor]:
    """Pass 2 (EK-FAC): ``Lambda_l = (1/n) sum_i (Q_S^T Gm_i Q_A)^2`` with per-example layer gradients
    from the shared core (with the sampled ``labels`` for the true Fisher; summed over each example's
    pseudo-examples for the ``expected`` one). float64 result."""
    dev = torch.device(runtime.device)
    cdt = _cdt(runtime.dtype)
    names = parameter_names(layers)
    Qs = {m: (QA.to(cdt), QS.to(cdt)) for m, (_, QA, _, QS) in eig.items()}

    def zeros() -> dict[str, torch.Tensor]:
        return {la.module: torch.zeros(la.d_out, la.d_in, dtype=torch.float64, device=dev) for la in layers}

    def factored_pass(x, y, objective, rows, lam) -> bool:
        """The rank-one route; False (nothing added) when the model does not allow it."""
        # a linear layer on (b, d) rows has rank-one per-example gradients Gm_i = delta_i a~_i^T, so
        # Q_S^T Gm_i Q_A = (Q_S^T delta_i)(Q_A^T a~_i)^T and Lambda_l = (1/n) (D Q_S)^2^T (A~ Q_A)^2
        factored = gradient_factors(
            problem.model, problem.weights, x, y, objective, chunk_size=rows,
            device=runtime.device, dtype=runtime.dtype, what="training examples", names=names,
        )  # fmt: skip
        if factored is None:
            return False
        part = zeros()
        for _, _, factors in factored:
            if len(factors) != len(layers) or any(
                A.shape[1] != la.d_in or D.shape[1] != la.d_out
                for la, (A, D) in zip(layers, factors, strict=True)
            ):
                return False
            for layer, (A, D) in zip(layers, factors, strict=True):
                QA, QS = Qs[layer.module]
                Dr, Ar = D.to(cdt) @ QS, A.to(cdt) @ QA
                part[layer.module] += ((Dr * Dr).T @ (Ar * Ar)).to(torch.float64)
        for k, v in part.items():
            lam[k] += v
        return True

    lam = zeros()
    targets = _fisher_targets(
        problem, "expected" if expected else "empirical", problem.train_y if labels is None else labels
    )
    blocks = _chain_blocks(problem, layers, runtime, "expected" if expected else "empirical", targets)
    if blocks is not None:  # Lambda_l = (1/n) sum_i (sum_r (D_ir Q_S)^2)^T (a~_i Q_A)^2
        for _, _, last, factors in blocks:
            for layer, (a, D) in zip(layers, factors, strict=True):
                QA, QS = Qs[layer.module]
                Dr = (D @ QS).square_().sum(dim=1)
                lam[layer.module] += (Dr.T @ (a @ QA).square_()).to(torch.float64)
            if ticker is not None and last:
                ticker.tick()
        return {k: v / problem.n_train for k, v in lam.items()}

    def layered_pass(x, y, objective, rows, lam) -> bool:
        """The route of nets of linear and convolution layers: each example's layer gradient stays as
        its rows, ``D_i^T A~_i`` (:func:`per_sample_layer_rows`); False (nothing added) when the model
        does not allow it."""
        chunks = per_sample_layer_rows(
            problem.model, problem.weights, x, y, objective, names=names, chunk_size=rows,
            device=runtime.device, dtype=runtime.dtype, what="training examples",
        )  # fmt: skip
        if chunks is None:
            return False
        part = zeros()
        try:
            for _, _, per_layer in chunks:
                for layer in layers:
                    A, D = per_layer[layer.module]
                    A = with_ones_column(A) if layer.bias else A
                    part[layer.module] += _rotated_squares(A.to(cdt), D.to(cdt), *Qs[layer.module])
        except Unsupported:
            return False
        for k, v in part.items():
            lam[k] += v
        return True

    factored_ok = layered_ok = True
    for x, y, objective, rows in _lambda_sources(problem, runtime, labels, expected):
        if factored_ok:
            factored_ok = factored_pass(x, y, objective, rows, lam)
        # formed per-example (layer) gradients are as large as a chunk's: never more rows than a chunk
        # (the expected Fisher's pseudo-examples come in blocks of up to EXPECTED_ROWS_FACTOR chunks)
        rows = min(rows, runtime.chunk_size)
        if not factored_ok and layered_ok:
            layered_ok = layered_pass(x, y, objective, rows, lam)
        if not factored_ok and not layered_ok:
            for _, _, G in per_sample_gradients(
                problem.model, problem.weights, x, y, objective, chunk_size=rows,
                device=runtime.device, dtype=runtime.dtype, what="training examples", names=names,
            ):  # fmt: skip
                for layer, M in zip(layers, layer_matrices(G.to(cdt), layers), strict=True):
                    QA, QS = Qs[layer.module]
                    lam[layer.module] += ((QS.T @ M @ QA) ** 2).sum(dim=0).to(torch.float64)
        if ticker is not None:
            ticker.tick(n_chunks(int(x.shape[0]), runtime.chunk_size) if not expected else 1)
    n = max(problem.n_train, 1)
    return {k: v / n for k, v in lam.items()}


def fit_factors(
    problem: InfluenceProblem,
    runtime: Runtime | None = None,
    *,
    layers: list[str] | None = None,
    fisher: FisherType = "empirical",
    seed: int = 0,
    ekfac: bool = True,
) -> TrainState:
    """Covariances, eigendecomposition and (EK-FAC) the refitted eigenvalues, as a :class:`TrainState`.

    Progress phases: ``"covariance"`` (chunks), ``"eigendecomposition"`` (layers),
    ``"lambda"`` (chunks, EK-FAC only). ``info`` holds ``variant``, ``fisher``,
    ``seed``, ``n``, ``layers`` (see :class:`KFACLayer`), ``positions``,
    ``ignored_parameters``, ``skipped_modules`` and ``damping_heuristic`` (what
    ``damping=None`` resolves to, per layer). Tensors are on the CPU in float64.
    """
    runtime = runtime or Runtime()
    n = problem.n_train
    if n == 0:
        raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
    tracked, skipped = tracked_layers(problem.model, layers)
    ct = Ticker(runtime, "covariance", n_chunks(n, runtime.chunk_size))
    cov = covariance_factors(problem, tracked, runtime, fisher=fisher, seed=seed, ticker=ct)
    for m in cov.uncalled:
        skipped[m or "<root>"] = "its forward never ran (modules must be called directly in forward)"
    if not cov.layers:
        raise EstimatorError(
            f"none of the tracked modules ran in the forward pass: {cov.uncalled}", parameter=LAYERS_POINTER
        )
    et = Ticker(runtime, "eigendecomposition", len(cov.layers))
    eig = eigendecompose(cov, et)
    tensors: dict[str, torch.Tensor] = {}
    for m, (eA, QA, eS, QS) in eig.items():
        tensors.update({f"{m}/eA": eA, f"{m}/QA": QA, f"{m}/eS": eS, f"{m}/QS": QS})
    if ekfac:
        lt = Ticker(runtime, "lambda", n_chunks(n, runtime.chunk_size))
        lam = fit_lambda(
            problem, cov.layers, eig, runtime, labels=cov.labels, expected=fisher == "expected", ticker=lt
        )
        for m, v in lam.items():
            _check_finite(v, f"the EK-FAC eigenvalues of layer {m!r}")
            tensors[f"{m}/lambda"] = v
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    state = TrainState(
        tensors=tensors,
        info={
            "variant": "ekfac" if ekfac else "kfac",
            "fisher": fisher,
            "seed": int(seed),
            "n": n,
            "layers": [la.to_info() for la in cov.layers],
            "positions": {m: int(t) for m, t in cov.positions.items()},
            "ignored_parameters": ignored_parameters(problem.model, cov.layers),
            "skipped_modules": skipped,
        },
    )
    state.info["damping_heuristic"] = KFACFactors(state).heuristic_damping()
    return state


__all__ = [
    "DAMPING_POINTER",
    "HEURISTIC_FRACTION",
    "Covariances",
    "FisherLabels",
    "FisherType",
    "KFACFactors",
    "KFACLayer",
    "covariance_factors",
    "eigendecompose",
    "fit_factors",
    "fit_lambda",
    "flatten_layer_matrices",
    "ignored_parameters",
    "layer_matrices",
    "linear_output_objective",
    "output_hessian_roots",
    "parameter_names",
    "tracked_layers",
]
