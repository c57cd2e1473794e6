# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Keys and signed statements for the signed-ref tests, made with openssl, not with the code under test.

* :func:`make_key`: an ed25519 key pair as ``openssl genpkey -algorithm ed25519``
  and ``openssl pkey -pubout`` write it, plus the same key in ostree's
  format, made the way ostree-sign(1) says: the public key is
  ``openssl pkey -outform DER -pubout | tail -c 32 | base64``, the secret key
  base64(seed || public) with the seed the last 32 bytes of the private
  key's DER.
* :func:`signatures_file`: a ``signatures/<ref>`` file for any statement text,
  each signature made by ``openssl pkeyutl -sign -rawin`` (so statements the
  ``sign`` command refuses to make: expired, from the future, back-dated).
* :func:`openssl_verifies`: ``openssl pkeyutl -verify``, to check what ``sign``
  wrote with a verifier that is not ours.

Not a conftest.py (see store_fixtures.py): tests import these by name.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import pytest

OPENSSL = "openssl"
STATEMENT_TYPE = "composefs-fleet signed-ref 1"
#: A store's lock files (store_lock.py), at its top.
LOCK_FILES = ("lock", "gate.lock", "gc.lock")


def openssl_missing() -> str:
    """Why keys cannot be made here ("" if they can)."""
    if shutil.which(OPENSSL) is None:
        return "openssl not on PATH (Debian package openssl; scripts/setup installs it)"
    probe = subprocess.run([OPENSSL, "list", "-public-key-algorithms"], capture_output=True, text=True)
    if probe.returncode != 0 or "ED25519" not in probe.stdout.upper():
        return "this openssl has no ed25519 (OpenSSL >= 1.1.1 needed for genpkey -algorithm ed25519)"
    return ""


def cryptography_missing() -> str:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: F401  (only whether it imports)
    except ImportError:
        return "the Python package cryptography is not installed (Debian: python3-cryptography)"
    return ""


def _run(argv: Sequence[str], data: Optional[bytes] = None, shell: bool = False) -> bytes:
    res = subprocess.run(argv if not shell else argv[0], input=data, capture_output=True, shell=shell)
    if res.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (argv if shell else " ".join(argv), res.returncode,
                                                        res.stderr.decode(errors="replace").strip()))
    return res.stdout


class Key(NamedTuple):
    """One ed25519 key in every file format the tools accept."""

    name: str
    private: Path          # PEM PKCS#8, openssl genpkey
    public: Path           # PEM SubjectPublicKeyInfo, openssl pkey -pubout
    ostree_public: Path    # base64 of the 32 raw public bytes
    ostree_secret: Path    # base64 of seed || public (64 bytes)
    raw: bytes             # the 32 raw public bytes

    @property
    def id(self) -> str:
        """The key id of the contract: sha256 of the raw public key, hex."""
        return hashlib.sha256(self.raw).hexdigest()

    def public_pem(self) -> str:
        return self.public.read_text()


def make_key(directory: Path, name: str) -> Key:
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / (name + ".pem")
    public = directory / (name + ".pub")
    _run([OPENSSL, "genpkey", "-algorithm", "ed25519", "-out", str(private)])
    os.chmod(str(private), 0o600)
    _run([OPENSSL, "pkey", "-in", str(private), "-pubout", "-out", str(public)])
    # ostree-sign(1), "ed25519 keys": exactly these pipelines.
    quoted = "'%s'" % str(private).replace("'", "'\\''")
    public_b64 = _run(["openssl pkey -outform DER -pubout -in %s | tail -c 32 | base64" % quoted], shell=True).strip()
    seed_b64 = _run(["openssl pkey -outform DER -in %s | tail -c 32 | base64" % quoted], shell=True).strip()
    raw = base64.b64decode(public_b64)
    if len(raw) != 32:
        raise RuntimeError("openssl gave a %d-byte ed25519 public key" % len(raw))
    ostree_public = directory / (name + ".ostree.pub")
    ostree_public.write_bytes(public_b64 + b"\n")
    ostree_secret = directory / (name + ".ostree.sec")
    ostree_secret.write_bytes(base64.b64encode(base64.b64decode(seed_b64) + raw) + b"\n")
    os.chmod(str(ostree_secret), 0o600)
    return Key(name, private, public, ostree_public, ostree_secret, raw)


