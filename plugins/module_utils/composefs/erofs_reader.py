# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Read a composefs EROFS image back into a :class:`~.tree.Node` tree.

The result matches what libcomposefs 1.0.8 (``lcfs_load_node_from_image_ext``)
builds, so ``composefs-info`` output is byte-identical to the C tool: overlay
bookkeeping xattrs are hidden, escaped ``trusted.overlay.overlay.*`` names are
unescaped, escaped whiteouts turn back into 0/0 character devices, the real
0/0 stubs are dropped, and an inode reached by a second directory entry becomes
a hard-link alias.

Every image is treated as hostile.  All reads are bounds-checked, the walk is
iterative, a directory may be entered only once, and the bytes the walk may
consume are capped by the image size (a well-formed image never reads a byte
of inode, xattr or data area twice), so a small image cannot make the reader
loop, recurse deeply or allocate much more than its own size.  Anything wrong
raises :class:`~.errors.ImageError`.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import Collection, Dict, Iterator, List, Optional, Set, Tuple, Union

from . import erofs_format as fmt
# Used once per inode: plain names, not attribute lookups on fmt.
from .erofs_format import (
    BLOCK_SIZE,
    EROFS_I_DATALAYOUT_BIT,
    EROFS_I_DATALAYOUT_MASK,
    EROFS_I_VERSION_MASK,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_LAYOUT_COMPACT,
    SLOT_SIZE,
)
from .errors import ImageError
from .gc_pause import gc_paused
from .tree import DIGEST_SIZE, INLINE_CONTENT_MAX, NAME_MAX, PATH_MAX, XATTR_NAME_MAX, Node

ImageData = Union[bytes, bytearray, memoryview, mmap.mmap]

# lcfs_node_set_xattr_internal() caps a node's xattrs at this accounted size
# when loading an image (no external-input limit applies there).
_XATTR_BUDGET = 0xFFFF
# Accounted cost per xattr: twice the entry header minus one, plus key and value.
_XATTR_ENTRY_OVERHEAD = 2 * fmt.EROFS_XATTR_ENTRY.size - 1

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

_REDIRECT = fmt.OVERLAY_XATTR_REDIRECT
_METACOPY = fmt.OVERLAY_XATTR_METACOPY
_ESCAPED_WHITEOUT = fmt.OVERLAY_XATTR_ESCAPED_WHITEOUT
_HIDDEN_MARKERS = frozenset(
    (
        fmt.OVERLAY_XATTR_ESCAPED_WHITEOUTS,
        fmt.OVERLAY_XATTR_USERXATTR_WHITEOUT,
        fmt.OVERLAY_XATTR_USERXATTR_WHITEOUTS,
    )
)
_TRUSTED_PREFIX = b"trusted."
_METACOPY_SIZE = fmt.OVL_METACOPY_HEADER.size + DIGEST_SIZE

_VALID_TYPES = frozenset(
    (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)
)


_S_IFMT = 0o170000


def _cstr(raw: bytes) -> bytes:
    """The C string view of ``raw``: libcomposefs handles names with strlen()."""
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _XattrList:
    """A node's xattrs with lcfs_node_set_xattr_internal()'s order and limits.

    Setting an existing key moves the last entry into its slot and appends the
    new value, exactly as the C code does; the order is what ``dump`` prints.
    """

    __slots__ = ("items", "index", "size")

    def __init__(self) -> None:
        self.items: List[Tuple[bytes, bytes]] = []
        self.index: Dict[bytes, int] = {}
        self.size = 0

    def set(self, key: bytes, value: bytes) -> None:
        if not key or len(key) > XATTR_NAME_MAX:
            raise ImageError("invalid xattr name %r" % key[:300])
        slot = self.index.pop(key, None)
        if slot is not None:
            old = self.items[slot][1]
            last = self.items.pop()
            if slot < len(self.items):
                self.items[slot] = last
                self.index[last[0]] = slot
            if self.items:
                self.size -= _XATTR_ENTRY_OVERHEAD + len(key) + len(old)
            else:
                self.size = 0
        cost = _XATTR_ENTRY_OVERHEAD + len(key) + len(value)
        if not self.items:
            cost += fmt.EROFS_XATTR_IBODY_HEADER.size
        if self.size + cost > _XATTR_BUDGET:
            raise ImageError("xattrs of one inode exceed %d bytes" % _XATTR_BUDGET)
        self.index[key] = len(self.items)
        self.items.append((key, value))
        self.size += cost


