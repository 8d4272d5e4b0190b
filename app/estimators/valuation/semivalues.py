"""Estimators from (masks, outputs): LOO, difference of means (Downsampling / MSR Banzhaf),
exact semivalues by enumeration (Shapley, Banzhaf, Beta Shapley) and permutation
estimates (TMC-Shapley, Beta Shapley), with standard errors.

Conventions: utilities ``U`` are "higher is better" (accuracy, minus loss), so a
positive *value* means helpful. Per-query outputs ``q`` are query objectives
(loss or minus margin, lower is better), so pointwise *scores* are built from
``-q``: ``scores[j, i] > 0`` means including ``z_i`` lowers query ``j``'s loss
(a proponent), as base.SIGN_CONVENTION requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .samplers import PermutationSamples, SubsetPlan, mask_codes

# ----------------------------------------------------------------------------- leave-one-out


def loo_estimate(plan: SubsetPlan, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out scores ``q(D without i) - q(D)`` from a :func:`loo_plan` and its outputs.

    ``q`` is K x m (per-example query objectives) or K (a scalar). Returns
    ``(scores, indices)``: scores m x len(indices) (or len(indices) for scalars),
    positive = removing ``i`` raises the query objective (a proponent). Rows
    with the same ``removed`` value (repeated seeds) are averaged.
    """
    removed = np.asarray(plan.meta["removed"])
    q = np.asarray(q, dtype=np.float64)
    full = q[removed == -1]
    if full.shape[0] == 0:
        raise ValueError("the plan has no full-data row (removed = -1)")
    base = full.mean(axis=0)
    indices = np.unique(removed[removed >= 0])
    rows = np.stack([q[removed == i].mean(axis=0) for i in indices]) if indices.size else q[:0]
    scores = rows - base  # (len(indices), m)
    return (scores.T if scores.ndim == 2 else scores), indices


# ----------------------------------------------------------------------------- difference of means


