# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Build a composefs :class:`~.tree.Node` tree from a real directory.

This is the directory source of ``mkcomposefs SRC IMAGE``.  By default the
result equals what C mkcomposefs 1.0.8 builds in memory (``lcfs_build`` plus
the tool's digest pass), so the image written from it is byte-identical:

* every entry is ``lstat``-ed, never followed; the source itself must be a
  real directory (a symlink to one is refused, as in C);
* recorded: ``st_mode``, ``st_uid``, ``st_gid``, ``st_rdev``, ``st_size``
  and the mtime (seconds and nanoseconds, both 0 with ``use_epoch``);
  ``st_nlink`` is *not* recorded: every entry gets nlink 1 and hard links
  become independent inodes, unless ``hardlinks=True`` (our extension);
* symlinks carry their target as payload, and their size is its length;
* regular files of 1..``inline_max`` bytes (64 by default) are inlined
  (``content``); larger ones get their userspace fs-verity digest
  (``digest``) and the backing path ``XX/YYYY…`` (``payload``); empty files
  get neither;
* xattrs are read in ``listxattr`` order, including ``trusted.*`` and
  ``security.*`` (``trusted.overlay.*`` are kept as found; the image writer
  escapes them).  ``user_xattrs`` keeps only ``user.*``, ``skip_xattrs``
  reads none, and asking for both is refused like C does (EINVAL);
* ``skip_devices`` drops character and block devices, 0/0 whiteouts included.

Deliberate differences from C that cannot change a successful C result:
a filesystem without xattr support (``listxattr`` gives ENOTSUP) counts as
"no xattrs" where C aborts; a file that changes size or identity between the
scan and the digest pass is an error where C silently records a mismatch;
devices are recognised by ``lstat`` where C trusts ``d_type`` (so C keeps
devices on filesystems that report ``DT_UNKNOWN``); errors name the path.

Inline files get no ``digest``/``payload``: C computes them but the image
never stores them, and leaving them out keeps the tree equal to what a reader
gets back from the image.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from . import fsverity_digest
from .errors import FormatError
from .gc_pause import gc_paused
from .hash_pool import cpu_count, hash_map, pays_off
from .objects import ObjectBatch
from .safe_dirs import open_regular
from .tree import (
    INLINE_CONTENT_MAX,
    INODE_EXTERNAL_XATTR_MAX,
    PATH_MAX,
    RECOMMENDED_INLINE_CONTENT_MAX,
    XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
    Node,
    digest_to_path,
)

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
#: ``progress(files_done, files_total)``: called from the calling thread after
#: each regular file of the digest/inline/store pass, and once with (0, total)
#: before the first.  Files that need no reading (empty, or external files
#: when ``compute_digest`` is off) are not counted.
ProgressCallback = Callable[[int, int], None]

# Per-xattr cost in libcomposefs' budget (2 * entry header - 1) and the
# header added with the first xattr (lcfs_node_set_xattr_internal).
_XATTR_ENTRY_COST = 2 * 4 - 1
_XATTR_HEADER_COST = 12


class _FileJob:
    """A regular file whose content the second pass must read."""

    __slots__ = ("node", "path", "dev", "ino")

    def __init__(self, node: Node, path: bytes, st: os.stat_result) -> None:
        self.node = node
        self.path = path
        self.dev = st.st_dev
        self.ino = st.st_ino


def build_tree_from_directory(
    path: PathLike,
    *,
    use_epoch: bool = False,
    skip_devices: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
    hardlinks: bool = False,
    compute_digest: bool = True,
    inline_max: int = RECOMMENDED_INLINE_CONTENT_MAX,
    threads: Optional[int] = None,
    digest_store: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
) -> Node:
    """Scan directory ``path`` into a tree (see the module docstring).

    ``compute_digest=False`` skips fs-verity hashing: external files then get
    neither digest nor payload (libcomposefs' ``lcfs_build`` without
    ``LCFS_BUILD_COMPUTE_DIGEST``), which is only useful for metadata.
    ``inline_max=0`` disables inlining.  ``digest_store`` copies every
    external file into that directory as ``XX/YYYY…``: ``threads`` workers
    copy while the calling thread hashes the next files (hashing 4 KiB blocks
    does not scale in Python threads, copying does), and the new objects
    become durable and visible together at the end (:class:`.objects.ObjectBatch`);
    after an error none of them is added.
    ``threads`` defaults to the CPUs this process may run on.

    Raises :class:`FormatError` for options or trees composefs cannot
    represent and :class:`OSError` (with the failing path) for I/O errors.
    """
    if skip_xattrs and user_xattrs:
        raise FormatError("skip_xattrs and user_xattrs conflict (C mkcomposefs: Invalid argument)")
    if not 0 <= inline_max <= INLINE_CONTENT_MAX:
        raise FormatError("inline_max must be between 0 and %d" % INLINE_CONTENT_MAX)
    if digest_store is not None and not compute_digest:
        raise FormatError("a digest store needs compute_digest=True")
    if threads is None:
        threads = cpu_count()
    if threads < 1:
        raise FormatError("invalid thread count %d" % threads)

    src = os.fsencode(path)
    scanner = _Scanner(use_epoch, skip_devices, skip_xattrs, user_xattrs, hardlinks)
    with gc_paused():
        root = scanner.scan(src)
    jobs = scanner.jobs
    if hardlinks:
        aliased = _link_hardlinks(root, scanner.link_keys)
        jobs = [job for job in jobs if id(job.node) not in aliased]

    store = os.fsencode(digest_store) if digest_store is not None else None
    worker = _ContentWorker(compute_digest, inline_max, store)
    jobs = [j for j in jobs if worker.needed(j)]
    ahead = None
    if compute_digest:
        # Worker processes hash (when that pays off) while this thread hands
        # each hashed file to the copier threads: hashing uses every CPU asked
        # for, and a store that already holds the objects costs no copies.
        ahead = _hash_ahead([j for j in jobs if j.node.size > inline_max], threads)
    _run_jobs(jobs, worker.process, threads, progress, worker.batch, ahead)
    return root


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent.endswith(b"/") else parent + b"/" + name


def _oserror(exc: OSError, what: str, path: bytes) -> OSError:
    """A copy of ``exc`` whose message names the action and the path."""
    code = exc.errno if exc.errno is not None else errno.EIO
    # OSError(errno, ...) picks the matching subclass (PermissionError, ...).
    return OSError(code, "%s: %s" % (what, exc.strerror or exc), os.fsdecode(path))


class _Scanner:
    """First pass: metadata of every entry (lcfs_build with LCFS_BUILD_NO_INLINE)."""

    def __init__(self, use_epoch: bool, skip_devices: bool, skip_xattrs: bool,
                 user_xattrs: bool, hardlinks: bool) -> None:
        self.use_epoch = use_epoch
        self.skip_devices = skip_devices
        self.skip_xattrs = skip_xattrs
        self.user_xattrs = user_xattrs
        self.hardlinks = hardlinks
        self.jobs: List[_FileJob] = []
        self.link_keys: Dict[int, Tuple[int, int]] = {}

    def scan(self, src: bytes) -> Node:
        st = self._lstat(src)
        if not stat.S_ISDIR(st.st_mode):
            # C fails later with "cannot write file: Not a directory".
            raise NotADirectoryError(
                errno.ENOTDIR, "source is not a directory (symbolic links are not followed)",
                os.fsdecode(src))
        root = self._node(src, st)
        # Explicit stack: depth is bounded only by PATH_MAX, never by Python's
        # recursion limit.
        stack: List[Tuple[bytes, Node]] = [(src, root)]
        while stack:
            dpath, dnode = stack.pop()
            for name in self._list_dir(dpath):
                cpath = _join(dpath, name)
                cst = self._lstat(cpath)
                fmt = stat.S_IFMT(cst.st_mode)
                if self.skip_devices and fmt in (stat.S_IFCHR, stat.S_IFBLK):
                    continue
                child = self._node(cpath, cst)
                dnode.add_child(name, child)
                if fmt == stat.S_IFDIR:
                    stack.append((cpath, child))
        return root

    @staticmethod
    def _lstat(path: bytes) -> os.stat_result:
        try:
            return os.lstat(path)
        except OSError as exc:
            raise _oserror(exc, "cannot stat", path) from None

    @staticmethod
    def _list_dir(path: bytes) -> List[bytes]:
        # Sorted like the C writer keeps children (strcmp binary insert).
        # Reading the whole directory first keeps one fd open at a time.
        try:
            with os.scandir(path) as it:
                names = [entry.name for entry in it]
        except OSError as exc:
            raise _oserror(exc, "cannot read directory", path) from None
        names.sort()
        return names

    def _node(self, path: bytes, st: os.stat_result) -> Node:
        node = Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, rdev=st.st_rdev,
                    size=st.st_size)
        if not self.use_epoch:
            node.mtime_sec, node.mtime_nsec = divmod(st.st_mtime_ns, 1000000000)
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFREG:
            self.jobs.append(_FileJob(node, path, st))
        elif fmt == stat.S_IFLNK:
            try:
                target = os.readlink(path)
            except OSError as exc:
                raise _oserror(exc, "cannot read symbolic link", path) from None
            if not target or len(target) >= PATH_MAX:
                raise FormatError("invalid symlink target length %d: %s"
                                  % (len(target), os.fsdecode(path)))
            node.payload = target
            node.size = len(target)
        if self.hardlinks and fmt != stat.S_IFDIR and st.st_nlink > 1:
            self.link_keys[id(node)] = (st.st_dev, st.st_ino)
        if not self.skip_xattrs:
            self._read_xattrs(node, path)
        return node

    def _read_xattrs(self, node: Node, path: bytes) -> None:
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return
            raise _oserror(exc, "cannot list xattrs", path) from None
        budget = 0
        for name in names:
            key = os.fsencode(name)
            if self.user_xattrs and not key.startswith(b"user."):
                continue
            try:
                value = os.getxattr(path, key, follow_symlinks=False)
            except OSError as exc:
                raise _oserror(exc, "cannot read xattr %s" % name, path) from None
            if not 0 < len(key) <= XATTR_NAME_MAX:
                raise FormatError("xattr name too long (%d bytes) on %s"
                                  % (len(key), os.fsdecode(path)))
            if len(value) > XATTR_VALUE_MAX:
                raise FormatError("xattr %s value too large (%d bytes) on %s"
                                  % (name, len(value), os.fsdecode(path)))
            budget += _XATTR_ENTRY_COST + len(key) + len(value)
            if not node.xattrs:
                budget += _XATTR_HEADER_COST
            if budget > INODE_EXTERNAL_XATTR_MAX:
                raise FormatError("xattrs of %s exceed the composefs limit of %d bytes"
                                  % (os.fsdecode(path), INODE_EXTERNAL_XATTR_MAX))
            node.xattrs[key] = value


