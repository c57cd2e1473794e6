# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The Linux new mount API (fsopen, fsconfig, fsmount, move_mount, ...) via ctypes.

Why this and not mount(2): every fsconfig() value travels as its own string
(or file descriptor), so paths holding ``,`` ``:`` ``=`` spaces or newlines
need no escaping, and a mount can be built fully detached and attached in one
step, or never attached at all.  Every failure raises :class:`MountError`
carrying the errno, the call, the key and what the kernel logged on the
filesystem context (overlayfs and erofs explain their refusals there).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct
# typing itself costs ~20 ms of start-up (re, functools...): imported for type checkers only.
TYPE_CHECKING = False

from .errors import ComposefsError

if TYPE_CHECKING:  # not at run time: every import is mount.composefs start-up time
    from typing import List, Optional, Union

    PathArg = Union[str, bytes, "os.PathLike[str]"]

# Syscall numbers of the mount API: one table for every architecture since
# Linux 5.1 (asm-generic/unistd.h), except alpha, which Python rarely runs on.
_NR = {
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "mount_setattr": 442,
}

FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_BENEATH = 0x200  # Linux 6.5+
AT_EMPTY_PATH = 0x1000
AT_FDCWD = -100

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

# struct mount_attr: attr_set, attr_clr, propagation, userns_fd (all u64).
_MOUNT_ATTR = struct.Struct("=QQQQ")

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_NEWNS = 0x00020000

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class MountError(ComposefsError):
    """A mount API call failed; ``errno`` is the kernel's answer."""

    def __init__(self, message: str, err: int = 0, call: str = "", key: str = "",
                 log: Optional[List[str]] = None) -> None:
        self.errno = err
        self.call = call
        self.key = key
        self.log = list(log or [])
        super().__init__(message)


def errno_text(err: int) -> str:
    name = "EOPNOTSUPP" if err == _errno.EOPNOTSUPP else _errno.errorcode.get(err, "?")
    return "%s (%s)" % (os.strerror(err), name)


def _fs(path: PathArg) -> bytes:
    return os.fsencode(path)