class _Inode:
    """Decoded fixed part of an on-disk inode."""

    __slots__ = ("offset", "compact", "layout", "isize", "xattr_icount", "size", "i_u")

    def __init__(self, offset: int, compact: bool, layout: int, isize: int, xattr_icount: int, size: int, i_u: int):
        self.offset = offset
        self.compact = compact
        self.layout = layout
        self.isize = isize
        self.xattr_icount = xattr_icount
        self.size = size
        self.i_u = i_u


class _Reader:
    def __init__(self, data: ImageData) -> None:
        if isinstance(data, memoryview) and (data.ndim != 1 or data.format != "B"):
            data = data.cast("B")
        self.data = data
        self.length = len(data)
        # Bytes of inode, xattr and data areas the walk may still consume.
        # A well-formed image stores each of these bytes once, so it needs at
        # most its own size; overlapping or looping structures run out.
        self.budget = self.length
        # nid -> its node, or None for a skipped 0/0 chardev.
        self.visited: Dict[int, Optional[Node]] = {}
        self.shared_cache: Dict[int, Tuple[int, bytes, bytes, int, int]] = {}
        self.payload_cache: Dict[Tuple[int, int], bytes] = {}
        self._parse_super()

    # -- low-level access ------------------------------------------------
    def _slice(self, start: int, end: int, what: str) -> bytes:
        if start < 0 or end < start or end > self.length:
            raise ImageError("%s out of range (bytes %d..%d of a %d-byte image)" % (what, start, end, self.length))
        return bytes(self.data[start:end])

    def _unpack(self, st: struct.Struct, offset: int, what: str) -> tuple:
        if offset < 0 or offset + st.size > self.length:
            raise ImageError("%s out of range (offset %d of a %d-byte image)" % (what, offset, self.length))
        return st.unpack_from(self.data, offset)

    def _charge(self, nbytes: int, what: str) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise ImageError(
                "%s: image structures overlap or loop (more data referenced than the %d-byte image holds)"
                % (what, self.length)
            )

    # -- superblock ------------------------------------------------------
    def _parse_super(self) -> None:
        # The header first: a short text file is "not an image", not "too small".
        _check_header(self.data)
        if self.length < fmt.BLOCK_SIZE:
            raise ImageError("image too small (%d bytes, a composefs image has at least %d)" % (self.length, fmt.BLOCK_SIZE))
        sb = fmt.EROFS_SUPER.unpack_from(self.data, fmt.EROFS_SUPER_OFFSET)
        (magic, _checksum, _compat, blkszbits, _extslots, root_nid, _inos, build_time, build_time_nsec,
         _blocks, meta_blkaddr, xattr_blkaddr) = sb[:12]
        feature_incompat = sb[14]
        if magic != fmt.EROFS_SUPER_MAGIC:
            raise ImageError("bad EROFS superblock magic 0x%08x" % magic)
        if blkszbits != fmt.BLOCK_BITS:
            raise ImageError("unsupported EROFS block size 2^%d (composefs uses 4096)" % blkszbits)
        unknown = feature_incompat & ~fmt.EROFS_FEATURE_INCOMPAT_CHUNKED_FILE
        if unknown:
            raise ImageError("unsupported EROFS incompatible features 0x%x" % unknown)
        self.meta_base = meta_blkaddr * fmt.BLOCK_SIZE
        self.xattr_base = xattr_blkaddr * fmt.BLOCK_SIZE
        if self.meta_base >= self.length or self.xattr_base >= self.length:
            raise ImageError("superblock metadata/xattr block address beyond the end of the image")
        self.build_time = _signed64(build_time)
        self.build_time_nsec = build_time_nsec
        self.root_nid = root_nid

    # -- inodes ----------------------------------------------------------
    def _decode_inode(self, nid: int) -> Tuple[_Inode, int, int, int, int, int, int]:
        """The fixed part of inode ``nid``: (inode, mode, uid, gid, nlink, mtime, mtime_nsec)."""
        offset = self.meta_base + nid * SLOT_SIZE
        if offset >= self.length:
            raise ImageError("inode nid %d is beyond the end of the image" % nid)
        # Bounds checked here rather than by _unpack(): its message would be
        # formatted for every inode of the image, not just for a bad one.
        if offset + _U16.size > self.length:
            self._unpack(_U16, offset, "inode %d" % nid)
        (i_format,) = _U16.unpack_from(self.data, offset)
        compact = (i_format & EROFS_I_VERSION_MASK) == EROFS_INODE_LAYOUT_COMPACT
        layout = (i_format >> EROFS_I_DATALAYOUT_BIT) & EROFS_I_DATALAYOUT_MASK
        st = EROFS_INODE_COMPACT if compact else EROFS_INODE_EXTENDED
        if offset + st.size > self.length:
            self._unpack(st, offset, "inode %d" % nid)
        if compact:
            (_format, icount, mode, nlink, size, _reserved, i_u, _ino, uid, gid, _reserved2) = st.unpack_from(self.data, offset)
            mtime, mtime_nsec = self.build_time, self.build_time_nsec
        else:
            (_format, icount, mode, _reserved, size, i_u, _ino, uid, gid, mtime, mtime_nsec, nlink) = st.unpack_from(self.data, offset)
            mtime = _signed64(mtime)
        if mode & _S_IFMT not in _VALID_TYPES:
            raise ImageError("inode %d has invalid mode 0%o" % (nid, mode))
        return _Inode(offset, compact, layout, st.size, icount, size, i_u), mode, uid, gid, nlink, mtime, mtime_nsec

    def _inode(self, nid: int) -> Tuple[_Inode, Node]:
        ino, mode, uid, gid, nlink, mtime, mtime_nsec = self._decode_inode(nid)
        # Positional: Node(mode, uid, gid, rdev, nlink, size, mtime_sec, mtime_nsec).
        rdev = ino.i_u if mode & _S_IFMT in (stat.S_IFCHR, stat.S_IFBLK) else 0
        node = Node(mode, uid, gid, rdev, nlink, ino.size, mtime, mtime_nsec)
        return ino, node

    def external_ref(self, nid: int) -> Tuple[int, Optional[bytes], Optional[bytes], int]:
        """(file type, redirect payload, metacopy digest, size) of inode ``nid``,
        decoding only what tells whether a regular file's data is external."""
        ino, mode, _uid, _gid, _nlink, _mtime, _nsec = self._decode_inode(nid)
        ftype = stat.S_IFMT(mode)
        if ftype != stat.S_IFREG:
            return ftype, None, None, 0
        if ino.size and ino.layout in (fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE):
            return ftype, None, None, ino.size  # data in the image itself
        if ino.layout == fmt.EROFS_INODE_CHUNK_BASED:
            self._check_chunks(nid, ino)
        elif ino.size:
            raise ImageError("inode %d: unsupported data layout %d for a regular file" % (nid, ino.layout))
        xattr_size = self._xattr_size(ino)
        xattr_start = ino.offset + ino.isize
        if xattr_start + xattr_size > self.length:
            raise ImageError("inode %d: xattrs run past the end of the image" % nid)
        self._charge(ino.isize + xattr_size, "inode %d" % nid)
        if not xattr_size:
            return ftype, None, None, ino.size
        payload: Optional[bytes] = None
        digest: Optional[bytes] = None
        for name, value_start, value_size, _value in self._xattr_entries(nid, xattr_start, xattr_size):
            # The same rules as _apply_xattr(): the last one of a name wins.
            if name == _ESCAPED_WHITEOUT:
                return stat.S_IFCHR, None, None, 0  # read back as a whiteout, not a file
            if name == _REDIRECT:
                payload = self._redirect_payload(value_start, value_size)
            elif name == _METACOPY and value_size == _METACOPY_SIZE:
                start = value_start + fmt.OVL_METACOPY_HEADER.size
                digest = self._slice(start, start + DIGEST_SIZE, "metacopy")
        return ftype, payload, digest, ino.size

    def _xattr_size(self, ino: _Inode) -> int:
        if ino.xattr_icount == 0:
            return 0
        return fmt.EROFS_XATTR_IBODY_HEADER.size + (ino.xattr_icount - 1) * fmt.EROFS_XATTR_ENTRY.size

    def build(self, nid: int, toplevel_filter: Optional[frozenset]) -> Tuple[Optional[Node], List[Tuple[bytes, int]]]:
        """Decode inode ``nid``: (node or None for a skipped 0/0 chardev, its directory entries)."""
        ino, node = self._inode(nid)
        if node.rdev == 0 and stat.S_ISCHR(node.mode):
            return None, []
        xattr_size = self._xattr_size(ino)
        xattr_start = ino.offset + ino.isize
        tail_start = xattr_start + xattr_size
        tailpacked = ino.layout == EROFS_INODE_FLAT_INLINE
        size = ino.size
        tail_size = size % BLOCK_SIZE if tailpacked else 0
        if tail_start + tail_size > self.length:
            raise ImageError("inode %d: xattrs or inline data run past the end of the image" % nid)
        self.budget -= ino.isize + xattr_size + tail_size
        if self.budget < 0:
            self._charge(0, "inode %d" % nid)  # raises; the name is formatted only then

        entries: List[Tuple[bytes, int]] = []
        ftype = node.mode & _S_IFMT
        if ftype == stat.S_IFDIR:
            entries = self._read_dir(nid, ino, tail_start, tail_size, toplevel_filter)
        elif ftype == stat.S_IFLNK:
            node.payload = self._read_symlink(nid, ino, tail_start)
            node.size = len(node.payload)
        elif ftype == stat.S_IFREG and size != 0:
            if ino.layout in (fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE):
                node.content = self._read_content(nid, ino, tail_start, tail_size)
            elif ino.layout == fmt.EROFS_INODE_CHUNK_BASED:
                self._check_chunks(nid, ino)
            else:
                raise ImageError("inode %d: unsupported data layout %d for a regular file" % (nid, ino.layout))
        if xattr_size:
            self._read_xattrs(nid, node, xattr_start, xattr_size)
        return node, entries

    def _data_blocks(self, nid: int, blkaddr: int, nbytes: int) -> int:
        start = blkaddr * fmt.BLOCK_SIZE
        if start + nbytes > self.length:
            raise ImageError("inode %d: data blocks lie beyond the end of the image" % nid)
        self._charge(nbytes, "inode %d" % nid)
        return start

    def _read_symlink(self, nid: int, ino: _Inode, tail_start: int) -> bytes:
        size = ino.size
        if ino.layout not in (fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE):
            raise ImageError("inode %d: unsupported data layout %d for a symlink" % (nid, ino.layout))
        if size >= PATH_MAX:
            raise ImageError("inode %d: symlink target too long (%d bytes)" % (nid, size))
        if ino.layout == fmt.EROFS_INODE_FLAT_INLINE:
            raw = self._slice(tail_start, tail_start + size, "symlink target")
        else:
            start = self._data_blocks(nid, ino.i_u, size)
            raw = self._slice(start, start + size, "symlink target")
        target = _cstr(raw)
        if not target:
            raise ImageError("inode %d: empty symlink target" % nid)
        return target

    def _read_content(self, nid: int, ino: _Inode, tail_start: int, tail_size: int) -> bytes:
        size = ino.size
        if size > min(INLINE_CONTENT_MAX, self.length):
            raise ImageError("inode %d: inline file content too large (%d bytes)" % (nid, size))
        if ino.layout == fmt.EROFS_INODE_FLAT_INLINE:
            if tail_size == 0:
                raise ImageError("inode %d: inline layout without an inline tail" % nid)
            oob_size = size - tail_size
        else:
            oob_size = size
        content = b""
        if oob_size:
            start = self._data_blocks(nid, ino.i_u, oob_size)
            content = self._slice(start, start + oob_size, "file content")
        if tail_size:
            content += self._slice(tail_start, tail_start + tail_size, "inline file content")
        return content

    def _check_chunks(self, nid: int, ino: _Inode) -> None:
        chunk_format = ino.i_u & 0xFFFF
        if chunk_format & ~fmt.EROFS_CHUNK_FORMAT_BLKBITS_MASK or ino.i_u >> 16:
            raise ImageError("inode %d: unsupported chunk format 0x%x" % (nid, ino.i_u))
        chunk_bits = fmt.BLOCK_BITS + (chunk_format & fmt.EROFS_CHUNK_FORMAT_BLKBITS_MASK)
        chunks = (ino.size + (1 << chunk_bits) - 1) >> chunk_bits
        if chunks > fmt.EROFS_CHUNKS_MAX:
            raise ImageError("inode %d: file needs %d chunks (at most %d supported)" % (nid, chunks, fmt.EROFS_CHUNKS_MAX))
        # The block map itself is not checked: it is all holes in C-written
        # images, and for a 1024-chunk file the C writer moves it out of the
        # inode (into a data block), so it is not even at the EROFS offset.

    # -- directories -----------------------------------------------------
    def _read_dir(
        self, nid: int, ino: _Inode, tail_start: int, tail_size: int, toplevel_filter: Optional[frozenset]
    ) -> List[Tuple[bytes, int]]:
        size = ino.size
        tailpacked = ino.layout == fmt.EROFS_INODE_FLAT_INLINE
        if ino.layout not in (fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE):
            raise ImageError("inode %d: unsupported data layout %d for a directory" % (nid, ino.layout))
        n_blocks = (size + fmt.BLOCK_SIZE - 1) // fmt.BLOCK_SIZE
        if tailpacked:
            if size and tail_size == 0:
                raise ImageError("inode %d: inline directory without an inline tail" % nid)
            oob_blocks = max(n_blocks - 1, 0)
        else:
            oob_blocks = n_blocks
        entries: List[Tuple[bytes, int]] = []
        if oob_blocks:
            start = self._data_blocks(nid, ino.i_u, oob_blocks * fmt.BLOCK_SIZE if tailpacked else size)
            for block in range(oob_blocks):
                block_size = fmt.BLOCK_SIZE
                if not tailpacked and block + 1 == oob_blocks:
                    block_size = size % fmt.BLOCK_SIZE or fmt.BLOCK_SIZE
                off = start + block * fmt.BLOCK_SIZE
                self._read_dir_block(nid, self._slice(off, off + block_size, "directory block"), entries, toplevel_filter)
        if tailpacked and tail_size:
            self._read_dir_block(nid, self._slice(tail_start, tail_start + tail_size, "inline directory"), entries, toplevel_filter)
        return entries

    def _read_dir_block(
        self, nid: int, block: bytes, entries: List[Tuple[bytes, int]], toplevel_filter: Optional[frozenset]
    ) -> None:
        block_size = len(block)
        dirent = fmt.EROFS_DIRENT
        if block_size < dirent.size:
            raise ImageError("directory inode %d: block of %d bytes cannot hold a dirent" % (nid, block_size))
        dirents_size = dirent.unpack_from(block, 0)[1]
        if dirents_size % dirent.size != 0 or dirents_size > block_size:
            raise ImageError("directory inode %d: corrupt dirent table (nameoff %d)" % (nid, dirents_size))
        count = dirents_size // dirent.size
        parsed = [dirent.unpack_from(block, i * dirent.size) for i in range(count)]
        for i, (child_nid, nameoff, _ftype) in enumerate(parsed):
            end = parsed[i + 1][1] if i + 1 < count else block_size
            if nameoff < dirents_size or end < nameoff or end > block_size:
                raise ImageError("directory inode %d: dirent %d name offset out of range or out of order" % (nid, i))
            raw = block[nameoff:end]
            if i + 1 == count:
                raw = _cstr(raw)  # the last name runs to a NUL or the block end
            if raw in (b".", b".."):
                continue
            name = _cstr(raw)
            if not name or name in (b".", b"..") or b"/" in name or len(name) > NAME_MAX:
                raise ImageError("directory inode %d: invalid entry name %r" % (nid, name[:300]))
            if toplevel_filter is not None and name not in toplevel_filter:
                continue
            entries.append((name, child_nid))

    # -- xattrs ----------------------------------------------------------
    def _xattr_entries(self, nid: int, start: int, xattr_size: int) -> Iterator[Tuple[bytes, int, int, Optional[bytes]]]:
        """(name, value offset, value size, value if already read) of an inode's
        xattrs: the inline entries, then the shared ones, as the C reader takes them."""
        header = fmt.EROFS_XATTR_IBODY_HEADER
        end = start + xattr_size
        if xattr_size < header.size:
            raise ImageError("inode %d: xattr area too small" % nid)
        shared_count = self._unpack(header, start, "xattr header")[1]
        pos = start + header.size + shared_count * 4
        if pos > end:
            raise ImageError("inode %d: %d shared xattr ids do not fit the xattr area" % (nid, shared_count))
        entry = fmt.EROFS_XATTR_ENTRY
        # The C reader takes an entry only while its header ends before the area does.
        while pos + entry.size < end:
            name_len, index, value_size = entry.unpack_from(self.data, pos)
            name_start = pos + entry.size
            value_start = name_start + name_len
            value_end = value_start + value_size
            if value_end > end:
                raise ImageError("inode %d: xattr entry runs past the xattr area" % nid)
            yield self._xattr_name(nid, index, name_start, name_len), value_start, value_size, None
            pos += fmt.round_up(entry.size + name_len + value_size, 4)
        for i in range(shared_count):
            (idx,) = _U32.unpack_from(self.data, start + header.size + i * 4)
            cached = self.shared_cache.get(idx)
            if cached is None:
                cached = self._shared_entry(nid, idx)
            _entry_size, name, value, value_start, value_size = cached
            yield name, value_start, value_size, value

    def _read_xattrs(self, nid: int, node: Node, start: int, xattr_size: int) -> None:
        xattrs = _XattrList()
        for name, value_start, value_size, value in self._xattr_entries(nid, start, xattr_size):
            self._apply_xattr(node, xattrs, name, value_start, value_size, value)
        node.xattrs = dict(xattrs.items)

    def _xattr_name(self, nid: int, index: int, name_start: int, name_len: int) -> bytes:
        if index == 0:
            prefix = b""
        else:
            prefix = fmt.XATTR_PREFIX_BY_INDEX.get(index)
            if prefix is None:
                raise ImageError("inode %d: unknown xattr name index %d" % (nid, index))
        return _cstr(prefix + self._slice(name_start, name_start + name_len, "xattr name"))

    def _shared_entry(self, nid: int, idx: int) -> Tuple[int, bytes, bytes, int, int]:
        pos = self.xattr_base + idx * 4
        name_len, index, value_size = self._unpack(fmt.EROFS_XATTR_ENTRY, pos, "shared xattr %d" % idx)
        name_start = pos + fmt.EROFS_XATTR_ENTRY.size
        value_start = name_start + name_len
        name = self._xattr_name(nid, index, name_start, name_len)
        value = self._slice(value_start, value_start + value_size, "shared xattr %d" % idx)
        # Each distinct entry is decoded once; well-formed tables never overlap.
        self._charge(value_start + value_size - pos, "shared xattr %d" % idx)
        result = (idx, name, value, value_start, value_size)
        self.shared_cache[idx] = result
        return result

    def _redirect_payload(self, value_start: int, value_size: int) -> bytes:
        key = (value_start, value_size)
        payload = self.payload_cache.get(key)
        if payload is not None:
            return payload
        raw = self._slice(value_start, value_start + value_size, "redirect")
        if value_size > 1 and raw[:1] == b"/":
            # libcomposefs 1.0.8 skips the '/' but then grows the length
            # instead of shrinking it, so strndup() reads up to two bytes past
            # the value (the entry's zero padding in C-written images, else
            # whatever follows).  Reproduced so payloads match the C tools.
            stop = min(value_start + value_size + 2, self.length)
            raw = self._slice(value_start + 1, stop, "redirect")
        payload = _cstr(raw)
        self.payload_cache[key] = payload
        return payload

    def _apply_xattr(
        self, node: Node, xattrs: _XattrList, name: bytes, value_start: int, value_size: int, value: Optional[bytes]
    ) -> None:
        """One xattr, with lcfs_build_node_erofs_xattr()'s special cases."""
        is_reg = stat.S_ISREG(node.mode)
        if name == _REDIRECT:
            if is_reg:
                node.payload = self._redirect_payload(value_start, value_size)
            return
        if name == _METACOPY:
            if is_reg and value_size == _METACOPY_SIZE:
                start = value_start + fmt.OVL_METACOPY_HEADER.size
                node.digest = self._slice(start, start + DIGEST_SIZE, "metacopy")
            return
        if name == _ESCAPED_WHITEOUT and is_reg:
            node.mode = (node.mode & ~stat.S_IFMT(node.mode)) | stat.S_IFCHR
            node.rdev = 0
            node.size = 0
            if node.content is not None:
                node.content = b""
            return
        if name in _HIDDEN_MARKERS:
            return
        if name.startswith(fmt.OVERLAY_XATTR_PREFIX):
            if not name.startswith(fmt.OVERLAY_XATTR_ESCAPED_PREFIX):
                return  # internal: root opaque and the like
            name = _TRUSTED_PREFIX + name[len(fmt.OVERLAY_XATTR_PREFIX):]
        if value is None:
            value = self._slice(value_start, value_start + value_size, "xattr value")
        xattrs.set(name, value)


