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

Cost, any model: scores need two passes over training gradients per job (all ``n`` rows for
``r``, then the shard's rows), O(n m sum_l d_l), no iterations, memory O(m sum_l d_l).
Self-influence needs the pairwise terms: one pass over all ``n`` rows per chunk of
the shard, i.e. ``ceil(n_shard / chunk)`` extra passes (O(n n_shard sum_l d_l)).

Plain MLPs (:func:`~app.estimators.gradients.linear_chain`) skip the gradients: a
layer's example gradient is ``g_il = D_i (x) A~_i`` (output gradient times input,
:func:`~app.estimators.gradients.gradient_factors`), so every inner product above is
``(D . D')(A~ . A~')`` and the sums over ``k`` become kernel products,
O(n n_shard (c_l + d_out,l + m)) per layer, or, for a layer smaller than that, one
pass that forms ``sum_k (g_k . g'_j / c_k) g_k`` (O((n + n_shard) m d_l)); the
factors of all ``n`` rows are held (n sum_l (c_l + d_out,l) numbers, within a
budget), self-influence costs no extra pass, and metadata ``layer_route`` says
which way each layer went. Arithmetic in the runtime's precision (float32 by default).
The approximation error grows with ``d_l``: DataInf is meant for LoRA-sized layers. Metadata
``warnings`` (a list of strings, empty when there is nothing to say) names every used layer with more
than :data:`SWAP_WARN_LAYER_SIZE` parameters.
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
    concat_factors,
    gradient_factors,
    metadata,
    n_chunks,
    numpy_dtype,
    query_gradients,
    query_objective_fn,
    select_parameters,
    train_gradients,
    train_objective,
    validate_problem,
)
from ..ihvp import product_dtype

_LAYERS = "/method/params/layers"

SWAP_WARN_LAYER_SIZE = 8
"""Layers with more parameters ``d_l`` than this get a metadata warning (ESTIMATORS.md 2.15 pitfall: the
"swap" error grows with ``d_l``). Measured mean Spearman of DataInf (default damping_scale 0.1) against
exact per-layer damped-GN influence, 6 queries (tests/unit/test_influence_solvers.py::
test_datainf_rank_correlation_vs_exact_damped_gn and a sweep of the same fixtures): tanh MLP output
layer, n = 200: 0.89 at d_l = 6, 0.47 at 9, 0.45 at 12, 0.29 at 15, 0.27 at 51 (n = 80: 0.72 at 6, 0.33
at 51); logistic regression, n = 200: 0.88 at 4, 0.86 at 8, 0.81 at 12, 0.79 at 22, 0.65 at 42. Every
measured layer of <= 8 parameters keeps >= 0.72 (>= 0.86 at n = 200); above 8 the MLP already drops to
<= 0.47. damping_scale = 1 helps but does not close the gap (0.56 at d_l = 51). On LoRA adapters of a
linear base (lora_mlp, 8 inputs, 3 classes; layers A r x 8 and B 3 x r; 20 queries; test_datainf_on_lora_
adapters_error_grows_with_the_rank): 0.86 / 0.60 / 0.58 / 0.54 at rank 1 / 2 / 4 / 8 (0.95 / 0.81 / 0.74 /
0.67 at damping_scale 1); rank 1 (8 and 3 parameters) is the only unwarned one."""


def swap_warnings(modules: list[str], sizes: list[int], damping_scale: float) -> list[str]:
    """The metadata warning for used layers larger than :data:`SWAP_WARN_LAYER_SIZE` (empty: none)."""
    big = [f"{mod} ({d})" for mod, d in zip(modules, sizes, strict=True) if d > SWAP_WARN_LAYER_SIZE]
    if not big:
        return []
    return [
        f"DataInf's swap of averaging and inversion is accurate only for LoRA-sized layers, and "
        f"{len(big)} of the {len(modules)} used layer(s) have more than {SWAP_WARN_LAYER_SIZE} parameters: "
        f"{', '.join(big)}. On small test models its Spearman rank correlation with exact damped "
        "Gauss-Newton influence falls from about 0.9 at 6 parameters per layer to below 0.5 at 9-51 on "
        "an MLP output layer, and the error keeps growing with the layer size. Restrict `layers` to "
        f"small (LoRA) blocks, raise damping_scale (now {damping_scale:g}) to shrink the error, or use "
        "if_cg, if_arnoldi or ekfac for full layers"
    ]


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


# Training-row factors of a plain MLP are held for all rows at once up to this many elements (the
# factored path); beyond, or for other models, the per-chunk gradient path runs.
_FACTOR_ELEMENTS = 2**26


