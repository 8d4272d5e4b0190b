"""K-FAC and EK-FAC influence functions (ESTIMATORS.md 2.14; Grosse et al. 2023).

The curvature is the Gauss-Newton / Fisher matrix ``G`` of the training loss,
approximated block-diagonally over the tracked ``nn.Linear``/``nn.Conv2d``
layers with Kronecker factors (:mod:`app.estimators.kfac`); EK-FAC refits the
eigenvalues in the Kronecker eigenbasis. With ``P = (G + diag(s_l) I)^-1`` and
the per-layer shift ``s_l = damping + weight_decay`` (``damping=None``: 0.1 x
the mean eigenvalue of the layer, kronfluence's heuristic),

* ``scores[j, i] = (1/n) g'_j^T P g_i`` (restricted to the tracked layers;
  positive = removing ``z_i`` raises the query objective);
* ``self_influence[i] = (1/n) g_i^T P g_i``.

``fit`` computes the factors (the cacheable state; it does not depend on the
damping, which is applied at scoring time). ``attribute`` preconditions the
``m`` query gradients layer-wise once, then streams the training gradients and
takes dot products, so no ``n x p`` matrix is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from annotated_types import Ge

from ..base import Attribution, Estimator, EstimatorError, NumericalError, Runtime, TrainState, register
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    gradient_factors,
    metadata,
    n_chunks,
    numpy_dtype,
    per_sample_layer_rows,
    query_gradients,
    train_gradients,
    train_objective,
    validate_problem,
)
from ..kfac import (
    DAMPING_POINTER,
    KFACFactors,
    fit_factors,
    flatten_layer_matrices,
    parameter_names,
    tracked_layers,
    with_ones_column,
)
from ..layerwise import Unsupported


@dataclass
class KFACParams:
    """K-FAC influence: (1/n) g'^T (G_KFAC + damping I)^-1 g_i over the Linear/Conv2d layers."""

    damping: Annotated[float, Ge(0)] | None = field(
        default=None,
        metadata={
            "description": "added to each layer's curvature block (on top of the model's weight decay); "
            "null: 0.1 x the mean eigenvalue of each block (kronfluence's heuristic)"
        },
    )
    fisher: Literal["empirical", "true", "expected"] = field(
        default="empirical",
        metadata={
            "description": "empirical: Fisher with the training labels; true: one label per example "
            "sampled from the model's predictive distribution (expected value = Gauss-Newton); expected: "
            "that expectation taken exactly (the Gauss-Newton matrix; k backward rows per example for "
            "k outputs, no sampling noise)"
        },
    )
    layers: list[str] | None = field(
        default=None,
        metadata={
            "description": "module prefixes whose nn.Linear/nn.Conv2d layers are tracked ('last': the "
            "output layer); null: all of them. Other parameters (e.g. BatchNorm) are ignored"
        },
    )
    seed: Annotated[int, Ge(0)] = field(
        default=0, metadata={"description": "seed for the labels sampled by fisher='true' (unused otherwise)"}
    )


@dataclass
class EKFACParams(KFACParams):
    """EK-FAC influence: K-FAC's eigenbasis with eigenvalues refitted from per-example gradients."""


