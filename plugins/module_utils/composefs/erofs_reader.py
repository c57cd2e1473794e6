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
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
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
_unpack_compact = EROFS_INODE_COMPACT.unpack_from
_unpack_extended = EROFS_INODE_EXTENDED.unpack_from
_COMPACT_SIZE = EROFS_INODE_COMPACT.size
_EXTENDED_SIZE = EROFS_INODE_EXTENDED.size
_unpack_xattr_entry = fmt.EROFS_XATTR_ENTRY.unpack_from
_XATTR_ENTRY_SIZE = fmt.EROFS_XATTR_ENTRY.size
_XATTR_HEADER_SIZE = fmt.EROFS_XATTR_IBODY_HEADER.size
# h_shared_count: the byte after the 32-bit name filter.
_XATTR_SHARED_COUNT_OFFSET = 4
_DIRENT_SIZE = fmt.EROFS_DIRENT.size
_iter_dirents = fmt.EROFS_DIRENT.iter_unpack
# Name prefix by e_name_index; 0 is no prefix.
_PREFIX_BY_INDEX = dict(fmt.XATTR_PREFIX_BY_INDEX)
_PREFIX_BY_INDEX[0] = b""

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
_SLASH = ord("/")
_OVERLAY_PREFIX = fmt.OVERLAY_XATTR_PREFIX
_OVERLAY_ESCAPED_PREFIX = fmt.OVERLAY_XATTR_ESCAPED_PREFIX
_METACOPY_HEADER_SIZE = fmt.OVL_METACOPY_HEADER.size
_METACOPY_SIZE = _METACOPY_HEADER_SIZE + DIGEST_SIZE

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


def _xattr_size(xattr_icount: int) -> int:
    """Bytes of an inode's xattr area: the header and the 4-byte units after it."""
    return _XATTR_HEADER_SIZE + (xattr_icount - 1) * _XATTR_ENTRY_SIZE if xattr_icount else 0


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


# Fields of _Reader._decode_inode(): (offset, layout, inode size, xattr_icount,
# size, i_u, mode, uid, gid, nlink, mtime, mtime_nsec).
_InodeFields = Tuple[int, int, int, int, int, int, int, int, int, int, int, int]


