# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The composefs-dump(5) text format: parser and printer.

``parse_dump`` accepts exactly what C ``mkcomposefs --from-file`` (1.0.8)
accepts and builds the tree the C tool builds; everything the C tool refuses,
at parse or at write time, is a :class:`DumpParseError` carrying the line
number.  ``write_dump`` prints a tree byte for byte as ``composefs-info dump``
does.

Quirks of the C parser that are reproduced on purpose (each is marked
``C quirk`` below):

* integers go through ``strtoull``: leading blanks (tab, CR, VT, FF), a ``+``
  or ``-`` sign (``-1`` wraps to 2**64-1, which is how negative mtimes are
  read) and overflow (clamped to 2**64-1) are all accepted;
* a bad GID or RDEV number is read as 0 when UID is not 0 (the C code tests
  ``uid == 0 && err`` after parsing those fields);
* PATH, PAYLOAD, xattr keys and DIGEST are C strings: an escaped NUL ends them;
* missing trailing fields are empty strings, not ``-``; one trailing space
  after the last field is accepted, two are an empty xattr;
* values are truncated to the C node's field widths (mode, nlink, uid, gid,
  rdev and mtime nsec to 32 bits; mtime sec is the int64 view of the u64);
* a symlink's SIZE is replaced by the target length and its CONTENT is
  checked against SIZE, then dropped;
* a duplicate xattr key replaces the earlier value, and the per-inode xattr
  budget is checked incrementally as the C code does;
* hard links are resolved after the whole file is read, in reverse line order
  (so the first error reported is the same), and never change any nlink;
* in strict mode a final line without newline is still accepted when the C
  tool's read buffer happens to end exactly at the end of the file.

Deliberate deviations, where the C tool writes an image that is broken or not
reproducible (we refuse these inputs instead):

* an external file's DIGEST that is not at least 64 hex digits: C copies the
  parsed prefix into an uninitialised 32-byte stack buffer and writes the
  garbage into the image (a bad digest on any other inode is ignored by the C
  writer, so it is accepted and dropped here too);
* SIZE > 2**64 - 2**43 on an external file: the C chunk count computation
  overflows to zero chunks;
* a ``@`` line whose target is a directory (C writes a directory hard link;
  a link to ``/`` even makes the root its own descendant);
* hard-link chains that loop (C refuses those at write time, or hangs in
  ``follow_links`` when a chain runs into a loop that does not include it).
