"""TracInCP, TracIn-RP and GAS (Pruthi et al. 2020; Hammoudeh & Lowd 2022; ESTIMATORS.md 2.18, 2.23).

``scores[j, i] = sum_t eta_t s(g'_{j,t}, g_{i,t})`` over the checkpoints ``t``,
where ``g'`` is the gradient of the query objective (loss, or minus the margin)
and ``g_i`` that of the training loss at checkpoint ``theta_t``, ``eta_t`` is the
checkpoint's learning rate (or 1), and ``s`` is

* the dot product (``normalize="none"``, TracInCP), or
* the cosine (``normalize="cosine"``): GAS, gradient-aggregated similarity, the
  renormalised TracIn that removes the dominance of large-gradient examples
  (zero when either gradient is zero).

Options:

* ``projection_dim=k`` (TracIn-RP): both gradients are replaced by seeded
  random projections ``g P`` (``p x k``, see :mod:`..projection`), which keeps
  inner products in expectation. The projected training gradients (``n x k`` per
  checkpoint, memory-mapped beyond the runtime's memory budget and scored in row
  blocks, see :mod:`..features`) are the cacheable train-side state returned by :meth:`fit`;
  without a projection there is nothing worth caching (``fit`` returns None).
  ``k >= p`` means no projection.
* ``layers``: restrict the gradients to the parameters of these module prefixes
  (``"last"`` = the output layer).

Self-influence is ``sum_t eta_t ||g_{i,t}||^2`` (mislabel detection; projected
norms under TracIn-RP); the cosine variant has none. Scores are a sum over
checkpoints, so jobs may be sharded by checkpoint (``checkpoint_additive``),
also for GAS. Plain gradients are used by default; for Adam the true
update is preconditioned, so the scores are the SGD approximation, unless
``adam_preconditioning`` is on: each checkpoint's Adam second moments are then
recovered by replaying the model's recipe (:mod:`..unroll`, checked against the
checkpoint's weights) and the scores become ``sum_t eta_t g'_t . (s_t * g_{i,t})``
with ``s_t = 1 / (sqrt(v_hat_t) + eps)``, Adam's per-parameter step (query and
training gradients are both multiplied by ``sqrt(s_t)``, so projections and
self-influence stay consistent). The training
optimizer, when the problem's ``recipe`` names one, is recorded in metadata
(``optimizer``; None = unknown), and metadata ``warnings`` (a list of strings,
empty when there is nothing to say) flags recipes whose updates are not
``-eta_t g`` (adam, adamw, lbfgs; ESTIMATORS.md 2.18 pitfalls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge

from ..base import Attribution, Estimator, EstimatorError, ProblemSize, Runtime, TrainState, register
from ..features import FeatureWriter, row_chunks
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    concat_factors,
    factor_inner,
    factor_sqnorms,
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
from ..projection import Projector, capped, make_projector


@dataclass
class TracInCPParams:
    """TracInCP: sum over checkpoints of learning-rate-weighted gradient dot products (or cosines: GAS),
    optionally on randomly projected gradients (TracIn-RP) and selected layers."""

    use_checkpoint_learning_rates: bool = field(
        default=True,
        metadata={"description": "weight checkpoint t by its learning rate eta_t; false uses eta_t = 1"},
    )
    projection_dim: Annotated[int, Ge(1)] | None = field(
        default=None,
        metadata={
            "description": "TracIn-RP: project gradients to this many dimensions (null: exact gradients; "
            "values >= the number of selected parameters mean no projection)"
        },
    )
    projection: Literal["gaussian", "rademacher", "srht", "countsketch"] = field(
        default="rademacher",
        metadata={"description": "random projection kind used when projection_dim is set"},
    )
    seed: Annotated[int, Ge(0)] = field(default=0, metadata={"description": "seed of the random projection"})
    normalize: Literal["none", "cosine"] = field(
        default="none",
        metadata={"description": "'cosine': sum_t eta_t cos(g'_t, g_t) (GAS, Hammoudeh & Lowd 2022)"},
    )
    layers: list[str] | None = field(
        default=None,
        metadata={
            "description": "module name prefixes whose parameters enter the gradients ('last' = output "
            "layer); null: all trainable parameters"
        },
    )
    adam_preconditioning: bool = field(
        default=False,
        metadata={
            "description": "for models trained with adam/adamw: scale each training gradient by Adam's "
            "per-parameter step 1 / (sqrt(v_hat_t) + eps) at checkpoint t, the second moments recovered "
            "by replaying the model's recipe (as LESS / TrackStar precondition)"
        },
    )


_PRECONDITIONED = {"adam": "Adam", "adamw": "AdamW"}  # optimizers whose update is -eta m / (sqrt(v) + eps)


def training_optimizer(problem) -> str | None:
    """The optimizer named by ``problem.recipe`` (lower case), or None when the recipe is unknown."""
    recipe = getattr(problem, "recipe", None)
    opt = recipe.get("optimizer") if isinstance(recipe, dict) else getattr(recipe, "optimizer", None)
    return str(opt).lower() if opt else None


def optimizer_warnings(optimizer: str | None) -> list[str]:
    """Warnings for a training optimizer whose update is not ``-eta_t g`` (TracIn's assumption)."""
    if optimizer in _PRECONDITIONED:
        label = _PRECONDITIONED[optimizer]
        return [
            f"the model was trained with {label}, whose update is the preconditioned "
            "-eta_t m_t / (sqrt(v_t) + eps), not -eta_t g_t: these scores are the plain-gradient (SGD) "
            "TracIn approximation, a learning-rate-weighted similarity of raw gradients, not the loss "
            f"change each example caused along the {label} trajectory. The checkpoints' learning rates "
            f"are the nominal rates, not {label}'s effective per-parameter step sizes "
            "eta_t / (sqrt(v_t) + eps), so the eta_t weighting of checkpoints is nominal too"
        ]
    if optimizer == "lbfgs":
        return [
            "the model was trained with full-batch L-BFGS, whose quasi-Newton line-search steps are "
            "not -eta_t g_t on mini-batches: these scores are the plain-gradient (SGD) TracIn "
            "approximation, and the checkpoints' learning rate is L-BFGS's initial line-search step, "
            "not a step size taken"
        ]
    return []


def _no_checkpoints() -> EstimatorError:
    return EstimatorError("tracincp needs at least one checkpoint", parameter="/checkpoint_ids")


@register
class TracInCP(Estimator):
    name = "tracincp"
    summary = (
        "TracInCP: sum over checkpoints of eta_t * gradient dot products (Pruthi et al. 2020); "
        "options: random projection (TracIn-RP), cosine (GAS), layer selection"
    )
    Params = TracInCPParams
    needs_checkpoints = True
    checkpoint_additive = True

    def check(self, problem_size: ProblemSize, params) -> None:
        if problem_size.n_checkpoints < 1:
            raise _no_checkpoints()

    def state_params(self, params) -> dict:
        p = as_params(self.Params, params)
        return {
            "projection_dim": p.projection_dim,
            "projection": p.projection,
            "seed": p.seed,
            "layers": p.layers,
            "adam_preconditioning": p.adam_preconditioning,
        }

    # ------------------------------------------------------------------ helpers

    def _checkpoints(self, problem, p: TracInCPParams) -> tuple[list, list[float]]:
        ckpts = list(problem.checkpoints)
        if not ckpts:
            raise _no_checkpoints()
        etas = []
        for t, ck in enumerate(ckpts):
            check_state_finite(ck.state, what=f"checkpoint {t} (step {ck.step})", parameter="/checkpoint_ids")
            eta = ck.learning_rate if p.use_checkpoint_learning_rates else 1.0
            if eta is None or not math.isfinite(float(eta)):
                raise EstimatorError(
                    f"checkpoint {t} (step {ck.step}) has no usable learning rate ({eta!r}); "
                    "record it, or set use_checkpoint_learning_rates to false",
                    parameter="/method/params/use_checkpoint_learning_rates",
                )
            etas.append(float(eta))
        return ckpts, etas

    @staticmethod
    def _adam_scales(problem, ckpts, runtime: Runtime, names: list[str]) -> list[torch.Tensor]:
        """The square root of Adam's per-parameter step scale at each checkpoint, for the selected
        parameters (replayed); query and training gradients are both multiplied by it, so that scores
        are ``g' . (s * g)`` and self-influence ``g . (s * g)``, projected or not."""
        from ..gradients import flatten, unflatten
        from ..unroll import Unroller, recipe_of

        recipe = recipe_of(problem)
        if recipe.optimizer not in _PRECONDITIONED:
            raise EstimatorError(
                f"adam_preconditioning needs a model trained with adam or adamw, not {recipe.optimizer}",
                parameter="/method/params/adam_preconditioning",
            )
        unroller = Unroller(problem, recipe, runtime)
        states = unroller.states_after([int(ck.step) for ck in ckpts])
        out = []
        for t, ck in enumerate(ckpts):
            state = states[int(ck.step)]
            error = unroller.replay_error(state, ck.state)
            if not error <= 1e-3:
                raise EstimatorError(
                    f"replaying the model's recipe does not reproduce checkpoint {t} (step {ck.step}; "
                    f"relative distance {error:.3g}), so its Adam moments are unknown; leave "
                    "adam_preconditioning off",
                    parameter="/method/params/adam_preconditioning",
                )
            scale = unflatten(
                unroller.adam_step_scales(state, int(ck.step)).sqrt(), unroller.names, unroller.shapes
            )
            out.append(flatten(scale, names).to(runtime.dtype))
        return out

    def _projector(self, problem, p: TracInCPParams, runtime: Runtime) -> tuple[list[str], Projector | None]:
        names = select_parameters(problem.model, p.layers)
        if p.projection_dim is None:
            return names, None
        shapes = dict(problem.model.named_parameters())
        n_params = sum(shapes[k].numel() for k in names)
        kind, k = capped(p.projection, n_params, p.projection_dim)
        if kind == "identity":
            return names, None
        return names, make_projector(kind, n_params, k, p.seed, runtime.device, runtime.dtype)

    def _projected_train(self, problem, ck, runtime, names, projector, train_range, ticker, scale=None):
        """Stream ``(start, stop, G P)``: projected (optionally Adam-scaled) training gradients, chunk by
        chunk (relative rows)."""
        for start, stop, G in train_gradients(problem, ck.state, runtime, train_range, names=names):
            yield start, stop, projector.project(G if scale is None else G * scale)
            ticker.tick()

    @staticmethod
    def _state_index(state: TrainState, problem, ckpts: list) -> list[int]:
        """For each checkpoint of ``problem``, its entry in ``state`` (matched by step).

        The state may hold more checkpoints than the problem: a job sharded by
        checkpoint reuses the state fitted on all of them.
        """
        steps = [int(s) for s in state.info.get("checkpoint_steps", [])]
        if state.info.get("n_train") != problem.n_train:
            raise EstimatorError(
                "the cached train state was fitted on a different training set", parameter="/method/params"
            )
        out = []
        for t, ck in enumerate(ckpts):
            matches = [i for i, s in enumerate(steps) if s == int(ck.step)]
            if len(matches) == 1:
                out.append(matches[0])
            elif len(steps) == len(ckpts) and steps[t] == int(ck.step):
                out.append(t)
            else:
                raise EstimatorError(
                    f"the cached train state has no unique entry for checkpoint step {ck.step} "
                    f"(it holds steps {steps})",
                    parameter="/checkpoint_ids",
                )
        return out

    @staticmethod
    def _factored_checkpoint(
        problem, ck, eta, runtime, names, cosine, lo, hi, scores, self_inf, qt, tt
    ) -> bool:
        """Add checkpoint ``ck``'s exact-gradient terms from per-layer gradient factors
        (:func:`gradient_factors`: no gradient is formed); False when the model is not a plain chain of
        linear layers (the caller then streams full gradients)."""
        kw = {
            "chunk_size": runtime.chunk_size,
            "device": runtime.device,
            "dtype": runtime.dtype,
            "names": names,
        }
        what = "training examples" if lo == 0 else f"training examples (from row {lo})"
        tf = gradient_factors(
            problem.model, ck.state, problem.train_x[lo:hi], problem.train_y[lo:hi],
            train_objective(problem.task), what=what, **kw,
        )  # fmt: skip
        qf = gradient_factors(
            problem.model, ck.state, problem.query_x, problem.query_y,
            query_objective_fn(problem.task, problem.measurement), what="queries", **kw,
        )  # fmt: skip
        if tf is None or qf is None:
            return False
        Fq, qscale = None, None
        if scores is not None:
            parts = []
            for _, _, f in qf:
                parts.append(f)
                qt.tick()
            Fq = concat_factors(parts)
            if cosine and Fq:  # F.normalize: divide by max(||g||, 1e-12)
                qscale = 1.0 / factor_sqnorms(Fq).sqrt().clamp_min(1e-12)
        for start, stop, Ft in tf:
            sq = factor_sqnorms(Ft) if (self_inf is not None or cosine) else None
            if scores is not None and scores.shape[0]:
                S = factor_inner(Fq, Ft)
                if cosine:
                    S = S * qscale[:, None] * (1.0 / sq.sqrt().clamp_min(1e-12))[None, :]
                scores[:, start:stop] += (eta * S).cpu().numpy()
            if self_inf is not None:
                self_inf[start:stop] += (eta * sq).cpu().numpy()
            if tt is not None:
                tt.tick()
        return True

    # ------------------------------------------------------------------ contract

    def fit(self, problem, params=None, runtime=None) -> TrainState | None:
        """TracIn-RP: projected training-loss gradients per checkpoint (``n x k`` each); else None."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        ckpts, _ = self._checkpoints(problem, p)
        names, projector = self._projector(problem, p, runtime)
        if projector is None:
            return None
        scales = self._adam_scales(problem, ckpts, runtime, names) if p.adam_preconditioning else None
        n = problem.n_train
        tt = Ticker(runtime, "train_gradients", len(ckpts) * n_chunks(n, runtime.chunk_size))
        tensors = {}
        for t, ck in enumerate(ckpts):
            writer = FeatureWriter.for_runtime(runtime, n, projector.k, matrices=len(ckpts))
            scale = scales[t].to(runtime.device) if scales is not None else None
            for _, _, rows in self._projected_train(problem, ck, runtime, names, projector, None, tt, scale):
                writer.write(rows)
            tensors[f"train_features_{t}"] = writer.finish()
            if scale is not None:
                tensors[f"adam_scale_{t}"] = scale.cpu()
        return TrainState(
            tensors=tensors,
            info={
                "checkpoint_steps": [int(ck.step) for ck in ckpts],
                "n_train": n,
                "projection": projector.describe(),
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
        ckpts, etas = self._checkpoints(problem, p)
        cosine = p.normalize == "cosine"
        if cosine and want_self_influence:
            raise EstimatorError(
                "tracincp with normalize='cosine' (GAS) has no self-influence (the cosine of a gradient "
                "with itself is 1); use normalize='none'",
                parameter="/method/params/normalize",
            )
        names, projector = self._projector(problem, p, runtime)
        rows_of = (
            self._state_index(state, problem, ckpts) if state is not None and projector is not None else []
        )
        cached = state is not None and projector is not None
        scales = None
        if p.adam_preconditioning:
            if cached and "adam_scale_0" in state.tensors:
                scales = [state.tensors[f"adam_scale_{rows_of[t]}"] for t in range(len(ckpts))]
            else:
                scales = self._adam_scales(problem, ckpts, runtime, names)

        dtype = numpy_dtype(runtime.dtype)
        lo, hi = column_range(problem, train_range)
        n, m, T = hi - lo, problem.n_query, len(ckpts)
        scores = np.zeros((m, n), dtype=dtype) if want_scores else None
        self_inf = np.zeros(n, dtype=dtype) if want_self_influence else None
        qt = Ticker(runtime, "query_gradients", T * n_chunks(m, runtime.chunk_size)) if want_scores else None
        tt = None if cached else Ticker(runtime, "train_gradients", T * n_chunks(n, runtime.chunk_size))
        dev = torch.device(runtime.device)
        if want_scores or want_self_influence:
            for t, (ck, eta) in enumerate(zip(ckpts, etas, strict=True)):
                scale = scales[t].to(dev, runtime.dtype) if scales is not None else None
                if (
                    projector is None
                    and scale is None
                    and self._factored_checkpoint(
                        problem, ck, eta, runtime, names, cosine, lo, hi, scores, self_inf, qt, tt
                    )
                ):
                    continue
                Q = query_gradients(problem, ck.state, runtime, qt, names=names) if want_scores else None
                if Q is not None and scale is not None:
                    Q = Q * scale
                if projector is None:
                    if Q is not None and cosine:
                        Q = F.normalize(Q, dim=1)
                    chunks = train_gradients(problem, ck.state, runtime, train_range, names=names)
                else:
                    if Q is not None:
                        Q = projector.project(Q)
                        if cosine:
                            Q = F.normalize(Q, dim=1)
                    if cached:  # row blocks of the (possibly memory-mapped) features, relative rows
                        chunks = (
                            (s - lo, e - lo, block)
                            for s, e, block in row_chunks(
                                state.tensors[f"train_features_{rows_of[t]}"],
                                lo,
                                hi,
                                budget=runtime.memory_budget_bytes,
                                device=dev,
                                dtype=runtime.dtype,
                            )
                        )
                    else:
                        chunks = self._projected_train(
                            problem, ck, runtime, names, projector, train_range, tt, scale
                        )
                for start, stop, G in chunks:
                    if scale is not None and projector is None:  # (the projected ones are scaled)
                        G = G * scale
                    if scores is not None:
                        Gs = F.normalize(G, dim=1) if cosine else G
                        scores[:, start:stop] += (eta * (Q @ Gs.T)).cpu().numpy()
                    if self_inf is not None:
                        self_inf[start:stop] += (eta * (G * G).sum(dim=1)).cpu().numpy()
                    if tt is not None and projector is None:
                        tt.tick()
        normalisation = "sum_t eta_t (no 1/n)" if p.use_checkpoint_learning_rates else "sum_t (eta_t = 1)"
        if cosine:
            normalisation += "; cosine of gradients (GAS)"
        optimizer = training_optimizer(problem)
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation=normalisation,
                checkpoint_steps=[int(ck.step) for ck in ckpts],
                learning_rates=etas,
                projection=projector.describe() if projector is not None else {"kind": "identity"},
                normalize=p.normalize,
                layers=p.layers,
                n_selected_parameters=sum(dict(problem.model.named_parameters())[k].numel() for k in names),
                optimizer=optimizer,
                adam_preconditioning=p.adam_preconditioning,
                warnings=[] if p.adam_preconditioning else optimizer_warnings(optimizer),
            ),
        )
