# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Copy hashed files into an :class:`.objects.ObjectBatch` on worker threads.

The store half of the one hash-and-store pipeline of ``mkcomposefs
--digest-store`` and ``add-image`` (the hashing half is :mod:`.hash_pool`):
the calling thread hashes the next file while worker threads copy the
previous ones.  Hashing 4 KiB blocks holds the GIL between blocks and does
not speed up in threads; copying (FICLONE, ``copy_file_range``) and
writeback do.  At most ``4 * threads`` copies wait, so a huge tree never
holds thousands of open files.

The first error wins: no copy starts after it, copies not yet started are
dropped (their descriptors closed), running ones end, and :meth:`abort`
removes everything the batch staged, so a file that changed while it was
copied never leaves an object whose content differs from its name.
"""

from __future__ import annotations

import os
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Dict, Optional, Tuple

from .objects import ObjectBatch

#: Called with the source fd after its copy was staged (a check that it did not change).
AfterCopy = Callable[[int], None]
#: Turns an OSError of a copy into the error to raise (naming the source).
CopyError = Callable[[OSError], BaseException]


class ObjectCopier:
    """Stages copies in ``batch`` on ``threads`` workers; :meth:`finish` commits them, :meth:`abort` drops them."""

    def __init__(self, batch: ObjectBatch, threads: int) -> None:
        self.batch = batch
        # Copies overlap with hashing even with threads=1: the calling thread
        # hashes, ``threads`` workers copy (C: ``threads`` workers for each pass).
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._pending: Dict["Future[bool]", Tuple[int, int]] = {}  # (source fd, size)
        self._window = 4 * threads
        #: Objects (and their bytes) this copier added to the store.
        self.objects_written = 0
        self.bytes_written = 0

    def submit(self, fd: int, digest: bytes, size: int, after: Optional[AfterCopy] = None,
               error: Optional[CopyError] = None) -> None:
        """Copy the file open at ``fd`` (now owned here, closed when done) as the object ``digest``.

        Raises the first error of an earlier copy, if any has failed.
        """
        try:
            future = self._pool.submit(self._copy, fd, digest, size, after, error)
        except BaseException:
            os.close(fd)
            raise
        self._pending[future] = (fd, size)
        if len(self._pending) >= self._window:
            self._reap(FIRST_COMPLETED)

    def _copy(self, fd: int, digest: bytes, size: int, after: Optional[AfterCopy],
              error: Optional[CopyError]) -> bool:
        try:
            written = self.batch.add(fd, digest, size=size)
            if after is not None:
                after(fd)
            return written
        except OSError as exc:
            if error is None:
                raise
            raise error(exc) from None
        finally:
            os.close(fd)

    def _reap(self, how: str) -> None:
        done, _running = wait(list(self._pending), return_when=how)
        for future in done:
            _fd, size = self._pending.pop(future)
            if future.result():
                self.objects_written += 1
                self.bytes_written += size

    def finish(self) -> None:
        """Wait for every copy, then make them durable and visible (:meth:`.ObjectBatch.commit`)."""
        if self._pending:
            self._reap(ALL_COMPLETED)
        self._pool.shutdown(wait=True)
        self.batch.commit()

    def abort(self) -> None:
        """After an error: drop queued copies, wait for running ones, discard all staged."""
        for future, (fd, _size) in list(self._pending.items()):
            if future.cancel():
                os.close(fd)
        self._pending.clear()
        self._pool.shutdown(wait=True)
        self.batch.abort()


__all__ = ["ObjectCopier"]