"""

from __future__ import annotations

import re
import stat
from binascii import hexlify
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

from .erofs_format import EROFS_CHUNK_BITS_MAX, EROFS_CHUNKS_MAX
from .errors import DumpParseError
from .gc_pause import gc_paused
from .tree import (
    DIGEST_SIZE,
    INLINE_CONTENT_MAX,
    INODE_EXTERNAL_XATTR_MAX,
    NAME_MAX,
    PATH_MAX,
    XATTR_NAME_MAX,
    XATTR_VALUE_MAX,
    Node,
)

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

# Sizes the C library charges per xattr against LCFS_INODE_EXTERNAL_XATTR_MAX.
_XATTR_ENTRY_COST = 2 * 4 - 1
_XATTR_HEADER_COST = 12
# Longest remaining xattr text on one line (the C tool caps it at UINT16_MAX).
_XATTR_TEXT_MAX = 0xFFFF

# Largest external file: the C writer allows 1024 chunks of at most 2**43 bytes.
_EXTERNAL_SIZE_MAX = EROFS_CHUNKS_MAX << EROFS_CHUNK_BITS_MAX

# Longest xattr value worth sharing between inodes (labels, flags).
_SHARED_VALUE_MAX = 256

# Compared once or more per line: module names, not stat attribute lookups.
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_IFCHR = stat.S_IFCHR
_S_IFBLK = stat.S_IFBLK

_VALID_TYPES = frozenset(
    (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFBLK, stat.S_IFCHR,
     stat.S_IFSOCK, stat.S_IFIFO)
)

# strtoull() accepts C-locale white space and a sign before the digits.
_INT_RE = {
    10: re.compile(rb"[\t\n\v\f\r ]*([+-]?)([0-9]+)\Z"),
    8: re.compile(rb"[\t\n\v\f\r ]*([+-]?)([0-7]+)\Z"),
}
# Single bytes searched for as ints: for a bytes needle, ``in`` first tries it
# as an int and raises and clears a TypeError, which costs more than the search
# itself (a sixth of the parse, measured), on every field of every line.
_BACKSLASH = 0x5C
_EIGHT = 0x38
_NINE = 0x39
_OCTAL_RE = re.compile(rb"[0-7]+\Z")
_DIGEST_RE = re.compile(rb"[0-9a-fA-F]{%d}" % (2 * DIGEST_SIZE))

_HEX_VALUES = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_NAMED_ESCAPES = {ord("\\"): b"\\", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}

# Output escaping (composefs-info print_escaped in the C locale): every byte
# that is not isgraph(), and the backslash, is escaped.
_ESCAPE_TABLE = [b"\\x%02x" % c for c in range(256)]
_ESCAPE_TABLE[ord("\\")] = b"\\\\"
_ESCAPE_TABLE[ord("\n")] = b"\\n"
_ESCAPE_TABLE[ord("\r")] = b"\\r"
_ESCAPE_TABLE[ord("\t")] = b"\\t"
_NEEDS_ESCAPE = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
_NEEDS_ESCAPE_EQ = re.compile(rb"[^\x21-\x3c\x3e-\x5b\x5d-\x7e]")


class _FieldError(Exception):
    """A field-level error; the parser adds the line number."""


# -- escaping -------------------------------------------------------------


def _escape_char(match: "re.Match[bytes]") -> bytes:
    return _ESCAPE_TABLE[match.group()[0]]


def escape(data: bytes, *, eq: bool = False, lone_dash: bool = False) -> bytes:
    """Escape ``data`` as composefs-info does (``eq``: xattr key/value,
    ``lone_dash``: an optional field whose value is literally ``-``)."""
    if lone_dash and data == b"-":
        return b"\\x2d"
    pattern = _NEEDS_ESCAPE_EQ if eq else _NEEDS_ESCAPE
    if pattern.search(data) is None:
        return data
    return pattern.sub(_escape_char, data)


_VALID_ESCAPE = re.compile(rb"\\(?:x[0-9A-Fa-f]{2}|[\\nrt])")
_UNESCAPED = {b"\\" + bytes((c,)): v for c, v in _NAMED_ESCAPES.items()}
_UNESCAPED.update(
    (b"\\x" + bytes((h, l)), bytes((_HEX_VALUES[h] << 4 | _HEX_VALUES[l],)))
    for h in _HEX_VALUES for l in _HEX_VALUES)


def _unescaped(match: "re.Match[bytes]") -> bytes:
    return _UNESCAPED[match.group()]


def _unescape(data: bytes) -> bytes:
    if _BACKSLASH not in data:
        return data
    result = _VALID_ESCAPE.sub(_unescaped, data)
    if _BACKSLASH not in _VALID_ESCAPE.sub(b"", data):
        return result
    _escape_error(data)
    raise AssertionError("unreachable")  # pragma: no cover


def _escape_error(data: bytes) -> None:
    """Raise the error C unescape_string() reports for the first bad escape."""
    end = len(data)
    pos = 0
    while True:
        i = data.find(b"\\", pos)
        if i < 0:
            return
        if i + 1 >= end:
            raise _FieldError("No character after escape")
        c = data[i + 1]
        if c == 0x78:  # 'x'
            # As in C: both digits must be present before their validity counts.
            if i + 3 >= end:
                raise _FieldError("No hex characters after hex escape")
            if data[i + 2] not in _HEX_VALUES or data[i + 3] not in _HEX_VALUES:
                raise _FieldError("Invalid hex characters after hex escape")
            pos = i + 4
        elif c in _NAMED_ESCAPES:
            pos = i + 2
        else:
            raise _FieldError("Unsupported escape type %s" % chr(c))


def unescape(data: bytes) -> bytes:
    """Undo composefs-dump escaping (``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\xHH``)."""
    try:
        return _unescape(data)
    except _FieldError as exc:
        raise DumpParseError(str(exc)) from None


def _unescape_optional(field: bytes) -> Optional[bytes]:
    if field == b"-":
        return None
    return _unescape(field)


def _c_string(value: bytes) -> bytes:
    # The C parser keeps these fields as NUL-terminated strings.
    nul = value.find(b"\0")
    return value if nul < 0 else value[:nul]


def _show(path: bytes) -> str:
    return escape(path).decode("ascii")


# -- numbers --------------------------------------------------------------


def _parse_int(field: bytes, base: int) -> Tuple[int, Optional[str]]:
    """strtoull(field, base) as the C parser uses it: (value, error)."""
    if base == 10:
        if field.isdigit():
            return int(field), None
    elif _OCTAL_RE.match(field):
        return int(field, 8), None
    match = _INT_RE[base].match(field)
    if match is None:
        return 0, "Invalid integer %s" % field.decode("latin-1")
    value = int(match.group(2), base)
    if value > _U64:
        return _U64, None
    if match.group(1) == b"-":
        value = -value & _U64
    return value, None


def _int_field(field: bytes, base: int, name: str) -> int:
    value, err = _parse_int(field, base)
    if err is not None:
        raise _FieldError("%s (%s)" % (err, name))
    return value


def _parse_digest(field: bytes) -> Optional[bytes]:
    """The digest, or None where C would leave uninitialised bytes in it.

    C digest_to_raw() decodes hex pairs until the 32 bytes are full (ignoring
    anything after), the string ends or a non-hex char appears.
    """
    if len(field) == 2 * DIGEST_SIZE:
        # The usual field: exactly 64 hex digits.  fromhex() skips blanks, so
        # a field holding any decodes short and takes the general path.
        try:
            raw = bytes.fromhex(field.decode("ascii"))
        except ValueError:
            raw = b""
        if len(raw) == DIGEST_SIZE:
            return raw
    match = _DIGEST_RE.match(field)
    if match is None:
        return None
    return bytes.fromhex(match.group().decode("ascii"))


# -- reading ----------------------------------------------------------------


# Longest line accepted.  A valid line is far shorter (two 4 KiB paths and
# 5000 bytes of content, escaped, and 64 KiB of xattrs); the C tool grows its
# buffer without bound, so junk without newlines would be held whole.
LINE_MAX = 1 << 20
_READ_START = 64 * 1024
_TOO_LONG = "Line too long: more than %d bytes" % LINE_MAX


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes, fewer only at end of file, as fread() gives them."""
    data = stream.read(size)
    if not isinstance(data, bytes):
        if data is None:
            raise DumpParseError("input would block: not readable without waiting")
        raise TypeError("parse_dump() needs a binary stream")
    if 0 < len(data) < size:
        parts = [data]
        missing = size - len(data)
        while missing:
            more = stream.read(missing)
            if more is None:
                raise DumpParseError("input would block: not readable without waiting")
            if not more:
                break
            parts.append(more)
            missing -= len(more)
        data = b"".join(parts)
    return data


