# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.image_send with signed refs: bundles carry signatures/<ref> and images/<digest>.sig, the node verifies.

Through ansible-playbook (local connection), as test_image_send.py; keys made
by openssl.  A refusal leaves the node's store byte for byte as it was.
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from composefs_fleet.fsverity_sig import pkcs7_sign
from composefs_fleet.remote_bundle import BundleTransport, check_member_name, iter_bundles
from composefs_fleet.store import Store
from composefs_fleet.store_image_sig import read_image_signature, write_image_signature
from composefs_fleet.store_signatures import read_signatures

from signing import make_signed_remote, store_files  # type: ignore[import-not-found]
from test_image_send import run_task  # type: ignore[import-not-found]



def fsverity_signature(tmp: Path, digest: str) -> bytes:
    """A real fs-verity built-in signature (PKCS#7, RSA key and certificate made by openssl) of the image ``digest``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (Debian package openssl): the test makes its certificate with it")
    key, cert = tmp / "fsverity.key", tmp / "fsverity.der"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-subj",
                    "/CN=composefs-fleet test", "-days", "2", "-outform", "DER", "-out", str(cert)],
                   check=True, capture_output=True)
    return pkcs7_sign(bytes.fromhex(digest), key.read_bytes(), cert.read_bytes())


@pytest.fixture
def controller(tmp_path, keys):
    """The controller's store: app/v1 signed by "release" (its image with a .sig), app/v2 unsigned."""
    path = tmp_path / "controller"
    releases = make_signed_remote(path, keys["release"])
    digest = releases["app/v1"].digest
    with Store.open(path, notice=None) as store:
        write_image_signature(store, digest, fsverity_signature(tmp_path, digest))
    return path, releases


@pytest.fixture
def node(tmp_path):
    Store.init(tmp_path / "node", notice=None)[0].close()
    return tmp_path / "node"


def test_bundle_carries_the_statement_and_the_image_signature(tmp_path, controller):
    path, releases = controller
    digest = releases["app/v1"].digest
    with Store.open(path, notice=None) as store:
        out = tmp_path / "out"
        out.mkdir()
        (signed,) = iter_bundles(store, str(out), digest=digest, ref="app/v1", prefix="signed", signed=True)
        (plain,) = iter_bundles(store, str(out), digest=digest, ref="app/v1", prefix="plain")
        statement = read_signatures(store, "app/v1")
    with tarfile.open(signed.path) as tar:
        assert tar.getnames() == ["meta.json", "refs/app/v1", "images/" + digest, "images/%s.sig" % digest,
                                  "signatures/app/v1"]
    with tarfile.open(plain.path) as tar:  # without signed: never a statement (it may go under another name)
        assert "signatures/app/v1" not in tar.getnames() and "images/%s.sig" % digest in tar.getnames()
    with BundleTransport([signed.path]) as transport:
        assert transport.get_small("signatures/app/v1", 65536) == statement
        assert transport.get_small("images/%s.sig" % digest, 65536) == (path / "images" / (digest + ".sig")).read_bytes()


@pytest.mark.parametrize("name, why", [
    ("signatures/app/v1", None),
    ("images/%s.sig" % ("ab" * 32), None),
    ("signatures/../refs/x", "a name with an empty, '.' or '..' component"),
    ("signatures/.hidden", "may not start with '.'"),
    ("images/%s.sigx" % ("ab" * 32), "not the name of a store file"),
    ("images/abc.sig", "not the name of a store file"),
])
def test_member_names(name, why):
    found = check_member_name(name)
    assert (found is None) if why is None else (why in (found or "")), (name, found)


def test_signed_send_check_real_unchanged(tmp_path, controller, node, keys):
    path, releases = controller
    digest = releases["app/v1"].digest
    args = dict(store=str(node), ref="app/v1", from_store=str(path), trusted_keys=[str(keys["release"].public)])
    before = store_files(node)
    _proc, planned = run_task(tmp_path, args, check=True)
    assert not planned.get("failed"), planned
    assert planned["changed"] and planned["signature"]["keys"] == [keys["release"].id]
    assert store_files(node) == before
    _proc, done = run_task(tmp_path, args)
    assert not done.get("failed"), done
    assert done["changed"] and done["digest"] == digest and done["signature"]["keys"] == [keys["release"].id]
    with Store.open(node, notice=None) as store, Store.open(path, notice=None) as src:
        assert store.read_ref("app/v1") == digest
        assert read_signatures(store, "app/v1") == read_signatures(src, "app/v1")
        # The image's fs-verity signature travelled too, byte for byte (the kernel checks it where the image gets
        # fs-verity; this test's filesystem may have none).
        assert read_image_signature(store, digest) == read_image_signature(src, digest) is not None
    _proc, again = run_task(tmp_path, args)
    assert not again.get("failed") and not again["changed"], again
    assert keys["release"].public_text.splitlines()[1] not in _proc.stdout


@pytest.mark.parametrize("case, reason, message", [
    ("unsigned", "unsigned", "signatures/app/v2 is missing"),
    ("untrusted", "untrusted", "none of them a trusted key"),
    ("revoked", "revoked", "signed only by revoked key"),
])
def test_refused_send_writes_nothing(tmp_path, controller, node, keys, case, reason, message):
    path, _releases = controller
    args = dict(store=str(node), ref="app/v2" if case == "unsigned" else "app/v1", from_store=str(path),
                trusted_keys=[str(keys["other" if case == "untrusted" else "release"].public)])
    if case == "revoked":
        args["revoked_keys"] = [keys["release"].public_text]
    before = store_files(node)
    for check in (True, False):
        _proc, res = run_task(tmp_path, args, check=check)
        assert res.get("failed") and res.get("reason") == reason, res
        assert message in res["msg"], res["msg"]
        assert store_files(node) == before


def test_signed_send_keeps_the_ref_name(tmp_path, controller, node, keys):
    path, _releases = controller
    before = store_files(node)
    _proc, res = run_task(tmp_path, dict(store=str(node), ref="app/current", from_ref="app/v1", from_store=str(path),
                                         trusted_keys=[str(keys["release"].public)]))
    assert res.get("failed") and "a signed ref keeps its name" in res["msg"], res
    assert res.get("transfers", 0) == 0 and store_files(node) == before