def _factor_elements(runtime: Runtime, dtype: torch.dtype) -> int:
    """The factor budget in elements: _FACTOR_ELEMENTS, or half the runtime's memory budget if smaller."""
    budget = getattr(runtime, "memory_budget_bytes", None)
    if budget is None:
        return _FACTOR_ELEMENTS
    return min(_FACTOR_ELEMENTS, int(budget) // (2 * torch.empty(0, dtype=dtype).element_size()))


def _train_factors(problem, runtime: Runtime, names: list[str], dtype: torch.dtype, n_layers: int, sizes):
    """Per layer ``(A~, D)`` over all training rows (:func:`gradient_factors`), or None when the model is
    not a plain MLP, the layers do not match ``sizes`` or the factors would exceed the memory budget."""
    n = problem.n_train
    limit = _factor_elements(runtime, dtype)
    it = gradient_factors(
        problem.model, problem.weights, problem.train_x, problem.train_y, train_objective(problem.task),
        chunk_size=max(runtime.chunk_size, 1024), device=runtime.device, dtype=dtype,
        what="training examples", names=names,
    )  # fmt: skip
    if it is None:
        return None
    parts, size = [], None
    for _, _, F in it:
        if size is None:
            size = n * sum(A.shape[1] + D.shape[1] for A, D in F)
            if size > limit or len(F) != n_layers or [A.shape[1] * D.shape[1] for A, D in F] != sizes:
                return None
        parts.append(F)
    return concat_factors(parts)


def _query_factors(problem, runtime: Runtime, names: list[str], dtype: torch.dtype):
    it = gradient_factors(
        problem.model, problem.weights, problem.query_x, problem.query_y,
        query_objective_fn(problem.task, problem.measurement), chunk_size=max(runtime.chunk_size, 1024),
        device=runtime.device, dtype=dtype, what="queries", names=names,
    )  # fmt: skip
    return None if it is None else concat_factors([F for _, _, F in it])


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
        return self._fit(problem, as_params(self.Params, params), runtime or Runtime(), None)

    def _fit(self, problem, p, runtime, factors) -> TrainState:
        validate_problem(problem, need_queries=False)
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        names = select_parameters(problem.model, p.layers)
        modules, idx = layer_groups(problem.model, names)
        sizes = [len(ix) for ix in idx]
        cdt = product_dtype(runtime)
        sumsq = torch.zeros(len(modules), dtype=torch.float64)
        tt = Ticker(runtime, "datainf_damping", n_chunks(n, runtime.chunk_size))
        if factors is None:
            factors = _train_factors(problem, runtime, names, cdt, len(modules), sizes)
        if factors is not None:  # ||g_il||^2 = ||D_i||^2 ||A~_i||^2, no gradient materialised
            for j, (A, D) in enumerate(factors):
                sumsq[j] = float(((D * D).sum(dim=1) * (A * A).sum(dim=1)).sum(dtype=torch.float64))
            tt.tick(n_chunks(n, runtime.chunk_size))
        else:
            for _, _, G in train_gradients(problem, problem.weights, runtime, None, names):
                Gd = G.to(cdt)
                for j, ix in enumerate(idx):
                    sel = _indexer(ix)
                    Gl = Gd[:, sel if isinstance(sel, slice) else sel.to(Gd.device)]
                    sumsq[j] += float((Gl * Gl).sum(dtype=torch.float64))
                tt.tick()
        dims = torch.tensor(sizes, dtype=torch.float64)
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
            info={"layers": modules, "parameters": names, "layer_sizes": sizes},
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
        names = select_parameters(problem.model, p.layers)
        modules, idx = layer_groups(problem.model, names)
        sizes = [len(ix) for ix in idx]
        cdt = product_dtype(runtime)
        factors = None
        if want_scores or want_self_influence or state is None:
            check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
            factors = (
                _train_factors(problem, runtime, names, cdt, len(modules), sizes) if problem.n_train else None
            )
        state = state or self._fit(problem, p, runtime, factors)
        if list(state.info.get("parameters", [])) != names:
            raise EstimatorError("the cached DataInf state was computed for other layers", parameter=_LAYERS)
        lambdas = state.tensors["lambdas"].to(torch.float64).tolist()
        lo, hi = column_range(problem, train_range)
        m = problem.n_query
        dtype = numpy_dtype(runtime.dtype)
        Fq = None
        if factors is not None and want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Fq = _query_factors(problem, runtime, names, cdt)
            qt.tick(n_chunks(m, runtime.chunk_size))
        if factors is not None and (Fq is not None or not want_scores):
            scores, self_inf, routes = self._factored(
                problem, runtime, factors, Fq, lambdas, (lo, hi), want_self_influence, cdt
            )
            scores = None if scores is None else scores.cpu().numpy().astype(dtype, copy=False)
            self_inf = None if self_inf is None else self_inf.cpu().numpy().astype(dtype, copy=False)
        else:
            routes = ["gradients"] * len(modules)
            scores, self_inf = self._streamed(
                problem,
                runtime,
                names,
                idx,
                lambdas,
                train_range,
                want_scores,
                want_self_influence,
                cdt,
                dtype,
            )
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
                layer_sizes=sizes,
                layer_damping=dict(zip(modules, lambdas, strict=True)),
                # how each layer was computed: from gradient factors as kernel products or via its
                # gradient block ("layer_products"), or from streamed per-sample gradients ("gradients")
                layer_route=dict(zip(modules, routes, strict=True)),
                hessian="per-layer damped GN (1/n) sum_i g_il g_il^T + lambda_l I, approximate inverse",
                swap_warn_layer_size=SWAP_WARN_LAYER_SIZE,
                warnings=swap_warnings(modules, sizes, p.damping_scale),
            ),
        )

    @staticmethod
    def _factored(problem, runtime, factors, Fq, lambdas, shard, want_self, cdt):
        """Scores and self-influence of a plain MLP from the per-layer gradient factors ``g_il = D_i (x)
        A~_i``, without materialising a gradient where that is cheaper.

        With ``K(x, y) = g_xl . g_yl = (D_x . D_y)(A~_x . A~_y)`` and ``c_k = lambda_l + ||g_kl||^2``:
        ``score_l(j, i) = (1/lambda_l) [K(q_j, i) - (1/n) sum_k K(q_j, k) K(k, i) / c_k]`` and
        ``self_l(i) = (1/lambda_l) [K(i, i) - (1/n) sum_k K(k, i)^2 / c_k]``: the same numbers as the
        Sherman-Morrison form. The middle sum is either a product of kernels (``O(n n_shard (c + d_out
        + m))``) or, when cheaper (small layers), ``M = sum_k (K(q, k) / c_k) g_k`` formed once and
        applied to the shard's gradients (``O((n + n_shard) m d_l)``)."""
        n = problem.n_train
        lo, hi = shard
        ns = hi - lo
        chunk = max(1, min(max(runtime.chunk_size, 256), _factor_elements(runtime, cdt) // (8 * max(n, 1))))
        dev = factors[0][0].device
        m = int(Fq[0][0].shape[0]) if Fq else 0  # Fq == []: no queries
        scores = None if Fq is None else torch.zeros(m, ns, dtype=cdt, device=dev)
        self_inf = torch.zeros(ns, dtype=cdt, device=dev) if want_self else None
        tt = Ticker(runtime, "datainf_preconditioning", len(factors))
        routes = []
        for j, ((A, D), lam) in enumerate(zip(factors, lambdas, strict=True)):
            a, o = int(A.shape[1]), int(D.shape[1])
            d = a * o
            c = lam + (D * D).sum(dim=1) * (A * A).sum(dim=1)  # (n,)
            As, Ds = A[lo:hi], D[lo:hi]
            if scores is not None and m:
                Aq, Dq = Fq[j]
                Kq = (Dq @ D.T).mul_(Aq @ A.T)  # m x n: g'_j . g_k
                W = Kq / c
                corr = torch.empty(m, ns, dtype=cdt, device=dev)
                kernel = n * ns * (a + o + m) < (n + ns) * d * (m + 1)
                routes.append("kernel" if kernel else "layer_products")
                if kernel:
                    for s0 in range(0, ns, chunk):
                        s1 = min(s0 + chunk, ns)
                        Kt = (D @ Ds[s0:s1].T).mul_(A @ As[s0:s1].T)  # n x chunk: g_k . g_i
                        corr[:, s0:s1] = W @ Kt
                        if self_inf is not None:
                            self_inf[s0:s1] += (_self_term(Kt, c, As[s0:s1], Ds[s0:s1], n)) / lam
                else:
                    M = torch.zeros(m, d, dtype=cdt, device=dev)
                    for k0 in range(0, n, chunk):
                        k1 = min(k0 + chunk, n)
                        M.addmm_(W[:, k0:k1], (D[k0:k1, :, None] * A[k0:k1, None, :]).reshape(k1 - k0, d))
                    for s0 in range(0, ns, chunk):
                        s1 = min(s0 + chunk, ns)
                        corr[:, s0:s1] = M @ (Ds[s0:s1, :, None] * As[s0:s1, None, :]).reshape(s1 - s0, d).T
                scores.add_(Kq[:, lo:hi].sub_(corr, alpha=1.0 / n), alpha=1.0 / lam)
                if self_inf is not None and kernel:
                    tt.tick()
                    continue
            if self_inf is not None:
                for s0 in range(0, ns, chunk):
                    s1 = min(s0 + chunk, ns)
                    Kt = (D @ Ds[s0:s1].T).mul_(A @ As[s0:s1].T)
                    self_inf[s0:s1] += _self_term(Kt, c, As[s0:s1], Ds[s0:s1], n) / lam
            tt.tick()
        if len(routes) < len(factors):  # no scores: self-influence alone is always kernel products
            routes = ["kernel"] * len(factors)
        return (None if scores is None else scores / n), (None if self_inf is None else self_inf / n), routes

    def _streamed(
        self, problem, runtime, names, idx, lambdas, train_range, want_scores, want_self, cdt, dtype
    ):
        """Scores and self-influence from per-sample gradients streamed in chunks (any model)."""
        dev = torch.device(runtime.device)
        idx = [ix.to(dev) for ix in idx]
        sels = [_indexer(ix) for ix in idx]
        n = problem.n_train
        lo, hi = column_range(problem, train_range)
        m, cols = problem.n_query, hi - lo
        R = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Qt = query_gradients(problem, problem.weights, runtime, qt, names).T.to(dev, cdt)  # P x m
            acc = torch.zeros_like(Qt)
            pt = Ticker(runtime, "datainf_preconditioning", n_chunks(n, runtime.chunk_size))
            for _, _, G in train_gradients(problem, problem.weights, runtime, None, names):
                Gd = G.to(dev, cdt)
                for ix, lam in zip(sels, lambdas, strict=True):
                    acc[ix] += sherman_morrison_apply(Gd[:, ix], lam, Qt[ix])
                pt.tick()
            R = acc / n  # (1/n) sum_k (g_kl g_kl^T + lambda_l I)^-1 g'_l, stacked over layers
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self else None
        if want_scores or want_self:
            tt = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
            st = (
                Ticker(
                    runtime,
                    "datainf_self_influence",
                    n_chunks(cols, runtime.chunk_size) * n_chunks(n, runtime.chunk_size),
                )
                if want_self
                else None
            )
            for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range, names):
                Gi = G.to(dev, cdt)
                if scores is not None:
                    scores[:, start:stop] = ((Gi @ R).T / n).cpu().numpy()
                if self_inf is not None:
                    self_inf[start:stop] = self._self_influence(
                        problem, runtime, names, sels, lambdas, Gi, st
                    )
                tt.tick()
        return scores, self_inf

    @staticmethod
    def _self_influence(problem, runtime, names, idx, lambdas, Gi, ticker) -> np.ndarray:
        """``(1/n) sum_l g_il^T G_l^-1 g_il`` for the rows of ``Gi``: one pass over every training row."""
        n = problem.n_train
        dev = Gi.device
        pair = torch.zeros(len(idx), Gi.shape[0], dtype=Gi.dtype, device=dev)
        for _, _, G in train_gradients(problem, problem.weights, runtime, None, names):
            Gk = G.to(dev, Gi.dtype)
            for j, (ix, lam) in enumerate(zip(idx, lambdas, strict=True)):
                Gkl = Gk[:, ix]
                c = lam + (Gkl * Gkl).sum(dim=1)
                K = Gkl @ Gi[:, ix].T  # rows k x columns i
                pair[j] += ((K * K) / c[:, None]).sum(dim=0)
            if ticker is not None:
                ticker.tick()
        out = torch.zeros(Gi.shape[0], dtype=Gi.dtype, device=dev)
        for j, (ix, lam) in enumerate(zip(idx, lambdas, strict=True)):
            sq = (Gi[:, ix] * Gi[:, ix]).sum(dim=1)
            out += (sq - pair[j] / n) / lam
        return (out / n).cpu().numpy()


def _self_term(Kt: torch.Tensor, c: torch.Tensor, As: torch.Tensor, Ds: torch.Tensor, n: int) -> torch.Tensor:
    """``K(i, i) - (1/n) sum_k K(k, i)^2 / c_k`` for the columns ``i`` of ``Kt`` (n x b)."""
    diag = (Ds * Ds).sum(dim=1) * (As * As).sum(dim=1)
    return diag - ((Kt * Kt) / c[:, None]).sum(dim=0) / n
