# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Write a file so that readers see either the old file or the complete new one.

A crash or an error while writing leaves at most a hidden temporary file,
never a truncated image under the final name.
"""

from __future__ import annotations

import errno
import os
# typing costs start-up time, and every mount.composefs writes its record through here:
# imported for type checkers only (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple, Union


def current_umask() -> int:
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Not thread-safe, hence only the fallback.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp(directory: Union[str, bytes], prefix: Union[str, bytes],
              suffix: Union[str, bytes] = b"", dir_fd: Optional[int] = None) -> Tuple[int, bytes]:
    """Create a new, empty, mode 0600 file named ``prefix`` + random + ``suffix``.

    Returns ``(fd, path)`` with ``path`` as bytes.  With ``dir_fd`` the file
    is made in that directory (``directory`` is then usually ``b""``).  What ``tempfile.mkstemp``
    does, without the cost of importing ``tempfile`` (and ``random``) into
    every CLI start.
    """
    base = os.path.join(os.fsencode(directory), os.fsencode(prefix))
    tail = os.fsencode(suffix)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _attempt in range(100):
        path = base + os.urandom(6).hex().encode() + tail
        try:
            return os.open(path, flags, 0o600, dir_fd=dir_fd), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", os.fsdecode(base))


def unlink_quietly(path: Union[str, bytes]) -> None:
    """Remove a temp file on an error path, where a second error would only hide the first."""
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(path: Union[str, bytes]) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Union[str, bytes], data: bytes, mode: Optional[int] = None) -> None:
    """Write *data* to *path* via a temp file in the same directory, fsync, rename.

    *mode* defaults to what ``open(path, "w")`` would create (0666 & ~umask).
    """
    target = os.fsencode(path)
    directory = os.path.dirname(target) or b"."
    if mode is None:
        mode = 0o666 & ~current_umask()
    fd, tmp = make_temp(directory, b".%s." % os.path.basename(target), b".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.rename(tmp, target)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(directory)


def write_atomic_at(dir_fd: int, name: bytes, data: bytes, mode: int = 0o644) -> None:
    """:func:`write_atomic` of ``name`` in the directory ``dir_fd`` (never follows a link there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _attempt in range(100):
        tmp = b".%s.%s.tmp" % (name, os.urandom(6).hex().encode())
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no unused temporary name", os.fsdecode(name))
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    os.fsync(dir_fd)
