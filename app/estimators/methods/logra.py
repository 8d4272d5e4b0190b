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

With ``F~ = (1/n) sum_i g~_i g~_i^T`` the empirical Fisher in the projected space,

    scores[j, i] = (1/n) g~'_j^T (F~ + lambda I)^-1 g~_i,
    self_influence[i] = (1/n) g~_i^T (F~ + lambda I)^-1 g~_i,

where ``g~'`` is the projected gradient of the query objective (loss, or minus
the margin), and ``lambda = damping * mean(diag F~)`` (relative damping; absolute
``damping`` if ``F~`` is zero). With identity projections this is the
Fisher-preconditioned influence function restricted to the selected layers.

Only ``nn.Linear`` modules are supported; ``layers`` selects module-name
prefixes (``"last"`` = the last linear layer), default all trainable linear
layers. A factor's ``k`` at least the layer dimension, or ``projection =
"identity"``, uses that factor unprojected. The model must treat examples
independently along the leading dimension (eval mode: BatchNorm uses running
statistics). Train-side state (:meth:`fit`): the projected training gradients
(``n x D``, written chunk by chunk and memory-mapped beyond the runtime's memory budget, see
:mod:`..features`; scoring reads them in float64 row blocks) and the Cholesky factor of ``F~ + lambda I``.
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
    layers: list[str] | None = field(
        default=None,
        metadata={
            "description": "module name prefixes of the nn.Linear layers to use ('last' = the last linear "
            "layer); null: all trainable linear layers"
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
            parts = []
            for name, mod, kron in layers:
                g = torch.zeros(b, kron.k_out, kron.k_in, device=dev, dtype=dt)
                for a, _ in records[name]:
                    d = next(di)
                    if d is None:
                        continue
                    a = a.reshape(b, -1, mod.in_features)
                    if mod.bias is not None:
                        a = torch.cat([a, torch.ones(*a.shape[:2], 1, device=dev, dtype=a.dtype)], dim=2)
                    g = g + kron.project_factors(a, d.reshape(b, -1, mod.out_features))
                parts.append(g.reshape(b, -1))
            G = torch.cat(parts, dim=1)
            if not bool(torch.isfinite(G).all()):
                raise NumericalError(
                    f"projected gradients of examples {start}..{stop - 1} contain NaN/inf; the weights may "
                    "have diverged or the inputs hold very large values"
                )
            yield start, stop, G.detach()
    finally:
        for h in handles:
            h.remove()


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
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        layers, D = self._layers(problem, p, runtime)
        dev = torch.device(runtime.device)
        tt = Ticker(runtime, "train_gradients", n_chunks(n, runtime.chunk_size))
        writer = FeatureWriter.for_runtime(runtime, n, D)
        Fsum = torch.zeros(D, D, dtype=torch.float64, device=dev)
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
            G64 = G.to(torch.float64)
            Fsum += G64.T @ G64
            tt.tick()
        Fisher = Fsum / n
        scale = float(Fisher.diagonal().mean())
        lam = p.damping * scale if scale > 0 else p.damping
        A = Fisher.clone()
        A.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise NumericalError(
                f"the projected Fisher plus damping is not positive definite (damping={p.damping:g}, "
                f"n={n}, D={D}); increase damping (e.g. to 1e-3) or lower k_in/k_out",
                parameter="/method/params/damping",
            )
        return TrainState(
            tensors={"train_features": writer.finish(), "fisher_cholesky": L.cpu()},
            info={
                "n_train": n,
                "dim": D,
                "lambda": lam,
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
            state = self.fit(problem, p, runtime)
        if state.info.get("n_train") != problem.n_train or state.info.get("dim") != D:
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
        features = state.tensors["train_features"]

        def blocks():  # float64 row blocks of the shard's (possibly memory-mapped) training features
            return row_chunks(features, lo, hi, budget=runtime.memory_budget_bytes, device=dev)

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
            S = torch.cholesky_solve(Qg.T, L)  # D x m
            scores = np.empty((m, hi - lo), dtype=dtype)
            for s, e, Gs in blocks():
                scores[:, s - lo : e - lo] = ((Gs @ S).T / n).cpu().numpy()
        if want_self_influence:
            self_inf = np.empty(hi - lo, dtype=dtype)
            for s, e, Gs in blocks():
                Z = torch.linalg.solve_triangular(L, Gs.T, upper=False)
                self_inf[s - lo : e - lo] = ((Z * Z).sum(dim=0) / n).cpu().numpy()
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
                layers=state.info["layers"],
            ),
        )
