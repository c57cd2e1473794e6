# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Reading a remote store at a ``file://`` URL (another store on this machine, an NFS mount).

Read like any remote: as hostile input.  The base directory is the
caller's choice; below it every component is opened without following
symbolic links, and only regular files are read (a FIFO or device planted
in the remote never blocks or triggers anything).  What is read is
verified by the pull, as over HTTP.
"""

from __future__ import annotations

import errno
import os
from typing import Any, List

from .errors import RemoteError, RemoteNotFound
from .remote_options import RemoteURL
from .safe_dirs import UnsafePathError, open_dir, open_regular

_CHUNK = 256 * 1024


class FileTransport:
    """A remote store reached through the file system."""

    def __init__(self, remote: RemoteURL) -> None:
        self.remote = remote
        self.url = remote.shown

    def get_small(self, path: str, limit: int) -> bytes:
        fd = self._open(path)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise RemoteError(self.remote.file_url(path), "is %d bytes, more than the %d accepted" % (size, limit))
            chunks: List[bytes] = []
            got = 0
            while True:
                chunk = self._read(fd, min(_CHUNK, limit + 1 - got), path)
                if not chunk:
                    break
                got += len(chunk)
                if got > limit:
                    raise RemoteError(self.remote.file_url(path), "grew beyond the %d bytes accepted" % limit)
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def stream(self, path: str, sink: Any) -> int:
        fd = self._open(path)
        try:
            total = 0
            while True:
                chunk = self._read(fd, _CHUNK, path)
                if not chunk:
                    return total
                total += len(chunk)
                sink.write(memoryview(chunk))
        finally:
            os.close(fd)

    def after_fork(self) -> None:
        """Nothing is shared with a forked transfer process: every read opens its own descriptors."""

    def close(self) -> None:
        pass

    def _read(self, fd: int, size: int, path: str) -> bytes:
        try:
            return os.read(fd, size)
        except OSError as exc:
            raise RemoteError(self.remote.file_url(path), "read failed: %s" % (exc.strerror or exc)) from None

    def _open(self, path: str) -> int:
        shown = self.remote.file_url(path)
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise RemoteError(shown, "not a store-relative name")
        fds: List[int] = []
        try:
            try:
                fds.append(os.open(self.remote.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                for part in parts[:-1]:
                    fds.append(open_dir(part, fds[-1], shown))
                return open_regular(parts[-1], fds[-1], shown)
            except FileNotFoundError:
                raise RemoteNotFound(shown, "not found") from None
            except UnsafePathError as exc:
                raise RemoteError(shown, "refused: %s" % exc) from None
            except OSError as exc:
                if exc.errno == errno.ENOTDIR:
                    raise RemoteNotFound(shown, "not found (a path component is not a directory)") from None
                raise RemoteError(shown, exc.strerror or str(exc)) from None
        finally:
            for fd in fds:
                os.close(fd)