def difference_of_means(masks: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mean{out : i in S} - mean{out : i not in S}`` per point, with its standard error.

    ``outputs`` K (scalar utility) gives arrays of length n; K x m gives m x n
    (query-major). The standard error is ``sqrt(s_in^2/K_in + s_out^2/K_out)``
    (sample variances, ddof = 1); a point seen fewer than twice in or out gets
    value 0 and standard error ``inf``. The shared code path of Downsampling
    (Feldman & Zhang 2020) and MSR Data Banzhaf (Wang & Jia 2023).
    """
    M = np.asarray(masks, dtype=np.float64)
    Y = np.asarray(outputs, dtype=np.float64)
    scalar = Y.ndim == 1
    Y = Y.reshape(Y.shape[0], -1)
    K = M.shape[0]
    if Y.shape[0] != K:
        raise ValueError(f"{K} masks but {Y.shape[0]} outputs")
    Yc = Y - Y.mean(axis=0, keepdims=True)  # centre for numerical stability
    k_in = M.sum(axis=0)  # (n,)
    k_out = K - k_in
    s_in = M.T @ Yc  # (n, m)
    s_out = Yc.sum(axis=0, keepdims=True) - s_in
    q_in = M.T @ (Yc * Yc)
    q_out = (Yc * Yc).sum(axis=0, keepdims=True) - q_in
    ok = (k_in >= 2) & (k_out >= 2)
    kin = np.where(ok, k_in, 2.0)[:, None]
    kout = np.where(ok, k_out, 2.0)[:, None]
    mean_in, mean_out = s_in / kin, s_out / kout
    var_in = np.maximum(q_in - kin * mean_in**2, 0.0) / (kin - 1)
    var_out = np.maximum(q_out - kout * mean_out**2, 0.0) / (kout - 1)
    value = np.where(ok[:, None], mean_in - mean_out, 0.0)
    stderr = np.where(ok[:, None], np.sqrt(var_in / kin + var_out / kout), np.inf)
    if scalar:
        return value[:, 0], stderr[:, 0]
    return value.T, stderr.T


def msr_banzhaf_estimate(masks: np.ndarray, utilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MSR Data Banzhaf values and standard errors from Bernoulli(1/2) masks and utilities (K)."""
    return difference_of_means(masks, np.asarray(utilities, dtype=np.float64).reshape(-1))


def downsampling_estimate(masks: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Downsampling influence m x n: ``mean{q : i not in S} - mean{q : i in S}`` (= difference of
    means of ``-q``), with standard errors. Positive = including ``i`` lowers the query objective."""
    q = np.asarray(q, dtype=np.float64)
    return difference_of_means(masks, -q.reshape(q.shape[0], -1))


def memorisation_estimate(masks: np.ndarray, q_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Self-influence ``mem(i)``: Downsampling influence of ``i`` on its own objective (K x n outputs)."""
    value, stderr = downsampling_estimate(masks, q_train)
    return np.diagonal(value).copy(), np.diagonal(stderr).copy()


# ----------------------------------------------------------------------------- semivalue weights


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_subset_weights(n: int, alpha: float, beta: float) -> np.ndarray:
    """Kwon & Zou's per-subset weights ``w(j) = n Beta(j+beta-1, n-j+alpha) / Beta(alpha, beta)``, j = 1..n.

    The value is ``(1/n) sum_j w(j) sum_{|S|=j-1, i not in S} [U(S+i) - U(S)]``;
    ``sum_j C(n-1, j-1) w(j) = n``. ``alpha = beta = 1`` gives ``w(j) = 1/C(n-1, j-1)``
    (Shapley); ``alpha > beta`` favours small subsets (``w(1) > w(n)``).
    """
    j = np.arange(1, n + 1)
    lb = _log_beta(alpha, beta)
    return np.array([n * math.exp(_log_beta(k + beta - 1, n - k + alpha) - lb) for k in j])


def beta_cardinality_weights(n: int, alpha: float, beta: float) -> np.ndarray:
    """Weight of each subset *size* j - 1 (j = 1..n) on the mean marginal at that size; sums to 1.

    ``w_card(j) = C(n-1, j-1) Beta(j+beta-1, n-j+alpha) / Beta(alpha, beta)``: uniform
    (1/n) for Shapley (alpha = beta = 1).
    """
    if alpha == 1 and beta == 1:
        return shapley_cardinality_weights(n)
    lb = _log_beta(alpha, beta)
    out = []
    for j in range(1, n + 1):
        log_c = math.lgamma(n) - math.lgamma(j) - math.lgamma(n - j + 1)
        out.append(math.exp(log_c + _log_beta(j + beta - 1, n - j + alpha) - lb))
    w = np.array(out)
    return w / w.sum()  # exact up to rounding; renormalise


def shapley_cardinality_weights(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


# ----------------------------------------------------------------------------- exact enumeration


def utility_table(plan: SubsetPlan, utilities: np.ndarray) -> np.ndarray:
    """Utilities indexed by subset code (bit i = point i), length 2^n; from any plan covering all subsets."""
    n = plan.n_points
    codes = plan.meta["code"] if "code" in plan.meta else mask_codes(plan.masks)
    table = np.full(2**n, np.nan)
    table[np.asarray(codes, dtype=np.int64)] = np.asarray(utilities, dtype=np.float64).reshape(-1)
    if np.isnan(table).any():
        raise ValueError("the plan does not cover every subset")
    return table


def _popcount(codes: np.ndarray, n: int) -> np.ndarray:
    return ((codes[:, None] >> np.arange(n)) & 1).sum(axis=1)


def exact_semivalue(table: np.ndarray, subset_weight: np.ndarray) -> np.ndarray:
    """``phi_i = sum_{S not containing i} subset_weight[|S|] (U(S + i) - U(S))`` from a 2^n utility table."""
    table = np.asarray(table, dtype=np.float64)
    n = int(round(math.log2(table.size)))
    if 2**n != table.size:
        raise ValueError("the utility table must have 2^n entries")
    codes = np.arange(table.size, dtype=np.int64)
    size = _popcount(codes, n)
    phi = np.zeros(n)
    for i in range(n):
        without = codes[((codes >> i) & 1) == 0]
        phi[i] = float((subset_weight[size[without]] * (table[without | (1 << i)] - table[without])).sum())
    return phi


def exact_shapley(table: np.ndarray) -> np.ndarray:
    """Exact Shapley values: subset weight ``|S|! (n - |S| - 1)! / n!``."""
    n = int(round(math.log2(len(table))))
    w = np.array([math.exp(math.lgamma(s + 1) + math.lgamma(n - s) - math.lgamma(n + 1)) for s in range(n)])
    return exact_semivalue(table, w)


def exact_banzhaf(table: np.ndarray) -> np.ndarray:
    """Exact Banzhaf values: subset weight ``2^-(n-1)``."""
    n = int(round(math.log2(len(table))))
    return exact_semivalue(table, np.full(n, 2.0 ** -(n - 1)))


def exact_beta_shapley(table: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Exact Beta(alpha, beta) Shapley: subset weight ``w(|S| + 1) / n``."""
    n = int(round(math.log2(len(table))))
    return exact_semivalue(table, beta_subset_weights(n, alpha, beta) / n)


# ----------------------------------------------------------------------------- permutations


def permutation_marginals(perms: np.ndarray, prefix_utilities: np.ndarray) -> np.ndarray:
    """P x n marginals in point order: ``marg[p, perms[p, j]] = U(prefix j+1) - U(prefix j)``."""
    perms = np.asarray(perms, dtype=np.int64)
    u = np.asarray(prefix_utilities, dtype=np.float64)
    steps = np.diff(u, axis=1)  # (P, n) by position
    out = np.zeros_like(steps)
    np.put_along_axis(out, perms, steps, axis=1)
    return out


def permutation_contributions(
    perms: np.ndarray, prefix_utilities: np.ndarray, cardinality_weights: np.ndarray | None = None
) -> np.ndarray:
    """Per-walk contributions P x n whose mean estimates the semivalue.

    A point at position j (0-based) of a uniform permutation follows a uniform
    subset of size j; reweighting its marginal by ``n * w_card(j + 1)`` turns the
    Shapley average into the semivalue with cardinality weights ``w_card``
    (None: Shapley, factor 1).
    """
    marg = permutation_marginals(perms, prefix_utilities)
    if cardinality_weights is None:
        return marg
    n = marg.shape[1]
    factor = n * np.asarray(cardinality_weights, dtype=np.float64)  # by position
    pos = np.argsort(np.asarray(perms, dtype=np.int64), axis=1)  # position of each point
    return marg * factor[pos]


def mean_and_stderr(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard errors (ddof = 1; inf with fewer than two rows)."""
    samples = np.asarray(samples, dtype=np.float64)
    P = samples.shape[0]
    if P == 0:
        return np.zeros(samples.shape[1]), np.full(samples.shape[1], np.inf)
    mean = samples.mean(axis=0)
    if P < 2:
        return mean, np.full(samples.shape[1], np.inf)
    return mean, samples.std(axis=0, ddof=1) / math.sqrt(P)


def tmc_shapley_estimate(perms: np.ndarray, prefix_utilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Truncated) Monte-Carlo Shapley values and standard errors from permutation walks."""
    return mean_and_stderr(permutation_marginals(perms, prefix_utilities))


def beta_shapley_estimate(
    perms: np.ndarray, prefix_utilities: np.ndarray, alpha: float, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Beta(alpha, beta) Shapley values and standard errors from the same permutation walks."""
    n = np.asarray(perms).shape[1]
    return mean_and_stderr(
        permutation_contributions(perms, prefix_utilities, beta_cardinality_weights(n, alpha, beta))
    )


# ----------------------------------------------------------------------------- accumulators


@dataclass
class PermutationAccumulator:
    """Accumulates :class:`PermutationSamples`; ``result()`` -> (values, stderr)."""

    n: int
    cardinality_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self.perms: list[np.ndarray] = []
        self.prefix_utilities: list[np.ndarray] = []
        self.truncated_at: list[np.ndarray] = []

    @property
    def n_samples(self) -> int:
        return sum(c.shape[0] for c in self._chunks)

    def update(self, samples: PermutationSamples) -> None:
        if samples.n_walks == 0:
            return
        self._chunks.append(
            permutation_contributions(samples.perms, samples.prefix_utilities, self.cardinality_weights)
        )
        self.perms.append(samples.perms)
        self.prefix_utilities.append(samples.prefix_utilities)
        self.truncated_at.append(samples.truncated_at)

    def contributions(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros((0, self.n))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return mean_and_stderr(self.contributions())


@dataclass
class DifferenceOfMeansAccumulator:
    """Accumulates (masks, outputs[key]) rows; ``result()`` -> difference of means and stderr."""

    n: int
    key: str = "utility"

    def __post_init__(self) -> None:
        self._masks: list[np.ndarray] = []
        self._outputs: list[np.ndarray] = []

    @property
    def n_samples(self) -> int:
        return sum(m.shape[0] for m in self._masks)

    def update(self, samples) -> None:  # StreamSamples
        self._masks.append(samples.plan.masks)
        self._outputs.append(np.asarray(samples.outputs[self.key], dtype=np.float64))

    def masks(self) -> np.ndarray:
        return np.concatenate(self._masks) if self._masks else np.zeros((0, self.n), bool)

    def outputs(self) -> np.ndarray:
        return np.concatenate(self._outputs) if self._outputs else np.zeros(0)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._masks:
            return np.zeros(self.n), np.full(self.n, np.inf)
        return difference_of_means(self.masks(), self.outputs())
