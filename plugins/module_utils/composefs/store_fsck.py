# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Consistency check of the object store.

Checked: every object's fs-verity digest equals its name (measured by the
kernel when the object has fs-verity, computed otherwise), every entry under
``objects/`` and ``images/`` has a valid name and is a regular file, every
image's digest equals its name and it parses, every object an image needs is
present with the right size, and every ref names a present image.

``.tmp*`` files are crash debris, not damage: reported, removed by gc.

With ``repair``, damaged objects and images (wrong content, not a regular
file, invalid name) are moved into ``STORE/damaged/`` under the exclusive
lock after checking again that they are still the same damaged file; images
that then miss objects, and refs to missing images, are reported: they need
their source added again.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any, Dict, List, Optional, Tuple

from . import fsverity_ioctl
from .atomic_file import fsync_dir
from .errors import ComposefsError, VerityError
from .store import (DIGEST_SIZE, Store, StoreError, is_hex_name, split_ref_name)

# Above this many bytes of objects, hash in worker processes.
_PARALLEL_MIN_BYTES = 64 << 20


class FsckResult:
    def __init__(self) -> None:
        self.objects = 0
        self.object_bytes = 0
        self.images = 0
        self.refs = 0
        self.verity_measured = 0
        self.errors: List[str] = []
        self.notes: List[str] = []
        # Paths (bytes) of damaged entries, with their identity when found.
        self.damaged: List[Tuple[bytes, Tuple[int, int, int, int]]] = []
        self.moved: List[str] = []

    @property
    def clean(self) -> bool:
        return not self.errors

    def as_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "damaged"}
        out["damaged"] = [os.fsdecode(p) for p, _identity in self.damaged]
        out["clean"] = self.clean
        return out


