# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""An OCI image as one composefs tree: its layers streamed into the store, merged in memory.

Used by :func:`.store_add.add_image` for ``oci:``, ``oci-archive:`` and
``docker-archive:`` sources.  Each layer blob is read once, front to back:
decompressed as it streams, its tar parsed as it streams, file contents
above the inline limit staged as objects (their fs-verity digest computed
while they are written), metadata merged into the tree
(:mod:`.oci_layer`).  At the end of each layer its blob's digest and size
and its uncompressed digest (the config's ``diff_ids``) are checked; only
when every layer passed are the staged objects published (the caller's
``ObjectBatch.commit``), then the image, the origin record and the ref.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, BinaryIO, Dict, Optional, Set

from .errors import StoreError
from .fsverity_digest import FsVerityHasher
from .objects import ObjectBatch, write_all
from .oci_layer import LayerApplier, open_layer
from .oci_source import LAYER_TYPES, DockerLayer, OciError, open_source, resolve
from .safe_dirs import UnsafePathError, open_regular
from .store import OCI_ORIGINS, Store
from .store_names import check_digest_hex
from .tree import Node

CHUNK = 1 << 20


def _copy_hashing(handle: BinaryIO, size: int, shown: str, fd: Optional[int] = None) -> bytes:
    """Read ``size`` bytes of ``handle`` (written to ``fd`` if given); their fs-verity digest."""
    hasher = FsVerityHasher()
    left = size
    while left > 0:
        chunk = handle.read(min(CHUNK, left))
        if not chunk:
            raise OciError("%s: truncated (%d of %d bytes)" % (shown, size - left, size))
        hasher.update(chunk)
        if fd is not None:
            write_all(fd, chunk)
        left -= len(chunk)
    return hasher.digest()


def tree_from_oci(source: str, batch: ObjectBatch, result: Any, platform: Optional[str] = None,
                  stage: bool = True, known: Optional[Set[str]] = None) -> Node:
    """The merged tree of the image ``source`` names; new objects staged in ``batch`` (not committed).

    ``stage=False`` (a dry run): contents are hashed, not written; those the
    store lacks are counted as new.  ``known`` gets the hex digest of every
    object the tree uses that is staged or (dry run) accounted for.
    """
    blobs, kind, tag = open_source(source)
    seen: Set[bytes] = set()
    try:
        image = resolve(blobs, kind, tag, platform)
        root = Node(0o040755)
        new_objects: Dict[bytes, int] = {}

        def sink(handle: BinaryIO, size: int, shown: str) -> bytes:
            if stage:
                digest, new = batch.add_unnamed(lambda fd: _copy_hashing(handle, size, shown, fd), size)
            else:
                digest = _copy_hashing(handle, size, shown)
                new = digest not in seen and batch.dir.lstat(digest) is None
            seen.add(digest)
            if new:
                new_objects[digest] = size
            return digest

        for number, (layer, diff_id) in enumerate(zip(image.layers, image.diff_ids)):
            shown = "%s: layer %d (%s)" % (image.source, number + 1, layer.digest)
            reader = blobs.open_blob(layer)
            buffered = io.BufferedReader(reader, CHUNK)  # gzip and the magic sniffing want peek()
            stream = open_layer(buffered, LAYER_TYPES.get(layer.media_type, ""), layer.size, shown,
                                sniff=isinstance(layer, DockerLayer))
            LayerApplier(root, sink, shown).apply(stream)
            stream.drain()
            reader.drain()
            actual = "sha256:" + stream.hash.hexdigest()
            if actual != diff_id:
                raise OciError("%s: uncompressed digest %s is not the config's diff_id %s: refused"
                               % (shown, actual, diff_id))
        # Contents a later layer deleted were staged too: only what the tree uses counts (and is kept).
        used = {node.digest for _path, node in root.walk() if node.digest is not None}
        new_objects = {digest: size for digest, size in new_objects.items() if digest in used}
        if stage:
            batch.keep_only(used)
        result.objects_written = len(new_objects)
        result.bytes_written = sum(new_objects.values())
        result.oci_manifest = image.manifest.digest
        result.oci_config = image.config.digest
        result.oci_layers = len(image.layers)
        if known is not None:
            known.update(digest.hex() for digest in seen & used)
        return root
    finally:
        blobs.close()


def record_origin(store: Store, digest: str, result: Any, source: str) -> None:
    """``oci/<image digest>``: the manifest and config the image was made from (so a signature over
    the manifest can cover the composefs image)."""
    from .atomic_file import write_atomic_at

    check_digest_hex(digest)
    body = json.dumps({"manifest": result.oci_manifest, "config": result.oci_config,
                       "source": source.split(":", 1)[0]}, sort_keys=True) + "\n"
    fd = store.dir_fd(OCI_ORIGINS, create=True)
    write_atomic_at(fd, digest.encode("ascii"), body.encode("utf-8"), mode=0o644)


def read_origin(store: Store, digest: str) -> Optional[Dict[str, Any]]:
    """What :func:`record_origin` wrote for ``digest``, or None."""
    from .json_text import JsonFileError, load_json_object

    check_digest_hex(digest)
    try:
        dir_fd = store.dir_fd(OCI_ORIGINS)
        fd = open_regular(digest.encode("ascii"), dir_fd, "oci/%s" % digest)
    except FileNotFoundError:
        return None
    except UnsafePathError as exc:
        raise StoreError("%s: refused" % exc) from None
    try:
        raw = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        return load_json_object(raw, "oci/%s" % digest)
    except JsonFileError as exc:
        raise StoreError(str(exc)) from None


__all__ = ["read_origin", "record_origin", "tree_from_oci"]
