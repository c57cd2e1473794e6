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
"""

from __future__ import annotations

import io
import os
import stat
import sys
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from . import fsverity
from .errors import FormatError, ImageError
from .objects import ObjectBatch, store_object, sync_object_dirs
from .scan import build_tree_from_directory, cpu_count
from .store import (_SRC_FLAGS, AddResult, ImageObjects, PathLike, RefNotFound, Store, StoreError, image_objects,
                    is_composefs_image, object_relpath, split_ref_name)
from .store_cache import DigestCache, Key, key_of
from .tree import RECOMMENDED_INLINE_CONTENT_MAX, Node, apply_source_options, digest_to_path

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK


def _changed(path: bytes) -> FormatError:
    return FormatError("%s changed while it was being added; try again" % os.fsdecode(path))


def add_image(store: Store, source: PathLike, ref: str, *, use_epoch: bool = False, skip_devices: bool = False,
              skip_xattrs: bool = False, user_xattrs: bool = False, hardlinks: bool = False,
              threads: Optional[int] = None, use_cache: bool = True,
              objects_from: Optional[PathLike] = None, min_version: int = 0, max_version: int = 1,
              stdin: Any = None) -> AddResult:
    """Build (or take) an image from ``source``, store it and its objects, point ``ref`` at it."""
    split_ref_name(ref)
    if skip_xattrs and user_xattrs:
        raise StoreError("skip_xattrs and user_xattrs exclude each other")
    result = AddResult()
    result.ref = ref
    with store.lock.shared():
        kind, root, data = _load_source(store, source, result, use_epoch=use_epoch, skip_devices=skip_devices,
                                        skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                                        threads=threads, use_cache=use_cache, stdin=stdin)
        result.source_kind = kind
        needed = image_objects(root)
        if needed.problems:
            raise StoreError("%s: cannot be stored: %s%s" % (
                os.fsdecode(os.fsencode(source)), needed.problems[0],
                " (and %d more problems)" % (len(needed.problems) - 1) if len(needed.problems) > 1 else ""))
        result.objects = len(needed.objects)
        _ensure_objects(store, needed, kind, objects_from, result)
        if data is None:
            from .erofs_writer import build_image

            data = build_image(root, min_version=min_version, max_version=max_version)
        result.digest, result.image_written = store.write_image(data)
        try:
            result.previous = store.read_ref(ref)
        except RefNotFound:
            result.previous = None
        except StoreError:
            result.previous = None
        store.write_ref(ref, result.digest)
    return result


def _load_source(store: Store, source: PathLike, result: AddResult, *, use_epoch: bool, skip_devices: bool,
                 skip_xattrs: bool, user_xattrs: bool, hardlinks: bool, threads: Optional[int],
                 use_cache: bool, stdin: Any) -> Tuple[str, Node, Optional[bytes]]:
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
                                   threads=threads, use_cache=use_cache)
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

    root = parse_dump(io.BytesIO(data))
    apply_source_options(root, use_epoch=use_epoch, skip_devices=skip_devices,
                         skip_xattrs=skip_xattrs, user_xattrs=user_xattrs)
    return "dump", root, None


def _ensure_objects(store: Store, needed: ImageObjects, kind: str, objects_from: Optional[PathLike],
                    result: AddResult) -> None:
    """Every object the image needs is present; import from ``objects_from`` if given."""
    missing = [h for h, size in sorted(needed.objects.items()) if not store.object_state(h, size)]
    written: List[bytes] = []
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
                hasher = fsverity.hash_fd(fd)
                if hasher.digest().hex() != hexd or hasher.size != needed.objects[hexd]:
                    raise StoreError("%s does not hold the content its name says (digest %s, %d bytes)"
                                     % (os.fsdecode(path), hasher.digest().hex(), hasher.size))
                if store_object(fd, bytes.fromhex(hexd), store.objects_dir, size=hasher.size, sync_dir=False):
                    written.append(bytes.fromhex(hexd))
                    result.objects_written += 1
                    result.bytes_written += hasher.size
            finally:
                os.close(fd)
        missing = still
    if missing:
        where = " or in %s" % os.fsdecode(os.fsencode(objects_from)) if objects_from is not None else ""
        raise StoreError("the %s refers to %d object(s) not in the store%s, e.g. %s; add its files with "
                         "--objects-from DIR (a digest store)" % (kind, len(missing), where, missing[0]))
    # Objects found present may come from a writer that crashed before
    # syncing their directory: make every name the image relies on durable.
    sync_object_dirs(store.objects_dir, [bytes.fromhex(h) for h in needed.objects])


def tree_from_directory(store: Store, src: bytes, result: AddResult, *, use_epoch: bool,
                        skip_devices: bool, skip_xattrs: bool, user_xattrs: bool, hardlinks: bool,
                        threads: Optional[int], use_cache: bool) -> Node:
    if threads is None:
        threads = cpu_count()
    root = build_tree_from_directory(src, use_epoch=use_epoch, skip_devices=skip_devices,
                                     skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                                     compute_digest=False, threads=threads)
    cache = DigestCache(store.cache_path) if use_cache else None
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
            if digest is not None and store.object_state(digest.hex(), node.size):
                node.digest = digest
                node.payload = digest_to_path(digest)
                result.cache_hits += 1
                continue
        todo.append((node, full, st))
    _hash_and_store(store, todo, cache, threads, result)
    for nodes in by_inode.values():
        for other in nodes[1:]:
            other.digest = nodes[0].digest
            other.payload = nodes[0].payload
    if cache is not None:
        try:
            cache.save()
        except OSError:
            pass  # only a performance aid
    return root


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
        hasher = fsverity.hash_fd(fd)
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
                    for result in results:
                        yield result
                    return
                except BrokenProcessPool:
                    pass  # a worker died (OOM killer, sandbox): hash here instead
    for job in jobs:
        yield _hash_one(job)


def _hash_and_store(store: Store, todo: List[Tuple[Node, bytes, os.stat_result]],
                    cache: Optional[DigestCache], threads: int, result: AddResult) -> None:
    jobs = [(full, key_of(st)[:4]) for _node, full, st in todo]
    digests = _hash_all(jobs, sum(st.st_size for _n, _f, st in todo), threads)
    pool = ThreadPoolExecutor(max_workers=threads)
    pending: Dict["Future[bool]", int] = {}
    sizes: Dict["Future[bool]", int] = {}
    writing: Set[str] = set()
    window = 4 * threads
    # New objects are staged and become durable and visible together once
    # all are written (one syncfs instead of an fsync each); an error
    # discards them all, so a file that changed while being copied can never
    # leave an object whose content differs from its name.
    batch = ObjectBatch(store.objects_dir)

    def copy(fd: int, digest: bytes, size: int, key: Key, path: bytes) -> bool:
        try:
            written = batch.add(fd, digest, size=size)
            if key_of(os.fstat(fd)) != key:
                raise _changed(path)
            return written
        finally:
            os.close(fd)

    def reap(how: str) -> None:
        done, _ = wait(list(pending), return_when=how)
        for fut in done:
            del pending[fut]
            size = sizes.pop(fut)
            if fut.result():
                result.objects_written += 1
                result.bytes_written += size

    try:
        for (node, full, st), (digest, key, started) in zip(todo, digests):
            result.files_hashed += 1
            result.bytes_hashed += node.size
            node.digest = digest
            node.payload = digest_to_path(digest)
            if cache is not None:
                cache.put(key, digest, started)
            hexd = digest.hex()
            if hexd in writing or store.object_state(hexd, node.size):
                continue
            fd = os.open(full, _OPEN_FLAGS)
            try:
                if key_of(os.fstat(fd)) != key:
                    raise _changed(full)
                writing.add(hexd)
                fut = pool.submit(copy, fd, digest, node.size, key, full)
            except BaseException:
                os.close(fd)
                raise
            pending[fut] = fd
            sizes[fut] = node.size
            if len(pending) >= window:
                reap(FIRST_COMPLETED)
        if pending:
            reap(ALL_COMPLETED)
        batch.commit()
    except BaseException:
        # Queued copies are cancelled (their fds closed here), running ones
        # finish (their fds are theirs to close); then all they staged goes.
        for fut, fd in list(pending.items()):
            if fut.cancel():
                os.close(fd)
        pending.clear()
        pool.shutdown(wait=True)
        batch.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        close = getattr(digests, "close", None)
        if close is not None:
            close()
