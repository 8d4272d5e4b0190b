"""Key validation: exact-Hessian influence vs actual leave-one-out retraining (ESTIMATORS.md 2.10, 4.1).

L2-regularised logistic regression (2-class softmax ``linear`` model) on the
breast-cancer data, float64, n = 500 training rows (the lower end of the doc's
n = 500-1000; the other 69 rows are the query pool). The model is trained with the library's L-BFGS and
polished with damped Newton steps; each leave-one-out model is retrained from
the optimum with Newton steps to a gradient norm below 1e-10, so the ground
truth has no optimiser noise. The test's own gradient/Hessian are written out
analytically and do not use the library's autodiff code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

sklearn_datasets = pytest.importorskip("sklearn.datasets")
stats = pytest.importorskip("scipy.stats")

from app.estimators import InfluenceProblem, Recipe, Runtime, TaskSpec, get_estimator, init_model, train  # noqa: E402
from app.estimators.gradients import objective_hessian  # noqa: E402

torch.set_num_threads(1)

WD = 1e-2
TOL = 1e-10
N_QUERIES = 8
TOP = 20
N_RANDOM = 30
TOP_DOC = 50  # ESTIMATORS.md 2.10: Pearson >= 0.95 on the top-50 |score| set
CLS = TaskSpec("classification", "cross_entropy")


def _data():
    X, y = sklearn_datasets.load_breast_cancer(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    n_train = 500
    tr, te = perm[:n_train], perm[n_train:]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    X = (X - mu) / sd
    t = lambda a: torch.tensor(a)  # noqa: E731
    return t(X[tr]), t(y[tr]).long(), t(X[te]), t(y[te]).long()


class Softmax:
    """Analytic objective sum_i w_i CE_i / denom + WD/2 ||Theta||^2 with Theta = [W | b] (k x (d+1)).

    ``denom`` defaults to sum_i w_i (the mean over the kept points)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, k: int = 2) -> None:
        self.xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        self.onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)
        self.k, self.d1 = k, self.xa.shape[1]
        self.p = k * self.d1

    def losses(self, theta: torch.Tensor) -> torch.Tensor:
        logits = self.xa @ theta.view(self.k, -1).T
        return torch.logsumexp(logits, 1) - (logits * self.onehot).sum(1)

    def f(self, theta: torch.Tensor, w: torch.Tensor, denom: float) -> float:
        return float((w * self.losses(theta)).sum() / denom + 0.5 * WD * theta.dot(theta))

    def gh(self, theta: torch.Tensor, w: torch.Tensor, denom: float):
        n, k, d1 = len(w), self.k, self.d1
        P = torch.softmax(self.xa @ theta.view(k, -1).T, 1)
        g = (((P - self.onehot) * w[:, None]).T @ self.xa / denom).reshape(-1) + WD * theta
        A = (torch.diag_embed(P) - P[:, :, None] * P[:, None, :]) * (w / denom)[:, None, None]  # (n, k, k)
        XA = (A[:, :, :, None] * self.xa[:, None, None, :]).reshape(n, k * k * d1)
        H = (XA.T @ self.xa).reshape(k, k, d1, d1).permute(0, 2, 1, 3).reshape(self.p, self.p)
        return g, H + WD * torch.eye(self.p, dtype=theta.dtype)

    def newton(self, theta: torch.Tensor, w: torch.Tensor, denom: float | None = None, max_iter: int = 50):
        denom = float(w.sum()) if denom is None else denom
        for _ in range(max_iter):
            g, H = self.gh(theta, w, denom)
            if float(g.norm()) < TOL:
                return theta
            step = torch.linalg.solve(H, g)
            f0, t = self.f(theta, w, denom), 1.0
            while t > 1e-10:  # step-halving
                new = theta - t * step
                if self.f(new, w, denom) <= f0 + 1e-14 * abs(f0):
                    break
                t /= 2
            theta = new
        raise AssertionError(
            f"Newton did not converge: |g| = {float(self.gh(theta, w, denom)[0].norm()):.3g}"
        )


def _to_state(theta: torch.Tensor, k: int, d: int) -> dict[str, torch.Tensor]:
    T = theta.view(k, d + 1)
    return {"1.weight": T[:, :d].clone(), "1.bias": T[:, d].clone()}


def _to_theta(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["1.weight"], state["1.bias"][:, None]], 1).reshape(-1)


