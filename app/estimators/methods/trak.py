"""TRAK (Park, Georgiev, Ilyas, Leclerc & Madry, ICML 2023; ESTIMATORS.md 2.20).

For each ensemble member ``m`` (the model's checkpoints, each standing in for an
independently trained model, or the final weights alone):

* ``Phi_m`` (``n x k``): rows ``phi_i = grad_theta f(z_i) P``, the gradient of the
  training example's *margin* ``f = logit_y - logsumexp(other logits)``
  (:func:`..objectives.margin`; for two classes ``z_y - z_other``), projected by a
  seeded random ``p x k`` matrix ``P`` (:mod:`..projection`);
* ``K_m = (Phi_m^T Phi_m + damping I)^+`` (pseudo-inverse: a plain inverse unless
  ``damping = 0`` and the Gram matrix is rank deficient);
* ``Q_ii = 1 - p_i`` with ``p_i`` the softmax probability of ``z_i``'s label (the
  derivative of the cross-entropy with respect to the margin), averaged over the
  members as in the paper.

``scores[j, i] = (mean_m phi'_{j,m}^T K_m phi_{i,m}) * mean_m Q_ii`` with
``phi' = -grad_theta q(z') P`` where ``q`` is the query objective: ``phi'`` is the
projected gradient of the query *margin* for ``measurement="margin"``
(canonical TRAK) and of minus the query loss for ``measurement="loss"``. This
is the one-step Newton estimate of the effect of removing ``z_i`` on ``q`` for
logistic regression on the linearised model (Gauss-Newton Hessian approximated
by ``Phi^T Phi``), so a positive score means a proponent under
base.SIGN_CONVENTION. For binary logistic regression with labels ``y = +-1``,
margin ``y theta^T x``, identity projection and one member this is
``y' y_i x'^T (X^T X)^-1 x_i (1 - p_i)``; a two-class softmax linear model gives the
same with the bias folded into ``x`` (its margin gradients only span the logit
difference direction, where the pseudo-inverse acts).

Self-influence: ``(mean_m phi_{i,m}^T K_m phi_{i,m}) * mean_m Q_ii`` with the
training margin gradient on both sides. No soft-thresholding. Classification
only (cross-entropy).

Train-side state (:meth:`fit`): ``Phi_m``, ``K_m`` and ``Q``. ``Phi_m`` is written chunk by chunk
(memory-mapped beyond the runtime's memory budget, :mod:`..features`) while ``Phi_m^T Phi_m`` is
accumulated; scoring reads it back in float64 row blocks, so no float64 copy of it exists. When
``k > n`` the ``k x k`` ``K_m`` is replaced by the equivalent ``n x n`` dual matrix
``D_m = (Phi_m Phi_m^T + damping I)^+`` (``K Phi^T = Phi^T D``), which is smaller
and gives the same scores. Scores are *not* a sum over members (``Q`` is averaged
separately), so TRAK is not ``checkpoint_additive``. ``projection_dim`` is capped
at ``p``: ``projection_dim >= p`` or ``projection="identity"`` uses the exact gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch.func import functional_call

from ..base import Attribution, Estimator, EstimatorError, ProblemSize, Runtime, TrainState, register
from ..features import FeatureWriter, gram_rows, row_chunks
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    functional_state,
    metadata,
    n_chunks,
    n_parameters,
    numpy_dtype,
    per_sample_gradients,
    query_gradients,
    validate_problem,
)
from ..objectives import margin
from ..projection import Projector, capped, derive_seed, make_projector

MAX_KERNEL_SIDE = 32768
"""Largest kernel inverted (``min(k, n)`` rows; float64, so at most 8 GiB)."""


@dataclass
class TRAKParams:
    """TRAK: projected margin-gradient kernel regression, ensembled over checkpoints (Park et al. 2023)."""

    projection_dim: Annotated[int, Ge(1)] = field(
        default=2048,
        metadata={"description": "projection dimension k (capped at the number of parameters p)"},
    )
    projection: Literal["rademacher", "gaussian", "srht", "countsketch", "identity"] = field(
        default="rademacher",
        metadata={"description": "random projection kind; 'identity' uses the exact gradients (k = p)"},
    )
    seed: Annotated[int, Ge(0)] = field(default=0, metadata={"description": "seed of the random projection"})
    damping: Annotated[float, Ge(0)] = field(
        default=0.0,
        metadata={"description": "ridge lambda added to Phi^T Phi (traker's lambda_reg); 0 = pseudo-inverse"},
    )
    use_checkpoints: bool = field(
        default=True,
        metadata={
            "description": "ensemble over the model's checkpoints (each a surrogate for an independently "
            "trained model); false, or no checkpoints: the final weights only"
        },
    )


def _label_probabilities(model, state, x, y, runtime: Runtime) -> torch.Tensor:
    """``p_i``: the softmax probability of each example's label (= sigmoid of its margin), float64.

    Model outputs at ``state`` (eval mode, no grad), a chunk at a time: memory O(chunk x classes).
    """
    model.eval()
    dev = torch.device(runtime.device)
    names, params, fixed = functional_state(model, state, device=dev, dtype=runtime.dtype)
    dt = params[names[0]].dtype
    probs = []
    with torch.no_grad():
        for s in range(0, int(x.shape[0]), runtime.chunk_size):
            xs = x[s : s + runtime.chunk_size]
            xs = xs.to(dev, dt) if xs.is_floating_point() else xs.to(dev)
            out = functional_call(model, (params, fixed), (xs,)).to(torch.float64)
            probs.append(torch.sigmoid(margin(out, y[s : s + runtime.chunk_size].to(dev))))
    return torch.cat(probs) if probs else torch.zeros(0, device=dev, dtype=torch.float64)


def _psd_pinv(A: torch.Tensor, damping: float, rtol: float) -> tuple[torch.Tensor, int]:
    """``(A + damping I)^+`` for symmetric PSD ``A`` (float64), dropping eigenvalues below ``rtol * max``."""
    evals, evecs = torch.linalg.eigh(A)
    evals = evals + damping
    top = float(evals.abs().max()) if evals.numel() else 0.0
    keep = evals > rtol * top
    inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    return (evecs * inv) @ evecs.T, int(keep.sum())


@register
class TRAK(Estimator):
    name = "trak"
    summary = "TRAK: projected margin-gradient kernel with 1 - p_i reweighting, ensembled (Park et al. 2023)"
    Params = TRAKParams

    def _members(self, problem, p: TRAKParams) -> list[tuple[int | None, dict]]:
        if p.use_checkpoints and problem.checkpoints:
            members = [(int(ck.step), ck.state) for ck in problem.checkpoints]
        else:
            members = [(None, problem.weights)]
        for step, st in members:
            where = "the model weights" if step is None else f"checkpoint step {step}"
            check_state_finite(
                st, what=where, parameter="/checkpoint_ids" if step is not None else "/model_id"
            )
        return members

    def _projector(self, problem, p: TRAKParams, runtime: Runtime, member: int) -> Projector:
        """An independent projection per ensemble member (as in the TRAK paper); member 0 uses ``seed``."""
        n_params = n_parameters(problem.model)
        kind, k = capped(p.projection, n_params, p.projection_dim)
        seed = p.seed if member == 0 else derive_seed(p.seed, member)
        return make_projector(kind, n_params, k, seed, runtime.device, runtime.dtype)

    def check(self, problem_size: ProblemSize, params) -> None:
        p = as_params(self.Params, params)
        k = problem_size.n_parameters if p.projection == "identity" else p.projection_dim
        side = min(k, problem_size.n_parameters, problem_size.n_train)
        if side > MAX_KERNEL_SIDE:
            raise EstimatorError(
                f"trak inverts a {side} x {side} kernel (min of projection dimension, parameters and "
                f"training examples); the limit is {MAX_KERNEL_SIDE}. Lower projection_dim",
                parameter="/method/params/projection_dim",
            )

    @staticmethod
    def _check_task(problem) -> None:
        if problem.task.kind != "classification":
            raise EstimatorError(
                "trak uses the classification margin; it does not support regression models",
                parameter="/method/name",
            )

    def fit(self, problem, params=None, runtime=None) -> TrainState:
        """Per member: projected training margin gradients ``Phi``, the kernel inverse, and ``Q``."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        self._check_task(problem)
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        members = self._members(problem, p)
        self.check(ProblemSize(n, problem.n_query, n_parameters(problem.model), len(problem.checkpoints)), p)
        k = self._projector(problem, p, runtime, 0).k
        dual = k > n
        rtol = max(k, n) * torch.finfo(torch.float64).eps  # numerically zero eigenvalues of the Gram
        dev = torch.device(runtime.device)
        tt = Ticker(runtime, "train_gradients", len(members) * n_chunks(n, runtime.chunk_size))
        tensors: dict[str, torch.Tensor] = {}
        ranks = []
        Qsum = torch.zeros(n, dtype=torch.float64, device=dev)
        for mi, (_, st) in enumerate(members):
            proj = self._projector(problem, p, runtime, mi)
            writer = FeatureWriter.for_runtime(runtime, n, k, matrices=len(members))
            gram = None if dual else torch.zeros(k, k, dtype=torch.float64, device=dev)
            for _, _, G in per_sample_gradients(
                problem.model,
                st,
                problem.train_x,
                problem.train_y,
                lambda out, y: margin(out, y),
                chunk_size=runtime.chunk_size,
                device=dev,
                dtype=runtime.dtype,
                what="training examples",
            ):
                rows = proj.project(G)
                writer.write(rows)
                if gram is not None:  # Phi^T Phi, one chunk of rows at a time
                    rows64 = rows.to(torch.float64)
                    gram.addmm_(rows64.T, rows64)
                tt.tick()
            Phi = writer.finish()
            if gram is None:  # Phi Phi^T (n < k), from row blocks of the written features
                gram = gram_rows(Phi, budget=runtime.memory_budget_bytes, device=dev)
            inv, rank = _psd_pinv(0.5 * (gram + gram.T), p.damping, rtol)
            del gram
            if not bool(torch.isfinite(inv).all()):
                raise EstimatorError(
                    "the TRAK kernel inverse is not finite; increase damping",
                    parameter="/method/params/damping",
                )
            ranks.append(rank)
            Qsum += 1.0 - _label_probabilities(problem.model, st, problem.train_x, problem.train_y, runtime)
            tensors[f"features_{mi}"] = Phi
            tensors[f"{'dual' if dual else 'kernel_inverse'}_{mi}"] = inv.cpu()
        tensors["q"] = (Qsum / len(members)).cpu()
        return TrainState(
            tensors=tensors,
            info={
                "n_train": n,
                "n_members": len(members),
                "member_steps": [s for s, _ in members],
                "form": "dual" if dual else "primal",
                "projection": proj.describe(),
                "rank": ranks,
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
        self._check_task(problem)
        members = self._members(problem, p)
        if state is None:
            state = self.fit(problem, p, runtime)
        info = state.info
        if info.get("n_train") != problem.n_train or info.get("n_members") != len(members):
            raise EstimatorError(
                "the cached TRAK state does not match this problem's training set or checkpoints",
                parameter="/method/params",
            )
        dual = info["form"] == "dual"
        dev = torch.device(runtime.device)
        lo, hi = column_range(problem, train_range)
        m, cols, M = problem.n_query, hi - lo, len(members)
        dtype = numpy_dtype(runtime.dtype)
        Q = state.tensors["q"][lo:hi].to(dev, torch.float64)

        S = torch.zeros(m, cols, dtype=torch.float64, device=dev) if want_scores else None
        si = torch.zeros(cols, dtype=torch.float64, device=dev) if want_self_influence else None
        qt = Ticker(runtime, "query_gradients", M * n_chunks(m, runtime.chunk_size)) if want_scores else None
        budget = runtime.memory_budget_bytes

        def blocks(Phi, start=0, stop=None):  # float64 row blocks of the (possibly mapped) features
            return row_chunks(Phi, start, stop, budget=budget, device=dev)

        for mi, (_, st) in enumerate(members):
            Phi = state.tensors[f"features_{mi}"]
            inv = state.tensors[f"{'dual' if dual else 'kernel_inverse'}_{mi}"].to(dev, torch.float64)
            if S is not None:
                # phi' = -(grad q) P: the projected gradient of the query margin (or of minus its loss)
                proj = self._projector(problem, p, runtime, mi)
                phi_q = -proj.project(query_gradients(problem, st, runtime, qt)).to(torch.float64)
                if dual:  # (phi_q Phi^T) D[:, lo:hi]
                    B = torch.empty(m, Phi.shape[0], dtype=torch.float64, device=dev)
                    for s, e, block in blocks(Phi):
                        B[:, s:e] = phi_q @ block.T
                    S += B @ inv[:, lo:hi]
                    del B
                else:  # (phi_q K) Phi_s^T
                    A = phi_q @ inv
                    for s, e, block in blocks(Phi, lo, hi):
                        S[:, s - lo : e - lo] += A @ block.T
            if si is not None:
                for s, e, block in blocks(Phi, lo, hi):
                    if dual:  # ((Phi_s Phi^T) * D[lo:hi]).sum(1)
                        R = torch.empty(e - s, Phi.shape[0], dtype=torch.float64, device=dev)
                        for s2, e2, other in blocks(Phi):
                            R[:, s2:e2] = block @ other.T
                        si[s - lo : e - lo] += (R * inv[s:e, :]).sum(dim=1)
                    else:  # ((Phi_s K) * Phi_s).sum(1)
                        si[s - lo : e - lo] += ((block @ inv) * block).sum(dim=1)
        # in place (the same operations as S / M * Q): no second m x n float64 matrix
        scores = S.div_(M).mul_(Q).cpu().numpy().astype(dtype) if S is not None else None
        self_inf = si.div_(M).mul_(Q).cpu().numpy().astype(dtype) if si is not None else None
        return Attribution(
            scores=scores,
            self_influence=self_inf,
            metadata=metadata(
                self.name,
                problem,
                normalisation="mean over members of phi'^T K phi_i, times mean_m (1 - p_i)",
                projection=info["projection"],
                damping=p.damping,
                n_members=M,
                member_steps=info["member_steps"],
                kernel_rank=info["rank"],
                kernel_form=info["form"],
                query_function="margin" if problem.measurement == "margin" else "minus loss",
            ),
        )
