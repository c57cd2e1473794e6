# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""ed25519 keys for signed refs: what files and texts are accepted, and their ids.

Accepted, so that keys can come from the tools fleets already use:

* PEM, as ``openssl genpkey -algorithm ed25519`` (private, PKCS#8) and
  ``openssl pkey -pubout`` (public, SubjectPublicKeyInfo) write it;
  several PEM blocks in one file or text are several keys.
* ostree's ed25519 key files: one key per line in base64, the 32 raw public
  bytes (``verification-ed25519-file``) or, for secret keys, the 64 bytes
  seed||public (``ostree sign --keys-file``).  Empty lines and ``#``
  comments are skipped.
* A directory: every regular file in it whose name does not start with
  "." (sorted), as ostree's ``trusted.ed25519.d``.

A key's id is the sha256 of its 32 raw public bytes in hex: the same key
has the same id whatever file it came from, and a revocation list can name
it whatever format the trust list used.

``cryptography`` is imported only when a key is used, so the rest of the
core works on nodes without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from typing import Any, List

from .errors import StoreError
from .safe_dirs import read_at_most

#: Key files are small; anything larger is a mistake (a wrong path), not a key list.
MAX_KEY_FILE_BYTES = 1 << 20
RAW_KEY_BYTES = 32
_PEM_MARK = "-----BEGIN "


class KeyFileError(StoreError):
    """A key file or text cannot be used (the message names it and why)."""


def crypto() -> Any:
    """The ``cryptography`` ed25519 module, or a clear error naming the package to install."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise StoreError("signed refs need the Python package 'cryptography' on this machine "
                         "(Debian: apt install python3-cryptography; or pip install cryptography)") from None
    return ed25519


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()


class PublicKey:
    """A trusted (or revoked) ed25519 public key and where it came from."""

    __slots__ = ("raw", "id", "source", "_key")

    def __init__(self, raw: bytes, source: str) -> None:
        if len(raw) != RAW_KEY_BYTES:
            raise KeyFileError("%s: an ed25519 public key has %d bytes, not %d" % (source, RAW_KEY_BYTES, len(raw)))
        self.raw = raw
        self.id = key_id(raw)
        self.source = source
        self._key: Any = None

    def verify(self, signature: bytes, data: bytes) -> bool:
        if self._key is None:
            self._key = crypto().Ed25519PublicKey.from_public_bytes(self.raw)
        try:
            self._key.verify(signature, data)
        except Exception:  # cryptography's InvalidSignature; nothing else is raised for bytes of any value
            return False
        return True


class PrivateKey:
    """An ed25519 signing key; ``id`` is its public key's."""

    __slots__ = ("id", "source", "_key")

    def __init__(self, key: Any, source: str) -> None:
        from cryptography.hazmat.primitives import serialization

        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.id = key_id(raw)
        self.source = source
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key.sign(data))


def load_public_keys(source: str) -> List[PublicKey]:
    """The public keys of a file, a directory, or PEM text (see the module's docstring)."""
    return [key for text, shown in _texts(source) for key in _public_from_text(text, shown)]


def load_private_keys(source: str) -> List[PrivateKey]:
    """The signing keys of a file (PEM PKCS#8 or an ostree secret key file)."""
    keys = [key for text, shown in _texts(source) for key in _private_from_text(text, shown)]
    if not keys:
        raise KeyFileError("%s: no ed25519 private key in it" % _shown(source))
    return keys


def _shown(source: str) -> str:
    return "PEM text" if _PEM_MARK in source else "key file %s" % source


