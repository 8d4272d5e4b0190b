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

Train-side state (:meth:`fit`): ``Phi_m``, a factor ``W_m`` of ``K_m = W_m^T W_m`` and ``Q``.
``Phi_m`` is written chunk by chunk (memory-mapped beyond the runtime's memory budget,
:mod:`..features`) while the lower triangle of ``Phi_m^T Phi_m`` is accumulated in float64;
``W_m`` is the inverse of its Cholesky factor when a cheap bound shows that keeps every
eigenvalue (:func:`_pinv_factor`), else comes from an eigendecomposition, and is applied as
``(x W^T) W``, so ``K_m`` itself is never formed. Scoring reads ``Phi_m`` back in float64 row
blocks, so no float64 copy of it exists. When ``k > n`` the ``k x k`` ``K_m`` is replaced by the
equivalent ``n x n`` dual matrix ``D_m = (Phi_m Phi_m^T + damping I)^+`` (``K Phi^T = Phi^T D``),
factored the same way, which is smaller and gives the same scores. Scores are *not* a sum over
members (``Q`` is averaged separately), so TRAK is not ``checkpoint_additive``. ``projection_dim``
is capped at ``p``: ``projection_dim >= p`` or ``projection="identity"`` uses the exact gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch import nn
from torch.func import functional_call

from ..base import Attribution, Estimator, EstimatorError, ProblemSize, Runtime, TrainState, register
from ..features import FeatureWriter, add_lower_gram, block_rows, gram_columns, gram_rows
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
    trainable_names,
    validate_problem,
)
from ..objectives import margin
from ..projection import DenseProjector, Projector, capped, derive_seed, make_projector

STATE_FORMAT = 2
"""Layout of the train state, part of its cache key: 2 holds the factor ``W`` of ``K = W^T W``
(``kernel_factor_m`` / ``dual_factor_m``), 1 held the inverse itself; a stored state of another
layout is refitted rather than misread."""

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