def _link_hardlinks(root: Node, keys: Dict[int, Tuple[int, int]]) -> Dict[int, Node]:
    """Turn later links of one inode into aliases of the first.

    "First" is in sorted depth-first order, the order in which a reader of the
    image meets the entries, so a dump round trip names the same target.
    Returns the replaced nodes by id.
    """
    if not keys:
        return {}
    targets: Dict[Tuple[int, int], Node] = {}
    replaced: Dict[int, Node] = {}
    for _path, node in root.walk():
        key = keys.get(id(node))
        if key is None:
            continue
        target = targets.get(key)
        if target is None:
            targets[key] = node
            continue
        alias = Node(mode=target.mode)
        alias.link_to = target
        target.nlink += 1
        parent = node.parent
        if parent is None:
            raise AssertionError("parent is not None")
        parent.replace_child(node.name, alias)
        replaced[id(node)] = node
    return replaced


class _ContentWorker:
    """Second pass for one regular file: inline content, digest, store copy."""

    def __init__(self, compute_digest: bool, inline_max: int, store: Optional[bytes]) -> None:
        self.compute_digest = compute_digest
        self.inline_max = inline_max
        self.store = store
        # New objects become durable and visible together, at the end.
        self.batch = ObjectBatch(store) if store is not None else None

    def needed(self, job: _FileJob) -> bool:
        size = job.node.size
        if size == 0:
            # C never opens empty files, so an unreadable one is fine.
            return False
        return size <= self.inline_max or self.compute_digest

    def process(self, job: _FileJob, ready: Optional[Tuple[bytes, int]] = None) -> Optional["_Copy"]:
        """Read (inline) or hash the file; the store copy, if any, is returned.

        ``ready`` is the (digest, bytes hashed) a worker process computed.
        The copy is left to the caller so it can run in other threads while
        this one hashes the next file: hashing holds the GIL between 4 KiB
        blocks and does not speed up in threads, copying and fsync do.
        """
        node, path = job.node, job.path
        if ready is not None and (self.batch is None or self.batch.has(ready[0])):
            # Hashed by a worker (which checked it is the file scanned) and
            # nothing to copy: the source need not be opened again.
            node.digest = ready[0]
            node.payload = digest_to_path(ready[0])
            return None
        fd = _open_source(path)
        task = None
        try:
            self._check_same(fd, job)
            if node.size <= self.inline_max:
                node.content = self._read_inline(fd, node.size, path)
                return None
            if ready is not None:
                # Hashed by a worker from the same file (same device, inode and size).
                digest = ready[0]
            else:
                try:
                    digest, hashed = _digest_fd(fd)
                except OSError as exc:
                    raise _oserror(exc, "cannot read", path) from None
                if hashed != node.size:
                    raise FormatError("%s changed during the scan" % os.fsdecode(path))
                self._check_same(fd, job)
            node.digest = digest
            node.payload = digest_to_path(digest)
            if self.batch is not None and not self.batch.has(digest):
                task = (fd, digest, node.size, path)
                return task
            return None
        finally:
            if task is None:
                os.close(fd)

    @staticmethod
    def _check_same(fd: int, job: _FileJob) -> None:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_dev != job.dev or st.st_ino != job.ino
                or st.st_size != job.node.size):
            raise FormatError("%s changed during the scan" % os.fsdecode(job.path))

    @staticmethod
    def _read_inline(fd: int, size: int, path: bytes) -> bytes:
        chunks: List[bytes] = []
        got = 0
        try:
            # One byte more than expected detects a file that grew.
            while got <= size:
                chunk = os.pread(fd, size + 1 - got, got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except OSError as exc:
            raise _oserror(exc, "cannot read", path) from None
        if got != size:
            raise FormatError("%s changed during the scan" % os.fsdecode(path))
        return b"".join(chunks)


# A file to copy into the store: (open fd, digest, size, path).
_Copy = Tuple[int, bytes, int, bytes]


def _hash_ahead(jobs: List[_FileJob], threads: int) -> Optional[Tuple[Set[int], Iterator[Tuple[bytes, int]]]]:
    """fs-verity digests of ``jobs``, in order, from ``threads`` worker processes (:mod:`.hash_pool`).

    None when worker processes would not pay off: the caller then hashes in
    its own thread.  The workers are forked now, before any copier thread.
    """
    total_bytes = sum(j.node.size for j in jobs)
    if not pays_off(len(jobs), total_bytes, threads):
        return None
    args = [(j.path, j.dev, j.ino, j.node.size) for j in jobs]
    return {id(j.node) for j in jobs}, hash_map(_hash_path, args, total_bytes, threads)


def _open_source(path: bytes) -> int:
    """A source file to read: regular, never through a final symlink, never blocking."""
    try:
        return open_regular(path)
    except OSError as exc:
        raise _oserror(exc, "cannot open", path) from None


def _hash_path(args: Tuple[bytes, int, int, int]) -> Tuple[bytes, int]:
    """Worker process: digest of one file, refusing one that changed since the scan."""
    path, dev, ino, size = args
    fd = _open_source(path)
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_dev != dev or st.st_ino != ino
                or st.st_size != size):
            raise FormatError("%s changed during the scan" % os.fsdecode(path))
        try:
            digest, hashed = _digest_fd(fd)
        except OSError as exc:
            raise _oserror(exc, "cannot read", path) from None
        if hashed != size:
            raise FormatError("%s changed during the scan" % os.fsdecode(path))
        return digest, hashed
    finally:
        os.close(fd)