def test_if_exact_matches_leave_one_out():
    """ESTIMATORS.md 2.10 validation plus pooled checks, against real n-1 retraining.

    Doc check: per query the 50 training points with the largest |score| are removed one at a time and
    retrained; Pearson(predicted, actual loss change) over those 50, mean over the 8 queries >= 0.95.
    Measured (n = 500, seed as here): mean 0.9759, min 0.9524 over queries (118 distinct removals).
    Before the fixture was enlarged to n = 500 (80 % split, n = 455) the same check gave mean 0.9729,
    min 0.9303. Pooled set (top-20 per query + 30 random, 79 removals): Spearman 0.9944 (min 0.9826),
    Pearson 0.9746 (min 0.9504); its older, looser bounds are kept unchanged.
    """
    x, y, qx_all, qy_all = _data()
    n, d = x.shape
    model = init_model("linear", {"in_features": d, "num_classes": 2}, seed=0).double()
    res = train(
        model,
        CLS,
        x,
        y,
        Recipe(
            optimizer="lbfgs",
            learning_rate=1.0,
            epochs=100,
            weight_decay=WD,
            lbfgs_tolerance=TOL,
            num_checkpoints=0,
        ),
    )
    obj = Softmax(x, y)
    ones = torch.ones(n, dtype=torch.float64)
    theta_star = obj.newton(_to_theta(res.weights), ones)
    assert float(obj.gh(theta_star, ones, n)[0].norm()) < TOL
    weights = _to_state(theta_star, 2, d)

    # the library's Hessian equals the analytic one (after reordering [W, b] -> [W | b])
    H_lib = objective_hessian(model, weights, x, y, CLS, WD, chunk_size=128)
    order = torch.cat([torch.arange(2 * d).view(2, d), (2 * d + torch.arange(2))[:, None]], 1).reshape(-1)
    torch.testing.assert_close(H_lib[order][:, order], obj.gh(theta_star, ones, n)[1], rtol=1e-10, atol=1e-12)

    rng = np.random.default_rng(1)
    q = rng.choice(len(qy_all), N_QUERIES, replace=False)
    qx, qy = qx_all[q], qy_all[q]
    prob = InfluenceProblem(
        model=model, task=CLS, weights=weights, train_x=x, train_y=y, query_x=qx, query_y=qy, weight_decay=WD
    )
    out = get_estimator("if_exact").attribute(
        prob, {"damping": 0.0}, runtime=Runtime(dtype=torch.float64, chunk_size=128)
    )
    scores = out.scores
    assert scores.shape == (N_QUERIES, n)
    assert out.metadata["objective_grad_norm"] < 1e-8

    chosen = set(rng.choice(n, N_RANDOM, replace=False).tolist())
    for j in range(N_QUERIES):
        chosen |= set(np.argsort(-np.abs(scores[j]))[:TOP].tolist())
    chosen = np.array(sorted(chosen))

    # ESTIMATORS.md 2.10's set: per query, the TOP_DOC training points with the largest |score|
    top_doc = np.argsort(-np.abs(scores), axis=1)[:, :TOP_DOC]

    qobj = Softmax(qx, qy)
    before = qobj.losses(theta_star)
    # loo[i]: query-loss change when retraining on the mean over the n-1 kept points (a real rerun, warm
    # started at theta*), for every removal either check needs.
    loo: dict[int, np.ndarray] = {}
    for i in sorted(set(chosen.tolist()) | set(top_doc.reshape(-1).tolist())):
        w = ones.clone()
        w[i] = 0.0
        loo[i] = (qobj.losses(obj.newton(theta_star, w)) - before).numpy()
    # actual[:, c]: loo on the pooled set; upweight[:, c]: the same with the objective still divided by n
    # (the epsilon = -1/n removal that the influence function linearises). They differ by a per-query
    # constant from the n/(n-1) rescaling.
    actual = np.stack([loo[int(i)] for i in chosen], 1)
    upweight = np.empty((N_QUERIES, len(chosen)))
    for c, i in enumerate(chosen):
        w = ones.clone()
        w[i] = 0.0
        upweight[:, c] = (qobj.losses(obj.newton(theta_star, w, denom=float(n))) - before).numpy()

    predicted = scores[:, chosen]

    def corr(truth):
        sp = [stats.spearmanr(predicted[j], truth[j])[0] for j in range(N_QUERIES)]
        pe = [stats.pearsonr(predicted[j], truth[j])[0] for j in range(N_QUERIES)]
        return float(np.mean(sp)), float(np.min(sp)), float(np.mean(pe)), float(np.min(pe))

    def signs(truth):
        big = np.abs(truth) > 1e-3 * np.abs(truth).max(axis=1, keepdims=True)
        return float((np.sign(predicted[big]) == np.sign(truth[big])).mean())

    sp, sp_min, pe, pe_min = corr(actual)
    sp_u, _, pe_u, _ = corr(upweight)
    top = np.abs(predicted) >= np.sort(np.abs(predicted), axis=1)[:, -5:-4]  # top-5 |score| per query
    top_sign = float((np.sign(predicted[top]) == np.sign(actual[top])).mean())
    # the doc's check, per query on its own top-50 set, against the real n-1 retrain
    pe_doc = [
        stats.pearsonr(scores[j, top_doc[j]], np.array([loo[int(i)][j] for i in top_doc[j]]))[0]
        for j in range(N_QUERIES)
    ]
    print(
        f"\nIF vs LOO on breast cancer (n={n}, p={2 * (d + 1)}, {len(chosen)} removals, "
        f"{N_QUERIES} queries): mean over n-1 retrain: Spearman {sp:.4f} (min {sp_min:.4f}), "
        f"Pearson {pe:.4f} (min {pe_min:.4f}), sign agreement {signs(actual):.3f} "
        f"(top-5 |score|: {top_sign:.3f}); 1/n-normalised removal: Spearman {sp_u:.4f}, "
        f"Pearson {pe_u:.4f}, sign agreement {signs(upweight):.3f}; top-{TOP_DOC} |score| per query "
        f"({len(loo)} distinct removals): Pearson mean {np.mean(pe_doc):.4f} (min {np.min(pe_doc):.4f})"
    )
    assert np.mean(pe_doc) >= 0.95
    assert sp >= 0.95
    assert pe >= 0.8
    assert sp_u >= 0.95 and pe_u >= 0.95
    # sign convention: a positive score means removing the point raises the query loss
    assert signs(upweight) >= 0.95
    assert top_sign == 1.0
    for j in range(N_QUERIES):
        i_pos = np.argmax(predicted[j])
        assert predicted[j, i_pos] > 0 and actual[j, i_pos] > 0 and upweight[j, i_pos] > 0
