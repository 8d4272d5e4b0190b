"""Safe dataset/weights readers: valid round-trips and hostile files built at test time."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from app.problems import ProblemError
from app.storage import formats
from app.storage.formats import ArrayDataset, read_dataset, read_state_dict, safetensors_stream, sniff_format

MB = 1024 * 1024
BIG = 512 * MB  # a generous max_bytes for tests that are not about size


class _Payload:
    """Unpickling this runs ``touch <marker>``: the marker must never appear."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _problem(fn, *args, **kwargs) -> ProblemError:
    with pytest.raises(ProblemError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.fixture
def no_deserialisers(monkeypatch):
    """Any attempt to unpickle or load torch/numpy archives fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a deserialiser was called on user bytes")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(torch.jit, "load", boom)
    monkeypatch.setattr(torch.export, "load", boom)
    monkeypatch.setattr(np, "load", boom)


def _npy_bytes(arr: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _patch_declared_size(path: Path, member: str, new_size: int) -> None:
    """Rewrite ``member``'s uncompressed size in both its local header and central directory entry."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    pos = 0
    patched = 0
    while (pos := data.find(b"PK\x03\x04", pos)) >= 0:
        n_len = struct.unpack_from("<H", data, pos + 26)[0]
        if data[pos + 30 : pos + 30 + n_len] == name:
            struct.pack_into("<L", data, pos + 22, new_size)
            patched += 1
        pos += 4
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) >= 0:
        n_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + n_len] == name:
            struct.pack_into("<L", data, pos + 24, new_size)
            patched += 1
        pos += 4
    assert patched == 2
    path.write_bytes(bytes(data))


# --- datasets: valid files --------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_round_trip_int_labels_and_ids(tmp_path, save):
    x = np.arange(15, dtype=np.float64).reshape(5, 3)
    y = np.array([0, 1, 2, 1, 0], dtype=np.int32)
    ids = np.array([10, 11, 12, 13, 14], dtype=np.uint16)
    path = tmp_path / "d.npz"
    save(path, X=x, y=y, ids=ids)

    ds = read_dataset(path, "npz", max_bytes=BIG)

    assert isinstance(ds, ArrayDataset)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and ds.ids.dtype == np.int64
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    np.testing.assert_array_equal(ds.y, y)
    np.testing.assert_array_equal(ds.ids, ids)
    assert ds.label_kind == "int"
    assert ds.n_examples == 5 and ds.feature_shape == (3,)


def test_npz_float_labels_1d_features_fortran_and_big_endian(tmp_path):
    x1 = np.linspace(0, 1, 6).astype(">f8")
    y = np.linspace(-1, 1, 6)
    np.savez(tmp_path / "a.npz", X=x1, y=y)
    ds = read_dataset(tmp_path / "a.npz", "npz", max_bytes=BIG)
    assert ds.x.shape == (6, 1) and ds.feature_shape == (1,)
    np.testing.assert_allclose(ds.x[:, 0], x1.astype(np.float32))
    assert ds.label_kind == "float" and ds.y.dtype == np.float32
    np.testing.assert_allclose(ds.y, y.astype(np.float32))
    assert ds.ids is None

    x3 = np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    np.savez(tmp_path / "b.npz", X=x3, y=np.array([1, 0], dtype=np.uint8))
    ds = read_dataset(tmp_path / "b.npz", "npz", max_bytes=BIG)
    assert ds.feature_shape == (3, 4)
    np.testing.assert_array_equal(ds.x, x3.astype(np.float32))
    assert ds.x.flags.c_contiguous


def test_safetensors_dataset_round_trip(tmp_path):
    x = np.arange(16, dtype=np.uint8).reshape(4, 2, 2)
    y = np.array([0.5, -1.5, 2.0, 3.25], dtype=np.float32)
    ids = np.array([7, 3, 5, 1], dtype=np.int64)
    path = tmp_path / "d.safetensors"
    safetensors.numpy.save_file({"X": x, "y": y, "ids": ids}, str(path))

    ds = read_dataset(path, "safetensors", max_bytes=BIG)

    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    np.testing.assert_array_equal(ds.y, y)
    np.testing.assert_array_equal(ds.ids, ids)
    assert ds.label_kind == "float" and ds.feature_shape == (2, 2)


