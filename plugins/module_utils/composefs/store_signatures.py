# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Where a store keeps the signed statement of each ref: ``signatures/<ref>``.

Beside ``refs/`` rather than in it, so no ref name can collide with a
signature's; served with the store, so a remote serves its signatures.
Reads and writes go through :mod:`.store_refs`'s descriptor walk: a symlink
planted under ``signatures/`` is refused, never followed.
"""

from __future__ import annotations

from typing import Optional

from . import store_refs
from .errors import RefNotFound
from .ref_statement import MAX_SIGNATURES_BYTES
from .store import SIGNATURES, Store

KIND = "signature of ref"


def read_signatures(store: Store, ref: str) -> Optional[bytes]:
    """The ``signatures/<ref>`` file's bytes; None if the ref has none."""
    try:
        return store_refs.read_named(lambda: store.dir_fd(SIGNATURES), ref, MAX_SIGNATURES_BYTES, KIND)
    except (RefNotFound, FileNotFoundError):
        return None


def write_signatures(store: Store, ref: str, data: bytes) -> None:
    """Replace ``signatures/<ref>`` durably (the caller holds the store's lock)."""
    store_refs.write_named(lambda: store.dir_fd(SIGNATURES, create=True), ref, data, KIND)


def remove_signatures(store: Store, ref: str) -> bool:
    """Delete ``signatures/<ref>``; False if there was none."""
    try:
        store_refs.remove_named(lambda: store.dir_fd(SIGNATURES), ref, KIND)
    except (RefNotFound, FileNotFoundError):
        return False
    return True


__all__ = ["SIGNATURES", "read_signatures", "remove_signatures", "write_signatures"]
