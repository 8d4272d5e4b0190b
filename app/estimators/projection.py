"""Seeded random projections ``R^p -> R^k`` for projected-gradient estimators (TracIn-RP, TRAK, LoGra).

A projector maps row vectors: ``project(G)`` takes ``G`` of shape ``(b, p)`` and
returns ``G @ P`` of shape ``(b, k)`` for an implicit ``p x k`` matrix ``P`` that
is a pure function of ``(kind, p, k, seed)``. Every random kind satisfies

    E[P P^T] = I_p,   hence   E[<x P, y P>] = <x, y>   for all x, y in R^p,

so projected inner products are unbiased estimates of the originals, with
standard deviation about ``||x|| ||y|| / sqrt(k)`` (Johnson-Lindenstrauss).

Kinds:

* ``gaussian``: i.i.d. ``N(0, 1/k)`` entries;
* ``rademacher``: i.i.d. ``+-1/sqrt(k)`` entries;
* ``srht``: subsampled randomized Hadamard transform ``x -> sqrt(1/k) S H D x``:
  random signs ``D``, the unnormalised Walsh-Hadamard transform ``H`` over ``x``
  zero-padded to ``N = 2^ceil(log2 p)`` (``H^T H = N I``), and ``k`` of the ``N``
  output coordinates chosen uniformly without replacement (``S``). Inclusion
  probability ``k/N`` gives ``E[<Px, Py>] = <Hx', Hy'>/N = <x, y>``. Cost
  ``O(b N log N)`` per chunk and ``O(p + k)`` memory: no ``p x k`` matrix at all;
* ``countsketch``: each input coordinate ``i`` goes to one bucket ``h(i)`` with a
  random sign ``s(i)``; ``O(b p)`` per chunk, ``O(p)`` memory;
* ``identity``: ``k = p``, no projection (exact).

Dense kinds (gaussian, rademacher) never need the whole ``p x k`` matrix: rows
of ``P`` are generated in fixed blocks of :data:`ROW_BLOCK` rows, block ``j``
from its own generator seeded by ``(seed, kind, j)``, and the product is
accumulated block by block. The matrix is therefore the same whether it is
cached (when ``p * k <= max_cached``) or streamed, and whatever the chunking of
``G``. All random numbers are drawn on the CPU (in float32, then cast), so the
same seed gives the same ``P`` on every device and dtype: projected features
cached on one machine match queries projected on another.

:class:`KroneckerProjector` is the structured projection LoGra uses for a linear
layer's gradient ``G = delta a^T`` (``d_out x d_in``):
``P_out G P_in^T`` (``k_out x k_in``), i.e. ``(P_in (x) P_out) vec(G)`` with
column-major ``vec``, computed from the factors without forming ``G``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from .base import EstimatorError

ProjectionKind = Literal["gaussian", "rademacher", "srht", "countsketch", "identity"]
KINDS: tuple[str, ...] = ("gaussian", "rademacher", "srht", "countsketch", "identity")

ROW_BLOCK = 1024
"""Rows of a dense ``P`` generated per seeded block (part of the matrix's definition: do not change)."""

DEFAULT_MAX_CACHED = 2**24
"""Dense projectors keep ``P`` in memory when ``p * k`` is at most this many elements."""

_FWHT_BUDGET = 2**24  # max (rows x padded length) transformed at once by srht
_KIND_CODE = {"gaussian": 1, "rademacher": 2, "srht": 3, "countsketch": 4, "identity": 5}


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and non-negative integer ``keys`` (stable across runs)."""
    words = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _generator(seed: int, *keys: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *keys))


class Projector:
    """Base class: ``project(G: (b, p)) -> (b, k)``; ``matrix()`` gives the explicit ``p x k`` ``P``."""

    kind: str

    def __init__(self, p: int, k: int, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self.p, self.k, self.seed = int(p), int(k), int(seed)
        self.device, self.dtype = device, dtype

    def project(self, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, G: torch.Tensor) -> torch.Tensor:
        if G.dim() != 2 or G.shape[1] != self.p:
            raise ValueError(f"expected a (b, {self.p}) tensor, got shape {tuple(G.shape)}")
        return G

    def matrix(self) -> torch.Tensor:
        """The explicit ``p x k`` matrix (for tests and small ``p``): ``project(I_p)``."""
        return self.project(torch.eye(self.p, device=self.device, dtype=self.dtype))

    def describe(self) -> dict:
        return {"kind": self.kind, "p": self.p, "k": self.k, "seed": self.seed}


class IdentityProjector(Projector):
    kind = "identity"

    def project(self, G: torch.Tensor) -> torch.Tensor:
        return self._check(G)


class DenseProjector(Projector):
    """Gaussian ``N(0, 1/k)`` or Rademacher ``+-1/sqrt(k)`` entries, generated in seeded row blocks."""

    def __init__(
        self,
        kind: str,
        p: int,
        k: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        max_cached: int = DEFAULT_MAX_CACHED,
    ) -> None:
        super().__init__(p, k, seed, device, dtype)
        self.kind = kind
        self._cached = p * k <= max_cached
        self._matrix: torch.Tensor | None = None

    @property
    def cached(self) -> bool:
        """Whether ``P`` is kept in memory (:meth:`matrix` is then cheap after the first call)."""
        return self._cached

    def _block(
        self, j: int, device: torch.device, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``j * ROW_BLOCK ..`` of ``P``; drawn into ``out`` (float32, on the CPU) when given."""
        r0, r1 = j * ROW_BLOCK, min((j + 1) * ROW_BLOCK, self.p)
        gen = _generator(self.seed, _KIND_CODE[self.kind], j)
        shape = (r1 - r0, self.k)
        if self.kind == "gaussian":
            B = torch.randn(shape, generator=gen, dtype=torch.float32, out=out)
        else:  # drawn straight as float32 (the same values as int8 draws) and mapped in place
            B = torch.randint(0, 2, shape, generator=gen, dtype=torch.float32, out=out).mul_(2).sub_(1)
        return B.div_(math.sqrt(self.k)).to(device=device, dtype=dtype)

    def _n_blocks(self) -> int:
        return math.ceil(self.p / ROW_BLOCK)

    def matrix(self) -> torch.Tensor:
        if self._matrix is None:
            if self._n_blocks() == 1:
                M = self._block(0, self.device, self.dtype)
            else:  # the blocks are drawn in place, with no concatenated copy
                M = torch.empty(self.p, self.k, dtype=torch.float32)
                for j in range(self._n_blocks()):
                    self._block(j, M.device, M.dtype, out=M[j * ROW_BLOCK : (j + 1) * ROW_BLOCK])
                M = M.to(device=self.device, dtype=self.dtype)
            if not self._cached:
                return M
            self._matrix = M
        return self._matrix

    def project(self, G: torch.Tensor) -> torch.Tensor:
        self._check(G)
        if self._cached:
            return G @ self.matrix().to(device=G.device, dtype=G.dtype)
        out = torch.zeros(G.shape[0], self.k, device=G.device, dtype=G.dtype)
        for j in range(self._n_blocks()):
            r0, r1 = j * ROW_BLOCK, min((j + 1) * ROW_BLOCK, self.p)
            out += G[:, r0:r1] @ self._block(j, G.device, G.dtype)
        return out


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim (a power of two), Sylvester order.

    Returns ``x @ H_N`` with ``H_1 = [1]``, ``H_2N = [[H_N, H_N], [H_N, -H_N]]`` (symmetric).
    """
    *lead, N = x.shape
    if N & (N - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {N}")
    y = x.reshape(-1, N)
    b = y.shape[0]
    h = 1
    while h < N:
        y = y.reshape(b, N // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(*lead, N)


def _sample_without_replacement(N: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if N <= 2**24:
        return torch.randperm(N, generator=gen)[:k]
    found = torch.empty(0, dtype=torch.long)
    while found.numel() < k:  # the distinct values of uniform draws form a uniform random subset
        found = torch.unique(torch.cat([found, torch.randint(0, N, (2 * k,), generator=gen)]))
    return found[torch.randperm(found.numel(), generator=gen)[:k]]


class SRHTProjector(Projector):
    """Subsampled randomized Hadamard transform ``x -> sqrt(1/k) S H D x`` (no dense matrix)."""

    kind = "srht"

    def __init__(self, p: int, k: int, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(p, k, seed, device, dtype)
        self.N = 1 << max(0, (p - 1).bit_length())
        if k > self.N:
            raise EstimatorError(f"srht projects to at most {self.N} dimensions for p = {p}, not {k}")
        gen = _generator(seed, _KIND_CODE["srht"])
        self.signs = (torch.randint(0, 2, (p,), generator=gen, dtype=torch.int8).float() * 2 - 1).to(device)
        self.rows = torch.sort(_sample_without_replacement(self.N, k, gen)).values.to(device)

    def project(self, G: torch.Tensor) -> torch.Tensor:
        self._check(G)
        signs = self.signs.to(device=G.device, dtype=G.dtype)
        rows = self.rows.to(G.device)
        step = max(1, _FWHT_BUDGET // self.N)
        outs = []
        for s in range(0, G.shape[0], step):
            X = G[s : s + step] * signs
            if self.N > self.p:
                X = torch.nn.functional.pad(X, (0, self.N - self.p))
            outs.append(fwht(X)[:, rows])
        if not outs:
            return torch.zeros(0, self.k, device=G.device, dtype=G.dtype)
        return torch.cat(outs) / math.sqrt(self.k)


class CountSketchProjector(Projector):
    """CountSketch: coordinate ``i`` is added with sign ``s(i)`` to bucket ``h(i)``.

    The signs never touch ``G``: coordinates go to ``2k`` signed buckets (``h(i)``, plus ``k`` where
    ``s(i) = -1``) and the result is the first ``k`` minus the last ``k``, so a chunk of gradients is
    read once and no signed copy of it is made (that copy is as large as the chunk: 13 GB for 512
    gradients of a 6.6M-parameter model)."""

    kind = "countsketch"

    def __init__(self, p: int, k: int, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(p, k, seed, device, dtype)
        gen = _generator(seed, _KIND_CODE["countsketch"])
        buckets = torch.randint(0, k, (p,), generator=gen)
        negative = torch.randint(0, 2, (p,), generator=gen, dtype=torch.int8) == 0  # s(i) = -1
        self._signed_buckets = (buckets + k * negative).to(device)

    def project(self, G: torch.Tensor) -> torch.Tensor:
        self._check(G)
        sums = torch.zeros(G.shape[0], 2 * self.k, device=G.device, dtype=G.dtype)
        sums.index_add_(1, self._signed_buckets.to(G.device), G)
        return sums[:, : self.k] - sums[:, self.k :]


def make_projector(
    kind: str,
    p: int,
    k: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    max_cached: int = DEFAULT_MAX_CACHED,
) -> Projector:
    """A projector ``R^p -> R^k`` of the given kind, a pure function of ``(kind, p, k, seed)``.

    ``identity`` requires ``k == p``. ``max_cached`` bounds the elements of a dense
    ``P`` kept in memory; larger ones are regenerated block by block at each call.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    if kind not in KINDS:
        raise EstimatorError(f"unknown projection {kind!r}; use one of {', '.join(KINDS)}")
    if p < 1 or k < 1:
        raise EstimatorError(f"projection sizes must be positive (p = {p}, k = {k})")
    if kind == "identity":
        if k != p:
            raise EstimatorError(f"the identity projection keeps all {p} dimensions (k = {k} given)")
        return IdentityProjector(p, k, seed, dev, dtype)
    if kind in ("gaussian", "rademacher"):
        return DenseProjector(kind, p, k, seed, dev, dtype, max_cached=max_cached)
    if kind == "srht":
        return SRHTProjector(p, k, seed, dev, dtype)
    return CountSketchProjector(p, k, seed, dev, dtype)


def capped(kind: str, p: int, k: int | None) -> tuple[str, int]:
    """``(kind, k)`` actually used for a requested ``k``: no projection (identity, ``k = p``) when
    ``kind`` is identity, ``k`` is None or ``k >= p`` (a projection cannot compress then)."""
    if kind == "identity" or k is None or k >= p:
        return "identity", p
    return kind, int(k)


class KroneckerProjector:
    """Projects ``G (d_out x d_in)`` to ``P_out G P_in^T (k_out x k_in)``.

    ``P_in`` is ``k_in x d_in`` and ``P_out`` is ``k_out x d_out``.

    Equivalent to ``(P_in (x) P_out) vec(G)`` (column-major ``vec``). Each factor is a
    :func:`make_projector` of ``kind`` (identity where ``k >= d``, see :func:`capped`) with
    seeds derived from ``seed``; ``E[<P_out A P_in^T, P_out B P_in^T>_F] = <A, B>_F``
    because the factors are independent and each has ``E[P^T P] = I``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        k_in: int,
        k_out: int,
        kind: str = "gaussian",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        kin_kind, k_in = capped(kind, d_in, k_in)
        kout_kind, k_out = capped(kind, d_out, k_out)
        self.d_in, self.d_out, self.k_in, self.k_out = d_in, d_out, k_in, k_out
        self.p_in = make_projector(kin_kind, d_in, k_in, derive_seed(seed, 0), device, dtype)
        self.p_out = make_projector(kout_kind, d_out, k_out, derive_seed(seed, 1), device, dtype)

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out

    def in_matrix(self) -> torch.Tensor:
        """``P_in`` (``k_in x d_in``)."""
        return self.p_in.matrix().T

    def out_matrix(self) -> torch.Tensor:
        """``P_out`` (``k_out x d_out``)."""
        return self.p_out.matrix().T

    def project_factors(self, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``sum_t (P_out delta_t)(P_in a_t)^T`` per example: ``a (b, T, d_in)``, ``delta (b, T, d_out)``
        -> ``(b, k_out, k_in)``, never forming the ``d_out x d_in`` gradient."""
        b, T = a.shape[0], a.shape[1]
        pa = self.p_in.project(a.reshape(b * T, self.d_in)).reshape(b, T, self.k_in)
        pd = self.p_out.project(delta.reshape(b * T, self.d_out)).reshape(b, T, self.k_out)
        return torch.einsum("bto,bti->boi", pd, pa)

    def project_gradient(self, G: torch.Tensor) -> torch.Tensor:
        """``P_out G P_in^T`` for explicit gradients ``G (b, d_out, d_in)`` -> ``(b, k_out, k_in)``."""
        b = G.shape[0]
        left = self.p_in.project(G.reshape(b * self.d_out, self.d_in)).reshape(b, self.d_out, self.k_in)
        right = self.p_out.project(left.transpose(1, 2).reshape(b * self.k_in, self.d_out))
        return right.reshape(b, self.k_in, self.k_out).transpose(1, 2)


__all__ = [
    "DEFAULT_MAX_CACHED",
    "KINDS",
    "ROW_BLOCK",
    "CountSketchProjector",
    "DenseProjector",
    "IdentityProjector",
    "KroneckerProjector",
    "ProjectionKind",
    "Projector",
    "SRHTProjector",
    "capped",
    "derive_seed",
    "fwht",
    "make_projector",
]
