"""Safe readers for user-uploaded datasets and model weights.

User bytes are never unpickled, never handed to ``torch.load``/``torch.jit.load``/
``torch.export.load`` and never executed. Every reader checks sizes, dtypes and
structure from the file's own headers *before* it allocates or decompresses
anything, and refuses the rest with a :class:`~app.problems.ProblemError`.

Datasets: ``.npz`` (members ``X.npy``, ``y.npy``, optional ``ids.npy``),
``.safetensors`` (tensors ``X``, ``y``, optional ``ids``) and Parquet (numeric
columns only). Weights: ``.safetensors`` only.

Error codes raised here (status, code):

- 413 ``too-large``: the file, or the sizes it declares, exceed ``max_bytes``.
- 415 ``unsupported-format``: not a format we read.
- 415 ``pickle-refused``: a pickle, a ``torch.save`` checkpoint, or a NumPy
  object array (which NumPy stores as a pickle).
- 415 ``executable-archive-refused``: TorchScript, ``torch.export`` ``.pt2``
  (and AOTInductor packages), or another zip archive given as weights.
- 422 ``corrupt-file``: the structure is inconsistent (truncated, lying
  headers, overlapping offsets, bad CRC, ...).
- 422 ``compression-bomb``: a zip member expands more than allowed.
- 422 ``invalid-dtype``: a dtype/column type outside the numeric allow-list.
- 422 ``missing-array`` / ``missing-column``: a required array/column is absent.
- 422 ``unexpected-array``: an array/member we do not know (or too many members).
- 422 ``shape-mismatch``: bad ranks, lengths that differ, no features.
- 422 ``empty-dataset``: zero examples.
- 422 ``non-finite-values``: NaN/inf in features, float labels or weights.
- 422 ``null-values``: Parquet nulls.
- 422 ``duplicate-ids``: example ids are not unique.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

from app.problems import FieldError, ProblemError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArrayDataset",
    "DatasetFormat",
    "SniffedFormat",
    "read_dataset",
    "read_state_dict",
    "sniff_format",
]

DatasetFormat = Literal["npz", "safetensors", "parquet"]
SniffedFormat = Literal["safetensors", "pickle", "zip-archive", "torchscript", "pt2", "unknown"]

# --- limits -----------------------------------------------------------------

#: Largest safetensors JSON header we parse (the library's own cap is 100 MB).
SAFETENSORS_MAX_HEADER = 16 * 1024 * 1024
#: Largest .npz member count (only X.npy, y.npy, ids.npy are allowed).
NPZ_MAX_MEMBERS = 3
#: Largest zip central directory we let :mod:`zipfile` parse, for datasets / for sniffing.
NPZ_MAX_CENTRAL_DIRECTORY = 64 * 1024
SNIFF_MAX_CENTRAL_DIRECTORY = 4 * 1024 * 1024
#: Largest uncompressed/compressed ratio for a zip member ...
MAX_COMPRESSION_RATIO = 200
#: ... applied to members that declare more than this many bytes (small
#: members such as a label vector of zeros legitimately compress very well).
COMPRESSION_RATIO_FLOOR = 1024 * 1024
#: Max .npy header size, NumPy's own default (guards ``literal_eval``).
NPY_MAX_HEADER = 10_000
_CHUNK = 1024 * 1024
_PARQUET_BATCH_ROWS = 65_536

_NPZ_MEMBERS = {"X.npy": "X", "y.npy": "y", "ids.npy": "ids"}
_ST_DATASET_TENSORS = ("X", "y", "ids")

#: Bytes per element of the safetensors dtypes we may accept.
_ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_ST_DATASET_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "F16", "F32", "F64")
_INT64_MAX = np.iinfo(np.int64).max

_CONVERT_HINT = (
    "Convert the weights to .safetensors: load the checkpoint in your own trusted environment and "
    "call safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
)

_TITLES = {
    "too-large": "The file is too large",
    "unsupported-format": "Unsupported file format",
    "pickle-refused": "Pickled data is refused",
    "executable-archive-refused": "Executable model archives are refused",
    "corrupt-file": "The file is corrupt",
    "compression-bomb": "The archive expands too much",
    "invalid-dtype": "Unsupported data type",
    "missing-array": "A required array is missing",
    "missing-column": "A required column is missing",
    "unexpected-array": "Unexpected array in the file",
    "shape-mismatch": "Array shapes do not fit together",
    "empty-dataset": "The dataset is empty",
    "non-finite-values": "The data contains NaN or infinite values",
    "null-values": "The data contains null values",
    "duplicate-ids": "Example ids are not unique",
}


def _problem(status: int, code: str, pointer: str, detail: str) -> ProblemError:
    return ProblemError(
        status=status,
        code=code,
        title=_TITLES.get(code, "The uploaded file is invalid"),
        detail=detail,
        errors=[FieldError(pointer, detail)],
    )


def _corrupt(pointer: str, detail: str) -> ProblemError:
    return _problem(422, "corrupt-file", pointer, detail)


# --- the dataset value --------------------------------------------------------


@dataclass
class ArrayDataset:
    """A validated in-memory dataset.

    ``x`` is float32 of shape ``(n, *feature_shape)`` (at least 2-D), ``y`` is
    1-D of length ``n``: int64 when ``label_kind == "int"``, float32 when
    ``"float"``. ``ids`` is an optional unique int64 vector of length ``n``.
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None
    label_kind: Literal["int", "float"]

    @property
    def n_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


