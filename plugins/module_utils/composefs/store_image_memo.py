# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Image memo of the object store: skip rebuilding an image nothing of which changed.

Re-adding an unchanged tree (every run of the ``image`` module) still scans
it and used to rebuild the whole image in memory only to find the digest
the ref already names.  The memo maps everything the writer's output
depends on to the digest and size of the image it wrote:

* the tree as composefs-dump(5) text (every field the writer reads: the
  dump -> image -> dump round trip is exact, and the tests check it);
* the version options;
* the writer's own source code (``erofs_writer``, ``erofs_format``,
  ``tree``), so that a changed writer never gets an image from an older one.

A key covers every input of the writer, so an entry cannot go stale: the
same key always means the same image bytes.  A hit is used only when
``images/<digest>`` is in the store, is a regular file of the recorded size
and its fs-verity digest is the recorded one (:func:`.store_add._image_present`);
an entry whose image was collected costs a rebuild.  Like the digest cache
and the refs, the memo is trusted store state: whoever can write the store
can point a ref anywhere anyway.  The file is written atomically with a
sha256 of its entries (through the store's ``cache/`` descriptor, like the
digest cache); a damaged file is ignored as a whole.  A writer
whose source cannot be read (an unusual loader) turns the memo off.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from .tree import Node

if TYPE_CHECKING:
    from .store import CacheFile

_HEADER = b"composefs-store image memo 1 sha256\n"
#: Entries kept (most recently used first); about 140 bytes each.
MAX_ENTRIES = 512

_writer_identity: Optional[bytes] = None


def writer_identity() -> Optional[bytes]:
    """sha256 of the writer's source, or None when it cannot be read."""
    global _writer_identity
    if _writer_identity is None:
        from . import erofs_format, erofs_writer, tree

        h = hashlib.sha256()
        for module in (erofs_writer, erofs_format, tree):
            loader = getattr(module, "__loader__", None)
            try:
                source = loader.get_source(module.__name__) if loader is not None else None
            except (ImportError, OSError):
                source = None
            if not source:
                return None
            if not isinstance(source, bytes):  # Ansible's collection loader gives bytes
                source = source.encode("utf-8", "surrogateescape")
            h.update(module.__name__.encode() + b"\0" + source + b"\0")
        _writer_identity = h.digest()
    return _writer_identity


class _HashWriter:
    """A binary sink that only hashes what is written to it."""

    def __init__(self, h: "hashlib._Hash") -> None:
        self.h = h

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def memo_key(root: Node, min_version: int, max_version: int) -> Optional[str]:
    """The memo key of building ``root`` with these versions (None: no memo)."""
    from .dump import write_dump

    identity = writer_identity()
    if identity is None:
        return None
    h = hashlib.sha256(identity)
    h.update(b"versions %d %d\n" % (min_version, max_version))
    write_dump(root, _HashWriter(h))  # type: ignore[arg-type]
    return h.hexdigest()


class ImageMemo:
    def __init__(self, file: "CacheFile") -> None:
        self.file = file
        self.path = file.path
        self.entries: Dict[str, Tuple[str, int]] = self._load()
        self.dirty = False

    def _load(self) -> Dict[str, Tuple[str, int]]:
        data = self.file.read(MAX_ENTRIES * 256)
        return _parse(data) if data is not None else {}

    def get(self, key: str) -> Optional[Tuple[str, int]]:
        return self.entries.get(key)

    def put(self, key: str, digest: str, size: int) -> None:
        if self.entries.get(key) != (digest, size):
            self.entries[key] = (digest, size)
            self.dirty = True

    def save(self, used: str) -> None:
        """Write the memo if it changed, ``used`` first (kept when trimming)."""
        if not self.dirty:
            return
        merged = self._load()  # what concurrent adds saved meanwhile
        merged.update(self.entries)
        order = [used] + [k for k in merged if k != used]
        body = b"".join(b"%s %s %d\n" % (k.encode(), merged[k][0].encode(), merged[k][1])
                        for k in order[:MAX_ENTRIES] if k in merged)
        self.file.write(_HEADER + body + b"sum " + hashlib.sha256(body).hexdigest().encode() + b"\n")
        self.dirty = False


def _is_hex(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _parse(data: bytes) -> Dict[str, Tuple[str, int]]:
    if not data.startswith(_HEADER):
        return {}
    body, sep, tail = data[len(_HEADER):].rpartition(b"sum ")
    if not sep or tail.strip() != hashlib.sha256(body).hexdigest().encode():
        return {}
    out: Dict[str, Tuple[str, int]] = {}
    try:
        for line in body.decode("ascii").splitlines():
            key, digest, size = line.split(" ")
            if not (_is_hex(key) and _is_hex(digest)) or int(size) < 0:
                return {}
            out[key] = (digest, int(size))
    except (ValueError, UnicodeDecodeError):
        return {}
    return out
