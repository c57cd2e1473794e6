# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Apply an OCI layer (a tar stream) to a composefs tree, without unpacking anything to disk.

File contents above the inline limit go to a sink (the store's objects) as
they stream; everything else (names, modes, owners, nanosecond times,
xattrs from PAX ``SCHILY.xattr.*``, symlinks, devices) goes into the tree.

Whiteouts follow the image spec (layer.md), not stream order:

* ``.wh.NAME`` removes NAME of the *lower* layers; an entry NAME of the same
  layer stays, whichever comes first in the tar;
* ``.wh..wh..opq`` hides every lower child of its directory, wherever it is
  in the tar (children this layer adds stay);
* markers never appear in the result; a bare ``.wh.`` and other
  ``.wh..wh.*`` names are errors.

Hostile input is refused by name: absolute names, ``..``, a path through a
non-directory (a symlink in a layer is never followed), hard links to
nothing or to a directory, a layer that inflates more than
:data:`MAX_RATIO` times its size (decompression bombs).

The root directory: an entry ``./`` (or ``/``) sets its mode, owner, time
and xattrs, the last layer's winning; otherwise it is 0755, root-owned,
time 0, no xattrs.  Hard links become separate inodes with the same content
and metadata, as C mkcomposefs stores a directory's hard links.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import os
import stat
import tarfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Set, Tuple

from .oci_source import OciError
from .tree import PATH_MAX, RECOMMENDED_INLINE_CONTENT_MAX, XATTR_NAME_MAX, Node, digest_to_path

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
#: An uncompressed layer larger than this many times its compressed size, plus
#: :data:`RATIO_ALLOWANCE`, is refused as a decompression bomb.
MAX_RATIO = 200
RATIO_ALLOWANCE = 256 << 20
DIR_DEFAULT_MODE = stat.S_IFDIR | 0o755

#: sink(readable, size, shown) -> raw fs-verity digest of the content it stored.
ContentSink = Callable[[BinaryIO, int, str], bytes]


class _Inflated(io.RawIOBase):
    """The uncompressed layer: sha256 for its diff_id, a size cap against bombs."""

    def __init__(self, raw: Any, limit: int, shown: str) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._shown = shown
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        try:
            data = self._raw.read(len(buf))
        except OciError:
            raise  # the blob's own check (digest, size) said what failed
        except Exception as exc:  # zlib.error, EOFError, zstandard.ZstdError...: say which layer
            raise OciError("%s: cannot decompress: %s" % (self._shown, exc)) from None
        n = len(data)
        if n:
            self.size += n
            if self.size > self._limit:
                raise OciError("%s: decompresses to more than %d bytes (over %d times its size): refused as a "
                               "decompression bomb" % (self._shown, self._limit, MAX_RATIO))
            self.hash.update(data)
            buf[:n] = data
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _zstd_reader(raw: Any) -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

        return zstd.ZstdFile(raw)
    except ImportError:
        pass
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        raise OciError("zstd layers need the Python package 'zstandard' on Python < 3.14 "
                       "(Debian: apt install python3-zstandard; or pip install zstandard)") from None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


def open_layer(raw: Any, compression: str, compressed_size: int, shown: str, sniff: bool = False) -> _Inflated:
    """The uncompressed stream of a layer blob; ``sniff``: tell gzip/zstd by their magic (docker-archive)."""
    if sniff:
        head = raw.peek(4)[:4] if hasattr(raw, "peek") else b""
        compression = "gzip" if head[:2] == b"\x1f\x8b" else "zstd" if head == b"\x28\xb5\x2f\xfd" else ""
    if compression == "gzip":
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
    elif compression == "zstd":
        stream = _zstd_reader(raw)
    else:
        stream = raw
    return _Inflated(stream, compressed_size * MAX_RATIO + RATIO_ALLOWANCE, shown)


class LayerApplier:
    """Applies one layer's tar stream to ``root`` (see the module docstring)."""

    def __init__(self, root: Node, sink: ContentSink, shown: str, inline_max: int = RECOMMENDED_INLINE_CONTENT_MAX) -> None:
        self.root = root
        self.sink = sink
        self.shown = shown
        self.inline_max = inline_max
        # Nodes this layer made or changed: whiteouts and opaque markers never touch them.
        self._touched: Set[int] = set()
        self.entries = 0

    def apply(self, stream: BinaryIO) -> None:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape")
            for member in tar:
                self._member(tar, member)
        except tarfile.TarError as exc:
            raise OciError("%s: not a valid tar layer: %s" % (self.shown, exc)) from None
        except EOFError:
            raise OciError("%s: the tar layer ends early (truncated)" % self.shown) from None

    # -- names -------------------------------------------------------------------
    def _parts(self, name: str, what: str = "member") -> List[bytes]:
        raw = name.encode("utf-8", "surrogateescape")
        if len(raw) >= PATH_MAX:
            raise OciError("%s: %s of %d bytes: longer than a path may be (%d)" % (self.shown, what, len(raw), PATH_MAX))
        if raw.startswith(b"/"):
            if raw.strip(b"/") == b"":
                return []
            raise OciError("%s: %s %r is an absolute path: refused" % (self.shown, what, name[:200]))
        parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            raise OciError("%s: %s %r contains '..': refused (it would escape the tree)" % (self.shown, what, name[:200]))
        for part in parts:
            if len(part) > 255 or b"\0" in part:
                raise OciError("%s: %s %r has an invalid name component" % (self.shown, what, name[:200]))
        return parts

    def _lookup(self, parts: List[bytes]) -> Optional[Node]:
        node = self.root
        for part in parts:
            if not node.is_dir():
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _parent(self, parts: List[bytes], name: str) -> Node:
        """The directory holding ``parts``, made (0755, root) where missing; never through a non-directory."""
        node = self.root
        for i, part in enumerate(parts[:-1]):
            child = node.children.get(part)
            if child is None:
                child = Node(DIR_DEFAULT_MODE)
                node.add_child(part, child)
                self._touched.add(id(child))
            elif not child.is_dir():
                raise OciError("%s: member %r: %s is not a directory in the tree (links in a layer are never "
                               "followed)" % (self.shown, name[:200], os.fsdecode(b"/".join(parts[:i + 1]))))
            node = child
        return node

    # -- members -----------------------------------------------------------------
    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        parts = self._parts(member.name)
        if not parts:
            if not member.isdir():
                raise OciError("%s: the root entry %r is not a directory" % (self.shown, member.name))
            self._set_meta(self.root, member)
            self._touched.add(id(self.root))
            return
        base = parts[-1]
        if base.startswith(WHITEOUT):
            self._whiteout(parts, member)
            return
        parent = self._parent(parts, member.name)
        node = self._node(tar, member, parts)
        old = parent.children.get(base)
        if old is not None and old.is_dir() and node.is_dir():
            # A directory over a directory: new metadata, the children stay.
            old.mode, old.uid, old.gid = node.mode, node.uid, node.gid
            old.mtime_sec, old.mtime_nsec, old.xattrs = node.mtime_sec, node.mtime_nsec, node.xattrs
            self._touched.add(id(old))
            return
        if old is not None:
            parent.replace_child(base, node)
        else:
            parent.add_child(base, node)
        self._touched.add(id(node))

    def _whiteout(self, parts: List[bytes], member: tarfile.TarInfo) -> None:
        base = parts[-1]
        if member.isdir():
            raise OciError("%s: whiteout %r is a directory" % (self.shown, member.name[:200]))
        parent = self._lookup(parts[:-1])
        if base == OPAQUE:
            if parent is not None and parent.is_dir():
                self._hide_lower(parent)
            return
        if base.startswith(b".wh..wh."):
            raise OciError("%s: %r is not a whiteout this tool knows (only .wh..wh..opq is)" % (self.shown, member.name[:200]))
        target = base[len(WHITEOUT):]
        if not target:
            raise OciError("%s: a bare whiteout %r names nothing: invalid" % (self.shown, member.name[:200]))
        if parent is None or not parent.is_dir():
            return  # nothing lower to remove
        victim = parent.children.get(target)
        if victim is None:
            return
        if id(victim) in self._touched or (victim.is_dir() and self._has_touched(victim)):
            # This layer's own entry (whiteouts apply to lower layers only): what
            # lower layers put under it goes, what this layer put there stays.
            if victim.is_dir():
                self._hide_lower(victim)
            return
        del parent.children[target]

    def _hide_lower(self, top: Node) -> None:
        """Remove what lower layers put under ``top``; keep this layer's entries (and their paths).

        Iterative: a layer may nest directories deeper than Python recurses.
        """
        stack = [top]
        while stack:
            directory = stack.pop()
            for name, child in list(directory.children.items()):
                if child.is_dir() and (id(child) in self._touched or self._has_touched(child)):
                    stack.append(child)
                elif id(child) not in self._touched:
                    del directory.children[name]

    def _has_touched(self, directory: Node) -> bool:
        stack = [directory]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if id(child) in self._touched:
                    return True
                if child.is_dir():
                    stack.append(child)
        return False

    def _node(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: List[bytes]) -> Node:
        if member.islnk():
            return self._hardlink(member)
        perm = member.mode & 0o7777
        if member.isdir():
            node = Node(stat.S_IFDIR | perm)
        elif member.isreg():  # includes CONTTYPE and sparse files
            node = Node(stat.S_IFREG | perm, size=member.size)
            self._content(tar, member, node)
        elif member.issym():
            target = member.linkname.encode("utf-8", "surrogateescape")
            if not target or len(target) >= 4096:
                raise OciError("%s: symlink %r has an invalid target length %d" % (self.shown, member.name[:200], len(target)))
            node = Node(stat.S_IFLNK | 0o777, size=len(target), payload=target)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            node = Node(kind | perm, rdev=os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            node = Node(stat.S_IFIFO | perm)
        else:
            raise OciError("%s: member %r has tar type %r, which a layer cannot hold" % (self.shown, member.name[:200], member.type))
        self._set_meta(node, member)
        return node

    def _hardlink(self, member: tarfile.TarInfo) -> Node:
        target_parts = self._parts(member.linkname, "hard link target")
        target = self._lookup(target_parts) if target_parts else None
        if target is None:
            raise OciError("%s: hard link %r points to %r, which is not in the tree" % (self.shown, member.name[:200],
                                                                                        member.linkname[:200]))
        if target.is_dir():
            raise OciError("%s: hard link %r points to a directory" % (self.shown, member.name[:200]))
        node = Node(target.mode, uid=target.uid, gid=target.gid, rdev=target.rdev, size=target.size,
                    mtime_sec=target.mtime_sec, mtime_nsec=target.mtime_nsec, payload=target.payload,
                    content=target.content, digest=target.digest)
        node.xattrs = dict(target.xattrs)
        return node

    def _content(self, tar: tarfile.TarFile, member: tarfile.TarInfo, node: Node) -> None:
        if member.size == 0:
            return
        handle = tar.extractfile(member)
        if handle is None:  # pragma: no cover - regular members always have a file
            raise OciError("%s: cannot read member %r" % (self.shown, member.name[:200]))
        shown = "%s: %s" % (self.shown, member.name[:200])
        if member.size <= self.inline_max:
            data = handle.read(member.size)
            if len(data) != member.size:
                raise OciError("%s: truncated" % shown)
            node.content = data
            return
        digest = self.sink(handle, member.size, shown)
        node.digest = digest
        node.payload = digest_to_path(digest)

    def _set_meta(self, node: Node, member: tarfile.TarInfo) -> None:
        if node.is_dir() or not node.is_symlink():
            node.mode = stat.S_IFMT(node.mode) | (member.mode & 0o7777)
        node.uid = member.uid
        node.gid = member.gid
        node.mtime_sec, node.mtime_nsec = _mtime(member)
        node.xattrs = _xattrs(member, self.shown)


def _mtime(member: tarfile.TarInfo) -> Tuple[int, int]:
    text = member.pax_headers.get("mtime")
    if text:
        sign = -1 if text.startswith("-") else 1
        whole, _dot, frac = text.lstrip("-").partition(".")
        try:
            sec = int(whole)
            nsec = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            return int(member.mtime), 0
        if sign < 0 and nsec:
            return -sec - 1, 1000000000 - nsec
        return sign * sec, nsec
    return int(member.mtime), 0


def _xattrs(member: tarfile.TarInfo, shown: str) -> Dict[bytes, bytes]:
    out: Dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            from urllib.parse import unquote_to_bytes

            name = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4))
            except (binascii.Error, ValueError):
                raise OciError("%s: member %r: xattr %s is not base64" % (shown, member.name[:200], key)) from None
        else:
            continue
        if not 0 < len(name) <= XATTR_NAME_MAX:
            raise OciError("%s: member %r: xattr name of %d bytes" % (shown, member.name[:200], len(name)))
        out[name] = data
    return out


__all__ = ["LayerApplier", "MAX_RATIO", "open_layer"]
