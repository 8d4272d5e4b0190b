"""SOURCE: approximate unrolled differentiation over training segments (Bae et al. 2024; ESTIMATORS.md 2.26).

The run is cut into segments at the model's checkpoints (segment ``l`` ends at checkpoint ``l``: ``K_l``
optimizer steps of mean effective rate ``eta_l``). Within a segment the curvature and each training
gradient are taken as constant, the curvature being the EK-FAC Gauss-Newton ``H_l`` of the training
objective at the checkpoint (plus the weight decay and an optional damping). Gradient descent then
solves in closed form: down-weighting ``z_i`` by ``eps / n`` moves the segment's end point by
``(eps / n) (I - exp(-eta_l K_l H_l)) H_l^-1 g_il`` and every later segment ``l'`` shrinks that
displacement by ``exp(-eta_l' K_l' H_l')``. So

    ``scores[j, i] = (1/n) sum_l u_jl . g_il``,
    ``u_jl = r_l(H_l) S_{l+1}(H_{l+1}) ... S_L(H_L) g'_j``,

with ``S(H) = exp(-eta K H)``, ``r(H) = (I - exp(-eta K H)) H^-1`` (``eta K`` on a zero eigenvalue, so
no damping is needed), ``g'_j`` the query gradient at the final weights and ``g_il`` the training
gradient at checkpoint ``l``. Both are spectral functions, applied layer by layer in each
checkpoint's Kronecker eigenbasis (:class:`~app.estimators.kfac.KFACFactors`). With one segment and
``eta K -> inf`` SOURCE is the EK-FAC influence function; with a fast-decaying ``S`` it forgets
early segments, which is how it handles runs that did not converge or changed data mid-way.

``eta_l`` is the mean over the segment's steps of the recipe's rate divided by ``1 - momentum`` (the
step size momentum SGD takes in a steady descent) when the problem has the recipe, else the
checkpoint's recorded rate. The train-side state is the EK-FAC factors of every checkpoint.
Self-influence is ``(1/n) sum_l u_l(g_i(theta_T)) . g_il``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch
from annotated_types import Ge

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
    train_gradients,
    validate_problem,
)
from ..kfac import (
    DAMPING_POINTER,
    KFACFactors,
    fit_factors,
    flatten_layer_matrices,
    layer_matrices,
    parameter_names,
)
from ..training import Recipe, learning_rate_at
from .ekfac import EKFACParams
from .tracin import optimizer_warnings, training_optimizer


@dataclass
class SourceParams(EKFACParams):
    """SOURCE: EK-FAC curvature per checkpoint segment, unrolled in closed form."""

    damping: Annotated[float, Ge(0)] | None = field(
        default=0.0,
        metadata={
            "description": "added to each layer's curvature (on top of the weight decay); SOURCE's "
            "closed form needs none (a zero eigenvalue contributes eta K); null: 0.1 x the mean "
            "eigenvalue of each block"
        },
    )


def _no_checkpoints() -> EstimatorError:
    return EstimatorError(
        "source needs at least one checkpoint (one per segment)", parameter="/checkpoint_ids"
    )


@dataclass(frozen=True)
class Segment:
    steps: int
    learning_rate: float


def segments(problem, checkpoints) -> tuple[list[Segment], str]:
    """Each checkpoint's segment (steps since the previous one, mean effective learning rate) and where
    the rates came from."""
    recipe = problem.recipe
    if isinstance(recipe, dict):
        try:
            recipe = Recipe(**recipe)
        except TypeError:
            recipe = None
    use_recipe = recipe is not None and recipe.optimizer != "lbfgs"
    per_epoch = math.ceil(problem.n_train / recipe.batch_size) if use_recipe else 0
    out, previous = [], 0
    for t, ck in enumerate(checkpoints):
        k = int(ck.step) - previous
        if k < 1:
            raise EstimatorError(
                f"checkpoint {t} (step {ck.step}) does not come after the previous one (step {previous}); "
                "segments need increasing steps",
                parameter="/checkpoint_ids",
            )
        if use_recipe:
            rates = [learning_rate_at(recipe, s // per_epoch) for s in range(previous, int(ck.step))]
            eta = sum(rates) / k / (1.0 - recipe.momentum)
        else:
            eta = float(ck.learning_rate) if ck.learning_rate is not None else math.nan
        if not (math.isfinite(eta) and eta > 0):
            raise EstimatorError(
                f"checkpoint {t} (step {ck.step}) has no usable learning rate ({eta!r}); register the "
                "model's recipe or the checkpoints' learning rates",
                parameter="/checkpoint_ids",
            )
        out.append(Segment(k, eta))
        previous = int(ck.step)
    return out, "recipe (mean rate / (1 - momentum))" if use_recipe else "checkpoint learning rates"


@register
class Source(Estimator):
    name = "source"
    summary = (
        "SOURCE: training unrolled in closed form over checkpoint segments with EK-FAC curvature "
        "(Bae et al. 2024); handles runs that did not converge"
    )
    Params = SourceParams
    needs_checkpoints = True

    def check(self, problem_size, params) -> None:
        if problem_size.n_checkpoints < 1:
            raise _no_checkpoints()

    def state_params(self, params) -> dict:
        p = as_params(self.Params, params)
        return {"fisher": p.fisher, "layers": p.layers, "seed": p.seed}

    @staticmethod
    def _checkpoints(problem) -> list:
        ckpts = sorted(problem.checkpoints, key=lambda c: int(c.step))
        if not ckpts:
            raise _no_checkpoints()
        for t, ck in enumerate(ckpts):
            check_state_finite(ck.state, what=f"checkpoint {t} (step {ck.step})", parameter="/checkpoint_ids")
        return ckpts

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """EK-FAC factors at every checkpoint, keyed ``"{t}:{key}"``."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        tensors, infos = {}, []
        ckpts = self._checkpoints(problem)
        for t, ck in enumerate(ckpts):
            at = dataclasses.replace(problem, weights=ck.state)
            state = fit_factors(at, runtime, layers=p.layers, fisher=p.fisher, seed=p.seed, ekfac=True)
            tensors.update({f"{t}:{k}": v for k, v in state.tensors.items()})
            infos.append(state.info)
        steps = [int(ck.step) for ck in ckpts]
        return TrainState(
            tensors, {"checkpoints": infos, "checkpoint_steps": steps, "n_train": problem.n_train}
        )

    def _factors(
        self, problem, p, state: TrainState, runtime: Runtime, steps: list[int]
    ) -> list[KFACFactors]:
        info = state.info
        if info.get("checkpoint_steps") != steps or info.get("n_train") != problem.n_train:
            raise EstimatorError(
                "the cached train state was fitted on other checkpoints or another training set",
                parameter="/checkpoint_ids",
            )
        out = []
        for t, sub in enumerate(info["checkpoints"]):
            prefix = f"{t}:"
            tensors = {k[len(prefix) :]: v for k, v in state.tensors.items() if k.startswith(prefix)}
            factors = KFACFactors(TrainState(tensors, sub), runtime.device)
            if sub.get("fisher") != p.fisher:
                raise EstimatorError("the train state does not match the method parameters (fisher)")
            out.append(factors)
        return out

    @staticmethod
    def _propagate(factors, segs, shifts, Q: torch.Tensor) -> list[torch.Tensor]:
        """``u_l`` for every segment (flat, tracked-parameter layout) of the rows of ``Q`` (float64)."""
        layers = factors[-1].layers
        v = layer_matrices(Q, layers)
        out: list[torch.Tensor] = []
        for t in reversed(range(len(segs))):
            f, horizon = factors[t], segs[t].steps * segs[t].learning_rate
            u_parts, decayed = [], []
            for layer, M in zip(f.layers, v, strict=True):
                lam = (f.eigenvalues(layer) + shifts[t][layer.module]).to(M.dtype)
                positive = lam > 0
                x = horizon * lam
                reach = torch.where(positive, -torch.expm1(-x) / torch.where(positive, lam, 1.0), horizon)
                R = f.rotate(layer, M)
                u_parts.append(f.unrotate(layer, R * reach))
                decayed.append(f.unrotate(layer, R * torch.exp(-x)))
            out.insert(0, flatten_layer_matrices(u_parts, f.layers))
            v = decayed
        for u in out:
            if not bool(torch.isfinite(u).all()):
                raise NumericalError(
                    "the unrolled query gradients contain NaN/inf; check the checkpoints' learning rates "
                    "and add damping",
                    parameter=DAMPING_POINTER,
                )
        return out

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
        check_state_finite(problem.weights, what="the model weights", parameter="/model_id")
        ckpts = self._checkpoints(problem)
        segs, rate_source = segments(problem, ckpts)
        lo, hi = column_range(problem, train_range)
        state = state or self.fit(problem, p, runtime)
        factors = self._factors(problem, p, state, runtime, [int(c.step) for c in ckpts])
        names = parameter_names(factors[-1].layers)
        shifts = [f.shifts(p.damping, problem.weight_decay) for f in factors]
        n, m, cols, L = problem.n_train, problem.n_query, hi - lo, len(ckpts)
        dtype = numpy_dtype(runtime.dtype)
        cdt = torch.float64 if runtime.dtype == torch.float64 else torch.float32

        U = None
        if want_scores:
            qt = Ticker(runtime, "query_gradients", n_chunks(m, runtime.chunk_size))
            Q = query_gradients(problem, problem.weights, runtime, qt, names=names).to(torch.float64)
            U = [u.to(cdt) for u in self._propagate(factors, segs, shifts, Q)]
        scores = np.zeros((m, cols), dtype=dtype) if want_scores else None
        self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None
        tt = Ticker(
            runtime, "train_gradients", (L + int(want_self_influence)) * n_chunks(cols, runtime.chunk_size)
        )
        streams = [train_gradients(problem, ck.state, runtime, train_range, names=names) for ck in ckpts]
        if want_self_influence:
            streams.append(train_gradients(problem, problem.weights, runtime, train_range, names=names))
        for chunks in zip(*streams, strict=True):
            start, stop = chunks[0][0], chunks[0][1]
            G = [c[2].to(cdt) for c in chunks]
            if scores is not None:
                S = sum(U[t] @ G[t].T for t in range(L))
                scores[:, start:stop] = (S / n).cpu().numpy()
            if self_inf is not None:
                own = self._propagate(factors, segs, shifts, G[L].to(torch.float64))
                si = sum((own[t].to(cdt) * G[t]).sum(dim=1) for t in range(L))
                self_inf[start:stop] = (si / n).cpu().numpy()
            tt.tick(len(chunks))
        optimizer = training_optimizer(problem)
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="1/n",
                curvature="EK-FAC per checkpoint",
                checkpoint_steps=[int(c.step) for c in ckpts],
                segment_steps=[s.steps for s in segs],
                segment_learning_rates=[s.learning_rate for s in segs],
                learning_rates_from=rate_source,
                fisher=p.fisher,
                damping=p.damping,
                weight_decay=float(problem.weight_decay),
                layers=[la.module for la in factors[-1].layers],
                optimizer=optimizer,
                warnings=optimizer_warnings(optimizer),
            ),
        )
