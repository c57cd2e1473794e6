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

Lock files are opened relative to the store's directory descriptor without
following links: a symlink planted as ``STORE/lock`` would otherwise make a
root process create or open a file anywhere.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from .safe_dirs import UnsafePathError

LOCK_NAME = b"lock"
GATE_NAME = b"gate.lock"
GC_LOCK_NAME = b"gc.lock"

#: Called with a message when a lock is busy and the caller has to wait.
WaitNotice = Callable[[str], None]

#: What a shared taker waits for at the gate, then at the lock.
_SHARED_WAITS = ("a garbage collection is waiting or running", "a garbage collection is running")


def stderr_notice(message: str) -> None:
    """The default :data:`WaitNotice` of the command-line tools."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


_LOCK_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY


def _open_lock_file(name: bytes, dir_fd: int, create: bool = True) -> Optional[int]:
    """The lock file ``name`` in ``dir_fd``; None if it is missing and ``create`` is false."""
    if create:
        try:
            return os.open(name, os.O_RDWR | os.O_CREAT | _LOCK_FLAGS, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            # A reader without write access (fsck as another user, a read-only
            # mount) can still flock an existing lock file opened read-only.
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise _refused(exc, name)
    try:
        return os.open(name, os.O_RDONLY | _LOCK_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        raise _refused(exc, name)


def _refused(exc: OSError, name: bytes) -> OSError:
    if exc.errno == errno.ELOOP:
        return UnsafePathError("lock file %s of the store is a symbolic link: refused" % os.fsdecode(name))
    return exc


def flock_wait(fd: int, how: int, what: str, notice: Optional[WaitNotice]) -> None:
    """flock(2) ``fd``; if that has to wait, tell ``notice`` why first (``what``)."""
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
    """The locks of one store; every method opens its own file descriptions.

    ``dir_fd`` gives the store's directory descriptor (opened once by the
    :class:`.store.Store`); without it the directory ``store_dir`` is opened
    for each lock taken.
    """

    def __init__(self, store_dir: bytes, notice: Optional[WaitNotice] = stderr_notice,
                 dir_fd: Optional[Callable[[], int]] = None) -> None:
        self.store_dir = store_dir
        self.notice = notice
        self._dir_fd = dir_fd

    @contextmanager
    def _files(self, names: List[bytes], create: bool = True) -> Iterator[List[Optional[int]]]:
        fds: List[Optional[int]] = []
        own = None
        try:
            try:
                if self._dir_fd is not None:
                    dir_fd = self._dir_fd()
                else:
                    own = dir_fd = os.open(self.store_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                if create:
                    raise
                yield [None for _name in names]  # no store yet: nothing to collect, nothing to lock
                return
            for name in names:
                fds.append(_open_lock_file(name, dir_fd, create))
            yield fds
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            if own is not None:
                os.close(own)

    def _take(self, how: int, gate_why: str, lock_why: str, create: bool = True) -> Iterator[None]:
        with self._files([LOCK_NAME, GATE_NAME], create) as fds:
            lock, gate = fds
            if gate is not None:
                flock_wait(gate, fcntl.LOCK_EX, gate_why, self.notice)
            if lock is not None:
                flock_wait(lock, how, lock_why, self.notice)
            if gate is not None:
                os.close(gate)  # releases the gate
                fds[1] = None
            yield

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Held by writers of new content for their whole run."""
        yield from self._take(fcntl.LOCK_SH, *_SHARED_WAITS)

    @contextmanager
    def shared_read_only(self) -> Iterator[None]:
        """:meth:`shared` for a caller that must write nothing (a dry run).

        Keeps a gc from removing what the caller counts as present.  Lock
        files that do not exist are not created, and a store that does not
        exist yet is not locked at all (there is nothing to collect).
        """
        yield from self._take(fcntl.LOCK_SH, *_SHARED_WAITS, create=False)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held while content is deleted or moved; waits for running adds."""
        yield from self._take(fcntl.LOCK_EX, "another process is waiting for the store",
                              "adds in progress must finish first")

    @contextmanager
    def collector(self) -> Iterator[None]:
        """One gc or fsck --repair at a time, for its whole run."""
        with self._files([GC_LOCK_NAME]) as fds:
            for fd in fds:
                if fd is not None:
                    flock_wait(fd, fcntl.LOCK_EX, "another gc or fsck --repair is running", self.notice)
            yield


__all__ = ["GATE_NAME", "GC_LOCK_NAME", "LOCK_NAME", "StoreLock", "WaitNotice", "flock_wait", "stderr_notice"]