def _texts(source: str) -> List[Any]:
    if not isinstance(source, str) or not source:
        raise KeyFileError("a key must be a file path or PEM text (got %r)" % (source,))
    if _PEM_MARK in source:
        return [(source, "PEM text")]
    try:
        st = os.stat(source)
    except OSError as exc:
        raise KeyFileError("key file %s: %s" % (source, exc.strerror or exc)) from None
    if stat.S_ISDIR(st.st_mode):
        out = []
        try:
            names = sorted(os.listdir(source))
        except OSError as exc:
            raise KeyFileError("key directory %s: %s" % (source, exc.strerror or exc)) from None
        for name in names:
            path = os.path.join(source, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError as exc:
                raise KeyFileError("key file %s: %s" % (path, exc.strerror or exc)) from None
            if name.startswith(".") or not regular:
                continue
            out.append((_read_text(path), "key file %s" % path))
        return out
    return [(_read_text(source), "key file %s" % source)]


def _read_text(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyFileError("key file %s: %s" % (path, exc.strerror or exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeyFileError("key file %s: not a regular file" % path)
        raw = read_at_most(fd, MAX_KEY_FILE_BYTES)
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise KeyFileError("key file %s: larger than %d bytes; not a key file" % (path, MAX_KEY_FILE_BYTES))
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError("key file %s: not text (a DER key? convert it: openssl pkey -pubin -outform PEM)" % path) from None


def _pem_blocks(text: str, shown: str) -> List[Any]:
    """[(label, block text)] of every PEM block."""
    out = []
    rest = text
    while _PEM_MARK in rest:
        start = rest.index(_PEM_MARK)
        label_end = rest.find("-----", start + len(_PEM_MARK))
        if label_end < 0:
            raise KeyFileError("%s: a PEM header without its closing dashes" % shown)
        label = rest[start + len(_PEM_MARK):label_end]
        end_mark = "-----END %s-----" % label
        end = rest.find(end_mark, label_end)
        if end < 0:
            raise KeyFileError("%s: PEM block %s has no END line" % (shown, label))
        out.append((label, rest[start:end + len(end_mark)] + "\n"))
        rest = rest[end + len(end_mark):]
    return out


def _ostree_lines(text: str, shown: str, size: int) -> List[bytes]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError("%s, line %d: neither PEM nor a base64 ed25519 key (ostree's format)" % (shown, number)) from None
        if len(raw) != size:
            what = {RAW_KEY_BYTES: "a public key (32 bytes)", 2 * RAW_KEY_BYTES: "a secret key (64 bytes: seed and public key)"}
            raise KeyFileError("%s, line %d: %d bytes; expected %s" % (shown, number, len(raw), what[size]))
        out.append(raw)
    return out


def _public_from_text(text: str, shown: str) -> List[PublicKey]:
    blocks = _pem_blocks(text, shown)
    if not blocks:
        keys = [PublicKey(raw, shown) for raw in _ostree_lines(text, shown, RAW_KEY_BYTES)]
        if not keys:
            raise KeyFileError("%s: no key in it" % shown)
        return keys
    ed25519 = crypto()
    from cryptography.hazmat.primitives import serialization

    out = []
    for label, block in blocks:
        if "PRIVATE KEY" in label:
            raise KeyFileError("%s holds a private key; trust needs the public key only (openssl pkey -pubout)" % shown)
        if label != "PUBLIC KEY":
            raise KeyFileError("%s: a PEM block %r is not a public key" % (shown, label))
        try:
            key = serialization.load_pem_public_key(block.encode("ascii"))
        except ValueError as exc:
            raise KeyFileError("%s: unreadable public key: %s" % (shown, exc)) from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise _not_ed25519(shown, key)
        out.append(PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw), shown))
    return out


def _not_ed25519(shown: str, key: Any) -> KeyFileError:
    return KeyFileError("%s: a %s key; signed refs use ed25519 (openssl genpkey -algorithm ed25519)"
                        % (shown, type(key).__name__.lstrip("_")))


def _private_from_text(text: str, shown: str) -> List[PrivateKey]:
    ed25519 = crypto()
    from cryptography.hazmat.primitives import serialization

    blocks = _pem_blocks(text, shown)
    if not blocks:
        out = []
        for raw in _ostree_lines(text, shown, 2 * RAW_KEY_BYTES):
            key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:RAW_KEY_BYTES])
            public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if public != raw[RAW_KEY_BYTES:]:
                raise KeyFileError("%s: the public half does not belong to the seed (damaged key file)" % shown)
            out.append(PrivateKey(key, shown))
        return out
    out = []
    for label, block in blocks:
        if label == "ENCRYPTED PRIVATE KEY":
            raise KeyFileError("%s: the key is encrypted; give an unencrypted key kept where only root reads it" % shown)
        if label != "PRIVATE KEY":
            raise KeyFileError("%s: a PEM block %r is not an ed25519 private key (PKCS#8 'PRIVATE KEY')" % (shown, label))
        try:
            key = serialization.load_pem_private_key(block.encode("ascii"), password=None)
        except (TypeError, ValueError) as exc:
            raise KeyFileError("%s: unreadable private key: %s" % (shown, exc)) from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise _not_ed25519(shown, key)
        out.append(PrivateKey(key, shown))
    return out


__all__ = ["KeyFileError", "PrivateKey", "PublicKey", "crypto", "key_id", "load_private_keys", "load_public_keys"]
