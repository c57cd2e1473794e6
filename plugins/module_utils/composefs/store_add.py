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
builds from the same directory.  Hashing follows the one worker-pool policy
of :mod:`.hash_pool`; objects are published through one
:class:`.objects.ObjectBatch` per add, relative to ``objects/`` opened once
without following links (new ``XX`` directories get its mode).  Source
files, and objects taken from ``objects_from``, are opened only if they are
regular files, never blocking: a FIFO or device there is refused.

An object whose size differs from what the source says is damage only if
its content no longer matches its name; if it does match, the message says
the source (a dump, say) gives the wrong size.

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

import os
import stat
import sys
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from . import fsverity_digest
from .errors import DumpParseError, FormatError, ImageError, StoreError
from .hash_pool import cpu_count, hash_map
from .object_copier import ObjectCopier
from .objects import ObjectBatch, ObjectDir, same_file
from .safe_dirs import READ_FLAGS, UnsafePathError, file_kind, open_regular
from .scan import build_tree_from_directory
from .image_needs import ImageObjects, image_objects, is_composefs_image
from .store import IMAGES, OBJECTS, PathLike, Store
from .store_names import check_digest_hex, split_ref_name
from .store_cache import DigestCache, Key, key_of
from .store_image_memo import ImageMemo
from .store_image_memo import memo_key as image_memo_key
from .tree import RECOMMENDED_INLINE_CONTENT_MAX, Node, apply_source_options, digest_to_path


def _changed(path: bytes) -> FormatError:
    return FormatError("%s changed while it was being added; try again" % os.fsdecode(path))


class AddResult:
    def __init__(self) -> None:
        self.digest = ""
        self.ref = ""
        self.previous: Optional[str] = None
        self.source_kind = ""
        self.image_written = False
        self.objects = 0
        self.objects_written = 0
        self.bytes_written = 0
        self.files_hashed = 0
        self.bytes_hashed = 0
        self.cache_hits = 0
        #: For an OCI source: the manifest and config digests, and the number of layers.
        self.oci_manifest: Optional[str] = None
        self.oci_config: Optional[str] = None
        self.oci_layers = 0

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


class DigestMismatch(StoreError):
    """The image's digest is not the expected one; nothing was published."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__("the image's digest is %s, not the expected %s: nothing was stored" % (actual, expected))
        self.expected = expected
        self.actual = actual


class _Plan:
    """Objects a directory source needs that are not in the store yet, found but not copied."""

    def __init__(self, dry_run: bool = False) -> None:
        self.copies: List[Tuple[bytes, bytes, int, Key]] = []  # (digest, source path, size, fstat key)
        self.cache: Optional[DigestCache] = None
        self.dry_run = dry_run


def add_image(store: Store, source: PathLike, ref: str, *, use_epoch: bool = False, skip_devices: bool = False,
              skip_xattrs: bool = False, user_xattrs: bool = False, hardlinks: bool = False,
              threads: Optional[int] = None, use_cache: bool = True,
              objects_from: Optional[PathLike] = None, min_version: int = 0, max_version: int = 1,
              stdin: Any = None, dry_run: bool = False, expected_digest: Optional[str] = None,
              platform: Optional[str] = None) -> AddResult:
    """Build (or take) an image from ``source``, store it and its objects, point ``ref`` at it.

    ``dry_run``: write nothing, return what an add would do (module docstring).
    ``expected_digest``: raise :class:`DigestMismatch` before publishing
    anything if the image's digest differs.  ``source`` may also name an OCI
    image (``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``,
    ``docker-archive:FILE[:TAG]``; :mod:`.oci_import`), ``platform`` choosing
    among a multi-platform image's (default: this machine's).
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
    plan = _Plan(dry_run) if dry_run or expected is not None else None
    # Objects this run has seen present (or is copying): checked once, not again.
    known: Set[str] = set()
    # The store's objects/ (opened once, owner-checked); new XX directories get its mode.
    batch = ObjectBatch(store.objects_dir, mode=None, follow=False, opener=lambda: store.dir_fd(OBJECTS))
    try:
        with (store.lock.shared_read_only() if dry_run else store.lock.shared()):
            kind, root, data = _load_source(store, batch, source, result, use_epoch=use_epoch, skip_devices=skip_devices,
                                            skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                                            threads=threads, use_cache=use_cache, stdin=stdin, plan=plan,
                                            known=known, platform=platform)
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
            if kind == "oci" and not dry_run:
                batch.commit(close=False)  # every layer passed its checks and the image is wanted: publish
            if dry_run:
                copies = plan.copies if plan is not None else []
                if kind != "oci":  # an OCI source counted its new objects while it was read
                    result.objects_written = len(copies)
                    result.bytes_written = sum(size for _d, _p, size, _k in copies)
                _ensure_objects(store, batch, needed, kind, objects_from, result, known, dry_run=True)
                result.image_written = not (image_present or _image_present(store, result.digest, len(data)))
                result.previous = store.read_ref_or_none(ref)
                return result
            result.previous = store.read_ref_or_none(ref)
            if plan is not None:
                _store_planned(batch, plan, threads, result)
            _ensure_objects(store, batch, needed, kind, objects_from, result, known,
                            published=result.previous == result.digest)
            if not image_present:
                _same, result.image_written = store.write_image(data)
                if memo is not None and memo_key is not None:
                    memo.put(memo_key, result.digest, len(data))
                    try:
                        memo.save(memo_key)
                    except OSError:
                        pass  # only a performance aid
            if kind == "oci":
                from .oci_import import record_origin

                record_origin(store, result.digest, result, os.fsdecode(source))
            # An unchanged ref is left alone: rewriting it would only cost a
            # write and two fsyncs on every no-change run.
            if result.previous != result.digest:
                store.write_ref(ref, result.digest)
    finally:
        batch.abort()  # after a commit: only closes the directories
    return result


