# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""``add-image``: take a source, store its objects and image, publish the ref.

Sources: a directory (below), a composefs-dump(5) file or stdin, or an
existing image (stored as it is).  Dumps and images carry no file contents;
their objects must already be in the store or in ``objects_from`` (another
digest store; each object copied from there is verified).  Everything runs
under the store's shared lock (see :mod:`.store`): objects, made durable,
then the image, then the ref.

Directory source: scan, hash only what changed, store objects.

The tree is scanned without digests (:func:`.scan.build_tree_from_directory`
with ``compute_digest=False`` still inlines small files), then every external
file gets its digest from the store's digest cache (when the object is
already in the store) or by hashing it, and new objects are copied into
``objects/`` by worker threads while this thread hashes the next file.  The
resulting tree, and so the image, is the one ``mkcomposefs --digest-store``
builds from the same directory.

Plans (``dry_run=True``): the same tree, digests (from the cache when the
object is present, else hashed) and image bytes as a real add, but nothing
under the store is written -- no object, image, ref, cache file, not even
the lock files (an existing lock is taken read-only; a store without lock
files has never been written to by an add or gc, and a plan's answer is
advisory anyway).  The result says what a real add would do:
``objects_written``/``bytes_written`` are the objects that would be copied,
``image_written`` whether the image is new, ``previous`` the ref's digest.

``expected_digest``: the image is built and its digest compared *before*
anything is published.  For a directory source the files are then hashed
first and the new objects copied only after the comparison (each copy
re-checks that the file's identity and change time are those seen while
hashing), instead of copying while hashing.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from . import fsverity_digest
from .errors import DumpParseError, FormatError, ImageError
from .objects import ObjectBatch, store_object, sync_object_dirs
from .scan import build_tree_from_directory, cpu_count
from .safe_dirs import READ_FLAGS as _SRC_FLAGS
from .store import (AddResult, ImageObjects, PathLike, Store, StoreError, check_digest_hex,
                    image_objects, is_composefs_image, object_relpath, split_ref_name)
from .store_cache import DigestCache, Key, key_of
from .store_image_memo import ImageMemo
from .store_image_memo import memo_key as image_memo_key
from .tree import RECOMMENDED_INLINE_CONTENT_MAX, Node, apply_source_options, digest_to_path

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK


def _changed(path: bytes) -> FormatError:
    return FormatError("%s changed while it was being added; try again" % os.fsdecode(path))


