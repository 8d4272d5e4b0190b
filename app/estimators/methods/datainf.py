"""DataInf (Kwon et al., ICLR 2024; ESTIMATORS.md 2.15): closed-form per-layer inverse of a damped GN.

Layers are the trainable parameter tensors grouped by the module that owns them
(``fc.weight`` + ``fc.bias``), restricted to ``layers`` (module prefixes, see
:func:`app.estimators.gradients.select_parameters`; ``"last"`` = output layer).
For layer ``l`` with per-example gradient blocks ``g_il`` (length ``d_l``):

* ``lambda_l = damping_scale * (1/n) sum_i ||g_il||^2 / d_l`` (mean squared
  gradient coordinate; the reference code's ``mean(g^2) / 10``), the cacheable
  train state (:meth:`DataInf.fit`, one pass over the training gradients);
* DataInf swaps "average" and "invert" in ``G_l = (1/n) sum_i g_il g_il^T + lambda_l I``:
  ``G_l^-1 ~ (1/n) sum_i (g_il g_il^T + lambda_l I)^-1
  = (1/n) sum_i (1/lambda_l) [I - g_il g_il^T / (lambda_l + ||g_il||^2)]`` (Sherman-Morrison);
* per query, one pass over all training gradients gives
  ``r_l = (1/lambda_l) [g'_l - (1/n) sum_k (g_kl . g'_l) g_kl / (lambda_l + ||g_kl||^2)]``;
* ``scores[j, i] = (1/n) sum_l r_jl . g_il`` (normalisation 1/n, like ``if_exact``);
* ``self_influence[i] = (1/n) sum_l g_il^T G_l^-1 g_il
  = (1/n) sum_l (1/lambda_l) [||g_il||^2 - (1/n) sum_k (g_kl . g_il)^2 / (lambda_l + ||g_kl||^2)]``.

Cost: scores need two passes over training gradients per job (all ``n`` rows for
``r``, then the shard's rows), O(n m sum_l d_l), no iterations, memory O(m sum_l d_l).
Self-influence needs the pairwise terms: one pass over all ``n`` rows per chunk of
the shard, i.e. ``ceil(n_shard / chunk)`` extra passes (O(n n_shard sum_l d_l)).
The approximation error grows with ``d_l``: DataInf is meant for LoRA-sized layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from annotated_types import Gt

from ..base import Attribution, Estimator, EstimatorError, NumericalError, Runtime, TrainState, register
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    metadata,
    n_chunks,
    numpy_dtype,
    query_gradients,
    select_parameters,
    train_gradients,
    validate_problem,
)

_LAYERS = "/method/params/layers"


@dataclass
class DataInfParams:
    """DataInf: per-layer Sherman-Morrison inverse of the damped Gauss-Newton matrix; (1/n) sum_l r_l.g_il."""

    damping_scale: Annotated[float, Gt(0)] = field(
        default=0.1,
        metadata={
            "description": "lambda_l = damping_scale x the mean over training points of the mean squared "
            "gradient coordinate in layer l"
        },
    )
    layers: list[str] | None = field(
        default=None,
        metadata={
            "description": "module prefixes whose parameters are used (e.g. ['fc2'] or ['last']); "
            "null = every trainable parameter, one layer per module"
        },
    )


def layer_groups(model: torch.nn.Module, names: list[str]) -> tuple[list[str], list[torch.Tensor]]:
    """Module names and, for each, its parameters' column indices in the flattened gradient of ``names``."""
    sizes = {k: v.numel() for k, v in model.named_parameters()}
    modules: list[str] = []
    index: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for k in names:
        mod = k.rsplit(".", 1)[0] if "." in k else k
        if mod not in index:
            modules.append(mod)
            index[mod] = []
        index[mod].append(torch.arange(offset, offset + sizes[k]))
        offset += sizes[k]
    return modules, [torch.cat(index[mod]) for mod in modules]


def _indexer(ix: torch.Tensor) -> slice | torch.Tensor:
    """A slice for a contiguous run of column indices (a view instead of a gathered copy), else ``ix``."""
    if ix.numel() and int(ix[-1]) - int(ix[0]) + 1 == ix.numel() and bool((ix.diff() == 1).all()):
        return slice(int(ix[0]), int(ix[-1]) + 1)
    return ix


def sherman_morrison_apply(G: torch.Tensor, lam: float, V: torch.Tensor) -> torch.Tensor:
    """``sum_i (1/lam) [V - g_i (g_i . V) / (lam + ||g_i||^2)]`` for the rows ``g_i`` of ``G`` (b x d).

    ``V`` is d x m.

    The (unaveraged) sum over ``i`` of ``(g_i g_i^T + lam I)^-1 V``: DataInf's building block.
    """
    c = lam + (G * G).sum(dim=1)
    return (G.shape[0] * V - G.T @ ((G @ V) / c[:, None])) / lam


