# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The ``-o`` option grammar of mount.composefs (as the C helper 1.0.8 reads it).

Parsing and writing option strings only (no mounting, no file system
access): the helper, the mount module and the agent read and write the same
strings through it.
"""

from __future__ import annotations

# typing itself costs ~20 ms of start-up (re, functools...): imported for type checkers only.
TYPE_CHECKING = False

from . import mount_api as api
from .errors import ComposefsError

if TYPE_CHECKING:
    from typing import List, Optional, Sequence, Tuple

# Options fstab, systemd and mount(8) may hand to a helper that mean nothing
# to the kernel mount itself (the C helper refuses them).
IGNORED_OPTIONS = frozenset((
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
    "owner", "noowner", "group", "nogroup", "comment",
))
IGNORED_PREFIXES = ("x-", "comment=")

# VFS options carried as mount attributes on the overlay: name -> (set, clear).
ATTR_OPTIONS = {
    "nosuid": (api.MOUNT_ATTR_NOSUID, 0),
    "suid": (0, api.MOUNT_ATTR_NOSUID),
    "nodev": (api.MOUNT_ATTR_NODEV, 0),
    "dev": (0, api.MOUNT_ATTR_NODEV),
    "noexec": (api.MOUNT_ATTR_NOEXEC, 0),
    "exec": (0, api.MOUNT_ATTR_NOEXEC),
    "noatime": (api.MOUNT_ATTR_NOATIME, api.MOUNT_ATTR_STRICTATIME),
    "strictatime": (api.MOUNT_ATTR_STRICTATIME, api.MOUNT_ATTR_NOATIME),
    "relatime": (0, api.MOUNT_ATTR_NOATIME | api.MOUNT_ATTR_STRICTATIME),
    "atime": (0, api.MOUNT_ATTR_NOATIME),
    "nodiratime": (api.MOUNT_ATTR_NODIRATIME, 0),
    "diratime": (0, api.MOUNT_ATTR_NODIRATIME),
    "nosymfollow": (api.MOUNT_ATTR_NOSYMFOLLOW, 0),
    "symfollow": (0, api.MOUNT_ATTR_NOSYMFOLLOW),
}
_VALUE_OPTIONS = ("basedir", "digest", "upperdir", "workdir", "idmap")


class MountOptionError(ComposefsError):
    """A mount option string or option value is not acceptable."""


class MountOptions:
    """The parsed ``-o`` string of mount.composefs."""

    def __init__(self) -> None:
        self.basedirs: List[str] = []
        self.digest: Optional[str] = None
        self.verity = False
        self.tryverity = False
        self.idmap: Optional[str] = None
        self.upperdir: Optional[str] = None
        self.workdir: Optional[str] = None
        self.readonly = False
        self.attr_set = 0
        self.attr_clr = 0
        self.ignored: List[str] = []

    def __repr__(self) -> str:
        return "MountOptions(%r)" % (self.__dict__,)


# -- option strings -----------------------------------------------------------

def split_options(text: str) -> List[Tuple[str, Optional[str]]]:
    """``key[=value]`` items of a comma-separated option string.

    As the C helper: a backslash escapes the next character (so ``\\,`` is a
    comma inside a value), the first unescaped ``=`` splits key and value.
    Values keep their backslashes here; :func:`unescape` removes them, and
    :func:`split_basedirs` first splits on unescaped colons.
    """
    items: List[Tuple[str, Optional[str]]] = []
    pos = 0
    n = len(text)
    while True:
        start = pos
        equal = -1
        while pos < n:
            c = text[pos]
            if c == "=" and equal < 0:
                equal = pos
            elif c == "\\" and pos + 1 < n:
                pos += 1
            elif c == ",":
                break
            pos += 1
        if equal >= 0:
            items.append((text[start:equal], text[equal + 1 : pos]))
        else:
            items.append((text[start:pos], None))
        if pos >= n:
            break
        pos += 1  # the comma
    return items


def unescape(value: str) -> str:
    out = []
    i = 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            i += 1
        out.append(value[i])
        i += 1
    return "".join(out)


def escape(value: str, specials: str = ",\\") -> str:
    """Inverse of :func:`unescape` for the given special characters."""
    return "".join("\\" + c if c in specials else c for c in value)


def split_basedirs(raw: str) -> List[str]:
    """``basedir`` value -> directories: split on unescaped ``:``.

    C 1.0.8 splits after unescaping, so it cannot name a directory holding a
    colon; ``\\:`` does that here (C would read two directories there, which
    no sane option string relies on).  Empty entries are refused like C does.
    """
    parts: List[str] = []
    current: List[str] = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw):
            current.append(raw[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    if any(not p for p in parts):
        raise MountOptionError("Value for basedir option has incorrect format (empty directory in %r)" % raw)
    return parts


def parse_options(text: Optional[str], sloppy: bool = False) -> MountOptions:
    """Parse a ``-o`` string; ``sloppy`` (mount -s) skips unknown options."""
    opts = MountOptions()
    if not text:
        return opts
    for key, raw in split_options(text):
        if key in _VALUE_OPTIONS:
            if raw is None:
                raise MountOptionError("No value specified for %s option" % key)
            if key == "basedir":
                opts.basedirs = split_basedirs(raw)
                continue
            value = unescape(raw)
            if key == "digest":
                opts.digest = value
            elif key == "upperdir":
                opts.upperdir = value
            elif key == "workdir":
                opts.workdir = value
            else:
                opts.idmap = value
        elif key == "verity" and raw is None:
            opts.verity = True
        elif key == "tryverity" and raw is None:
            opts.tryverity = True
        elif key == "ro" and raw is None:
            opts.readonly = True
        elif key == "rw" and raw is None:
            opts.readonly = False
        elif key in ATTR_OPTIONS and raw is None:
            set_bits, clr_bits = ATTR_OPTIONS[key]
            opts.attr_set = (opts.attr_set & ~clr_bits) | set_bits
            opts.attr_clr = (opts.attr_clr & ~set_bits) | clr_bits
        elif key == "" and raw is None:
            continue  # empty item, e.g. a trailing comma
        elif key in IGNORED_OPTIONS or key.startswith(IGNORED_PREFIXES):
            opts.ignored.append(key if raw is None else key + "=" + raw)
        elif sloppy:
            opts.ignored.append(key if raw is None else key + "=" + raw)
        else:
            raise MountOptionError("Unsupported option %s" % (key if raw is None else key + "=" + raw))
    return opts


def format_options(basedirs: Sequence[str], digest: Optional[str] = None, verity: bool = False,
                   tryverity: bool = False, idmap: Optional[str] = None,
                   upperdir: Optional[str] = None, workdir: Optional[str] = None,
                   readonly: bool = False, extra: Sequence[str] = ()) -> str:
    """An option string that :func:`parse_options` reads back as given."""
    items = ["basedir=" + ":".join(escape(d, ",:\\") for d in basedirs)]
    if digest:
        items.append("digest=" + escape(digest))
    if verity:
        items.append("verity")
    if tryverity:
        items.append("tryverity")
    if idmap:
        items.append("idmap=" + escape(idmap))
    if upperdir:
        items.append("upperdir=" + escape(upperdir))
    if workdir:
        items.append("workdir=" + escape(workdir))
    items.append("ro" if readonly else "rw")
    items.extend(extra)
    return ",".join(items)
