from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, IdMixin, TimestampMixin


class Dataset(IdMixin, TimestampMixin, Base):
    """A validated array dataset stored as one content-addressed ``.npz`` artifact."""

    __tablename__ = "dataset"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))  # upload | builtin
    format: Mapped[str] = mapped_column(
        String(20)
    )  # format the user sent: npz | safetensors | parquet | builtin
    state: Mapped[str] = mapped_column(String(20), default="ready")
    n_examples: Mapped[int] = mapped_column(BigInteger)
    feature_shape: Mapped[list] = mapped_column()
    label_kind: Mapped[str] = mapped_column(String(10))  # int | float
    num_classes: Mapped[int | None] = mapped_column()
    has_ids: Mapped[bool] = mapped_column(default=False)
    uri: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    upload_sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    details: Mapped[dict] = mapped_column(default=dict)