class _Fixup:
    __slots__ = ("node", "target", "lineno")

    def __init__(self, node: Node, target: Optional[bytes], lineno: int) -> None:
        self.node = node
        self.target = target
        self.lineno = lineno


class _Parser:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.root: Optional[Node] = None
        self.fixups: List[_Fixup] = []
        # Parent lookups by the exact text before the last '/'.  Nodes are
        # never removed, so a successful lookup stays valid.
        self.parents: Dict[bytes, Node] = {}
        # Errors the C tool only reports when writing, after the whole parse.
        self.deferred: Optional[DumpParseError] = None
        # One object for each repeated value (owners, mtimes, xattr names and
        # short values such as SELinux labels): a large tree repeats them on
        # every inode, and the image writer's copy shares them too.
        self.shared: Dict[object, object] = {}

    def defer(self, message: str, lineno: int) -> None:
        if self.deferred is None:
            self.deferred = DumpParseError(message, lineno)

    # One line of the file; the order of checks follows tree_from_dump_line.
    def line(self, line: bytes, lineno: int) -> None:
        try:
            self._line(line, lineno)
        except _FieldError as exc:
            raise DumpParseError(str(exc), lineno) from None

    def _line(self, line: bytes, lineno: int) -> None:
        if 0 in line:
            raise _FieldError("Invalid embedded NUL character at position %d" % line.find(b"\0"))
        fields = line.split(b" ", 11)
        if len(fields) < 12:
            fields.extend([b""] * (12 - len(fields)))
        (f_path, f_size, f_mode, f_nlink, f_uid, f_gid, f_rdev, f_mtime,
         f_payload, f_content, f_digest, rest) = fields

        # The line has no raw NUL (checked above): only an escaped one can end a C string.
        path = _c_string(_unescape(f_path)) if _BACKSLASH in f_path else f_path
        if not path:
            raise _FieldError("Invalid empty path")

        is_hardlink = f_mode[:1] == b"@"
        if is_hardlink:
            f_mode = f_mode[1:]
        if len(f_mode) <= 21 and f_mode.isdigit() and _EIGHT not in f_mode and _NINE not in f_mode:
            # Canonical octal below 2**63, the common case: no sign, blanks or clamping.
            mode = int(f_mode, 8) & _U32
        else:
            mode = _int_field(f_mode, 8, "MODE") & _U32
        ftype = mode & 0o170000
        if ftype not in _VALID_TYPES:
            raise _FieldError("Invalid mode %o" % mode)

        # Where the entry goes; it is put there once the line is read (a line
        # with an error ends the parse, so nothing sees the tree in between).
        if path == b"/":
            if ftype != _S_IFDIR:
                raise _FieldError("Root must be a directory")
            if self.root is not None:
                raise _FieldError("Can't have multiple roots")
            parent = None
            name = b""
        else:
            parent, name = self._parent(path)

        if is_hardlink:
            if ftype == _S_IFDIR:
                raise _FieldError("Directories can't be hardlinked")
            node = Node(mode)
            target = _unescape_optional(f_payload)
            self.fixups.append(_Fixup(node, None if target is None else _c_string(target), lineno))
            # Never the root here: "/" is refused above as a non-directory or as a hard-linked one.
            if parent is not None:
                parent.replace_child(name, node)
            return

        sec_s, _dot, nsec_s = f_mtime.partition(b".")
        # One isdigit() over all seven numbers; the truth tests rule out an empty one.
        if (f_size and f_nlink and f_uid and f_gid and f_rdev and sec_s and nsec_s
                and b"".join((f_size, f_nlink, f_uid, f_gid, f_rdev, sec_s, nsec_s)).isdigit()):
            # Canonical text: plain decimal numbers.
            size = int(f_size)
            nlink = int(f_nlink)
            uid = int(f_uid)
            gid = int(f_gid)
            rdev = int(f_rdev)
            mtime_sec = int(sec_s)
            mtime_nsec = int(nsec_s)
            if size > _U64 or nlink > _U64 or uid > _U64 or gid > _U64 or rdev > _U64 \
                    or mtime_sec > _U64 or mtime_nsec > _U64:
                size, nlink, uid, gid, rdev, mtime_sec, mtime_nsec = (
                    min(v, _U64) for v in (size, nlink, uid, gid, rdev, mtime_sec, mtime_nsec))
        else:
            size = _int_field(f_size, 10, "SIZE")
            nlink = _int_field(f_nlink, 10, "NLINK")
            uid = _int_field(f_uid, 10, "UID")
            # C quirk: the GID and RDEV checks test "uid == 0 && err", so with
            # a non-zero UID a bad value silently becomes 0.
            gid, err = _parse_int(f_gid, 10)
            if err is not None and uid == 0:
                raise _FieldError("%s (GID)" % err)
            rdev, err = _parse_int(f_rdev, 10)
            if err is not None and uid == 0:
                raise _FieldError("%s (RDEV)" % err)
            mtime_sec = _int_field(sec_s, 10, "MTIME")
            mtime_nsec = _int_field(nsec_s, 10, "MTIME")
        if mtime_sec > 0x7FFFFFFFFFFFFFFF:
            mtime_sec -= 1 << 64

        # Fields without a backslash need no unescaping (nor NUL cut: the line has none).
        if f_payload == b"-":
            payload = None
        elif _BACKSLASH in f_payload:
            payload = _c_string(_unescape(f_payload))
        else:
            payload = f_payload
        if f_content == b"-":
            content = None
        else:
            content = _unescape(f_content) if _BACKSLASH in f_content else f_content
            if len(content) != size:
                raise _FieldError("Invalid content size %d, must match size %d" % (len(content), size))
        if f_digest == b"-":
            digest_text = None
        else:
            digest_text = _unescape(f_digest) if _BACKSLASH in f_digest else f_digest

        if ftype == _S_IFCHR or ftype == _S_IFBLK:
            rdev &= _U32
        else:
            if rdev != 0 and self.strict:
                raise _FieldError("Non-zero devnum on non-device")
            rdev = 0

        if ftype == _S_IFLNK:
            if not payload or len(payload) >= PATH_MAX:
                raise _FieldError("Invalid symlink")
            if self.strict:
                if size != len(payload):
                    raise _FieldError("Invalid symlink size %d, must match target length %d"
                                      % (size, len(payload)))
                if content:
                    raise _FieldError("Symlink cannot have content")
            size = len(payload)
            content = None
        else:
            if payload is not None and len(payload) >= PATH_MAX:
                raise _FieldError("Invalid payload")
            # C keeps no buffer for empty content; b"" is kept here so that
            # write_dump() can print the empty field the C reader produces on
            # some escaped whiteouts.  Either way the file has no data.
            if content is not None and len(content) > INLINE_CONTENT_MAX:
                raise _FieldError("Inline content size %d exceeds maximum %d"
                                  % (len(content), INLINE_CONTENT_MAX))

        external = ftype == _S_IFREG and content is None and size > 0
        if digest_text is not None:
            digest = _parse_digest(digest_text)
            if digest is None and external:
                raise _FieldError("Invalid digest %s: an external file needs 64 hex digits"
                                  % _show(digest_text[:80]))
        else:
            digest = None

        # One object for each repeated owner and mtime (see self.shared).
        shared = self.shared
        uid &= _U32
        gid &= _U32
        node = Node(mode, shared.setdefault(uid, uid), shared.setdefault(gid, gid), rdev, nlink & _U32, size,
                    shared.setdefault(mtime_sec, mtime_sec), mtime_nsec & _U32, payload, content, digest)

        if len(rest) > _XATTR_TEXT_MAX:
            raise _FieldError("Too many xattrs")
        if rest:
            items = rest.split(b" ")
            if not items[-1]:
                items.pop()
            self._xattrs(node, items)

        if external and size > _EXTERNAL_SIZE_MAX:
            # C refuses this only when writing (EFBIG); sizes just below 2**64
            # overflow its chunk count to 0 and would be accepted (deviation).
            self.defer("File too large: %s has size %d" % (_show(path), size), lineno)
        # Node.replace_child(), inlined (this runs once per line): _parent() made the checks.
        if parent is None:
            self.root = node
        else:
            node.parent = parent
            node.name = name
            parent.children[name] = node

    def _parent(self, path: bytes) -> Tuple[Node, bytes]:
        """(parent directory, name) of a new entry at *path* (not the root), checked as C does."""
        root = self.root
        if root is None:
            raise _FieldError("Root node not present")
        slash = path.rfind(b"/")
        if slash < 0:
            parent: Optional[Node] = root
            name = path
        else:
            name = path[slash + 1:]
            prefix = path[:slash]
            parent = self.parents.get(prefix)
            if parent is None:
                parent = root
                # Leading and repeated slashes are skipped, like C
                # lookup_parent_path(); non-directories have no children.
                for component in prefix.split(b"/"):
                    if component:
                        parent = parent.children.get(component)
                        if parent is None:
                            raise _FieldError("Parent directory missing for %s" % _show(path))
                self.parents[prefix] = parent
        if parent is None:
            raise AssertionError("parent is not None")
        if parent.mode & 0o170000 != _S_IFDIR:
            raise _FieldError("Parent must be a directory for %s" % _show(path))
        if name in (b".", b".."):
            raise _FieldError("Invalid . or .. in path: %s" % _show(path))
        if not name:
            raise _FieldError("Can't add child: empty name in %s" % _show(path))
        if len(name) > NAME_MAX:
            raise _FieldError("Can't add child: name longer than %d bytes in %s"
                              % (NAME_MAX, _show(path)))
        if name in parent.children:
            # C means to say "Path ... already exist" but compares -1 with
            # -EEXIST, so it reports "Can't add child".
            raise _FieldError("Can't add child: %s already exists" % _show(path))
        return parent, name

    def _xattrs(self, node: Node, items: List[bytes]) -> None:
        xattrs = node.xattrs
        shared = self.shared
        used = 0
        for item in items:
            key_s, eq, value_s = item.partition(b"=")
            if not eq:
                raise _FieldError("Missing = in xattr")
            # Without a backslash there is nothing to unescape (and no NUL: see _line).
            key = _c_string(_unescape(key_s)) if _BACKSLASH in key_s else key_s
            value = _unescape(value_s) if _BACKSLASH in value_s else value_s
            if not key or len(key) > XATTR_NAME_MAX:
                raise _FieldError("Can't set xattr %s: key must be 1..%d bytes"
                                  % (_show(key), XATTR_NAME_MAX))
            if len(value) > XATTR_VALUE_MAX:
                raise _FieldError("Can't set xattr %s: value longer than %d bytes"
                                  % (_show(key), XATTR_VALUE_MAX))
            # Replacing a key removes it first, as lcfs_node_unset_xattr().
            old = xattrs.pop(key, None)
            if old is not None:
                used = used - _XATTR_ENTRY_COST - len(key) - len(old) if xattrs else 0
            cost = _XATTR_ENTRY_COST + len(key) + len(value)
            if not xattrs:
                cost += _XATTR_HEADER_COST
            if used + cost > INODE_EXTERNAL_XATTR_MAX:
                raise _FieldError("Can't set xattr %s: the inode's xattrs exceed %d bytes"
                                  % (_show(key), INODE_EXTERNAL_XATTR_MAX))
            key = shared.setdefault(key, key)
            if len(value) <= _SHARED_VALUE_MAX:
                value = shared.setdefault(value, value)
            xattrs[key] = value
            used += cost

    def finish(self) -> Node:
        root = self.root
        if root is None:
            raise DumpParseError("No files in dump file")
        # C prepends each fixup to a list, so they are resolved last line first.
        for fixup in reversed(self.fixups):
            if fixup.target is None:
                raise DumpParseError("No target path for the hardlink", fixup.lineno)
            target: Optional[Node] = root
            for component in fixup.target.split(b"/"):
                if component:
                    target = target.children.get(component)
                    if target is None:
                        break
            if target is None:
                raise DumpParseError("No target at %s for hardlink" % _show(fixup.target),
                                     fixup.lineno)
            if target is fixup.node:
                raise DumpParseError("Self-referential hardlink %s" % _show(fixup.target),
                                     fixup.lineno)
            fixup.node.link_to = target
        if self.deferred is not None:
            raise self.deferred
        self._flatten_links()
        return root

    def _flatten_links(self) -> None:
        # Point every alias at the real inode (the C writer follows the chain
        # when it writes the dirent); chains share work through `final`.
        final: Dict[int, Node] = {}
        lines = {id(f.node): f.lineno for f in self.fixups}
        for fixup in self.fixups:
            chain: List[Node] = []
            seen = set()
            node = fixup.node
            while node.link_to is not None and id(node) not in final:
                if id(node) in seen:
                    raise DumpParseError("Hardlink loop through %s" % _show(node.path()),
                                         lines.get(id(node), fixup.lineno))
                seen.add(id(node))
                chain.append(node)
                node = node.link_to
            real = final.get(id(node), node)
            if real.is_dir():
                raise DumpParseError("Hardlink %s points to a directory" % _show(fixup.node.path()),
                                     fixup.lineno)
            for alias in chain:
                final[id(alias)] = real
        for fixup in self.fixups:
            real = final[id(fixup.node)]
            fixup.node.link_to = real
            fixup.node.mode = real.mode


