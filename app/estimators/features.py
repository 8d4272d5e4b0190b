"""Row-chunked feature matrices and streamed tensor files, so train-side state never needs n x k of RAM.

Projected-gradient estimators (TRAK, LoGra, TracIn-RP) keep an ``n x k`` matrix of training
features. Three pieces keep their memory bounded by :attr:`Runtime.memory_budget_bytes`:

* :class:`FeatureWriter` fills the matrix chunk by chunk. It holds it in memory when it fits its
  share of the budget (:data:`IN_MEMORY_SHARE`), else in a ``numpy.lib.format.open_memmap`` file in
  :attr:`Runtime.scratch_dir` (the system temporary folder when unset). The file is unlinked as soon
  as it is mapped, so nothing is left behind; the OS pages it in and out, and the result is a
  zero-copy ``torch.from_numpy`` view of the mapping.
* :func:`row_chunks` iterates over row blocks of any feature matrix (in memory, memory-mapped or on a
  device), converting one block at a time (e.g. to float64), never the whole matrix;
  :func:`gram_columns` and :func:`gram_rows` accumulate ``Phi^T Phi`` (its lower triangle) and
  ``Phi Phi^T`` that way.
* :func:`save_tensors` writes a safetensors file (8-byte little-endian header length, a JSON header
  with each tensor's dtype, shape and ``data_offsets`` plus ``__metadata__``, then the raw
  little-endian bytes) streamed from the tensors one row block at a time, and :func:`load_tensors`
  maps a safetensors file back (copy-on-write ``numpy.memmap`` views: writing to one changes only
  this process's copy of the touched pages, never the file).

Pure torch/numpy, like the rest of the estimator library: no safetensors import is needed for the
format, and files are readable by ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .base import Runtime

IN_MEMORY_SHARE = 0.5
"""Feature matrices stay in RAM while all of a fit's matrices together take at most this share of
the memory budget (the rest is for gradient chunks, kernels and scores); beyond it they are mapped."""

DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024
"""Largest row block :func:`row_chunks` converts at once, and the most of :func:`save_tensors`'s
buffers; a budget lowers it to 1/8 of the budget."""

_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    # safetensors name: (torch dtype, numpy dtype of the raw little-endian bytes)
    "F64": (torch.float64, "<f8"),
    "F32": (torch.float32, "<f4"),
    "F16": (torch.float16, "<f2"),
    "BF16": (torch.bfloat16, "<i2"),  # numpy has no bfloat16: mapped as int16, viewed by torch
    "I64": (torch.int64, "<i8"),
    "I32": (torch.int32, "<i4"),
    "I16": (torch.int16, "<i2"),
    "I8": (torch.int8, "i1"),
    "U8": (torch.uint8, "u1"),
    "BOOL": (torch.bool, "u1"),
}
_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}
_HEADER_MAX = 100 * 1024 * 1024  # the safetensors library's own limit


def block_bytes(budget: int | None) -> int:
    """Bytes of one converted row block: :data:`DEFAULT_BLOCK_BYTES`, at most 1/8 of ``budget``."""
    if budget is None:
        return DEFAULT_BLOCK_BYTES
    return max(1, min(DEFAULT_BLOCK_BYTES, int(budget) // 8))


def block_rows(width: int, budget: int | None = None, itemsize: int = 8) -> int:
    """Rows of a ``width``-column block of ``itemsize``-byte values that fit :func:`block_bytes`."""
    return max(1, block_bytes(budget) // max(1, int(width) * int(itemsize)))


class FeatureWriter:
    """An ``n x k`` matrix filled in row order, in memory or memory-mapped (see the module docstring).

    ``matrices``: how many such matrices the caller keeps at once (e.g. one per checkpoint); they
    stay in memory only while together they fit ``IN_MEMORY_SHARE`` of ``budget``. ``budget=None``
    means no limit (always in memory).
    """

    def __init__(
        self,
        n: int,
        k: int,
        dtype: torch.dtype = torch.float32,
        *,
        budget: int | None = None,
        scratch_dir: Path | str | None = None,
        matrices: int = 1,
    ) -> None:
        self.n, self.k, self.dtype = int(n), int(k), dtype
        nbytes = self.n * self.k * torch.empty(0, dtype=dtype).element_size()
        self.memory_mapped = (
            budget is not None and nbytes > 0 and nbytes * max(1, matrices) > IN_MEMORY_SHARE * budget
        )
        if self.memory_mapped:
            self._matrix = _mapped_matrix(self.n, self.k, dtype, scratch_dir)
        else:
            self._matrix = torch.empty(self.n, self.k, dtype=dtype)
        self.filled = 0

    @classmethod
    def for_runtime(cls, runtime: Runtime, n: int, k: int, *, matrices: int = 1) -> FeatureWriter:
        """A writer of ``runtime.dtype`` rows, within ``runtime``'s memory budget and scratch folder."""
        return cls(
            n,
            k,
            runtime.dtype,
            budget=runtime.memory_budget_bytes,
            scratch_dir=runtime.scratch_dir,
            matrices=matrices,
        )

    def write(self, rows: torch.Tensor) -> None:
        """Append ``rows`` (``b x k``, any device, this writer's dtype) after the rows written so far."""
        b = int(rows.shape[0])
        if rows.dim() != 2 or rows.shape[1] != self.k or self.filled + b > self.n:
            raise ValueError(
                f"cannot write a {tuple(rows.shape)} block at row {self.filled} of {self.n} x {self.k}"
            )
        if rows.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype} rows, got {rows.dtype}")
        self._matrix[self.filled : self.filled + b].copy_(rows.detach())
        self.filled += b

    def next_rows(self, b: int) -> torch.Tensor:
        """A view of the next ``b`` rows, counted as written, for the caller to fill in place: saves
        :meth:`write`'s copy when the rows can be computed straight into the matrix."""
        if b < 0 or self.filled + b > self.n:
            raise ValueError(f"cannot take {b} rows at row {self.filled} of {self.n} x {self.k}")
        rows = self._matrix[self.filled : self.filled + b]
        self.filled += b
        return rows

    def finish(self) -> torch.Tensor:
        """The filled matrix (a CPU tensor; a view of the mapping when memory-mapped)."""
        if self.filled != self.n:
            raise ValueError(f"only {self.filled} of {self.n} feature rows were written")
        return self._matrix


