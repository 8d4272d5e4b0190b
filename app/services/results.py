"""Turn an estimator's attribution into stored results, and serve them back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset, InfluenceResult, Job, QueryResult
from app.estimators.group import sum_over_groups
from app.problems import ProblemError
from app.storage.artifacts import ArtifactStore


@dataclass
class PreparedResult:
    """Everything the finishing transaction inserts; artifacts are already in the store."""

    n_queries: int
    n_train: int
    scores_uri: str | None
    self_influence_uri: str | None
    values_uri: str | None
    details: dict
    rows: list[dict]
    group_scores_uri: str | None = None

    def write(self, job_id: str, attempt: int):
        def _write(session: Session) -> None:
            session.add(
                InfluenceResult(
                    job_id=job_id,
                    attempt=attempt,
                    n_queries=self.n_queries,
                    n_train=self.n_train,
                    scores_uri=self.scores_uri,
                    self_influence_uri=self.self_influence_uri,
                    values_uri=self.values_uri,
                    group_scores_uri=self.group_scores_uri,
                    details=self.details,
                )
            )
            session.flush()
            if self.rows:
                session.execute(
                    QueryResult.__table__.insert(), [dict(job_id=job_id, **row) for row in self.rows]
                )

        return _write


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k largest (proponents) and k smallest (opponents) scores per row."""
    tensor = torch.from_numpy(np.ascontiguousarray(scores))
    k = min(k, tensor.shape[1])
    return tensor.topk(k, dim=1).indices.numpy(), tensor.topk(k, dim=1, largest=False).indices.numpy()


def prepare(
    store: ArtifactStore,
    *,
    scores: np.ndarray | None,
    self_influence: np.ndarray | None,
    query_rows: np.ndarray,
    scores_stderr: np.ndarray | None = None,
    query_ids: np.ndarray | None,
    train_ids: np.ndarray | None,
    top: int,
    keep_full_matrix: bool,
    details: dict,
    values: np.ndarray | None = None,
    values_stderr: np.ndarray | None = None,
    groups: dict | None = None,
    group_scores: np.ndarray | None = None,
) -> PreparedResult:
    """Top-k rows and artifacts of an attribution; each top-k entry carries its score's standard error
    when the estimator gives ``scores_stderr``. ``groups`` (the job's ``output.groups``): the
    ``m x G`` group scores are ``group_scores`` when the child computed them (second/newton order),
    else the sums of the validated ``scores`` over each group (first order)."""
    rows: list[dict] = []
    scores_uri = self_uri = values_uri = None
    if scores is not None:
        n_train = int(scores.shape[1])
    else:
        n_train = len(self_influence if self_influence is not None else values)
    if scores is not None:
        if not np.isfinite(scores).all():
            raise ProblemError(
                500,
                "numerical-instability",
                "Scores are not finite",
                "the estimator produced NaN or infinite scores; try more damping",
            )
        pro, opp = top_k(scores, top)
        if scores_stderr is not None and not np.isfinite(scores_stderr).all():
            raise ProblemError(
                500,
                "numerical-instability",
                "Standard errors are not finite",
                "the estimator produced NaN or infinite standard errors for its scores",
            )

        def entries(j: int, idx: np.ndarray) -> list[dict]:
            return [
                {
                    "train_index": int(i),
                    "train_id": int(train_ids[i]) if train_ids is not None else None,
                    "score": float(scores[j, i]),
                    **({"stderr": float(scores_stderr[j, i])} if scores_stderr is not None else {}),
                }
                for i in idx
            ]

        rows = [
            {
                "query_index": j,
                "query_row": int(query_rows[j]),
                "query_id": int(query_ids[j]) if query_ids is not None else None,
                "proponents": entries(j, pro[j]),
                "opponents": entries(j, opp[j]),
            }
            for j in range(scores.shape[0])
        ]
        if keep_full_matrix:
            scores_uri = store.put_npy(np.ascontiguousarray(scores, dtype=np.float32)).uri
    if self_influence is not None:
        self_uri = store.put_npy(np.asarray(self_influence, dtype=np.float32)).uri
    if values is not None:
        stderr = np.zeros_like(values) if values_stderr is None else values_stderr
        if not (np.isfinite(values).all() and np.isfinite(stderr).all()):
            raise ProblemError(
                500,
                "numerical-instability",
                "Values are not finite",
                "the valuation produced NaN or infinite values",
            )
        values_uri = store.put_npz(
            value=np.asarray(values, np.float64), stderr=np.asarray(stderr, np.float64)
        ).uri
    group_uri = None
    if groups is not None:
        group_uri = _store_group_scores(store, groups, scores, group_scores)
        members = groups["members"]
        details = {
            **details,
            "groups": {
                "order": groups["order"],
                "names": list(members),
                "sizes": [len(r) for r in members.values()],
            },
        }
    return PreparedResult(
        len(query_rows), n_train, scores_uri, self_uri, values_uri, details, rows, group_uri
    )


