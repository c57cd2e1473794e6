# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The signed-ref statement and the file that carries it (``signatures/<ref>``): format only.

The statement is what a key vouches for, a few lines of text signed as
bytes::

    composefs-fleet signed-ref 1
    ref: app/v1
    image: fsverity-sha256:<64 hex>
    signed: 2026-12-04T14:40:29Z
    expires: 2027-01-01T00:00:00Z        (optional)

Its first line says what kind of statement it is, so a signature made for
something else (another tool, another version) never reads as one of
these; the ref line binds the name (a signature of ``app/v1`` never
vouches for ``app/v2``, ostree's ``ostree.ref-binding``); the signing time
orders statements (rollback protection, ostree's ``timestamp-check``).
It is parsed strictly: exactly these lines in this order, nothing more.

The file is strict JSON::

    {"statement": "<the statement>",
     "signatures": [{"key": "<key id>", "ed25519": "<base64>"}]}

Signatures cover the statement's UTF-8 bytes and are checked before the
statement is parsed (:mod:`.ref_trust`), as containers' signatures are.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import json
import re
import time
from typing import List, Optional, Tuple

from .json_text import JsonFileError, load_json_object
from .store_names import is_hex_name, split_ref_name

STATEMENT_TYPE = "composefs-fleet signed-ref 1"
IMAGE_ALGORITHM = "fsverity-sha256"
#: A signatures file larger than this is not one (it holds a few hundred bytes per key).
MAX_SIGNATURES_BYTES = 64 * 1024
MAX_SIGNATURES = 32
ED25519_SIGNATURE_BYTES = 64

_TIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})Z$")
_WHEN = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2}))?(?:\.\d+)?(Z|[+-]\d{2}:?\d{2})$")
_DURATION = re.compile(r"^\+?(\d+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class StatementError(ValueError):
    """A statement or signatures file that does not follow the format (the message says where)."""


class Statement:
    """What a signed statement says, and which trusted keys' signatures were found valid."""

    __slots__ = ("ref", "image", "signed", "expires", "keys", "raw")

    def __init__(self, ref: str, image: str, signed: int, expires: Optional[int] = None,
                 keys: Optional[List[str]] = None, raw: bytes = b"") -> None:
        self.ref = ref
        self.image = image
        self.signed = signed
        self.expires = expires
        self.keys = list(keys or [])
        self.raw = raw

    def as_dict(self) -> dict:
        return {"ref": self.ref, "image": self.image, "signed": format_time(self.signed),
                "expires": None if self.expires is None else format_time(self.expires), "keys": list(self.keys)}


def format_time(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def parse_time(text: str) -> int:
    """A statement's time: RFC 3339 in UTC to the second, nothing else."""
    m = _TIME.match(text)
    if not m:
        raise StatementError("time %r is not YYYY-MM-DDTHH:MM:SSZ" % text[:40])
    return _epoch(tuple(int(v) for v in m.groups()), text)


def _epoch(fields: Tuple[int, ...], text: str) -> int:
    try:
        epoch = calendar.timegm(fields + (0, 0, 0))
    except (ValueError, OverflowError):
        epoch = None
    if epoch is None or time.gmtime(epoch)[:6] != fields:
        raise StatementError("time %r does not exist" % text[:40])
    return epoch


def parse_when(text: str, now: float) -> int:
    """``--expires``: an RFC 3339 time (any offset) or a duration from ``now`` ("30d", "12h", "90m", "3600s", "2w")."""
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return int(now) + int(m.group(1)) * _UNIT[m.group(2)]
    m = _WHEN.match(text)
    if not m:
        raise StatementError("%r is neither a time (2027-01-01T00:00:00Z) nor a duration (30d, 12h, 90m, 3600s)" % text[:40])
    year, month, day, hour, minute = (int(v) for v in m.groups()[:5])
    second = int(m.group(6) or 0)
    epoch = _epoch((year, month, day, hour, minute, second), text)
    zone = m.group(7)
    if zone != "Z":
        sign = -1 if zone[0] == "+" else 1
        digits = zone[1:].replace(":", "")
        epoch += sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return epoch


def format_statement(ref: str, image: str, signed: int, expires: Optional[int] = None) -> bytes:
    split_ref_name(ref)
    if not is_hex_name(image):
        raise StatementError("image digest %r is not 64 lowercase hex digits" % image[:80])
    if expires is not None and expires <= signed:
        raise StatementError("expiry %s is not after the signing time %s" % (format_time(expires), format_time(signed)))
    lines = [STATEMENT_TYPE, "ref: " + ref, "image: %s:%s" % (IMAGE_ALGORITHM, image), "signed: " + format_time(signed)]
    if expires is not None:
        lines.append("expires: " + format_time(expires))
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse_statement(raw: bytes) -> Statement:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StatementError("statement is not UTF-8") from None
    if not text.endswith("\n"):
        raise StatementError("statement does not end with a newline")
    lines = text[:-1].split("\n")
    if lines[0] != STATEMENT_TYPE:
        raise StatementError("not a signed-ref statement: first line %r, expected %r" % (lines[0][:60], STATEMENT_TYPE))
    names = ["ref", "image", "signed", "expires"]
    if len(lines) not in (4, 5):
        raise StatementError("statement has %d lines; expected 4 or 5" % len(lines))
    values = []
    for line, name in zip(lines[1:], names):
        prefix = name + ": "
        if not line.startswith(prefix):
            raise StatementError("statement line %r: expected %r" % (line[:60], prefix))
        values.append(line[len(prefix):])
    ref = values[0]
    try:
        canonical = b"/".join(split_ref_name(ref)).decode("utf-8")
    except Exception as exc:
        raise StatementError("statement's ref %r: %s" % (ref[:80], exc)) from None
    if canonical != ref:
        raise StatementError("statement's ref %r is not in canonical form" % ref[:80])
    algorithm, _sep, image = values[1].partition(":")
    if algorithm != IMAGE_ALGORITHM or not _HEX64.match(image):
        raise StatementError("statement's image %r: expected %s:<64 lowercase hex>" % (values[1][:80], IMAGE_ALGORITHM))
    signed = parse_time(values[2])
    expires = parse_time(values[3]) if len(values) > 3 else None
    if expires is not None and expires <= signed:
        raise StatementError("statement expires (%s) before it was signed (%s)" % (values[3], values[2]))
    return Statement(ref, image, signed, expires, raw=raw)


def encode_signatures_file(statement: bytes, signatures: List[Tuple[str, bytes]]) -> bytes:
    """The ``signatures/<ref>`` file: the statement and [(key id, ed25519 signature)]."""
    doc = {"statement": statement.decode("utf-8"),
           "signatures": [{"key": key, "ed25519": base64.b64encode(sig).decode("ascii")} for key, sig in signatures]}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")


def decode_signatures_file(raw: bytes, shown: str) -> Tuple[bytes, List[Tuple[str, bytes]]]:
    """(statement bytes, [(key id, signature)]) of a signatures file; the statement is not parsed here."""
    if len(raw) > MAX_SIGNATURES_BYTES:
        raise StatementError("%s: larger than %d bytes" % (shown, MAX_SIGNATURES_BYTES))
    try:
        doc = load_json_object(raw, shown)
    except JsonFileError as exc:
        raise StatementError(str(exc)) from None
    if set(doc) != {"statement", "signatures"}:
        raise StatementError("%s: expected exactly the keys \"statement\" and \"signatures\", found %s"
                             % (shown, ", ".join(sorted(doc)) or "none"))
    statement, entries = doc["statement"], doc["signatures"]
    if not isinstance(statement, str) or not isinstance(entries, list):
        raise StatementError("%s: \"statement\" must be a string and \"signatures\" a list" % shown)
    if not entries or len(entries) > MAX_SIGNATURES:
        raise StatementError("%s: %d signatures (1 to %d expected)" % (shown, len(entries), MAX_SIGNATURES))
    out = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or set(entry) != {"key", "ed25519"}:
            raise StatementError("%s: signature %d must have exactly \"key\" and \"ed25519\"" % (shown, number))
        key, encoded = entry["key"], entry["ed25519"]
        if not isinstance(key, str) or not _HEX64.match(key) or not isinstance(encoded, str):
            raise StatementError("%s: signature %d: \"key\" must be a key id (64 lowercase hex)" % (shown, number))
        try:
            sig = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise StatementError("%s: signature %d is not base64" % (shown, number)) from None
        if len(sig) != ED25519_SIGNATURE_BYTES:
            raise StatementError("%s: signature %d has %d bytes, not %d" % (shown, number, len(sig), ED25519_SIGNATURE_BYTES))
        out.append((key, sig))
    try:
        return statement.encode("utf-8"), out
    except UnicodeEncodeError:
        raise StatementError("%s: the statement is not valid Unicode" % shown) from None


__all__ = ["IMAGE_ALGORITHM", "MAX_SIGNATURES_BYTES", "STATEMENT_TYPE", "Statement", "StatementError",
           "decode_signatures_file", "encode_signatures_file", "format_statement", "format_time",
           "parse_statement", "parse_time", "parse_when"]