def _mapped_matrix(n: int, k: int, dtype: torch.dtype, scratch_dir: Path | str | None) -> torch.Tensor:
    folder = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="features-", suffix=".npy", dir=folder)
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(name, mode="w+", dtype=_numpy_dtype(dtype), shape=(n, k))
    finally:
        os.unlink(name)  # the mapping keeps the data until the tensor is freed; no file is left behind
    return torch.from_numpy(array).view(dtype)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    return np.dtype(_DTYPES[name][1])


def row_chunks(
    matrix: torch.Tensor,
    lo: int = 0,
    hi: int | None = None,
    *,
    rows: int | None = None,
    budget: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, matrix[start:stop])`` for rows ``lo..hi-1``, each block moved to ``device``
    and converted to ``dtype`` on its own (``start``/``stop`` are row indices of ``matrix``).

    ``rows`` per block defaults to :func:`block_rows` of the matrix width in ``dtype`` under
    ``budget``. A block already on ``device`` in ``dtype`` is a view, not a copy.
    """
    hi = int(matrix.shape[0]) if hi is None else int(hi)
    width = int(math.prod(matrix.shape[1:]))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    step = int(rows) if rows is not None else block_rows(width, budget, itemsize)
    dev = matrix.device if device is None else torch.device(device)
    for start in range(int(lo), hi, max(1, step)):
        stop = min(start + step, hi)
        yield start, stop, matrix[start:stop].to(dev, dtype)


GRAM_BLOCK = 128
"""Columns per block of the lower-triangular Gram updates (:func:`add_lower_gram`)."""


def add_lower_gram(C: torch.Tensor, X: torch.Tensor, alpha: float = 1.0, block: int = GRAM_BLOCK) -> None:
    """``C += alpha X^T X`` on the lower triangle of ``C`` only, a block of ``block`` rows at a time.

    A Gram is symmetric and its factorisations read the lower triangle, so the products above the
    diagonal blocks (almost half of a full update) are skipped. Blocks above the diagonal blocks are
    left alone; the strict upper triangles of the diagonal blocks are updated but not meaningful.
    """
    k = C.shape[0]
    for s in range(0, k, block):
        e = min(s + block, k)
        C[s:e, :e].addmm_(X[:, s:e].T, X[:, :e], alpha=alpha)


def gram_columns(
    matrix: torch.Tensor, *, budget: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """The lower triangle of ``Phi^T Phi`` (``k x k``, float64; see :func:`add_lower_gram`), accumulated
    over row blocks."""
    dev = matrix.device if device is None else torch.device(device)
    k = int(matrix.shape[1])
    gram = torch.zeros(k, k, dtype=torch.float64, device=dev)
    for _, _, block in row_chunks(matrix, budget=budget, device=dev):
        add_lower_gram(gram, block)
    return gram


def gram_rows(
    matrix: torch.Tensor, *, budget: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """``Phi Phi^T`` (``n x n``, float64) block by block: two row blocks converted at a time."""
    dev = matrix.device if device is None else torch.device(device)
    n = int(matrix.shape[0])
    gram = torch.empty(n, n, dtype=torch.float64, device=dev)
    for s, e, left in row_chunks(matrix, budget=budget, device=dev):
        for s2, e2, right in row_chunks(matrix, budget=budget, device=dev):
            gram[s:e, s2:e2] = left @ right.T
    return gram


# --- safetensors, streamed ------------------------------------------------------------------------


def save_tensors(
    path: Path | str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    budget: int | None = None,
) -> int:
    """Write ``tensors`` as a safetensors file, one row block at a time; returns the file size.

    Tensors are laid out by decreasing element size, then name (as the safetensors library does),
    so every tensor starts at a multiple of its element size and can be memory-mapped in place; the
    header is padded with spaces to 8 bytes. No block larger than :func:`block_bytes` of ``budget``
    is copied (memory-mapped tensors are read from their mapping).
    """
    entries = []
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError("tensor names must be strings")
        if tensor.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {tensor.dtype}")
        entries.append((name, tensor.detach()))
    entries.sort(key=lambda item: (-item[1].element_size(), item[0]))
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata maps strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    limit = block_bytes(budget)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for _, tensor in entries:
            _write_tensor(fh, tensor, limit)
        fh.flush()
        os.fsync(fh.fileno())
        size = fh.tell()
    if size != 8 + len(raw) + offset:
        raise OSError(f"wrote {size} bytes to {path}, expected {8 + len(raw) + offset}")
    return size


def _write_tensor(fh, tensor: torch.Tensor, limit: int) -> None:
    if tensor.numel() == 0:
        return
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    row_bytes = max(1, int(math.prod(tensor.shape[1:])) * tensor.element_size())
    step = max(1, limit // row_bytes)
    for start in range(0, int(tensor.shape[0]), step):
        block = tensor[start : start + step].contiguous().cpu()  # a view when already contiguous on CPU
        fh.write(memoryview(block.reshape(-1).view(torch.uint8).numpy()))


def read_header(path: Path | str) -> tuple[dict[str, dict], dict[str, str], int]:
    """A safetensors file's tensor entries, its ``__metadata__`` and the offset of its data."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_MAX, size - 8):
            raise ValueError(f"{path}: the safetensors header length {length} is invalid")
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype][1]).itemsize
        if not 0 <= begin <= end or end - begin != nbytes or start + end > size:
            raise ValueError(f"{path}: tensor {name!r} has inconsistent data_offsets")
    return header, dict(metadata), start