class _Reader:
    def __init__(self, data: ImageData) -> None:
        if not isinstance(data, (bytes, mmap.mmap)):
            # Slices of these would be views or bytearrays; the walk wants
            # bytes from every slice without converting each one.
            data = bytes(data)
        self.data = data
        self.length = len(data)
        # Bytes of inode, xattr and data areas the walk may still consume.
        # A well-formed image stores each of these bytes once, so it needs at
        # most its own size; overlapping or looping structures run out.
        self.budget = self.length
        # nid -> its node, or None for a skipped 0/0 chardev.
        self.visited: Dict[int, Optional[Node]] = {}
        self.shared_cache: Dict[int, Tuple[int, bytes, bytes, int, int]] = {}
        # Redirects of shared xattr entries, by value offset: equal ones are one object.
        self.payload_cache: Dict[int, bytes] = {}
        self._parse_super()

    # -- low-level access ------------------------------------------------
    def _slice(self, start: int, end: int, what: str) -> bytes:
        if start < 0 or end < start or end > self.length:
            raise ImageError("%s out of range (bytes %d..%d of a %d-byte image)" % (what, start, end, self.length))
        return self.data[start:end]

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
    def _decode_inode(self, nid: int) -> _InodeFields:
        """The fixed part of inode ``nid`` (see _InodeFields)."""
        data = self.data
        offset = self.meta_base + nid * SLOT_SIZE
        if offset + _EXTENDED_SIZE > self.length:
            # Only near the end of the image can an inode be cut short.
            self._check_inode_fits(nid, offset)
        # i_format's low byte holds the version bit and the layout.
        i_format = data[offset]
        if i_format & EROFS_I_VERSION_MASK == EROFS_INODE_LAYOUT_COMPACT:
            (_format, icount, mode, nlink, size, _reserved, i_u, _ino, uid, gid, _reserved2) = _unpack_compact(data, offset)
            mtime, mtime_nsec = self.build_time, self.build_time_nsec
            isize = _COMPACT_SIZE
        else:
            (_format, icount, mode, _reserved, size, i_u, _ino, uid, gid, mtime, mtime_nsec, nlink) = _unpack_extended(data, offset)
            if mtime >= 1 << 63:
                mtime -= 1 << 64
            isize = _EXTENDED_SIZE
        if mode & _S_IFMT not in _VALID_TYPES:
            raise ImageError("inode %d has invalid mode 0%o" % (nid, mode))
        layout = (i_format >> EROFS_I_DATALAYOUT_BIT) & EROFS_I_DATALAYOUT_MASK
        return offset, layout, isize, icount, size, i_u, mode, uid, gid, nlink, mtime, mtime_nsec

    def _check_inode_fits(self, nid: int, offset: int) -> None:
        if offset >= self.length:
            raise ImageError("inode nid %d is beyond the end of the image" % nid)
        (i_format,) = self._unpack(_U16, offset, "inode %d" % nid)
        compact = (i_format & EROFS_I_VERSION_MASK) == EROFS_INODE_LAYOUT_COMPACT
        self._unpack(EROFS_INODE_COMPACT if compact else EROFS_INODE_EXTENDED, offset, "inode %d" % nid)

    def external_ref(self, nid: int) -> Tuple[int, Optional[bytes], Optional[bytes], int]:
        """(file type, redirect payload, metacopy digest, size) of inode ``nid``,
        decoding only what tells whether a regular file's data is external:
        nothing of a directory or other file but its type."""
        offset, layout, isize, icount, size, i_u, mode = self._decode_inode(nid)[:7]
        ftype = mode & _S_IFMT
        if ftype != stat.S_IFREG:
            return ftype, None, None, 0
        if size and layout in (fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE):
            return ftype, None, None, size  # data in the image itself
        if layout == fmt.EROFS_INODE_CHUNK_BASED:
            self._check_chunks(nid, size, i_u)
        elif size:
            raise ImageError("inode %d: unsupported data layout %d for a regular file" % (nid, layout))
        xattr_size = _xattr_size(icount)
        xattr_start = offset + isize
        if xattr_start + xattr_size > self.length:
            raise ImageError("inode %d: xattrs run past the end of the image" % nid)
        self._charge(isize + xattr_size, "inode %d" % nid)
        if not xattr_size:
            return ftype, None, None, size
        # The xattrs as read_image() takes them (the same checks; the last
        # redirect or metacopy wins), on a node that is not kept.
        node = Node(mode)
        self._read_xattrs(nid, node, xattr_start, xattr_size)
        if node.mode & _S_IFMT != stat.S_IFREG:
            return stat.S_IFCHR, None, None, 0  # an escaped whiteout: read back as one, not as a file
        return ftype, node.payload, node.digest, size

    def build(self, nid: int, toplevel_filter: Optional[frozenset]) -> Tuple[Optional[Node], List[Tuple[bytes, int]]]:
        """Decode inode ``nid``: (node or None for a skipped 0/0 chardev, its directory entries)."""
        offset, layout, isize, icount, size, i_u, mode, uid, gid, nlink, mtime, mtime_nsec = self._decode_inode(nid)
        ftype = mode & _S_IFMT
        if ftype == stat.S_IFCHR or ftype == stat.S_IFBLK:
            if i_u == 0 and ftype == stat.S_IFCHR:
                return None, []
            rdev = i_u
        else:
            rdev = 0
        # Positional: Node(mode, uid, gid, rdev, nlink, size, mtime_sec, mtime_nsec).
        node = Node(mode, uid, gid, rdev, nlink, size, mtime, mtime_nsec)
        xattr_size = _xattr_size(icount)
        xattr_start = offset + isize
        tail_start = xattr_start + xattr_size
        tail_size = size % BLOCK_SIZE if layout == EROFS_INODE_FLAT_INLINE else 0
        if tail_start + tail_size > self.length:
            raise ImageError("inode %d: xattrs or inline data run past the end of the image" % nid)
        self.budget -= isize + xattr_size + tail_size
        if self.budget < 0:
            self._charge(0, "inode %d" % nid)  # raises; the name is formatted only then

        entries: List[Tuple[bytes, int]] = []
        if ftype == stat.S_IFREG:
            if size:
                if layout == EROFS_INODE_CHUNK_BASED:
                    self._check_chunks(nid, size, i_u)
                elif layout == EROFS_INODE_FLAT_INLINE or layout == EROFS_INODE_FLAT_PLAIN:
                    node.content = self._read_content(nid, layout, size, i_u, tail_start, tail_size)
                else:
                    raise ImageError("inode %d: unsupported data layout %d for a regular file" % (nid, layout))
        elif ftype == stat.S_IFDIR:
            entries = self._read_dir(nid, layout, size, i_u, tail_start, tail_size, toplevel_filter)
        elif ftype == stat.S_IFLNK:
            node.payload = self._read_symlink(nid, layout, size, i_u, tail_start)
            node.size = len(node.payload)
        if xattr_size:
            self._read_xattrs(nid, node, xattr_start, xattr_size)
        return node, entries

    def _data_blocks(self, nid: int, blkaddr: int, nbytes: int) -> int:
        start = blkaddr * fmt.BLOCK_SIZE
        if start + nbytes > self.length:
            raise ImageError("inode %d: data blocks lie beyond the end of the image" % nid)
        self._charge(nbytes, "inode %d" % nid)
        return start

    def _read_symlink(self, nid: int, layout: int, size: int, i_u: int, tail_start: int) -> bytes:
        if layout not in (fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE):
            raise ImageError("inode %d: unsupported data layout %d for a symlink" % (nid, layout))
        if size >= PATH_MAX:
            raise ImageError("inode %d: symlink target too long (%d bytes)" % (nid, size))
        if layout == fmt.EROFS_INODE_FLAT_INLINE:
            raw = self._slice(tail_start, tail_start + size, "symlink target")
        else:
            start = self._data_blocks(nid, i_u, size)
            raw = self._slice(start, start + size, "symlink target")
        target = _cstr(raw)
        if not target:
            raise ImageError("inode %d: empty symlink target" % nid)
        return target

    def _read_content(self, nid: int, layout: int, size: int, i_u: int, tail_start: int, tail_size: int) -> bytes:
        if size > min(INLINE_CONTENT_MAX, self.length):
            raise ImageError("inode %d: inline file content too large (%d bytes)" % (nid, size))
        if layout == fmt.EROFS_INODE_FLAT_INLINE:
            if tail_size == 0:
                raise ImageError("inode %d: inline layout without an inline tail" % nid)
            oob_size = size - tail_size
        else:
            oob_size = size
        content = b""
        if oob_size:
            start = self._data_blocks(nid, i_u, oob_size)
            content = self._slice(start, start + oob_size, "file content")
        if tail_size:
            content += self._slice(tail_start, tail_start + tail_size, "inline file content")
        return content

    def _check_chunks(self, nid: int, size: int, i_u: int) -> None:
        chunk_format = i_u & 0xFFFF
        if chunk_format & ~fmt.EROFS_CHUNK_FORMAT_BLKBITS_MASK or i_u >> 16:
            raise ImageError("inode %d: unsupported chunk format 0x%x" % (nid, i_u))
        chunk_bits = fmt.BLOCK_BITS + (chunk_format & fmt.EROFS_CHUNK_FORMAT_BLKBITS_MASK)
        chunks = (size + (1 << chunk_bits) - 1) >> chunk_bits
        if chunks > fmt.EROFS_CHUNKS_MAX:
            raise ImageError("inode %d: file needs %d chunks (at most %d supported)" % (nid, chunks, fmt.EROFS_CHUNKS_MAX))
        # The block map itself is not checked: it is all holes in C-written
        # images, and for a 1024-chunk file the C writer moves it out of the
        # inode (into a data block), so it is not even at the EROFS offset.

    # -- directories -----------------------------------------------------
    def _read_dir(
        self, nid: int, layout: int, size: int, i_u: int, tail_start: int, tail_size: int,
        toplevel_filter: Optional[frozenset]
    ) -> List[Tuple[bytes, int]]:
        tailpacked = layout == fmt.EROFS_INODE_FLAT_INLINE
        if layout not in (fmt.EROFS_INODE_FLAT_PLAIN, fmt.EROFS_INODE_FLAT_INLINE):
            raise ImageError("inode %d: unsupported data layout %d for a directory" % (nid, layout))
        n_blocks = (size + fmt.BLOCK_SIZE - 1) // fmt.BLOCK_SIZE
        if tailpacked:
            if size and tail_size == 0:
                raise ImageError("inode %d: inline directory without an inline tail" % nid)
            oob_blocks = max(n_blocks - 1, 0)
        else:
            oob_blocks = n_blocks
        entries: List[Tuple[bytes, int]] = []
        if oob_blocks:
            start = self._data_blocks(nid, i_u, oob_blocks * fmt.BLOCK_SIZE if tailpacked else size)
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
        if block_size < _DIRENT_SIZE:
            raise ImageError("directory inode %d: block of %d bytes cannot hold a dirent" % (nid, block_size))
        (dirents_size,) = _U16.unpack_from(block, 8)  # the first entry's nameoff
        if dirents_size % _DIRENT_SIZE != 0 or dirents_size > block_size:
            raise ImageError("directory inode %d: corrupt dirent table (nameoff %d)" % (nid, dirents_size))
        parsed = list(_iter_dirents(block[:dirents_size]))
        if not parsed or toplevel_filter is not None:
            self._read_dirents(nid, block, parsed, entries, toplevel_filter)
            return
        # The whole block at once when it is well-formed: name offsets
        # strictly increasing from the end of the table, no name empty, too
        # long or holding a "/", and no NUL before the end of the last name.
        # Otherwise the entries are taken one by one, each with its own check.
        nameoffs = [nameoff for _child, nameoff, _ftype in parsed]
        last_start = nameoffs[-1]
        last = _cstr(block[last_start:])
        first = nameoffs[0]
        names_end = last_start + len(last)
        if (
            first < dirents_size or nameoffs != sorted(nameoffs) or len(set(nameoffs)) != len(nameoffs)
            or not last or names_end - first > len(nameoffs) * NAME_MAX
        ):
            self._read_dirents(nid, block, parsed, entries, toplevel_filter)
            return
        names_area = block[first:names_end]
        if b"/" in names_area or b"\0" in names_area:
            self._read_dirents(nid, block, parsed, entries, toplevel_filter)
            return
        names = [block[start:end] for start, end in zip(nameoffs, nameoffs[1:])]
        names.append(last)
        if max(map(len, names)) > NAME_MAX:
            self._read_dirents(nid, block, parsed, entries, toplevel_filter)
            return
        entries.extend([(name, child[0]) for name, child in zip(names, parsed) if name != b"." and name != b".."])

    def _read_dirents(
        self, nid: int, block: bytes, parsed: List[Tuple[int, int, int]], entries: List[Tuple[bytes, int]],
        toplevel_filter: Optional[frozenset]
    ) -> None:
        """_read_dir_block() entry by entry: any block, the error names the entry."""
        block_size = len(block)
        dirents_size = len(parsed) * _DIRENT_SIZE
        ends = [nameoff for _child, nameoff, _ftype in parsed]
        ends.append(block_size)
        last = len(parsed) - 1
        for i, (child_nid, nameoff, _ftype) in enumerate(parsed):
            end = ends[i + 1]
            if not dirents_size <= nameoff <= end <= block_size:
                raise ImageError("directory inode %d: dirent %d name offset out of range or out of order" % (nid, i))
            name = block[nameoff:end]
            if i == last:
                name = _cstr(name)  # the last name runs to a NUL or the block end
            if name == b"." or name == b"..":
                continue
            if b"\0" in name:
                name = _cstr(name)  # "." or ".." cut short by a NUL is not a name an entry may have
                dots = name == b"." or name == b".."
            else:
                dots = False
            if dots or not name or b"/" in name or len(name) > NAME_MAX:
                raise ImageError("directory inode %d: invalid entry name %r" % (nid, name[:300]))
            if toplevel_filter is not None and name not in toplevel_filter:
                continue
            entries.append((name, child_nid))

    # -- xattrs ----------------------------------------------------------
    def _read_xattrs(self, nid: int, node: Node, start: int, xattr_size: int) -> None:
        """An inode's xattrs, with lcfs_build_node_erofs_xattr()'s special cases:
        the overlay ones set the payload, the digest or the whiteout type, the
        bookkeeping ones are hidden, escaped ones lose their escape.

        The entries are decoded in the loop that applies them, the inline ones
        then the shared ones, as the C reader takes them: this runs for nearly
        every file of an image.  The area lies inside the image (the callers
        check) and holds at least the header (_xattr_size())."""
        data = self.data
        end = start + xattr_size
        shared_pos = start + _XATTR_HEADER_SIZE
        shared_end = shared_pos + data[start + _XATTR_SHARED_COUNT_OFFSET] * 4
        if shared_end > end:
            raise ImageError("inode %d: %d shared xattr ids do not fit the xattr area" % (nid, (shared_end - shared_pos) // 4))
        pos = shared_end
        prefixes = _PREFIX_BY_INDEX
        is_reg = node.mode & _S_IFMT == stat.S_IFREG
        xattrs: Optional[_XattrList] = None
        while True:
            # The C reader takes an inline entry only while its header ends
            # before the area does, then the shared ones.
            if pos + _XATTR_ENTRY_SIZE < end:
                name_len, index, value_size = _unpack_xattr_entry(data, pos)
                value_start = pos + _XATTR_ENTRY_SIZE + name_len
                if value_start + value_size > end:
                    raise ImageError("inode %d: xattr entry runs past the xattr area" % nid)
                prefix = prefixes.get(index)
                if prefix is None:
                    raise ImageError("inode %d: unknown xattr name index %d" % (nid, index))
                name = prefix + data[pos + _XATTR_ENTRY_SIZE:value_start]
                if b"\0" in name:
                    name = _cstr(name)
                value: Optional[bytes] = None
                pos = value_start + value_size + (-(name_len + value_size) & 3)
            elif shared_pos < shared_end:
                (idx,) = _U32.unpack_from(data, shared_pos)
                shared_pos += 4
                cached = self.shared_cache.get(idx)
                if cached is None:
                    cached = self._shared_entry(nid, idx)
                _idx, name, value, value_start, value_size = cached
            else:
                break
            if name == _REDIRECT:
                if not is_reg:
                    pass
                elif value is not None or value_size < 2 or data[value_start] != _SLASH:
                    node.payload = self._redirect_payload(value_start, value_size, value is not None)
                else:
                    # _redirect_payload() of a "/..." inline value (every
                    # external file of a C-written image), inlined.
                    stop = value_start + value_size + 2
                    payload = data[value_start + 1:stop if stop < self.length else self.length]
                    if b"\0" in payload:
                        payload = payload[:payload.find(b"\0")]
                    node.payload = payload
            elif name == _METACOPY:
                if is_reg and value_size == _METACOPY_SIZE:
                    digest_start = value_start + _METACOPY_HEADER_SIZE
                    node.digest = data[digest_start:digest_start + DIGEST_SIZE]
            elif name == _ESCAPED_WHITEOUT and is_reg:
                node.mode = (node.mode & ~_S_IFMT) | stat.S_IFCHR
                node.rdev = 0
                node.size = 0
                if node.content is not None:
                    node.content = b""
                is_reg = False
            elif name not in _HIDDEN_MARKERS:
                if name.startswith(_OVERLAY_PREFIX):
                    if not name.startswith(_OVERLAY_ESCAPED_PREFIX):
                        continue  # internal: root opaque and the like
                    name = _TRUSTED_PREFIX + name[len(_OVERLAY_PREFIX):]
                if value is None:
                    value = data[value_start:value_start + value_size]
                if xattrs is None:
                    xattrs = _XattrList()
                xattrs.set(name, value)
        if xattrs is not None:
            node.xattrs = dict(xattrs.items)

    def _shared_entry(self, nid: int, idx: int) -> Tuple[int, bytes, bytes, int, int]:
        pos = self.xattr_base + idx * 4
        name_len, index, value_size = self._unpack(fmt.EROFS_XATTR_ENTRY, pos, "shared xattr %d" % idx)
        name_start = pos + fmt.EROFS_XATTR_ENTRY.size
        value_start = name_start + name_len
        prefix = _PREFIX_BY_INDEX.get(index)
        if prefix is None:
            raise ImageError("inode %d: unknown xattr name index %d" % (nid, index))
        name = _cstr(prefix + self._slice(name_start, name_start + name_len, "xattr name"))
        value = self._slice(value_start, value_start + value_size, "shared xattr %d" % idx)
        # Each distinct entry is decoded once; well-formed tables never overlap.
        self._charge(value_start + value_size - pos, "shared xattr %d" % idx)
        result = (idx, name, value, value_start, value_size)
        self.shared_cache[idx] = result
        return result

    def _redirect_payload(self, value_start: int, value_size: int, shared: bool) -> bytes:
        """The payload of a redirect xattr (``shared``: a shared entry's, kept
        so that every file naming that entry gets the same object)."""
        if shared:
            payload = self.payload_cache.get(value_start)
            if payload is not None:
                return payload
        data = self.data
        if value_size > 1 and data[value_start] == _SLASH:
            # libcomposefs 1.0.8 skips the '/' but then grows the length
            # instead of shrinking it, so strndup() reads up to two bytes past
            # the value (the entry's zero padding in C-written images, else
            # whatever follows).  Reproduced so payloads match the C tools.
            payload = data[value_start + 1:min(value_start + value_size + 2, self.length)]
        else:
            payload = data[value_start:value_start + value_size]
        if b"\0" in payload:
            payload = _cstr(payload)
        if shared:
            self.payload_cache[value_start] = payload
        return payload


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
    visited = reader.visited
    visited[reader.root_nid] = root
    build = reader.build
    # Depth-first in directory order, as the C reader recurses: the first
    # entry reaching an inode owns it, later ones become hard links.  A
    # directory's entries are taken by one loop, left (break) to descend into
    # a subdirectory and resumed when that is done.
    stack: List[Tuple[Node, Iterator[Tuple[bytes, int]]]] = [(root, iter(entries))]
    while stack:
        parent, pending = stack[-1]
        children = parent.children
        for name, nid in pending:
            if name in children:
                raise ImageError("duplicate entry %r in directory %r" % (name, parent.path()))
            if nid in visited:
                target = visited[nid]
                if target is None:
                    continue  # another entry for a skipped 0/0 chardev
                if target.mode & _S_IFMT == stat.S_IFDIR:
                    raise ImageError("directory inode %d is reached twice (directory loop or hard link)" % nid)
                child = Node(target.mode)
                child.link_to = target
                child.parent = parent
                child.name = name
                children[name] = child
                continue
            child, child_entries = build(nid, None)
            visited[nid] = child
            if child is None:
                continue
            # Node.replace_child(), inlined: this runs once per entry.
            child.parent = parent
            child.name = name
            children[name] = child
            if child_entries:  # only a directory has entries; an empty one needs no visit
                stack.append((child, iter(child_entries)))
                break
        else:
            stack.pop()
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
