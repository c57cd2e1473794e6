# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Digest store: backing files named by their fs-verity digest (``XX/YYYY…``).

This is ``mkcomposefs --digest-store=DIR``.  Like C mkcomposefs 1.0.8
(``copy_file_with_dirs_if_needed``) an object is skipped when its name
already exists (``lstat``), otherwise written to ``DIR/.tmpXXXXXXXX``
(reflink with FICLONE, else ``copy_file_range``, else read/write), made 0644,
fsync-ed, given fs-verity if the filesystem can, and renamed into place.
Directories are created 0755 (minus umask).  Beyond C, the directory is
fsync-ed after the rename so a crash cannot lose a name the image refers to,
the copied size is checked, and a temp file never survives an error.

:class:`ObjectBatch` writes many objects with the same guarantee but one
``syncfs()`` for all of them instead of an fsync each.

Two writers of one object may race: both rename, the second replaces an
identical file, both succeed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from typing import Iterable, List, Optional, Set, Tuple, Union

from . import fsverity_ioctl
from .atomic_file import fsync_dir as _fsync_dir
from .atomic_file import make_temp
from .atomic_file import unlink_quietly
from .errors import FormatError
from .tree import DIGEST_SIZE, digest_to_path

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# _IOW(0x94, 9, int) from linux/fs.h.
FICLONE = 0x40049409
_COPY_CHUNK = 1 << 30
_READ_CHUNK = 1 << 20
# copy_file_range errors meaning "not here, copy by hand" (same list as C).
_CFR_FALLBACK = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.EINVAL, errno.EBADF)
# ... and the ones that will not change for the rest of the run.
_CFR_DISABLE = (errno.ENOSYS, errno.EXDEV)
_use_copy_file_range = hasattr(os, "copy_file_range")


def object_path(store_dir: PathLike, digest: bytes) -> bytes:
    """Absolute-or-relative path of the object for ``digest`` in ``store_dir``."""
    return os.path.join(os.fsencode(store_dir), digest_to_path(digest))


def store_object(src_fd_or_path: Union[int, PathLike], digest: bytes, store_dir: PathLike,
                 *, size: Optional[int] = None, sync_dir: bool = True) -> bool:
    """Put the content of ``src_fd_or_path`` into ``store_dir`` under ``digest``.

    ``digest`` must be the file's fs-verity sha256 digest; it is trusted, not
    recomputed (the caller has just computed it), except that with fs-verity
    enabled on the new object the kernel's measurement must match it.  A file
    descriptor is read from offset 0 with positional I/O; its file position is
    left alone.  ``size``, if given, is the expected content length.
    ``sync_dir=False`` leaves the directory fsync to the caller, who must
    call :func:`sync_object_dirs` before relying on the object (a bulk
    writer then syncs each ``XX`` directory once instead of per object).

    Returns True if the object was written, False if it already existed.
    """
    if len(digest) != DIGEST_SIZE:
        raise FormatError("digest must be %d bytes, not %d" % (DIGEST_SIZE, len(digest)))
    store = os.fsencode(store_dir)
    rel = digest_to_path(digest)
    subdir = os.path.join(store, rel[:2])
    final = os.path.join(store, rel)
    if _exists(final):
        return False

    if isinstance(src_fd_or_path, int):
        created = _write_object(src_fd_or_path, digest, store, subdir, final, size)
    else:
        src = os.open(src_fd_or_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            created = _write_object(src, digest, store, subdir, final, size)
        finally:
            os.close(src)
    if sync_dir:
        _fsync_dir(subdir)
        if created:
            # The new XX entry must reach the disk too.
            _fsync_dir(store)
    return True


def sync_object_dirs(store_dir: PathLike, digests: Iterable[bytes]) -> None:
    """Make the renames of ``digests`` durable (see ``sync_dir``).

    Many ``XX`` directories are flushed with one ``syncfs()`` of the store's
    filesystem (one journal commit) rather than one fsync each.
    """
    store = os.fsencode(store_dir)
    prefixes = sorted({digest_to_path(d)[:2] for d in digests})
    if len(prefixes) > _SYNCFS_THRESHOLD and _syncfs(store):
        return
    for prefix in prefixes:
        _fsync_dir(os.path.join(store, prefix))
    _fsync_dir(store)


# Above this many directories one syncfs() is cheaper than an fsync each.
_SYNCFS_THRESHOLD = 8


def _syncfs(path: bytes) -> bool:
    """syncfs(2) on the filesystem holding ``path``; False if unavailable."""
    import ctypes  # only here: it costs the CLIs' start-up a few ms

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
    finally:
        os.close(fd)
    return True


def _exists(path: bytes) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _ensure_dirs(path: bytes) -> bool:
    """Create ``path`` and missing parents with mode 0755; True if ``path`` was made.

    Safe against other writers creating the same directories concurrently.
    """
    missing: List[bytes] = []
    cur = path
    while cur and not os.path.isdir(cur):
        missing.append(cur)
        parent = os.path.dirname(cur.rstrip(b"/"))
        if parent == cur:
            break
        cur = parent
    made = False
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
            made = directory == path
        except FileExistsError:
            if not os.path.isdir(directory):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         os.fsdecode(directory)) from None
    return made


def _write_object(src: int, digest: bytes, store: bytes, subdir: bytes, final: bytes,
                  size: Optional[int]) -> bool:
    """Write one object; True if its ``XX`` directory had to be created."""
    created, tmp, dev = _write_temp(src, store, subdir, final, size, durable=True)
    try:
        created = _publish(tmp, digest, dev, subdir, final) or created
    except BaseException:
        unlink_quietly(tmp)
        raise
    return created