def load_tensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map a safetensors file's tensors and return them with the file's ``__metadata__``.

    The file is mapped once, copy-on-write (``numpy.memmap`` mode ``"c"``: one mapping and one file
    descriptor however many tensors it holds); each tensor is a zero-copy ``torch`` view into it.
    Nothing is read until a tensor is used, and the pages are shared with the page cache. Writes to
    a tensor change this process's private copy of the touched pages, never the file. A tensor whose
    offset is not a multiple of its element size (written neither by :func:`save_tensors` nor by the
    safetensors library) is read into memory instead.
    """
    header, metadata, start = read_header(path)
    tensors: dict[str, torch.Tensor] = {}
    mapped = None
    for name, entry in header.items():
        torch_dtype, raw = _DTYPES[entry["dtype"]]
        np_dtype = np.dtype(raw)
        shape = tuple(int(d) for d in entry["shape"])
        count = math.prod(shape)
        begin, end = (start + int(o) for o in entry["data_offsets"])
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
            continue
        if begin % np_dtype.itemsize == 0:
            if mapped is None:
                mapped = np.memmap(path, dtype=np.uint8, mode="c")
            array = mapped[begin:end].view(np_dtype)
        else:
            with open(path, "rb") as fh:
                fh.seek(begin)
                array = np.fromfile(fh, dtype=np_dtype, count=count)
        tensor = torch.from_numpy(array)
        if torch_dtype in (torch.bfloat16, torch.bool):
            tensor = tensor.view(torch_dtype)
        tensors[name] = tensor.reshape(shape)
    return tensors, metadata


__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "IN_MEMORY_SHARE",
    "FeatureWriter",
    "block_bytes",
    "block_rows",
    "add_lower_gram",
    "gram_columns",
    "gram_rows",
    "load_tensors",
    "read_header",
    "row_chunks",
    "save_tensors",
]
