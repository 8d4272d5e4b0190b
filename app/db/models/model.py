from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base, IdMixin, TimestampMixin


class Model(IdMixin, TimestampMixin, Base):
    """A registered model: architecture from the server-side registry, task, recipe, weights."""

    __tablename__ = "model"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    architecture: Mapped[str] = mapped_column(String(100))
    architecture_params: Mapped[dict] = mapped_column()
    task: Mapped[str] = mapped_column(String(20))
    loss: Mapped[str] = mapped_column(String(20))
    recipe: Mapped[dict] = mapped_column()
    state: Mapped[str] = mapped_column(String(20))  # training | ready | failed
    n_parameters: Mapped[int] = mapped_column(BigInteger)
    train_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id", ondelete="RESTRICT"))
    training_job_id: Mapped[str | None] = mapped_column(String(36))
    weights_uri: Mapped[str | None] = mapped_column(String(500))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    # what the service's training (and every retraining) starts from, when uploaded: e.g. the pretrained
    # base and initial adapters of a lora_mlp; None: the architecture's seeded initialisation
    initial_weights_uri: Mapped[str | None] = mapped_column(String(500))
    initial_weights_sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # uploaded bytes
    error: Mapped[dict | None] = mapped_column()
    version: Mapped[int] = mapped_column(default=1)

    checkpoints: Mapped[list[Checkpoint]] = relationship(
        back_populates="model", order_by="Checkpoint.step", cascade="all, delete-orphan"
    )


class Checkpoint(IdMixin, TimestampMixin, Base):
    """Parameters saved during training, with the learning rate in effect (TracInCP's eta_t)."""

    __tablename__ = "checkpoint"
    __table_args__ = (UniqueConstraint("model_id", "step"),)

    model_id: Mapped[str] = mapped_column(ForeignKey("model.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(BigInteger)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    uri: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))

    model: Mapped[Model] = relationship(back_populates="checkpoints")