def parse_dump(stream: BinaryIO, strict: bool = False) -> Node:
    """Parse a composefs-dump(5) file into a tree; returns the root node.

    ``strict`` is the C tool's CFS_PARSE_STRICT mode: a trailing newline is
    required, RDEV must be 0 on non-devices, and a symlink's SIZE must equal
    its target length and it may have no CONTENT.

    The input is read as it is parsed, one buffer at a time, so junk fails
    at its first bad line without being read whole; a line longer than
    ``LINE_MAX`` bytes is refused.
    """
    parser = _Parser(strict)
    line = parser.line
    parse_line = parser._line
    lineno = 0
    # C quirk: tree_from_dump() reads with fread() into a buffer that starts
    # at 64 KiB and doubles when one line fills it, keeping the unfinished
    # line in front.  When a read ends exactly at the end of the file, EOF is
    # not yet flagged, the next read returns 0 bytes and that "short read"
    # path parses the unterminated line instead of reporting "Missing
    # trailing newline" in strict mode.  The reads below have the same sizes.
    capacity = 0
    carry = b""
    with gc_paused():
        while True:
            size = len(carry)
            if capacity < size + 1:
                capacity = _READ_START if capacity == 0 else capacity * 2
                capacity = max(capacity, size + 1)
            want = capacity - size
            data = _read_full(stream, want)
            got = len(data)
            if got == 0:
                if carry:
                    lineno += 1
                    line(carry, lineno)
                break
            end = data.rfind(b"\n")
            if end < 0:
                carry += data
            else:
                lines = (carry + data[:end]).split(b"\n") if carry else data[:end].split(b"\n")
                # No line of this block can be too long when the block is not.
                check_length = len(carry) + end > LINE_MAX
                carry = data[end + 1:]
                # parser.line() inlined: one call less per line.
                try:
                    for text in lines:
                        lineno += 1
                        if check_length and len(text) > LINE_MAX:
                            raise DumpParseError(_TOO_LONG, lineno)
                        parse_line(text, lineno)
                except _FieldError as exc:
                    raise DumpParseError(str(exc), lineno) from None
            if len(carry) > LINE_MAX:
                # Refused before the rest of it is read: junk need not have newlines.
                raise DumpParseError(_TOO_LONG, lineno + 1)
            if got < want:
                if carry:
                    lineno += 1
                    if strict:
                        raise DumpParseError("Missing trailing newline", lineno)
                    line(carry, lineno)
                break
        return parser.finish()


