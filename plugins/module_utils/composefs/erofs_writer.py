# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Serialise a :class:`~.tree.Node` tree into a composefs EROFS image.

The output is byte-identical to libcomposefs 1.0.8 (``lcfs_write_to``) for the
same tree and version range.  Every layout decision below mirrors a decision of
the C writer, including a few odd ones (noted where they occur), because image
digests are what users pin and compare across tools.

The caller's tree is not modified: the writer works on its own copy, to which
it adds the overlayfs xattrs, ``.``/``..`` entries and the 256 root whiteout
stubs.  A caller that has no further use for its tree (mkcomposefs) may hand
it over (``consume=True``): the writer then rewrites and lays out the tree
itself, which saves the copy's time and memory.
"""

from __future__ import annotations

import stat
from collections import Counter
from itertools import chain
from operator import itemgetter
# Used per inode: plain names, not attribute lookups on stat.
from stat import S_IFBLK as _S_IFBLK, S_IFCHR as _S_IFCHR, S_IFDIR as _S_IFDIR, S_IFIFO as _S_IFIFO
from stat import S_IFLNK as _S_IFLNK, S_IFREG as _S_IFREG, S_IFSOCK as _S_IFSOCK
from typing import Dict, List, Optional, Tuple, Union

from .erofs_format import (
    BLOCK_BITS,
    BLOCK_SIZE,
    COMPOSEFS_FLAGS_HAS_ACL,
    COMPOSEFS_HEADER,
    COMPOSEFS_HEADER_VERSION,
    COMPOSEFS_MAGIC,
    COMPOSEFS_VERSION_MAX,
    EROFS_CHUNK_BITS_MAX,
    EROFS_CHUNKS_MAX,
    EROFS_DIRENT,
    EROFS_FEATURE_COMPAT_MTIME,
    EROFS_FEATURE_COMPAT_XATTR_FILTER,
    EROFS_FT_BLKDEV,
    EROFS_FT_CHRDEV,
    EROFS_FT_DIR,
    EROFS_FT_FIFO,
    EROFS_FT_REG_FILE,
    EROFS_FT_SOCK,
    EROFS_FT_SYMLINK,
    EROFS_FT_UNKNOWN,
    EROFS_I_DATALAYOUT_BIT,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_MAX_SHARED_XATTRS,
    EROFS_SUPER,
    EROFS_SUPER_MAGIC,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_FILTER_BITS,
    EROFS_XATTR_FILTER_DEFAULT,
    EROFS_XATTR_FILTER_SEED,
    EROFS_XATTR_IBODY_HEADER,
    INODES_START,
    OVERLAY_XATTR_ESCAPED_OPAQUE,
    OVERLAY_XATTR_ESCAPED_PREFIX,
    OVERLAY_XATTR_ESCAPED_WHITEOUT,
    OVERLAY_XATTR_ESCAPED_WHITEOUTS,
    OVERLAY_XATTR_METACOPY,
    OVERLAY_XATTR_OPAQUE,
    OVERLAY_XATTR_PREFIX,
    OVERLAY_XATTR_REDIRECT,
    OVERLAY_XATTR_USERXATTR_OPAQUE,
    OVERLAY_XATTR_USERXATTR_WHITEOUT,
    OVERLAY_XATTR_USERXATTR_WHITEOUTS,
    OVL_METACOPY_DIGEST_ALGO_SHA256,
    OVL_METACOPY_HEADER,
    OVL_METACOPY_VERSION,
    SLOT_BITS,
    SLOT_SIZE,
    XATTR_POSIX_ACL_ACCESS,
    XATTR_POSIX_ACL_DEFAULT,
    XATTR_SELINUX,
    round_up,
    xattr_entry_index,
)
from .errors import FormatError
from .gc_pause import gc_paused
from .tree import DIGEST_SIZE, INLINE_CONTENT_MAX, INODE_EXTERNAL_XATTR_MAX, XATTR_NAME_MAX, Node
from .xxhash32 import xxh32

_S_IFMT = 0o170000
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_HALF_BLOCK = BLOCK_SIZE // 2
_NO_CHILDREN: Dict[bytes, "_Inode"] = {}
_first = itemgetter(0)
_EXTERNAL_SIZE_MAX = EROFS_CHUNKS_MAX << EROFS_CHUNK_BITS_MAX
# Size accounting per xattr, as libcomposefs does it for its input budget:
# twice the 4-byte entry header, minus one, covers the worst-case alignment.
_XATTR_BUDGET_OVERHEAD = 2 * EROFS_XATTR_ENTRY.size - 1

_FILE_TYPES = {
    _S_IFREG: EROFS_FT_REG_FILE,
    _S_IFDIR: EROFS_FT_DIR,
    _S_IFCHR: EROFS_FT_CHRDEV,
    _S_IFBLK: EROFS_FT_BLKDEV,
    _S_IFIFO: EROFS_FT_FIFO,
    _S_IFSOCK: EROFS_FT_SOCK,
    _S_IFLNK: EROFS_FT_SYMLINK,
}


class _Inode:
    """The writer's private, mutable copy of one tree entry."""

    __slots__ = (
        "mode", "uid", "gid", "rdev", "nlink", "size", "mtime_sec", "mtime_nsec",
        "payload", "content", "digest", "xattrs", "budget", "children", "link_to",
        "ino", "nid", "n_blocks", "tail", "compact", "ipad", "xattr_size",
        "shared", "unshared", "chunkbits",
    )

    def __init__(self, mode: int = 0) -> None:
        # Only the data fields; layout fields are set when computed, for the
        # inodes that get laid out (hard-link entries never are).
        self.mode = mode
        self.uid = 0
        self.gid = 0
        self.rdev = 0
        self.nlink = 1
        self.size = 0
        self.mtime_sec = 0
        self.mtime_nsec = 0
        self.payload: Optional[bytes] = None
        self.content: Optional[bytes] = None
        self.digest: Optional[bytes] = None
        self.xattrs: Dict[bytes, bytes] = {}
        # libcomposefs starts the budget of a cloned node at zero, whatever
        # xattrs it already has; only xattrs the writer adds are counted.
        self.budget = 0
        self.children: Dict[bytes, "_Inode"] = {}
        self.link_to: Optional["_Inode"] = None


