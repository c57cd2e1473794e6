# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""ed25519 keys made by openssl for the signed-ref tests of the modules and the node role.

Not a conftest.py: the test files import it by name.  Keys are made as a
fleet makes them (``openssl genpkey -algorithm ed25519``, ``openssl pkey
-pubout``); ostree's format as ostree's docs say (the last 32 bytes of the
DER public key, in base64).
"""
from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Dict, NamedTuple

import pytest

from composefs_fleet.ref_trust import sign_ref
from composefs_fleet.sign_keys import key_id
from composefs_fleet.store import Store

from pull_play import Release, make_remote  # type: ignore[import-not-found]


class KeyPair(NamedTuple):
    private: Path  # PEM PKCS#8
    public: Path  # PEM SubjectPublicKeyInfo
    ostree: str  # the public key in ostree's format: base64 of the 32 raw bytes, one line
    id: str  # sha256 of the raw public key (what results and messages name)

    @property
    def public_text(self) -> str:
        return self.public.read_text()


def make_key(directory: Path, name: str) -> KeyPair:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (Debian package openssl): the tests make their keys with it")
    pytest.importorskip("cryptography", reason="the Python package cryptography is not installed (signed refs need it)")
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / (name + ".pem"), directory / (name + ".pub.pem")
    subprocess.run([openssl, "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True, capture_output=True)
    subprocess.run([openssl, "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True, capture_output=True)
    der = subprocess.run([openssl, "pkey", "-in", str(private), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True).stdout
    raw = der[-32:]
    return KeyPair(private, public, base64.b64encode(raw).decode("ascii"), key_id(raw))


def store_files(top: Path) -> dict:
    """{relative path: bytes} of every regular file under a store (what a refused task must leave as it was).

    The flock files (lock, gate.lock, gc.lock: empty, made by the first lock taken) hold nothing.
    """
    out = {}
    for path in sorted(Path(top).rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name not in ("lock", "gate.lock", "gc.lock"):
            out[str(path.relative_to(top))] = path.read_bytes()
    return out


def make_keys(directory: Path, *names: str) -> Dict[str, KeyPair]:
    return {name: make_key(directory, name) for name in names}


def make_signed_remote(path: Path, key: KeyPair) -> Dict[str, Release]:
    """pull_play.make_remote's store (app/v1, app/v2) with app/v1 signed by ``key`` (app/v2 stays unsigned)."""
    releases = make_remote(path)
    with Store.open(path, notice=None) as store:
        sign_ref(store, "app/v1", [str(key.private)])
    return releases