# -- writing ----------------------------------------------------------------


# Bytes printed as themselves (isgraph() but the backslash): what
# bytes.translate(None, _SAFE) leaves of a field is what needs escaping.
_SAFE = bytes(c for c in range(0x21, 0x7F) if c != 0x5C)
_SAFE_EQ = _SAFE.replace(b"=", b"")
# The fields from mode to mtime are often the same for many entries (one
# owner, one mode, a fixed mtime): formatted once each, up to this many.
_HEADS_MAX = 4096
_Head = Tuple[int, int, int, int, int, int, int]


def _format_head(key: _Head) -> bytes:
    """``MODE NLINK UID GID RDEV MTIME`` of a dump line (see _dump_line)."""
    mode, nlink, uid, gid, rdev, sec, nsec = key
    sec &= _U64
    if sec > 0x7FFFFFFFFFFFFFFF:
        sec -= 1 << 64
    return b"%o %d %d %d %d %d.%d" % (mode & _U32, nlink & _U32, uid & _U32, gid & _U32, rdev & _U32, sec, nsec & _U32)


def _optional_field(value: Optional[bytes]) -> bytes:
    """A payload or content field: ``-`` for none, escaped (a lone ``-`` too)."""
    if value is None:
        return b"-"
    if value.translate(None, _SAFE) or value == b"-":
        return escape(value, lone_dash=True)
    return value


