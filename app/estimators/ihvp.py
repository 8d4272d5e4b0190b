"""Inverse-Hessian-vector products for influence functions (ESTIMATORS.md 2.11-2.13).

Everything here works on the Hessian of the *training objective*
``mean_i L(z_i) + weight_decay/2 ||theta||^2`` at ``problem.weights``, without
forming it:

* :class:`TrainingHessian` multiplies a block of vectors ``V`` (``p x r``) by
  ``H`` with the Pearlmutter trick, accumulated over chunks of training rows:
  in closed form for plain MLPs (:class:`~app.estimators.gradients.ChainHessian`,
  all ``r`` columns as one batch of matrix products) and one-layer linear models
  (:class:`~app.estimators.gradients.GLMHead`), by autodiff (``grad`` of
  ``grad . v``, vectorised over the columns) for anything else; optionally on a
  fixed random subsample of rows (``rows=``), or on any set of rows
  (:meth:`TrainingHessian.rows_matmul`, LiSSA's mini-batches).
* :func:`conjugate_gradient` solves ``(H + damping I) X = B`` by block CG: all
  unconverged columns share one Krylov space and one Hessian product per
  iteration, and it fails loudly on negative curvature.
* :func:`lissa` is the stochastic Neumann series of Agarwal et al. (2017) as used
  by Koh & Liang, with divergence detection.
* :func:`arnoldi` returns the top eigenpairs of ``H`` (Arnoldi, i.e. Lanczos with
  full re-orthogonalisation for a symmetric operator; Schioppa et al. 2022).

The methods run Hessian products in the runtime's precision (:func:`product_dtype`:
float32 by default, float64 when the runtime asks for it), the precision their
gradients and scores already have; CG's blocks follow the products (its small
matrices and norms are float64), Arnoldi's vectors, inner products and
recurrences stay float64, LiSSA's iterate follows the products.
Per-sample gradients are not needed here: these functions only ever hold
``p x r`` blocks and a chunk of training rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from .base import EstimatorError, InfluenceProblem, NumericalError, Runtime
from .gradients import ChainHessian, GLMHead, Ticker, all_finite, flatten, functional_state, unflatten
from .objectives import per_example_loss

HVP = Callable[[torch.Tensor], torch.Tensor]
"""``hvp(V) -> H V`` for ``V`` of shape ``(p, r)`` (without damping)."""

BatchHVP = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``hvp_batch(rows, V) -> H_rows V``: the Hessian of the objective restricted to training rows ``rows``."""

# Bounds on what one vectorised Hessian-vector product holds: (training rows x vectors) and
# (vectors x parameters), so memory stays bounded for big models as well as for long blocks.
_ROW_VECTOR_BUDGET = 2**18
_VECTOR_PARAM_BUDGET = 2**24
# Columns vectorised at once by a Hessian-vector product (see TrainingHessian._apply).
_HVP_COLUMNS = 32
# Closed-form products of linear_chain models (ChainHessian): the total size of the per-row quantities
# cached across products of the operator.
_CHAIN_CACHE_ELEMENTS = 2**26
# One-layer linear models: once the closed-form products have cost as much as forming the Hessian
# would, the full-data operator forms it (p x p, float64) and multiplies by it; only up to this p.
_DENSE_GLM_MAX_P = 4096
# LiSSA: ||h_j|| may not exceed this many times (j + 1) ||v|| (the bound when every step contracts);
# checked for the whole block every step and for every column every _LISSA_COLUMN_CHECK steps.
_LISSA_COLUMN_CHECK = 10
_LISSA_GROWTH_SLACK = 4.0
# Lanczos breakdown: a new direction shorter than this (relative to ||H||) means an invariant subspace.
_BREAKDOWN_RTOL = 1e-10
# Block CG's Cholesky QR: the smallest diagonal entry of the Cholesky factor of the (column-normalised)
# Gram matrix, relative to the largest, below which Householder QR is used instead (condition ~1e4).
_CHOLQR_MIN = 1e-4
# CG: a relative residual above this means the iteration diverged.
_CG_DIVERGED = 1e8

_DAMPING = "/method/params/damping"
_SCALE = "/method/params/scale"


def _check_finite(t: torch.Tensor, what: str, parameter: str | None) -> None:
    if not all_finite(t):
        raise NumericalError(
            f"{what} contain NaN/inf values; the weights may have diverged or the Hessian is "
            "badly conditioned (increase damping)",
            parameter=parameter,
        )


def product_dtype(runtime: Runtime) -> torch.dtype:
    """The dtype Hessian products run in for a runtime: float64 when it asks for float64, else float32.

    The gradients the solvers are fed (and the scores they produce) carry the runtime's precision;
    float32 products keep a solve as accurate as its float32 right-hand sides while running at twice
    the matrix-product throughput of float64 on CPU. CG keeps its vectors in this dtype too (its small
    matrices in float64); Arnoldi's stay float64."""
    return torch.float64 if runtime.dtype == torch.float64 else torch.float32


