# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Copying a file's data into a new file, the cheapest way the kernel allows.

A reflink (FICLONE) shares the extents; else ``copy_file_range`` copies in
the kernel; else pread/pwrite.  Like C mkcomposefs, any reflink failure
means "copy instead", and copy_file_range errors that say "not here" fall
back to the plain loop.  Durability is the caller's business (objects).
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import List, Optional

# _IOW(0x94, 9, int) from linux/fs.h.
FICLONE = 0x40049409
_COPY_CHUNK = 1 << 30
_READ_CHUNK = 1 << 20
# copy_file_range errors meaning "not here, copy by hand" (same list as C).
_CFR_FALLBACK = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EINVAL, errno.EBADF)
# ... and the ones that will not change for the rest of the run.
_CFR_DISABLE = (errno.ENOSYS, errno.EXDEV)
use_copy_file_range = hasattr(os, "copy_file_range")


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: List[object] = []


def start_writeback(fd: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): queue the file's dirty pages for writing.

    Only a hint that overlaps disk writes with later work (no durability by
    itself); silently skipped where libc or the filesystem lacks it.
    """
    if not _sync_file_range:
        try:
            import ctypes

            func = ctypes.CDLL(None, use_errno=True).sync_file_range
            func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range.append(func)
        except (OSError, AttributeError):
            _sync_file_range.append(None)
    func = _sync_file_range[0]
    if func is not None:
        func(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]


def copy_data(src: int, dst: int, size: Optional[int] = None) -> None:
    """Copy all of ``src`` into the empty file ``dst``: reflink, kernel copy, read/write.

    With ``size`` known the kernel copy stops there instead of asking once
    more for EOF (that last call measured as slow as a real copy).  The kernel
    copy and the read/write loop stop at ``size``; a reflink takes the whole
    file.  A file that grew or shrank is caught by the caller's size check.
    """
    global use_copy_file_range
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        # Like C: any failure (EOPNOTSUPP, EXDEV, EINVAL, ...) means copy instead.
        pass
    offset = 0
    if use_copy_file_range:
        while True:
            try:
                n = os.copy_file_range(src, dst, _COPY_CHUNK, offset, offset)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in _CFR_DISABLE:
                    use_copy_file_range = False
                elif exc.errno not in _CFR_FALLBACK:
                    raise
                break
            if n == 0:
                # EOF, or a kernel that copies nothing (procfs, some overlayfs):
                # the loop below finishes the job either way.
                break
            offset += n
            if size is not None and offset >= size:
                return
    while True:
        want = _READ_CHUNK if size is None else min(_READ_CHUNK, size - offset)
        if want <= 0:
            # At the expected size: one byte more, if the source has it, so
            # that the caller's size check sees a file that grew (as a
            # kernel copy of a whole chunk would).
            want = 1
        chunk = os.pread(src, want, offset)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            written = os.pwrite(dst, view, offset)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            offset += written
            view = view[written:]
        if size is not None and offset > size:
            return


__all__ = ["FICLONE", "copy_data", "start_writeback"]
