# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Store statistics: objects, bytes, sharing between images, bytes saved by sharing.

"Saved" counts every external file of every image at its size (what the
images would take without a shared store, duplicates inside one image
included) minus the bytes of the distinct objects they use.
"""

from __future__ import annotations

import stat
from typing import Any, Dict

from .errors import ComposefsError
from .store import Store


def stats(store: Store) -> Dict[str, Any]:
    """Objects, bytes, sharing between images, bytes saved by sharing."""
    sizes: Dict[str, int] = {}
    disk = 0
    for hexd, _path, st in store.iter_objects():
        if stat.S_ISREG(st.st_mode):
            sizes[hexd] = st.st_size
            disk += st.st_blocks * 512
    users: Dict[str, int] = {}
    logical = 0
    images = store.list_images()
    unreadable = []
    image_bytes = 0
    for hexd in images:
        try:
            needed = store.image_objects(hexd)
        except (OSError, ComposefsError):
            unreadable.append(hexd)
            continue
        image_bytes += needed.image_bytes or 0
        logical += needed.logical_bytes
        for obj in needed.objects:
            users[obj] = users.get(obj, 0) + 1
    referenced = {h for h in users if h in sizes}
    stored_referenced = sum(sizes[h] for h in referenced)
    return {
        "objects": len(sizes),
        "object_bytes": sum(sizes.values()),
        "object_disk_bytes": disk,
        "images": len(images),
        "image_bytes": image_bytes,
        "refs": len(store.list_refs()),
        "shared_objects": sum(1 for h in referenced if users[h] > 1),
        "shared_object_bytes": sum(sizes[h] for h in referenced if users[h] > 1),
        "unreferenced_objects": len(sizes) - len(referenced),
        "unreferenced_bytes": sum(sizes.values()) - stored_referenced,
        "logical_bytes": logical,
        "saved_bytes": max(0, logical - stored_referenced),
        "max_sharing": max(users.values()) if users else 0,
        "unreadable_images": unreadable,
    }