# An inode as the writer lays it out: its private _Inode copy, or with
# consume=True the caller's Node itself (which has the same fields).
_Laid = Union[_Inode, Node]


def _set_xattr(inode: _Laid, key: bytes, value: bytes) -> None:
    """lcfs_node_set_xattr(): replace, then charge the per-inode budget."""
    if not key or len(key) > XATTR_NAME_MAX:
        raise FormatError("invalid xattr name %r" % key)
    if len(value) > 0xFFFF:
        raise FormatError("xattr %r value too large" % key)
    old = inode.xattrs.pop(key, None)
    if old is not None:
        if inode.xattrs:
            inode.budget = (inode.budget - (_XATTR_BUDGET_OVERHEAD + len(key) + len(old))) & _U64
        else:
            inode.budget = 0
    entry = _XATTR_BUDGET_OVERHEAD + len(key) + len(value)
    if not inode.xattrs:
        entry += EROFS_XATTR_IBODY_HEADER.size
    if ((inode.budget + entry) & _U64) > INODE_EXTERNAL_XATTR_MAX:
        raise FormatError("too many xattrs on one inode (adding %r)" % key)
    inode.xattrs[key] = value
    inode.budget = (inode.budget + entry) & _U64


def _resolve(inode: _Laid) -> _Laid:
    start = inode
    while inode.link_to is not None:
        inode = inode.link_to
        if inode is start:
            raise FormatError("hard link loop")
    return inode


