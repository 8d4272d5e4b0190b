"""Register datasets: validate uploads or build the bundled sklearn ones, store a canonical .npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset
from app.problems import ProblemError, invalid_field
from app.schemas.datasets import BuiltinDatasetCreate
from app.services import tenants
from app.services.api_keys import Principal
from app.services.pagination import paginate
from app.storage.artifacts import ArtifactStore, StoredArtifact
from app.storage.formats import ArrayDataset, read_dataset

UploadFormat = Literal["npz", "safetensors", "parquet"]


@dataclass
class DatasetArrays:
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None


def _num_classes(ds: ArrayDataset) -> int | None:
    if ds.label_kind != "int":
        return None
    if ds.y.min() < 0:
        raise ProblemError(422, "invalid-labels", "Labels are invalid", "integer labels must be >= 0", [])
    return int(ds.y.max()) + 1


def _store(
    session: Session,
    store: ArtifactStore,
    owner: Principal,
    ds: ArrayDataset,
    *,
    name: str,
    source: str,
    fmt: str,
    upload_sha256: str | None,
    details: dict,
) -> Dataset:
    arrays = {"X": ds.x, "y": ds.y}
    if ds.ids is not None:
        arrays["ids"] = ds.ids
    tenants.reserve_storage(session, owner.tenant_id, owner.limits, sum(a.nbytes for a in arrays.values()))
    stored: StoredArtifact = store.put_npz(**arrays)
    row = Dataset(
        tenant_id=owner.tenant_id,
        name=name,
        source=source,
        format=fmt,
        state="ready",
        n_examples=int(ds.x.shape[0]),
        feature_shape=[int(d) for d in ds.x.shape[1:]],
        label_kind=ds.label_kind,
        num_classes=_num_classes(ds),
        has_ids=ds.ids is not None,
        uri=stored.uri,
        sha256=stored.sha256,
        upload_sha256=upload_sha256,
        size_bytes=stored.size_bytes,
        details=details,
    )
    session.add(row)
    session.flush()
    return row


def create_from_upload(
    session: Session,
    store: ArtifactStore,
    owner: Principal,
    *,
    path: Path,
    upload_sha256: str,
    fmt: UploadFormat,
    name: str,
    label_column: str,
    id_column: str | None,
    max_bytes: int,
) -> Dataset:
    """Validate the uploaded file completely before anything is stored."""
    ds = read_dataset(
        path, fmt, pointer="/file", max_bytes=max_bytes, label_column=label_column, id_column=id_column
    )
    details = {"label_column": label_column} if fmt == "parquet" else {}
    return _store(
        session,
        store,
        owner,
        ds,
        name=name,
        source="upload",
        fmt=fmt,
        upload_sha256=upload_sha256,
        details=details,
    )


def _load_builtin(spec: BuiltinDatasetCreate) -> ArrayDataset:
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    loader = {"sklearn:digits": load_digits, "sklearn:breast_cancer": load_breast_cancer}[spec.builtin]
    bunch = loader()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    ids = np.arange(len(y), dtype=np.int64)
    try:
        train_idx, test_idx = train_test_split(
            ids, test_size=spec.test_fraction, random_state=spec.seed, stratify=y
        )
    except ValueError as exc:  # a stratified side smaller than the number of classes
        raise invalid_field("/test_fraction", str(exc)) from None
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    if spec.standardize:
        if spec.builtin == "sklearn:digits":
            x = x / 16.0
        else:
            mean, std = x[train_idx].mean(axis=0), x[train_idx].std(axis=0)
            x = (x - mean) / np.where(std > 0, std, 1.0)
    rows = {"all": ids, "train": train_idx, "test": test_idx}[spec.split]
    return ArrayDataset(x=x[rows].astype(np.float32), y=y[rows], ids=ids[rows], label_kind="int")


def create_builtin(
    session: Session, store: ArtifactStore, owner: Principal, spec: BuiltinDatasetCreate
) -> Dataset:
    ds = _load_builtin(spec)
    name = spec.name or f"{spec.builtin}[{spec.split}]"
    details = spec.model_dump(exclude={"name"})
    return _store(
        session,
        store,
        owner,
        ds,
        name=name,
        source="builtin",
        fmt="builtin",
        upload_sha256=None,
        details=details,
    )


def get(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's dataset; another tenant's answers 404 exactly like a missing one."""
    row = session.get(Dataset, dataset_id)
    if row is None or row.tenant_id != tenant_id:
        raise ProblemError(404, "not-found", "Dataset not found", f"no dataset {dataset_id}")
    return row


def list_page(session: Session, tenant_id: str, page_size: int, page_token: str | None):
    return paginate(
        session, select(Dataset).where(Dataset.tenant_id == tenant_id), Dataset, page_size, page_token
    )


def load_arrays(store: ArtifactStore, dataset: Dataset) -> DatasetArrays:
    data = store.load_npz(dataset.uri)
    return DatasetArrays(x=data["X"], y=data["y"], ids=data.get("ids"))
