# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent re-verifies the signed statement of every mounted ref each pass.

Real stores and real composefs mounts on this machine (the kernel tier), keys
made by ``openssl`` in the test, statements written by the core's
``sign_ref`` (and once by ``composefs-store sign``). Each refusal is checked
for its finding kind, its reason field, the exit code and the textfile; a
missing mount whose signature does not verify must stay unmounted.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from agent_fixtures import Node, kinds, node, run_once  # noqa: F401  (node: a fixture)

from composefs_fleet import mount_record, mountinfo
from composefs_fleet.ref_trust import sign_ref
from composefs_fleet.store_signatures import read_signatures, write_signatures
from composefs_fleet_agent.checks import Checker
from composefs_fleet_agent.config import load

pytestmark = pytest.mark.kernel

REF = "app/v1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Dict[str, Tuple[Path, Path]]:
    """name -> (private PEM, public PEM), made by openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test's ed25519 keys)")
    pytest.importorskip("cryptography", reason="the Python package cryptography (python3-cryptography) is missing: "
                        "signed refs need it")
    base = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("trusted", "other", "stranger"):
        private, public = base / (name + ".pem"), base / (name + ".pub")
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
        subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
        out[name] = (private, public)
    return out


class Signed:
    """A node with ref app/v1 mounted, its signature checked with ``trusted`` and ``other`` trusted."""

    def __init__(self, node: Node, keys: Dict[str, Tuple[Path, Path]]) -> None:
        self.node = node
        self.keys = keys
        self.trusted_dir = node.base / "keys" / "trusted.d"
        self.revoked_dir = node.base / "keys" / "revoked.d"
        for d in (self.trusted_dir, self.revoked_dir):
            d.mkdir(parents=True)
        for name in ("trusted", "other"):
            shutil.copyfile(keys[name][1], self.trusted_dir / (name + ".pub"))
        self.digest = node.image(REF, 1)
        self.where = node.base / "mnt" / "app"
        node.mount(self.digest, self.where)
        node.add_mount(self.digest, self.where, remount=True, ref=REF)

    def sign(self, key: str = "trusted", ref: str = REF, **kw: object) -> None:
        sign_ref(self.node.store, ref, [str(self.keys[key][0])], **kw)  # type: ignore[arg-type]

    @property
    def signature_file(self) -> Path:
        return self.node.store_path / "signatures" / REF

    def config(self, **extra: object) -> Path:
        doc: Dict[str, object] = {"trusted_keys": [str(self.trusted_dir)], "revoked_keys": [str(self.revoked_dir)]}
        doc.update(extra)
        return self.node.write_config(**doc)


@pytest.fixture
def signed(node: Node, keys) -> Signed:
    return Signed(node, keys)


def _lines(stderr: str, kind: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.split(">", 1)[-1].startswith(kind + ":")]


def _refused(signed: Signed, kind: str, reason: str, needle: str) -> str:
    """One pass through --once: exactly one finding ``kind`` with ``reason``; the node stays mounted."""
    res = run_once(signed.config())
    assert res.returncode == 1, res.stderr
    assert kinds(res.stderr) == ["config-loaded", kind, "pass-summary"], res.stderr
    (line,) = _lines(res.stderr, kind)
    assert "reason=%s" % reason in line and "ref=%s" % REF in line and "mount=%s" % signed.where in line, line
    assert "signature of ref %s: " % REF in line and needle in line, line
    m = signed.node.metrics()
    assert m['findings{kind="%s"}' % kind] == 1 and m["healthy"] == 0 and m["signatures_checked"] == 1
    other = "signature-invalid" if kind == "signature-expired" else "signature-expired"
    assert m['findings{kind="%s"}' % other] == 0
    return line


def test_a_valid_signature_passes_and_its_expiry_is_in_the_textfile(signed: Signed):
    expires = int(time.time()) + 86400
    signed.sign(expires=expires)
    res = run_once(signed.config())
    assert res.returncode == 0, res.stderr
    assert kinds(res.stderr) == ["config-loaded", "pass-summary"]
    assert "signatures of 1 refs checked" in res.stderr and "signatures=1" in res.stderr
    m = signed.node.metrics()
    assert m["healthy"] == 1 and m["signatures_checked"] == 1
    assert m['findings{kind="signature-invalid"}'] == 0 and m['findings{kind="signature-expired"}'] == 0
    assert m['signature_expiry_timestamp_seconds{mount="%s",ref="%s"}' % (signed.where, REF)] == expires


def test_the_sign_cli_s_statement_verifies_too(signed: Signed):
    cli = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.composefs_store", "--repo",
                          str(signed.node.store_path), "sign", REF, "--key", str(signed.keys["other"][0])],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    res = run_once(signed.config())
    assert res.returncode == 0, res.stderr
    # No expiry: no expiry series.
    assert not [k for k in signed.node.metrics() if k.startswith("signature_expiry")]


def test_ostree_format_key_files_are_trusted_and_revoked_too(signed: Signed):
    """ostree's ed25519 public key file: base64 of the raw 32 bytes (openssl pkey -outform DER -pubout | tail -c 32)."""
    der = subprocess.run(["openssl", "pkey", "-in", str(signed.keys["other"][0]), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    for key in signed.trusted_dir.iterdir():
        key.unlink()
    (signed.trusted_dir / "other.ed25519").write_text(base64.b64encode(der[-32:]).decode() + "\n")
    signed.sign("other")
    res = run_once(signed.config())
    assert res.returncode == 0, res.stderr
    (signed.revoked_dir / "other.ed25519").write_text(base64.b64encode(der[-32:]).decode() + "\n")
    _refused(signed, "signature-invalid", "revoked", "signed only by revoked key")


def test_unsigned_ref_is_invalid(signed: Signed):
    _refused(signed, "signature-invalid", "unsigned", "signatures/app/v1 is missing")


def test_signature_by_an_untrusted_key_is_invalid(signed: Signed):
    signed.sign("stranger")
    _refused(signed, "signature-invalid", "untrusted", "none of them a trusted key")


def test_signature_by_a_revoked_key_is_invalid(signed: Signed):
    signed.sign("other")
    shutil.copyfile(signed.keys["other"][1], signed.revoked_dir / "other.pub")
    _refused(signed, "signature-invalid", "revoked", "signed only by revoked key")


def test_tampered_statement_is_invalid(signed: Signed):
    signed.sign()
    doc = json.loads(signed.signature_file.read_text())
    # Still strictly well-formed, only one digit of the signing time moved.
    doc["statement"] = doc["statement"].replace("signed: 2", "signed: 1")
    signed.signature_file.write_text(json.dumps(doc))
    _refused(signed, "signature-invalid", "tampered", "changed after signing")


def test_tampered_signature_is_invalid(signed: Signed):
    signed.sign()
    doc = json.loads(signed.signature_file.read_text())
    raw = bytearray(base64.b64decode(doc["signatures"][0]["ed25519"]))
    raw[10] ^= 1
    doc["signatures"][0]["ed25519"] = base64.b64encode(bytes(raw)).decode()
    signed.signature_file.write_text(json.dumps(doc))
    _refused(signed, "signature-invalid", "tampered", "does not match the statement")


def test_statement_for_another_image_is_invalid(signed: Signed):
    """The ref moved on to v2 and was signed for it; the node still shows v1's image."""
    v2 = signed.node.image("app-v2", 2)
    signed.node.store.write_ref(REF, v2)
    signed.sign()
    line = _refused(signed, "signature-invalid", "wrong-image", "vouches for image %s, not %s" % (v2, signed.digest))
    assert "image_digest=%s" % signed.digest in line


def test_signature_copied_from_another_ref_is_invalid(signed: Signed):
    signed.node.store.write_ref("app/v2", signed.digest)  # the same image under another name
    signed.sign(ref="app/v2")
    write_signatures(signed.node.store, REF, read_signatures(signed.node.store, "app/v2") or b"")
    _refused(signed, "signature-invalid", "wrong-ref", "signed for ref app/v2, not this one")


def test_statement_from_the_future_is_invalid(signed: Signed):
    signed.sign(now=int(time.time()) + 3600)
    _refused(signed, "signature-invalid", "future", "in the future")


def test_malformed_signatures_file_is_invalid(signed: Signed):
    signed.signature_file.parent.mkdir(parents=True, exist_ok=True)
    signed.signature_file.write_text("{not json")
    _refused(signed, "signature-invalid", "malformed", "")


def test_expired_statement_is_its_own_finding(signed: Signed):
    now = int(time.time())
    signed.sign(now=now - 7200, expires=now - 3600)
    line = _refused(signed, "signature-expired", "expired", "the statement expired at")
    assert line.startswith("<4>"), line  # warning
    assert not [k for k in signed.node.metrics() if k.startswith("signature_expiry")]


def test_a_missing_mount_whose_signature_fails_is_not_mounted_again(signed: Signed):
    signed.sign("stranger")
    mount_record.unmount(signed.where)
    res = run_once(signed.config())
    assert res.returncode == 1
    assert kinds(res.stderr) == ["config-loaded", "signature-invalid", "mount-missing", "mount-remount-failed",
                                 "pass-summary"], res.stderr
    assert "not mounting %s again: the signature of ref %s does not vouch" % (signed.where, REF) in res.stderr
    top = mountinfo.top_mount(signed.where)
    assert top is None or not top.is_composefs()
    # Signed by a trusted key again: the same pass mounts it back.
    signed.sign()
    res = run_once(signed.config())
    assert res.returncode == 0, res.stderr
    assert kinds(res.stderr) == ["config-loaded", "mount-missing", "mount-remounted", "pass-summary"]


def test_keys_are_read_again_every_pass(signed: Signed):
    """A key revoked (or a key file gone) while the agent runs counts from the next pass, without a reload."""
    signed.sign("other")
    cfg = load(str(signed.config()))
    logged: List[object] = []
    checker = Checker(logged.append, lambda: None, history_dir=str(signed.node.history_dir))
    assert checker.run(cfg, 1, quarantine=False).healthy
    shutil.copyfile(signed.keys["other"][1], signed.revoked_dir / "other.pub")
    second = checker.run(cfg, 2, quarantine=False)
    assert [(f.kind, f.fields.get("reason")) for f in second.findings] == [("signature-invalid", "revoked")]
    (signed.revoked_dir / "other.pub").unlink()
    shutil.rmtree(signed.trusted_dir)
    third = checker.run(cfg, 3, quarantine=False)
    assert [(f.kind, f.fields.get("reason")) for f in third.findings] == [("signature-invalid", "keys")]
    assert "the keys cannot be read: key file %s" % signed.trusted_dir in third.findings[0].message


def test_unreadable_store_signature_is_invalid_not_a_crash(signed: Signed):
    signed.sign()
    signed.signature_file.unlink()
    signed.signature_file.symlink_to("/etc/passwd")
    res = run_once(signed.config())
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert kinds(res.stderr) == ["config-loaded", "signature-invalid", "pass-summary"], res.stderr
    assert "reason=malformed" in _lines(res.stderr, "signature-invalid")[0]


def test_no_trusted_key_means_no_check(signed: Signed):
    """Unsigned, yet healthy: without trusted keys (none configured, or an empty directory) nothing is asked."""
    res = run_once(signed.node.write_config())
    assert res.returncode == 0 and kinds(res.stderr) == ["config-loaded", "pass-summary"], res.stderr
    assert signed.node.metrics()["signatures_checked"] == 0
    for key in signed.trusted_dir.iterdir():
        key.unlink()
    res = run_once(signed.config())
    assert res.returncode == 0, res.stderr
    assert "signatures of 1 refs NOT checked: no public key in %s" % signed.trusted_dir in res.stderr


def test_a_mount_without_ref_is_not_checked(signed: Signed):
    signed.node.mounts[0].pop("ref")
    res = run_once(signed.config())
    assert res.returncode == 0, res.stderr
    assert signed.node.metrics()["signatures_checked"] == 0