def _check_header(data: ImageData) -> Tuple[int, int, int, int]:
    if bytes(data[:1]) == b"/":
        # What a composefs-dump(5) file starts with (the root's line), never an image.
        raise ImageError("not a composefs image: it starts like a composefs-dump text file "
                         "(mkcomposefs --from-file makes an image of one)")
    if len(data) < fmt.COMPOSEFS_HEADER.size:
        raise ImageError("image too small for a composefs header (%d bytes)" % len(data))
    magic, version, flags, composefs_version = fmt.COMPOSEFS_HEADER.unpack_from(data, 0)
    if magic != fmt.COMPOSEFS_MAGIC:
        raise ImageError("not a composefs image (bad magic 0x%08x)" % magic)
    if version != fmt.COMPOSEFS_HEADER_VERSION:
        raise ImageError("unsupported composefs header version %d" % version)
    return magic, version, flags, composefs_version


def image_version(data: ImageData) -> int:
    """The ``composefs_version`` (image format version) recorded in the header."""
    return _check_header(data)[3]


def read_image(data: ImageData, toplevel_filter: Optional[Collection[bytes]] = None) -> Node:
    """Decode a whole composefs image held in memory.

    ``toplevel_filter``, if given, restricts the root to those entry names
    (like ``composefs-info --filter``); everything below them is loaded.
    """
    with gc_paused():
        return _read_image(data, toplevel_filter)


