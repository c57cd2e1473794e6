# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Refs of a store: ``refs/<name>`` holds "<image digest>\\n"; names may contain "/".

Every function works relative to the ``refs/`` directory a :class:`.store.Store`
opened without following links (``refs`` returns that descriptor; it is
the store's, never closed here).  Names are validated first
(:func:`.store_names.split_ref_name`), then resolved one component at a
time with ``O_NOFOLLOW`` directory descriptors, so a symlink planted under
``refs/`` cannot redirect a read or write outside the store.  A ref is
written to a temp name, fsync-ed and renamed into place, and its directory
fsync-ed.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Dict, List, Union

from .errors import RefNotFound, StoreError
from .safe_dirs import DIR_FLAGS, read_at_most
from .store_names import check_digest_hex, is_hex_name, split_ref_name

#: Returns the descriptor of the store's ``refs/`` (FileNotFoundError if there is none).
RefsDir = Callable[[], int]


def _ref_dirs(refs: RefsDir, parts: List[bytes], create: bool, kind: str = "ref") -> List[int]:
    """Open fds of refs/ and each directory on the way to the ref's parent."""
    fds = [os.dup(refs())]
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                fds.append(os.open(part, DIR_FLAGS, dir_fd=fds[-1]))
                continue
            except FileNotFoundError:
                if not create:
                    raise RefNotFound("no %s %s" % (kind, os.fsdecode(b"/".join(parts)))) from None
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise _not_a_ref_dir(parts, i) from None
                raise
            try:
                os.mkdir(part, 0o755, dir_fd=fds[-1])
                os.fsync(fds[-1])
            except FileExistsError:
                pass
            try:
                fds.append(os.open(part, DIR_FLAGS, dir_fd=fds[-1]))
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise _not_a_ref_dir(parts, i) from None
                raise
        return fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def read_named(refs: RefsDir, name: Union[str, bytes], limit: int, kind: str = "ref") -> bytes:
    """The bytes (at most ``limit``) of the regular file ``name`` under the directory ``refs`` returns.

    Used for refs and for what is kept per ref elsewhere (``signatures/``);
    ``kind`` names the file in messages ("ref", "signature of ref").
    """
    parts = split_ref_name(name)
    shown = os.fsdecode(b"/".join(parts))
    fds = _ref_dirs(refs, parts, create=False, kind=kind)
    try:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fds[-1])
        except FileNotFoundError:
            raise RefNotFound("no %s %s" % (kind, shown)) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError("%s %s is a symbolic link: refused" % (kind, shown)) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError("%s %s is not a regular file (a directory of refs?)" % (kind, shown))
            raw = read_at_most(fd, limit)
        finally:
            os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
    if len(raw) > limit:
        raise StoreError("%s %s is damaged: larger than %d bytes" % (kind, shown, limit))
    return raw


def read_ref(refs: RefsDir, name: Union[str, bytes]) -> str:
    raw = read_named(refs, name, 256)
    text = raw.strip()
    if not is_hex_name(text):
        raise StoreError("ref %s is damaged: %r is not an image digest" % (os.fsdecode(b"/".join(split_ref_name(name))), raw[:80]))
    return text.decode("ascii")


def write_ref(refs: RefsDir, name: Union[str, bytes], hexdigest: str) -> None:
    check_digest_hex(hexdigest)
    write_named(refs, name, hexdigest.encode("ascii") + b"\n")


def write_named(refs: RefsDir, name: Union[str, bytes], data: bytes, kind: str = "ref") -> None:
    """Replace the file ``name`` under ``refs`` with ``data`` durably (temp file, fsync, rename)."""
    parts = split_ref_name(name)
    for _attempt in range(20):
        fds = _ref_dirs(refs, parts, create=True, kind=kind)
        try:
            parent = fds[-1]
            tmp = b".tmp-ref-" + os.urandom(6).hex().encode()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=parent)
            except FileNotFoundError:
                continue  # rm-ref removed the (empty) directory meanwhile: again
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
                except OSError as exc:
                    if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                        raise StoreError("cannot create %s %s: refs named %s/... exist"
                                         % (kind, os.fsdecode(b"/".join(parts)), os.fsdecode(b"/".join(parts)))) from None
                    raise
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=parent)
                except OSError:
                    pass
                raise
            os.fsync(parent)
            return
        finally:
            for fd in fds:
                os.close(fd)
    raise StoreError("cannot create %s %s: its directory keeps disappearing" % (kind, os.fsdecode(name)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove_ref(refs: RefsDir, name: Union[str, bytes]) -> str:
    """Delete a ref (and its directories left empty); returns the digest it named."""
    target = read_ref(refs, name)
    remove_named(refs, name)
    return target


def remove_named(refs: RefsDir, name: Union[str, bytes], kind: str = "ref") -> None:
    """Delete the file ``name`` under ``refs`` and the directories it leaves empty (RefNotFound if none)."""
    parts = split_ref_name(name)
    fds = _ref_dirs(refs, parts, create=False, kind=kind)
    try:
        try:
            os.unlink(parts[-1], dir_fd=fds[-1])
        except FileNotFoundError:
            raise RefNotFound("no %s %s" % (kind, os.fsdecode(b"/".join(parts)))) from None
        os.fsync(fds[-1])
        for i in range(len(parts) - 1, 0, -1):
            try:
                os.rmdir(parts[i - 1], dir_fd=fds[i - 1])
            except OSError:
                break
    finally:
        for fd in fds:
            os.close(fd)


def list_refs(refs: RefsDir) -> List[str]:
    """Names of all refs (regular files under refs/, temp files and symlinks skipped)."""
    out: List[str] = []
    try:
        refs_fd = refs()
    except FileNotFoundError:
        return out
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(b".", dir_fd=refs_fd):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(b"."))
        for fname in filenames:
            if fname.startswith(b"."):
                continue
            try:
                if not stat.S_ISREG(os.stat(fname, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    continue
            except FileNotFoundError:
                continue
            out.append(os.fsdecode(os.path.normpath(os.path.join(dirpath, fname))))
    return sorted(out)


def ref_targets(refs: RefsDir) -> Dict[str, str]:
    """{ref: image digest} for every readable ref (damaged ones are left out)."""
    out = {}
    for name in list_refs(refs):
        try:
            out[name] = read_ref(refs, name)
        except StoreError:
            continue
    return out


def _not_a_ref_dir(parts: List[bytes], i: int) -> StoreError:
    return StoreError("ref %s: %s is not a directory under refs/ (a ref or a symbolic link)"
                      % (os.fsdecode(b"/".join(parts)), os.fsdecode(b"/".join(parts[:i + 1]))))


__all__ = ["RefsDir", "list_refs", "read_named", "read_ref", "ref_targets", "remove_named", "remove_ref", "write_named", "write_ref"]
