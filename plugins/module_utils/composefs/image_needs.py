# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""What an image needs: the objects its external files refer to.

Listed from a tree, an image file, an open image or image bytes; the file
forms use the lean lister (no tree is built), so listing a large mounted
image costs little memory.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .erofs_format import COMPOSEFS_MAGIC
from .errors import ImageError
from .store_names import object_hex_from_payload
from .tree import Node

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


class ImageObjects:
    """The objects an image refers to, by hex digest, with the file size."""

    def __init__(self) -> None:
        self.objects: Dict[str, int] = {}
        self.files = 0
        self.logical_bytes = 0
        self.problems: List[str] = []
        #: Size of the image file, where one was read (:meth:`Store.image_objects`).
        self.image_bytes: Optional[int] = None


def image_objects(root: Node) -> ImageObjects:
    """Objects referenced by the external regular files of a tree."""
    return _collect_objects(
        (os.fsdecode(path), node.payload, node.digest, node.size)
        for path, node in root.walk()
        if node.link_to is None and node.is_reg() and node.content is None
        and (node.payload is not None or node.digest is not None))


def image_file_objects(path: PathLike, progress: Optional[Callable[[], None]] = None) -> ImageObjects:
    """Objects referenced by the image file at ``path``, without loading its tree.

    ``progress`` is called every few thousand files (a long-running caller
    pings its watchdog there)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return image_fd_objects(fd, progress)
    finally:
        os.close(fd)


def image_fd_objects(fd: int, progress: Optional[Callable[[], None]] = None) -> ImageObjects:
    """:func:`image_file_objects` of an open image file."""
    from .erofs_reader import iter_external_files

    size = os.fstat(fd).st_size
    if size == 0:
        raise ImageError("image is empty")
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        files = (("inode %d" % nid, payload, digest, fsize)
                 for nid, payload, digest, fsize in iter_external_files(mm))
        out = _collect_objects(_dropping_pages(mm, files, progress))
    out.image_bytes = size
    return out


def image_data_objects(data: bytes) -> ImageObjects:
    """Objects referenced by the image held in ``data``, without loading its tree."""
    from .erofs_reader import iter_external_files

    return _collect_objects(("inode %d" % nid, payload, digest, fsize)
                            for nid, payload, digest, fsize in iter_external_files(data))


def _dropping_pages(mm: mmap.mmap, items: Iterator[Any], progress: Optional[Callable[[], None]],
                    every: int = 4096) -> Iterator[Any]:
    # Mapped image pages count as our memory: a large image read once would
    # keep all of it resident.  Dropping them now and then only costs page
    # cache lookups for the few pages read again.
    advise = getattr(mm, "madvise", None)
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0:
            if advise is not None and dontneed is not None:
                advise(dontneed)
            if progress is not None:
                progress()


def _collect_objects(files: Iterable[Tuple[str, Optional[bytes], Optional[bytes], int]]) -> ImageObjects:
    out = ImageObjects()
    for where, payload, digest, size in files:
        if payload is not None:
            hexd = object_hex_from_payload(payload)
            if hexd is None:
                out.problems.append("%s: backing path %r is not an object name XX/YYYY..."
                                    % (where, os.fsdecode(payload)))
                continue
            if digest is not None and digest.hex() != hexd:
                out.problems.append("%s: fs-verity digest %s does not match its backing path %s"
                                    % (where, digest.hex(), os.fsdecode(payload)))
        else:
            if digest is None:
                raise AssertionError("digest is not None")
            hexd = digest.hex()
        known = out.objects.get(hexd)
        if known is not None and known != size:
            out.problems.append("%s: object %s used with sizes %d and %d" % (where, hexd, known, size))
        out.objects[hexd] = size
        out.files += 1
        out.logical_bytes += size
    return out


def is_composefs_image(head: bytes) -> bool:
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == COMPOSEFS_MAGIC


__all__ = ["ImageObjects", "image_data_objects", "image_fd_objects", "image_file_objects", "image_objects",
           "is_composefs_image"]
