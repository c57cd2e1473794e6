# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""``/proc/self/mountinfo``: the one parser of what the kernel says is mounted.

Two layers of escaping are undone here, and nowhere else:

* The kernel's: in mount points, roots, sources and super-block options,
  space, tab, newline and backslash (and in option values also ``,``) are
  shown as ``\\ooo`` octal escapes (``\\040 \\011 \\012 \\134 \\054``).
* overlayfs' own, in option values it keeps as they were given: ``upperdir``
  and ``workdir`` passed as strings, and the legacy ``lowerdir=A::B`` list,
  are unescaped by overlayfs when it resolves them (``\\c`` stands for
  ``c``), and shown still escaped.  ``lowerdir+``/``datadir+`` values are
  taken literally, and shown so.  Not undoing this made a workdir holding a
  backslash differ from itself on every comparison.

  One case mountinfo cannot tell apart: since Linux 6.13 ``upperdir`` and
  ``workdir`` can be given as file descriptors, and then their resolved path
  is shown unescaped.  For a value holding a backslash, the reading that
  names an existing directory wins (the unescaped one if both or neither
  do); :meth:`MountInfo.path_readings` gives both.
"""

from __future__ import annotations

import os
import sys
# typing itself costs start-up time on every mount: imported for type checkers only.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

    PathArg = Union[str, bytes, "os.PathLike[str]"]

MOUNTINFO = "/proc/self/mountinfo"
#: The source our composefs overlays (and C mount.composefs's) are made with.
COMPOSEFS_SOURCE = "composefs"
#: overlayfs options that unescape their value (``\\c`` -> ``c``) and show it as given.
_OVERLAY_ESCAPED = frozenset(("upperdir", "workdir", "lowerdir"))
#: overlayfs options naming directories it uses (layers, upper, work).
OVERLAY_PATH_OPTIONS = ("lowerdir", "lowerdir+", "datadir+", "upperdir", "workdir")


_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def _text(field: bytes) -> str:
    """os.fsdecode(unescape(field)) for a mountinfo field (bytes): called per field of every line, at every mount."""
    return (unescape(field) if b"\\" in field else field).decode(_FS_ENCODING, _FS_ERRORS)


def unescape(field: bytes) -> bytes:
    """Undo the kernel's ``\\ooo`` escapes (space, tab, newline, backslash, comma...)."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    n = len(field)
    while i < n:
        c = field[i]
        octal = field[i + 1:i + 4]
        if c == 0x5C and len(octal) == 3 and all(0x30 <= b <= 0x37 for b in octal):
            out.append(int(octal, 8) & 0xFF)
            i += 4
        else:
            out.append(c)
            i += 1
    return bytes(out)