def subsample_rows(n: int, k: int | None, seed: int = 0) -> torch.Tensor | None:
    """A sorted random subset of ``k`` of the ``n`` training rows (seeded), or None for all rows."""
    if k is None or k >= n:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: int(k)].sort().values


class TrainingHessian:
    """Hessian-vector products with the training objective at ``problem.weights``.

    ``H V = (1/|S|) sum_{i in S} d^2 L(z_i)/d theta^2 V + weight_decay V`` for a block
    ``V`` (``p x r``, or a vector), where ``S`` is every training row, or ``rows``
    (a fixed subsample, e.g. from :func:`subsample_rows`). Damping is *not*
    included (the solvers add it). Each product is ``d/dtheta (grad L . v)``
    (reverse-over-reverse), vmapped over the columns. Parameters are all
    trainable ones, in :func:`~app.estimators.gradients.trainable_names` order
    (the order of the per-sample gradients). Products are computed in ``dtype``
    (default float64) on ``runtime.device``, ``runtime.chunk_size`` rows at a time,
    and returned in the dtype of ``V`` (float64 for other dtypes).
    For a plain MLP (:class:`~app.estimators.gradients.ChainHessian`) the same
    product is evaluated by Pearlmutter's R-operator written out as matrix products
    over rows x columns, in chunks of ``chunk_size`` times a power of two rows; the
    per-row forward/backward quantities of the operator's own rows are computed
    once and reused by every product (within a memory budget).
    For a one-layer linear model (:class:`~app.estimators.gradients.GLMHead`) the
    same product is evaluated in closed form, ``sum_i (Lambda_i (x) a~_i a~_i^T) v``,
    and :meth:`matmul` switches to the explicit ``p x p`` matrix (``p <= 4096``) as
    soon as the products it has computed cost as much as forming that matrix
    (ski-rental: never more than about twice the cheaper of the two); the values
    agree to rounding.

    ``products`` counts calls (one block product, over all rows or over a mini-batch).
    """

    def __init__(
        self,
        problem: InfluenceProblem,
        runtime: Runtime | None = None,
        *,
        rows: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        runtime = runtime or Runtime()
        self.device = torch.device(runtime.device)
        self.dtype = dtype
        self.chunk_size = max(1, int(runtime.chunk_size))
        model = problem.model
        model.eval()
        names, params, fixed = functional_state(model, problem.weights, device=self.device, dtype=dtype)
        shapes = [params[k].shape for k in names]
        self.names = names
        self.theta = flatten(params, names)
        self.p = int(self.theta.numel())
        self.weight_decay = float(problem.weight_decay)
        self.x, self.y = problem.train_x, problem.train_y
        self.n = int(self.x.shape[0])
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        self.n_rows = self.n if self.rows is None else int(self.rows.numel())
        self.products = 0
        task = problem.task
        self._task, self._params, self._fixed = task, params, fixed
        self._glm = GLMHead.of(model, names)
        self._dense: torch.Tensor | None = None  # explicit H for a one-layer linear model (see matmul)
        self._glm_work = 0.0
        self._chain = None if self._glm is not None else ChainHessian.of(model, names)
        self._tensors = {**fixed, **params}
        self._chain_cache: dict[int, list] = {}  # rows per chunk -> prepared chunks of the operator's rows
        # the cache's bound: _CHAIN_CACHE_ELEMENTS, or half the runtime's memory budget when it is smaller
        budget = getattr(runtime, "memory_budget_bytes", None)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self._cache_elements = (
            _CHAIN_CACHE_ELEMENTS
            if budget is None
            else min(_CHAIN_CACHE_ELEMENTS, int(budget) // (2 * itemsize))
        )

        def total(flat: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, (unflatten(flat, names, shapes), fixed), (xs,))
            return per_example_loss(out, ys, task).sum()

        grad_total = grad(total)
        theta = self.theta

        def hvp_one(v: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            # reverse-over-reverse, d/dtheta (grad . v): on CPU about 1.7x faster than jvp-of-grad, whose
            # forward-mode rules for the loss backward run as Python decompositions
            return grad(lambda f: torch.dot(grad_total(f, xs, ys), v))(theta)

        self._hvp_one = hvp_one

    def _inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = self.x[idx], self.y[idx]
        xs = xs.to(self.device, self.dtype) if xs.is_floating_point() else xs.to(self.device)
        ys = ys.to(self.device, self.dtype) if ys.is_floating_point() else ys.to(self.device)
        return xs, ys

    def _chain_chunks(self, idx: torch.Tensor | None, n_rows: int, rows: int, cache: bool, scale: float):
        """``(sel, prepared or None)`` per chunk of ``rows`` rows, products scaled by ``scale``: a list
        when the operator's own rows are prepared once per chunk size and kept (within the memory
        budget), else a generator that prepares each chunk as it is used (memory for one chunk)."""
        if cache and rows in self._chain_cache:
            return self._chain_cache[rows]

        def prepared():
            for start in range(0, n_rows, rows):
                stop = min(start + rows, n_rows)
                sel = torch.arange(start, stop) if idx is None else idx[start:stop]
                xs, ys = self._inputs(sel)
                yield sel, self._chain.prepare(xs, ys, self._params, self._fixed, self._task, scale)

        size = n_rows * sum(ly.inp + 3 * ly.out for ly in self._chain.layers)
        if cache and size * (len(self._chain_cache) + 1) <= self._cache_elements:
            self._chain_cache[rows] = list(prepared())
            return self._chain_cache[rows]
        return prepared()

    def _apply(
        self,
        V: torch.Tensor,
        idx: torch.Tensor | None,
        n_rows: int,
        cache: bool = False,
        alpha: float = 1.0,
        beta: float = 0.0,
    ) -> torch.Tensor:
        """``alpha H_S V + beta V`` over the rows ``S`` (``idx``, or the first ``n_rows``)."""
        vector = V.dim() == 1
        out_dtype = V.dtype if V.dtype in (torch.float32, torch.float64) else torch.float64
        V = (V[:, None] if vector else V).to(self.device, self.dtype)
        if V.shape[0] != self.p:
            raise ValueError(f"expected {self.p} rows, got {tuple(V.shape)}")
        r = V.shape[1]
        if r and n_rows and self._chain is not None:  # a plain MLP: exact products in closed form
            fn, out = None, None
            V = V.contiguous()
            scale = alpha / n_rows  # folded into the prepared rows: no pass over the result
            rows = self._chain.chunk_rows(r, n_rows, self.chunk_size)
            chunks = self._chain_chunks(idx, n_rows, rows, cache and alpha == 1.0, scale)
            if isinstance(chunks, list):  # kept: one call over every chunk
                closed = [ctx for _, ctx in chunks if ctx is not None]
                if closed:
                    out = self._chain.hvp_sum(closed, V, self._tensors)
                streamed = [(sel, None) for sel, ctx in chunks if ctx is None]
            else:  # prepared one chunk at a time, in the layout the whole product would take
                layout, streamed = self._chain.layout(r, n_rows), chunks
            for sel, ctx in streamed:
                if ctx is not None:
                    part = self._chain.hvp_sum([ctx], V, self._tensors, layout=layout)
                else:  # rows the closed form does not cover: autodiff
                    if fn is None:
                        fn = vmap(self._hvp_one, in_dims=(1, None, None), out_dims=1,
                                  chunk_size=max(1, min(r, _HVP_COLUMNS)))  # fmt: skip
                    part = fn(V, *self._inputs(sel)).mul_(scale)
                out = part if out is None else out.add_(part)
        else:
            out = torch.zeros_like(V)
        if r and n_rows and self._chain is None:
            # vectorise at most _HVP_COLUMNS columns at once, and give narrow blocks (e.g. Arnoldi's
            # single vectors) proportionally more rows: rows x columns stays within chunk_size x
            # _HVP_COLUMNS, and on CPU this runs 1.2-5x faster than one wide vmap over chunk_size rows
            cols = max(1, min(r, _HVP_COLUMNS, _ROW_VECTOR_BUDGET // min(self.chunk_size, n_rows),
                              _VECTOR_PARAM_BUDGET // self.p))  # fmt: skip
            rows = min(n_rows, self.chunk_size * max(1, _HVP_COLUMNS // cols))
            fn = vmap(self._hvp_one, in_dims=(1, None, None), out_dims=1, chunk_size=cols)
            glm = self._glm
            Vb = None if glm is None else glm.to_blocks(V)
            for start in range(0, n_rows, rows):
                stop = min(start + rows, n_rows)
                sel = torch.arange(start, stop) if idx is None else idx[start:stop]
                xs, ys = self._inputs(sel)
                if glm is not None:  # one linear layer: the exact product in closed form
                    feats = glm.features(xs, self._params, self._fixed)
                    lam = None if feats is None else glm.output_hessian(feats[1], ys, self._task)
                    if lam is not None:
                        out += glm.from_blocks(glm.hvp_sum(feats[0], lam, Vb))
                        continue
                out += fn(V, xs, ys)
            out.mul_(alpha / n_rows)
        coef = alpha * self.weight_decay + beta
        if coef:
            out.add_(V, alpha=coef)
        _check_finite(out, "Hessian-vector products", _DAMPING)
        self.products += 1
        out = out.to(out_dtype)
        return out[:, 0] if vector else out

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` over every row (or the fixed subsample ``rows``)."""
        glm = self._glm
        if glm is not None and self._dense is None and self.p <= _DENSE_GLM_MAX_P and self.n_rows:
            r = 1 if V.dim() == 1 else int(V.shape[1])
            self._glm_work += 2.0 * self.n_rows * glm.k * glm.d1 * r  # multiply-adds of the product
            if self._glm_work >= 0.5 * self.n_rows * glm.k * glm.d1 * (glm.d1 + 1) * (glm.k + 1) / glm.k:
                self._dense = self._glm_dense()
        if self._dense is not None:
            vector = V.dim() == 1
            Vm = (V[:, None] if vector else V).to(self.device, self.dtype)
            if Vm.shape[0] != self.p:
                raise ValueError(f"expected {self.p} rows, got {tuple(Vm.shape)}")
            out = self._dense @ Vm
            _check_finite(out, "Hessian-vector products", _DAMPING)
            self.products += 1
            out = out.to(V.dtype if V.dtype in (torch.float32, torch.float64) else torch.float64)
            return out[:, 0] if vector else out
        return self._apply(V, self.rows, self.n_rows, cache=True)

    def _glm_dense(self) -> torch.Tensor | None:
        """The explicit ``H`` (with weight decay) of a one-layer linear model on ``rows``; None when
        a chunk does not fit the closed form."""
        glm = self._glm
        Hb = torch.zeros(glm.k, glm.d1, glm.k, glm.d1, device=self.device, dtype=self.dtype)
        for start in range(0, self.n_rows, self.chunk_size):
            stop = min(start + self.chunk_size, self.n_rows)
            sel = torch.arange(start, stop) if self.rows is None else self.rows[start:stop]
            xs, ys = self._inputs(sel)
            feats = glm.features(xs, self._params, self._fixed)
            lam = None if feats is None else glm.output_hessian(feats[1], ys, self._task)
            if lam is None:
                self._glm_work = -math.inf  # never try again
                return None
            Hb += glm.hessian_sum(feats[0], lam)
        perm = glm.permutation().to(self.device)
        H = Hb.reshape(self.p, self.p)[perm][:, perm] / self.n_rows
        H = 0.5 * (H + H.T)
        if self.weight_decay:
            H.diagonal().add_(self.weight_decay)
        _check_finite(H, "the Hessian", _DAMPING)
        return H

    __call__ = matmul

    def rows_matmul(self, rows: torch.Tensor, V: torch.Tensor, *, alpha: float = 1.0, beta: float = 0.0):
        """``alpha H_rows V + beta V`` with ``H_rows`` the objective's Hessian on the given training rows
        only (mean over them + wd); ``alpha`` and ``beta`` cost no extra pass (LiSSA's step)."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        return self._apply(V, rows, int(rows.numel()), alpha=alpha, beta=beta)


# ----------------------------------------------------------------------------- conjugate gradient


@dataclass
class CGResult:
    """Solution ``x`` of ``(H + damping I) x = b`` (same shape as ``b``) and convergence figures."""

    x: torch.Tensor
    iterations: int
    """iterations run (the slowest column)."""
    relative_residual: torch.Tensor
    """``||b - (H + damping I) x|| / ||b||`` per column (CG's recursive residual; 0 where ``b = 0``)."""
    converged: bool
    products: int
    """Hessian products (blocks) used."""


def _orthonormal_basis(Z: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An orthonormal basis ``Q`` (``p x min(p, s)``) of the span of the columns of ``Z``, given their
    Gram matrix ``G = Z^T Z``, and ``M`` with ``Q = Z M`` (None when ``Q`` came from Householder).

    Cholesky QR on the column-normalised block when it is well conditioned: ``Q = Z D^-1 L^-T`` with
    ``L L^T`` the Gram matrix of the normalised columns (``D`` their norms), i.e. one product with an
    ``s x s`` matrix, about 3x faster than Householder QR on CPU; orthonormal to about ``cond^2 eps``
    (below 1e-7 within the threshold). Householder QR otherwise (nearly dependent columns), which
    returns orthonormal columns whatever the rank. Normalising first lets a column much shorter than
    the others keep an accurate direction."""
    p, s = Z.shape
    if s <= p:
        dn = G.diagonal().clamp_min(torch.finfo(G.dtype).tiny).sqrt()
        L, info = torch.linalg.cholesky_ex(G / dn[:, None] / dn[None, :])
        d = L.diagonal()
        if (
            int(info) == 0
            and bool(torch.isfinite(d).all())
            and float(d.min()) >= _CHOLQR_MIN * float(d.max())
        ):
            eye = torch.eye(s, dtype=G.dtype, device=G.device)
            M = torch.linalg.solve_triangular(L, eye, upper=False).T / dn[:, None]  # D^-1 L^-T
            return Z @ M.to(Z.dtype), M
    Zn = Z / torch.linalg.vector_norm(Z, dim=0).clamp_min(torch.finfo(Z.dtype).tiny)
    return torch.linalg.qr(Zn, mode="reduced").Q, None


def _gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A^T B`` as float64 (the product itself in the blocks' dtype)."""
    return (A.T @ B).to(torch.float64)


def _search_block(
    Z: torch.Tensor, R: torch.Tensor, ZtZ: torch.Tensor, ZtR: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block CG's next search block ``P``, an orthonormal basis of the columns of ``Z``, and ``P^T R``,
    from ``Z^T Z`` and ``Z^T R`` (one product with ``p`` rows, or two after a Householder fallback).
    The small matrices (``Z^T Z``, ``Z^T R``, ``P^T R``) are float64 whatever the dtype of ``Z``."""
    P, M = _orthonormal_basis(Z, ZtZ)
    return P, ((P.T @ R).to(ZtR.dtype) if M is None else M.T @ ZtR)


def conjugate_gradient(
    hvp: HVP,
    B: torch.Tensor,
    damping: float = 0.0,
    max_iter: int = 100,
    rtol: float = 1e-8,
    *,
    ticker: Ticker | None = None,
    dtype: torch.dtype = torch.float64,
) -> CGResult:
    """Solve ``(H + damping I) X = B`` by block conjugate gradients over the columns of ``B``.

    All unconverged columns share one Krylov space (O'Leary's block CG, with the search block
    orthonormalised every iteration, the breakdown-free variant of Ji & Li 2017): one ``hvp`` of
    the search block per iteration, and a block of ``r`` right-hand sides typically needs far fewer
    iterations than single-vector CG would for each. Every iteration is a Galerkin step: it
    minimises the ``(H + damping I)``-norm of each column's error over the search space, so a column
    converges to the same solution as with independent CG (to ``rtol``). A column stops (leaves the
    block) when ``||r|| <= rtol ||b||``; a zero column is solved exactly at no cost; with one column this
    is plain CG.

    The ``p``-row blocks (solution, residuals, search block and its product) and their products are
    in ``dtype``: float64 by default, float32 when ``hvp`` computes in float32 anyway (the caller's
    choice): the recursive residual still falls geometrically to ``rtol`` (each step's rounding is
    relative to the residual it updates), the true residual's floor is the float32 products' own, and
    the block products run twice as fast. The ``r x r`` matrices (Gram matrices, Cholesky factors,
    step coefficients) and the norms are float64 either way.

    Raises :class:`NumericalError` naming ``damping`` when the damped Hessian has non-positive
    curvature on the search space (``P^T (H + damping I) P`` not positive definite), when the residual
    blows up or turns NaN, or when after ``max_iter`` iterations some residual has not decreased at
    all. Not reaching ``rtol`` within ``max_iter`` is *not* an error: ``converged`` is False and
    ``relative_residual`` says how far it got. ``ticker`` ticks once per iteration and is topped up to
    ``max_iter`` at the end.
    """
    vector = B.dim() == 1
    B = B[:, None] if vector else B
    bnorm = torch.linalg.vector_norm(B.to(torch.float64), dim=0)
    B = B.to(dtype)
    p, r = B.shape
    X = torch.zeros(p, r, dtype=dtype, device=B.device)
    rnorm = bnorm.clone()
    target = rtol * bnorm
    iterations = products = 0
    # the active columns, compacted: their residuals Ra and solutions Xa (written back to X when they
    # stop); RtR = Ra^T Ra, and PtR = P^T Ra for the search block P
    ia = ((rnorm > target) & (bnorm > 0)).nonzero()[:, 0]
    Ra = B[:, ia].contiguous()
    Xa = torch.zeros_like(Ra)
    RtR = _gram(Ra, Ra)
    P, PtR = _search_block(Ra, Ra, RtR, RtR) if ia.numel() else (None, None)
    for it in range(max_iter):
        if not ia.numel():
            break
        AP = hvp(P).to(dtype)
        products += 1
        if damping:
            AP.add_(P, alpha=damping)
        PAP = _gram(P, AP)
        PAP = 0.5 * (PAP + PAP.T)
        if not bool(torch.isfinite(PAP).all()):
            raise NumericalError(
                f"conjugate gradient produced NaN/inf at iteration {it + 1}; the Hessian is badly "
                f"conditioned: increase damping (now {damping:g})",
                parameter=_DAMPING,
            )
        L, info = torch.linalg.cholesky_ex(PAP)
        if int(info) != 0:
            # P is orthonormal: the eigenvalues of P^T (H + damping I) P are Rayleigh quotients of the
            # damped Hessian, so the smallest bounds its smallest eigenvalue from above
            curvature = float(torch.linalg.eigvalsh(PAP)[0]) - damping
            raise NumericalError(
                f"conjugate gradient met non-positive curvature at iteration {it + 1}: the Hessian of the "
                f"training objective plus damping*I is not positive definite (the Hessian has an eigenvalue "
                f"<= {curvature:.3g}, with damping={damping:g}); the model is non-convex or not at a "
                f"minimum. Increase damping well above {max(-curvature, 0.0):.3g}",
                parameter=_DAMPING,
            )
        alpha = torch.cholesky_solve(PtR, L).to(dtype)
        Xa.addmm_(P, alpha)
        Ra.addmm_(AP, alpha, alpha=-1.0)
        RtR = _gram(Ra, Ra)
        new = RtR.diagonal().clamp_min(0.0).sqrt()
        rnorm[ia] = new
        iterations = it + 1
        if ticker is not None:
            ticker.tick()
        if not bool(torch.isfinite(new).all()) or bool((new > _CG_DIVERGED * bnorm[ia]).any()):
            raise NumericalError(
                f"conjugate gradient diverged at iteration {it + 1} (residual grew more than "
                f"{_CG_DIVERGED:.0e}-fold): increase damping (now {damping:g})",
                parameter=_DAMPING,
            )
        keep = new > target[ia]
        if not bool(keep.all()):
            X[:, ia[~keep]] = Xa[:, ~keep]
            if not bool(keep.any()):
                ia = ia[:0]
                break
            ia, Ra, Xa = ia[keep], Ra[:, keep].contiguous(), Xa[:, keep].contiguous()
            RtR = RtR[keep][:, keep]
        # next search block: the residuals made (H + damping I)-conjugate to the current block,
        # Z = Ra - P beta; P^T Ra = 0 (each step is a Galerkin step on P) and P^T P = I, so
        # Z^T Z = Ra^T Ra + beta^T beta and Z^T Ra = Ra^T Ra: no further products with p rows
        beta = torch.cholesky_solve(_gram(AP, Ra), L)
        P, PtR = _search_block(torch.addmm(Ra, P, beta.to(dtype), alpha=-1.0), Ra, RtR + beta.T @ beta, RtR)
    if ia.numel():
        X[:, ia] = Xa
    if ticker is not None and iterations < max_iter:
        ticker.tick(max_iter - iterations)
    tiny = torch.finfo(bnorm.dtype).tiny
    rel = torch.where(bnorm > 0, rnorm / bnorm.clamp_min(tiny), torch.zeros_like(bnorm))
    done = (rnorm <= target) | (bnorm == 0)
    if r and not bool(done.all()) and float(rel.max()) >= 1.0:
        raise NumericalError(
            f"conjugate gradient made no progress in {iterations} iterations (relative residual "
            f"{float(rel.max()):.3g}): the damped Hessian is badly conditioned or indefinite; increase "
            f"damping (now {damping:g}) or max_iter",
            parameter=_DAMPING,
        )
    return CGResult(
        x=X[:, 0] if vector else X,
        iterations=iterations,
        relative_residual=rel,
        converged=bool(done.all()),
        products=products,
    )


# ----------------------------------------------------------------------------- LiSSA


@dataclass
class LissaResult:
    """LiSSA's estimate of ``(H + damping I)^-1 B`` and its diagnostics."""

    x: torch.Tensor
    max_growth: float
    """max over steps of ``||h_j|| / ((j + 1) ||v||)`` (at most 1 when every step contracts)."""
    products: int


def lissa(
    hvp_batch: BatchHVP,
    B: torch.Tensor,
    *,
    n_rows: int,
    damping: float,
    scale: float,
    depth: int,
    repeats: int = 1,
    batch_size: int = 32,
    seed: int = 0,
    ticker: Ticker | None = None,
    dtype: torch.dtype = torch.float64,
    affine: bool = False,
) -> LissaResult:
    """Stochastic Neumann-series estimate of ``(H + damping I)^-1 B`` (Agarwal et al. 2017).

    For each repeat: ``h_0 = v``, ``h_j = v + h_{j-1} - (H_j h_{j-1} + damping h_{j-1}) / scale``
    where ``H_j = hvp_batch(rows_j, .)`` is the Hessian on ``batch_size`` training
    rows drawn uniformly (with replacement) from ``range(n_rows)``; the estimate is
    ``h_depth / scale`` averaged over ``repeats``. All columns of ``B`` share the
    mini-batches, so each column's result depends only on ``seed`` (not on which
    other columns are solved with it). Converges when ``scale`` exceeds the largest
    eigenvalue of every mini-batch's damped Hessian.

    Raises :class:`NumericalError` naming ``scale`` when the iterate turns NaN/inf
    or its norm exceeds ``4 (j + 1) ||v||`` (a bound that holds whenever every step
    contracts): the series diverges because ``scale`` is below the largest
    eigenvalue, or the Hessian has negative curvature that ``damping`` does not
    cover. ``ticker`` ticks once per step.

    The growth bound is checked every step for the block as a whole (``||h_j||_F <= 4 (j + 1)
    ||V||_F``, which fails only if some column fails; NaN/inf anywhere fails it) and for every column
    every 10 steps and at the last; ``max_growth`` is the largest of these figures.

    The iterate is kept in ``dtype`` (``hvp_batch`` gets and returns that dtype): float32 suffices
    for a stochastic estimate whose error is orders of magnitude above float32 rounding; the result
    is float64. With ``affine=True``, ``hvp_batch(rows, V, alpha=, beta=)`` must return
    ``alpha H_rows V + beta V`` (:meth:`TrainingHessian.rows_matmul`): the step then costs one pass
    over the iterate instead of three.
    """
    if scale <= 0:
        raise EstimatorError("scale must be positive", parameter=_SCALE)
    vector = B.dim() == 1
    V = (B[:, None] if vector else B).to(dtype).contiguous()
    g = torch.Generator().manual_seed(int(seed))
    vnorm = torch.linalg.vector_norm(V.to(torch.float64), dim=0)
    vtotal = float(torch.linalg.vector_norm(vnorm))
    safe = vnorm.clamp_min(torch.finfo(torch.float64).tiny)
    acc = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
    keep = 1.0 - damping / scale
    max_growth, products = 0.0, 0
    for rep in range(repeats):
        h = V.clone()
        for j in range(1, depth + 1):
            idx = torch.randint(n_rows, (batch_size,), generator=g)
            # h <- v + h - (H_j h + damping h) / scale, in place
            if affine:
                torch.add(hvp_batch(idx, h, alpha=-1.0 / scale, beta=keep).to(dtype), V, out=h)
            else:
                Hh = hvp_batch(idx, h).to(dtype)
                h.mul_(keep).add_(V).add_(Hh, alpha=-1.0 / scale)
            products += 1
            # every step: the whole block's norm (one dot product; NaN/inf anywhere makes it NaN/inf, and
            # it exceeds the block's bound only if some column exceeds its own); the norm of every column
            # every _LISSA_COLUMN_CHECK steps and at the last one
            flat = h.reshape(-1)
            sq = float(torch.dot(flat, flat))
            worst = math.sqrt(sq) / ((j + 1) * vtotal) if vtotal > 0 else sq  # sq = 0 unless NaN/inf
            if (
                math.isfinite(worst)
                and worst <= _LISSA_GROWTH_SLACK
                and (j % _LISSA_COLUMN_CHECK == 0 or j == depth)
            ):
                norms = torch.linalg.vector_norm(h, dim=0).to(torch.float64)
                growth = torch.where(vnorm > 0, norms / ((j + 1) * safe), torch.zeros_like(norms))
                worst = float(growth.max()) if growth.numel() else 0.0
            if not math.isfinite(worst) or worst > _LISSA_GROWTH_SLACK:
                raise NumericalError(
                    f"LiSSA diverged at step {j} of repeat {rep + 1} (the iterate grew to "
                    f"{'NaN/inf' if not math.isfinite(worst) else f'{worst * (j + 1):.3g} times'} the "
                    f"norm of its right-hand side): scale={scale:g} must exceed the largest eigenvalue of "
                    f"the mini-batch Hessians plus damping (damping={damping:g}). Increase scale (e.g. "
                    "tenfold), or increase damping if the model is non-convex",
                    parameter=_SCALE,
                )
            max_growth = max(max_growth, worst)
            if ticker is not None:
                ticker.tick()
        acc.add_(h.to(torch.float64), alpha=1.0 / scale)
    X = acc / repeats
    return LissaResult(x=X[:, 0] if vector else X, max_growth=max_growth, products=products)


# ----------------------------------------------------------------------------- Arnoldi / Lanczos


@dataclass
class ArnoldiResult:
    """Top eigenpairs by magnitude: ``H ~ V diag(eigenvalues) V^T`` on the retained subspace."""

    eigenvalues: torch.Tensor
    """(k,) float64, sorted by decreasing magnitude."""
    eigenvectors: torch.Tensor
    """(p, k) float64, orthonormal columns."""
    iterations: int
    restarts: int
    residuals: torch.Tensor | None = None
    """(k,) Lanczos estimates of ``||H v - lambda v||`` per pair: ``|beta_last * s_last|``."""
    """times the Krylov space was exhausted and a fresh random direction was added."""


def arnoldi(
    hvp: HVP,
    p: int,
    rank: int,
    n_iter: int,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    ticker: Ticker | None = None,
) -> ArnoldiResult:
    """Top-``rank`` eigenpairs (by magnitude) of the symmetric operator ``hvp`` (float64).

    Arnoldi iteration with full re-orthogonalisation (Gram-Schmidt twice), which for a
    symmetric operator is Lanczos without loss of orthogonality: ``n_iter`` products
    from a seeded random start build an orthonormal basis ``Q`` and the projection
    ``T = Q^T H Q`` (tridiagonal up to rounding, symmetrised); the Ritz pairs of
    ``T`` are returned. When the Krylov space is exhausted early (an invariant
    subspace: repeated eigenvalues, or ``n_iter`` near ``p``) the iteration continues
    from a fresh random direction orthogonal to the basis, so ``rank = n_iter = p``
    recovers the full eigendecomposition. ``n_iter`` is capped at ``p``; the caller
    must ensure ``rank <= n_iter``. Memory ``O(n_iter p)``.
    """
    if rank < 1 or p < 1:
        raise ValueError("rank and p must be positive")
    n_iter = min(int(n_iter), int(p))
    if rank > n_iter:
        raise ValueError(f"rank {rank} exceeds the number of iterations {n_iter}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))

    def random_direction(Qk: torch.Tensor) -> torch.Tensor:
        w = torch.randn(p, generator=gen, dtype=torch.float64).to(dev)
        for _ in range(2):
            w = w - Qk @ (Qk.T @ w)
        return w / torch.linalg.vector_norm(w)

    Q = torch.zeros(p, n_iter, dtype=torch.float64, device=dev)
    T = torch.zeros(n_iter, n_iter, dtype=torch.float64, device=dev)
    Q[:, 0] = random_direction(Q[:, :0])
    scale, restarts, k_done = 0.0, 0, 0
    for k in range(n_iter):
        w = hvp(Q[:, k]).to(torch.float64)
        _check_finite(w, "Hessian-vector products", _DAMPING)
        scale = max(scale, float(torch.linalg.vector_norm(w)))
        Qk = Q[:, : k + 1]
        h = Qk.T @ w
        w = w - Qk @ h
        h2 = Qk.T @ w  # second Gram-Schmidt pass: keeps the basis orthogonal to machine precision
        w = w - Qk @ h2
        T[: k + 1, k] = h + h2
        k_done = k + 1
        if ticker is not None:
            ticker.tick()
        beta = float(torch.linalg.vector_norm(w))
        if k + 1 == n_iter:
            break
        if beta <= _BREAKDOWN_RTOL * max(scale, torch.finfo(torch.float64).tiny):
            Q[:, k + 1] = random_direction(Qk)  # invariant subspace found: continue in its complement
            restarts += 1
        else:
            T[k + 1, k] = beta
            Q[:, k + 1] = w / beta
    Tk = T[:k_done, :k_done]
    Tk = 0.5 * (Tk + Tk.T)
    evals, S = torch.linalg.eigh(Tk)
    order = torch.argsort(evals.abs(), descending=True)[:rank]
    return ArnoldiResult(
        eigenvalues=evals[order].contiguous(),
        eigenvectors=(Q[:, :k_done] @ S[:, order]).contiguous(),
        iterations=k_done,
        restarts=restarts,
        residuals=(beta * S[-1, order].abs()).contiguous(),
    )


def extreme_eigenvalues(
    hvp: HVP, p: int, n_iter: int = 20, seed: int = 0, *, device=None
) -> tuple[float, float]:
    """``(smallest, largest)`` Ritz values after ``n_iter`` Lanczos steps: inner bounds on the spectrum.

    The largest Ritz value is at most the largest eigenvalue (and close to it after
    a few dozen steps); a negative smallest Ritz value proves the operator is indefinite.
    """
    k = min(int(n_iter), int(p))
    res = arnoldi(hvp, p, k, k, seed, device=device)
    return float(res.eigenvalues.min()), float(res.eigenvalues.max())


def solver_scores(
    problem: InfluenceProblem,
    runtime: Runtime,
    train_range: tuple[int, int] | None,
    solve: Callable[[torch.Tensor, Ticker], torch.Tensor],
    solve_ticker: Ticker,
    Q: torch.Tensor | None,
    *,
    device: torch.device,
    want_self_influence: bool,
    method: str,
    fix: str,
    parameter: str,
):
    """IF scores ``(1/n) g'^T S`` and self-influence ``(1/n) g_i^T solve(g_i)`` for an iterative solver.

    ``solve(B, ticker)`` returns ``(H + damping I)^-1 B`` for a ``p x r`` block; ``Q`` holds the
    ``m x p`` query gradients (None: no scores). Train gradients are streamed over ``train_range``.
    Non-finite output raises :class:`NumericalError` naming ``parameter`` with ``fix`` as advice.
    """
    import numpy as np

    from .gradients import column_range, n_chunks, numpy_dtype, train_gradients

    n = problem.n_train
    lo, hi = column_range(problem, train_range)
    m, cols = problem.n_query, hi - lo
    dtype = numpy_dtype(runtime.dtype)
    cdt = product_dtype(runtime)  # the final products g_i . s_j carry the gradients' precision
    S = None
    if Q is not None:
        Qd = Q.T.to(device, torch.float64)
        S = solve(Qd, solve_ticker) if m else Qd  # p x m: (H + damping I)^-1 g'_j
        S = S.to(cdt)
    scores = np.zeros((m, cols), dtype=dtype) if Q is not None else None
    self_inf = np.zeros(cols, dtype=dtype) if want_self_influence else None
    if scores is not None or self_inf is not None:
        ticker = Ticker(runtime, "train_gradients", n_chunks(cols, runtime.chunk_size))
        for start, stop, G in train_gradients(problem, problem.weights, runtime, train_range):
            Gd = G.to(device, cdt)
            if scores is not None:
                scores[:, start:stop] = ((Gd @ S).T / n).cpu().numpy()
            if self_inf is not None:
                Gs = Gd.to(torch.float64)
                Z = solve(Gs.T, solve_ticker)
                self_inf[start:stop] = ((Gs * Z.T).sum(dim=1) / n).cpu().numpy()
            ticker.tick()
    for what, arr in (("scores", scores), ("self-influence", self_inf)):
        if arr is not None and not np.isfinite(arr).all():
            raise NumericalError(f"{method} {what} contain NaN/inf; {fix}", parameter=parameter)
    return scores, self_inf