# --- sniffing ---------------------------------------------------------------


def _file_size(path: str | os.PathLike[str], pointer: str) -> int:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _corrupt(pointer, "The uploaded file could not be read.") from exc
    return st.st_size


def _check_size(size: int, max_bytes: int, pointer: str) -> None:
    if size > max_bytes:
        raise _problem(
            413, "too-large", pointer, f"The file is {size} bytes; the limit is {max_bytes} bytes."
        )


def _zip_directory(f: BinaryIO, size: int) -> tuple[int, int] | None:
    """Entry count and central-directory size from the end records, or None if not a zip.

    Read by hand so that a hostile central directory with millions of entries is
    refused before :mod:`zipfile` builds a ``ZipInfo`` for each of them.
    """
    tail_len = min(size, 22 + 0xFFFF)
    if tail_len < 22:
        return None
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or tail_len - i < 22:
        return None
    _, _, _, _, n_total, cd_size, _, _ = struct.unpack("<4s4H2LH", tail[i : i + 22])
    eocd_at = size - tail_len + i
    if eocd_at >= 20:  # a zip64 locator sits right before the classic record
        f.seek(eocd_at - 20)
        sig, _, z64_at, _ = struct.unpack("<4sLQL", f.read(20))
        if sig == b"PK\x06\x07":
            if z64_at + 56 > size:
                return None
            f.seek(z64_at)
            rec = f.read(56)
            fields = struct.unpack("<4sQ2H2L4Q", rec)
            if fields[0] != b"PK\x06\x06":
                return None
            n_total, cd_size = fields[7], fields[8]
    return n_total, cd_size


def _classify_zip_names(names: list[str]) -> SniffedFormat:
    has_pickle = False
    for name in names:
        parts = name.split("/")
        leaf = parts[-1]
        inner = parts[1:-1]
        if (
            leaf in ("archive_format", "archive_version")
            or "serialized_exported_program" in name
            or "aotinductor" in parts
            or (len(parts) > 2 and parts[1] == "models" and leaf.endswith(".json"))
            or (len(parts) > 3 and parts[1:3] == ["data", "sample_inputs"])
        ):
            return "pt2"
        if leaf == "constants.pkl" or (inner and inner[0] == "code"):
            return "torchscript"
        if leaf.endswith(".pkl"):
            has_pickle = True
    return "pickle" if has_pickle else "zip-archive"


def sniff_format(path: str | os.PathLike[str]) -> SniffedFormat:
    """Guess a weights/checkpoint file's format from magic bytes and zip member names.

    Never deserialises anything. ``"pickle"`` covers raw pickles (including legacy
    ``torch.save``) and ``torch.save`` zip checkpoints (a ``*/data.pkl`` member);
    ``"torchscript"`` is a ``torch.jit.save`` archive (``*/constants.pkl``,
    ``*/code/``); ``"pt2"`` is a ``torch.export.save``/AOTInductor archive
    (``*/archive_format``, ``*/models/*.json``, ``*/data/sample_inputs/``);
    ``"zip-archive"`` is any other zip.
    """
    return _sniff(path, SNIFF_MAX_CENTRAL_DIRECTORY)