def _write_temp(src: int, store: bytes, subdir: bytes, final: bytes, size: Optional[int],
                durable: bool) -> Tuple[bool, bytes, int]:
    """Copy ``src`` into a new temp file in ``store``: (XX dir created, temp path, st_dev).

    Directories are made only when a create or rename says they are missing:
    one stat less per object, and a directory removed meanwhile (by a gc of
    empty ``XX`` directories) is simply made again.
    """
    created = False
    try:
        fd, tmp = make_temp(store, b".tmp")
    except FileNotFoundError:
        created = _ensure_dirs(subdir)
        fd, tmp = make_temp(store, b".tmp")
    try:
        try:
            _copy_data(src, fd, size)
            st = os.fstat(fd)
            if size is not None and st.st_size != size:
                raise FormatError("%s: copied %d bytes, expected %d (source changed?)"
                                  % (os.fsdecode(final), st.st_size, size))
            os.fchmod(fd, 0o644)
            if durable:
                os.fsync(fd)
            else:
                # Start writing now, so the disk works while we hash and copy
                # the next files; commit()'s syncfs then waits for the rest.
                _start_writeback(fd)
        finally:
            os.close(fd)
    except BaseException:
        unlink_quietly(tmp)
        raise
    return created, tmp, st.st_dev


def _publish(tmp: bytes, digest: bytes, dev: int, subdir: bytes, final: bytes) -> bool:
    """fs-verity (where possible) and rename of a complete, durable temp file."""
    if dev not in fsverity_ioctl.unsupported_devs:
        fsverity_ioctl.enable_then_check_path(tmp, digest)
    try:
        os.rename(tmp, final)
    except FileNotFoundError:
        created = _ensure_dirs(subdir)
        os.rename(tmp, final)
        return created
    return False


class ObjectBatch:
    """Many new objects made durable together: two syncfs() calls instead of an fsync each.

    For bulk writers (``mkcomposefs --digest-store`` of a whole tree), the way
    ostree commits a transaction: :meth:`add` copies each new object into a
    temp file without fsync; :meth:`commit` makes all their data durable with
    one ``syncfs()``, then enables fs-verity on and renames each, then makes
    the names durable with a second ``syncfs()``.  A crash before the renames
    leaves only ``.tmp*`` files; a name that survives a crash always points
    at complete data, as with per-object fsync.  Measured here: 460 objects
    (212 MB) with one flush instead of 460 fsyncs.  The cost is that
    ``syncfs`` also waits for other dirty data on the same filesystem; where
    it is unavailable each temp file is fsync-ed instead.

    ``add`` may be called from several threads.  Until :meth:`commit`
    returns, the objects are not in the store; :meth:`abort` (or an error in
    commit) removes every temp file not yet renamed.
    """

    def __init__(self, store_dir: PathLike) -> None:
        self.store = os.fsencode(store_dir)
        # (temp path, final path, XX dir, digest, st_dev) waiting for commit.
        self._pending: List[Tuple[bytes, bytes, bytes, bytes, int]] = []
        self._digests: Set[bytes] = set()
        self._lock = threading.Lock()
        #: Digests of the objects commit() has put into the store.
        self.written: List[bytes] = []

    def add(self, src: int, digest: bytes, size: Optional[int] = None) -> bool:
        """Stage the content of fd ``src`` as ``digest``; False if already stored or staged."""
        if len(digest) != DIGEST_SIZE:
            raise FormatError("digest must be %d bytes, not %d" % (DIGEST_SIZE, len(digest)))
        rel = digest_to_path(digest)
        final = os.path.join(self.store, rel)
        with self._lock:
            if digest in self._digests:
                return False
            self._digests.add(digest)
        if _exists(final):
            return False
        subdir = os.path.join(self.store, rel[:2])
        try:
            _created, tmp, dev = _write_temp(src, self.store, subdir, final, size, durable=False)
        except BaseException:
            with self._lock:
                self._digests.discard(digest)
            raise
        with self._lock:
            self._pending.append((tmp, final, subdir, digest, dev))
        return True

    def commit(self) -> None:
        """Make every staged object durable and visible under its name."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            if not _syncfs(self.store):
                for tmp, _final, _subdir, _digest, _dev in pending:
                    _fsync_path(tmp)
            while pending:
                tmp, final, subdir, digest, dev = pending[-1]
                _publish(tmp, digest, dev, subdir, final)
                pending.pop()
                self.written.append(digest)
        except BaseException:
            for entry in pending:
                unlink_quietly(entry[0])
            raise
        sync_object_dirs(self.store, self.written)

    def abort(self) -> None:
        """Remove every staged temp file (after an error elsewhere)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for entry in pending:
            unlink_quietly(entry[0])


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: List[object] = []


def _start_writeback(fd: int) -> None:
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


def _fsync_path(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_data(src: int, dst: int, size: Optional[int] = None) -> None:
    """Copy all of ``src`` into the empty file ``dst``: reflink, kernel copy, read/write.

    With ``size`` known the kernel copy stops there instead of asking once
    more for EOF (that last call measured as slow as a real copy).  Bytes
    past ``size`` are not copied: the object holds exactly what was hashed;
    a file that shrank is caught by the caller's size check.
    """
    global _use_copy_file_range
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError:
        # Like C: any failure (EOPNOTSUPP, EXDEV, EINVAL, ...) means copy instead.
        pass
    offset = 0
    if _use_copy_file_range:
        while True:
            try:
                n = os.copy_file_range(src, dst, _COPY_CHUNK, offset, offset)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in _CFR_DISABLE:
                    _use_copy_file_range = False
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
        chunk = os.pread(src, _READ_CHUNK, offset)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            written = os.pwrite(dst, view, offset)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            offset += written
            view = view[written:]
