"""LoGra: influence functions on Kronecker-projected linear-layer gradients (ESTIMATORS.md 2.21).

Choe et al., "What is Your Data Worth to GPT?", 2024.

For a linear layer ``out = W a + b`` the per-example gradient of a loss is
``sum_t delta_t a~_t^T`` (``d_out x (d_in + 1)``; ``a~ = [a; 1]`` folds the bias in,
``delta = dL/d out``, the sum runs over positions/tokens when the layer is
applied to a sequence). LoGra projects it with two small seeded matrices,
``P_in`` (``k_in x (d_in + 1)``) and ``P_out`` (``k_out x d_out``):

    g~ = P_out (sum_t delta_t a~_t^T) P_in^T = sum_t (P_out delta_t)(P_in a~_t)^T
       = (P_in (x) P_out) vec(grad W~)     (column-major vec),

computed from a forward hook (``a``) and the gradient with respect to the layer
output (``delta``, one batched backward pass per chunk) without ever forming the
per-example ``d_out x d_in`` gradient. The projected gradients of all selected
layers are concatenated (``D = sum_l k_in,l k_out,l``; stored row-major per layer).

With ``F~ = (1/n) sum_i g~_i g~_i^T`` the empirical Fisher in the projected space (block-diagonal
over the selected layers by default, ``blocks="layer"``, as in LoGra/logix and dattri; ``blocks="full"``
keeps the cross-layer blocks) and
``C~ = F~ + weight_decay P P^T`` the projected curvature of the training objective
``mean_i L(z_i) + weight_decay/2 ||theta||^2`` (``P P^T`` is block-diagonal over layers,
``(P_out P_out^T) (x) (P_in P_in^T)``; it is the identity for unprojected factors),

    scores[j, i] = (1/n) g~'_j^T (C~ + lambda I)^-1 g~_i,
    self_influence[i] = (1/n) g~_i^T (C~ + lambda I)^-1 g~_i,

where ``g~'`` is the projected gradient of the query objective (loss, or minus
the margin), and ``lambda = damping * mean(diag F~)`` (relative damping, one value for all
layers; absolute ``damping`` if ``F~`` is zero). With identity projections and ``blocks="full"``
this is the Fisher-preconditioned influence function (Fisher + weight decay) restricted to the
selected layers.
The weight-decay term matters: without it (dattri's LoGra, eFIM with relative damping only) the
projected empirical Fisher is a poor curvature (bench/estimators.py: LOO Pearson 0.47 -> 0.61 on
the L2 logistic regression, LDS 0.21 -> 0.44 on the MLP).

Only ``nn.Linear`` modules are supported; ``layers`` selects module-name
prefixes (``"last"`` = the last linear layer), default all trainable linear
layers. Every other trainable parameter (convolutions, BatchNorm affine parameters, embeddings,
unselected linear layers) gets no projected gradient and does not contribute to the scores; the
metadata lists them as ``ignored_parameters`` (as ``ekfac`` does; :func:`ignored_parameters`) next to
``n_tracked_parameters``. A factor's ``k`` at least the layer dimension, or ``projection =
"identity"``, uses that factor unprojected. The model must treat examples
independently along the leading dimension (eval mode: BatchNorm uses running
statistics). Train-side state (:meth:`fit`): the projected training gradients
(``n x D``, written chunk by chunk and memory-mapped beyond the runtime's memory budget, see
:mod:`..features`; scoring reads them in row blocks, in float32 unless the runtime is float64) and the
(block-diagonal) Cholesky factor of ``C~ + lambda I``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
from annotated_types import Ge
from torch import nn
from torch.func import functional_call

from ..base import Attribution, Estimator, EstimatorError, NumericalError, Runtime, TrainState, register
from ..features import FeatureWriter, row_chunks
from ..gradients import (
    Objective,
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    functional_state,
    metadata,
    n_chunks,
    numpy_dtype,
    query_objective_fn,
    train_objective,
    validate_problem,
)
from ..projection import KroneckerProjector, derive_seed

MAX_DIM = 8192
"""Largest total projected dimension D (the Fisher is D x D in float64)."""


@dataclass
class LoGraParams:
    """LoGra: Fisher influence on Kronecker-projected gradients of linear layers (Choe et al. 2024)."""

    k_in: Annotated[int, Ge(1)] = field(
        default=16,
        metadata={"description": "projected input dimension per layer (capped at d_in + 1, incl. the bias)"},
    )
    k_out: Annotated[int, Ge(1)] = field(
        default=16, metadata={"description": "projected output dimension per layer (capped at d_out)"}
    )
    projection: Literal["gaussian", "rademacher", "srht", "identity"] = field(
        default="gaussian",
        metadata={"description": "kind of the factor projections; 'identity' = no projection"},
    )
    damping: Annotated[float, Ge(0)] = field(
        default=1e-3,
        metadata={
            "description": "relative damping: lambda = damping * mean diagonal of the projected Fisher"
        },
    )
    blocks: Literal["layer", "full"] = field(
        default="layer",
        metadata={
            "description": "'layer': the projected curvature is block-diagonal over the selected layers "
            "(as in LoGra/logix and dattri; sum_l (k_in k_out)^2 work); 'full': one dense D x D matrix"
        },
    )
    layers: list[str] | None = field(
        default=None,
        metadata={
            "description": "module name prefixes of the nn.Linear layers to use ('last' = the last linear "
            "layer); null: all trainable linear layers. Other parameters (convolutions, BatchNorm, ...) "
            "are ignored and listed in the metadata's ignored_parameters"
        },
    )
    seed: Annotated[int, Ge(0)] = field(default=0, metadata={"description": "seed of the projections"})


def linear_layers(model: nn.Module, layers: list[str] | None) -> list[tuple[str, nn.Linear]]:
    """The trainable ``nn.Linear`` modules selected by module-name prefixes (``"last"``: the last one)."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod.weight.requires_grad
    ]
    if not found:
        raise EstimatorError("logra needs a model with trainable nn.Linear layers", parameter="/method/name")
    if layers is None:
        return found
    prefixes = [found[-1][0] if w == "last" else w for w in layers]
    chosen = [(n, m) for n, m in found if any(n == w or n.startswith(w + ".") for w in prefixes)]
    if not chosen:
        raise EstimatorError(
            f"no nn.Linear layers under {layers}; the linear layers are {[n for n, _ in found]}",
            parameter="/method/params/layers",
        )
    return chosen


