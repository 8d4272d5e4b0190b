"""FastIF (ESTIMATORS.md 2.16): with every row a candidate it is LiSSA IF exactly; with fewer, each query's
scores are LiSSA's on its nearest neighbours (found independently with sklearn) and 0 elsewhere; recall of
the full method's top rows grows with k_candidates; row shards agree with the unsharded run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.estimators import (
    InfluenceProblem,
    NumericalError,
    Recipe,
    Runtime,
    TaskSpec,
    get_estimator,
    init_model,
    train,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")
sklearn_neighbors = pytest.importorskip("sklearn.neighbors")

CLS = TaskSpec("classification", "cross_entropy")
RT = Runtime(dtype=torch.float64, chunk_size=64)
LISSA = {"damping": 0.5, "scale": 20.0, "depth": 100, "batch_size": 16}
N, M = 300, 12


@pytest.fixture(scope="module")
def problem():
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    x, t = torch.tensor(X[: N + M] / 16.0), torch.tensor(y[: N + M])
    model = init_model("mlp", {"in_features": 64, "hidden": [16], "num_classes": 10}, 0).double()
    res = train(
        model, CLS, x[:N], t[:N], Recipe(learning_rate=0.1, epochs=15, batch_size=32, weight_decay=1e-3)
    )
    return InfluenceProblem(
        model=model, task=CLS, weights=res.weights, train_x=x[:N], train_y=t[:N],
        query_x=x[N:], query_y=t[N:], weight_decay=1e-3,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lissa(problem):
    return get_estimator("if_lissa").attribute(problem, LISSA, want_self_influence=True, runtime=RT)


def _fastif(problem, **params):
    return get_estimator("fastif").attribute(
        problem, {**LISSA, **params}, want_self_influence=True, runtime=RT
    )


def _neighbours(train_f: np.ndarray, query_f: np.ndarray, k: int, metric: str) -> list[set[int]]:
    nn = sklearn_neighbors.NearestNeighbors(n_neighbors=k, metric=metric).fit(train_f)
    return [set(row) for row in nn.kneighbors(query_f, return_distance=False)]


def test_every_row_a_candidate_equals_if_lissa(problem, lissa):
    out = _fastif(problem, k_candidates=10 * N)
    np.testing.assert_array_equal(out.scores, lissa.scores)
    np.testing.assert_array_equal(out.self_influence, lissa.self_influence)
    assert out.metadata["k_candidates"] == N and out.metadata["candidate_gradient_rows"] == N
    assert out.metadata["estimated_lambda_max"] == lissa.metadata["estimated_lambda_max"]


@pytest.mark.parametrize(("features", "metric"), [("penultimate", "euclidean"), ("input", "cosine")])
def test_scores_are_if_lissa_on_the_nearest_neighbours(problem, lissa, features, metric):
    k = 25
    out = _fastif(problem, k_candidates=k, features=features, metric=metric)
    hidden = problem.model[
        :-1
    ]  # a Sequential slice keeps the layer names: its output is the last Linear's input
    weights = {name: w for name, w in problem.weights.items() if not name.startswith("3.")}
    with torch.no_grad():
        embed = (
            (lambda x: torch.func.functional_call(hidden, weights, (x,)))
            if features == "penultimate"
            else None
        )
        train_f, query_f = (
            x.numpy() if embed is None else embed(x).numpy() for x in (problem.train_x, problem.query_x)
        )
    want = _neighbours(train_f, query_f, k, metric)
    union = set().union(*want)
    assert out.metadata["candidate_gradient_rows"] == len(union) < N
    for j in range(M):
        nonzero = set(np.flatnonzero(out.scores[j]))
        assert nonzero == want[j]
        cols = sorted(want[j])
        # the same products over fewer rows: BLAS may sum in another order (a last-bit difference)
        np.testing.assert_allclose(out.scores[j, cols], lissa.scores[j, cols], rtol=1e-12, atol=0)
    np.testing.assert_allclose(out.self_influence, lissa.self_influence, rtol=1e-12, atol=0)


def test_recall_of_the_full_top_rows_grows_with_k(problem, lissa):
    """ESTIMATORS.md 2.16: recall@20 of if_lissa's top 20 as k_candidates varies. Candidate scores are
    exact, so recall is the share of the full top 20 inside the candidate set: monotone in k, 1 at k = n."""
    top = np.argsort(-lissa.scores, axis=1)[:, :20]
    recalls = []
    for k in (10, 40, 160, N):
        out = _fastif(problem, k_candidates=k)
        got = [  # FastIF's top 20 among its candidates (all of them when k < 20)
            [i for i in np.argsort(-out.scores[j])[:20] if out.scores[j, i] != 0] for j in range(M)
        ]
        recall = np.mean([len(set(top[j]) & set(got[j])) / 20 for j in range(M)])
        inside = np.mean([np.isin(top[j], np.flatnonzero(out.scores[j])).mean() for j in range(M)])
        assert recall == pytest.approx(inside)
        recalls.append(recall)
    print("recall@20 at k = 10, 40, 160, n:", [round(float(r), 3) for r in recalls])
    assert recalls == sorted(recalls) and recalls[-1] == 1.0 and recalls[0] < 0.9


def test_row_shards_equal_the_unsharded_run(problem):
    whole = _fastif(problem, k_candidates=30)
    parts = [
        get_estimator("fastif").attribute(
            problem, {**LISSA, "k_candidates": 30}, want_self_influence=True, runtime=RT, train_range=r
        )
        for r in ((0, 100), (100, 220), (220, N))
    ]
    merged = np.concatenate([a.scores for a in parts], axis=1)
    np.testing.assert_array_equal(merged != 0, whole.scores != 0)  # the same candidates
    np.testing.assert_allclose(merged, whole.scores, rtol=1e-12, atol=0)  # rounding of other chunkings only
    np.testing.assert_allclose(
        np.concatenate([a.self_influence for a in parts]), whole.self_influence, rtol=1e-12
    )
    assert (
        sum(a.metadata["candidate_gradient_rows"] for a in parts) == whole.metadata["candidate_gradient_rows"]
    )


def test_a_diverging_scale_is_refused_naming_it(problem):
    with pytest.raises(NumericalError) as err:
        _fastif(problem, k_candidates=10, scale=0.01)
    assert err.value.parameter == "/method/params/scale"
