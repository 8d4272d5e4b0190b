"""Landlock: a process confines itself, without privileges, to the files it may read and write.

Linux 5.13+ (the ABI version says which rights the kernel knows). Once :func:`confine` returns,
the calling thread and every thread and process it starts can open, for reading, only what lies
beneath the ``read`` paths, and create, change or remove only what lies beneath the ``write``
paths; where the kernel supports it (ABI 4+) no TCP connect or bind, and (ABI 6+) no signal or
abstract UNIX socket outside the confined processes. It cannot be undone. Threads that already
run stay free, so :func:`confine` refuses to run in a process that has more than one. Needs
``PR_SET_NO_NEW_PRIVS`` (the sandbox sets it before exec). The system calls go through
``ctypes``; their numbers are the same on every architecture (the generic system-call table).
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterable
from pathlib import Path

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # all that apply to a non-directory


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"landlock system call {number}: {os.strerror(code)}")
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    try:
        return _syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError:
        return 0


def _fs_rights(abi: int) -> int:
    return _FS_RIGHTS_BY_ABI[max(v for v in _FS_RIGHTS_BY_ABI if v <= abi)]


def confine(
    read: Iterable[str | Path], write: Iterable[str | Path], devices: Iterable[str | Path] = ()
) -> int:
    """Restrict this process for good; the ABI version applied (0: no Landlock here, nothing done).

    ``read``: files and folders to read (and execute, for shared libraries); ``write``: folders where
    anything goes; ``devices``: character devices to read, write and ioctl (``/dev/null``). Paths
    that do not exist are skipped.
    """
    abi = abi_version()
    if abi < 1:
        return 0
    if len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError(
            "confine() before any other thread starts: a thread that exists now would stay free"
        )
    handled = _fs_rights(abi)
    attr = _RulesetAttr(
        handled_access_fs=handled,
        handled_access_net=(_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0,
        scoped=(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0,
    )
    ruleset = _syscall(
        _CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)
    )
    try:
        rules = [(path, EXECUTE | READ_FILE | READ_DIR) for path in read]
        rules += [(path, handled) for path in write]
        rules += [(path, READ_FILE | WRITE_FILE | IOCTL_DEV) for path in devices]
        for path, rights in rules:
            _allow(ruleset, Path(path), rights & handled)
        _syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        _syscall(
            _ADD_RULE,
            ctypes.c_int(ruleset),
            ctypes.c_int(_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
    finally:
        os.close(fd)
