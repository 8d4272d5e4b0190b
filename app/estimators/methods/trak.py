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
``phi'_{j,m} = grad_theta margin(z'_j) P_m`` (canonical TRAK) for ``measurement="margin"``;
for ``measurement="loss"`` the scores are multiplied row-wise by ``mean_m (1 - p'_{j,m})``
(``p'`` the query's label probability): per member ``-grad CE = (1 - p') grad margin``, and,
like ``Q`` on the training side, that factor is averaged over the members separately from
the kernel term (weighting each member's term by its own ``1 - p'`` instead over-weights the
early, less confident checkpoints: on the bench MLP, LDS 0.281 vs 0.297). With one member
both are ``phi' = -grad_theta q(z') P`` for the query objective ``q``. This
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
accumulated; the kernel is inverted by Cholesky when a cheap bound shows it keeps every
eigenvalue (:func:`_psd_pinv`), else by eigendecomposition. Scoring reads ``Phi_m`` back in
float64 row blocks, so no float64 copy of it exists. When ``k > n``
the ``k x k`` ``K_m`` is replaced by the equivalent ``n x n`` dual matrix
``D_m = (Phi_m Phi_m^T + damping I)^+`` (``K Phi^T = Phi^T D``), which is smaller
and gives the same scores. Scores are *not* a sum over members (``Q`` is averaged
separately), so TRAK is not ``checkpoint_additive``. ``projection_dim`` is capped
at ``p``: ``projection_dim >= p`` or ``projection="identity"`` uses the exact gradients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch import nn
from torch.func import functional_call

from ..base import Attribution, Estimator, EstimatorError, ProblemSize, Runtime, TrainState, register
from ..features import FeatureWriter, gram_rows, row_chunks
from ..gradients import (
    Ticker,
    as_params,
    check_state_finite,
    column_range,
    functional_state,
    gradient_factors,
    linear_chain,
    metadata,
    n_chunks,
    n_parameters,
    numpy_dtype,
    per_sample_gradients,
    query_gradients,
    trainable_names,
    validate_problem,
)
from ..objectives import margin
from ..projection import DenseProjector, Projector, capped, derive_seed, make_projector

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


def _factor_layout(model) -> list[tuple[bool, bool, int, int]] | None:
    """Per linear layer of a :func:`linear_chain` model ``(weight trainable, bias trainable, d_out,
    d_in)`` in the flat gradient order, or None (another model, or a layout that does not match)."""
    chain = linear_chain(model)
    if chain is None:
        return None
    names = trainable_names(model)
    layout, order = [], []
    for name, m in chain:
        if type(m) is not nn.Linear:
            continue
        w, b = f"{name}.weight" in names, m.bias is not None and f"{name}.bias" in names
        if w or b:
            layout.append((w, b, m.out_features, m.in_features))
            order += ([f"{name}.weight"] if w else []) + ([f"{name}.bias"] if b else [])
    return layout if order == names else None


def _projected_margin_gradients(problem, state, proj: Projector, runtime: Runtime) -> Iterator[torch.Tensor]:
    """Projected training margin gradients ``G P``, a chunk of rows at a time.

    For a :func:`linear_chain` model with a cached dense ``P`` the per-example gradients are
    projected layer by layer from their rank-one factors (``delta_i a_i^T`` times the layer's rows
    of ``P``): the same product without assembling the ``(b, p)`` gradient rows.
    """

    def objective(out, y):
        return margin(out, y)

    kw = {"chunk_size": runtime.chunk_size, "device": runtime.device, "dtype": runtime.dtype}
    layout = _factor_layout(problem.model) if isinstance(proj, DenseProjector) and proj.cached else None
    factored = None
    if layout is not None:
        factored = gradient_factors(
            problem.model, state, problem.train_x, problem.train_y, objective, what="training examples", **kw
        )
    if factored is None:
        for _, _, G in per_sample_gradients(
            problem.model, state, problem.train_x, problem.train_y, objective, what="training examples", **kw
        ):
            yield proj.project(G)
        return
    P = proj.matrix()
    for _, _, factors in factored:
        rows, r = None, 0
        for (A, D), (w, b, d_out, d_in) in zip(factors, layout, strict=True):
            D = D.to(P.dtype)
            part = None
            if w:
                G = (D[:, :, None] * A[:, None, :d_in].to(P.dtype)).reshape(D.shape[0], -1)
                part = G @ P[r : r + d_out * d_in]
                r += d_out * d_in
            if b:
                pb = D @ P[r : r + d_out]
                part = pb if part is None else part.add_(pb)
                r += d_out
            if part is not None:
                rows = part if rows is None else rows.add_(part)
        if rows is None or r != proj.p:  # cannot happen for a matching layout; kept as a guard
            raise EstimatorError("the factored projection does not cover the model's parameters")
        yield rows


def _psd_pinv(A: torch.Tensor, damping: float, rtol: float) -> tuple[torch.Tensor, int]:
    """``(A + damping I)^+`` for symmetric PSD ``A`` (float64), dropping eigenvalues below ``rtol * max``.

    Fast path: a Cholesky inverse when it provably drops nothing. For PSD ``B = A + damping I``,
    ``lambda_max(B) <= min(tr B, ||B||_inf)`` and ``1 / lambda_min(B) <= min(tr B^-1, ||B^-1||_inf)``,
    so a product of those bounds below ``1 / rtol`` (checked with a factor 2 to spare for the
    rounding of the computed inverse, whose relative error is about ``cond * eps << 1`` there) means
    every eigenvalue is above ``rtol * max``: the pseudo-inverse is the inverse. Otherwise (rank
    deficient or nearly so, or Cholesky fails) an eigendecomposition, several times slower.
    """
    n = A.shape[0]
    B = A + damping * torch.eye(n, dtype=A.dtype, device=A.device) if damping else A
    if n:
        L, info = torch.linalg.cholesky_ex(B)
        if int(info) == 0:
            inv = torch.cholesky_inverse(L)
            top = min(float(torch.diagonal(B).sum()), float(B.abs().sum(dim=1).max()))
            inv_top = min(float(torch.diagonal(inv).sum()), float(inv.abs().sum(dim=1).max()))
            bound = top * inv_top
            if math.isfinite(bound) and 0.0 < bound < 0.5 / rtol:
                return inv, n
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

    def _projector(
        self, problem, p: TRAKParams, runtime: Runtime, member: int, cache: dict | None = None
    ) -> Projector:
        """An independent projection per ensemble member (as in the TRAK paper); member 0 uses ``seed``.

        ``cache`` (per call of :meth:`attribute`) keeps a member's projector, and so its generated
        matrix, from the training features to the queries."""
        if cache is not None and member in cache:
            return cache[member]
        n_params = n_parameters(problem.model)
        kind, k = capped(p.projection, n_params, p.projection_dim)
        seed = p.seed if member == 0 else derive_seed(p.seed, member)
        proj = make_projector(kind, n_params, k, seed, runtime.device, runtime.dtype)
        if cache is not None:
            cache[member] = proj
        return proj

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
        return self._fit(problem, params, runtime, None)

    def _fit(self, problem, params, runtime, projectors: dict | None) -> TrainState:
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        self._check_task(problem)
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        members = self._members(problem, p)
        self.check(ProblemSize(n, problem.n_query, n_parameters(problem.model), len(problem.checkpoints)), p)
        k = self._projector(problem, p, runtime, 0, projectors).k
        dual = k > n
        rtol = max(k, n) * torch.finfo(torch.float64).eps  # numerically zero eigenvalues of the Gram
        dev = torch.device(runtime.device)
        tt = Ticker(runtime, "train_gradients", len(members) * n_chunks(n, runtime.chunk_size))
        tensors: dict[str, torch.Tensor] = {}
        ranks = []
        Qsum = torch.zeros(n, dtype=torch.float64, device=dev)
        for mi, (_, st) in enumerate(members):
            proj = self._projector(problem, p, runtime, mi, projectors)
            writer = FeatureWriter.for_runtime(runtime, n, k, matrices=len(members))
            gram = None if dual else torch.zeros(k, k, dtype=torch.float64, device=dev)
            for rows in _projected_margin_gradients(problem, st, proj, runtime):
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
        projectors: dict[int, Projector] = {}
        if state is None:
            state = self._fit(problem, p, runtime, projectors)
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

        by_margin = dataclasses.replace(problem, measurement="margin")
        Qq = (
            torch.zeros(m, dtype=torch.float64, device=dev)
            if want_scores and problem.measurement != "margin"
            else None
        )
        for mi, (_, st) in enumerate(members):
            Phi = state.tensors[f"features_{mi}"]
            inv = state.tensors[f"{'dual' if dual else 'kernel_inverse'}_{mi}"].to(dev, torch.float64)
            if S is not None:
                # phi' = -(grad q) P: the projected gradient of the query margin (or of minus its loss)
                proj = self._projector(problem, p, runtime, mi, projectors)
                # the query margin gradient (q = -margin); for the loss, -grad loss = (1 - p'_j) grad margin
                # per member, whose factor is averaged separately like Q (applied below)
                phi_q = -proj.project(query_gradients(by_margin, st, runtime, qt)).to(torch.float64)
                if Qq is not None:
                    pq = _label_probabilities(problem.model, st, problem.query_x, problem.query_y, runtime)
                    Qq += 1.0 - pq
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
        if S is not None and Qq is not None:
            S.mul_((Qq / M).unsqueeze(1))
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
