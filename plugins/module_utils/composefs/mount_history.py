# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""What each mount point should show, and what it showed before: kept across reboots.

A mount record (:mod:`.mount_record`, under ``/run``) describes one live
mount and vanishes with it.  Rolling back needs more: which image a mount
point showed before its last switch, also after a reboot, so that gc keeps
that image and a rollback works offline; and the node agent needs to know
which image a mount point is meant to show when the mount is missing.  That
is this file per mount point under :data:`HISTORY_DIR`: the mount as last
made through our mount code (image, digest, ref, basedirs, verity, upper and
work directories) and ``previous``, the image it replaced.

The mount code updates it on every mount it makes: the same image as
recorded changes nothing (a boot, an agent remount); another image makes the
recorded one ``previous``.  Writes are atomic and serialized with a lock;
failing to write never fails a mount (the caller is told why).
"""

from __future__ import annotations

import os
import time

from .mount_record import DirLock

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence

HISTORY_DIR = "/var/lib/composefs-fleet/mounts"
HISTORY_FORMAT = 1
_SUFFIX = ".json"
_NAME_MAX = 255
_PREVIOUS_KEYS = ("image", "image_digest", "ref")
# What identifies the image file's content without reading it: any write changes ctime, which no
# one can set back, and a replaced file is another inode.
_STAMP_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def image_stamp(st: os.stat_result) -> List[int]:
    """The stamp of an image file (its ``fstat``) kept with its digest."""
    return [getattr(st, f) for f in _STAMP_FIELDS]


def known_digest(where: str, image: str, stamp: List[int], directory: str = HISTORY_DIR) -> Optional[str]:
    """The digest of ``image`` noted for ``where`` when the file is unchanged since (None: compute it).

    A mount point remounted with the image it showed (every boot, every agent
    repair) need not hash the image again: the history noted its digest with
    the file's stamp."""
    try:
        old = load(where, directory)
    except OSError:
        return None
    if old is None or old["image"] != image or old.get("image_stamp") != stamp:
        return None
    return old["image_digest"]


def history_name(where: str) -> str:
    """The file name for ``where``: its mount unit name + ``.json`` (sha256 when too long)."""
    from .systemd_unit import UnitError, path_escape

    try:
        name = path_escape(where) + ".mount" + _SUFFIX
    except UnitError:
        name = ""
    if not name or len(name) > _NAME_MAX:
        import hashlib

        name = "@" + hashlib.sha256(os.fsencode(where)).hexdigest() + _SUFFIX
    return name


def history_path(where: str, directory: str = HISTORY_DIR) -> str:
    return os.path.join(directory, history_name(where))


_LOWER_HEX = frozenset("0123456789abcdef")


def _is_hex64(value: Any) -> bool:
    # As store_names.is_hex_name, without importing it (and tree, typing) into every mount.
    return isinstance(value, str) and len(value) == 64 and set(value) <= _LOWER_HEX


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def valid_entry(data: Any, where: Optional[str] = None) -> bool:
    """Is ``data`` a history entry we wrote (for ``where``, when given)?"""
    from .json_text import is_int

    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT:
        return False
    if not isinstance(data.get("where"), str) or (where is not None and data["where"] != where):
        return False
    if not isinstance(data.get("image"), str) or not _is_hex64(data.get("image_digest")):
        return False
    if not all(_optional_str(data.get(k)) for k in ("ref", "store", "digest", "upperdir", "workdir", "changed")):
        return False
    basedirs = data.get("basedirs")
    if not isinstance(basedirs, list) or not all(isinstance(d, str) for d in basedirs):
        return False
    if not isinstance(data.get("verity"), str):
        return False
    stamp = data.get("image_stamp")
    if stamp is not None and not (isinstance(stamp, list) and len(stamp) == len(_STAMP_FIELDS)
                                  and all(is_int(v) for v in stamp)):
        return False
    previous = data.get("previous")
    if previous is not None:
        if not isinstance(previous, dict) or not isinstance(previous.get("image"), str):
            return False
        if not _is_hex64(previous.get("image_digest")) or not _optional_str(previous.get("ref")):
            return False
    return True


def _load_path(path: str, where: Optional[str] = None) -> Optional[Dict[str, Any]]:
    from .json_text import load_json_file_or_none

    data = load_json_file_or_none(path, "mount history")
    return data if valid_entry(data, where) else None


def load(where: str, directory: str = HISTORY_DIR) -> Optional[Dict[str, Any]]:
    """The history of the mount point ``where`` (None: none, or not one we can believe)."""
    from .mountinfo import canonical

    target = canonical(where)
    return _load_path(history_path(target, directory), target)


def list_all(directory: str = HISTORY_DIR) -> List[Dict[str, Any]]:
    from .json_text import json_files_in

    out: List[Dict[str, Any]] = []
    for path in json_files_in(directory, _SUFFIX):
        entry = _load_path(path)
        if entry is not None and history_name(entry["where"]) == os.path.basename(path):
            out.append(entry)
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def previous_of(entry: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The ``{image, image_digest, ref}`` of what ``entry`` (a history entry or mount record) shows."""
    if not entry or not entry.get("image_digest"):
        return None
    return {"image": entry.get("image"), "image_digest": entry.get("image_digest"), "ref": entry.get("ref")}


def note_mount(where: str, image: str, image_digest: str, basedirs: Sequence[str], verity: str,
               digest: Optional[str] = None, upperdir: Optional[str] = None, workdir: Optional[str] = None,
               ref: Optional[str] = None, store: Optional[str] = None, replaced: Optional[Dict[str, Any]] = None,
               directory: str = HISTORY_DIR, stamp: Optional[List[int]] = None) -> Dict[str, Any]:
    """Record that ``where`` now shows ``image``; returns the entry written.

    ``replaced`` is the mount record of the mount this one replaced, used as
    ``previous`` when there is no history yet (a mount made before the
    history existed).  The same image again keeps ``previous`` and the time
    of the last move; a ref not given is kept from before.  ``stamp``
    (:func:`image_stamp`) lets :func:`known_digest` vouch for the digest later.
    """
    from .atomic_file import write_atomic
    from .mountinfo import canonical

    target = canonical(where)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    with DirLock(directory):
        old = load(target, directory)
        entry: Dict[str, Any] = {
            "format": HISTORY_FORMAT, "where": target, "image": image, "image_digest": image_digest,
            "ref": ref, "store": store, "basedirs": list(basedirs), "verity": verity, "digest": digest,
            "upperdir": upperdir, "workdir": workdir, "image_stamp": stamp,
        }
        if old is not None and old["image_digest"] == image_digest:
            entry["previous"] = old.get("previous")
            entry["changed"] = old.get("changed")
            if ref is None:
                entry["ref"] = old.get("ref")
            if store is None:
                entry["store"] = old.get("store")
        else:
            before = old if old is not None else replaced
            entry["previous"] = None if before is not None and before.get("image_digest") == image_digest \
                else previous_of(before)
            entry["changed"] = _now()
        if entry != old:
            from .json_text import json_dumps

            data = json_dumps(entry) + "\n"
            write_atomic(history_path(target, directory), data.encode("ascii"), mode=0o644)
    return entry


def forget(where: str, directory: str = HISTORY_DIR) -> bool:
    """Drop the history of ``where`` (the mount point is no longer managed)."""
    from .mountinfo import canonical

    path = history_path(canonical(where), directory)
    if not os.path.isdir(directory):
        return False
    with DirLock(directory):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
    return True