class DigestMismatch(StoreError):
    """The image's digest is not the expected one; nothing was published."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__("the image's digest is %s, not the expected %s: nothing was stored" % (actual, expected))
        self.expected = expected
        self.actual = actual


class _Plan:
    """Objects a directory source needs that are not in the store yet, found but not copied."""

    def __init__(self) -> None:
        self.copies: List[Tuple[bytes, bytes, int, Key]] = []  # (digest, source path, size, fstat key)
        self.cache: Optional[DigestCache] = None


def add_image(store: Store, source: PathLike, ref: str, *, use_epoch: bool = False, skip_devices: bool = False,
              skip_xattrs: bool = False, user_xattrs: bool = False, hardlinks: bool = False,
              threads: Optional[int] = None, use_cache: bool = True,
              objects_from: Optional[PathLike] = None, min_version: int = 0, max_version: int = 1,
              stdin: Any = None, dry_run: bool = False, expected_digest: Optional[str] = None) -> AddResult:
    """Build (or take) an image from ``source``, store it and its objects, point ``ref`` at it.

    ``dry_run``: write nothing, return what an add would do (module docstring).
    ``expected_digest``: raise :class:`DigestMismatch` before publishing
    anything if the image's digest differs.
    """
    split_ref_name(ref)
    if skip_xattrs and user_xattrs:
        raise StoreError("skip_xattrs and user_xattrs exclude each other")
    expected = None if expected_digest is None else check_digest_hex(expected_digest.lower())
    if threads is None:
        threads = cpu_count()
    result = AddResult()
    result.ref = ref
    # Objects of a directory source are copied while hashing, unless they
    # must wait for the digest check (or never be copied at all).
    plan = _Plan() if dry_run or expected is not None else None
    # Objects this run has seen present (or is copying): checked once, not again.
    known: Set[str] = set()
    with (store.lock.shared_read_only() if dry_run else store.lock.shared()):
        kind, root, data = _load_source(store, source, result, use_epoch=use_epoch, skip_devices=skip_devices,
                                        skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                                        threads=threads, use_cache=use_cache, stdin=stdin, plan=plan,
                                        known=known)
        result.source_kind = kind
        needed = image_objects(root)
        if needed.problems:
            raise StoreError("%s: cannot be stored: %s%s" % (
                os.fsdecode(os.fsencode(source)), needed.problems[0],
                " (and %d more problems)" % (len(needed.problems) - 1) if len(needed.problems) > 1 else ""))
        result.objects = len(needed.objects)
        # An unchanged tree: the memo names the image already in the store
        # (see store_image_memo), so it is not built again.
        memo = memo_key = None
        image_present = False
        if data is None and use_cache:
            memo = ImageMemo(store.cache_file(b"images"))
            memo_key = image_memo_key(root, min_version, max_version)
            hit = memo.get(memo_key) if memo_key is not None else None
            if hit is not None and _image_present(store, hit[0], hit[1]):
                result.digest, image_present = hit[0], True
        if not image_present:
            if data is None:
                from .erofs_writer import build_image

                data = build_image(root, min_version=min_version, max_version=max_version)
            result.digest = fsverity_digest.digest_bytes(data).hex()
        if expected is not None and result.digest != expected:
            raise DigestMismatch(expected, result.digest)
        if dry_run:
            copies = plan.copies if plan is not None else []
            result.objects_written = len(copies)
            result.bytes_written = sum(size for _d, _p, size, _k in copies)
            _ensure_objects(store, needed, kind, objects_from, result, known, dry_run=True)
            result.image_written = not (image_present or _image_present(store, result.digest, len(data)))
            result.previous = _read_previous(store, ref)
            return result
        result.previous = _read_previous(store, ref)
        if plan is not None:
            _store_planned(store, plan, threads, result)
        _ensure_objects(store, needed, kind, objects_from, result, known,
                        published=result.previous == result.digest)
        if not image_present:
            _same, result.image_written = store.write_image(data)
            if memo is not None and memo_key is not None:
                memo.put(memo_key, result.digest, len(data))
                try:
                    memo.save(memo_key)
                except OSError:
                    pass  # only a performance aid
        # An unchanged ref is left alone: rewriting it would only cost a
        # write and two fsyncs on every no-change run.
        if result.previous != result.digest:
            store.write_ref(ref, result.digest)
    return result


def _read_previous(store: Store, ref: str) -> Optional[str]:
    """The ref's digest, or None if it is missing or damaged (then it is simply replaced)."""
    try:
        return store.read_ref(ref)
    except StoreError:
        return None
    except FileNotFoundError:
        return None  # a plan against a store that does not exist yet


def _image_present(store: Store, hexd: str, size: int) -> bool:
    """Would :meth:`Store.write_image` leave the image as it is?  (Reads only.)"""
    path = store.image_path(hexd)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise StoreError("images/%s is not a regular file: run 'fsck --repair'" % hexd)
    return st.st_size == size and fsverity_digest.digest_file(path).hex() == hexd