def _read_image(data: ImageData, toplevel_filter: Optional[Collection[bytes]]) -> Node:
    reader = _Reader(data)
    filter_set = None if toplevel_filter is None else frozenset(bytes(name) for name in toplevel_filter)
    root, entries = reader.build(reader.root_nid, filter_set)
    if root is None or not root.is_dir():
        raise ImageError("root inode %d is not a directory" % reader.root_nid)
    reader.visited[reader.root_nid] = root
    # Depth-first in directory order, as the C reader recurses: the first
    # entry reaching an inode owns it, later ones become hard links.
    stack: List[Tuple[Node, List[Tuple[bytes, int]], int]] = [(root, entries, 0)]
    while stack:
        parent, entries, pos = stack[-1]
        if pos == len(entries):
            stack.pop()
            continue
        stack[-1] = (parent, entries, pos + 1)
        name, nid = entries[pos]
        if name in parent.children:
            raise ImageError("duplicate entry %r in directory %r" % (name, parent.path()))
        if nid in reader.visited:
            target = reader.visited[nid]
            if target is None:
                continue  # another entry for a skipped 0/0 chardev
            if target.is_dir():
                raise ImageError("directory inode %d is reached twice (directory loop or hard link)" % nid)
            alias = Node(target.mode)
            alias.link_to = target
            parent.replace_child(name, alias)
            continue
        child, child_entries = reader.build(nid, None)
        reader.visited[nid] = child
        if child is None:
            continue
        parent.replace_child(name, child)
        if child.is_dir():
            stack.append((child, child_entries, 0))
    return root