def _store_group_scores(
    store: ArtifactStore, groups: dict, scores: np.ndarray | None, group_scores: np.ndarray | None
) -> str:
    if group_scores is None:
        if scores is None or groups["order"] != "first":  # refused at submit
            raise ProblemError(500, "group-scores-missing", "Group scores missing", "no scores to group")
        group_scores = sum_over_groups(scores, [np.asarray(r) for r in groups["members"].values()])
    if not np.isfinite(group_scores).all():
        raise ProblemError(
            500,
            "numerical-instability",
            "Group scores are not finite",
            "the group influence produced NaN or infinite scores; try more damping",
        )
    return store.put_npy(np.ascontiguousarray(group_scores, dtype=np.float64)).uri


def group_page(
    store: ArtifactStore, result: InfluenceResult, query_rows: list[int], page_size: int, offset: int
) -> tuple[dict, list[dict], bool]:
    """The group scores of queries ``offset ..`` (a page): the groups, one row of G scores per query."""
    if result.group_scores_uri is None:
        raise ProblemError(
            404, "no-group-scores", "No group scores", "this job had no output.groups; submit with them"
        )
    matrix = np.load(store.path(result.group_scores_uri), mmap_mode="r", allow_pickle=False)
    info = result.details["groups"]
    stop = min(offset + page_size, matrix.shape[0])
    items = [
        {"query_index": j, "query_row": int(query_rows[j]), "scores": [float(v) for v in matrix[j]]}
        for j in range(offset, stop)
    ]
    return info, items, stop < matrix.shape[0]


def get_result(session: Session, job: Job) -> InfluenceResult:
    if job.state != "succeeded":
        raise ProblemError(
            409,
            "job-not-succeeded",
            "No results yet",
            f"the job is {job.state}",
            headers={"Retry-After": "2"} if job.state in ("queued", "running") else {},
        )
    result = session.get(InfluenceResult, job.id)
    if result is None:  # cannot happen: state and result commit together
        raise ProblemError(500, "result-missing", "Result missing", "the job succeeded but has no result")
    return result


def train_ids(session: Session, store: ArtifactStore, job: Job) -> np.ndarray | None:
    dataset = session.get(Dataset, job.train_dataset_id)
    return store.load_npz(dataset.uri, keys=("ids",)).get("ids") if dataset.has_ids else None


def values_page(
    store: ArtifactStore,
    result: InfluenceResult,
    train_ids: np.ndarray | None,
    *,
    order: str,
    page_size: int,
    offset: int,
) -> tuple[list[dict], bool]:
    """Data values sorted ascending (lowest first: candidates for mislabeled/harmful) or descending."""
    if result.values_uri is None:
        raise ProblemError(
            404, "no-values", "No data values", "this job's estimator does not produce data values"
        )
    data = store.load_npz(result.values_uri)
    order_idx = np.argsort(data["value"], kind="stable")
    if order == "desc":
        order_idx = order_idx[::-1]
    chosen = order_idx[offset : offset + page_size]
    items = [
        {
            "rank": offset + r,
            "train_index": int(i),
            "train_id": int(train_ids[i]) if train_ids is not None else None,
            "value": float(data["value"][i]),
            "stderr": float(data["stderr"][i]),
        }
        for r, i in enumerate(chosen)
    ]
    return items, offset + page_size < len(order_idx)


def page(session: Session, job: Job, page_size: int, after: int | None, query_index: int | None):
    stmt = select(QueryResult).where(QueryResult.job_id == job.id)
    if query_index is not None:
        stmt = stmt.where(QueryResult.query_index == query_index)
    if after is not None:
        stmt = stmt.where(QueryResult.query_index > after)
    rows = list(session.scalars(stmt.order_by(QueryResult.query_index).limit(page_size + 1)))
    more = len(rows) > page_size
    return rows[:page_size], more
