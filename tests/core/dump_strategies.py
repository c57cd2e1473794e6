# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Hypothesis strategies for composefs-dump(5) files that C mkcomposefs accepts.

``dump_texts()`` draws a random tree (directories, external / inline / empty
regular files, symlinks, devices incl. 0/0 whiteouts, fifos, sockets and hard
links, with random owners, times and xattrs) and renders it as a dump file.
With ``variations`` the rendering also uses the freedom the C parser allows:
optional escapes (``\\x41`` for ``A``, upper-case hex), values the C tool
ignores (directory sizes, hard-link fields and xattrs, digests of inodes that
are not external files), ``+``/leading-zero/negative numbers, slashes the path
lookup skips, hard links to lines further down and to other hard links, a
replaced duplicate xattr, and (unless ``strict``) a symlink SIZE that is not
the target length, RDEV on non-devices and a missing final newline.

Every text it generates must be accepted by C mkcomposefs 1.0.8
(tests/core/test_dump.py checks that against the oracle).
"""

from __future__ import annotations

import random
import stat
from typing import List, Optional, Tuple

from hypothesis import strategies as st

from composefs_fleet.dump import escape

_U32 = 0xFFFFFFFF
_S64_MIN = -(1 << 63)
_S64_MAX = (1 << 63) - 1

_XATTR_PREFIXES = [b"user.", b"trusted.", b"trusted.overlay.", b"user.overlay.",
                   b"security.", b"system."]
_XATTR_NAMES = [b"security.selinux", b"system.posix_acl_access",
                b"system.posix_acl_default", b"security.capability", b"security.ima",
                b"trusted.overlay.opaque", b"trusted.overlay.redirect",
                b"trusted.overlay.metacopy", b"trusted.overlay.whiteout",
                b"trusted.overlay.overlay.whiteout", b"user.overlay.whiteout",
                b"user.overlay.opaque", b"user.mime_type"]

# C quirk: the writer's private copy of a node starts its xattr budget at 0
# (lcfs_node_clone does not copy xattr_size), so when the writer replaces a
# user xattr it adds itself, the budget wraps below zero and a later
# lcfs_node_set_xattr fails with ERANGE.  These are the keys it sets on
# directories holding whiteouts and on whiteouts; never generate them there.
_WRITER_KEYS_DIR = frozenset((b"trusted.overlay.whiteouts", b"user.overlay.whiteouts",
                              b"trusted.overlay.opaque", b"user.overlay.opaque"))
_WRITER_KEYS_WHITEOUT = frozenset((b"trusted.overlay.whiteout", b"user.overlay.whiteout"))

_KINDS = ["dir", "external", "inline", "empty", "symlink", "chr", "whiteout", "blk",
          "fifo", "sock", "hardlink"]


def _blobs(min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    """Large random byte strings drawn from a seed: cheap for hypothesis."""
    return st.tuples(st.integers(min_size, max_size), st.integers(0, _U32)).map(
        lambda t: random.Random(t[1]).getrandbits(8 * t[0]).to_bytes(t[0], "little"))


def _clean_name(raw: bytes) -> bytes:
    name = raw.replace(b"/", b"_").replace(b"\0", b"_")
    if name in (b".", b".."):
        name += b"_"
    return name[:255]


names = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1,
            max_size=12).map(lambda s: _clean_name(s.encode())),
    st.binary(min_size=1, max_size=40).map(_clean_name),
    st.sampled_from([b"-", b"a b", b"x=y", b"back\\slash", b"new\nline", b"\xff\xfe",
                     b"tab\there", b"\x7f", b"00", b"ff", b"+plus", b"@at"]),
    st.integers(min_value=200, max_value=255).map(lambda n: b"n" * n),
)

xattr_keys = st.one_of(
    st.sampled_from(_XATTR_NAMES),
    st.tuples(st.sampled_from(_XATTR_PREFIXES),
              st.binary(min_size=1, max_size=24).map(lambda b: b.replace(b"\0", b"0")))
    .map(lambda t: t[0] + t[1]),
    st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"\0", b"0")),
    st.just(b"user." + b"k" * 250),
)

xattr_values = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"-", b"y", b"x", b"a=b", b"unconfined_u:object_r:unlabeled_t:s0\0"]),
    _blobs(100, 2000),
)

xattr_lists = st.lists(st.tuples(xattr_keys, xattr_values), max_size=6,
                       unique_by=lambda kv: kv[0])


class _Entry:
    __slots__ = ("kind", "parent", "name", "mode", "uid", "gid", "nlink", "mtime",
                 "size", "rdev", "payload", "content", "digest", "xattrs", "target")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.parent: Optional[int] = None
        self.name = b""
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.nlink = 1
        self.mtime: Tuple[int, int] = (0, 0)
        self.size = 0
        self.rdev = 0
        self.payload: Optional[bytes] = None
        self.content: Optional[bytes] = None
        self.digest: Optional[bytes] = None
        self.xattrs: List[Tuple[bytes, bytes]] = []
        self.target: Optional[int] = None


@st.composite
def _entries(draw, max_entries: int) -> List[_Entry]:
    root = _Entry("dir")
    root.mode = stat.S_IFDIR | draw(st.integers(0, 0o7777))
    root.uid = draw(st.one_of(st.just(0), st.integers(0, _U32)))
    root.gid = draw(st.one_of(st.just(0), st.integers(0, _U32)))
    root.mtime = (draw(st.integers(0, 2000000000)), draw(st.integers(0, 999999999)))
    root.xattrs = [kv for kv in draw(xattr_lists) if kv[0] not in _WRITER_KEYS_DIR]
    entries = [root]
    children = {0: set()}  # type: dict
    count = draw(st.integers(0, max_entries))
    for _ in range(count):
        kind = draw(st.sampled_from(_KINDS))
        if kind == "hardlink" and not any(e.kind not in ("dir", "hardlink") for e in entries):
            kind = "empty"
        entry = _Entry(kind)
        dirs = [i for i, e in enumerate(entries) if e.kind == "dir"]
        entry.parent = draw(st.sampled_from(dirs))
        name = draw(names)
        taken = children[entry.parent]
        suffix = 0
        while name in taken:
            suffix += 1
            name = (name[:240] + b"~%d" % suffix)
        taken.add(name)
        entry.name = name
        perms = draw(st.integers(0, 0o7777))
        entry.uid = draw(st.one_of(st.sampled_from([0, 1000]), st.integers(0, _U32)))
        entry.gid = draw(st.one_of(st.sampled_from([0, 1000]), st.integers(0, _U32)))
        entry.mtime = (
            draw(st.one_of(st.integers(0, 2000000000), st.integers(_S64_MIN, _S64_MAX))),
            draw(st.one_of(st.just(0), st.integers(0, 999999999), st.integers(0, _U32))),
        )
        entry.xattrs = draw(xattr_lists)
        entry.nlink = draw(st.one_of(st.just(1), st.integers(1, 8), st.integers(0, _U32)))
        if kind == "dir":
            entry.xattrs = [kv for kv in entry.xattrs if kv[0] not in _WRITER_KEYS_DIR]
            entry.mode = stat.S_IFDIR | perms
            children[len(entries)] = set()
        elif kind == "external":
            entry.mode = stat.S_IFREG | perms
            entry.size = draw(st.one_of(st.integers(1, 10 ** 7), st.integers(1, 1 << 53)))
            entry.digest = draw(st.binary(min_size=32, max_size=32))
            hexd = entry.digest.hex().encode()
            entry.payload = draw(st.one_of(
                st.just(hexd[:2] + b"/" + hexd[2:]),
                st.just(hexd[:2] + b"/" + hexd[2:]),
                st.none(),
                st.binary(min_size=1, max_size=80).map(lambda b: b.replace(b"\0", b"p")),
            ))
            if draw(st.integers(0, 9)) == 0:
                entry.digest = None
        elif kind == "inline":
            entry.mode = stat.S_IFREG | perms
            entry.content = draw(st.one_of(st.binary(min_size=1, max_size=100),
                                           _blobs(1, 5000), st.just(b"-")))
            entry.size = len(entry.content)
        elif kind == "empty":
            entry.mode = stat.S_IFREG | perms
        elif kind == "symlink":
            entry.mode = stat.S_IFLNK | perms
            entry.payload = draw(st.one_of(
                st.binary(min_size=1, max_size=60),
                st.integers(4000, 4095).map(lambda n: b"t" * n),
                st.just(b"-"),
            ).map(lambda b: b.replace(b"\0", b"z")))
            entry.size = len(entry.payload)
        elif kind in ("chr", "blk"):
            entry.mode = (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | perms
            entry.rdev = draw(st.one_of(st.integers(1, 0xFFFF), st.integers(1, _U32)))
        elif kind == "whiteout":
            entry.xattrs = [kv for kv in entry.xattrs if kv[0] not in _WRITER_KEYS_WHITEOUT]
            entry.mode = stat.S_IFCHR | perms
        elif kind == "fifo":
            entry.mode = stat.S_IFIFO | perms
        elif kind == "sock":
            entry.mode = stat.S_IFSOCK | perms
        entries.append(entry)
    # Hard links may point at any file, also one further down the file, or at
    # an earlier hard link (never a directory and never in a loop).
    for index, entry in enumerate(entries):
        if entry.kind != "hardlink":
            continue
        choices = [i for i, e in enumerate(entries)
                   if (e.kind not in ("dir", "hardlink")) or (e.kind == "hardlink" and i < index)]
        entry.target = draw(st.sampled_from(choices))
        real = entry.target
        while entries[real].kind == "hardlink":
            real = entries[real].target  # type: ignore[assignment]
        entry.mode = entries[real].mode
    return entries


def _path(entries: List[_Entry], index: int) -> bytes:
    parts = []
    while index != 0:
        entry = entries[index]
        parts.append(entry.name)
        index = entry.parent  # type: ignore[assignment]
    return b"/" + b"/".join(reversed(parts))


def _vary_escape(data: bytes, rng: random.Random, eq: bool, lone_dash: bool) -> bytes:
    """An escaping of ``data`` that the C parser reads back as ``data``."""
    canonical = escape(data, eq=eq, lone_dash=lone_dash)
    if rng.random() < 0.7:
        return canonical
    if lone_dash and data == b"-":
        return rng.choice([b"\\x2d", b"\\x2D"])
    out = []
    for c in data:
        if rng.random() < 0.2:
            out.append((b"\\x%02X" if rng.random() < 0.5 else b"\\x%02x") % c)
        else:
            out.append(escape(bytes((c,)), eq=eq))
    return b"".join(out)


def _number(value: int, rng: random.Random, variations: bool) -> bytes:
    if variations and rng.random() < 0.05:
        return rng.choice([b"+%d", b"0%d", b"00%d", b"\t%d"]) % value
    return b"%d" % value


def _render(entries: List[_Entry], rng: random.Random, strict: bool, variations: bool) -> bytes:
    lines = []
    for index, entry in enumerate(entries):
        path = _path(entries, index)
        if variations and index != 0 and rng.random() < 0.05:
            path = rng.choice([b"/" + path, path[1:], path.replace(b"/", b"//")])
        field_path = _vary_escape(path, rng, False, False) if variations else escape(path)
        if index != 0 and field_path == b"/":  # pragma: no cover - names are never empty
            field_path = b"//"
        sec, nsec = entry.mtime
        if sec < 0 and variations and rng.random() < 0.3:
            sec_field = b"%d" % (sec & ((1 << 64) - 1))
        else:
            sec_field = b"%d" % sec
        mtime = sec_field + b"." + _number(nsec, rng, variations)

        def optional(value: Optional[bytes]) -> bytes:
            if value is None:
                return b"-"
            if variations:
                return _vary_escape(value, rng, False, True)
            return escape(value, lone_dash=True)

        size = entry.size
        nlink = entry.nlink
        rdev = entry.rdev
        payload = entry.payload
        content = entry.content
        digest = b"-" if entry.digest is None else entry.digest.hex().encode()
        xattrs = list(entry.xattrs)
        mode = b"%o" % entry.mode
        if entry.kind == "hardlink":
            mode = b"@" + mode
            payload = _path(entries, entry.target)  # type: ignore[arg-type]
            if variations and rng.random() < 0.1:
                # The target lookup skips leading, repeated and trailing slashes.
                payload = rng.choice([payload + b"/", payload[1:], payload.replace(b"/", b"//")])
            if variations and rng.random() < 0.3:
                # Everything but MODE and PAYLOAD is ignored on a hard link.
                mode = b"@%o" % (rng.choice([stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR,
                                             stat.S_IFIFO]) | 0o644)
                size, nlink, rdev = rng.choice([(7, 3, 9), (0, 0, 0)])
                content = None
                digest = b"zz"
        elif variations:
            if entry.kind == "dir" and rng.random() < 0.5:
                size, nlink = rng.randrange(0, 1 << 40), rng.randrange(0, 1 << 32)
            if entry.kind == "symlink" and not strict and rng.random() < 0.3:
                size = rng.randrange(0, 1 << 64)
            if entry.kind not in ("chr", "blk", "whiteout") and not strict and rng.random() < 0.1:
                rdev = rng.randrange(1, 1 << 32)
            if entry.kind not in ("external", "hardlink") and rng.random() < 0.1:
                digest = rng.choice([b"zz", b"", b"0" * 64, b"AB" * 40])
            if entry.digest is not None and rng.random() < 0.2:
                digest = digest.upper()
            if entry.kind == "empty" and rng.random() < 0.3:
                content = b""
            if xattrs and rng.random() < 0.2:
                key = xattrs[0][0]
                xattrs.insert(0, (key, b"replaced later"))
        fields = [
            field_path,
            _number(size, rng, variations),
            mode,
            _number(nlink, rng, variations),
            _number(entry.uid, rng, variations),
            _number(entry.gid, rng, variations),
            _number(rdev, rng, variations),
            mtime,
            optional(payload),
            optional(content),
            digest,
        ]
        for key, value in xattrs:
            if variations:
                fields.append(_vary_escape(key, rng, True, False) + b"="
                              + _vary_escape(value, rng, True, False))
            else:
                fields.append(escape(key, eq=True) + b"=" + escape(value, eq=True))
        line = b" ".join(fields)
        if variations and not xattrs and rng.random() < 0.05:
            line += b" "
        lines.append(line)
    text = b"\n".join(lines) + b"\n"
    if variations and not strict and rng.random() < 0.1:
        text = text[:-1]
    return text


@st.composite
def dump_texts(draw, max_entries: int = 25, strict: bool = False,
               variations: bool = True) -> bytes:
    """A dump file (bytes) that C mkcomposefs --from-file accepts.

    ``strict``: also valid under CFS_PARSE_STRICT.  ``variations=False``
    renders every field the way composefs-info prints it.
    """
    entries = draw(_entries(max_entries))
    # A seeded generator for the rendering choices: drawing each of them from
    # hypothesis would exhaust its entropy budget on large values.
    rng = random.Random(draw(st.integers(0, _U32)))
    return _render(entries, rng, strict, variations)


# -- fixed texts shared by the reader and composefs-info tests ------------------

DIGEST = "35d02f81325122d77ec1d11baba655bc9bf8a891ab26119a41c50fa03ddfb408"
PAYLOAD = DIGEST[:2] + "/" + DIGEST[2:]

# One of each kind of inode, overlay xattrs and a hard link.
SAMPLE = (
    "/ 0 40755 2 0 0 0 1000.5 - - - user.foo=bar trusted.overlay.x=y security.selinux=ctx\n"
    "/file 100 100644 2 1 2 0 1000.5 {p} - {d} user.a=1\n"
    "/hl 0 @100644 0 0 0 0 0.0 /file - -\n"
    "/inl 5 100644 1 0 0 0 1000.5 - hello -\n"
    "/wh 0 20644 1 0 0 0 1000.5 - - -\n"
    "/d 0 40755 2 0 0 0 1000.5 - - - trusted.overlay.overlay.z=q\n"
    "/d/sym 3 120777 1 0 0 0 2000.0 foo - -\n"
    "/d/old 0 100600 1 70000 70000 0 -5.7 - - -\n"
    "/00 0 20644 1 0 0 0 1000.5 - - -\n"
    "/dev 0 20600 1 0 0 259 1000.5 - - -\n"
    "/blk 0 60600 1 0 0 2049 1000.5 - - -\n"
    "/fifo 0 10644 1 0 0 0 1000.5 - - -\n"
    "/sock 0 140644 1 0 0 0 1000.5 - - -\n"
).format(p=PAYLOAD, d=DIGEST)


def nested_dirs(depth: int, name: str, attrs: str) -> List[str]:
    """Dump lines of a directory chain /name/name/... ``depth`` deep."""
    lines = []
    path = ""
    for _ in range(depth):
        path += "/" + name
        lines.append("%s %s\n" % (path, attrs))
    return lines
