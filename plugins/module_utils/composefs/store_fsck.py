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

``images/<digest>.sig`` (an image's fs-verity signature) must be a regular
file holding a PKCS#7 SignedData no larger than the kernel takes, and, when
the kernel holds a signature for the image, that one.

With ``repair``, damaged objects and images (wrong content, not a regular
file, invalid name) are moved into ``STORE/damaged/`` under the exclusive
lock after checking again that they are still the same damaged file; images
that then miss objects, and refs to missing images, are reported: they need
their source added again.

Everything is reached through directory descriptors opened without
following links, and only regular files are ever opened (without blocking):
a FIFO or a device planted as an object is damage, never read (``/dev/zero``
would be hashed forever), and a symbolic link where ``objects/XX`` or
``damaged/`` belongs is refused, so a repair moves nothing outside the store.
``damaged/`` is created 0700.  Digests are computed by :mod:`.hash_pool`.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any, Dict, List, Optional, Tuple

from . import fsverity_ioctl
from .errors import ComposefsError, StoreError, VerityError, VeritySignatureError
from .fsverity_sig import check_signature_der
from .hash_pool import cpu_count, hash_map
from .objects import ObjectDir
from .safe_dirs import UnsafePathError, check_owner, ensure_dir, file_kind, open_dir, open_regular
from .store import DAMAGED, IMAGES, OBJECTS, SIGNATURES, Store
from .store_image_sig import image_of_sig_name, read_image_signature, sig_name
from .store_names import is_hex_name, split_ref_name
from .tree import DIGEST_SIZE

# _digest_job's error text for a file that went away (removed by a concurrent
# gc, or healed by an add): not damage.
_GONE = "gone"


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
        #: With repair: the problems left afterwards (the moves made, some images may now miss objects).
        self.remaining: Optional[List[str]] = None

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


def file_digest(path: bytes, dir_fd: Optional[int] = None,
                shown: Optional[str] = None) -> Tuple[str, bool, os.stat_result]:
    """(hex digest, measured by the kernel, fstat) of a regular file (relative to ``dir_fd``).

    Never follows a symbolic link and never opens anything but a regular
    file (:class:`.safe_dirs.UnsafePathError`): a FIFO or ``/dev/zero``
    planted as an object must not hang the check.
    """
    fd = open_regular(path, dir_fd, shown)
    try:
        st = os.fstat(fd)
        hexd, measured = _fd_digest(fd)
        return hexd, measured, st
    finally:
        os.close(fd)


def _fd_digest(fd: int) -> Tuple[str, bool]:
    """(hex digest, measured by the kernel) of an open regular file."""
    try:
        digest, measured = fsverity_ioctl.digest_measured_or_computed(fd)
    except VerityError as exc:
        # The kernel failed to answer for this file: callers report it as unreadable.
        raise OSError(errno.EIO, str(exc)) from exc
    return digest.hex(), measured


DigestJob = Tuple[int, bytes, str]  # (directory fd, name, name for messages)


def _digest_job(job: DigestJob) -> Tuple[Optional[str], bool, str]:
    dir_fd, name, shown = job
    try:
        hexd, measured, _st = file_digest(name, dir_fd, shown)
        return hexd, measured, ""
    except FileNotFoundError:
        return None, False, _GONE
    except OSError as exc:
        return None, False, exc.strerror or str(exc)
    except UnsafePathError as exc:
        return None, False, str(exc)


def check(store: Store, *, repair: bool = False, threads: Optional[int] = None) -> FsckResult:
    result = FsckResult()
    if threads is None:
        threads = cpu_count()
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
                result.remaining = list(again.errors)
            else:
                result.remaining = list(result.errors)
    else:
        with store.lock.shared():
            _scan(store, result, threads)
    return result


class _Dirs:
    """The store's objects/ and images/ (the Store's descriptors, opened without following links)."""

    def __init__(self, store: Store) -> None:
        self.objects = ObjectDir(store.objects_dir, None, follow=False, opener=lambda: store.dir_fd(OBJECTS))
        self.images = store.dir_fd(IMAGES)

    def close(self) -> None:
        self.objects.close()


def _scan(store: Store, result: FsckResult, threads: int) -> None:
    try:
        store.check()
        dirs = _Dirs(store)
    except (StoreError, UnsafePathError) as exc:
        result.errors.append(str(exc))
        return
    try:
        present = _check_objects(store, result, threads, dirs)
        examined = _check_images(store, result, present, dirs)
        _check_refs(store, result, examined, present, dirs)
        _check_signatures(store, result)
    finally:
        dirs.close()


def _damage(result: FsckResult, path: bytes, message: str, st: Optional[os.stat_result]) -> None:
    """Report damage; ``st`` (its lstat) lets --repair move it if it is still the same file."""
    result.errors.append(message)
    if st is not None:
        result.damaged.append((path, _ident(st)))


def _check_objects(store: Store, result: FsckResult, threads: int, dirs: _Dirs) -> Dict[str, int]:
    """Verify every object; returns {hex: size} of the good ones."""
    good: Dict[str, int] = {}
    todo: List[Tuple[str, bytes, os.stat_result]] = []
    jobs: List[DigestJob] = []
    root = dirs.objects.fd
    for name in sorted(_listdir(root)):
        full = os.path.join(store.objects_dir, name)
        st = _lstat(name, root)
        if st is None:
            continue
        if name.startswith(b".tmp"):
            result.notes.append("temporary file %s (crash debris; gc removes it)" % os.fsdecode(full))
            continue
        if not (is_hex_name(name, 2) and stat.S_ISDIR(st.st_mode)):
            _damage(result, full, "objects/%s: not an object directory XX (%s)"
                    % (os.fsdecode(name), _kind(st)), st)
            continue
        try:
            sub_fd = dirs.objects.subdir(name, create=False)
        except UnsafePathError:
            _damage(result, full, "objects/%s: not an object directory XX (replaced during the check)"
                    % os.fsdecode(name), _lstat(name, root))
            continue
        if sub_fd is None:
            continue
        for sub in sorted(_listdir(sub_fd)):
            path = os.path.join(full, sub)
            sst = _lstat(sub, sub_fd)
            if sst is None:
                continue
            shown = "objects/%s/%s" % (os.fsdecode(name), os.fsdecode(sub))
            if not is_hex_name(sub, 2 * DIGEST_SIZE - 2):
                if sub.startswith(b".tmp"):
                    result.notes.append("temporary file %s" % shown)
                else:
                    _damage(result, path, "%s: invalid object name" % shown, sst)
                continue
            if not stat.S_ISREG(sst.st_mode):
                _damage(result, path, "%s: not a regular file (%s, mode %o)" % (shown, _kind(sst), sst.st_mode), sst)
                continue
            todo.append(((name + sub).decode("ascii"), path, sst))
            jobs.append((sub_fd, sub, shown))
    digests = hash_map(_digest_job, jobs, sum(st.st_size for _h, _p, st in todo), threads)
    for (hexd, path, sst), (got, measured, err) in zip(todo, digests):
        shown = "objects/%s/%s" % (hexd[:2], hexd[2:])
        if got is None:
            if err != _GONE:
                _damage(result, path, "%s: cannot read: %s" % (shown, err), sst)
            continue
        result.objects += 1
        result.object_bytes += sst.st_size
        if measured:
            result.verity_measured += 1
        if got != hexd:
            _damage(result, path, "%s: content has digest %s (%s): damaged"
                    % (shown, got, "measured by fs-verity" if measured else "computed"), sst)
            continue
        good[hexd] = sst.st_size
    return good


def _check_images(store: Store, result: FsckResult, present: Dict[str, int], dirs: _Dirs) -> Dict[str, bool]:
    """{image digest: good} of every image examined."""
    examined: Dict[str, bool] = {}
    signatures: List[Tuple[str, os.stat_result]] = []
    for name in sorted(_listdir(dirs.images)):
        full = os.path.join(store.images_dir, name)
        st = _lstat(name, dirs.images)
        if st is None:
            continue
        shown = "images/%s" % os.fsdecode(name)
        # .tmp*: images being written; .<name>.<random>.tmp: a signature being written.
        if name.startswith(b".tmp") or (name.startswith(b".") and name.endswith(b".tmp")):
            result.notes.append("temporary file %s (crash debris; gc removes it)" % shown)
            continue
        signed = image_of_sig_name(name)
        if signed is not None:
            signatures.append((signed, st))
            continue
        if not is_hex_name(name):
            _damage(result, full, "%s: invalid image name" % shown, st)
            continue
        hexd = name.decode("ascii")
        examined[hexd] = _check_image(store, result, hexd, present, dirs)
    for signed, st in signatures:
        _check_signature(store, result, signed, st, signed in examined)
    return examined


def _check_signature(store: Store, result: FsckResult, hexd: str, st: os.stat_result, image_present: bool) -> None:
    """``images/<hexd>.sig``: a regular file holding a PKCS#7 signature, the one the kernel holds if it holds one."""
    name = sig_name(hexd)
    full = os.path.join(store.images_dir, name)
    shown = "images/%s" % os.fsdecode(name)
    if not stat.S_ISREG(st.st_mode):
        _damage(result, full, "%s: not a regular file (%s)" % (shown, _kind(st)), st)
        return
    try:
        data = read_image_signature(store, hexd)
        if data is None:
            return  # removed meanwhile (gc)
        check_signature_der(data, shown)
    except VeritySignatureError as exc:
        _damage(result, full, "%s: damaged" % exc, st)
        return
    except (OSError, StoreError) as exc:
        result.errors.append("%s: cannot read: %s" % (shown, getattr(exc, "strerror", None) or exc))
        return
    if not image_present:
        result.notes.append("%s: its image is not in the store (gc removes it)" % shown)
        return
    try:
        fd = store.open_image(hexd)
    except (OSError, StoreError):
        return  # the image's own check reports it
    try:
        if fsverity_ioctl.measure_or_none(fd) is None:
            return
        held = fsverity_ioctl.read_signature(fd)
    except VerityError:
        return  # a kernel before 5.12 cannot show it; nothing to compare
    finally:
        os.close(fd)
    # None: fs-verity was enabled before the image was signed; the file is still what nodes get.
    if held is not None and held != data:
        result.errors.append("%s: differs from the fs-verity signature the kernel holds for images/%s "
                             "(re-signed since it was written?)" % (shown, hexd))


def _check_image(store: Store, result: FsckResult, hexd: str, present: Dict[str, int], dirs: _Dirs) -> bool:
    full = store.image_path(hexd)
    name = hexd.encode("ascii")
    shown = "images/%s" % hexd
    st = _lstat(name, dirs.images)
    if st is None:
        return False
    if not stat.S_ISREG(st.st_mode):
        _damage(result, full, "%s: not a regular file (%s)" % (shown, _kind(st)), st)
        return False
    try:
        fd = open_regular(name, dirs.images, shown)
    except FileNotFoundError:
        return False
    except (OSError, UnsafePathError) as exc:
        result.errors.append("%s: cannot read: %s" % (shown, getattr(exc, "strerror", None) or exc))
        return False
    try:
        try:
            got, _measured = _fd_digest(fd)
        except OSError as exc:
            result.errors.append("%s: cannot read: %s" % (shown, exc.strerror or exc))
            return False
        result.images += 1
        if got != hexd:
            _damage(result, full, "%s: content has digest %s: damaged" % (shown, got), st)
            return False
    finally:
        os.close(fd)
    try:
        needed = store.image_objects(hexd)
    except (OSError, ComposefsError) as exc:
        _damage(result, full, "%s: cannot parse: %s" % (shown, exc), st)
        return False
    for problem in needed.problems:
        result.errors.append("%s: %s" % (shown, problem))
    missing = [h for h in needed.objects if h not in present and not _late_object(dirs, h, present)]
    wrong = [h for h in needed.objects if h in present and present[h] != needed.objects[h]]
    if missing:
        result.errors.append("%s: %d object(s) missing or damaged, e.g. %s"
                             % (shown, len(missing), sorted(missing)[0]))
    if wrong:
        result.errors.append("%s: %d object(s) of the wrong size, e.g. %s" % (shown, len(wrong), wrong[0]))
    return not (missing or wrong or needed.problems)


def _late_object(dirs: _Dirs, hexd: str, present: Dict[str, int]) -> bool:
    """An object written by a concurrent add after the objects were listed.

    Only a regular file in a real ``XX`` directory counts: a FIFO, device or
    symbolic link there is damage (reported by the listing), never read.
    """
    try:
        fd = dirs.objects.open_object(bytes.fromhex(hexd))
    except (OSError, UnsafePathError):
        return False
    try:
        got, _measured = _fd_digest(fd)
        size = os.fstat(fd).st_size
    except OSError:
        return False
    finally:
        os.close(fd)
    if got != hexd:
        return False
    present[hexd] = size
    return True


def _check_refs(store: Store, result: FsckResult, examined: Dict[str, bool], present: Dict[str, int],
                dirs: _Dirs) -> None:
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
                examined[target] = _check_image(store, result, target, present, dirs)
            if not examined[target]:
                state = "is damaged or misses objects" if os.path.lexists(store.image_path(target)) else "is missing"
                result.errors.append("ref %s: image %s %s" % (shown, target, state))


def _check_signatures(store: Store, result: FsckResult) -> None:
    """Signed statements are well-formed and belong to a ref that names their image.

    fsck has no trusted keys, so it checks form, not trust (``verify`` does
    that); a statement for another image is a note: the ref moved without
    being signed again, and trusting nodes will refuse it.
    """
    from . import store_refs
    from .ref_statement import StatementError, decode_signatures_file, parse_statement
    from .store_signatures import read_signatures

    def signatures_fd() -> int:
        return store.dir_fd(SIGNATURES)

    try:
        names = store_refs.list_refs(signatures_fd)
    except (StoreError, UnsafePathError) as exc:
        result.errors.append(str(exc))
        return
    for name in names:
        shown = "signatures/%s" % name
        try:
            raw = read_signatures(store, name)
            if raw is None:
                continue
            statement = parse_statement(decode_signatures_file(raw, shown)[0])
        except (StoreError, StatementError) as exc:
            result.errors.append("%s: %s" % (shown, exc))
            continue
        target = store.read_ref_or_none(name)
        if statement.ref != name:
            result.errors.append("%s: the statement is for ref %s" % (shown, statement.ref))
        elif target is None:
            result.notes.append("%s: no such ref (left by a crash; rm-ref removes a ref's signature)" % shown)
        elif target != statement.image:
            result.notes.append("%s: signed for image %s, but the ref names %s (moved without a new signature)"
                                % (shown, statement.image, target))


def _move_aside(store: Store, result: FsckResult) -> None:
    """Move every damaged entry still the same file into ``damaged/``, relative to directory fds.

    ``damaged/`` is created 0700 (it holds whatever was found, readable or
    not); a symbolic link or non-directory there, or on the way to an entry
    (``objects/XX``), is refused, never followed: nothing is moved outside.
    """
    store_fd = store.root_fd()
    shown = os.fsdecode(store.damaged_dir)
    damaged_fd, _created = ensure_dir(DAMAGED, store_fd, 0o700, shown)
    try:
        # Owner-checked like every store directory: one made by someone else
        # would receive what root moves.
        check_owner(os.fstat(damaged_fd), shown, store.allow_foreign)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        for path, ident in result.damaged:
            rel = os.path.relpath(path, store.path)
            try:
                _move_one(store, store_fd, damaged_fd, rel, ident, stamp, result)
            except UnsafePathError as exc:
                result.errors.append("cannot move %s aside: %s" % (os.fsdecode(rel), exc))
        os.fsync(damaged_fd)
    finally:
        os.close(damaged_fd)


def _move_one(store: Store, store_fd: int, damaged_fd: int, rel: bytes, ident: Tuple[int, int, int, int], stamp: str,
              result: FsckResult) -> None:
    parts = rel.split(b"/")
    fds: List[int] = []
    try:
        parent = store_fd
        for i, part in enumerate(parts[:-1]):
            try:
                parent = open_dir(part, parent, os.fsdecode(b"/".join(parts[:i + 1])))
            except FileNotFoundError:
                return  # gone meanwhile
            fds.append(parent)
        name = parts[-1]
        st = _lstat(name, parent)
        if st is None or _ident(st) != ident:
            return  # replaced meanwhile (a fresh copy): not ours to move
        if stat.S_ISREG(st.st_mode) and len(parts) == 3:
            if is_hex_name(name, 2 * DIGEST_SIZE - 2) and is_hex_name(parts[1], 2):
                try:
                    got: Optional[str] = file_digest(name, parent)[0]
                except (OSError, UnsafePathError):
                    got = None
                if got == (parts[1] + name).decode("ascii"):
                    return  # healed meanwhile
        dest = b"%s.%s.%s" % (rel.replace(b"/", b"_"), stamp.encode(), os.urandom(3).hex().encode())
        os.rename(name, dest, src_dir_fd=parent, dst_dir_fd=damaged_fd)
        result.moved.append("%s -> %s" % (os.fsdecode(os.path.join(store.path, rel)),
                                          os.fsdecode(os.path.join(store.damaged_dir, dest))))
        os.fsync(parent)
    finally:
        for fd in fds:
            os.close(fd)


def _kind(st: os.stat_result) -> str:
    return file_kind(st.st_mode)


def _listdir(fd: int) -> List[bytes]:
    try:
        return [os.fsencode(n) for n in os.listdir(fd)]
    except FileNotFoundError:
        return []


def _lstat(name: bytes, dir_fd: int) -> Optional[os.stat_result]:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
