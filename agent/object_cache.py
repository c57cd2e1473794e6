# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The objects of each mounted image, kept on disk between runs of the agent.

Listing a large image's objects is most of what a pass costs beyond checking
the objects themselves.  The service lists an image once per process and keeps
the list in memory; ``--once`` starts afresh every time, so the list is kept
here too: one file per image, named by the image's fs-verity digest (images are
content-addressed, so an entry never goes stale), in a directory that only root
can write (default :data:`CACHE_DIR`).

Nothing read here is trusted blindly: the directory is reached component by
component without following symbolic links and must belong to us (root) and
not be writable by group or others; a file must be a regular file of ours, name
the digest it is filed under, have exactly the size its count says and end
with the SHA-256 of everything before it.  Anything else is ignored (and
replaced by the next write), never believed.  Writes go to a temporary file,
fsync, rename.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from typing import Iterable, List, Optional

from composefs_fleet.atomic_file import write_atomic_at
from composefs_fleet.errors import ComposefsError, UnsafePathError
from composefs_fleet.safe_dirs import check_owner, ensure_dir, open_dir, open_regular, read_at_most
from composefs_fleet.store_names import is_hex_name

CACHE_DIR = "/var/cache/composefs-fleet/agent"
SUFFIX = ".objects"
MAGIC = b"composefs-fleet image objects\n\x00\x01"
DIGEST_SIZE = 32
_HEADER = struct.Struct("<%ds%dsQ" % (len(MAGIC), DIGEST_SIZE))
_CHECK_SIZE = hashlib.sha256().digest_size
# 16 million objects: far beyond any image, small enough that a planted count cannot make us read gigabytes.
MAX_OBJECTS = 1 << 24


def _open_cache_dir(directory: str, create: bool) -> Optional[int]:
    """The cache directory's descriptor, reached without following links (None: missing)."""
    if not os.path.isabs(directory):
        raise UnsafePathError("cache directory %s: an absolute path is needed" % directory)
    fd = open_dir("/")
    try:
        for part in [p for p in directory.split("/") if p]:
            if create:
                # Parents made by us are root's 0755 (like /var/cache itself); only root writes into them.
                sub, _created = ensure_dir(part, fd, mode=0o755, shown=directory)
            else:
                try:
                    sub = open_dir(part, fd, shown=directory)
                except FileNotFoundError:
                    return None
            os.close(fd)
            fd = sub
        check_owner(os.fstat(fd), "cache directory %s" % directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _name(image_digest: str) -> str:
    if not is_hex_name(image_digest):
        raise ValueError("not an image digest: %r" % image_digest)
    return image_digest + SUFFIX


def load(directory: str, image_digest: str) -> Optional[List[bytes]]:
    """The raw object digests filed under ``image_digest`` (None: none we can believe)."""
    try:
        dir_fd = _open_cache_dir(directory, create=False)
        if dir_fd is None:
            return None
        try:
            fd = open_regular(_name(image_digest), dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, ComposefsError, ValueError):  # missing, a link, a FIFO, a foreign directory: not believed
        return None
    try:
        st = os.fstat(fd)
        check_owner(st, "cache file")
        if not stat.S_ISREG(st.st_mode) or st.st_size > _HEADER.size + MAX_OBJECTS * DIGEST_SIZE + _CHECK_SIZE:
            return None
        data = read_at_most(fd, st.st_size)
    except (OSError, ComposefsError):
        return None
    finally:
        os.close(fd)
    return _parse(data, image_digest)


def _parse(data: bytes, image_digest: str) -> Optional[List[bytes]]:
    if len(data) < _HEADER.size + _CHECK_SIZE:
        return None
    magic, digest, count = _HEADER.unpack_from(data)
    if magic != MAGIC or digest.hex() != image_digest or count > MAX_OBJECTS:
        return None
    end = _HEADER.size + count * DIGEST_SIZE
    if len(data) != end + _CHECK_SIZE or hashlib.sha256(data[:end]).digest() != data[end:]:
        return None
    return [data[i:i + DIGEST_SIZE] for i in range(_HEADER.size, end, DIGEST_SIZE)]


def store(directory: str, image_digest: str, objects: List[bytes]) -> bool:
    """File ``objects`` under ``image_digest``; False when they cannot be (no error: it is only a cache)."""
    if any(len(o) != DIGEST_SIZE for o in objects):
        return False
    body = _HEADER.pack(MAGIC, bytes.fromhex(image_digest), len(objects)) + b"".join(objects)
    try:
        name = _name(image_digest).encode("ascii")
        dir_fd = _open_cache_dir(directory, create=True)
    except (OSError, ComposefsError, ValueError):
        return False
    try:
        write_atomic_at(dir_fd, name, body + hashlib.sha256(body).digest(), mode=0o600)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    return True


def prune(directory: str, keep: Iterable[str]) -> List[str]:
    """Remove the entries of images not in ``keep`` (no longer mounted); the names removed."""
    wanted = {_name(d) for d in keep if is_hex_name(d)}
    removed: List[str] = []
    try:
        dir_fd = _open_cache_dir(directory, create=False)
    except (OSError, ComposefsError):
        return removed
    if dir_fd is None:
        return removed
    try:
        for name in os.listdir(dir_fd):
            if name.endswith(SUFFIX) and is_hex_name(name[:-len(SUFFIX)]) and name not in wanted:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(name)
                except OSError:
                    pass
    finally:
        os.close(dir_fd)
    return removed