def iter_external_files(data: ImageData) -> Iterator[Tuple[int, Optional[bytes], Optional[bytes], int]]:
    """(inode nid, redirect payload, metacopy digest, size) of every regular
    file whose data lives outside the image, each inode once.

    The same hostile-image checks as :func:`read_image`, but no tree is kept:
    memory is bounded by the directory depth and the number of inodes, not by
    the size of their metadata (the agent lists the objects of 100,000-file
    images this way on every node).
    """
    with gc_paused():
        reader = _Reader(data)
        root, entries = reader.build(reader.root_nid, None)
        if root is None or not root.is_dir():
            raise ImageError("root inode %d is not a directory" % reader.root_nid)
        seen: Set[int] = {reader.root_nid}
        stack: List[Tuple[List[Tuple[bytes, int]], int]] = [(entries, 0)]
        while stack:
            entries, pos = stack[-1]
            if pos == len(entries):
                stack.pop()
                continue
            stack[-1] = (entries, pos + 1)
            nid = entries[pos][1]
            if nid in seen:
                continue  # a hard link (directories reached twice fail in read_image; here they are simply not re-entered)
            seen.add(nid)
            ftype, payload, digest, size = reader.external_ref(nid)
            if ftype == stat.S_IFDIR:
                child, child_entries = reader.build(nid, None)
                if child is not None:
                    stack.append((child_entries, 0))
            elif payload is not None or digest is not None:
                yield nid, payload, digest, size
            # Redirects are per file: caching them (read_image dedups equal ones) would only hold memory.
            reader.payload_cache.clear()


def read_image_fd(fd: int, toplevel_filter: Optional[Collection[bytes]] = None) -> Node:
    """Decode the composefs image open at ``fd`` (mapped read-only; ``fd`` stays open).

    Only a regular file is an image: a directory would fail to map with
    "No such device", a FIFO or device would be read without end.
    """
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("is a directory, not a composefs image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (%s), so not a composefs image" % _file_kind(st.st_mode))
    size = st.st_size
    if size == 0:
        raise ImageError("image is empty")
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        return read_image(mm, toplevel_filter)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "file type 0o%o" % stat.S_IFMT(mode)


def open_image(path: Union[str, bytes, "os.PathLike[str]"]) -> int:
    """An fd for reading the image at ``path``; never blocks on a FIFO
    (O_NONBLOCK: read_image_fd then refuses anything but a regular file)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)


def read_image_file(path: Union[str, bytes, "os.PathLike[str]"], toplevel_filter: Optional[Collection[bytes]] = None) -> Node:
    """Decode the composefs image at ``path`` (mapped read-only)."""
    fd = open_image(path)
    try:
        return read_image_fd(fd, toplevel_filter)
    finally:
        os.close(fd)