def _factored_scores(PQ: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``(m, b)`` inner products of query gradients ``PQ`` ``(m, p)``, flattened per layer as
    ``(d_out, d_in)`` matrices with the bias as the last column, with training gradients given per
    layer as ``(A~, D)``: rank-one ``D_i a~_i^T`` (``(b, d_in)``, ``(b, d_out)``) or rows ``D_i^T A~_i``
    (``(b, T, d_in)``, ``(b, T, d_out)``), formed in that layout straight into one buffer (no
    concatenation) for one matrix product."""
    b = factors[0][0].shape[0]
    G = torch.empty(b, PQ.shape[1], dtype=PQ.dtype, device=PQ.device)
    off = 0
    for A, D in factors:
        d_out, d_in = D.shape[-1], A.shape[-1]
        out = G[:, off : off + d_out * d_in].view(b, d_out, d_in)
        if A.dim() == 3:
            torch.bmm(D.transpose(1, 2), A, out=out)
        else:
            torch.mul(D[:, :, None], A[:, None, :], out=out)
        off += d_out * d_in
    return PQ @ G.T


class _KroneckerInfluence(Estimator):
    ekfac: ClassVar[bool]
    Params = KFACParams

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        return fit_factors(problem, runtime, layers=p.layers, fisher=p.fisher, seed=p.seed, ekfac=self.ekfac)

    def state_params(self, params) -> dict:
        p = as_params(self.Params, params)
        return {"fisher": p.fisher, "layers": p.layers, "seed": p.seed}

    def _factors(self, problem, p, state: TrainState, runtime: Runtime) -> KFACFactors:
        factors = KFACFactors(state, runtime.device)
        if factors.variant != ("ekfac" if self.ekfac else "kfac"):
            raise EstimatorError(f"the train state was fitted by {factors.variant!r}, not {self.name!r}")
        expected, _ = tracked_layers(problem.model, p.layers)
        known = {la.module for la in expected}
        if any(la.module not in known for la in factors.layers) or state.info.get("fisher") != p.fisher:
            raise EstimatorError("the train state does not match the method parameters (layers, fisher)")
        return factors

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
    ) -> Attribution:
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=want_scores)
        lo, hi = column_range(problem, train_range)
        state = state or self.fit(problem, p, runtime)
        factors = self._factors(problem, p, state, runtime)
        layers = factors.layers
        names = parameter_names(layers)
        shifts = factors.shifts(p.damping, problem.weight_decay)
        n = problem.n_train  # the 1/n of the removal effect uses the full training set
        m, cols = problem.n_query, hi - lo
        dtype = numpy_dtype(runtime.dtype)
        cdt = torch.float64 if runtime.dtype == torch.float64 else torch.float32

        what = "training examples" if lo == 0 else f"training examples (from row {lo})"
        x, y, objective = problem.train_x[lo:hi], problem.train_y[lo:hi], train_objective(problem.task)
        # a plain MLP's training gradients stay factored, D_i a~_i^T per layer (never formed); a net of
        # linear and convolution layers gets them as rows, D_i^T A~_i (formed for the scores only)
        factored = gradient_factors(
            problem.model, problem.weights, x, y, objective, chunk_size=runtime.chunk_size,
            device=runtime.device, dtype=runtime.dtype, names=names, what=what,
        )  # fmt: skip
        rows = None
        if factored is None:
            rows = per_sample_layer_rows(
                problem.model, problem.weights, x, y, objective, names=names, chunk_size=runtime.chunk_size,
                device=runtime.device, dtype=runtime.dtype, what=what,
            )  # fmt: skip
        PQ = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt, names=names)
            PQ = factors.precondition_layers(Q.to(torch.float64), shifts)
            if not all(bool(torch.isfinite(P).all()) for P in PQ):
                raise NumericalError(
                    "preconditioned query gradients contain NaN/inf: the curvature has zero eigenvalues "
                    "and the damping is too small; increase damping (or leave it null for the heuristic)",
                    parameter=DAMPING_POINTER,
                )
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None

        def stream(chunks, layered: bool) -> None:
            """Scores and self-influence from per-layer ``(A~, D)`` (``layered``) or formed gradients."""
            pq = None
            if PQ is not None:  # the per-layer matrices' layout, or the parameters' when formed
                pq = (
                    torch.cat([P.reshape(m, -1) for P in PQ], dim=1)
                    if layered
                    else flatten_layer_matrices(PQ, layers)
                )
                pq = pq.to(cdt)
            tt = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
            for start, stop, G in chunks:
                if factored is not None:
                    G = [(A.to(cdt), D.to(cdt)) for A, D in G]
                elif layered:  # rows per tracked layer, the bias as a column of ones
                    pairs = [G[la.module] for la in layers]
                    G = [
                        ((with_ones_column(A) if la.bias else A).to(cdt), D.to(cdt))
                        for la, (A, D) in zip(layers, pairs, strict=True)
                    ]
                else:
                    G = G.to(cdt)
                if scores is not None:
                    S = _factored_scores(pq, G) if layered else pq @ G.T
                    if not bool(torch.isfinite(S).all()):  # pq overflowed in the compute dtype
                        raise NumericalError(
                            "scores contain NaN/inf: the preconditioned query gradients overflow the "
                            "compute precision; increase damping (or leave it null for the heuristic)",
                            parameter=DAMPING_POINTER,
                        )
                    scores[:, start:stop] = (S / n).cpu().numpy()
                if self_inf is not None:
                    if factored is not None:
                        si = factors.quadratic_factors(G, shifts)
                    else:
                        si = factors.quadratic_rows(G, shifts) if layered else factors.quadratic(G, shifts)
                    si = si / n
                    if not bool(torch.isfinite(si).all()):
                        raise NumericalError(
                            "self-influence contains NaN/inf: increase damping", parameter=DAMPING_POINTER
                        )
                    self_inf[start:stop] = si.cpu().numpy()
                tt.tick()

        if factored is not None or rows is not None:
            try:
                stream(factored or rows, layered=True)
            except Unsupported:  # the pass refused the model (first chunk): formed gradients instead
                rows = None
        if factored is None and rows is None:
            stream(
                train_gradients(problem, problem.weights, runtime, train_range, names=names), layered=False
            )
        info = state.info
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n",
                curvature="K-FAC" if not self.ekfac else "EK-FAC",
                fisher=info.get("fisher"),
                seed=info.get("seed"),
                damping=p.damping,
                damping_used=factors.shifts(p.damping, 0.0),
                weight_decay=float(problem.weight_decay),
                layers=[la.module for la in layers],
                n_tracked_parameters=sum(la.n_params for la in layers),
                ignored_parameters=list(info.get("ignored_parameters", [])),
                skipped_modules=dict(info.get("skipped_modules", {})),
                positions=dict(info.get("positions", {})),
                n_factor_examples=info.get("n"),
            ),
        )


@register
class KFAC(_KroneckerInfluence):
    name = "kfac"
    summary = (
        "influence functions with a Kronecker-factored Gauss-Newton/Fisher (K-FAC) over Linear/Conv2d "
        "layers (Martens & Grosse 2015; Grosse et al. 2023)"
    )
    Params = KFACParams
    ekfac = False


@register
class EKFAC(_KroneckerInfluence):
    name = "ekfac"
    summary = (
        "influence functions with eigenvalue-corrected K-FAC (EK-FAC; George et al. 2018), as in "
        "kronfluence and Grosse et al. 2023"
    )
    Params = EKFACParams
    ekfac = True