def _load_source(store: Store, source: PathLike, result: AddResult, *, use_epoch: bool, skip_devices: bool,
                 skip_xattrs: bool, user_xattrs: bool, hardlinks: bool, threads: Optional[int],
                 use_cache: bool, stdin: Any, plan: Optional[_Plan] = None,
                 known: Optional[Set[str]] = None) -> Tuple[str, Node, Optional[bytes]]:
    src = os.fsencode(source)
    if src == b"-":
        from .dump import parse_dump

        if stdin is None:
            stdin = sys.stdin.buffer
        root = parse_dump(stdin)
        apply_source_options(root, use_epoch=use_epoch, skip_devices=skip_devices,
                             skip_xattrs=skip_xattrs, user_xattrs=user_xattrs)
        return "dump", root, None
    try:
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(src)
            if stat.S_ISDIR(st.st_mode):
                raise StoreError("%s is a symbolic link to a directory: give the directory itself"
                                 % os.fsdecode(src))
    except FileNotFoundError:
        raise StoreError("%s: no such file or directory" % os.fsdecode(src)) from None
    if stat.S_ISDIR(st.st_mode):
        from .store_add import tree_from_directory

        root = tree_from_directory(store, src, result, use_epoch=use_epoch, skip_devices=skip_devices,
                                   skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                                   threads=threads, use_cache=use_cache, plan=plan, known=known)
        return "directory", root, None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError("%s is neither a directory, a dump file nor an image" % os.fsdecode(src))
    with open(src, "rb") as f:
        data = f.read()
    if is_composefs_image(data[:4]):
        from .erofs_reader import read_image

        try:
            root = read_image(data)
        except ImageError as exc:
            raise StoreError("%s: invalid composefs image: %s" % (os.fsdecode(src), exc)) from None
        if use_epoch or skip_devices or skip_xattrs or user_xattrs:
            raise StoreError("source filters (epoch, devices, xattrs) cannot apply to an existing image, "
                             "which is stored as it is")
        return "image", root, data
    from .dump import parse_dump

    try:
        root = parse_dump(io.BytesIO(data))
    except DumpParseError as exc:
        what = "is neither a composefs image nor a composefs-dump file" if exc.lineno <= 1 else "is not a valid dump"
        raise StoreError("%s %s (%s)" % (os.fsdecode(src), what, exc)) from None
    apply_source_options(root, use_epoch=use_epoch, skip_devices=skip_devices,
                         skip_xattrs=skip_xattrs, user_xattrs=user_xattrs)
    return "dump", root, None


def _ensure_objects(store: Store, needed: ImageObjects, kind: str, objects_from: Optional[PathLike],
                    result: AddResult, known: Set[str], dry_run: bool = False, published: bool = False) -> None:
    """Every object the image needs is present; import from ``objects_from`` if given.

    ``known``: objects this run has already found present or stored (or, in
    a dry run, planned to store); the shared lock keeps them there.
    ``dry_run``: objects found in ``objects_from`` are verified and counted,
    not stored.  ``published``: the ref already names this image.
    """
    missing = [h for h, size in sorted(needed.objects.items())
               if h not in known and not store.object_state(h, size)]
    if missing and objects_from is not None:
        base = os.fsencode(objects_from)
        still = []
        for hexd in missing:
            path = os.path.join(base, object_relpath(hexd))
            try:
                fd = os.open(path, _SRC_FLAGS)
            except FileNotFoundError:
                still.append(hexd)
                continue
            try:
                hasher = fsverity_digest.hash_fd(fd)
                if hasher.digest().hex() != hexd or hasher.size != needed.objects[hexd]:
                    raise StoreError("%s does not hold the content its name says (digest %s, %d bytes)"
                                     % (os.fsdecode(path), hasher.digest().hex(), hasher.size))
                if dry_run or store_object(fd, bytes.fromhex(hexd), store.objects_dir, size=hasher.size,
                                           sync_dir=False):
                    result.objects_written += 1
                    result.bytes_written += hasher.size
            finally:
                os.close(fd)
        missing = still
    if missing:
        where = " or in %s" % os.fsdecode(os.fsencode(objects_from)) if objects_from is not None else ""
        raise StoreError("the %s refers to %d object(s) not in the store%s, e.g. %s; add its files with "
                         "--objects-from DIR (a digest store)" % (kind, len(missing), where, missing[0]))
    if dry_run:
        return
    if published and result.objects_written == 0:
        # The add that published the ref made these names durable first, and
        # nothing removes an object a ref needs: no syncfs on a no-change run
        # (on a busy filesystem it would flush everyone's dirty data).
        return
    # Objects found present may come from a writer that crashed before
    # syncing their directory: make every name the image relies on durable.
    sync_object_dirs(store.objects_dir, [bytes.fromhex(h) for h in needed.objects])


