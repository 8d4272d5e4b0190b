"""Content-addressed artifact store on a local (or shared, mounted) directory.

The database keeps only ``artifact://sha256/<aa>/<hash><suffix>`` URIs. Writing
the same bytes twice yields the same URI, so a job that runs twice cannot leave
two copies, and a crashed writer leaves at most a file under ``tmp/``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors.torch import save_file

from app.problems import ProblemError

URI_SCHEME = "artifact://"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredArtifact:
    uri: str
    sha256: str
    size_bytes: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _disk_full_as_problem() -> Iterator[None]:
    """ENOSPC/EDQUOT become a 507 ``disk-full`` problem: the API's answer and a job's error alike."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ProblemError(
                507,
                "disk-full",
                "Insufficient storage",
                "the artifact store has no space left; nothing was kept, retry once space is freed",
            ) from exc
        raise


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def staging_file(self, suffix: str = "") -> Iterator[Path]:
        """A temporary path on the store's filesystem, removed unless committed.

        A full disk anywhere inside the block (writing, fsync, commit) leaves as ``disk-full``.
        """
        with _disk_full_as_problem():
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=suffix)
            os.close(fd)
            path = Path(name)
            try:
                yield path
            finally:
                path.unlink(missing_ok=True)

    def commit(self, staged: Path, suffix: str, sha256: str | None = None) -> StoredArtifact:
        """Move a staged file to its content address (idempotent)."""
        digest = sha256 or sha256_file(staged)
        relative = f"sha256/{digest[:2]}/{digest}{suffix}"
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True)
        size = staged.stat().st_size
        if final.exists():
            staged.unlink(missing_ok=True)
        else:
            os.replace(staged, final)
        return StoredArtifact(URI_SCHEME + relative, digest, size)

    def put_stream(self, stream: BinaryIO, suffix: str) -> StoredArtifact:
        with self.staging_file(suffix) as staged:
            digest = hashlib.sha256()
            with open(staged, "wb") as out:
                for block in iter(lambda: stream.read(CHUNK), b""):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            return self.commit(staged, suffix, digest.hexdigest())

    def put_bytes(self, data: bytes, suffix: str) -> StoredArtifact:
        return self.put_stream(io.BytesIO(data), suffix)

    def put_npz(self, **arrays: np.ndarray) -> StoredArtifact:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return self.put_bytes(buffer.getvalue(), ".npz")

    def put_npy(self, array: np.ndarray) -> StoredArtifact:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return self.put_bytes(buffer.getvalue(), ".npy")

    def put_state_dict(self, state: dict[str, torch.Tensor]) -> StoredArtifact:
        with self.staging_file(".safetensors") as staged:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(staged))
            return self.commit(staged, ".safetensors")

    def path(self, uri: str) -> Path:
        if not uri.startswith(URI_SCHEME):
            raise ValueError(f"not an artifact URI: {uri!r}")
        relative = uri[len(URI_SCHEME) :]
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"artifact URI escapes the store: {uri!r}")
        return path

    def load_npz(self, uri: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Our own artifacts only (written by put_npz); still never unpickles. ``keys``: only those
        members are read (a dataset's ids without its features)."""
        with np.load(self.path(uri), allow_pickle=False) as data:
            return {key: data[key] for key in data.files if keys is None or key in keys}
