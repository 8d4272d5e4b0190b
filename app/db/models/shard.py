from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, IdMixin, TimestampMixin


class JobShard(IdMixin, TimestampMixin, Base):
    """One slice of a fanned-out job: rows ``train_lo..train_hi-1`` x some checkpoints.

    ``kind`` says which rows: training examples (``train_rows``) or the subsets of a
    retraining plan (``subsets``).

    Shards have their own lease and attempt counter (fencing token), like jobs:
    a shard that runs twice stores its partial result once.
    """

    __tablename__ = "job_shard"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    train_lo: Mapped[int] = mapped_column(BigInteger)
    train_hi: Mapped[int] = mapped_column(BigInteger)
    checkpoint_indices: Mapped[list | None] = mapped_column()
    kind: Mapped[str] = mapped_column(String(20), default="train_rows", server_default="train_rows")
    state: Mapped[str] = mapped_column(String(20), index=True, default="queued")
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    scores_uri: Mapped[str | None] = mapped_column(String(500))
    self_influence_uri: Mapped[str | None] = mapped_column(String(500))
    compute_seconds: Mapped[float | None] = mapped_column()
    # a row shard's estimator metadata (warnings, solver convergence, ...) and score standard errors
    details: Mapped[dict | None] = mapped_column()
    scores_stderr_uri: Mapped[str | None] = mapped_column(String(500))


class TrainStateEntry(TimestampMixin, Base):
    """A cached train-side state (e.g. Hessian factor, EK-FAC eigenbases, TRAK features).

    ``key`` hashes everything the state depends on: estimator, its state parameters,
    the weights and checkpoints, the training set and the code version.
    """

    __tablename__ = "train_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    estimator: Mapped[str] = mapped_column(String(100))
    uri: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    fit_seconds: Mapped[float] = mapped_column()
    inputs: Mapped[dict] = mapped_column(default=dict)
