# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Digest cache of the object store: skip re-hashing unchanged source files.

Adding a new version of a tree usually changes few files.  The cache maps a
source file's identity and change state, ``(st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns)``, to its fs-verity digest, so an unchanged file
costs one ``lstat`` instead of reading and hashing it.

Why a stale entry cannot put a wrong digest into an image:

* Any change of content changes ``st_ctime`` (the kernel sets it on every
  write, truncate and on metadata changes, and no system call sets it to a
  chosen value), and a file replaced by another one has a new inode number
  or a new ctime.  ``mtime`` is in the key too, but only as an extra check:
  anyone can set it.
* Timestamps are coarse (the kernel's clock tick), so a write in the same
  tick right after we hashed could leave ctime unchanged.  As in git's
  "racy index" rule, a file whose ctime is less than one second before the
  hash started is never recorded; only files that had been quiet for a
  second before we read them are.
* The file is ``fstat``-ed before and after hashing on the same descriptor;
  if anything in the key changed, nothing is recorded.
* The cache file carries a sha256 of its entries; a damaged or truncated file
  is ignored as a whole (cost: hashing again), never half-trusted.
* The store only uses a hit when the object is already present with the
  right size; a missing object is always re-hashed from the source while it
  is copied, so a bad entry can never be written into the store as an object.

Left to the operator: ``st_dev`` numbers are assigned at mount time, so a
different filesystem mounted later under the same device number, holding a
file with the same inode number, size, mtime and ctime to the nanosecond
would match.  ``--no-cache`` (or deleting ``STORE/cache``) turns it off.
Concurrent adds each rewrite the cache atomically, merging what is on disk;
an entry lost in a race only costs a re-hash.  The file is read and
replaced through the store's ``cache/`` descriptor (:class:`.store.CacheFile`),
so a symbolic link there can't send the write elsewhere.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:
    from .store import CacheFile

Key = Tuple[int, int, int, int, int]

_HEADER = b"composefs-store digest cache 1 sha256\n"
#: Files whose ctime is this close to the start of hashing are not recorded.
RACY_NS = 1000000000
#: Upper bound of entries kept (about 100 bytes each on disk).
MAX_ENTRIES = 500000
#: A longer file is not ours (an entry is at most about 130 bytes).
_MAX_BYTES = MAX_ENTRIES * 160


def key_of(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class DigestCache:
    def __init__(self, file: "CacheFile") -> None:
        self.file = file
        self.path = file.path
        self.entries: Dict[Key, bytes] = {}
        self.new: Dict[Key, bytes] = {}
        self.used: Dict[Key, bytes] = {}
        self.hits = 0
        self.entries = self._load()

    def _load(self) -> Dict[Key, bytes]:
        data = self.file.read(_MAX_BYTES)
        return _parse(data) if data is not None else {}

    def get(self, st: os.stat_result) -> Optional[bytes]:
        key = key_of(st)
        digest = self.entries.get(key)
        if digest is not None:
            self.used[key] = digest
        return digest

    def put(self, key: Key, digest: bytes, hash_started_ns: int) -> bool:
        """Record ``digest`` for a file whose fstat ``key`` was the same before and after hashing."""
        if key[4] > hash_started_ns - RACY_NS:
            return False
        self.new[key] = digest
        return True

    def save(self) -> None:
        if not self.new:
            return
        # Merge with what concurrent adds may have saved meanwhile.
        merged = self._load()
        merged.update(self.used)
        merged.update(self.new)
        if len(merged) > MAX_ENTRIES:
            keep = dict(self.used)
            keep.update(self.new)
            for key, value in merged.items():
                if len(keep) >= MAX_ENTRIES:
                    break
                keep.setdefault(key, value)
            merged = keep
        body = b"".join(b"%d %d %d %d %d %s\n" % (k + (v.hex().encode(),)) for k, v in merged.items())
        self.file.write(_HEADER + body + b"sum " + hashlib.sha256(body).hexdigest().encode() + b"\n")


def _parse(data: bytes) -> Dict[Key, bytes]:
    if not data.startswith(_HEADER):
        return {}
    body, sep, tail = data[len(_HEADER):].rpartition(b"sum ")
    if not sep or tail.strip() != hashlib.sha256(body).hexdigest().encode():
        return {}
    out: Dict[Key, bytes] = {}
    try:
        for line in body.splitlines():
            dev, ino, size, mtime, ctime, hexd = line.split(b" ")
            digest = bytes.fromhex(hexd.decode("ascii"))
            if len(digest) != 32:
                return {}
            out[(int(dev), int(ino), int(size), int(mtime), int(ctime))] = digest
    except ValueError:
        return {}
    return out