def _digest_fd(fd: int) -> Tuple[bytes, int]:
    """fs-verity sha256 digest of ``fd`` and the number of bytes hashed."""
    hasher = fsverity_digest.hash_fd(fd)
    return hasher.digest(), hasher.size


def _run_jobs(jobs: List[_FileJob], func: Callable[[_FileJob, Optional[Tuple[bytes, int]]], Optional[_Copy]],
              threads: int, progress: Optional[ProgressCallback], batch: Optional[ObjectBatch],
              ahead: Optional[Tuple[Set[int], Iterator[Tuple[bytes, int]]]] = None) -> None:
    """Hash ``jobs`` (or take the digests ``ahead`` yields for its jobs, in order) in this thread; the
    store copies run on ``threads`` workers (:mod:`.object_copier`).

    The first error wins: no new copy starts after it, nothing staged in
    ``batch`` is kept, and it is raised once running copies end.
    """
    total = len(jobs)
    if progress is not None:
        progress(0, total)
    copier = None
    if batch is not None:
        # Imported here: concurrent.futures costs a build without a store ~5 ms.
        from .object_copier import ObjectCopier

        copier = ObjectCopier(batch, threads)
    hashed_ahead, digests = ahead if ahead is not None else (set(), iter(()))
    try:
        for done, job in enumerate(jobs, 1):
            copy = func(job, next(digests) if id(job.node) in hashed_ahead else None)
            if copy is not None:
                fd, digest, size, path = copy
                if copier is None:
                    os.close(fd)
                    raise AssertionError("a store copy without a store")  # pragma: no cover
                copier.submit(fd, digest, size, error=_store_error(path))
            if progress is not None:
                progress(done, total)
        if copier is not None:
            copier.finish()
    except BaseException:
        if copier is not None:
            copier.abort()
        raise
    finally:
        close = getattr(digests, "close", None)
        if close is not None:
            close()  # stops the worker pool if an error ended the loop early


def _store_error(path: bytes) -> Callable[[OSError], BaseException]:
    """An error storing the object of ``path`` names that file."""
    return lambda exc: _oserror(exc, "cannot store object for", path)