def test_parquet_round_trip_across_row_groups(tmp_path):
    n = 10
    table = pa.table(
        {
            "f0": pa.array(np.linspace(0, 1, n), pa.float64()),
            "id": pa.array(np.arange(100, 100 + n), pa.int64()),
            "f1": pa.array(np.arange(n), pa.int32()),
            "label": pa.array(np.arange(n) % 3, pa.int64()),
            "f2": pa.array(np.ones(n), pa.float16()),
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=3)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4

    ds = read_dataset(path, "parquet", max_bytes=BIG, id_column="id")

    assert ds.x.shape == (n, 3) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x[:, 0], np.linspace(0, 1, n).astype(np.float32))
    np.testing.assert_array_equal(ds.x[:, 1], np.arange(n))
    np.testing.assert_array_equal(ds.x[:, 2], np.ones(n))
    np.testing.assert_array_equal(ds.y, np.arange(n) % 3)
    assert ds.label_kind == "int" and ds.y.dtype == np.int64
    np.testing.assert_array_equal(ds.ids, np.arange(100, 100 + n))


def test_parquet_float_label_custom_column_without_ids(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0], "target": [0.25, -0.5]}), path)
    ds = read_dataset(path, "parquet", max_bytes=BIG, label_column="target")
    assert ds.label_kind == "float" and ds.ids is None
    np.testing.assert_array_equal(ds.y, np.array([0.25, -0.5], np.float32))


# --- datasets: hostile npz ----------------------------------------------------------