def _image_present(store: Store, hexd: str, size: int) -> bool:
    """Would :meth:`Store.write_image` leave the image as it is?  (Reads only.)"""
    shown = "images/%s" % check_digest_hex(hexd)
    try:
        dir_fd = store.dir_fd(IMAGES)
    except FileNotFoundError:
        return False  # a plan against a store that does not exist yet
    try:
        return bool(same_file(dir_fd, hexd.encode("ascii"), size, bytes.fromhex(hexd), shown))
    except UnsafePathError:
        raise StoreError("%s is not a regular file: run 'fsck --repair'" % shown) from None


def _present(objdir: ObjectDir, hexd: str, size: Optional[int], source: str) -> bool:
    """Is the object ``hexd`` (of ``size`` bytes, as ``source`` says) in the store?  False if missing.

    A present but wrong entry is an error saying who is wrong: not a regular
    file (or an ``XX`` that is no directory) is damage; another size is
    damage only if the object's content does not match its name; if it
    does, the object is fine and ``source`` (a dump, say) gives a wrong size.
    """
    digest = bytes.fromhex(hexd)
    try:
        st = objdir.lstat(digest)
    except UnsafePathError as exc:
        raise StoreError("%s: the store is damaged, run 'fsck --repair'" % exc) from None
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise StoreError("object %s is not a regular file (%s): run 'fsck --repair'" % (hexd, file_kind(st.st_mode)))
    if size is None or st.st_size == size:
        return True
    try:
        fd = objdir.open_object(digest)
        try:
            intact = fsverity_digest.digest_fd(fd) == digest
        finally:
            os.close(fd)
    except (OSError, UnsafePathError):
        intact = False
    if intact:
        raise StoreError("the %s gives object %s a size of %d bytes, but the stored object has %d bytes and its "
                         "content matches its digest (the object is fine): the %s's size is wrong"
                         % (source, hexd, size, st.st_size, source))
    raise StoreError("object %s has %d bytes, the %s needs %d, and its content does not match its digest: "
                     "it is damaged, run 'fsck --repair'" % (hexd, st.st_size, source, size))


