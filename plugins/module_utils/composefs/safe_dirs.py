# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Directory descriptors for trees that hold other people's data (stores).

Our tools run as root on directories that other users may write to.  A path
string is re-resolved by the kernel at every use, so a symbolic link planted
between two calls (``objects/ab -> /etc``) would send a rename, an unlink or
a write outside the tree.  Everything below therefore works relative to a
directory descriptor that was opened with ``O_NOFOLLOW``: once a directory
is open, the names inside it are single components resolved in it, and a
symbolic link where a directory or a file belongs is refused, never
followed.

Ownership follows sshd's ``StrictModes``: a tree (and each directory in it)
must belong to the invoking user or root and must not be writable by group
or others, unless the caller explicitly allows it; anyone who could write
there could otherwise swap its contents under a root process.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import UnsafePathError

# typing costs ~20 ms of start-up and mount.composefs opens its image through
# here: imported for type checkers only (annotations are strings).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple, Union

    PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Opening a FIFO or a device must never block or have side effects (a tape
#: rewinds, a terminal becomes ours): non-blocking, no controlling tty.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def open_dir(name: PathArg, dir_fd: Optional[int] = None, shown: Optional[str] = None) -> int:
    """Open the directory ``name`` (relative to ``dir_fd``) without following a final symlink.

    FileNotFoundError passes through (callers decide what missing means);
    a symbolic link or a non-directory is :class:`UnsafePathError`.
    """
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = shown or os.fsdecode(name)
            kind = "a symbolic link" if _is_link(name, dir_fd) else "not a directory"
            raise UnsafePathError("%s is %s where a directory belongs: refused" % (what, kind)) from None
        raise


def ensure_dir(name: PathArg, dir_fd: int, mode: int = 0o700, shown: Optional[str] = None) -> Tuple[int, bool]:
    """Open (creating it if missing) the subdirectory ``name`` of ``dir_fd``: (fd, created).

    A new directory's name is made durable (fsync of ``dir_fd``) before it is
    returned.  Safe against a concurrent creator.
    """
    created = False
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
        created = True
    except FileExistsError:
        pass
    fd = open_dir(name, dir_fd, shown)
    if created:
        os.fsync(dir_fd)
    return fd, created


def open_regular(name: PathArg, dir_fd: Optional[int] = None, shown: Optional[str] = None,
                 flags: int = READ_FLAGS) -> int:
    """Open a regular file for reading; never follows a final symlink, never blocks.

    A FIFO, device, socket or directory is :class:`UnsafePathError` (opening
    one must not hang or trigger a device); FileNotFoundError passes through.
    """
    what = shown or os.fsdecode(name)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError("%s is a symbolic link: refused" % what) from None
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EISDIR):
            raise UnsafePathError("%s is not a regular file" % what) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafePathError("%s is not a regular file (%s)" % (what, file_kind(mode)))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit + 1`` bytes of ``fd``: a result longer than ``limit`` says the file is too large."""
    chunks = []
    left = limit + 1
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def file_kind(mode: int) -> str:
    """A word for the type in ``mode``, for messages."""
    for test, word in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return word
    return "unknown file type"


def check_owner(st: os.stat_result, shown: str, allow_foreign: bool = False) -> None:
    """StrictModes: owned by the invoking user or root, not writable by group or others.

    ``allow_foreign`` waives the check (the caller's option says so).
    """
    if allow_foreign:
        return
    uid = os.geteuid()
    if st.st_uid not in (0, uid):
        raise UnsafePathError("%s belongs to uid %d, not to %s: refused (anyone owning it can swap its "
                              "contents under us; allow it explicitly if this is intended)"
                              % (shown, st.st_uid, "root" if uid == 0 else "uid %d or root" % uid))
    writable = st.st_mode & 0o022
    if writable:
        who = "group and others" if writable == 0o022 else "its group" if writable == 0o020 else "others"
        raise UnsafePathError("%s is writable by %s (mode %04o): refused (allow it explicitly if this "
                              "is intended)" % (shown, who, stat.S_IMODE(st.st_mode)))


def _is_link(name: PathArg, dir_fd: Optional[int]) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


__all__ = ["DIR_FLAGS", "READ_FLAGS", "UnsafePathError", "check_owner", "ensure_dir", "file_kind",
           "open_dir", "open_regular"]