def _sniff(path: str | os.PathLike[str], max_central_directory: int) -> SniffedFormat:
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) >= 10 and head[8:9] == b"{":
            (header_len,) = struct.unpack("<Q", head[:8])
            if 2 <= header_len <= 100 * 1024 * 1024:
                return "safetensors"
        directory = _zip_directory(f, size) if size >= 22 else None
        if head[:2] == b"PK" or directory is not None:
            if directory is None or directory[1] > max_central_directory:
                return "zip-archive"
            try:
                f.seek(0)
                with zipfile.ZipFile(f) as zf:
                    names = zf.namelist()
            except (zipfile.BadZipFile, OSError, ValueError, EOFError):
                return "zip-archive"
            return _classify_zip_names(names)
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            return "pickle"
        if head[:1] in (b"(", b"]", b"}", b"c") and size > 1:
            f.seek(size - 1)
            if f.read(1) == b".":  # protocol 0/1 pickles end with STOP
                return "pickle"
    return "unknown"


def _refuse_code_formats(kind: SniffedFormat, pointer: str, hint: str = "") -> None:
    """Refuse formats that can run code on load (before anything is deserialised)."""
    suffix = f" {hint}" if hint else ""
    if kind == "pickle":
        raise _problem(
            415,
            "pickle-refused",
            pointer,
            "The file is a Python pickle (or a torch.save checkpoint); pickles can run code when "
            "loaded and are never opened." + suffix,
        )
    if kind in ("torchscript", "pt2"):
        what = "a TorchScript archive" if kind == "torchscript" else "a torch.export .pt2 archive"
        raise _problem(
            415,
            "executable-archive-refused",
            pointer,
            f"The file is {what}; such archives can run code when loaded and are never opened." + suffix,
        )


# --- safetensors --------------------------------------------------------------