def _load_source(store: Store, batch: ObjectBatch, source: PathLike, result: AddResult, *, use_epoch: bool, skip_devices: bool,
                 skip_xattrs: bool, user_xattrs: bool, hardlinks: bool, threads: Optional[int],
                 use_cache: bool, stdin: Any, plan: Optional[_Plan] = None,
                 known: Optional[Set[str]] = None, platform: Optional[str] = None) -> Tuple[str, Node, Optional[bytes]]:
    from .oci_source import is_oci_source

    if is_oci_source(source):
        from .oci_import import tree_from_oci

        # A dry run reads and checks everything but stages nothing; otherwise the new objects are
        # staged now and published by add_image once the image's digest is known to be wanted.
        root = tree_from_oci(str(source), batch, result, platform=platform, stage=plan is None or not plan.dry_run,
                             known=known)
        apply_source_options(root, use_epoch=use_epoch, skip_devices=skip_devices,
                             skip_xattrs=skip_xattrs, user_xattrs=user_xattrs)
        return "oci", root, None
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
        root = tree_from_directory(store, src, result, batch=batch, use_epoch=use_epoch, skip_devices=skip_devices,
                                   skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                                   threads=threads, use_cache=use_cache, plan=plan, known=known)
        return "directory", root, None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError("%s is neither a directory, a dump file nor an image" % os.fsdecode(src))
    # The path is the caller's (a symbolic link to the file is fine), but a
    # FIFO or device swapped in since the stat must not block the read.
    try:
        fd = open_regular(src, flags=READ_FLAGS & ~os.O_NOFOLLOW)
    except UnsafePathError as exc:
        raise StoreError("%s: neither a directory, a dump file nor an image" % exc) from None
    with os.fdopen(fd, "rb") as f:
        if is_composefs_image(f.peek(4)[:4]):
            # An image is stored as it is: its bytes are needed whole.
            data = f.read()
        else:
            # A dump is parsed as it streams in: memory follows the tree, not the file.
            data = None
            from .dump import parse_dump

            try:
                root = parse_dump(f)
            except DumpParseError as exc:
                what = ("is neither a composefs image nor a composefs-dump file" if exc.lineno <= 1
                        else "is not a valid dump")
                raise StoreError("%s %s (%s)" % (os.fsdecode(src), what, exc)) from None
    if data is not None:
        from .erofs_reader import read_image

        try:
            root = read_image(data)
        except ImageError as exc:
            raise StoreError("%s: invalid composefs image: %s" % (os.fsdecode(src), exc)) from None
        if use_epoch or skip_devices or skip_xattrs or user_xattrs:
            raise StoreError("source filters (epoch, devices, xattrs) cannot apply to an existing image, "
                             "which is stored as it is")
        return "image", root, data
    apply_source_options(root, use_epoch=use_epoch, skip_devices=skip_devices,
                         skip_xattrs=skip_xattrs, user_xattrs=user_xattrs)
    return "dump", root, None


def _ensure_objects(store: Store, batch: ObjectBatch, needed: ImageObjects, kind: str,
                    objects_from: Optional[PathLike], result: AddResult, known: Set[str], dry_run: bool = False,
                    published: bool = False) -> None:
    """Every object the image needs is present; import from ``objects_from`` if given.

    ``known``: objects this run has already found present or stored (or, in
    a dry run, planned to store); the shared lock keeps them there.
    ``dry_run``: objects found in ``objects_from`` are verified and counted,
    not stored.  ``published``: the ref already names this image.
    """
    missing = [h for h, size in sorted(needed.objects.items())
               if h not in known and not _present(batch.dir, h, size, kind)]
    if missing and objects_from is not None:
        missing = _import_objects(batch, missing, needed, objects_from, result, dry_run)
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
    batch.dir.sync([bytes.fromhex(h) for h in needed.objects])


def _import_objects(batch: ObjectBatch, missing: List[str], needed: ImageObjects, objects_from: PathLike,
                    result: AddResult, dry_run: bool) -> List[str]:
    """Copy ``missing`` objects found in the digest store ``objects_from``, each verified; the rest.

    ``objects_from`` itself is the caller's and is followed; inside it, an
    ``XX`` must be a directory and an object a regular file (opened without
    blocking: a FIFO or ``/dev/zero`` planted there is refused, never read).
    """
    still = []
    with ObjectDir(objects_from, create=False) as source:
        for hexd in missing:
            shown = source.shown(digest_to_path(bytes.fromhex(hexd)))
            try:
                fd = source.open_object(bytes.fromhex(hexd))
            except FileNotFoundError:
                still.append(hexd)
                continue
            except UnsafePathError as exc:
                raise StoreError("%s (looking for object %s in --objects-from)" % (exc, hexd)) from None
            try:
                hasher = fsverity_digest.hash_fd(fd)
                if hasher.digest().hex() != hexd or hasher.size != needed.objects[hexd]:
                    raise StoreError("%s does not hold the content its name says (digest %s, %d bytes)"
                                     % (shown, hasher.digest().hex(), hasher.size))
                if dry_run or batch.add(fd, bytes.fromhex(hexd), size=hasher.size):
                    result.objects_written += 1
                    result.bytes_written += hasher.size
            finally:
                os.close(fd)
    if not dry_run:
        batch.commit()
    return still