def _chunking(size: int) -> Tuple[int, int]:
    """(chunkbits, chunk_count) for an external file, as erofs_compute_chunking()."""
    if size <= BLOCK_SIZE:
        return BLOCK_BITS, 1
    bits = max(BLOCK_BITS, (size - 1).bit_length())
    if bits > EROFS_CHUNK_BITS_MAX:
        bits = EROFS_CHUNK_BITS_MAX
    return bits, -(-size // (1 << bits))


# -- step 1: version and private copy ----------------------------------------


def _needs_v1(root: Node) -> bool:
    """True if the tree has a whiteout (chr 0/0): format 1 marks those differently."""
    stack = [root]
    while stack:
        node = stack.pop()
        if stat.S_ISCHR(node.mode & _U32) and (node.rdev & _U32) == 0:
            return True
        for child in node.children.values():
            if child.link_to is None:
                stack.append(child)
    return False


def _link(target: _Laid) -> _Inode:
    link = _Inode.__new__(_Inode)
    link.mode = 0
    link.link_to = target
    return link


def _p(node: Node) -> str:
    return node.path().decode("utf-8", "backslashreplace")


# -- step 2: the overlayfs view (lcfs rewrite_tree_for_erofs) ------------------


def _add_overlay_xattrs(inode: _Laid, parent: _Laid, version: int) -> None:
    # Escape user-supplied overlay xattrs so overlayfs shows them instead of
    # interpreting them; the mapping is injective, so no two can collide.
    if inode.xattrs and any(k.startswith(OVERLAY_XATTR_PREFIX) for k in inode.xattrs):
        inode.xattrs = {
            (OVERLAY_XATTR_ESCAPED_PREFIX + k[len(OVERLAY_XATTR_PREFIX):]
             if k.startswith(OVERLAY_XATTR_PREFIX) else k): v
            for k, v in inode.xattrs.items()
        }
    fmt = inode.mode & _S_IFMT
    if fmt == _S_IFREG and inode.size > 0 and inode.content is None:
        if inode.digest is not None:
            value = _METACOPY_PREFIX + inode.digest
        else:
            value = b""
        # Straight into the dict: a regular file's writer budget is still
        # zero here and nothing else is added to it later, so the budget
        # check of _set_xattr() cannot fail, and user keys of these names
        # were escaped just above.
        xattrs = inode.xattrs
        xattrs[OVERLAY_XATTR_METACOPY] = value
        if inode.payload:
            xattrs[OVERLAY_XATTR_REDIRECT] = b"/" + inode.payload
    elif fmt == _S_IFCHR and inode.rdev == 0:
        inode.size = 0
        inode.mode = _S_IFREG | (inode.mode & ~_S_IFMT & _U32)
        _set_xattr(inode, OVERLAY_XATTR_ESCAPED_WHITEOUT, b"")
        _set_xattr(inode, OVERLAY_XATTR_USERXATTR_WHITEOUT, b"")
        _set_xattr(parent, OVERLAY_XATTR_ESCAPED_WHITEOUTS, b"")
        _set_xattr(parent, OVERLAY_XATTR_USERXATTR_WHITEOUTS, b"")
        if version >= 1:
            _mark_opaque(parent)


def _mark_opaque(parent: _Laid) -> None:
    """Format 1 marks a directory holding whiteouts opaque (escaped, for the overlay on top)."""
    _set_xattr(parent, OVERLAY_XATTR_ESCAPED_OPAQUE, b"x")
    _set_xattr(parent, OVERLAY_XATTR_USERXATTR_OPAQUE, b"x")


_METACOPY_PREFIX = OVL_METACOPY_HEADER.pack(
    OVL_METACOPY_VERSION, OVL_METACOPY_HEADER.size + DIGEST_SIZE, 0, OVL_METACOPY_DIGEST_ALGO_SHA256)


def _validate(inode: _Laid) -> None:
    fmt = inode.mode & _S_IFMT
    if fmt not in _FILE_TYPES:
        raise FormatError("invalid file mode 0%o" % inode.mode)
    if fmt == _S_IFREG:
        if inode.size > 0 and inode.content is None:
            # _chunking()'s count exceeds the maximum exactly above this size.
            if inode.size > _EXTERNAL_SIZE_MAX:
                raise FormatError("file too large (%d bytes)" % inode.size)
        if inode.content is not None:
            if len(inode.content) != inode.size:
                raise FormatError("inline content length %d does not match size %d"
                                  % (len(inode.content), inode.size))
            if inode.size > INLINE_CONTENT_MAX:
                raise FormatError("inline content too large (%d bytes)" % inode.size)
        if inode.digest is not None and len(inode.digest) != DIGEST_SIZE:
            raise FormatError("fs-verity digest must be %d bytes" % DIGEST_SIZE)
    elif fmt == _S_IFLNK:
        if not inode.payload:
            raise FormatError("symlink without a target")


def _prepare(root: Node, version: int) -> _Inode:
    """The writer's copy of *root*, rewritten as libcomposefs rewrites its clone.

    One pre-order walk in name order (the order of lcfs
    rewrite_tree_node_for_erofs): validate, add the overlayfs xattrs, add
    ``.`` and ``..``.  Hard-link entries are resolved once all inodes exist.
    _rewrite_in_place() does the same on the caller's tree.
    """
    _check_root(root)
    links: List[Tuple[_Inode, Node]] = []
    new_root = _Inode.__new__(_Inode)
    stack: List[Tuple[Node, _Inode, _Inode]] = [(root, new_root, new_root)]
    new_inode = _Inode.__new__
    while stack:
        node, new, parent = stack.pop()
        if node.link_to is not None:
            new.mode = 0
            links.append((new, node.link_to))
            continue
        new.mode = mode = node.mode & _U32
        new.uid = node.uid & _U32
        new.gid = node.gid & _U32
        new.rdev = node.rdev & _U32
        new.nlink = node.nlink & _U32
        new.size = node.size
        new.mtime_sec = node.mtime_sec
        new.mtime_nsec = node.mtime_nsec & _U32
        new.payload = node.payload
        new.content = node.content
        new.digest = node.digest
        new.xattrs = dict(node.xattrs) if node.xattrs else {}
        new.budget = 0
        new.link_to = None
        _validate(new)
        _add_overlay_xattrs(new, parent, version)
        if mode & _S_IFMT == _S_IFDIR:
            new.children = children = {}
            for name, child in sorted(node.children.items(), reverse=True):
                copy = new_inode(_Inode)
                children[name] = copy
                stack.append((child, copy, new))
            children[b"."] = _link(new)
            children[b".."] = _link(parent)
        else:
            if node.children:
                raise FormatError("%s: only directories can have children" % _p(node))
            # Never added to (only directories get entries): one shared empty
            # dict instead of one per file, a few MB on a large tree.
            new.children = _NO_CHILDREN
    copies = _link_target_copies(root, new_root, links) if links else {}
    for new, target in links:
        copy = copies.get(id(target))
        if copy is None:
            raise FormatError("hard link to an inode outside the tree")
        new.link_to = copy
    _set_xattr(new_root, OVERLAY_XATTR_OPAQUE, b"y")
    _add_root_stubs(new_root)
    return new_root


def _check_root(root: Node) -> None:
    if not root.is_dir() or root.link_to is not None:
        raise FormatError("the root of an image must be a directory")


def _rewrite_in_place(root: Node, min_version: int, max_version: int) -> int:
    """_prepare()'s rewrite done on the caller's tree, which the caller gives up; the format version.

    The copy costs about a tenth of the build's time and most of its memory
    beyond the tree.  The walk needs no name order here: the checks have no
    effect on one another, and the xattrs a whiteout adds to its parent are
    the same in any order.  Hard-link entries become mode 0 aliases, as in
    the copy; their targets must be inodes of this tree.  Whether a whiteout
    makes the image format 1 (effective_version()) is found on the way, and
    the opaque marks of format 1 are added at the end.
    """
    _check_root(root)
    decide = min_version < 1 <= max_version
    whiteout_parents: List[Node] = []
    links: List[Node] = []
    stack: List[Tuple[Node, Node]] = [(root, root)]
    while stack:
        node, parent = stack.pop()
        node.mode = mode = node.mode & _U32
        node.uid &= _U32
        node.gid &= _U32
        node.rdev &= _U32
        node.nlink &= _U32
        node.mtime_nsec &= _U32
        node.budget = 0
        if decide and mode & _S_IFMT == _S_IFCHR and node.rdev == 0:
            whiteout_parents.append(parent)
        _validate(node)
        _add_overlay_xattrs(node, parent, min_version)
        children = node.children
        if mode & _S_IFMT == _S_IFDIR:
            for child in children.values():
                if child.link_to is not None:
                    child.mode = 0
                    links.append(child)
                else:
                    stack.append((child, node))
            children[b"."] = _link(node)
            children[b".."] = _link(parent)
        elif children:
            raise FormatError("%s: only directories can have children" % _p(node))
    if links:
        _check_link_targets(root, links)
    version = min_version
    if whiteout_parents:
        version = 1
        for parent in whiteout_parents:
            _mark_opaque(parent)
    _set_xattr(root, OVERLAY_XATTR_OPAQUE, b"y")
    _add_root_stubs(root)
    return version


def _check_link_targets(root: Node, links: List[Node]) -> None:
    """Refuse hard links to inodes outside the tree (which would never be laid out)."""
    wanted = {id(link.link_to) for link in links}
    stack = [root]
    while stack and wanted:
        node = stack.pop()
        wanted.discard(id(node))
        for name, child in node.children.items():
            if name not in (b".", b".."):
                stack.append(child)
    if wanted:
        raise FormatError("hard link to an inode outside the tree")


def _link_target_copies(root: Node, new_root: _Inode, links: List[Tuple[_Inode, Node]]) -> Dict[int, _Inode]:
    """The copies of the hard links' targets, by id() of the original node.

    A second walk over both trees, made only when there are hard links: a map
    of every inode would hold a large tree's worth of entries (several MB) for
    the few that are link targets.  The walk visits what _prepare() visits.
    """
    wanted = {id(target) for _new, target in links}
    copies: Dict[int, _Inode] = {}
    stack: List[Tuple[Node, _Inode]] = [(root, new_root)]
    while stack:
        node, new = stack.pop()
        if id(node) in wanted:
            copies[id(node)] = new
        if node.link_to is None and node.mode & _S_IFMT == _S_IFDIR:
            new_children = new.children
            # The same order as _prepare(): were a node placed twice, the same copy wins.
            for name, child in sorted(node.children.items(), reverse=True):
                stack.append((child, new_children[name]))
    return copies


def _add_root_stubs(root: _Laid) -> None:
    """Chardev stubs 00..ff in the root.

    They hide the object store's ``XX/`` directories when the store is
    stacked as a plain (not data-only) lower layer, on kernels before 6.5.
    """
    selinux = root.xattrs.get(XATTR_SELINUX)
    for i in range(256):
        name = b"%02x" % i
        if name in root.children:
            continue
        stub = _Inode(_S_IFCHR | 0o644)
        stub.uid = root.uid
        stub.gid = root.gid
        stub.mtime_sec = root.mtime_sec
        stub.mtime_nsec = root.mtime_nsec
        if selinux is not None:
            _set_xattr(stub, XATTR_SELINUX, selinux)
        root.children[name] = stub


# -- step 3: order, inode numbers, shared xattrs --------------------------------


class _Layout:
    __slots__ = ("order", "min_mtime", "has_acl", "sorted_children", "with_xattrs")

    def __init__(self) -> None:
        self.order: List[_Laid] = []
        self.min_mtime = (0, 0)
        self.has_acl = False
        # Per directory inode (by index in order): its sorted dirents, links resolved.
        self.sorted_children: Dict[int, List[Tuple[bytes, _Laid]]] = {}
        # The inodes that have xattrs, in order: only these get the shared and
        # unshared fields, which the later steps read after testing xattrs.
        self.with_xattrs: List[_Laid] = []


def _compute_tree(root: _Laid) -> _Layout:
    layout = _Layout()
    order = layout.order
    append = order.append
    append(root)
    with_xattrs = layout.with_xattrs
    sorted_children = layout.sorted_children
    min_sec, min_nsec = root.mtime_sec, root.mtime_nsec
    has_acl = False
    # Iterating a list that grows at its end visits what is appended: breadth first.
    for index, inode in enumerate(order):
        if inode.mode & _S_IFMT == _S_IFDIR:
            # The sorted list becomes the dirents: a link entry is replaced by
            # its real inode (resolved once, here), other entries stay as they are.
            dirents = sorted(inode.children.items())
            subdirs = 0
            for i, (name, child) in enumerate(dirents):
                if child.link_to is not None:
                    # Links (".", ".." and hard links) have mode 0 here: not counted.
                    child = _resolve(child)
                    if child.mode & _S_IFMT == _S_IFDIR and name != b"." and name != b"..":
                        raise FormatError("hard links to directories are not allowed")
                    dirents[i] = (name, child)
                else:
                    if child.mode & _S_IFMT == _S_IFDIR:
                        subdirs += 1
                    append(child)
            inode.nlink = 2 + subdirs
            sorted_children[index] = dirents
            # From here on the sorted dirents are the directory: free the dict.
            inode.children = _NO_CHILDREN
        xattrs = inode.xattrs
        if xattrs:
            with_xattrs.append(inode)
            if len(xattrs) > 1:
                # Usually already in order (security.* < trusted.overlay.metacopy
                # < trusted.overlay.redirect): a new dict only when it is not.
                keys = list(xattrs)
                if keys != sorted(keys):
                    inode.xattrs = xattrs = dict(sorted(xattrs.items()))
            if XATTR_POSIX_ACL_ACCESS in xattrs or XATTR_POSIX_ACL_DEFAULT in xattrs:
                has_acl = True
        sec = inode.mtime_sec
        if sec <= min_sec and (sec < min_sec or inode.mtime_nsec < min_nsec):
            min_sec, min_nsec = sec, inode.mtime_nsec
        inode.ino = index
    layout.min_mtime = (min_sec, min_nsec)
    layout.has_acl = has_acl
    return layout


_KEY_INFO: Dict[bytes, Tuple[int, int, bytes]] = {}


def _key_info(key: bytes) -> Tuple[int, int, bytes]:
    """(e_name_index, name filter bit, entry head without e_value_size) of a key."""
    info = _KEY_INFO.get(key)
    if info is None:
        index, suffix = xattr_entry_index(key)
        bit = 1 << (xxh32(suffix, EROFS_XATTR_FILTER_SEED + index) & (EROFS_XATTR_FILTER_BITS - 1))
        info = (index, bit, bytes((len(suffix), index)))
        # Keys repeat across a tree (overlay, selinux, ...): a bounded cache
        # keeps the xxh32 and prefix work off the per-inode path.
        if len(_KEY_INFO) < 65536:
            _KEY_INFO[key] = info
    return info


def _xattr_entry_size(key: bytes, value: bytes) -> int:
    _index, _bit, head = _key_info(key)
    return (EROFS_XATTR_ENTRY.size + head[0] + len(value) + 3) & ~3


def _xattr_entry(key: bytes, value: bytes) -> bytes:
    _index, _bit, head = _key_info(key)
    suffix = key[len(key) - head[0]:] if head[0] else b""
    raw = head + len(value).to_bytes(2, "little") + suffix + value
    return raw + b"\0" * (-len(raw) % 4)


def _compute_shared_xattrs(order: List[_Laid]) -> Tuple[List[Tuple[bytes, bytes]], int]:
    """The shared xattr table; sets shared and unshared on each inode of *order* (those with xattrs)."""
    counts = Counter(chain.from_iterable(inode.xattrs.items() for inode in order))
    shared = [item for item, count in counts.items() if count > 1]
    del counts  # one entry per distinct xattr: gone before the per-inode lists are made
    # Canonical table order of the C writer: key descending, then longer value
    # first, then value bytes descending.
    shared.sort(key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)
    offsets: Dict[Tuple[bytes, bytes], int] = {}
    offset = 0
    for item in shared:
        offsets[item] = offset
        offset += _xattr_entry_size(*item)
    # Most inodes share nothing (an external file's metacopy and redirect are
    # its own): one test, run in C, spares them the loop over their items.
    shared_items = offsets.keys()
    # Tuples, and shared empty ones: they are kept for every inode until written.
    for inode in order:
        if shared_items.isdisjoint(inode.xattrs.items()):
            inode.shared = ()
            inode.unshared = tuple(inode.xattrs)
            continue
        shared_ids: List[int] = []
        # Keys only (values stay in inode.xattrs): no item tuple kept per xattr.
        unshared: List[bytes] = []
        for item in inode.xattrs.items():
            off = offsets.get(item)
            if off is not None and len(shared_ids) < EROFS_MAX_SHARED_XATTRS:
                shared_ids.append(off)
            else:
                unshared.append(item[0])
        inode.shared = tuple(shared_ids) if shared_ids else ()
        inode.unshared = tuple(unshared)
    return shared, offset


# -- step 4: inode placement -------------------------------------------------------


def _dirents_size(children: List[Tuple[bytes, _Laid]]) -> int:
    """Bytes of all dirents and names, summed in C (most directories fit one block)."""
    return EROFS_DIRENT.size * len(children) + sum(map(len, map(_first, children)))


def _dir_size(children: List[Tuple[bytes, _Laid]]) -> Tuple[int, int]:
    total = _dirents_size(children)
    if total <= BLOCK_SIZE:
        # No block boundary to keep entries from crossing: the loop below in one step.
        return (1, 0) if total > _HALF_BLOCK else (0, total)
    n_blocks = 0
    used = 0
    for name, _child in children:
        entry = EROFS_DIRENT.size + len(name)
        if used + entry > BLOCK_SIZE:
            n_blocks += 1
            used = 0
        used += entry
    # Never inline more than half a block.
    if used > _HALF_BLOCK:
        n_blocks += 1
        used = 0
    return n_blocks, used


def _place_inodes(layout: _Layout) -> int:
    min_sec, min_nsec = layout.min_mtime
    sorted_children = layout.sorted_children
    compact_size = EROFS_INODE_COMPACT.size
    extended_size = EROFS_INODE_EXTENDED.size
    ibody_size = EROFS_XATTR_IBODY_HEADER.size
    entry_size = EROFS_XATTR_ENTRY.size
    key_infos = _KEY_INFO  # _key_info()'s cache, read directly in the loop
    pos = INODES_START
    # Runs once per inode: the fields are computed in locals and stored once.
    for index, inode in enumerate(layout.order):
        fmt = inode.mode & _S_IFMT
        n_blocks = tail = 0
        if fmt == _S_IFREG:
            size = inode.size
            if size > 0:
                if inode.content is not None:
                    n_blocks, tail = divmod(size, BLOCK_SIZE)
                    if tail > _HALF_BLOCK:
                        n_blocks += 1
                        tail = 0
                elif size <= BLOCK_SIZE:
                    # _chunking() of a file of one block: one chunk index.
                    inode.chunkbits = BLOCK_BITS
                    tail = 4
                else:
                    inode.chunkbits, chunks = _chunking(size)
                    tail = chunks * 4
        elif fmt == _S_IFDIR:
            n_blocks, tail = _dir_size(sorted_children[index])
            size = n_blocks * BLOCK_SIZE + tail
        else:
            size = inode.size
            if fmt == _S_IFLNK:
                tail = len(inode.payload or b"")
        compact = (
            inode.mtime_sec == min_sec and inode.mtime_nsec == min_nsec
            and inode.nlink <= 0xFFFF and inode.uid <= 0xFFFF and inode.gid <= 0xFFFF
            and size <= _U32
        )
        inode.compact = compact
        head = compact_size if compact else extended_size
        if inode.xattrs:
            xattrs = inode.xattrs
            # Header, shared ids and entries are each a multiple of 4 bytes.
            xattr_size = ibody_size + 4 * len(inode.shared)
            for key in inode.unshared:
                # _xattr_entry_size(), inlined: (head, name suffix, value), padded to 4.
                xattr_size += (entry_size + (key_infos.get(key) or _key_info(key))[2][0] + len(xattrs[key]) + 3) & ~3
            head += xattr_size
        else:
            xattr_size = 0
        inode.xattr_size = xattr_size
        ipad = -pos % SLOT_SIZE
        pos += ipad
        inode.n_blocks = n_blocks
        inode.tail = tail
        if tail or fmt == _S_IFLNK:
            extra = _tail_padding(inode, pos, head)
            ipad += extra
            pos += extra
            tail = inode.tail
        # else: _tail_padding() would find nothing to keep within a block.
        inode.ipad = ipad
        inode.nid = pos >> SLOT_BITS
        pos += head + tail
    return round_up(pos, SLOT_SIZE)


def _tail_padding(inode: _Laid, pos: int, head: int) -> int:
    """Padding before an inode so its inline tail does not cross a block."""
    if inode.mode & _S_IFMT == _S_IFLNK:
        # Inode, xattrs and target stay in one block; a target that cannot fit
        # moves to a data block.  The padding test deliberately uses the size
        # before that move, as the C writer does.
        total = head + inode.tail
        if total // BLOCK_SIZE > 0:
            inode.n_blocks += 1
            inode.tail = 0
        if pos // BLOCK_SIZE != (pos + total - 1) // BLOCK_SIZE:
            return round_up(pos, BLOCK_SIZE) - pos
        return 0
    remainder = BLOCK_SIZE - (pos + head) % BLOCK_SIZE
    if remainder < inode.tail:
        extra = round_up(remainder, SLOT_SIZE)
        remainder = BLOCK_SIZE - (pos + head + extra) % BLOCK_SIZE
        if inode.tail <= remainder:
            return extra
        inode.n_blocks += 1
        inode.tail = 0
        return round_up(pos, BLOCK_SIZE) - pos
    return 0


# -- step 5: bytes -------------------------------------------------------------------

def _dirent_block(children: List[Tuple[bytes, _Laid]], pad_to: int) -> bytes:
    nameoff = len(children) * EROFS_DIRENT.size
    heads = []
    pack = EROFS_DIRENT.pack
    file_types = _FILE_TYPES
    for name, child in children:
        heads.append(pack(child.nid, nameoff, file_types.get(child.mode & _S_IFMT, EROFS_FT_UNKNOWN)))
        nameoff += len(name)
    raw = b"".join(heads) + b"".join(map(_first, children))
    return raw + b"\0" * (-len(raw) % pad_to)


def _dir_chunks(children: List[Tuple[bytes, _Laid]], n_blocks: int) -> Tuple[List[bytes], bytes]:
    """(full blocks, inline tail) of a directory, split as write_erofs_dentries()."""
    if _dirents_size(children) <= BLOCK_SIZE:
        # One piece, the loop below in one step: a block when the directory got one
        # (by _dir_size() or by _tail_padding()), else the inline tail.
        if n_blocks:
            return [_dirent_block(children, BLOCK_SIZE)], b""
        return [], _dirent_block(children, 1)
    blocks: List[bytes] = []
    used = 0
    first = 0
    for i, (name, _child) in enumerate(children):
        entry = EROFS_DIRENT.size + len(name)
        if used + entry > BLOCK_SIZE:
            blocks.append(_dirent_block(children[first:i], BLOCK_SIZE))
            used = 0
            first = i
        used += entry
    if len(blocks) < n_blocks:
        blocks.append(_dirent_block(children[first:], BLOCK_SIZE))
        used = 0
        first = len(children)
    tail = _dirent_block(children[first:], 1) if used > 0 else b""
    return blocks, tail


def _write(layout: _Layout, version: int, inodes_end: int,
           shared: List[Tuple[bytes, bytes]], shared_size: int) -> bytearray:
    order = layout.order
    root = order[0]
    min_sec, min_nsec = layout.min_mtime
    data_start = round_up(inodes_end + shared_size, BLOCK_SIZE)
    n_data_blocks = sum(inode.n_blocks for inode in order)
    out = bytearray()
    out += COMPOSEFS_HEADER.pack(COMPOSEFS_MAGIC, COMPOSEFS_HEADER_VERSION,
                                 COMPOSEFS_FLAGS_HAS_ACL if layout.has_acl else 0, version)
    out += b"\0" * (EROFS_SUPER_OFFSET - len(out))
    if root.nid >= 0xFFFF:
        raise FormatError("root inode placed too far into the image")
    out += EROFS_SUPER.pack(
        EROFS_SUPER_MAGIC, 0, EROFS_FEATURE_COMPAT_MTIME | EROFS_FEATURE_COMPAT_XATTR_FILTER,
        BLOCK_BITS, 0, root.nid, len(order), min_sec & _U64, min_nsec,
        (data_start // BLOCK_SIZE + n_data_blocks) & _U32,
        INODES_START // BLOCK_SIZE, (inodes_end // BLOCK_SIZE) & _U32,
        b"", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0)

    shared_base = inodes_end % BLOCK_SIZE
    current_end = data_start
    data: List[bytes] = []
    key_infos = _KEY_INFO  # _key_info()'s cache, read directly in the loop
    # Runs once per inode: bound methods and fields in locals.
    pack_compact = EROFS_INODE_COMPACT.pack
    pack_extended = EROFS_INODE_EXTENDED.pack
    sorted_children = layout.sorted_children
    for index, inode in enumerate(order):
        if inode.ipad:
            out += b"\0" * inode.ipad
        fmt = inode.mode & _S_IFMT
        tail = inode.tail
        n_blocks = inode.n_blocks
        layout_kind = EROFS_INODE_FLAT_INLINE if tail > 0 else EROFS_INODE_FLAT_PLAIN
        i_u = 0
        if fmt == _S_IFREG or fmt == _S_IFDIR or fmt == _S_IFLNK:
            if fmt == _S_IFREG:
                size = inode.size
            elif fmt == _S_IFDIR:
                size = n_blocks * BLOCK_SIZE + tail
            else:
                size = tail if n_blocks == 0 else inode.size
            if n_blocks > 0:
                i_u = (current_end // BLOCK_SIZE) & _U32
                current_end += BLOCK_SIZE * n_blocks
            if fmt == _S_IFREG and size > 0 and inode.content is None:
                layout_kind = EROFS_INODE_CHUNK_BASED
                # The chunk format shares the i_u union with raw_blkaddr and only
                # overwrites its low 16 bits.
                i_u = (i_u & 0xFFFF0000) | (inode.chunkbits - BLOCK_BITS)
        else:
            size = 0
            if fmt == _S_IFCHR or fmt == _S_IFBLK:
                i_u = inode.rdev
        xattr_size = inode.xattr_size
        if xattr_size:
            xattr_icount = (xattr_size - EROFS_XATTR_IBODY_HEADER.size) // 4 + 1
            if xattr_icount > 0xFFFF:
                raise FormatError("too many xattrs on one inode")
        else:
            xattr_icount = 0
        if inode.compact:
            out += pack_compact(
                layout_kind << EROFS_I_DATALAYOUT_BIT, xattr_icount, inode.mode & 0xFFFF, inode.nlink, size & _U32, 0,
                i_u, inode.ino, inode.uid, inode.gid, 0)
        else:
            out += pack_extended(
                (layout_kind << EROFS_I_DATALAYOUT_BIT) | 1, xattr_icount, inode.mode & 0xFFFF, 0, size & _U64, i_u,
                inode.ino, inode.uid, inode.gid, inode.mtime_sec & _U64, inode.mtime_nsec, inode.nlink)
        if xattr_size:
            name_filter = 0
            for key in inode.xattrs:
                name_filter |= (key_infos.get(key) or _key_info(key))[1]
            out += EROFS_XATTR_IBODY_HEADER.pack(EROFS_XATTR_FILTER_DEFAULT & ~name_filter,
                                                 len(inode.shared))
            for off in inode.shared:
                out += ((shared_base + off) // 4).to_bytes(4, "little")
            xattrs = inode.xattrs
            for key in inode.unshared:
                value = xattrs[key]
                head = (key_infos.get(key) or _key_info(key))[2]
                n = head[0]
                out += head
                out += len(value).to_bytes(2, "little")
                if n:
                    out += key[-n:]
                out += value
                pad = -(4 + n + len(value)) % 4
                if pad:
                    out += b"\0" * pad
        if fmt == _S_IFDIR:
            blocks, dir_tail = _dir_chunks(sorted_children[index], n_blocks)
            out += dir_tail
            data.extend(blocks)
        elif fmt == _S_IFLNK:
            payload = inode.payload or b""
            if n_blocks == 0:
                out += payload
            else:
                block = payload[:min(inode.size, BLOCK_SIZE)]
                data.append(block + b"\0" * (-len(block) % BLOCK_SIZE))
        elif fmt == _S_IFREG:
            if tail > 0:
                if inode.content is not None:
                    out += inode.content[size - tail:]
                else:
                    out += b"\xff" * tail
            if n_blocks > 0:
                if inode.content is None:
                    data.append(b"\xff" * BLOCK_SIZE)
                else:
                    # Only the first block is ever written (content <= 5000 bytes).
                    block = inode.content[:BLOCK_SIZE]
                    data.append(block + b"\0" * (-len(block) % BLOCK_SIZE))
    out += b"\0" * (-len(out) % SLOT_SIZE)
    if len(out) != inodes_end:
        raise FormatError("internal error: inode area is %d bytes, expected %d"
                          % (len(out), inodes_end))
    for key, value in shared:
        out += _xattr_entry(key, value)
    out += b"\0" * (-len(out) % BLOCK_SIZE)
    for block in data:
        out += block
    if len(out) != data_start + n_data_blocks * BLOCK_SIZE:
        raise FormatError("internal error: image is %d bytes, expected %d"
                          % (len(out), data_start + n_data_blocks * BLOCK_SIZE))
    return out


def _version_range(min_version: int, max_version: int) -> Tuple[int, int]:
    if min_version < 0 or max_version < 0 or min_version > COMPOSEFS_VERSION_MAX \
            or max_version > COMPOSEFS_VERSION_MAX:
        raise FormatError("unsupported format version (supported: 0..%d)" % COMPOSEFS_VERSION_MAX)
    return min_version, max(min_version, max_version)


def effective_version(root: Node, min_version: int = 0, max_version: int = 1) -> int:
    """The format version an image of *root* gets for a version range."""
    version, max_version = _version_range(min_version, max_version)
    if version < 1 <= max_version and _needs_v1(root):
        version = 1
    return version


def build_image_buffer(root: Node, min_version: int = 0, max_version: int = 1,
                       consume: bool = False) -> bytearray:
    """build_image() as the buffer it is written into: a caller that only
    writes or hashes the image need not hold a second copy of it.

    *consume*: the caller gives *root* up, and the writer lays the image out
    on that tree instead of on a private copy (less time and memory); the
    tree is left rewritten and must not be used again.
    """
    with gc_paused():
        if consume:
            low, high = _version_range(min_version, max_version)
            # The walk that rewrites the tree also finds the whiteouts that decide the version.
            version = _rewrite_in_place(root, low, high)
            work: _Laid = root
        else:
            version = effective_version(root, min_version, max_version)
            work = _prepare(root, version)
        layout = _compute_tree(work)
        shared, shared_size = _compute_shared_xattrs(layout.with_xattrs)
        inodes_end = _place_inodes(layout)
        return _write(layout, version, inodes_end, shared, shared_size)


def build_image(root: Node, min_version: int = 0, max_version: int = 1) -> bytes:
    """The complete image for *root*, as ``mkcomposefs`` would write it."""
    return bytes(build_image_buffer(root, min_version, max_version))