def _layer_parameter_names(name: str, mod: nn.Linear) -> list[str]:
    prefix = f"{name}." if name else ""
    return [f"{prefix}weight"] + ([f"{prefix}bias"] if mod.bias is not None else [])


def ignored_parameters(model: nn.Module, layers: list[tuple]) -> list[str]:
    """Trainable parameters outside the selected linear layers (``layers``: ``(name, module, ...)``
    tuples, e.g. from :func:`layer_projectors`), in ``model.named_parameters()`` order: LoGra projects
    no gradient for them, so they do not contribute to the scores."""
    kept = {n for name, mod, *_ in layers for n in _layer_parameter_names(name, mod)}
    return [n for n, q in model.named_parameters() if q.requires_grad and n not in kept]


def layer_projectors(
    model: nn.Module, p: LoGraParams, device: torch.device | str, dtype: torch.dtype
) -> list[tuple[str, nn.Linear, KroneckerProjector]]:
    """Selected linear layers with their Kronecker projectors (seeded by ``seed`` and the layer name)."""
    out = []
    for name, mod in linear_layers(model, p.layers):
        d_in = mod.in_features + (1 if mod.bias is not None else 0)
        kron = KroneckerProjector(
            d_in,
            mod.out_features,
            p.k_in,
            p.k_out,
            kind=p.projection,
            seed=derive_seed(p.seed, zlib.crc32(name.encode())),
            device=device,
            dtype=dtype,
        )
        out.append((name, mod, kron))
    return out


def projected_gradients(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    layers: list[tuple[str, nn.Linear, KroneckerProjector]],
    *,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, G~)``: per-example projected gradients of ``objective``, ``(b, D)``.

    One batched forward/backward per chunk at ``state`` (eval mode); hooks record
    each selected layer's input ``a`` and output, ``autograd.grad`` of the summed
    objective gives ``delta = d objective_i / d out_i`` per example, and
    :meth:`KroneckerProjector.project_factors` forms ``sum_t (P_out delta_t)(P_in a~_t)^T``.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    model.eval()
    names, params, fixed = functional_state(model, state, device=dev, dtype=dtype)
    dt = params[names[0]].dtype
    module_names = {id(mod): name for name, mod, _ in layers}
    D = sum(k.dim for _, _, k in layers)
    for name, _, _ in layers:  # the selected layers' outputs must be part of the graph
        params[f"{name}.weight" if name else "weight"].requires_grad_(True)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name, _, _ in layers}

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        records[module_names[id(mod)]].append((inputs[0].detach(), output))

    handles = [mod.register_forward_hook(hook) for _, mod, _ in layers]
    try:
        n = int(x.shape[0])
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            b = stop - start
            for r in records.values():
                r.clear()
            xs, ys = x[start:stop], y[start:stop]
            xs = xs.to(dev, dt) if xs.is_floating_point() else xs.to(dev)
            ys = ys.to(dev, dt) if ys.is_floating_point() else ys.to(dev)
            with torch.enable_grad():
                out = functional_call(model, (params, fixed), (xs,))
                total = objective(out, ys).sum()
                outs = [o for name, _, _ in layers for _, o in records[name]]
                deltas = torch.autograd.grad(total, outs, allow_unused=True) if outs else ()
            di = iter(deltas)
            G = torch.empty(b, D, device=dev, dtype=dt)  # each layer's block is written in place
            col = 0
            for name, mod, kron in layers:
                g = G[:, col : col + kron.dim].view(b, kron.k_out, kron.k_in)
                col += kron.dim
                written = False
                for a, _ in records[name]:
                    d = next(di)
                    if d is None:
                        continue
                    a = a.reshape(b, -1, mod.in_features)
                    if mod.bias is not None:
                        a = torch.cat([a, torch.ones(*a.shape[:2], 1, device=dev, dtype=a.dtype)], dim=2)
                    part = kron.project_factors(a, d.reshape(b, -1, mod.out_features))
                    if written:  # the layer ran more than once in the forward pass: sum the calls
                        g += part
                    else:
                        g.copy_(part)
                        written = True
                if not written:  # the layer did not reach the objective
                    g.zero_()
            # NaN/inf propagate into the sum: one reduction instead of an elementwise test per chunk
            if not bool(torch.isfinite(G.sum())) and not bool(torch.isfinite(G).all()):
                raise NumericalError(
                    f"projected gradients of examples {start}..{stop - 1} contain NaN/inf; the weights may "
                    "have diverged or the inputs hold very large values"
                )
            yield start, stop, G.detach()
    finally:
        for h in handles:
            h.remove()