def tree_from_directory(store: Store, src: bytes, result: AddResult, *, batch: ObjectBatch, use_epoch: bool,
                        skip_devices: bool, skip_xattrs: bool, user_xattrs: bool, hardlinks: bool,
                        threads: Optional[int], use_cache: bool, plan: Optional[_Plan] = None,
                        known: Optional[Set[str]] = None) -> Node:
    """The tree of ``src`` with every external file's digest; new objects stored.

    With a ``plan`` nothing is stored: new objects are listed in it, and the
    digest cache (with what was learnt) is left there, unsaved.  ``known``
    collects the objects found present or stored (or planned).  New objects
    go through ``batch`` (committed here).
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
            if digest is not None and _present(batch.dir, digest.hex(), node.size, "directory"):
                known.add(digest.hex())
                node.digest = digest
                node.payload = digest_to_path(digest)
                result.cache_hits += 1
                continue
        todo.append((node, full, st))
    _hash_and_store(batch, todo, cache, threads, result, plan, known)
    for nodes in by_inode.values():
        for other in nodes[1:]:
            other.digest = nodes[0].digest
            other.payload = nodes[0].payload
    if plan is not None:
        plan.cache = cache
    else:
        _save_cache(cache)
    return root


def _save_cache(cache: Optional[DigestCache]) -> None:
    if cache is not None:
        try:
            cache.save()
        except OSError:
            pass  # only a performance aid


HashJob = Tuple[bytes, Tuple[int, int, int, int]]
HashResult = Tuple[bytes, Key, int]


def _open_source(path: bytes) -> int:
    """A source file to read: regular, never through a final symlink, never blocking."""
    try:
        return open_regular(path)
    except UnsafePathError:
        raise _changed(path) from None  # it was a regular file when scanned


def _hash_one(job: HashJob) -> HashResult:
    """(digest, fstat key, time hashing started) of a file that must match ``job``'s identity."""
    path, expect = job
    fd = _open_source(path)
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


def _copy_unchanged(copier: ObjectCopier, digest: bytes, size: int, key: Key, path: bytes) -> None:
    """Copy ``path``, whose fstat key was ``key`` when it was hashed, as the object ``digest``.

    The key is checked again once the copy is staged: a file changed
    meanwhile fails the add (and the batch is discarded), never leaving an
    object whose content differs from its name.
    """
    fd = _open_source(path)
    try:
        if key_of(os.fstat(fd)) != key:
            raise _changed(path)
    except BaseException:
        os.close(fd)
        raise

    def unchanged(copied: int) -> None:
        if key_of(os.fstat(copied)) != key:
            raise _changed(path)

    copier.submit(fd, digest, size, after=unchanged)


def _hash_and_store(batch: ObjectBatch, todo: List[Tuple[Node, bytes, os.stat_result]],
                    cache: Optional[DigestCache], threads: int, result: AddResult,
                    plan: Optional[_Plan] = None, known: Optional[Set[str]] = None) -> None:
    """Hash ``todo`` (:mod:`.hash_pool`); copy new objects meanwhile, or (``plan``) only list them.

    Adds every object found present, copied or planned to ``known``.
    """
    if known is None:
        known = set()
    jobs = [(full, key_of(st)[:4]) for _node, full, st in todo]
    # Worker processes (if any) are forked here, before any copy thread exists.
    digests = hash_map(_hash_one, jobs, sum(st.st_size for _n, _f, st in todo), threads)
    copier = ObjectCopier(batch, threads) if plan is None else None
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
            if _present(batch.dir, hexd, node.size, "directory"):
                continue
            if copier is not None:
                _copy_unchanged(copier, digest, node.size, key, full)
            elif plan is not None:
                plan.copies.append((digest, full, node.size, key))
        if copier is not None:
            copier.finish()
            result.objects_written += copier.objects_written
            result.bytes_written += copier.bytes_written
    except BaseException:
        if copier is not None:
            copier.abort()
        raise
    finally:
        close = getattr(digests, "close", None)
        if close is not None:
            close()


def _store_planned(batch: ObjectBatch, plan: _Plan, threads: int, result: AddResult) -> None:
    """Copy the objects ``plan`` lists (their files checked unchanged since hashing), save its cache."""
    copier = ObjectCopier(batch, threads)
    try:
        for digest, path, size, key in plan.copies:
            _copy_unchanged(copier, digest, size, key, path)
        copier.finish()
    except BaseException:
        copier.abort()
        raise
    result.objects_written += copier.objects_written
    result.bytes_written += copier.bytes_written
    _save_cache(plan.cache)