class KeySet:
    """Keys made once per session, by name (``keys["trusted"]``)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._keys: Dict[str, Key] = {}

    def __getitem__(self, name: str) -> Key:
        if name not in self._keys:
            self._keys[name] = make_key(self.dir, name)
        return self._keys[name]


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> KeySet:
    """ed25519 keys made by openssl (skips when openssl or cryptography is missing)."""
    reason = openssl_missing() or cryptography_missing()
    if reason:
        try:
            from conftest import unavailable
        except ImportError:
            pytest.skip(reason)
        unavailable(reason)
    return KeySet(tmp_path_factory.mktemp("keys"))


def hidden_cryptography(tmp_path: Path) -> Dict[str, str]:
    """Environment variables under which Python cannot import cryptography: a package of that name, first on
    PYTHONPATH, that raises ImportError (as on a node without python3-cryptography)."""
    fake = tmp_path / "no-cryptography" / "cryptography"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text('raise ImportError("cryptography hidden by the test")\n')
    return {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}


# -------------------------------------------------------------- statements --

def rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))


def statement(ref: str, image: str, signed: float, expires: Optional[float] = None) -> str:
    """The statement text of the contract, for any times."""
    text = "%s\nref: %s\nimage: fsverity-sha256:%s\nsigned: %s\n" % (STATEMENT_TYPE, ref, image, rfc3339(signed))
    if expires is not None:
        text += "expires: %s\n" % rfc3339(expires)
    return text


def openssl_sign(key: Key, data: bytes, workdir: Path) -> bytes:
    """ed25519 signature of ``data`` by openssl (PureEdDSA over the bytes themselves)."""
    workdir.mkdir(parents=True, exist_ok=True)
    msg = workdir / ".msg"
    msg.write_bytes(data)
    try:
        sig = _run([OPENSSL, "pkeyutl", "-sign", "-rawin", "-inkey", str(key.private), "-in", str(msg)])
    finally:
        msg.unlink()
    if len(sig) != 64:
        raise RuntimeError("openssl gave a %d-byte ed25519 signature" % len(sig))
    return sig


def openssl_verifies(key: Key, data: bytes, signature: bytes, workdir: Path) -> bool:
    workdir.mkdir(parents=True, exist_ok=True)
    msg, sig = workdir / ".msg", workdir / ".sig"
    msg.write_bytes(data)
    sig.write_bytes(signature)
    try:
        res = subprocess.run([OPENSSL, "pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", str(key.public),
                              "-in", str(msg), "-sigfile", str(sig)], capture_output=True, text=True)
    finally:
        msg.unlink()
        sig.unlink()
    return res.returncode == 0 and "Signature Verified Successfully" in res.stdout


def signatures_file(text: str, signers: List[Key], workdir: Path) -> bytes:
    """A ``signatures/<ref>`` file: ``text`` signed by each of ``signers`` (openssl)."""
    data = text.encode("utf-8")
    entries = [{"key": key.id, "ed25519": base64.b64encode(openssl_sign(key, data, workdir)).decode("ascii")}
               for key in signers]
    return json.dumps({"statement": text, "signatures": entries}, indent=1).encode("utf-8")


def write_signatures(store: Path, ref: str, data: bytes) -> Path:
    """Put a signatures file where a store (or a served store) keeps ``ref``'s."""
    path = store / "signatures" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_ref(store: Path, ref: str, digest: str) -> None:
    """Point a served store's ``refs/<ref>`` at ``digest`` (as a server operator would move it)."""
    path = store / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(digest + "\n")


def store_files(store: Path) -> Dict[str, str]:
    """Every entry under a store: relative path -> sha256 of the contents, "dir" or "link -> TARGET".

    What a refused pull must leave exactly as it was.  The store's lock files are left out: the first
    command that locks the store creates them (empty; flock(2) writes nothing into them).
    """
    out: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(str(store)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, str(store))
            if rel in LOCK_FILES and os.path.isfile(path) and os.path.getsize(path) == 0:
                continue
            if os.path.islink(path):
                out[rel] = "link -> " + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as handle:
                    out[rel] = hashlib.sha256(handle.read()).hexdigest()
    return out


def tampered_signature(data: bytes) -> bytes:
    """The signatures file with one bit of its first signature flipped (still valid base64 of 64 bytes)."""
    doc = json.loads(data)
    sig = bytearray(base64.b64decode(doc["signatures"][0]["ed25519"]))
    sig[10] ^= 0x01
    doc["signatures"][0]["ed25519"] = base64.b64encode(bytes(sig)).decode("ascii")
    return json.dumps(doc, indent=1).encode("utf-8")


def tampered_statement(data: bytes, old: str, new: str) -> bytes:
    """The signatures file with ``old`` replaced by ``new`` in its statement (the signatures kept)."""
    doc = json.loads(data)
    if old not in doc["statement"]:
        raise ValueError("%r not in the statement" % old)
    doc["statement"] = doc["statement"].replace(old, new, 1)
    return json.dumps(doc, indent=1).encode("utf-8")