def tree_from_directory(store: Store, src: bytes, result: AddResult, *, use_epoch: bool,
                        skip_devices: bool, skip_xattrs: bool, user_xattrs: bool, hardlinks: bool,
                        threads: Optional[int], use_cache: bool, plan: Optional[_Plan] = None,
                        known: Optional[Set[str]] = None) -> Node:
    """The tree of ``src`` with every external file's digest; new objects stored.

    With a ``plan`` nothing is stored: new objects are listed in it, and the
    digest cache (with what was learnt) is left there, unsaved.  ``known``
    collects the objects found present or stored (or planned).
    """
    if known is None:
        known = set()
    if threads is None:
        threads = cpu_count()
    root = build_tree_from_directory(src, use_epoch=use_epoch, skip_devices=skip_devices,
                                     skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                                     compute_digest=False, threads=threads)
    cache = DigestCache(store.cache_file(b"digests")) if use_cache else None
    base = src.rstrip(b"/") or b"/"
    todo: List[Tuple[Node, bytes, os.stat_result]] = []
    # Within one run, one inode is hashed once however many names it has.
    by_inode: Dict[Tuple[int, int], List[Node]] = {}
    for path, node in root.walk():
        if node.link_to is not None or not node.is_reg() or node.content is not None:
            continue
        if node.size <= RECOMMENDED_INLINE_CONTENT_MAX:
            continue  # empty
        full = base + path if base != b"/" else path
        st = os.lstat(full)
        if (not stat.S_ISREG(st.st_mode) or st.st_size != node.size
                or (not use_epoch and st.st_mtime_ns != node.mtime_sec * 1000000000 + node.mtime_nsec)):
            raise _changed(full)
        ident = (st.st_dev, st.st_ino)
        if ident in by_inode:
            by_inode[ident].append(node)
            continue
        by_inode[ident] = [node]
        if cache is not None:
            digest = cache.get(st)
            if digest is not None:
                payload = digest_to_path(digest)
                if _object_present(store, payload, node.size):
                    known.add(digest.hex())
                    node.digest = digest
                    node.payload = payload
                    result.cache_hits += 1
                    continue
        todo.append((node, full, st))
    _hash_and_store(store, todo, cache, threads, result, plan, known)
    for nodes in by_inode.values():
        for other in nodes[1:]:
            other.digest = nodes[0].digest
            other.payload = nodes[0].payload
    if plan is not None:
        plan.cache = cache
    else:
        _save_cache(cache)
    return root


def _object_present(store: Store, payload: bytes, size: int) -> bool:
    """:meth:`Store.object_state` for a well-formed ``XX/YYYY...`` name, without validating it again.

    Runs once per file of every add, unchanged ones included; the name comes
    from a 32-byte digest, so the hex check of object_state only costs time.
    """
    try:
        st = os.lstat(store.objects_dir + b"/" + payload)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(st.st_mode) and st.st_size == size:
        return True
    return store.object_state((payload[:2] + payload[3:]).decode("ascii"), size)  # raises, saying what is wrong


def _save_cache(cache: Optional[DigestCache]) -> None:
    if cache is not None:
        try:
            cache.save()
        except OSError:
            pass  # only a performance aid


# Below this much data to hash, starting worker processes costs more than it saves.
_PROCESS_MIN_BYTES = 32 << 20

HashJob = Tuple[bytes, Tuple[int, int, int, int]]
HashResult = Tuple[bytes, Key, int]


def _hash_one(job: HashJob) -> HashResult:
    """(digest, fstat key, time hashing started) of a file that must match ``job``'s identity."""
    path, expect = job
    fd = os.open(path, _OPEN_FLAGS)
    try:
        before = os.fstat(fd)
        if key_of(before)[:4] != expect:
            raise _changed(path)
        started = time.time_ns()
        hasher = fsverity_digest.hash_fd(fd)
        after = os.fstat(fd)
        if hasher.size != expect[2] or key_of(after) != key_of(before):
            raise _changed(path)
        return hasher.digest(), key_of(after), started
    finally:
        os.close(fd)


def _hash_all(jobs: List[HashJob], total: int, threads: int) -> Iterator[HashResult]:
    """Digests of ``jobs`` in order; in worker processes when it pays.

    Processes, not threads: hashing 4 KiB blocks holds the GIL between
    blocks, and the copy threads would then slow the hashing down.
    """
    if threads >= 2 and len(jobs) >= 2 and total >= _PROCESS_MIN_BYTES:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            pool = ProcessPoolExecutor(max_workers=threads, mp_context=multiprocessing.get_context("fork"))
        except (ValueError, OSError, ImportError, NotImplementedError):
            pool = None
        if pool is not None:
            with pool:
                # map() submits everything now: the workers are forked before
                # any copy thread exists.
                try:
                    results = pool.map(_hash_one, jobs)
                    yield from results
                    return
                except BrokenProcessPool:
                    pass  # a worker died (OOM killer, sandbox): hash here instead
    for job in jobs:
        yield _hash_one(job)


