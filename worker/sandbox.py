"""Run tenant compute in a sandboxed child process: ``python -m worker.sandbox <scratch_dir>``.

The Celery task process is trusted: it holds database and broker credentials. Every torch call on
tenant weights or data happens in a fresh child per job or shard, which gets

* a cleared environment: no ``IA_*`` variables, URLs or secrets; only PATH, HOME (= scratch),
  LANG, thread counts, PYTHONPATH and glibc's malloc tunables (plus CUDA_VISIBLE_DEVICES and
  LD_LIBRARY_PATH when set);
* its own session and process group (a SIGKILL to the group ends it and whatever it started),
  ``PR_SET_PDEATHSIG=SIGKILL`` (it dies with its supervisor), ``PR_SET_NO_NEW_PRIVS``, a nice
  level, and RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC (what its user runs plus an
  allowance, so a runaway child cannot fork the machine full), RLIMIT_CORE=0 and, on CPU-only
  workers, RLIMIT_AS (CUDA reserves huge address ranges, so never with CUDA);
* an empty network namespace (``unshare --net``) where this machine permits one;
* on CPU workers, Landlock (:mod:`worker.landlock`, Linux 5.13+): before it reads any tenant byte
  the child confines itself to reading its own inputs, the Python installation and the system
  libraries, and to writing its scratch folder; so it cannot read other jobs' or tenants'
  artifacts, the data folder or other children's scratch, and opens no TCP connection even where
  network namespaces are refused (containers);
* no capabilities when the worker runs as root (``setpriv`` empties the bounding set before
  the child's exec), so it cannot read another process's memory or environment, mount, or
  change owners.

The supervisor marks itself non-dumpable (:func:`protect_supervisor`): its ``/proc/<pid>/environ``
and memory, which hold the credentials, are then closed to a child of the same user.

Protocol: the supervisor makes a private scratch folder and starts the child in it. It writes
``assignment.json`` (a task ``module:function``, a JSON payload, absolute paths of the input
artifacts, the thread count) and sends ``go`` on the child's stdin. The child writes outputs to
``out/`` (``.npy`` arrays, ``.safetensors`` tensors, ``meta.json``; or ``error.json`` describing
the failure) and progress as JSON lines on its stdout. The supervisor forwards progress to the
job's reporter (heartbeats, ETA and cancellation keep working), SIGKILLs the process group on
cancel, lost lease or wall-clock timeout, maps the exit to a problem, and validates each output
before the caller stores anything. A train state (possibly larger than memory) is never loaded
whole: it is copied out of the scratch folder, validated in blocks (:func:`copy_state_file`) and
stored as that very file. The scratch folder is removed afterwards, also on failure.

A fresh interpreter spends over a second importing torch, so a Celery pool process always holds
one child ahead (:func:`prestart`): started when the pool process starts and again whenever a task
takes it (:func:`acquire`); the child imports, then waits for ``go``. Pool processes are reused
across tasks, so the next task finds that child warm even when it arrives as the last one ends.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from app.estimators import EstimatorError
from app.problems import FieldError, ProblemError
from worker import landlock

if TYPE_CHECKING:  # the child imports this module too, and needs neither
    from app.settings import Settings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # where `app` and `worker` import from
SCRATCH_PREFIX = "ia-sandbox-"
EXIT_DISK_FULL = 75  # the child could not even write error.json
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PROGRESS_LINE_MAX = 4096
META_MAX_BYTES = 1024 * 1024
MEMORY_ERRORS = ("can't allocate memory", "Cannot allocate memory", "bad_alloc")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
STATE_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}
STATE_METADATA = ("info",)
COPY_BLOCK = 1024 * 1024
FINITE_BLOCK = 1 << 20  # values checked at once (8 MiB of float64)
_POINTER = re.compile(r"(/[A-Za-z0-9_.~-]{1,64}){1,8}")
_CODE = re.compile(r"[a-z][a-z0-9-]{0,63}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: after fork the child only calls it


class Reporter(Protocol):
    """What the supervisor needs from the job: progress that may raise, and a cancel/lease check."""

    def __call__(self, phase: str, done: int, total: int) -> None: ...

    def check(self) -> None: ...


# --- problems -----------------------------------------------------------------------------------


def resource_limit(detail: str) -> ProblemError:
    return ProblemError(500, "resource-limit", "The job exceeded a resource limit", detail)


def disk_full() -> ProblemError:
    return ProblemError(
        507,
        "disk-full",
        "The worker ran out of disk space",
        "no space left on the worker; retry the job later",
    )


def timeout(seconds: float) -> ProblemError:
    return ProblemError(
        500,
        "timeout",
        "The job ran out of time",
        f"the computation ran longer than IA_SANDBOX_WALL_SECONDS ({seconds:g} s)",
    )


def invalid_output(detail: str) -> ProblemError:
    return ProblemError(500, "invalid-output", "The computation returned invalid output", detail)


def instability(what: str, parameter: str | None) -> ProblemError:
    """Non-finite output: 422 naming the parameter to change when there is one, else 500."""
    detail = f"the computation produced NaN or infinite {what}"
    if parameter is None:
        return ProblemError(500, "numerical-instability", "The job could not be computed", detail)
    detail += f"; try another value of {parameter}"
    return ProblemError(
        422, "numerical-instability", "The job could not be computed", detail, [FieldError(parameter, detail)]
    )


def _text(value: Any, limit: int = 2000) -> str:
    return value[:limit] if isinstance(value, str) else ""


def child_problem(report: Any, limits: Limits) -> ProblemError:
    """The problem for a child's ``error.json``; every field is checked, nothing is passed through raw."""
    kind = report.get("kind") if isinstance(report, dict) else None
    if kind == "estimator":
        code = report.get("code")
        detail = _text(report.get("detail")) or "the estimator refused the job"
        parameter = report.get("parameter")
        errors = (
            [FieldError(parameter, detail)]
            if isinstance(parameter, str) and _POINTER.fullmatch(parameter)
            else []
        )
        code = code if isinstance(code, str) and _CODE.fullmatch(code) else "estimator-error"
        return ProblemError(422, code, "The job could not be computed", detail, errors)
    if kind == "problem":
        status, code = report.get("status"), report.get("code")
        errors = [
            FieldError(e["pointer"], _text(e.get("detail")))
            for e in report.get("errors") or []
            if isinstance(e, dict) and isinstance(e.get("pointer"), str) and _POINTER.fullmatch(e["pointer"])
        ][:20]
        return ProblemError(
            status if isinstance(status, int) and 400 <= status <= 599 else 500,
            code if isinstance(code, str) and _CODE.fullmatch(code) else "invalid-request",
            _text(report.get("title"), 200) or "The job could not be computed",
            _text(report.get("detail")),
            errors,
        )
    if kind == "memory":
        limit = limits.memory_bytes or "unlimited"
        return resource_limit(
            f"the computation ran out of memory (IA_SANDBOX_MEMORY_BYTES={limit});"
            " use fewer queries, a smaller chunk size or a smaller model"
        )
    if kind == "file-size":
        return resource_limit(f"an output file exceeded IA_SANDBOX_MAX_FILE_BYTES ({limits.file_bytes})")
    if kind == "disk-full":
        return disk_full()
    name = report.get("exception") if isinstance(report, dict) else None
    return ProblemError(
        500,
        "internal-error",
        "The job failed unexpectedly",
        name if isinstance(name, str) and _NAME.fullmatch(name) else "the compute process failed",
    )