def _call(name: str, *args: object) -> int:
    # syscall() is variadic and reads every argument as a long: widen ints.
    wide = [ctypes.c_long(a.value) if isinstance(a, (ctypes.c_int, ctypes.c_uint, ctypes.c_size_t))
            else ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    res = _syscall(ctypes.c_long(_NR[name]), *wide)
    if res < 0:
        return -ctypes.get_errno()
    return int(res)


def _fail(call: str, err: int, what: str = "", key: str = "", log: Optional[List[str]] = None) -> MountError:
    text = "%s%s failed: %s" % (call, (" " + what) if what else "", errno_text(err))
    if log:
        text += "; kernel says: " + "; ".join(log)
    return MountError(text, err, call, key, log)


def read_fs_log(fd: int) -> List[str]:
    """Drain the messages the kernel queued on an fsopen() context."""
    messages = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break  # ENODATA: queue empty
        if not data:
            break
        text = data.decode("utf-8", "replace").rstrip("\n")
        # Lines start with "e ", "w " or "i " (error, warning, info).
        if len(text) > 2 and text[1] == " " and text[0] in "ewi":
            text = text[2:]
        messages.append(text)
    return messages


class FsContext:
    """An fsopen() filesystem context; close() or use as a context manager."""

    def __init__(self, fstype: str) -> None:
        self.fstype = fstype
        res = _call("fsopen", _fs(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))
        if res < 0:
            raise _fail("fsopen", -res, repr(fstype))
        self.fd: int = res

    def __enter__(self) -> "FsContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _config(self, cmd: int, key: Optional[bytes], value: Optional[bytes], aux: int, what: str) -> None:
        res = _call("fsconfig", ctypes.c_int(self.fd), ctypes.c_uint(cmd), key, value, ctypes.c_int(aux))
        if res < 0:
            raise _fail("fsconfig", -res, "%s %s" % (self.fstype, what),
                        key.decode("utf-8", "replace") if key else "", read_fs_log(self.fd))

    def set_flag(self, key: str) -> None:
        self._config(FSCONFIG_SET_FLAG, key.encode(), None, 0, key)

    def set_string(self, key: str, value: PathArg) -> None:
        raw = _fs(value)
        if b"\0" in raw:
            raise MountError("%s value for %s contains a NUL byte" % (self.fstype, key), _errno.EINVAL,
                             "fsconfig", key)
        self._config(FSCONFIG_SET_STRING, key.encode(), raw, 0,
                     "%s=%s" % (key, os.fsdecode(raw)))

    def set_fd(self, key: str, fd: int) -> None:
        self._config(FSCONFIG_SET_FD, key.encode(), None, fd, "%s=<fd %d>" % (key, fd))

    def create(self) -> None:
        self._config(FSCONFIG_CMD_CREATE, None, None, 0, "create")

    def mount(self, attr_flags: int = 0) -> int:
        """fsmount(): a detached mount of the created superblock, as an fd."""
        res = _call("fsmount", ctypes.c_int(self.fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                    ctypes.c_uint(attr_flags))
        if res < 0:
            raise _fail("fsmount", -res, self.fstype, log=read_fs_log(self.fd))
        return res


def move_mount(mnt_fd: int, target: PathArg) -> None:
    """Attach the detached mount ``mnt_fd`` at ``target``."""
    res = _call("move_mount", ctypes.c_int(mnt_fd), b"", ctypes.c_int(AT_FDCWD), _fs(target),
                ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    if res < 0:
        raise _fail("move_mount", -res, "to %s" % os.fsdecode(_fs(target)))


def move_mount_fd(mnt_fd: int, target_fd: int, shown: str, beneath: bool = False) -> None:
    """Attach the detached mount ``mnt_fd`` on the directory open at ``target_fd``
    (an ``O_PATH`` descriptor): exactly the place that was opened, whatever
    its path names meanwhile.  ``beneath``: under the mount whose root
    ``target_fd`` is, between it and its parent (``MOVE_MOUNT_BENEATH``)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH | (MOVE_MOUNT_BENEATH if beneath else 0)
    res = _call("move_mount", ctypes.c_int(mnt_fd), b"", ctypes.c_int(target_fd), b"", ctypes.c_uint(flags))
    if res < 0:
        raise _fail("move_mount", -res, "%s %s" % ("beneath the mount at" if beneath else "to", shown))


def mount_setattr(mnt_fd: int, attr_set: int, attr_clr: int = 0, userns_fd: int = 0) -> None:
    buf = ctypes.create_string_buffer(_MOUNT_ATTR.pack(attr_set, attr_clr, 0, userns_fd), _MOUNT_ATTR.size)
    res = _call("mount_setattr", ctypes.c_int(mnt_fd), b"", ctypes.c_uint(AT_EMPTY_PATH), buf,
                ctypes.c_size_t(_MOUNT_ATTR.size))
    if res < 0:
        raise _fail("mount_setattr", -res, "idmap" if attr_set & MOUNT_ATTR_IDMAP else "")


def set_idmap(mnt_fd: int, userns_fd: int) -> None:
    """Make a detached mount idmapped with the user namespace open at ``userns_fd``."""
    mount_setattr(mnt_fd, MOUNT_ATTR_IDMAP, 0, userns_fd)


def legacy_mount(source: PathArg, target: PathArg, fstype: str, flags: int, data: Optional[bytes],
                 shown: str = "") -> None:
    """mount(2), for kernels without the mount API keys we need; ``shown`` names the target in errors."""
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                            ctypes.c_char_p]
    if _libc.mount(_fs(source), _fs(target), fstype.encode(), flags, data) != 0:
        err = ctypes.get_errno()
        raise _fail("mount", err, "%s on %s" % (fstype, shown or os.fsdecode(_fs(target))))


def umount(target: PathArg, flags: int = 0) -> None:
    _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    if _libc.umount2(_fs(target), flags) != 0:
        err = ctypes.get_errno()
        raise _fail("umount2", err, os.fsdecode(_fs(target)))


def setns(fd: int, nstype: int = 0) -> None:
    """Enter a namespace (os.setns exists only from Python 3.12)."""
    _libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    if _libc.setns(fd, nstype) != 0:
        raise _fail("setns", ctypes.get_errno())