def _xattr_fields(xattrs: Dict[bytes, bytes]) -> bytes:
    parts = []
    for key, value in xattrs.items():
        parts.append(b" ")
        parts.append(escape(key, eq=True) if key.translate(None, _SAFE_EQ) else key)
        parts.append(b"=")
        parts.append(escape(value, eq=True) if value.translate(None, _SAFE_EQ) else value)
    return b"".join(parts)


def _dump_line(path: bytes, node: Node, heads: Dict[_Head, bytes]) -> bytes:
    """The line of ``node`` at ``path`` (escaped already); ``heads`` caches
    _format_head() for the caller's walk."""
    target = node.link_to
    if target is None:
        target = node
        payload = _optional_field(node.payload)
        alias = b""
    else:
        # node_build_path() gives "" for the root and "/a/b" otherwise.
        payload = _optional_field(target.path() if target.parent is not None else b"")
        alias = b"@"
    key = (target.mode, target.nlink, target.uid, target.gid, target.rdev, target.mtime_sec, target.mtime_nsec)
    head = heads.get(key)
    if head is None:
        if len(heads) >= _HEADS_MAX:
            heads.clear()
        head = heads[key] = _format_head(key)
    content = target.content
    digest = target.digest
    line = b"%s %d %s%s %s %s %s" % (
        path, target.size & _U64, alias, head, payload,
        b"-" if content is None else _optional_field(content),
        b"-" if digest is None else hexlify(digest))
    if target.xattrs:
        return line + _xattr_fields(target.xattrs) + b"\n"
    return line + b"\n"