@register
class DataInf(Estimator):
    name = "datainf"
    summary = "DataInf: closed-form per-layer inverse of a damped Gauss-Newton matrix (Kwon et al. 2024)"
    Params = DataInfParams

    def state_params(self, params) -> dict:
        p = as_params(self.Params, params)
        return {"damping_scale": p.damping_scale, "layers": p.layers}

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """The per-layer damping ``lambda_l`` (one pass over the training gradients)."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        names = select_parameters(problem.model, p.layers)
        modules, idx = layer_groups(problem.model, names)
        sumsq = torch.zeros(len(modules), dtype=torch.float64)
        tt = Ticker(runtime, "datainf_damping", n_chunks(n, runtime.chunk_size))
        for _, _, G in train_gradients(problem, problem.weights, runtime, None, names):
            Gd = G.to(torch.float64)
            for j, ix in enumerate(idx):
                sel = _indexer(ix)
                sumsq[j] += float((Gd[:, sel if isinstance(sel, slice) else sel.to(Gd.device)] ** 2).sum())
            tt.tick()
        dims = torch.tensor([len(ix) for ix in idx], dtype=torch.float64)
        lambdas = p.damping_scale * sumsq / (n * dims)
        zero = [mod for mod, lam in zip(modules, lambdas.tolist(), strict=True) if not lam > 0]
        if zero:
            raise EstimatorError(
                f"the training gradients of layer(s) {zero} are zero on every training example, so DataInf's "
                "damping lambda_l = 0; leave those modules out of layers",
                parameter=_LAYERS,
            )
        return TrainState(
            tensors={"lambdas": lambdas},
            info={"layers": modules, "parameters": names, "layer_sizes": [len(ix) for ix in idx]},
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
        state = state or self.fit(problem, p, runtime)
        names = select_parameters(problem.model, p.layers)
        if list(state.info.get("parameters", [])) != names:
            raise EstimatorError("the cached DataInf state was computed for other layers", parameter=_LAYERS)
        modules, idx = layer_groups(problem.model, names)
        dev = torch.device(runtime.device)
        idx = [ix.to(dev) for ix in idx]
        sels = [_indexer(ix) for ix in idx]
        lambdas = state.tensors["lambdas"].to(torch.float64).tolist()
        n = problem.n_train
        lo, hi = column_range(problem, train_range)
        m, cols = problem.n_query, hi - lo
        dtype = numpy_dtype(runtime.dtype)

        R = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Qt = query_gradients(problem, problem.weights, runtime, qt, names).T.to(
                dev, torch.float64
            )  # P x m
            acc = torch.zeros_like(Qt)
            pt = Ticker(runtime, "datainf_preconditioning", n_chunks(n, runtime.chunk_size))
            for _, _, G in train_gradients(problem, problem.weights, runtime, None, names):
                Gd = G.to(dev, torch.float64)
                for ix, lam in zip(sels, lambdas, strict=True):
                    acc[ix] += sherman_morrison_apply(Gd[:, ix], lam, Qt[ix])
                pt.tick()
            R = acc / n  # (1/n) sum_k (g_kl g_kl^T + lambda_l I)^-1 g'_l, stacked over layers
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None
        if want_scores or want_self_influence:
            tt = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
            st = (
                Ticker(
                    runtime,
                    "datainf_self_influence",
                    n_chunks(cols, runtime.chunk_size) * n_chunks(n, runtime.chunk_size),
                )
                if want_self_influence
                else None
            )
            for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range, names):
                Gi = G.to(dev, torch.float64)
                if scores is not None:
                    scores[:, start:stop] = ((Gi @ R).T / n).cpu().numpy()
                if self_inf is not None:
                    self_inf[start:stop] = self._self_influence(
                        problem, runtime, names, sels, lambdas, Gi, st
                    )
                tt.tick()
        for what, arr in (("scores", scores), ("self-influence", self_inf)):
            if arr is not None and not np.isfinite(arr).all():
                raise NumericalError(
                    f"datainf {what} contain NaN/inf; increase damping_scale (now {p.damping_scale:g})",
                    parameter="/method/params/damping_scale",
                )
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n: scores = (1/n) sum_l r_l . g_il with r_l = DataInf's approximation of "
                "(G_l + lambda_l I)^-1 g'_l",
                damping_scale=p.damping_scale,
                layers=modules,
                layer_sizes=[len(ix) for ix in idx],
                layer_damping=dict(zip(modules, lambdas, strict=True)),
                hessian="per-layer damped GN (1/n) sum_i g_il g_il^T + lambda_l I, approximate inverse",
            ),
        )

    @staticmethod
    def _self_influence(problem, runtime, names, idx, lambdas, Gi, ticker) -> np.ndarray:
        """``(1/n) sum_l g_il^T G_l^-1 g_il`` for the rows of ``Gi``: one pass over every training row."""
        n = problem.n_train
        dev = Gi.device
        pair = torch.zeros(len(idx), Gi.shape[0], dtype=torch.float64, device=dev)
        for _, _, G in train_gradients(problem, problem.weights, runtime, None, names):
            Gk = G.to(dev, torch.float64)
            for j, (ix, lam) in enumerate(zip(idx, lambdas, strict=True)):
                Gkl = Gk[:, ix]
                c = lam + (Gkl * Gkl).sum(dim=1)
                K = Gkl @ Gi[:, ix].T  # rows k x columns i
                pair[j] += ((K * K) / c[:, None]).sum(dim=0)
            if ticker is not None:
                ticker.tick()
        out = torch.zeros(Gi.shape[0], dtype=torch.float64, device=dev)
        for j, (ix, lam) in enumerate(zip(idx, lambdas, strict=True)):
            sq = (Gi[:, ix] * Gi[:, ix]).sum(dim=1)
            out += (sq - pair[j] / n) / lam
        return (out / n).cpu().numpy()
