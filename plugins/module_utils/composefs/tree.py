# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""In-memory filesystem tree shared by the writer, the reader and the dump format.

Names, xattr keys and values, symlink targets and payloads are ``bytes``: Linux
filenames are byte strings and the image must reproduce them exactly.

A hard link is a separate :class:`Node` whose ``link_to`` points at the real
inode; it carries no metadata of its own (the dump format and the EROFS writer
both resolve it to the target).
"""

from __future__ import annotations

import stat
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import FormatError

# Limits the C tools enforce on input (libcomposefs lcfs-writer.h).
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65535
# Per-inode budget for user-supplied xattrs: sum(4 + 3 + len(key) + len(value)) + 12.
INODE_EXTERNAL_XATTR_MAX = 65535 // 2
INLINE_CONTENT_MAX = 5000
RECOMMENDED_INLINE_CONTENT_MAX = 64
DIGEST_SIZE = 32


class Node:
    """One inode (or hard-link alias) of a composefs tree."""

    __slots__ = (
        "mode",
        "uid",
        "gid",
        "rdev",
        "nlink",
        "size",
        "mtime_sec",
        "mtime_nsec",
        "payload",
        "content",
        "digest",
        "xattrs",
        "children",
        "parent",
        "name",
        "link_to",
        # The image writer's layout of this inode, set only when the tree is
        # handed over to it (build_image_buffer(consume=True)): laying out on
        # the tree itself spares a private copy of every inode.
        "budget",
        "ino",
        "nid",
        "n_blocks",
        "tail",
        "compact",
        "ipad",
        "xattr_size",
        "shared",
        "unshared",
        "chunkbits",
    )

    def __init__(
        self,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        nlink: int = 1,
        size: int = 0,
        mtime_sec: int = 0,
        mtime_nsec: int = 0,
        payload: Optional[bytes] = None,
        content: Optional[bytes] = None,
        digest: Optional[bytes] = None,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.nlink = nlink
        self.size = size
        self.mtime_sec = mtime_sec
        self.mtime_nsec = mtime_nsec
        # Symlink target, or the backing path (``XX/YYYY…``) of an external file.
        self.payload = payload
        # Inline file content (small files), stored in the image itself.
        self.content = content
        # Raw fs-verity digest (32 bytes) of an external file's content.
        self.digest = digest
        # Insertion-ordered; writers sort as the format requires.
        self.xattrs: Dict[bytes, bytes] = {}
        self.children: Dict[bytes, "Node"] = {}
        self.parent: Optional["Node"] = None
        self.name: bytes = b""
        self.link_to: Optional["Node"] = None

    # -- type predicates -------------------------------------------------
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def is_chr(self) -> bool:
        return stat.S_ISCHR(self.mode)

    def is_whiteout(self) -> bool:
        """An overlayfs whiteout: a character device 0/0."""
        return stat.S_ISCHR(self.mode) and self.rdev == 0

    def is_hardlink(self) -> bool:
        return self.link_to is not None

    def resolve(self) -> "Node":
        """The inode this entry stands for (itself unless it is a hard link)."""
        node = self
        while node.link_to is not None:
            node = node.link_to
        return node

    # -- tree building ---------------------------------------------------
    def add_child(self, name: bytes, child: "Node") -> "Node":
        if not self.is_dir():
            raise FormatError("cannot add %r: parent is not a directory" % name)
        validate_name(name)
        if name in self.children:
            raise FormatError("duplicate entry %r" % name)
        child.parent = self
        child.name = name
        self.children[name] = child
        return child

    def replace_child(self, name: bytes, child: "Node") -> None:
        child.parent = self
        child.name = name
        self.children[name] = child

    def sorted_children(self) -> List[Tuple[bytes, "Node"]]:
        # Bytewise order, as strcmp() sorts in the C writer.
        return sorted(self.children.items())

    def path(self) -> bytes:
        parts: List[bytes] = []
        node: Optional[Node] = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))

    def walk(self) -> Iterator[Tuple[bytes, "Node"]]:
        """Depth-first, sorted: (path, node) for this node and everything below."""
        stack: List[Tuple[bytes, Node]] = [(b"/", self)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.is_dir() and node.link_to is None:
                prefix = path if path.endswith(b"/") else path + b"/"
                for name, child in reversed(node.sorted_children()):
                    stack.append((prefix + name, child))

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "Node(mode=%o, name=%r)" % (self.mode, self.name)


def validate_name(name: bytes) -> None:
    if not name:
        raise FormatError("empty file name")
    if name in (b".", b".."):
        raise FormatError("invalid file name %r" % name)
    # Ints, not one-byte needles: a bytes needle is first tried as an int, at the cost of an exception.
    if 0x2F in name or 0 in name:
        raise FormatError("invalid file name %r" % name)
    if len(name) > NAME_MAX:
        raise FormatError("file name too long (%d bytes)" % len(name))


def digest_to_path(digest: bytes) -> bytes:
    """Backing path ``XX/YYYY…`` of an object named by its fs-verity digest."""
    hexdigest = digest.hex().encode("ascii")
    return hexdigest[:2] + b"/" + hexdigest[2:]


def apply_source_options(
    root: Node,
    use_epoch: bool = False,
    skip_devices: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
) -> None:
    """Apply mkcomposefs' source filters to an already built tree, in place.

    The C tool honours these only when scanning a directory and silently
    ignores them for ``--from-file``; we apply them to dump input as well, so
    that an option given is an option obeyed.
    """
    if skip_xattrs and user_xattrs:
        raise FormatError("--skip-xattrs and --user-xattrs cannot be combined")
    if not (use_epoch or skip_devices or skip_xattrs or user_xattrs):
        # The common case: nothing to filter, no walk over a large tree.
        return
    removed = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node.link_to is not None:
            continue
        if use_epoch:
            node.mtime_sec = 0
            node.mtime_nsec = 0
        if skip_xattrs:
            node.xattrs = {}
        elif user_xattrs:
            node.xattrs = {k: v for k, v in node.xattrs.items() if k.startswith(b"user.")}
        for name, child in list(node.children.items()):
            if skip_devices and child.link_to is None and (
                    stat.S_ISCHR(child.mode) or stat.S_ISBLK(child.mode)):
                removed.add(id(child))
                del node.children[name]
            else:
                stack.append(child)
    if removed:
        # Hard links to a dropped device go with it.
        stack = [root]
        while stack:
            node = stack.pop()
            for name, child in list(node.children.items()):
                if child.link_to is not None and id(child.resolve()) in removed:
                    del node.children[name]
                elif child.is_dir():
                    stack.append(child)