def _ident(st: os.stat_result) -> Tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_digest(path: bytes) -> Tuple[str, bool, os.stat_result]:
    """(hex digest, measured by the kernel, fstat) of a regular file, never following symlinks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        digest, measured = fsverity_ioctl.digest_measured_or_computed(fd, st)
        return digest.hex(), measured, st
    except VerityError as exc:
        # The kernel failed to answer for this file: callers report it as unreadable.
        raise OSError(errno.EIO, str(exc)) from exc
    finally:
        os.close(fd)


def _digest_job(path: bytes) -> Tuple[Optional[str], bool, str]:
    try:
        hexd, measured, _st = file_digest(path)
        return hexd, measured, ""
    except OSError as exc:
        return None, False, exc.strerror or str(exc)


def _digests(paths: List[bytes], total_bytes: int, threads: int) -> List[Tuple[Optional[str], bool, str]]:
    if threads > 1 and len(paths) > 1 and total_bytes >= _PARALLEL_MIN_BYTES:
        try:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=threads, mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_digest_job, paths, chunksize=16))
        except (OSError, ValueError, ImportError):
            pass
    return [_digest_job(p) for p in paths]


def check(store: Store, *, repair: bool = False, threads: Optional[int] = None) -> FsckResult:
    result = FsckResult()
    if threads is None:
        threads = os.cpu_count() or 1
    if repair:
        with store.lock.collector():
            with store.lock.shared():
                _scan(store, result, threads)
            if result.damaged:
                with store.lock.exclusive():
                    _move_aside(store, result)
                # What the moves broke (images now missing objects) is reported too.
                again = FsckResult()
                with store.lock.shared():
                    _scan(store, again, threads)
                result.errors.extend(e for e in again.errors if e not in result.errors)
    else:
        with store.lock.shared():
            _scan(store, result, threads)
    return result


def _scan(store: Store, result: FsckResult, threads: int) -> None:
    try:
        store.check()
    except StoreError as exc:
        result.errors.append(str(exc))
        return
    present = _check_objects(store, result, threads)
    examined = _check_images(store, result, present)
    _check_refs(store, result, examined, present)


def _damage(result: FsckResult, path: bytes, message: str) -> None:
    result.errors.append(message)
    try:
        result.damaged.append((path, _ident(os.lstat(path))))
    except FileNotFoundError:
        pass


def _check_objects(store: Store, result: FsckResult, threads: int) -> Dict[str, int]:
    """Verify every object; returns {hex: size} of the good ones."""
    good: Dict[str, int] = {}
    todo: List[Tuple[str, bytes, int]] = []
    for name in sorted(_listdir(store.objects_dir)):
        full = os.path.join(store.objects_dir, name)
        st = _lstat(full)
        if st is None:
            continue
        if name.startswith(b".tmp"):
            result.notes.append("temporary file %s (crash debris; gc removes it)" % os.fsdecode(full))
            continue
        if not (is_hex_name(name, 2) and stat.S_ISDIR(st.st_mode)):
            _damage(result, full, "objects/%s: not an object directory XX" % os.fsdecode(name))
            continue
        for sub in sorted(_listdir(full)):
            path = os.path.join(full, sub)
            sst = _lstat(path)
            if sst is None:
                continue
            shown = "objects/%s/%s" % (os.fsdecode(name), os.fsdecode(sub))
            if not is_hex_name(sub, 2 * DIGEST_SIZE - 2):
                if sub.startswith(b".tmp"):
                    result.notes.append("temporary file %s" % shown)
                else:
                    _damage(result, path, "%s: invalid object name" % shown)
                continue
            if not stat.S_ISREG(sst.st_mode):
                _damage(result, path, "%s: not a regular file (mode %o)" % (shown, sst.st_mode))
                continue
            todo.append(((name + sub).decode("ascii"), path, sst.st_size))
    digests = _digests([p for _hexd, p, _size in todo], sum(s for _hexd, _path, s in todo), threads)
    for (hexd, path, size), (got, measured, err) in zip(todo, digests):
        shown = "objects/%s/%s" % (hexd[:2], hexd[2:])
        if got is None:
            if err and "No such file" in err:
                continue
            _damage(result, path, "%s: cannot read: %s" % (shown, err))
            continue
        result.objects += 1
        result.object_bytes += size
        if measured:
            result.verity_measured += 1
        if got != hexd:
            _damage(result, path, "%s: content has digest %s (%s): damaged"
                    % (shown, got, "measured by fs-verity" if measured else "computed"))
            continue
        good[hexd] = size
    return good


def _check_images(store: Store, result: FsckResult, present: Dict[str, int]) -> Dict[str, bool]:
    """{image digest: good} of every image examined."""
    examined: Dict[str, bool] = {}
    for name in sorted(_listdir(store.images_dir)):
        full = os.path.join(store.images_dir, name)
        st = _lstat(full)
        if st is None:
            continue
        shown = "images/%s" % os.fsdecode(name)
        if name.startswith(b".tmp"):
            result.notes.append("temporary file %s (crash debris; gc removes it)" % shown)
            continue
        if not is_hex_name(name):
            _damage(result, full, "%s: invalid image name" % shown)
            continue
        hexd = name.decode("ascii")
        examined[hexd] = _check_image(store, result, hexd, present)
    return examined


def _check_image(store: Store, result: FsckResult, hexd: str, present: Dict[str, int]) -> bool:
    full = store.image_path(hexd)
    shown = "images/%s" % hexd
    st = _lstat(full)
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode):
        _damage(result, full, "%s: not a regular file" % shown)
        return False
    try:
        got, _measured, _st = file_digest(full)
    except OSError as exc:
        result.errors.append("%s: cannot read: %s" % (shown, exc.strerror or exc))
        return False
    result.images += 1
    if got != hexd:
        _damage(result, full, "%s: content has digest %s: damaged" % (shown, got))
        return False
    try:
        needed = store.image_objects(hexd)
    except (OSError, ComposefsError) as exc:
        _damage(result, full, "%s: cannot parse: %s" % (shown, exc))
        return False
    for problem in needed.problems:
        result.errors.append("%s: %s" % (shown, problem))
    missing = [h for h in needed.objects if h not in present and not _late_object(store, h, present)]
    wrong = [h for h in needed.objects if h in present and present[h] != needed.objects[h]]
    if missing:
        result.errors.append("%s: %d object(s) missing or damaged, e.g. %s"
                             % (shown, len(missing), sorted(missing)[0]))
    if wrong:
        result.errors.append("%s: %d object(s) of the wrong size, e.g. %s" % (shown, len(wrong), wrong[0]))
    return not (missing or wrong or needed.problems)


def _late_object(store: Store, hexd: str, present: Dict[str, int]) -> bool:
    """An object written by a concurrent add after the objects were listed."""
    try:
        got, _measured, st = file_digest(store.object_path(hexd))
    except OSError:
        return False
    if got != hexd or not stat.S_ISREG(st.st_mode):
        return False
    present[hexd] = st.st_size
    return True


def _check_refs(store: Store, result: FsckResult, examined: Dict[str, bool], present: Dict[str, int]) -> None:
    for dirpath, dirnames, filenames in os.walk(store.refs_dir, followlinks=False):
        rel = os.path.relpath(dirpath, store.refs_dir)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            refname = name if rel == b"." else os.path.join(rel, name)
            shown = os.fsdecode(refname)
            full = os.path.join(dirpath, name)
            if name.startswith(b".tmp-ref-"):
                result.notes.append("temporary file refs/%s (crash debris; gc removes it)" % shown)
                continue
            try:
                split_ref_name(refname)
            except StoreError as exc:
                result.errors.append("refs/%s: %s" % (shown, exc))
                continue
            if os.path.islink(full):
                result.errors.append("refs/%s: symbolic link (refused)" % shown)
                continue
            try:
                target = store.read_ref(refname)
            except StoreError as exc:
                result.errors.append(str(exc))
                continue
            result.refs += 1
            if target not in examined:
                # Added after the images were listed (a concurrent add).
                examined[target] = _check_image(store, result, target, present)
            if not examined[target]:
                state = "is damaged or misses objects" if os.path.lexists(store.image_path(target)) else "is missing"
                result.errors.append("ref %s: image %s %s" % (shown, target, state))


def _move_aside(store: Store, result: FsckResult) -> None:
    os.makedirs(store.damaged_dir, mode=0o755, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for path, ident in result.damaged:
        st = _lstat(path)
        if st is None or _ident(st) != ident:
            continue  # replaced meanwhile (a fresh copy): not ours to move
        if stat.S_ISREG(st.st_mode):
            name = os.path.basename(path)
            parent = os.path.basename(os.path.dirname(path))
            if is_hex_name(name, 2 * DIGEST_SIZE - 2) and is_hex_name(parent, 2):
                try:
                    got, _m, _st = file_digest(path)
                except OSError:
                    got = None
                if got == (parent + name).decode("ascii"):
                    continue  # healed meanwhile
        rel = os.path.relpath(path, store.path).replace(b"/", b"_")
        dest = os.path.join(store.damaged_dir, b"%s.%s.%s" % (rel, stamp.encode(), os.urandom(3).hex().encode()))
        os.rename(path, dest)
        result.moved.append("%s -> %s" % (os.fsdecode(path), os.fsdecode(dest)))
        fsync_dir(os.path.dirname(path))
    fsync_dir(store.damaged_dir)


def _listdir(path: bytes) -> List[bytes]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _lstat(path: bytes) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