def projected_identity(projectors: list[KroneckerProjector], device) -> torch.Tensor:
    """``P P^T`` (``D x D``, float64): the identity of parameter space seen through the projections,
    block-diagonal over layers with blocks ``(P_out P_out^T) (x) (P_in P_in^T)`` (row-major ``(k_out, k_in)``
    layout of the projected gradients). The weight-decay term ``weight_decay * I`` of the objective's
    curvature becomes ``weight_decay * P P^T`` in the projected space."""
    blocks = []
    for k in projectors:
        Pi = k.in_matrix().to(device, torch.float64)
        Po = k.out_matrix().to(device, torch.float64)
        blocks.append(torch.kron(Po @ Po.T, Pi @ Pi.T))
    return blocks[0] if len(blocks) == 1 else torch.block_diag(*blocks)


@register
class LoGra(Estimator):
    name = "logra"
    summary = "LoGra: Fisher influence on Kronecker-projected linear-layer gradients (Choe et al. 2024)"
    Params = LoGraParams

    def _layers(self, problem, p: LoGraParams, runtime: Runtime):
        layers = layer_projectors(problem.model, p, runtime.device, runtime.dtype)
        D = sum(k.dim for _, _, k in layers)
        if D > MAX_DIM:
            raise EstimatorError(
                f"the projected dimension sum_l k_in*k_out = {D} exceeds {MAX_DIM} (the Fisher is D x D); "
                "lower k_in/k_out or select fewer layers",
                parameter="/method/params/k_in",
            )
        return layers, D

    def _stream(self, problem, st, x, y, objective, layers, runtime):
        return projected_gradients(
            problem.model,
            st,
            x,
            y,
            objective,
            layers,
            chunk_size=runtime.chunk_size,
            device=runtime.device,
            dtype=runtime.dtype,
        )

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """Projected training gradients (``n x D``) and the Cholesky factor of the damped projected Fisher."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        return self._fit(problem, p, runtime, *self._layers(problem, p, runtime))

    def _fit(self, problem, p: LoGraParams, runtime: Runtime, layers, D: int) -> TrainState:
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        dev = torch.device(runtime.device)
        tt = Ticker(runtime, "train_gradients", n_chunks(n, runtime.chunk_size))
        writer = FeatureWriter.for_runtime(runtime, n, D)
        # column ranges of the curvature's diagonal blocks: one per layer, or one for all of them
        spans, col = [], 0
        for _, _, k in layers:
            spans.append((col, col + k.dim))
            col += k.dim
        if p.blocks == "full":
            spans = [(0, D)]
        Fsum = [torch.zeros(e - s, e - s, dtype=torch.float64, device=dev) for s, e in spans]
        for _, _, G in self._stream(
            problem,
            problem.weights,
            problem.train_x,
            problem.train_y,
            train_objective(problem.task),
            layers,
            runtime,
        ):
            writer.write(G)
            tt.tick()
        features = writer.finish()
        # the Gram over row blocks of the written features (one block when they fit 64 MiB): few large
        # products in the features' dtype (float32: half the float64 time), each summed in float64
        wdt = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
        for _, _, Gc in row_chunks(features, budget=runtime.memory_budget_bytes, device=dev, dtype=wdt):
            for F_b, (s, e) in zip(Fsum, spans, strict=True):
                F_b += (Gc[:, s:e].T @ Gc[:, s:e]).to(torch.float64)
        curv = [F_b.div_(n) for F_b in Fsum]
        scale = float(sum(float(B.diagonal().sum()) for B in curv)) / D
        lam = p.damping * scale if scale > 0 else p.damping
        if problem.weight_decay:
            wd = float(problem.weight_decay)
            if p.blocks == "full":
                curv[0] += wd * projected_identity([k for _, _, k in layers], dev)
            else:
                for B, (_, _, k) in zip(curv, layers, strict=True):
                    B += wd * projected_identity([k], dev)
        factors, info = [], 0
        for B in curv:
            B.diagonal().add_(lam)
            Lb, ib = torch.linalg.cholesky_ex(B)
            factors.append(Lb)
            info = max(info, int(ib))
        L = factors[0] if len(factors) == 1 else torch.block_diag(*factors)  # solves work block by block
        if int(info) != 0:
            raise NumericalError(
                f"the projected Fisher plus damping is not positive definite (damping={p.damping:g}, "
                f"n={n}, D={D}); increase damping (e.g. to 1e-3) or lower k_in/k_out",
                parameter="/method/params/damping",
            )
        return TrainState(
            tensors={"train_features": features, "fisher_cholesky": L.cpu()},
            info={
                "n_train": n,
                "dim": D,
                "blocks": p.blocks,
                "block_spans": [list(sp) for sp in spans],
                "lambda": lam,
                "weight_decay": float(problem.weight_decay),
                "layers": [
                    {"name": name, "k_in": k.k_in, "k_out": k.k_out, "d_in": k.d_in, "d_out": k.d_out}
                    for name, _, k in layers
                ],
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
        layers, D = self._layers(problem, p, runtime)
        if state is None:
            state = self._fit(problem, p, runtime, layers, D)
        if (
            state.info.get("n_train") != problem.n_train
            or state.info.get("dim") != D
            or state.info.get("blocks", "full") != p.blocks
        ):
            raise EstimatorError(
                "the cached LoGra state does not match this problem's training set or layers",
                parameter="/method/params",
            )
        dev = torch.device(runtime.device)
        n = problem.n_train
        lo, hi = column_range(problem, train_range)
        m = problem.n_query
        dtype = numpy_dtype(runtime.dtype)
        L = state.tensors["fisher_cholesky"].to(dev, torch.float64)
        spans = [tuple(sp) for sp in state.info.get("block_spans", [(0, D)])]
        features = state.tensors["train_features"]

        def blocks(dt=torch.float64):  # row blocks of the shard's (possibly memory-mapped) training features
            return row_chunks(features, lo, hi, budget=runtime.memory_budget_bytes, device=dev, dtype=dt)

        scores = self_inf = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            rows = []
            for _, _, G in self._stream(
                problem,
                problem.weights,
                problem.query_x,
                problem.query_y,
                query_objective_fn(problem.task, problem.measurement),
                layers,
                runtime,
            ):
                rows.append(G.to(torch.float64))
                qt.tick()
            Qg = torch.cat(rows) if rows else torch.zeros(0, D, dtype=torch.float64, device=dev)
            # D x m, float64; the product with the features runs in the features' dtype (the scores' dtype)
            wdt = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
            S = torch.empty(D, Qg.shape[0], dtype=torch.float64, device=dev)
            for s, e in spans:  # L is block-diagonal: solve block by block
                S[s:e] = torch.cholesky_solve(Qg.T[s:e], L[s:e, s:e])
            S = (S / n).to(wdt)
            scores = np.empty((m, hi - lo), dtype=dtype)
            for s, e, Gs in blocks(wdt):
                scores[:, s - lo : e - lo] = (S.T @ Gs.T).cpu().numpy()
        if want_self_influence:
            self_inf = np.empty(hi - lo, dtype=dtype)
            for s, e, Gs in blocks():
                acc = torch.zeros(e - s, dtype=torch.float64, device=dev)
                for a, b in spans:
                    Z = torch.linalg.solve_triangular(L[a:b, a:b], Gs.T[a:b], upper=False)
                    acc += (Z * Z).sum(dim=0)
                self_inf[s - lo : e - lo] = (acc / n).cpu().numpy()
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n",
                damping=p.damping,
                damping_absolute=state.info["lambda"],
                projected_dim=D,
                curvature_blocks=p.blocks,
                weight_decay=state.info.get("weight_decay", 0.0),
                layers=state.info["layers"],
                n_tracked_parameters=sum(
                    q.numel() for _, mod, _ in layers for q in mod.parameters() if q.requires_grad
                ),
                ignored_parameters=ignored_parameters(problem.model, layers),
            ),
        )
