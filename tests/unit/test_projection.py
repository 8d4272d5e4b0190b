"""Random projections: determinism, unbiased inner products (JL), streaming == dense, SRHT vs Hadamard."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from app.estimators import EstimatorError, projection
from app.estimators.projection import (
    ROW_BLOCK,
    KroneckerProjector,
    capped,
    derive_seed,
    fwht,
    make_projector,
)

torch.set_num_threads(1)

RANDOM_KINDS = ["gaussian", "rademacher", "srht", "countsketch"]
F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_deterministic_per_seed_and_independent_of_dtype(kind):
    G = _randn(3, 70)
    a = make_projector(kind, 70, 16, seed=4, dtype=F64).project(G)
    b = make_projector(kind, 70, 16, seed=4, dtype=F64).project(G)
    c = make_projector(kind, 70, 16, seed=5, dtype=F64).project(G)
    assert a.shape == (3, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    m32 = make_projector(kind, 70, 16, seed=4, dtype=torch.float32).matrix()
    m64 = make_projector(kind, 70, 16, seed=4, dtype=F64).matrix()
    assert m32.dtype == torch.float32 and m64.dtype == F64
    torch.testing.assert_close(m32.double(), m64, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_jl_inner_products_at_k4096(kind):
    p, k = 6000, 4096
    X = _randn(4, p, seed=1)
    Y = X + 0.7 * _randn(4, p, seed=2)  # correlated pairs: <x, y> of the order of ||x|| ||y||
    P = make_projector(kind, p, k, seed=0, dtype=F64)
    PX, PY = P.project(X), P.project(Y)
    exact = (X * Y).sum(1)
    approx = (PX * PY).sum(1)
    scale = X.norm(dim=1) * Y.norm(dim=1)
    rel = ((approx - exact) / scale).abs()
    print(f"{kind}: max |<Px,Py> - <x,y>| / (|x||y|) = {float(rel.max()):.4f} at k = {k}")
    assert float(rel.max()) < 6 / math.sqrt(k)
    norms = PX.norm(dim=1) / X.norm(dim=1)
    assert float((norms - 1).abs().max()) < 0.1


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_inner_products_unbiased_over_seeds(kind):
    p, k, S = 40, 8, 400
    x, y = _randn(p, seed=3), _randn(p, seed=4)
    y = y + x
    est = torch.stack(
        [
            (lambda P: (P.project(x[None]) * P.project(y[None])).sum())(
                make_projector(kind, p, k, s, dtype=F64)
            )
            for s in range(S)
        ]
    )
    exact = float(x @ y)
    se = float(est.std()) / math.sqrt(S)
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_streamed_blocks_equal_the_full_matrix(kind):
    p, k = 2 * ROW_BLOCK + 37, 24
    G = _randn(5, p, seed=6)
    cached = make_projector(kind, p, k, seed=2, dtype=F64)
    streamed = make_projector(kind, p, k, seed=2, dtype=F64, max_cached=10)
    assert cached._cached and not streamed._cached
    M = cached.matrix()
    assert M.shape == (p, k)
    torch.testing.assert_close(streamed.matrix(), M, rtol=0, atol=0)
    torch.testing.assert_close(streamed.project(G), G @ M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cached.project(G), G @ M, rtol=1e-12, atol=1e-12)
    # row chunks of G give the same rows
    torch.testing.assert_close(torch.cat([streamed.project(G[:2]), streamed.project(G[2:])]), G @ M)
    # entries: N(0, 1/k) or +-1/sqrt(k)
    if kind == "rademacher":
        assert torch.allclose(M.abs(), torch.full_like(M, 1 / math.sqrt(k)))
    else:
        assert abs(float(M.var()) * k - 1) < 0.05


@pytest.mark.parametrize("kind", ["srht", "countsketch"])
def test_structured_projections_are_linear_maps(kind):
    p, k = 300, 32
    P = make_projector(kind, p, k, seed=1, dtype=F64)
    G = _randn(6, p, seed=7)
    torch.testing.assert_close(P.project(G), G @ P.matrix(), rtol=1e-10, atol=1e-12)


def test_countsketch_matrix_is_its_seeded_definition():
    """Row i of P (coordinate i) is s(i) e_h(i): bucket h(i), then sign s(i) = 2 u(i) - 1, drawn in that
    order from the generator of (seed, countsketch). The definition is pinned (projected features
    cached by one version must match queries projected by the next), signs included."""
    p, k, seed = 2000, 16, 4
    gen = torch.Generator().manual_seed(derive_seed(seed, projection._KIND_CODE["countsketch"]))
    buckets = torch.randint(0, k, (p,), generator=gen)
    signs = torch.randint(0, 2, (p,), generator=gen, dtype=torch.int8).to(F64) * 2 - 1
    expected = torch.zeros(p, k, dtype=F64)
    expected[torch.arange(p), buckets] = signs
    torch.testing.assert_close(make_projector("countsketch", p, k, seed=seed, dtype=F64).matrix(), expected)
    assert 0.45 < float((signs > 0).double().mean()) < 0.55


def test_fwht_equals_sylvester_hadamard():
    for N in (1, 2, 8, 64):
        X = _randn(3, N, seed=N)
        H = torch.tensor(scipy.linalg.hadamard(N), dtype=F64)
        torch.testing.assert_close(fwht(X), X @ H, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        fwht(torch.zeros(2, 6))


@pytest.mark.parametrize("p,k", [(5, 3), (8, 8), (13, 10)])
def test_srht_equals_explicit_hadamard(p, k):
    P = make_projector("srht", p, k, seed=9, dtype=F64)
    N = 1 << (p - 1).bit_length()
    assert P.N == N and P.rows.numel() == k and len(set(P.rows.tolist())) == k
    H = torch.tensor(scipy.linalg.hadamard(N), dtype=F64)
    D = torch.zeros(p, N, dtype=F64)
    D[torch.arange(p), torch.arange(p)] = P.signs.double()  # sign flip, then zero-pad to N
    explicit = (D @ H)[:, P.rows] / math.sqrt(k)  # p x k
    X = _randn(4, p, seed=p)
    torch.testing.assert_close(P.project(X), X @ explicit, rtol=1e-12, atol=1e-12)
    with pytest.raises(EstimatorError):
        make_projector("srht", p, N + 1)


def test_identity_and_capping():
    G = _randn(2, 7)
    assert torch.equal(make_projector("identity", 7, 7).project(G), G)
    with pytest.raises(EstimatorError):
        make_projector("identity", 7, 3)
    with pytest.raises(EstimatorError):
        make_projector("sparse", 7, 3)
    assert capped("gaussian", 100, 10) == ("gaussian", 10)
    assert capped("gaussian", 100, 100) == ("identity", 100)
    assert capped("srht", 100, None) == ("identity", 100)
    assert capped("identity", 100, 5) == ("identity", 100)
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(1, 3)


def test_kronecker_projector_matches_explicit_kron():
    b, T, d_in, d_out = 3, 4, 9, 6
    kp = KroneckerProjector(d_in, d_out, 5, 3, kind="gaussian", seed=2, dtype=F64)
    a, delta = _randn(b, T, d_in, seed=1), _randn(b, T, d_out, seed=2)
    G = torch.einsum("bto,bti->boi", delta, a)  # sum_t delta_t a_t^T, (b, d_out, d_in)
    Pin, Pout = kp.in_matrix(), kp.out_matrix()
    assert Pin.shape == (5, d_in) and Pout.shape == (3, d_out) and kp.dim == 15
    expected = Pout @ G @ Pin.T
    torch.testing.assert_close(kp.project_factors(a, delta), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kp.project_gradient(G), expected, rtol=1e-12, atol=1e-12)
    vec = G.transpose(1, 2).reshape(b, -1)  # column-major vec
    kron = (vec @ torch.kron(Pin, Pout).T).reshape(b, 5, 3).transpose(1, 2)
    torch.testing.assert_close(kron, expected, rtol=1e-12, atol=1e-12)
    full = KroneckerProjector(d_in, d_out, 50, 50, seed=2, dtype=F64)  # k >= d: identity factors
    assert (full.k_in, full.k_out) == (d_in, d_out)
    torch.testing.assert_close(full.project_factors(a, delta), G)
