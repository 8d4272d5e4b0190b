from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, TimestampMixin


class InfluenceResult(TimestampMixin, Base):
    """At most one per job (primary key = job id): a re-run cannot store a second result."""

    __tablename__ = "influence_result"

    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column()
    n_queries: Mapped[int] = mapped_column()
    n_train: Mapped[int] = mapped_column()
    scores_uri: Mapped[str | None] = mapped_column(String(500))
    self_influence_uri: Mapped[str | None] = mapped_column(String(500))
    values_uri: Mapped[str | None] = mapped_column(String(500))  # npz: value, stderr (data valuation)
    group_scores_uri: Mapped[str | None] = mapped_column(String(500))  # npy: m x G (output.groups)
    details: Mapped[dict] = mapped_column(default=dict)  # sign convention, orientation, timings, ...


class QueryResult(Base):
    """Top-k proponents and opponents of one query, as (train index, score) lists."""

    __tablename__ = "query_result"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("influence_result.job_id", ondelete="CASCADE"), primary_key=True
    )
    query_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    query_row: Mapped[int] = mapped_column(Integer)
    query_id: Mapped[int | None] = mapped_column(BigInteger)
    proponents: Mapped[list] = mapped_column()
    opponents: Mapped[list] = mapped_column()