class _Copier:
    """Copies new objects in worker threads, staged in one :class:`.objects.ObjectBatch`.

    The objects become durable and visible together on :meth:`finish` (one
    syncfs instead of an fsync each); :meth:`abort` discards them all, so a
    file that changed while being copied can never leave an object whose
    content differs from its name.
    """

    def __init__(self, store: Store, threads: int, result: AddResult) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.pending: Dict["Future[bool]", Tuple[int, int]] = {}  # (source fd, size)
        self.window = 4 * threads
        self.batch = ObjectBatch(store.objects_dir)
        self.result = result

    def submit(self, digest: bytes, size: int, key: Key, path: bytes) -> None:
        """Copy ``path``, whose fstat key was ``key`` when it was hashed."""
        fd = os.open(path, _OPEN_FLAGS)
        try:
            if key_of(os.fstat(fd)) != key:
                raise _changed(path)
            fut = self.pool.submit(self._copy, fd, digest, size, key, path)
        except BaseException:
            os.close(fd)
            raise
        self.pending[fut] = (fd, size)
        if len(self.pending) >= self.window:
            self._reap(FIRST_COMPLETED)

    def _copy(self, fd: int, digest: bytes, size: int, key: Key, path: bytes) -> bool:
        try:
            written = self.batch.add(fd, digest, size=size)
            if key_of(os.fstat(fd)) != key:
                raise _changed(path)
            return written
        finally:
            os.close(fd)

    def _reap(self, how: str) -> None:
        done, _not_done = wait(list(self.pending), return_when=how)
        for fut in done:
            _fd, size = self.pending.pop(fut)
            if fut.result():
                self.result.objects_written += 1
                self.result.bytes_written += size

    def finish(self) -> None:
        if self.pending:
            self._reap(ALL_COMPLETED)
        self.batch.commit()
        self.pool.shutdown(wait=True)

    def abort(self) -> None:
        # Queued copies are cancelled (their fds closed here), running ones
        # finish (their fds are theirs to close); then all they staged goes.
        for fut, (fd, _size) in list(self.pending.items()):
            if fut.cancel():
                os.close(fd)
        self.pending.clear()
        self.pool.shutdown(wait=True)
        self.batch.abort()


def _hash_and_store(store: Store, todo: List[Tuple[Node, bytes, os.stat_result]],
                    cache: Optional[DigestCache], threads: int, result: AddResult,
                    plan: Optional[_Plan] = None, known: Optional[Set[str]] = None) -> None:
    """Hash ``todo``; copy new objects meanwhile, or (``plan``) only list them.

    Adds every object found present, copied or planned to ``known``.
    """
    if known is None:
        known = set()
    jobs = [(full, key_of(st)[:4]) for _node, full, st in todo]
    digests = _hash_all(jobs, sum(st.st_size for _n, _f, st in todo), threads)
    copier = _Copier(store, threads, result) if plan is None else None
    try:
        for (node, full, st), (digest, key, started) in zip(todo, digests):
            result.files_hashed += 1
            result.bytes_hashed += node.size
            node.digest = digest
            node.payload = digest_to_path(digest)
            if cache is not None:
                cache.put(key, digest, started)
            hexd = digest.hex()
            if hexd in known:
                continue
            known.add(hexd)
            if store.object_state(hexd, node.size):
                continue
            if copier is not None:
                copier.submit(digest, node.size, key, full)
            elif plan is not None:
                plan.copies.append((digest, full, node.size, key))
        if copier is not None:
            copier.finish()
    except BaseException:
        if copier is not None:
            copier.abort()
        raise
    finally:
        close = getattr(digests, "close", None)
        if close is not None:
            close()


def _store_planned(store: Store, plan: _Plan, threads: int, result: AddResult) -> None:
    """Copy the objects ``plan`` lists (their files checked unchanged since hashing), save its cache."""
    copier = _Copier(store, threads, result)
    try:
        for digest, path, size, key in plan.copies:
            copier.submit(digest, size, key, path)
        copier.finish()
    except BaseException:
        copier.abort()
        raise
    _save_cache(plan.cache)