# --- output validation --------------------------------------------------------------------------


def _open_regular(path: Path):
    """Open a file the child wrote, refusing links and anything that is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise invalid_output(f"{path.name} is not readable ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise invalid_output(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_npy(path: Path, check: Callable[[tuple[int, ...]], str | None], max_bytes: int, what: str):
    """A float32/float64 ``.npy`` whose shape passes ``check`` and whose size matches its header."""
    with _open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise invalid_output(f"{what}: {size} bytes exceed the limit of {max_bytes}")
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=10_000)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=10_000)
        except (ValueError, OSError) as exc:
            raise invalid_output(f"{what}: not a NumPy array file ({exc})") from None
        if dtype not in FLOAT_DTYPES:
            raise invalid_output(f"{what}: dtype {dtype} is not float32 or float64")
        wrong = check(tuple(shape))
        if wrong:
            raise invalid_output(f"{what}: shape {tuple(shape)}, {wrong}")
        count = int(np.prod(shape, dtype=np.int64))
        if size != fh.tell() + count * dtype.itemsize:
            raise invalid_output(f"{what}: the file size does not match its header")
        return np.fromfile(fh, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def read_array(
    path: Path, shape: tuple[int, ...], *, max_bytes: int, what: str, parameter: str | None = None
) -> np.ndarray:
    """Exactly ``shape``, float32/float64, finite (else numerical-instability naming ``parameter``)."""
    array = _read_npy(path, lambda found: None if found == shape else f"expected {shape}", max_bytes, what)
    if not np.isfinite(array).all():
        raise instability(what, parameter)
    return array


def read_rows(path: Path, rows: int, *, max_bytes: int, what: str) -> np.ndarray:
    """A vector or matrix of ``rows`` rows, float32/float64, finite."""

    def check(found: tuple[int, ...]) -> str | None:
        return None if len(found) in (1, 2) and found[0] == rows else f"expected {rows} rows"

    array = _read_npy(path, check, max_bytes, what)
    if not np.isfinite(array).all():
        raise instability(what, None)
    return array


def read_tensors(
    path: Path,
    *,
    max_bytes: int,
    what: str,
    parameter: str | None = None,
    dtypes: tuple[str, ...] = ("F32", "F64", "F16", "BF16", "I64", "I32"),
) -> tuple[dict, dict[str, str]]:
    """A safetensors file through the same reader as uploads (dtype allow-list, finite); plus its metadata."""
    from safetensors import safe_open

    from app.storage.formats import read_state_dict

    with _open_regular(path):
        pass
    try:
        tensors = read_state_dict(path, pointer=f"/{what}", max_bytes=max_bytes, allowed_dtypes=dtypes)
    except ProblemError as exc:
        if exc.code == "non-finite-values":
            raise instability(what, parameter) from None
        raise invalid_output(f"{what}: {exc.detail}") from None
    with safe_open(str(path), framework="pt") as handle:
        return tensors, dict(handle.metadata() or {})


@dataclass(frozen=True)
class StateFile:
    """A train-state file the supervisor copied from the child and validated (see :func:`copy_state_file`)."""

    path: Path
    sha256: str
    size_bytes: int
    info: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)


def copy_state_file(
    source: Path, dest: Path, *, max_bytes: int, what: str, parameter: str | None = None
) -> StateFile:
    """Copy the child's safetensors ``source`` to ``dest`` (a path the supervisor owns) and validate
    the copy, so what was checked is exactly what is kept, without loading any tensor whole.

    The copy streams (``COPY_BLOCK`` at a time, hashed on the way). Checked: a regular file of at
    most ``max_bytes``; the header parses through the upload reader's safetensors validator
    (bounded JSON, no duplicate keys, shapes and ``data_offsets`` contiguous and consistent with the
    file size); dtypes float32/float64/int64 only; at least one tensor; metadata holds only ``info``,
    a JSON object of plain values; floating values finite, read back in blocks of ``FINITE_BLOCK``
    (else numerical-instability naming ``parameter``).
    """
    from app.storage.formats import validate_safetensors

    digest, copied = hashlib.sha256(), 0
    with _open_regular(source) as fh, open(dest, "wb") as out:
        if os.fstat(fh.fileno()).st_size > max_bytes:
            raise invalid_output(f"{what}: the file exceeds the limit of {max_bytes} bytes")
        for block in iter(lambda: fh.read(COPY_BLOCK), b""):
            copied += len(block)
            if copied > max_bytes:
                raise invalid_output(f"{what}: the file exceeds the limit of {max_bytes} bytes")
            digest.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    try:
        specs = validate_safetensors(dest, copied, f"/{what}", tuple(STATE_DTYPES))
    except ProblemError as exc:
        raise invalid_output(f"{what}: {exc.detail}") from None
    if not specs:
        raise invalid_output(f"{what}: the file holds no tensors")
    with open(dest, "rb") as fh:
        (length,) = np.frombuffer(fh.read(8), dtype="<u8")
        metadata = json.loads(fh.read(int(length))).get("__metadata__") or {}  # validated above
        start = 8 + int(length)
        extra = sorted(set(metadata) - set(STATE_METADATA))
        if extra:
            raise invalid_output(f"{what}: unexpected metadata {extra[:5]}")
        info = loads_plain(metadata.get("info", "{}"), f"{what}'s info")
        if not isinstance(info, dict):
            raise invalid_output(f"{what}'s info is not an object")
        for spec in specs.values():
            dtype = STATE_DTYPES[spec.dtype]
            if dtype.kind != "f":
                continue
            fh.seek(start + spec.begin)
            remaining = (spec.end - spec.begin) // dtype.itemsize
            while remaining:
                values = np.fromfile(fh, dtype=dtype, count=min(remaining, FINITE_BLOCK))
                if values.size == 0:
                    raise invalid_output(f"{what}: the file changed while it was being read")
                if not np.isfinite(values).all():
                    raise instability(what, parameter)
                remaining -= values.size
    return StateFile(
        dest,
        digest.hexdigest(),
        copied,
        info,
        {name: (spec.dtype, spec.shape) for name, spec in specs.items()},
    )


def check_plain(value: Any, what: str, depth: int = 0) -> Any:
    """``value`` if it is JSON of plain values (no NaN, bounded depth), else invalid-output."""
    if depth > 16:
        raise invalid_output(f"{what} is nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(item, what, depth + 1)
            if len(key) > 200:
                raise invalid_output(f"{what} has an over-long key")
    elif isinstance(value, list):
        for item in value:
            check_plain(item, what, depth + 1)
    elif isinstance(value, float):
        if not np.isfinite(value):
            raise invalid_output(f"{what} holds a non-finite number")
    elif not (value is None or isinstance(value, bool | int | str)):
        raise invalid_output(f"{what} holds a {type(value).__name__}")
    return value


def _reject_constant(name: str):
    raise invalid_output(f"JSON constant {name} is not allowed")


def loads_plain(raw: str | bytes, what: str) -> Any:
    """Parse JSON the child wrote: at most META_MAX_BYTES, no NaN/Infinity, plain values only."""
    if len(raw) > META_MAX_BYTES:
        raise invalid_output(f"{what} is larger than {META_MAX_BYTES} bytes")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise invalid_output(f"{what} is not valid JSON ({exc})") from None
    return check_plain(value, what)


def read_json(path: Path, what: str) -> Any:
    with _open_regular(path) as fh:
        return loads_plain(fh.read(META_MAX_BYTES + 1), what)


class Outputs:
    """What a child that exited cleanly left in ``out/``; every accessor validates before returning."""

    def __init__(self, folder: Path, limits: Limits) -> None:
        self.folder = folder
        self.limits = limits
        meta = read_json(folder / "meta.json", "meta.json")
        if not isinstance(meta, dict):
            raise invalid_output("meta.json is not an object")
        self.meta = meta

    def has(self, name: str) -> bool:
        return os.path.lexists(self.folder / name)

    def array(self, name: str, shape: tuple[int, ...], parameter: str | None = None) -> np.ndarray:
        return read_array(
            self.folder / f"{name}.npy",
            shape,
            max_bytes=self.limits.file_bytes,
            what=name.replace("_", "-"),
            parameter=parameter,
        )

    def optional_array(self, name: str, shape: tuple[int, ...], parameter: str | None = None):
        return self.array(name, shape, parameter) if self.has(f"{name}.npy") else None

    def rows(self, name: str, rows: int) -> np.ndarray:
        return read_rows(self.folder / f"{name}.npy", rows, max_bytes=self.limits.file_bytes, what=name)

    def tensors(self, name: str, parameter: str | None = None):
        path = self.folder / f"{name}.safetensors"
        return read_tensors(path, max_bytes=self.limits.file_bytes, what=name, parameter=parameter)

    def state_file(self, name: str, dest: Path, parameter: str | None = None) -> StateFile:
        """``name.safetensors`` (a train state) copied to ``dest`` and validated there, never loaded
        whole: the caller stores that file as it is (:func:`copy_state_file`)."""
        return copy_state_file(
            self.folder / f"{name}.safetensors",
            dest,
            max_bytes=self.limits.file_bytes,
            what=name,
            parameter=parameter,
        )

    def number(self, key: str, source: dict | None = None) -> float:
        value = (self.meta if source is None else source).get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise invalid_output(f"meta.json: {key} is not a non-negative number")
        return value

    def integer(self, key: str, *, optional: bool = False, maximum: int = 2**53) -> int | None:
        value = self.meta.get(key)
        if optional and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            raise invalid_output(f"meta.json: {key} is not an integer in [0, {maximum}]")
        return value

    def text(self, key: str, limit: int = 64) -> str:
        value = self.meta.get(key)
        if not isinstance(value, str) or len(value) > limit:
            raise invalid_output(f"meta.json: {key} is not a short string")
        return value

    def mapping(self, key: str, *, optional: bool = False) -> dict | None:
        value = self.meta.get(key)
        if optional and value is None:
            return None
        if not isinstance(value, dict):
            raise invalid_output(f"meta.json: {key} is not an object")
        return value

    def names(self, key: str, limit: int = 32) -> list[str]:
        value = self.meta.get(key)
        if (
            not isinstance(value, list)
            or len(value) > limit
            or not all(isinstance(v, str) and _NAME.fullmatch(v) for v in value)
        ):
            raise invalid_output(f"meta.json: {key} is not a list of names")
        return value


# --- the supervisor -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    wall_seconds: float
    cpu_seconds: int
    memory_bytes: int | None  # None: no RLIMIT_AS (unset, or the child may use CUDA)
    file_bytes: int
    open_files: int
    processes: int
    nice: int
    threads: int
    isolate_network: bool
    confine_filesystem: bool  # CPU-only children: a CUDA driver needs device and /proc paths not listed here
    scratch_root: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        import torch

        cpu_only = settings.device == "cpu" or (
            settings.device == "auto" and not torch.backends.cuda.is_built()
        )
        return cls(
            wall_seconds=settings.sandbox_wall_seconds,
            cpu_seconds=settings.sandbox_cpu_seconds,
            memory_bytes=settings.sandbox_memory_bytes
            if cpu_only and settings.sandbox_memory_bytes > 0
            else None,
            file_bytes=settings.sandbox_max_file_bytes,
            open_files=settings.sandbox_max_open_files,
            processes=settings.sandbox_max_processes,
            nice=settings.sandbox_nice,
            threads=settings.torch_threads if settings.torch_threads > 0 else max(1, os.cpu_count() or 1),
            isolate_network=settings.sandbox_network,
            confine_filesystem=settings.sandbox_filesystem and cpu_only,
            scratch_root=Path(settings.sandbox_scratch_dir or tempfile.gettempdir()).resolve(),
        )


@lru_cache(maxsize=1)
def _unshare_net() -> tuple[str, ...]:
    """``unshare --net --`` when this process may create a network namespace; else () and a warning, once."""
    exe = shutil.which("unshare")
    if exe is not None:
        try:
            probe = subprocess.run([exe, "--net", "true"], capture_output=True, timeout=10)
            if probe.returncode == 0:
                return (exe, "--net", "--")
        except (OSError, subprocess.TimeoutExpired):
            pass
    log.warning("cannot create a network namespace here (unshare --net fails): compute children keep network")
    return ()


@lru_cache(maxsize=1)
def _drop_capabilities() -> tuple[str, ...]:
    """``setpriv`` emptying the capability sets, for a root worker; else () (a user has none to drop)."""
    if os.geteuid() != 0:
        return ()
    exe = shutil.which("setpriv")
    command = (exe, "--bounding-set", "-all", "--inh-caps", "-all", "--") if exe else ()
    try:
        if command and subprocess.run([*command, "true"], capture_output=True, timeout=10).returncode == 0:
            return command
    except (OSError, subprocess.TimeoutExpired):
        pass
    log.warning("cannot drop capabilities here (setpriv fails): compute children of a root worker keep them")
    return ()


def protect_supervisor() -> None:
    """Make this process non-dumpable: a child of the same user can no longer read its memory or
    ``/proc/<pid>/environ`` (database and broker credentials), nor ptrace it. Forks inherit it."""
    _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def network_isolated(limits: Limits) -> bool:
    return limits.isolate_network and bool(_unshare_net())


@lru_cache(maxsize=1)
def _landlock_available() -> bool:
    if landlock.abi_version() > 0:
        return True
    log.warning("Landlock is not available here (Linux 5.13+): compute children can read all the worker can")
    return False


def filesystem_confined(limits: Limits) -> bool:
    return limits.confine_filesystem and _landlock_available()


# glibc malloc settings of a job's process: freed memory stays mapped for the next allocation instead of
# going back to the OS (the process ends with its job). Block CG on the estimator benchmark's MLP ran
# 1.1-1.4 s with them and 1.7-1.9 s without, its minor page faults 14k and 200k per run; see
# bench/README.md, which measures with the same settings.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"


def child_env(scratch: Path) -> dict[str, str]:
    """Everything the child's environment holds; inherited only: which GPU, and where its libraries are.

    One thread for OpenMP, MKL and OpenBLAS: with more, importing torch or numpy already starts their
    thread pools, and Landlock confines only the threads a process starts after it (the child's
    imports run before its task's inputs are known). The child sets its real thread count once it is
    confined (``main``)."""
    env = {
        "GLIBC_TUNABLES": MALLOC_TUNABLES,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        **{name: "1" for name in THREAD_VARIABLES},
    }
    for name in ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _capped(kind: int, soft: int, hard: int | None = None) -> tuple[int, int]:
    """(soft, hard) no higher than the current hard limit, which an unprivileged process cannot raise."""
    current = resource.getrlimit(kind)[1]
    hard = soft if hard is None else hard
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    return soft, hard


def user_tasks(uid: int) -> int:
    """Processes and threads whose real user is ``uid`` (what RLIMIT_NPROC counts), from /proc."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # the process ended meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid:
            total += int(fields["Threads"])
    return total


def _preexec(limits: Limits) -> Callable[[], None]:
    """Runs in the forked child before exec: plain syscalls only (other threads may hold locks)."""
    rlimits = [
        (resource.RLIMIT_CORE, (0, 0)),
        # SIGXCPU at the soft limit; the hard one (SIGKILL) only if the child ignores that.
        (resource.RLIMIT_CPU, _capped(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 5)),
        (resource.RLIMIT_FSIZE, _capped(resource.RLIMIT_FSIZE, limits.file_bytes)),
        (resource.RLIMIT_NOFILE, _capped(resource.RLIMIT_NOFILE, limits.open_files)),
        # per user, threads included: what the user runs now plus the child's allowance
        (resource.RLIMIT_NPROC, _capped(resource.RLIMIT_NPROC, user_tasks(os.getuid()) + limits.processes)),
    ]
    if limits.memory_bytes:
        rlimits.append((resource.RLIMIT_AS, _capped(resource.RLIMIT_AS, limits.memory_bytes)))

    def run() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.nice(limits.nice)
        for kind, value in rlimits:
            resource.setrlimit(kind, value)

    return run


def _sweep_stale(root: Path) -> None:
    """Remove scratch folders left by supervisors on this machine that died (kill -9) before cleaning up."""
    for entry in root.glob(SCRATCH_PREFIX + "*"):
        owner = entry.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or int(owner) == os.getpid():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


class Sandbox:
    """One compute child and its scratch folder, for one assignment; a context manager that cleans up."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        limits.scratch_root.mkdir(parents=True, exist_ok=True)
        _sweep_stale(limits.scratch_root)
        self.scratch = Path(
            tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=limits.scratch_root)
        )
        self._used = False
        (self.scratch / "out").mkdir()
        self._stderr = open(self.scratch / "stderr.log", "w+b")  # read back through this handle
        protect_supervisor()
        try:
            wrapper = (_unshare_net() if limits.isolate_network else ()) + _drop_capabilities()
            self.proc = subprocess.Popen(
                [*wrapper, sys.executable, "-s", "-m", "worker.sandbox", str(self.scratch)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                cwd=self.scratch,
                env=child_env(self.scratch),
                start_new_session=True,
                preexec_fn=_preexec(limits),  # only syscalls; prctl was resolved before the fork
            )
        except BaseException:
            self._stderr.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the child's whole process group (anything it started goes too) and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.scratch, ignore_errors=True)

    def run(self, task: str, payload: dict, inputs: dict[str, Path], reporter: Reporter) -> Outputs:
        """Hand ``task`` to the child, supervise it, and return its validated outputs folder.

        Raises the job's Cancelled/LeaseLost (from ``reporter``) or a ProblemError; the child is dead
        when this returns or raises, and its outputs live until :meth:`close`.
        """
        assert not self._used, "a sandbox runs one assignment"
        self._used = True
        assignment = {
            "task": task,
            "payload": payload,
            "inputs": {name: str(path) for name, path in inputs.items()},
            "threads": self.limits.threads,
            "confine": filesystem_confined(self.limits),
        }
        (self.scratch / "assignment.json").write_text(json.dumps(assignment))
        try:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # the child is gone already; its exit status says why
        self._supervise(reporter, time.monotonic() + self.limits.wall_seconds)
        self.kill()  # anything the child left running in its group, before its files are read
        code = self.proc.returncode
        out = self.scratch / "out"
        if code == 0 and os.path.lexists(out / "meta.json"):
            return Outputs(out, self.limits)
        tail = self._stderr_tail()
        problem = self._failure(code, out, tail)
        log.warning("compute child exited with %s (%s); stderr tail:\n%s", code, problem.code, tail)
        raise problem

    def _stderr_tail(self, size: int = 4000) -> str:
        """The end of the child's stderr, read through our own handle (the path may have been swapped)."""
        fd = self._stderr.fileno()
        end = os.fstat(fd).st_size
        return os.pread(fd, size, max(0, end - size)).decode(errors="replace")

    def _supervise(self, reporter: Reporter, deadline: float) -> None:
        fd = self.proc.stdout.fileno()
        pending = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            reading = True
            while True:
                try:
                    reporter.check()
                except BaseException:
                    self.kill()
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.kill()
                    raise timeout(self.limits.wall_seconds)
                if not reading:
                    try:
                        self.proc.wait(timeout=min(0.1, remaining))
                        return
                    except subprocess.TimeoutExpired:
                        continue
                if not selector.select(timeout=min(0.1, remaining)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:  # the child closed stdout: it is exiting
                    selector.unregister(fd)
                    reading = False
                    continue
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > PROGRESS_LINE_MAX:
                    pending = b""
                for line in lines:
                    self._forward(line, reporter)

    def _forward(self, line: bytes, reporter: Reporter) -> None:
        """One progress line to the reporter, if it is well-formed; may raise Cancelled or LeaseLost."""
        if len(line) > PROGRESS_LINE_MAX:
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        phase, done, total = event.get("phase"), event.get("done"), event.get("total")
        if (
            isinstance(phase, str)
            and 0 < len(phase) <= 64
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**53 for n in (done, total))
        ):
            try:
                reporter(phase, done, total)
            except BaseException:
                self.kill()
                raise

    def _failure(self, code: int, out: Path, stderr_tail: str) -> ProblemError:
        if code > 0 and os.path.lexists(out / "error.json"):
            try:
                return child_problem(read_json(out / "error.json", "error.json"), self.limits)
            except ProblemError as exc:
                return exc
        if code == EXIT_DISK_FULL:
            return disk_full()
        if code < 0:
            sig = signal.Signals(-code) if -code in signal.valid_signals() else signal.SIGKILL
            if sig == signal.SIGXCPU:
                return resource_limit(
                    f"the computation used up its CPU time (IA_SANDBOX_CPU_SECONDS={self.limits.cpu_seconds})"
                )
            if sig == signal.SIGXFSZ:
                return child_problem({"kind": "file-size"}, self.limits)
            if sig == signal.SIGKILL:  # not ours (we raise before looking): the kernel's OOM killer
                return resource_limit("the compute process was killed, most likely for using too much memory")
            if any(text in stderr_tail for text in MEMORY_ERRORS):  # e.g. a C++ bad_alloc that aborted
                return child_problem({"kind": "memory"}, self.limits)
            return ProblemError(
                500, "internal-error", "The job failed unexpectedly", f"compute process got {sig.name}"
            )
        return ProblemError(
            500, "internal-error", "The job failed unexpectedly", f"compute process exited with status {code}"
        )


_warm: Sandbox | None = None


def prestart(settings: Settings) -> None:
    """Start this process's next child now, so its imports overlap the wait for a task."""
    global _warm
    discard()
    try:
        _warm = Sandbox(Limits.from_settings(settings))
    except Exception:  # noqa: BLE001 - a task starts its own child then
        log.warning("could not prestart a compute child", exc_info=True)


def discard() -> None:
    """Stop the prestarted child, if any (the pool process is exiting)."""
    global _warm
    box, _warm = _warm, None
    if box is not None:
        box.close()


def acquire(settings: Settings) -> Sandbox:
    """The prestarted child when it is alive and has these limits, else a new one.

    Either way the next task's child starts now: its imports overlap this task's compute, so a job
    that follows straight after finds a warm child (pool processes are reused across tasks).
    """
    global _warm
    box, _warm = _warm, None
    limits = Limits.from_settings(settings)
    if box is None or box.limits != limits or not box.alive():
        if box is not None:
            box.close()
        box = Sandbox(limits)
    prestart(settings)
    return box


# --- the child ----------------------------------------------------------------------------------


class _Progress:
    """The child's progress callback: JSON lines on the supervisor's pipe, at most ~10 a second per phase."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w")
        self._phase: str | None = None
        self._last = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase == self._phase and done < total and now - self._last < 0.1:
            return
        self._phase, self._last = phase, now
        self._out.write(json.dumps({"phase": phase, "done": int(done), "total": int(total)}) + "\n")
        self._out.flush()


def _is_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, MemoryError | torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in MEMORY_ERRORS)
    )


def _os_error(exc: BaseException, number: int) -> bool:
    """``exc`` (or the Rust/C++ error text wrapping it) is this errno."""
    if isinstance(exc, OSError) and exc.errno == number:
        return True
    return f"(os error {number})" in str(exc)


def describe(exc: BaseException) -> dict:
    """What the child reports in error.json; the supervisor turns it into a problem."""
    if isinstance(exc, EstimatorError):
        return {"kind": "estimator", "code": exc.code, "detail": exc.detail, "parameter": exc.parameter}
    if isinstance(exc, ProblemError):
        return {"kind": "problem", **exc.to_dict()}
    if _is_memory(exc):
        return {"kind": "memory"}
    if _os_error(exc, errno.ENOSPC) or _os_error(exc, errno.EDQUOT):
        return {"kind": "disk-full"}
    if _os_error(exc, errno.EFBIG):
        return {"kind": "file-size"}
    return {"kind": "internal", "exception": type(exc).__name__}


# What the interpreter, torch and numpy read while a task runs, besides the Python installation.
SYSTEM_PATHS = (
    "/usr",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc/self",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/sys/devices/system",
    "/sys/fs/cgroup",
    "/dev/urandom",
    "/dev/random",
)
DEVICES = ("/dev/null",)


def _runtime_paths() -> set[str]:
    """Readable in a confined child: the Python installation, our two packages (not the checkout they
    sit in, which may hold the data folder) and the system libraries; never a data or artifact folder."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    packages = {str(ROOT / "app"), str(ROOT / "worker")}
    return prefixes | set(sysconfig.get_paths().values()) | packages | set(SYSTEM_PATHS)


def main(argv: list[str]) -> int:
    scratch = Path(argv[0])
    out = scratch / "out"
    progress_fd = os.dup(1)
    os.dup2(2, 1)  # print() and library chatter go to stderr.log; stdout is the progress channel
    try:
        import_module("worker.compute")  # the expensive imports, before the task arrives
        if sys.stdin.readline().strip() != "go":
            return 0
        assignment = json.loads((scratch / "assignment.json").read_text())
        import torch

        module, _, name = assignment["task"].partition(":")
        task = getattr(import_module(module), name)
        inputs = {key: Path(path) for key, path in assignment["inputs"].items()}
        if assignment["confine"]:  # before the first byte of tenant data is read
            landlock.confine(_runtime_paths() | {str(p) for p in inputs.values()}, [scratch], DEVICES)
        # after confine (see child_env): more than one thread starts the intra-op pool at once, and
        # confine() covers only the calling thread and the threads it starts afterwards
        torch.set_num_threads(int(assignment["threads"]))
        meta = task(assignment["payload"], inputs, out, _Progress(progress_fd))
        (out / "meta.json").write_text(json.dumps(meta if meta is not None else {}, allow_nan=False))
        return 0
    except BaseException as exc:
        traceback.print_exc()
        try:
            (out / "error.json").write_text(json.dumps(describe(exc), default=str))
        except OSError as write_error:
            return EXIT_DISK_FULL if write_error.errno in (errno.ENOSPC, errno.EDQUOT) else 1
        return 1


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # outputs are written and closed; skipping torch's interpreter teardown saves ~0.5 s
