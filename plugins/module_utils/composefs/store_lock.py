# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The object store's locks: flock(2) on files in the store directory.

``STORE/lock`` is a readers/writer lock.  Writers of new content
(``add-image``, ``rm-ref``, a read-only ``fsck``) hold it *shared* for their
whole run; whatever deletes or moves content (the sweep of ``gc``,
``fsck --repair``) holds it *exclusive*.  So a sweep never overlaps an add:
every object an add has found present or has written stays until the add has
published its ref, and from then on the ref protects it.

``STORE/gate.lock`` is a turnstile that keeps a steady stream of adds from
starving gc (Linux flock grants new shared holders while an exclusive
request waits): everyone passes the gate (exclusive, held only while taking
the main lock), and an exclusive taker keeps it closed until it has the main
lock, so new adds queue behind the waiting gc instead of overtaking it.

``STORE/gc.lock`` serialises the runs of gc and ``fsck --repair`` as a whole,
including their unlocked preparation (reading images), so that two of them
never delete under each other.

flock locks belong to an open file description and vanish when the process
dies, SIGKILL included: a crashed holder never leaves the store locked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

LOCK_NAME = b"lock"
GATE_NAME = b"gate.lock"
GC_LOCK_NAME = b"gc.lock"

#: Called with a message when a lock is busy and the caller has to wait.
WaitNotice = Callable[[str], None]


def _stderr_notice(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _open_lock_file(path: bytes) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY, 0o644)
    except OSError as exc:
        # A reader without write access (fsck as another user, a read-only
        # mount) can still flock an existing lock file opened read-only.
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)


def _flock(fd: int, how: int, what: str, notice: Optional[WaitNotice]) -> None:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
    if notice is not None:
        notice("waiting for the store lock (%s)..." % what)
    while True:
        try:
            fcntl.flock(fd, how)
            return
        except InterruptedError:
            continue


class StoreLock:
    """The locks of one store; every method opens its own file descriptions."""

    def __init__(self, store_dir: bytes, notice: Optional[WaitNotice] = _stderr_notice) -> None:
        self.store_dir = store_dir
        self.notice = notice

    def _path(self, name: bytes) -> bytes:
        return os.path.join(self.store_dir, name)

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Held by writers of new content for their whole run."""
        fd = _open_lock_file(self._path(LOCK_NAME))
        try:
            gate = _open_lock_file(self._path(GATE_NAME))
            try:
                _flock(gate, fcntl.LOCK_EX, "a garbage collection is waiting or running", self.notice)
                _flock(fd, fcntl.LOCK_SH, "a garbage collection is running", self.notice)
            finally:
                os.close(gate)  # releases the gate
            yield
        finally:
            os.close(fd)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held while content is deleted or moved; waits for running adds."""
        fd = _open_lock_file(self._path(LOCK_NAME))
        try:
            gate = _open_lock_file(self._path(GATE_NAME))
            try:
                _flock(gate, fcntl.LOCK_EX, "another process is waiting for the store", self.notice)
                _flock(fd, fcntl.LOCK_EX, "adds in progress must finish first", self.notice)
            finally:
                os.close(gate)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def collector(self) -> Iterator[None]:
        """One gc or fsck --repair at a time, for its whole run."""
        fd = _open_lock_file(self._path(GC_LOCK_NAME))
        try:
            _flock(fd, fcntl.LOCK_EX, "another gc or fsck --repair is running", self.notice)
            yield
        finally:
            os.close(fd)
