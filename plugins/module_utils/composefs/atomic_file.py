# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Write a file so that readers see either the old file or the complete new one.

A crash or an error while writing leaves at most a hidden temporary file,
never a truncated image under the final name.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Union


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


def write_atomic(path: str, data: bytes, mode: Optional[int] = None) -> None:
    """Write *data* to *path* via a temp file in the same directory, fsync, rename.

    *mode* defaults to what ``open(path, "w")`` would create (0666 & ~umask).
    """
    directory = os.path.dirname(path) or "."
    if mode is None:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".%s." % os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.rename(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(directory)