def test_payloads_used_below_are_live(tmp_path):
    """Sanity check: the payloads really do run when deserialised by an unsafe loader."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
    marker.unlink()
    path = _write_zip(
        tmp_path / "p.npz", {"X.npy": _npy_bytes(np.array([_Payload(marker)]), allow_pickle=True)}
    )
    np.load(path, allow_pickle=True)["X"]
    assert marker.exists()


def test_npz_object_array_is_refused_without_running_it(tmp_path, no_deserialisers):
    marker = tmp_path / "pwned"
    evil = np.array([_Payload(marker), 1], dtype=object)
    path = _write_zip(
        tmp_path / "evil.npz",
        {"X.npy": _npy_bytes(evil, allow_pickle=True), "y.npy": _npy_bytes(np.zeros(2, np.int64))},
    )
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert (err.status, err.code) == (415, "pickle-refused")
    assert err.errors[0].pointer == "/file"
    assert not marker.exists()


def test_pickle_uploaded_as_npz_is_refused(tmp_path, no_deserialisers):
    marker = tmp_path / "pwned"
    path = tmp_path / "d.npz"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert (err.status, err.code) == (415, "pickle-refused")
    assert not marker.exists()


def test_torch_checkpoints_uploaded_as_datasets_are_refused(tmp_path, no_deserialisers):
    marker = tmp_path / "pwned"
    pt = tmp_path / "d.npz"
    torch.save({"X": torch.ones(2, 2), "evil": _Payload(marker)}, pt)
    assert _problem(read_dataset, pt, "npz", max_bytes=BIG).code == "pickle-refused"
    ts = tmp_path / "ts.npz"
    torch.jit.save(torch.jit.script(_Tiny()), str(ts))
    assert _problem(read_dataset, ts, "npz", max_bytes=BIG).code == "executable-archive-refused"
    assert not marker.exists()


def test_small_members_may_compress_very_well(tmp_path):
    """The ratio limit only applies to large members: an all-zero label vector is fine."""
    path = tmp_path / "d.npz"
    np.savez_compressed(path, X=np.arange(100_000, dtype=np.float32), y=np.zeros(100_000, np.int64))
    info = zipfile.ZipFile(path).getinfo("y.npy")
    assert info.file_size / info.compress_size > 200
    ds = read_dataset(path, "npz", max_bytes=BIG)
    assert ds.n_examples == 100_000 and ds.feature_shape == (1,)


def test_lying_npy_header_is_refused_before_allocating(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    path = _write_zip(
        tmp_path / "liar.npz",
        {"X.npy": header.getvalue() + b"\0" * 64, "y.npy": _npy_bytes(np.zeros(3, np.int64))},
    )
    assert path.stat().st_size < 2000
    start = time.perf_counter()
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert time.perf_counter() - start < 2.0
    assert err.status in (413, 422) and err.code in ("corrupt-file", "too-large")


def test_zip_bomb_member_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, X=np.zeros(50 * MB // 8), y=np.zeros(1, np.int64))
    info = zipfile.ZipFile(path).getinfo("X.npy")
    assert info.file_size / info.compress_size > 200
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert (err.status, err.code) == (422, "compression-bomb")


@pytest.mark.parametrize("declared", [4096, 150 * MB])
def test_npz_member_with_lying_declared_size_is_refused(tmp_path, declared):
    path = _write_zip(
        tmp_path / "liar.npz",
        {"X.npy": _npy_bytes(np.zeros(50 * MB // 8)), "y.npy": _npy_bytes(np.zeros(1, np.int64))},
    )
    _patch_declared_size(path, "X.npy", declared)
    assert zipfile.ZipFile(path).getinfo("X.npy").file_size == declared
    start = time.perf_counter()
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert time.perf_counter() - start < 5.0
    assert err.status == 422 and err.code in ("corrupt-file", "compression-bomb")


def test_member_stream_longer_than_declared_is_a_bomb():
    reader = formats._CountingReader(io.BytesIO(b"x" * 100), limit=10)
    assert reader.read(4) == b"xxxx"
    with pytest.raises(formats._BombError):
        reader.read(1000)


def test_npz_declared_sizes_over_the_limit_are_too_large(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "big.npz"
    np.savez_compressed(
        path, X=rng.integers(0, 4, size=(4 * MB, 1), dtype=np.int8), y=np.zeros(4 * MB, np.int8)
    )
    assert path.stat().st_size < 4 * MB
    err = _problem(read_dataset, path, "npz", max_bytes=4 * MB)
    assert (err.status, err.code) == (413, "too-large")


def test_npz_with_too_many_members_is_refused(tmp_path):
    members = {f"a{i}.npy": _npy_bytes(np.zeros(1)) for i in range(50)}
    path = _write_zip(tmp_path / "many.npz", members)
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert (err.status, err.code) == (422, "unexpected-array")


def test_npz_duplicate_member_names_are_refused(tmp_path):
    path = tmp_path / "dup.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("X.npy", _npy_bytes(np.zeros((2, 2))))
        with pytest.warns(UserWarning):
            zf.writestr("X.npy", _npy_bytes(np.zeros((2, 2))))
        zf.writestr("y.npy", _npy_bytes(np.zeros(2, np.int64)))
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert (err.status, err.code) == (422, "corrupt-file")


def test_not_a_zip_is_corrupt(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"hello, this is not a zip archive at all" * 10)
    err = _problem(read_dataset, path, "npz", max_bytes=BIG)
    assert (err.status, err.code) == (422, "corrupt-file")


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def test_nan_features_are_refused_with_a_count(tmp_path):
    x = np.ones((4, 2))
    x[0, 0] = np.nan
    x[3, 1] = np.inf
    err = _problem(read_dataset, _npz(tmp_path, X=x, y=np.zeros(4, np.int64)), "npz", max_bytes=BIG)
    assert (err.status, err.code) == (422, "non-finite-values")
    assert "2 non-finite" in err.detail


def test_values_that_overflow_float32_are_non_finite(tmp_path):
    x = np.array([[1.0], [1e300]])
    err = _problem(read_dataset, _npz(tmp_path, X=x, y=np.zeros(2, np.int64)), "npz", max_bytes=BIG)
    assert (err.status, err.code) == (422, "non-finite-values")


def test_nan_float_labels_are_refused(tmp_path):
    err = _problem(
        read_dataset, _npz(tmp_path, X=np.ones((2, 1)), y=np.array([0.0, np.nan])), "npz", max_bytes=BIG
    )
    assert (err.status, err.code) == (422, "non-finite-values")


@pytest.mark.parametrize(
    ("arrays", "code"),
    [
        ({"X": np.ones((3, 2)), "y": np.zeros(4, np.int64)}, "shape-mismatch"),
        ({"X": np.ones((3, 2)), "y": np.zeros((3, 1), np.int64)}, "shape-mismatch"),
        ({"X": np.ones((3, 0)), "y": np.zeros(3, np.int64)}, "shape-mismatch"),
        ({"X": np.ones((0, 2)), "y": np.zeros(0, np.int64)}, "empty-dataset"),
        ({"X": np.ones((3, 2))}, "missing-array"),
        ({"y": np.zeros(3, np.int64)}, "missing-array"),
        ({"X": np.ones((3, 2)), "y": np.zeros(3, np.int64), "extra": np.ones(3)}, "unexpected-array"),
        ({"x": np.ones((3, 2)), "y": np.zeros(3, np.int64)}, "unexpected-array"),
        ({"X": np.array(["a", "b"]), "y": np.zeros(2, np.int64)}, "invalid-dtype"),
        ({"X": np.ones((2, 2)), "y": np.array([b"a", b"b"])}, "invalid-dtype"),
        ({"X": np.ones((2, 2), np.complex64), "y": np.zeros(2, np.int64)}, "invalid-dtype"),
        ({"X": np.ones((2, 2), bool), "y": np.zeros(2, np.int64)}, "invalid-dtype"),
        ({"X": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), "y": np.zeros(2, np.int64)}, "invalid-dtype"),
        ({"X": np.ones((2, 2), np.longdouble), "y": np.zeros(2, np.int64)}, "invalid-dtype"),
        ({"X": np.ones((2, 2)), "y": np.zeros(2, np.int64), "ids": np.array([1.0, 2.0])}, "invalid-dtype"),
        ({"X": np.ones((2, 2)), "y": np.zeros(2, np.int64), "ids": np.array([1, 1])}, "duplicate-ids"),
        ({"X": np.ones((2, 2)), "y": np.zeros(2, np.int64), "ids": np.array([1, 2, 3])}, "shape-mismatch"),
        ({"X": np.ones((2, 2)), "y": np.array([1, 2**63], np.uint64)}, "invalid-dtype"),
    ],
)
def test_npz_content_checks(tmp_path, arrays, code):
    err = _problem(read_dataset, _npz(tmp_path, **arrays), "npz", max_bytes=BIG)
    assert (err.status, err.code) == (422, code)
    assert err.errors and err.errors[0].pointer == "/file"


def test_oversized_file_is_413_and_pointer_is_passed_through(tmp_path):
    path = _npz(tmp_path, X=np.ones((100, 10)), y=np.zeros(100, np.int64))
    err = _problem(read_dataset, path, "npz", max_bytes=1000, pointer="/train_file")
    assert (err.status, err.code) == (413, "too-large")
    assert err.errors[0].pointer == "/train_file"
    assert err.to_dict()["code"] == "too-large"


def test_unknown_dataset_format_is_415(tmp_path):
    path = _npz(tmp_path, X=np.ones((1, 1)), y=np.zeros(1, np.int64))
    err = _problem(read_dataset, path, "csv", max_bytes=BIG)
    assert (err.status, err.code) == (415, "unsupported-format")


# --- datasets: hostile safetensors ------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "code"),
    [
        ({"X": np.ones((2, 2), np.float32)}, "missing-array"),
        ({"X": np.ones((2, 2), np.float32), "y": np.zeros(2), "w": np.zeros(1)}, "unexpected-array"),
        ({"X": np.ones((2, 2), bool), "y": np.zeros(2)}, "invalid-dtype"),
        ({"X": np.ones((2, 2), np.float32), "y": np.zeros(3)}, "shape-mismatch"),
        ({"X": np.full((2, 2), np.nan, np.float32), "y": np.zeros(2)}, "non-finite-values"),
    ],
)
def test_safetensors_dataset_checks(tmp_path, tensors, code):
    path = tmp_path / "d.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    err = _problem(read_dataset, path, "safetensors", max_bytes=BIG)
    assert (err.status, err.code) == (422, code)


def test_safetensors_dataset_that_is_a_pickle_is_refused(tmp_path, no_deserialisers):
    marker = tmp_path / "pwned"
    path = tmp_path / "d.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    err = _problem(read_dataset, path, "safetensors", max_bytes=BIG)
    assert (err.status, err.code) == (415, "pickle-refused")
    assert not marker.exists()


# --- datasets: hostile parquet ------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "code"),
    [
        ({"a": [1.0, 2.0], "name": ["x", "y"], "label": [0, 1]}, "invalid-dtype"),
        ({"a": pa.array(["p", "q"]).dictionary_encode(), "label": [0, 1]}, "invalid-dtype"),
        ({"a": [[1.0], [2.0]], "label": [0, 1]}, "invalid-dtype"),
        ({"a": [True, False], "label": [0, 1]}, "invalid-dtype"),
        ({"a": [1.0, 2.0], "label": ["0", "1"]}, "invalid-dtype"),
        (
            {
                "a": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((2, 2), np.float32)),
                "label": [0, 1],
            },
            "invalid-dtype",
        ),
        ({"a": [1.0, 2.0], "y": [0, 1]}, "missing-column"),
        ({"a": [1.0, None], "label": [0, 1]}, "null-values"),
        ({"a": [1.0, float("nan")], "label": [0, 1]}, "non-finite-values"),
        ({"label": [0, 1]}, "shape-mismatch"),
    ],
)
def test_parquet_checks(tmp_path, columns, code):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(columns), path)
    err = _problem(read_dataset, path, "parquet", max_bytes=BIG)
    assert (err.status, err.code) == (422, code)


def test_parquet_bad_id_column(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0], "label": [0, 1], "id": [5, 5], "fid": [0.5, 1.5]}), path)
    assert _problem(read_dataset, path, "parquet", max_bytes=BIG, id_column="nope").code == "missing-column"
    assert _problem(read_dataset, path, "parquet", max_bytes=BIG, id_column="fid").code == "invalid-dtype"
    assert _problem(read_dataset, path, "parquet", max_bytes=BIG, id_column="id").code == "duplicate-ids"


def test_parquet_decoded_size_over_limit_is_413(tmp_path):
    path = tmp_path / "d.parquet"
    n = 200_000
    pq.write_table(pa.table({"a": np.zeros(n), "label": np.zeros(n, np.int64)}), path)
    assert path.stat().st_size < 100_000  # run-length encoding makes it tiny on disk
    err = _problem(read_dataset, path, "parquet", max_bytes=1_000_000)
    assert (err.status, err.code) == (413, "too-large")


def test_parquet_garbage_is_corrupt(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 100 + b"PAR1")
    err = _problem(read_dataset, path, "parquet", max_bytes=BIG)
    assert (err.status, err.code) == (422, "corrupt-file")


# --- weights ------------------------------------------------------------------------


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone().contiguous() for k, v in _Tiny().state_dict().items()}


def test_valid_safetensors_weights_load(tmp_path):
    sd = _state_dict()
    sd["half"] = torch.ones(3, dtype=torch.bfloat16)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata={"format": "pt"})
    assert sniff_format(path) == "safetensors"

    loaded = read_state_dict(path, max_bytes=BIG)

    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k], v)


def test_torch_save_checkpoint_is_refused_as_pickle(tmp_path, no_deserialisers):
    marker = tmp_path / "pwned"
    path = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.ones(2, 3), "evil": _Payload(marker)}, path)
    assert sniff_format(path) == "pickle"
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (415, "pickle-refused")
    assert "safetensors.torch.save_file" in err.detail
    assert err.errors[0].pointer == "/weights"
    assert not marker.exists()


def test_legacy_torch_save_is_refused_as_pickle(tmp_path, no_deserialisers):
    path = tmp_path / "w.pth"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "pickle"
    assert _problem(read_state_dict, path, max_bytes=BIG).code == "pickle-refused"


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_raw_pickle_renamed_safetensors_is_refused(tmp_path, no_deserialisers, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert err.status == 415 and err.code in ("pickle-refused", "unsupported-format")
    if protocol >= 2:
        assert err.code == "pickle-refused"
    assert not marker.exists()


def test_torchscript_is_refused(tmp_path, no_deserialisers):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(_Tiny()), str(path))
    assert sniff_format(path) == "torchscript"
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (415, "executable-archive-refused")


def _export_pt2(path: Path) -> None:
    program = torch.export.export(_Tiny(), (torch.randn(2, 3),))
    torch.export.save(program, str(path))


def test_torch_export_pt2_is_refused(tmp_path, no_deserialisers):
    path = tmp_path / "m.pt2"
    _export_pt2(path)
    assert sniff_format(path) == "pt2"
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (415, "executable-archive-refused")


def test_pt2_with_pickle_payload_in_sample_inputs_is_refused(tmp_path, no_deserialisers):
    clean = tmp_path / "clean.pt2"
    _export_pt2(clean)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        swapped = 0
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = pickle.dumps(_Payload(marker))
                swapped += 1
            dst.writestr(info, data)
        assert swapped == 1
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (415, "executable-archive-refused")
    assert not marker.exists()


def test_other_zip_archives_are_refused_as_weights(tmp_path, no_deserialisers):
    path = tmp_path / "w.npz"
    np.savez(path, X=np.ones(3))
    assert sniff_format(path) == "zip-archive"
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (415, "executable-archive-refused")


def test_unknown_bytes_are_unsupported_with_conversion_hint(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"\x01\x02\x03 definitely not weights")
    assert sniff_format(path) == "unknown"
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (415, "unsupported-format")
    assert "safetensors.torch.save_file" in err.detail


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_safetensors_is_corrupt(tmp_path, cut):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(_state_dict(), str(path))
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    keep = len(data) - 5 if cut == "data" else 8 + header_len // 2
    path.write_bytes(data[:keep])
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (422, "corrupt-file")


@pytest.mark.parametrize(
    ("header", "data"),
    [
        # overlapping offsets
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        # a gap between tensors
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
        ),
        # shape does not match the byte span
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        # trailing bytes after the last tensor
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16),
        # malformed entries
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
        ({"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    ],
)
def test_inconsistent_safetensors_headers_are_corrupt(tmp_path, header, data):
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (422, "corrupt-file")


def test_safetensors_header_length_lies(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 90 * MB) + b'{"a": 1}')
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (422, "corrupt-file")


def test_safetensors_header_not_json_or_duplicated_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'  # noqa: E501
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    assert _problem(read_state_dict, path, max_bytes=BIG).code == "corrupt-file"
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # deep nesting: RecursionError
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert err.code == "corrupt-file" and "JSON" in err.detail


def test_nan_weight_is_refused_naming_the_tensor(tmp_path):
    sd = _state_dict()
    sd["fc.bias"][1] = float("nan")
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(sd, str(path))
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (422, "non-finite-values")
    assert "fc.bias" in err.detail


def test_int64_weight_dtype_is_refused_unless_allowed(tmp_path):
    sd = _state_dict()
    sd["bn.num_batches_tracked"] = torch.tensor(3, dtype=torch.int64)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(sd, str(path))
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (422, "invalid-dtype")
    assert "bn.num_batches_tracked" in err.detail

    loaded = read_state_dict(path, max_bytes=BIG, allowed_dtypes=("F32", "I64"))
    assert loaded["bn.num_batches_tracked"].item() == 3


def test_weights_over_the_limit_are_413(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(_state_dict(), str(path))
    err = _problem(read_state_dict, path, max_bytes=16, pointer="/checkpoint")
    assert (err.status, err.code) == (413, "too-large")
    assert err.errors[0].pointer == "/checkpoint"


def test_empty_safetensors_has_no_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors_bytes({}, b""))
    err = _problem(read_state_dict, path, max_bytes=BIG)
    assert (err.status, err.code) == (422, "missing-array")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(3 * 700_001, dtype=np.float32).reshape(3, 700_001),  # several 1 MiB chunks
        np.linspace(-1, 1, 11),  # float64
        np.zeros((0, 4), dtype=np.float32),
    ],
    ids=["float32-chunked", "float64", "empty"],
)
def test_streamed_safetensors_download_reads_back_with_safetensors(tmp_path, array):
    """The score download (?format=safetensors) streams a file safetensors reads back (array, dtype,
    metadata; the same length as safetensors.numpy.save's), in pieces of at most 1 MiB after the header."""
    from safetensors import safe_open
    from safetensors.numpy import save

    path = tmp_path / "scores.npy"
    np.save(path, array)
    metadata = {"orientation": "query-major", "sign_convention": "positive = proponent"}
    size, chunks = safetensors_stream(path, "scores", metadata)
    pieces = list(chunks)
    assert all(len(piece) <= MB for piece in pieces[1:])
    streamed = tmp_path / "scores.safetensors"
    streamed.write_bytes(b"".join(pieces))
    assert size == streamed.stat().st_size == len(save({"scores": array}, metadata=metadata))
    with safe_open(streamed, framework="numpy") as opened:
        assert opened.metadata() == metadata and list(opened.keys()) == ["scores"]
        back = opened.get_tensor("scores")
    assert back.dtype == array.dtype and back.shape == array.shape and np.array_equal(back, array)


def test_a_stored_datasets_ids_are_read_without_its_features(tmp_path, monkeypatch):
    """GET /values pages need the training ids: reading them must not decompress X (up to the upload cap)."""
    from app.storage.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path)
    stored = store.put_npz(X=np.ones((1000, 64), np.float32), y=np.zeros(1000, np.int64), ids=np.arange(1000))
    read: list[str] = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(
        np.lib.npyio.NpzFile, "__getitem__", lambda self, key: read.append(key) or real(self, key)
    )
    only = store.load_npz(stored.uri, keys=("ids",))
    assert list(only) == ["ids"] and read == ["ids"]
    np.testing.assert_array_equal(only["ids"], np.arange(1000))
    assert sorted(store.load_npz(stored.uri)) == ["X", "ids", "y"]


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "parquet"])
def test_the_limit_applies_to_the_stored_float32_form(tmp_path, fmt):
    """int8 features upload at a quarter of their stored size: a file under the limit whose float32
    form is over it is a 413 (before the conversion and the stored copy take several times the limit)."""
    x = np.ones((1000, 100), np.int8)  # 100 kB uploaded, 400 kB stored
    y = np.zeros(1000, np.int8)
    path = tmp_path / f"d.{fmt}"
    if fmt == "npz":
        np.savez(path, X=x, y=y)
    elif fmt == "safetensors":
        safetensors.numpy.save_file({"X": x, "y": y}, str(path))
    else:
        columns = {f"f{i}": pa.array(x[:, i]) for i in range(x.shape[1])}
        pq.write_table(pa.table({**columns, "label": pa.array(y)}), path)
    assert path.stat().st_size < 200_000
    with pytest.raises(ProblemError) as excinfo:
        read_dataset(path, fmt, max_bytes=200_000)
    assert excinfo.value.status == 413 and "float32" in excinfo.value.detail
    assert read_dataset(path, fmt, max_bytes=500_000).x.dtype == np.float32  # stored form within it
