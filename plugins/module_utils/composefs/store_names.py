# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Names inside a store: digests, object paths, refs.

Every name is validated before a path is built from it, so a name read from
an image, a dump, a ref or a command line can never climb out of the store.
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

from .errors import StoreError
from .tree import DIGEST_SIZE

REF_NAME_MAX = 1024

_HEX = frozenset(b"0123456789abcdef")


def is_hex_name(name: Union[str, bytes], length: int = 2 * DIGEST_SIZE) -> bool:
    raw = name.encode("ascii", "replace") if isinstance(name, str) else bytes(name)
    return len(raw) == length and not raw.translate(None, bytes(_HEX))


def check_digest_hex(name: Union[str, bytes]) -> str:
    """``name`` as str if it is 64 lowercase hex digits, else StoreError."""
    if not is_hex_name(name):
        raise StoreError("invalid digest %r: need %d lowercase hex digits" % (name, 2 * DIGEST_SIZE))
    return name.decode("ascii") if isinstance(name, bytes) else name


def parse_digest(text: str) -> Optional[str]:
    """The 64 lowercase hex digits ``text`` names (``HEX`` or ``sha256:HEX``, as OCI tools and
    ``fsverity measure`` print digests; any case, surrounding blanks ignored); None if it names none."""
    raw = text.strip().lower()
    if raw.startswith("sha256:"):
        raw = raw[len("sha256:"):]
    return raw if is_hex_name(raw) else None


def object_hex_from_payload(payload: bytes) -> Optional[str]:
    """The digest named by a backing path ``XX/YYYY...``, or None if it is not one."""
    if len(payload) == 2 * DIGEST_SIZE + 1 and payload[2:3] == b"/":
        raw = payload[:2] + payload[3:]
        if is_hex_name(raw):
            return raw.decode("ascii")
    return None


def object_relpath(hexdigest: str) -> bytes:
    check_digest_hex(hexdigest)
    raw = hexdigest.encode("ascii")
    return raw[:2] + b"/" + raw[2:]


def split_ref_name(name: Union[str, bytes]) -> List[bytes]:
    """Components of a valid ref name; StoreError (saying why) otherwise."""
    raw = os.fsencode(name)
    shown = os.fsdecode(raw)
    if not raw:
        raise StoreError("empty ref name")
    if len(raw) > REF_NAME_MAX:
        raise StoreError("ref name too long (%d bytes, at most %d)" % (len(raw), REF_NAME_MAX))
    if b"\0" in raw or b"\n" in raw or b"\r" in raw:
        raise StoreError("ref name %r contains NUL or a line break" % shown)
    if raw.startswith(b"/"):
        raise StoreError("ref name %r is absolute; refs are relative names like 'app/v1'" % shown)
    parts = raw.split(b"/")
    for part in parts:
        if not part:
            raise StoreError("ref name %r has an empty component (leading, trailing or double '/')" % shown)
        if part in (b".", b".."):
            raise StoreError("ref name %r contains '%s'" % (shown, os.fsdecode(part)))
        if part.startswith(b"."):
            raise StoreError("ref name %r: components may not start with '.' (reserved for temporary files)"
                             % shown)
        if len(part) > 255:
            raise StoreError("ref name %r: component longer than 255 bytes" % shown)
    return parts


__all__ = ["REF_NAME_MAX", "check_digest_hex", "is_hex_name", "object_hex_from_payload", "parse_digest", "object_relpath",
           "split_ref_name"]