def split_overlay_escaped(text: str, sep: str) -> List[str]:
    """Split an overlayfs-escaped value at unescaped ``sep``; ``\\c`` becomes ``c``."""
    parts: List[str] = []
    cur: List[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
        elif sep and text.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
        else:
            cur.append(text[i])
            i += 1
    parts.append("".join(cur))
    return parts


def _split_super_options(raw: bytes) -> List[Tuple[str, Optional[str]]]:
    """Super-block options: commas inside values are octal-escaped by the kernel."""
    items: List[Tuple[str, Optional[str]]] = []
    for item in raw.split(b","):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        items.append((_text(key), _text(value) if sep else None))
    return items


class MountInfo:
    """One line of ``/proc/self/mountinfo``; paths as str (surrogateescape).

    ``super_options`` hold values with the kernel's escapes undone but
    overlayfs' kept (as overlayfs shows them); :meth:`layout` and
    :meth:`layers` give the paths themselves.
    """

    def __init__(self, line: bytes) -> None:
        left, sep, right = line.partition(b" - ")
        lf = left.split(b" ")
        rf = right.split(b" ")
        if not sep or len(lf) < 6 or len(rf) < 3:
            raise ValueError("malformed mountinfo line %r" % line[:200])
        self.mount_id = int(lf[0])
        self.parent_id = int(lf[1])
        self.dev = lf[2].decode("ascii")
        self.root = _text(lf[3])
        self.where = _text(lf[4])
        self.mount_options = lf[5].decode("ascii", "replace").split(",")
        self.fstype = _text(rf[0])
        self.source = _text(rf[1])
        self._super_raw = rf[2]
        self._super_options: Optional[List[Tuple[str, Optional[str]]]] = None

    @property
    def super_options(self) -> List[Tuple[str, Optional[str]]]:
        # Split on first use: most lines read (every mount of the machine, at every mount.composefs)
        # are only matched by place and type; their options were half the cost of reading them.
        if self._super_options is None:
            self._super_options = _split_super_options(self._super_raw)
        return self._super_options

    def is_composefs(self) -> bool:
        return self.fstype == "overlay" and self.source == COMPOSEFS_SOURCE

    def option(self, key: str) -> Optional[str]:
        for k, v in self.super_options:
            if k == key:
                return v
        return None

    def has_flag(self, key: str) -> bool:
        return any(k == key and v is None for k, v in self.super_options)

    def path_option(self, key: str) -> Optional[str]:
        """The path an overlayfs path option names (overlayfs' escapes undone where it keeps them)."""
        readings = self.path_readings(key)
        if len(readings) > 1 and not os.path.isdir(readings[0]) and os.path.isdir(readings[1]):
            return readings[1]  # given as a file descriptor: shown as resolved, unescaped
        return readings[0] if readings else None

    def path_readings(self, key: str) -> List[str]:
        """Every path the value of ``key`` can stand for: as overlayfs unescapes
        it, and (Linux 6.13+, upperdir/workdir given as a file descriptor) as
        shown.  Empty if the option is absent."""
        value = self.option(key)
        if value is None:
            return []
        if key not in _OVERLAY_ESCAPED or self.fstype != "overlay" or "\\" not in value:
            return [value]
        path = split_overlay_escaped(value, "")[0]
        return [path, value] if key != "lowerdir" else [path]

    def layers(self) -> List[Tuple[str, str]]:
        """(option, path) of every directory an overlay uses, legacy lowerdir split into its layers."""
        out: List[Tuple[str, str]] = []
        if self.fstype != "overlay":
            return out
        for key, value in self.super_options:
            if value is None or key not in OVERLAY_PATH_OPTIONS:
                continue
            if key == "lowerdir":
                out.extend((key, p) for p in split_overlay_escaped(value, ":") if p)
            else:
                out.append((key, self.path_option(key) if key in _OVERLAY_ESCAPED else value))
        return out

    def layout(self) -> Dict[str, Any]:
        """basedirs, upperdir, workdir, verity and read-only state as the kernel shows them."""
        basedirs = [v for k, v in self.super_options if k == "datadir+" and v is not None]
        lower = self.option("lowerdir")
        if not basedirs and lower:
            # Legacy option string: lowerdir=EROFS::DATA1::DATA2 (escaped "\:"), or
            # EROFS:DATA1:DATA2 where the kernel has no data-only layers (before 6.5).
            layers = split_overlay_escaped(lower, "::")
            basedirs = layers[1:] if len(layers) > 1 else split_overlay_escaped(lower, ":")[1:]
        return {
            "basedirs": basedirs,
            "upperdir": self.path_option("upperdir"),
            "workdir": self.path_option("workdir"),
            "verity": self.option("verity") or "off",
            "readonly": "ro" in self.mount_options or self.has_flag("ro"),
        }

    def as_dict(self) -> Dict[str, Any]:
        return {
            "mount_id": self.mount_id, "parent_id": self.parent_id, "dev": self.dev, "where": self.where,
            "fstype": self.fstype, "source": self.source, "mount_options": list(self.mount_options),
            "options": ",".join(k if v is None else "%s=%s" % (k, v) for k, v in self.super_options),
        }


def read_mountinfo(path: str = MOUNTINFO) -> List[MountInfo]:
    """Every parsable line of ``path`` (malformed ones are skipped)."""
    with open(path, "rb") as f:
        raw = f.read()
    out = []
    for line in raw.split(b"\n"):
        if line:
            try:
                out.append(MountInfo(line))
            except ValueError:
                continue
    return out


def canonical(where: PathArg) -> str:
    """The mount point as mountinfo shows it (absolute, symlinks resolved)."""
    return os.fsdecode(os.path.realpath(os.fsencode(os.fspath(where))))


def mounts_at(where: PathArg, entries: Optional[Sequence[MountInfo]] = None) -> List[MountInfo]:
    """Mounts stacked at ``where``, bottom first."""
    target = canonical(where)
    found = [e for e in (read_mountinfo() if entries is None else entries) if e.where == target]
    ordered: List[MountInfo] = []
    ids = {e.mount_id for e in found}
    # The bottom one's parent is not at this place; each next one sits on the previous.
    current = [e for e in found if e.parent_id not in ids]
    while current:
        ordered.append(current[0])
        nxt = [e for e in found if e.parent_id == current[0].mount_id and e not in ordered]
        current = nxt
    ordered += [e for e in found if e not in ordered]  # anything odd: keep, on top
    return ordered


def top_mount(where: PathArg, entries: Optional[Sequence[MountInfo]] = None) -> Optional[MountInfo]:
    stack = mounts_at(where, entries)
    return stack[-1] if stack else None


def composefs_mounts(entries: Optional[Sequence[MountInfo]] = None) -> List[MountInfo]:
    return [e for e in (read_mountinfo() if entries is None else entries) if e.is_composefs()]


def of_type(fstype: str, entries: Optional[Sequence[MountInfo]] = None) -> List[MountInfo]:
    return [e for e in (read_mountinfo() if entries is None else entries) if e.fstype == fstype]
