from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from app.schemas.common import ReadModel, RequestModel

BUILTIN_DATASETS = ("sklearn:digits", "sklearn:breast_cancer")


class BuiltinDatasetCreate(RequestModel):
    """A dataset bundled with scikit-learn (no download), optionally one side of a fixed split."""

    builtin: Literal["sklearn:digits", "sklearn:breast_cancer"]
    name: str | None = Field(None, max_length=200)
    split: Literal["all", "train", "test"] = Field(
        "all", description="Which side of a deterministic stratified split to register."
    )
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the split; the same seed gives the same split."
    )
    standardize: bool = Field(
        True,
        description="digits: scale pixels to [0, 1]; breast_cancer: z-score with training-side statistics.",
    )


class DatasetRead(ReadModel):
    id: str
    name: str
    source: Literal["upload", "builtin"]
    format: str
    state: str
    n_examples: int
    feature_shape: list[int]
    label_kind: Literal["int", "float"]
    num_classes: int | None
    has_ids: bool
    uri: str
    sha256: str = Field(description="SHA-256 of the stored canonical .npz artifact.")
    upload_sha256: str | None = Field(None, description="SHA-256 of the bytes as uploaded.")
    size_bytes: int
    details: dict
    created_at: datetime
    updated_at: datetime