_WRITE_BATCH_BYTES = 1 << 20


def _escaped_names(children: Dict[bytes, Node]) -> List[Tuple[bytes, Node]]:
    """A directory's (escaped name, child), in bytewise order of the names.

    Escaping is per byte, so an escaped path is its escaped parent's path,
    "/" and the escaped name; one test tells whether any name needs it."""
    items = sorted(children.items())
    if b"".join(children).translate(None, _SAFE):
        return [(escape(name), child) for name, child in items]
    return items


def write_dump(root: Node, out: BinaryIO) -> None:
    """Print ``root`` as composefs-info dump does: depth first, children in
    bytewise name order, hard links as ``@`` lines with the target's fields."""
    heads: Dict[_Head, bytes] = {}
    line = _dump_line(b"/", root, heads)
    batch: List[bytes] = [line]
    pending = len(line)
    # (escaped path of a directory and "/", its remaining children): a
    # directory's children are taken by one loop, left (break) to descend.
    stack: List[Tuple[bytes, Iterator[Tuple[bytes, Node]]]] = []
    if root.children:
        stack.append((b"/", iter(_escaped_names(root.children))))
    while stack:
        prefix, pending_children = stack[-1]
        for name, node in pending_children:
            path = prefix + name
            line = _dump_line(path, node, heads)
            batch.append(line)
            pending += len(line)
            # Bounded by bytes, not lines: a hostile image can make single lines
            # (hard links repeating 64 KiB of xattrs) very long.
            if pending >= _WRITE_BATCH_BYTES:
                out.write(b"".join(batch))
                batch = []
                pending = 0
            if node.children:
                stack.append((path + b"/", iter(_escaped_names(node.children))))
                break
        else:
            stack.pop()
    out.write(b"".join(batch))