def _projected_margin_gradients(
    model,
    state,
    x: torch.Tensor,
    y: torch.Tensor,
    proj: Projector,
    runtime: Runtime,
    label_probabilities: list[torch.Tensor] | None = None,
    what: str = "training examples",
    destination: Callable[[int], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Projected margin gradients ``G P`` of the examples ``(x, y)``, ``runtime.chunk_size`` rows at a
    time.

    For a :func:`linear_chain` model with a cached dense ``P`` the per-example gradients are
    projected layer by layer from their rank-one factors (``delta_i a_i^T`` times the layer's rows
    of ``P``): the same product without assembling the ``(b, p)`` gradient rows. The factors come
    from forward/backward passes over as many examples as take the memory of one chunk of gradient
    rows (several chunks when the layers are narrow), which cuts the per-pass overhead.
    On that route ``label_probabilities``, when given, receives each pass's ``p_i`` (as
    :func:`_label_probabilities`, from the margin in the runtime dtype) from the same forward pass;
    otherwise it stays empty. With ``destination`` (``b`` -> the next ``b`` rows of a feature
    matrix, e.g. :meth:`FeatureWriter.next_rows`) each chunk is put there, directly when it is on
    the computing device, and that view is yielded.
    """
    kw = {"device": runtime.device, "dtype": runtime.dtype}
    layout = _factor_layout(model) if isinstance(proj, DenseProjector) and proj.cached else None
    factored = None
    if layout is not None:
        factor_width = sum((d_in if w else 0) + (1 if b else 0) + d_out for w, b, d_out, d_in in layout)

        def recording_margin(out, y):
            values = margin(out, y)
            if label_probabilities is not None:  # sigmoid(margin): in float64, as _label_probabilities
                label_probabilities.append(torch.sigmoid(values.detach().to(torch.float64)))
            return values

        factored = gradient_factors(
            model,
            state,
            x,
            y,
            recording_margin,
            chunk_size=runtime.chunk_size * max(1, proj.p // max(1, factor_width)),
            what=what,
            **kw,
        )
    if factored is None:
        for _, _, G in per_sample_gradients(
            model, state, x, y, margin, chunk_size=runtime.chunk_size, what=what, **kw
        ):
            rows = proj.project(G)
            yield rows if destination is None else destination(rows.shape[0]).copy_(rows)
        return
    P = proj.matrix()
    for _, _, factors in factored:
        b = int(factors[0][1].shape[0])
        for s in range(0, b, runtime.chunk_size):
            e = min(s + runtime.chunk_size, b)
            yield _project_factors(
                [(A[s:e], D[s:e]) for A, D in factors],
                layout,
                P,
                None if destination is None else destination(e - s),
            )


PROJECTED_ROWS = 128
"""Rows whose gradients are assembled and projected at once: their gradient rows stay in cache."""


def _project_factors(factors, layout, P: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """``G P`` for the gradient rows given by their per-layer factors (:data:`GradientFactors`),
    accumulated into one ``(b, k)`` result, :data:`PROJECTED_ROWS` rows at a time; in ``into``
    (returned) when given, computed there when it is on ``P``'s device."""
    b = int(factors[0][1].shape[0])
    direct = into is not None and into.device == P.device and into.dtype == P.dtype
    out = into if direct else torch.empty(b, P.shape[1], dtype=P.dtype, device=P.device)
    for u in range(0, b, PROJECTED_ROWS):
        v = min(u + PROJECTED_ROWS, b)
        first, r = True, 0
        for (A, D), (w, bias, d_out, d_in) in zip(factors, layout, strict=True):
            D = D[u:v].to(P.dtype)
            terms = []
            if w:
                G = (D[:, :, None] * A[u:v, None, :d_in].to(P.dtype)).reshape(v - u, d_out * d_in)
                terms.append((G, d_out * d_in))
            if bias:
                terms.append((D, d_out))
            for X, width in terms:
                if first:
                    torch.mm(X, P[r : r + width], out=out[u:v])
                else:
                    out[u:v].addmm_(X, P[r : r + width])
                first, r = False, r + width
        if first or r != P.shape[0]:  # cannot happen for a matching layout; kept as a guard
            raise EstimatorError("the factored projection does not cover the model's parameters")
    return out if into is None or direct else into.copy_(out)


FACTOR_BLOCK = 64
"""Side of the diagonal blocks at which the recursive kernel routines stop splitting (a LAPACK call
or one dense product there)."""

FLOAT64_ROWS = 128
"""Feature rows converted to float64 at once (for the Gram and the scores): small enough to stay in
cache, which makes the products faster than with larger blocks."""


def _split(k: int) -> int:
    """Where the recursive routines split a side of ``k > FACTOR_BLOCK``: near the middle, on a multiple
    of :data:`FACTOR_BLOCK`, so the diagonal blocks that :func:`add_lower_gram` fills completely (its
    upper triangles included) are whole leaves of :func:`_inverse_cholesky_`."""
    return max(FACTOR_BLOCK, (k // 2) // FACTOR_BLOCK * FACTOR_BLOCK)


def _lower_times(W: torch.Tensor, X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W X`` for lower-triangular ``W`` (zeros above the diagonal): halves split recursively, so the
    zero upper-right block is never multiplied and most of the work is in large products."""
    out = torch.empty(W.shape[0], X.shape[1], dtype=X.dtype, device=X.device) if out is None else out
    k = W.shape[0]
    if k <= FACTOR_BLOCK:
        return torch.mm(W, X, out=out)
    h = _split(k)
    _lower_times(W[:h, :h], X[:h], out[:h])
    _lower_times(W[h:, h:], X[h:], out[h:])
    out[h:].addmm_(W[h:, :h], X[:h])
    return out


def _times_lower(X: torch.Tensor, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X W`` for lower-triangular ``W``, recursively as :func:`_lower_times`."""
    out = torch.empty(X.shape[0], W.shape[1], dtype=X.dtype, device=X.device) if out is None else out
    k = W.shape[0]
    if k <= FACTOR_BLOCK:
        return torch.mm(X, W, out=out)
    h = _split(k)
    _times_lower(X[:, :h], W[:h, :h], out[:, :h])
    _times_lower(X[:, h:], W[h:, h:], out[:, h:])
    out[:, :h].addmm_(X[:, h:], W[h:, :h])
    return out


def _inverse_cholesky_(B: torch.Tensor) -> bool:
    """In place: symmetric ``B`` given by its lower triangle (zeros above the diagonal blocks) becomes
    ``W = L^-1``, the inverse of its Cholesky factor ``L`` (lower triangular); False (``B`` then
    partly overwritten) if ``B`` is not numerically positive definite.

    Recursive on ``B = [[B11, .], [B21, B22]]``: ``W11`` from ``B11``; ``L21 = B21 W11^T``;
    ``W22`` from ``B22 - L21 L21^T``; ``W21 = -W22 L21 W11``. The factor and its inverse come from
    one pass of mostly large products: single-threaded at 512 x 512, about three quarters of the time
    of a blocked factorisation followed by a blocked triangular inversion.
    """
    k = B.shape[0]
    if k <= FACTOR_BLOCK:
        L, info = torch.linalg.cholesky_ex(B)  # reads the lower triangle only
        if int(info) != 0:
            return False
        eye = torch.eye(k, dtype=B.dtype, device=B.device)
        B.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return True
    h = _split(k)
    W11, B21, B22 = B[:h, :h], B[h:, :h], B[h:, h:]
    if not _inverse_cholesky_(W11):
        return False
    L21t = _lower_times(W11, B21.T)  # L21^T = W11 B21^T
    add_lower_gram(B22, L21t, alpha=-1.0, block=FACTOR_BLOCK)  # B22 - L21 L21^T (lower triangle)
    if not _inverse_cholesky_(B22):
        return False
    _times_lower(_lower_times(B22, L21t.T), W11, out=B21).neg_()  # -(W22 L21) W11
    return True


def _proves_full_rank(bound: float, rtol: float) -> bool:
    """Whether ``bound >= lambda_max / lambda_min`` keeps every eigenvalue above ``rtol * lambda_max``."""
    return math.isfinite(bound) and 0.0 < bound < 0.5 / rtol


def _pinv_factor(
    A: torch.Tensor, damping: float, rtol: float, rebuild: Callable[[], torch.Tensor] | None = None
) -> tuple[torch.Tensor, int, bool]:
    """``W`` (``rank x n``) with ``W^T W = (A + damping I)^+`` for symmetric PSD ``A`` (float64) given
    by its lower triangle, eigenvalues below ``rtol * max`` dropped; the rank; and whether ``W`` is
    lower triangular. With ``rebuild`` (which recomputes ``A``), ``A`` is factored in place instead
    of copied.

    Scores use ``K = W^T W`` as ``(x W^T) W``, so the inverse itself is never formed. Fast path:
    ``W = L^-1`` from the Cholesky factor ``L`` when that provably drops nothing. For PSD
    ``B = A + damping I``, ``lambda_max(B) <= min(tr B, ||B||_inf)`` and
    ``1 / lambda_min(B) <= min(tr B^-1, ||B^-1||_inf)`` with ``tr B^-1 = ||W||_F^2``, so a product of
    those bounds below ``1 / rtol`` (checked with a factor 2 to spare for the rounding of the computed
    factor, whose relative error is about ``cond * eps << 1`` there) means every eigenvalue is above
    ``rtol * max``: the pseudo-inverse is the inverse. The traces are tried first, the infinity norms
    (which need the mirrored ``B`` and ``W^T W``) only when they do not settle it. Otherwise (rank
    deficient or nearly so, or Cholesky fails) ``W = diag(lambda^-1/2) V^T`` over the kept
    eigenpairs of an eigendecomposition, several times slower.
    """
    n = A.shape[0]
    if n:
        top = float(torch.diagonal(A).sum()) + n * damping
        L = A.tril() if rebuild is None else A.tril_()
        if damping:
            L.diagonal().add_(damping)
        if _inverse_cholesky_(L):
            W = L
            inv_top = float(torch.linalg.vector_norm(W)) ** 2
            if not _proves_full_rank(top * inv_top, rtol):
                A, rebuild = (A if rebuild is None else rebuild()), None
                B = A.tril() + A.tril(-1).T
                B.diagonal().add_(damping)
                top = min(top, float(B.abs().sum(dim=1).max()))
                inv_top = min(inv_top, float((W.T @ W).abs().sum(dim=1).max()))
            if _proves_full_rank(top * inv_top, rtol):
                return W, n, True
        if rebuild is not None:
            A = rebuild()
    evals, evecs = torch.linalg.eigh(A, UPLO="L")
    evals = evals + damping
    top = float(evals.abs().max()) if evals.numel() else 0.0
    keep = evals > rtol * top
    return (evecs[:, keep] * evals[keep].rsqrt()).T.contiguous(), int(keep.sum()), False


class _Float64Rows:
    """Float64 copies of row blocks, made in one buffer reused from block to block (each copy is valid
    until the next): a fresh float64 block per call costs more in first-touched memory pages than
    the conversion itself."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        b, width = rows.shape
        if self._buffer is None or self._buffer.shape[0] < b or self._buffer.shape[1] != width:
            self._buffer = torch.empty(b, width, dtype=torch.float64, device=self.device)
        return self._buffer[:b].copy_(rows)


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

    def state_params(self, params) -> dict:
        return {**super().state_params(as_params(self.Params, params)), "state_format": STATE_FORMAT}

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
        """Per member: projected training margin gradients ``Phi``, the kernel factor ``W``, and ``Q``."""
        return self._fit(problem, params, runtime, None)

    def _fit(
        self,
        problem,
        params,
        runtime,
        projectors: dict | None,
        members: list | None = None,
        to_float64: _Float64Rows | None = None,
    ) -> TrainState:
        """:meth:`fit`; ``members`` when the caller already has them (checked once), ``to_float64``
        to share its conversion buffer with the caller's scoring."""
        p = as_params(self.Params, params)
        runtime = runtime or Runtime()
        validate_problem(problem, need_queries=False)
        self._check_task(problem)
        n = problem.n_train
        if n == 0:
            raise EstimatorError("the training set is empty", parameter="/train_dataset_id")
        members = members if members is not None else self._members(problem, p)
        self.check(ProblemSize(n, problem.n_query, n_parameters(problem.model), len(problem.checkpoints)), p)
        k = self._projector(problem, p, runtime, 0, projectors).k
        dual = k > n
        rtol = max(k, n) * torch.finfo(torch.float64).eps  # numerically zero eigenvalues of the Gram
        dev = torch.device(runtime.device)
        tt = Ticker(runtime, "train_gradients", len(members) * n_chunks(n, runtime.chunk_size))
        tensors: dict[str, torch.Tensor] = {}
        to_float64 = to_float64 or _Float64Rows(dev)
        ranks, triangular_factors = [], []
        Qsum = torch.zeros(n, dtype=torch.float64, device=dev)
        for mi, (_, st) in enumerate(members):
            proj = self._projector(problem, p, runtime, mi, projectors)
            writer = FeatureWriter.for_runtime(runtime, n, k, matrices=len(members))
            gram = None if dual else torch.zeros(k, k, dtype=torch.float64, device=dev)
            label_probabilities: list[torch.Tensor] = []
            for rows in _projected_margin_gradients(
                problem.model,
                st,
                problem.train_x,
                problem.train_y,
                proj,
                runtime,
                label_probabilities,
                destination=writer.next_rows,  # rows are projected straight into the features
            ):
                if gram is not None:  # the lower triangle of Phi^T Phi, a block of rows at a time
                    for u in range(0, rows.shape[0], FLOAT64_ROWS):
                        add_lower_gram(gram, to_float64(rows[u : u + FLOAT64_ROWS]))
                tt.tick()
            Phi = writer.finish()

            def gram_of_features(Phi=Phi) -> torch.Tensor:  # from row blocks of the written features
                gram_of = (
                    gram_rows if dual else gram_columns
                )  # Phi Phi^T (n < k) or Phi^T Phi's lower triangle
                return gram_of(Phi, budget=runtime.memory_budget_bytes, device=dev)

            if gram is None:
                gram = gram_of_features()
            W, rank, triangular = _pinv_factor(gram, p.damping, rtol, rebuild=gram_of_features)
            del gram
            if not math.isfinite(float(W.sum())):  # any NaN or inf entry makes the sum non-finite
                raise EstimatorError(
                    "the TRAK kernel inverse is not finite; increase damping",
                    parameter="/method/params/damping",
                )
            ranks.append(rank)
            triangular_factors.append(triangular)
            if not label_probabilities:
                label_probabilities.append(
                    _label_probabilities(problem.model, st, problem.train_x, problem.train_y, runtime)
                )
            Qsum += 1.0 - torch.cat(label_probabilities)
            tensors[f"features_{mi}"] = Phi
            tensors[f"{'dual' if dual else 'kernel'}_factor_{mi}"] = W.cpu()
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
                "triangular_factor": triangular_factors,
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
        dev = torch.device(runtime.device)
        outer, inner = _Float64Rows(dev), _Float64Rows(dev)
        if state is None:
            state = self._fit(problem, p, runtime, projectors, members, outer)
        info = state.info
        if info.get("n_train") != problem.n_train or info.get("n_members") != len(members):
            raise EstimatorError(
                "the cached TRAK state does not match this problem's training set or checkpoints",
                parameter="/method/params",
            )
        dual = info["form"] == "dual"
        triangular = info.get("triangular_factor", [False] * len(members))
        lo, hi = column_range(problem, train_range)
        m, cols, M = problem.n_query, hi - lo, len(members)
        dtype = numpy_dtype(runtime.dtype)
        Q = state.tensors["q"][lo:hi].to(dev, torch.float64)

        S: torch.Tensor | None = None  # allocated once the first member's projection matrix is freed
        si = torch.zeros(cols, dtype=torch.float64, device=dev) if want_self_influence else None
        qt = Ticker(runtime, "query_gradients", M * n_chunks(m, runtime.chunk_size)) if want_scores else None
        budget = runtime.memory_budget_bytes

        def blocks(Phi, start=0, stop=None, to_float64=outer):  # row blocks of the (possibly mapped) features
            step = min(block_rows(Phi.shape[1], budget), FLOAT64_ROWS)
            stop = Phi.shape[0] if stop is None else stop
            for s in range(start, stop, step):
                e = min(s + step, stop)
                yield s, e, to_float64(Phi[s:e])

        Qq = (
            torch.zeros(m, dtype=torch.float64, device=dev)
            if want_scores and problem.measurement != "margin"
            else None
        )
        for mi, (_, st) in enumerate(members):
            Phi = state.tensors[f"features_{mi}"]
            W = state.tensors[f"{'dual' if dual else 'kernel'}_factor_{mi}"].to(dev, torch.float64)
            if want_scores:
                proj = projectors.pop(mi, None) or self._projector(problem, p, runtime, mi)
                # phi' = -grad(q) P = grad(margin) P with q = -margin; for the loss, -grad loss =
                # (1 - p'_j) grad margin per member, whose factor is averaged separately like Q (below)
                query_probabilities: list[torch.Tensor] = []
                rows = []
                for chunk in _projected_margin_gradients(
                    problem.model,
                    st,
                    problem.query_x,
                    problem.query_y,
                    proj,
                    runtime,
                    query_probabilities if Qq is not None else None,
                    what="queries",
                ):
                    rows.append(chunk)
                    qt.tick()
                phi_q = (torch.cat(rows) if rows else torch.zeros(0, proj.k, device=dev)).to(torch.float64)
                if Qq is not None:
                    if not query_probabilities:
                        query_probabilities.append(
                            _label_probabilities(problem.model, st, problem.query_x, problem.query_y, runtime)
                        )
                    Qq += 1.0 - torch.cat(query_probabilities)
                del proj  # frees P (the member's last use) before the scoring buffers are allocated
                if S is None:
                    S = torch.zeros(m, cols, dtype=torch.float64, device=dev)
                if dual:  # ((phi_q Phi^T) W^T) W[:, lo:hi] = (phi_q Phi^T) D[:, lo:hi]
                    B = torch.empty(m, Phi.shape[0], dtype=torch.float64, device=dev)
                    for s, e, block in blocks(Phi):
                        B[:, s:e] = phi_q @ block.T
                    S += (B @ W.T) @ W[:, lo:hi]
                    del B
                else:  # ((phi_q W^T) W) Phi_s^T = (phi_q K) Phi_s^T
                    if triangular[mi]:  # the products skip W's zero blocks
                        A = _times_lower(_lower_times(W, phi_q.T).T, W)
                    else:
                        A = (phi_q @ W.T) @ W
                    for s, e, block in blocks(Phi, lo, hi):
                        S[:, s - lo : e - lo].addmm_(A, block.T)
            if si is not None:
                for s, e, block in blocks(Phi, lo, hi):
                    if dual:  # ((Phi_s Phi^T) * D[s:e]).sum(1) = (((Phi_s Phi^T) W^T) * W[:, s:e]^T).sum(1)
                        R = torch.empty(e - s, Phi.shape[0], dtype=torch.float64, device=dev)
                        for s2, e2, other in blocks(Phi, to_float64=inner):
                            R[:, s2:e2] = block @ other.T
                        si[s - lo : e - lo] += ((R @ W.T) * W[:, s:e].T).sum(dim=1)
                    else:  # ((Phi_s K) * Phi_s).sum(1) = ||Phi_s W^T||^2 per row
                        si[s - lo : e - lo] += (block @ W.T).square_().sum(dim=1)
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