@dataclass
class _TensorSpec:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_safetensors(
    path: str | os.PathLike[str], size: int, pointer: str, allowed_dtypes: tuple[str, ...]
) -> dict[str, _TensorSpec]:
    """Validate a safetensors file's header against its size without loading data."""
    if size < 8:
        raise _corrupt(pointer, "The safetensors file is truncated (shorter than its 8-byte header).")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > SAFETENSORS_MAX_HEADER:
            raise _corrupt(
                pointer,
                f"The safetensors header declares {header_len} bytes; at most "
                f"{SAFETENSORS_MAX_HEADER} are allowed.",
            )
        if header_len > size - 8:
            raise _corrupt(pointer, "The safetensors file is truncated (its header runs past the end).")
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise _corrupt(pointer, "The safetensors file is truncated.")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _corrupt(pointer, f"The safetensors header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise _corrupt(pointer, "The safetensors header is not a JSON object.")

    specs: dict[str, _TensorSpec] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _corrupt(pointer, "The safetensors __metadata__ must map strings to strings.")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _corrupt(pointer, f"Tensor {name!r} has a malformed header entry.")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise _corrupt(pointer, f"Tensor {name!r} has a malformed dtype.")
        if dtype not in allowed_dtypes:
            raise _problem(
                422,
                "invalid-dtype",
                pointer,
                f"Tensor {name!r} has dtype {dtype}; allowed dtypes are {', '.join(allowed_dtypes)}.",
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _corrupt(pointer, f"Tensor {name!r} has a malformed shape.")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(pointer, f"Tensor {name!r} has malformed data_offsets.")
        nbytes = math.prod(shape) * _ST_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _corrupt(
                pointer,
                f"Tensor {name!r} declares shape {shape} ({nbytes} bytes) but its data_offsets "
                f"span {offsets[1] - offsets[0]} bytes.",
            )
        specs[name] = _TensorSpec(dtype, tuple(shape), offsets[0], offsets[1])

    data_len = size - 8 - header_len
    cursor = 0
    for name, spec in sorted(specs.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if spec.begin != cursor:
            problem = "overlaps another tensor" if spec.begin < cursor else "leaves a gap before it"
            raise _corrupt(pointer, f"Tensor {name!r} {problem}; data_offsets must be contiguous.")
        cursor = spec.end
    if cursor != data_len:
        state = "is truncated" if cursor > data_len else "has trailing bytes after the last tensor"
        raise _corrupt(
            pointer,
            f"The safetensors file {state}: tensors need {cursor} data bytes, the file has {data_len}.",
        )
    return specs


# --- weights ----------------------------------------------------------------


def read_state_dict(
    path: str | os.PathLike[str],
    *,
    pointer: str = "/weights",
    max_bytes: int,
    allowed_dtypes: tuple[str, ...] = ("F32", "F16", "BF16", "F64"),
) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict; refuse every other format before deserialising it.

    ``allowed_dtypes`` are safetensors dtype names (e.g. add ``"I64"`` to accept
    BatchNorm's ``num_batches_tracked``). Floating tensors must be finite.
    """
    unknown = [d for d in allowed_dtypes if d not in _ST_ITEMSIZE]
    if unknown:
        raise ValueError(f"unknown safetensors dtypes in allowed_dtypes: {unknown}")
    size = _file_size(path, pointer)
    _check_size(size, max_bytes, pointer)
    kind = sniff_format(path)
    _refuse_code_formats(kind, pointer, _CONVERT_HINT)
    if kind == "zip-archive":
        raise _problem(
            415,
            "executable-archive-refused",
            pointer,
            "The file is a zip archive, not safetensors; archives are never opened as weights. "
            + _CONVERT_HINT,
        )
    if kind != "safetensors":
        raise _problem(
            415, "unsupported-format", pointer, "The weights are not a safetensors file. " + _CONVERT_HINT
        )
    specs = validate_safetensors(path, size, pointer, tuple(allowed_dtypes))
    if not specs:
        raise _problem(422, "missing-array", pointer, "The safetensors file contains no tensors.")

    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except Exception as exc:  # the Rust loader's SafetensorError and friends
        raise _corrupt(pointer, f"The safetensors file could not be loaded ({exc}).") from exc
    if set(tensors) != set(specs):
        raise _corrupt(pointer, "The safetensors file changed while it was being read.")
    f32_max = torch.finfo(torch.float32).max  # models compute in float32: larger values become inf
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~(tensor.abs() <= f32_max)).sum())  # NaN fails the comparison too
            if bad:
                raise _problem(
                    422,
                    "non-finite-values",
                    pointer,
                    f"Tensor {name!r} has {bad} non-finite value(s) (NaN, infinity, or beyond float32).",
                )
    return tensors


# --- datasets: common checks --------------------------------------------------


def _check_numeric_dtype(dtype: np.dtype, what: str, pointer: str) -> None:
    if dtype.hasobject:
        raise _problem(
            415,
            "pickle-refused",
            pointer,
            f"{what} is a NumPy object array, which is stored as a pickle and is never loaded.",
        )
    ok = (dtype.kind in "iu" and dtype.itemsize in (1, 2, 4, 8)) or (
        dtype.kind == "f" and dtype.itemsize in (2, 4, 8)
    )
    if not ok or dtype.names is not None or dtype.subdtype is not None:
        raise _problem(
            422,
            "invalid-dtype",
            pointer,
            f"{what} has dtype {dtype.str!r}; only int8-64, uint8-64 and float16/32/64 are accepted.",
        )


def _to_int64(a: np.ndarray, what: str, pointer: str) -> np.ndarray:
    if a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.size and int(a.max()) > _INT64_MAX:
        raise _problem(422, "invalid-dtype", pointer, f"{what} has values that do not fit in int64.")
    return a.astype(np.int64, copy=False)


def _count_non_finite(a: np.ndarray) -> int:
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def _check_stored_size(n_features: int, n: int, has_ids: bool, max_bytes: int, pointer: str) -> None:
    """A dataset is stored as float32 features and 8-byte labels and ids: int8 features upload at a
    quarter of their stored size, so the limit applies to the stored form too (and bounds the copies
    made while converting and storing it)."""
    stored = 4 * n_features + 8 * n * (2 if has_ids else 1)
    if stored > max_bytes:
        raise _problem(
            413,
            "too-large",
            pointer,
            f"Stored as float32 features and 64-bit labels{' and ids' if has_ids else ''}, the dataset "
            f"takes {stored} bytes; the limit is {max_bytes} bytes.",
        )


def _finish_dataset(
    x: np.ndarray,
    y: np.ndarray,
    ids: np.ndarray | None,
    pointer: str,
    *,
    names: tuple[str, str, str],
    max_bytes: int,
) -> ArrayDataset:
    """Shape, dtype and value checks shared by every dataset format."""
    xn, yn, idn = names
    _check_numeric_dtype(x.dtype, xn, pointer)
    _check_numeric_dtype(y.dtype, yn, pointer)
    if x.ndim == 0:
        raise _problem(
            422, "shape-mismatch", pointer, f"{xn} must have one row per example, not be a scalar."
        )
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if y.ndim != 1:
        raise _problem(422, "shape-mismatch", pointer, f"{yn} must be 1-D; it has shape {list(y.shape)}.")
    n = x.shape[0]
    if n == 0:
        raise _problem(422, "empty-dataset", pointer, "The dataset has no examples.")
    if y.shape[0] != n:
        raise _problem(422, "shape-mismatch", pointer, f"{xn} has {n} rows but {yn} has {y.shape[0]} labels.")
    if 0 in x.shape[1:]:
        raise _problem(422, "shape-mismatch", pointer, f"{xn} has no features (shape {list(x.shape)}).")
    _check_stored_size(x.size, n, ids is not None, max_bytes, pointer)

    with np.errstate(over="ignore", invalid="ignore"):
        x32 = x.astype(np.float32, copy=False)
    bad = _count_non_finite(x32)
    if bad:
        raise _problem(
            422,
            "non-finite-values",
            pointer,
            f"{xn} has {bad} non-finite value(s) (NaN, infinity, or too large for float32).",
        )

    label_kind: Literal["int", "float"]
    if y.dtype.kind in "iu":
        y_out = _to_int64(y, yn, pointer)
        label_kind = "int"
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            y_out = y.astype(np.float32, copy=False)
        bad = _count_non_finite(y_out)
        if bad:
            raise _problem(
                422,
                "non-finite-values",
                pointer,
                f"{yn} has {bad} non-finite value(s) (NaN, infinity, or too large for float32).",
            )
        label_kind = "float"

    ids_out: np.ndarray | None = None
    if ids is not None:
        if ids.dtype.kind not in "iu":
            raise _problem(
                422, "invalid-dtype", pointer, f"{idn} must hold integers; it has dtype {ids.dtype.str!r}."
            )
        _check_numeric_dtype(ids.dtype, idn, pointer)
        if ids.ndim != 1 or ids.shape[0] != n:
            raise _problem(
                422,
                "shape-mismatch",
                pointer,
                f"{idn} must be 1-D with {n} entries; it has shape {list(ids.shape)}.",
            )
        ids_out = _to_int64(ids, idn, pointer)
        n_unique = np.unique(ids_out).shape[0]
        if n_unique != n:
            raise _problem(
                422,
                "duplicate-ids",
                pointer,
                f"{idn} has {n - n_unique} duplicate value(s); ids must be unique.",
            )
    return ArrayDataset(
        x=np.ascontiguousarray(x32), y=np.ascontiguousarray(y_out), ids=ids_out, label_kind=label_kind
    )


# --- datasets: npz ------------------------------------------------------------


class _BombError(Exception):
    pass


class _CountingReader:
    """Wraps a member stream; refuses to yield more than ``limit`` bytes in total.

    :mod:`zipfile` already stops at the declared size, so this is a second,
    independent guard: decompression never produces more than it declared.
    """

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        # Ask for at most one byte past the limit so an overrun is noticed without buffering it.
        size = min(size, self._limit - self.count + 1)
        data = self._raw.read(size)
        self.count += len(data)
        if self.count > self._limit:
            raise _BombError
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _read_npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str, pointer: str) -> np.ndarray:
    declared = info.file_size
    try:
        with zf.open(info) as raw:
            stream = _CountingReader(raw, declared)
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, NPY_MAX_HEADER)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, NPY_MAX_HEADER)
            else:
                raise _corrupt(pointer, f"{what} has unsupported .npy version {version}.")
            _check_numeric_dtype(dtype, what, pointer)
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise _corrupt(pointer, f"{what} declares an invalid shape {shape}.")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != declared - stream.count:
                raise _corrupt(
                    pointer,
                    f"{what} declares shape {tuple(shape)} of {dtype.str} ({nbytes} bytes) but the "
                    f"archive member holds {declared - stream.count} data bytes.",
                )
            buf = bytearray(nbytes)
            view = memoryview(buf)
            got = 0
            while got < nbytes:
                n = stream.readinto(view[got : min(got + _CHUNK, nbytes)])
                if not n:
                    raise _corrupt(pointer, f"{what} is truncated.")
                got += n
            if stream.read(1):
                raise _BombError
    except _BombError as exc:
        raise _problem(
            422,
            "compression-bomb",
            pointer,
            f"{what} expands to more bytes than its zip header declares ({declared}).",
        ) from exc
    except ProblemError:
        raise
    except (
        zipfile.BadZipFile,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        SyntaxError,
        RuntimeError,
    ) as exc:
        raise _corrupt(pointer, f"{what} could not be read ({exc}).") from exc
    arr = np.frombuffer(buf, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def _read_npz(path: str | os.PathLike[str], size: int, pointer: str, max_bytes: int) -> ArrayDataset:
    with open(path, "rb") as f:
        directory = _zip_directory(f, size)
        if directory is None:
            raise _corrupt(pointer, "The .npz file is not a valid zip archive.")
        n_entries, cd_size = directory
        if n_entries > NPZ_MAX_MEMBERS or cd_size > NPZ_MAX_CENTRAL_DIRECTORY:
            raise _problem(
                422,
                "unexpected-array",
                pointer,
                f"The .npz archive has {n_entries} members; only X.npy, y.npy and ids.npy are allowed.",
            )
        try:
            f.seek(0)
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise _corrupt(pointer, f"The .npz file is not a valid zip archive ({exc}).") from exc
        with zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(infos) > NPZ_MAX_MEMBERS or len(set(names)) != len(names):
                raise _corrupt(pointer, "The .npz archive has too many or duplicate members.")
            unexpected = sorted(set(names) - set(_NPZ_MEMBERS))
            if unexpected:
                raise _problem(
                    422,
                    "unexpected-array",
                    pointer,
                    f"Unexpected array(s) {unexpected} in the .npz; allowed are X.npy, y.npy and ids.npy.",
                )
            for required in ("X.npy", "y.npy"):
                if required not in names:
                    raise _problem(
                        422,
                        "missing-array",
                        pointer,
                        f"The .npz has no {required[:-4]!r} array (np.savez(path, X=..., y=...)).",
                    )
            total = 0
            for info in infos:
                if info.flag_bits & 0x1:
                    raise _problem(
                        415, "unsupported-format", pointer, "Encrypted .npz members are not supported."
                    )
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise _problem(
                        415,
                        "unsupported-format",
                        pointer,
                        f"{info.filename} uses an unsupported zip compression; use np.savez or "
                        "np.savez_compressed.",
                    )
                ratio = info.file_size / max(info.compress_size, 1)
                if info.file_size > COMPRESSION_RATIO_FLOOR and ratio > MAX_COMPRESSION_RATIO:
                    raise _problem(
                        422,
                        "compression-bomb",
                        pointer,
                        f"{info.filename} declares {info.file_size} bytes from {info.compress_size} "
                        f"compressed bytes (ratio {ratio:.0f}:1, limit {MAX_COMPRESSION_RATIO}:1).",
                    )
                total += info.file_size
                if info.file_size > max_bytes or total > max_bytes:
                    raise _problem(
                        413,
                        "too-large",
                        pointer,
                        f"The .npz arrays expand to more than the {max_bytes}-byte limit.",
                    )
            arrays = {
                _NPZ_MEMBERS[info.filename]: _read_npy_member(zf, info, info.filename, pointer)
                for info in infos
            }
    return _finish_dataset(
        arrays["X"],
        arrays["y"],
        arrays.get("ids"),
        pointer,
        names=("X.npy", "y.npy", "ids.npy"),
        max_bytes=max_bytes,
    )


# --- datasets: safetensors ------------------------------------------------------


def _read_safetensors_dataset(
    path: str | os.PathLike[str], size: int, pointer: str, max_bytes: int
) -> ArrayDataset:
    specs = validate_safetensors(path, size, pointer, _ST_DATASET_DTYPES)
    unexpected = sorted(set(specs) - set(_ST_DATASET_TENSORS))
    if unexpected:
        raise _problem(
            422,
            "unexpected-array",
            pointer,
            f"Unexpected tensor(s) {unexpected}; allowed are 'X', 'y' and 'ids'.",
        )
    for required in ("X", "y"):
        if required not in specs:
            raise _problem(422, "missing-array", pointer, f"The safetensors file has no {required!r} tensor.")
    from safetensors.numpy import load_file

    try:
        arrays = load_file(os.fspath(path))
    except Exception as exc:  # SafetensorError from the Rust loader
        raise _corrupt(pointer, f"The safetensors file could not be loaded ({exc}).") from exc
    if set(arrays) != set(specs):
        raise _corrupt(pointer, "The safetensors file changed while it was being read.")
    return _finish_dataset(
        arrays["X"], arrays["y"], arrays.get("ids"), pointer, names=("X", "y", "ids"), max_bytes=max_bytes
    )


# --- datasets: parquet ----------------------------------------------------------


def _read_parquet(
    path: str | os.PathLike[str],
    pointer: str,
    max_bytes: int,
    label_column: str,
    id_column: str | None,
) -> ArrayDataset:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _corrupt(pointer, f"The Parquet file could not be read ({exc}).") from exc
    with pf:
        try:
            schema = pf.schema_arrow
            meta = pf.metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _corrupt(pointer, f"The Parquet file could not be read ({exc}).") from exc

        # Schema first: plain integer/float columns only.
        names = list(schema.names)
        if len(set(names)) != len(names):
            raise _corrupt(pointer, "The Parquet file has duplicate column names.")
        for field in schema:
            t = field.type
            ext_meta = bool(field.metadata) and any(k.startswith(b"ARROW:extension") for k in field.metadata)
            if isinstance(t, pa.BaseExtensionType) or ext_meta:
                raise _problem(
                    422,
                    "invalid-dtype",
                    pointer,
                    f"Column {field.name!r} has an extension type; only plain numeric columns are accepted.",
                )
            if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise _problem(
                    422,
                    "invalid-dtype",
                    pointer,
                    f"Column {field.name!r} has type {t}; only integer and floating-point columns "
                    "are accepted.",
                )
        if label_column not in names:
            raise _problem(
                422, "missing-column", pointer, f"The Parquet file has no label column {label_column!r}."
            )
        if id_column is not None:
            if id_column not in names:
                raise _problem(
                    422, "missing-column", pointer, f"The Parquet file has no id column {id_column!r}."
                )
            if id_column == label_column:
                raise _problem(
                    422, "shape-mismatch", pointer, "The id column and the label column must differ."
                )
            if not pa.types.is_integer(schema.field(id_column).type):
                raise _problem(
                    422, "invalid-dtype", pointer, f"The id column {id_column!r} must hold integers."
                )
        features = [c for c in names if c not in (label_column, id_column)]
        if not features:
            raise _problem(422, "shape-mismatch", pointer, "The Parquet file has no feature columns.")

        # Then the metadata's sizes, before reading any data page.
        n = meta.num_rows
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        if n < 0 or n != sum(g.num_rows for g in groups):
            raise _corrupt(pointer, "The Parquet row counts are inconsistent.")
        declared = sum(g.total_byte_size for g in groups)
        decoded = n * sum(schema.field(c).type.bit_width // 8 for c in names)
        if declared > max_bytes or decoded > max_bytes:
            raise _problem(
                413,
                "too-large",
                pointer,
                f"The Parquet data expands to {max(declared, decoded)} bytes; the limit is "
                f"{max_bytes} bytes.",
            )
        if n == 0:
            raise _problem(422, "empty-dataset", pointer, "The dataset has no examples.")
        _check_stored_size(n * len(features), n, id_column is not None, max_bytes, pointer)

        label_is_int = pa.types.is_integer(schema.field(label_column).type)
        x = np.empty((n, len(features)), dtype=np.float32)
        y = np.empty(n, dtype=np.int64 if label_is_int else np.float64)
        ids = np.empty(n, dtype=np.int64) if id_column is not None else None

        def values(batch: Any, name: str) -> np.ndarray:
            arr = batch.column(name)
            if arr.null_count:
                raise _problem(
                    422, "null-values", pointer, f"Column {name!r} has {arr.null_count} null value(s)."
                )
            if pa.types.is_uint64(arr.type) and len(arr) and pc.max(arr).as_py() > _INT64_MAX:
                if name != label_column and name != id_column:
                    return arr.to_numpy(zero_copy_only=False)  # features become float32 anyway
                raise _problem(
                    422, "invalid-dtype", pointer, f"Column {name!r} has values that do not fit in int64."
                )
            return arr.to_numpy(zero_copy_only=False)

        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=names):
                m = batch.num_rows
                if row + m > n:
                    raise _corrupt(pointer, "The Parquet file holds more rows than its metadata declares.")
                with np.errstate(over="ignore", invalid="ignore"):
                    for j, name in enumerate(features):
                        x[row : row + m, j] = values(batch, name)
                    y[row : row + m] = values(batch, label_column)
                    if ids is not None and id_column is not None:
                        ids[row : row + m] = values(batch, id_column)
                row += m
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _corrupt(pointer, f"The Parquet file could not be read ({exc}).") from exc
        if row != n:
            raise _corrupt(pointer, "The Parquet file holds fewer rows than its metadata declares.")
    return _finish_dataset(
        x,
        y,
        ids,
        pointer,
        names=("The feature matrix", f"Label column {label_column!r}", f"Id column {id_column!r}"),
        max_bytes=max_bytes,
    )


# --- datasets: entry point --------------------------------------------------------


def read_dataset(
    path: str | os.PathLike[str],
    fmt: DatasetFormat,
    *,
    pointer: str = "/file",
    max_bytes: int,
    label_column: str = "label",
    id_column: str | None = None,
) -> ArrayDataset:
    """Read and validate an uploaded dataset.

    ``max_bytes`` caps the file size and, for npz/Parquet, the declared
    uncompressed size. ``label_column``/``id_column`` apply to Parquet only; npz
    and safetensors use the names X, y and ids.
    """
    if fmt not in ("npz", "safetensors", "parquet"):
        raise _problem(
            415,
            "unsupported-format",
            pointer,
            f"Unsupported dataset format {fmt!r}; use npz, safetensors or parquet.",
        )
    size = _file_size(path, pointer)
    _check_size(size, max_bytes, pointer)
    # Small central-directory budget: a real .npz directory is a few hundred bytes.
    kind = _sniff(path, NPZ_MAX_CENTRAL_DIRECTORY)
    _refuse_code_formats(kind, pointer)
    if fmt == "npz":
        return _read_npz(path, size, pointer, max_bytes)
    if fmt == "safetensors":
        if kind != "safetensors":
            raise _corrupt(pointer, "The file is not a safetensors file.")
        return _read_safetensors_dataset(path, size, pointer, max_bytes)
    return _read_parquet(path, pointer, max_bytes, label_column, id_column)


_ST_DTYPE_OF = {"float16": "F16", "float32": "F32", "float64": "F64", "int32": "I32", "int64": "I64"}


def safetensors_stream(npy_path: str | os.PathLike[str], name: str, metadata: dict[str, str]):
    """One stored ``.npy`` array as a safetensors file, streamed: ``(size, chunks)``.

    The array is memory-mapped and sent in 1 MiB pieces after the header, so a download of a large
    score matrix costs the API process no more than a chunk (safetensors' own ``save`` builds the whole
    file in memory). The layout is safetensors' (u64 little-endian header length, JSON header padded with
    spaces to 8 bytes, row-major little-endian data), readable by every safetensors loader.
    """
    array = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    if not array.flags.c_contiguous or array.dtype.byteorder == ">":
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    header = {
        "__metadata__": metadata,
        name: {
            "dtype": _ST_DTYPE_OF[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [0, array.nbytes],
        },
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded

    def chunks():
        yield prefix
        flat = array.reshape(-1).view(np.uint8) if array.size else np.empty(0, np.uint8)
        for start in range(0, flat.size, _CHUNK):
            yield flat[start : start + _CHUNK].tobytes()

    return len(prefix) + array.nbytes, chunks()
