# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Kernel-checked image signatures for real (the host kernel has no fs-verity):
the guest's Debian 6.12 kernel has CONFIG_FS_VERITY_BUILTIN_SIGNATURES=y.

One in-guest run (image_signature_checks.py): the boot unit loads the
trusted certificate into ``.fs-verity`` with our keyring code; an image the
store holds with unsigned fs-verity is written again with its signature, which
the kernel then holds (FS_IOC_READ_VERITY_METADATA) byte for byte as
``images/<digest>.sig``; it mounts with its digest pinned; a signature by a
certificate not in the keyring, and one of the trusted key over another
digest, are refused by the kernel with nothing published.  Keys and
certificates are made on the host by openssl.  The signature is checked
again whenever the kernel loads the image's verity data: emptied keyring,
evicted inode, and the image cannot be opened.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import guest_vm
import pytest

pytestmark = pytest.mark.guest

HERE = Path(__file__).resolve().parent
UNIT = guest_vm.REPO / "roles" / "composefs_node" / "files" / "composefs-fleet-fsverity-keys.service"


def _openssl_pair(directory: Path, name: str, subject: str):
    key, cert = directory / (name + ".key"), directory / (name + ".pem")
    res = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                          "-out", str(cert), "-subj", subject, "-days", "2"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("openssl cannot make an RSA key and certificate here: %s" % res.stderr.strip())
    return key.read_text(), cert.read_text()


@pytest.fixture(scope="module")
def result(guest, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsverity-signers")
    trusted_key, trusted_cert = _openssl_pair(d, "trusted", "/O=composefs-fleet/CN=fleet image signer")
    untrusted_key, untrusted_cert = _openssl_pair(d, "untrusted", "/O=elsewhere/CN=not in the keyring")
    spec = {"trusted_key": trusted_key, "trusted_cert": trusted_cert, "untrusted_key": untrusted_key,
            "untrusted_cert": untrusted_cert, "unit": UNIT.read_text()}
    script = ("SPEC = %r\n" % spec) + (HERE / "image_signature_checks.py").read_text()
    # The script comes on stdin (run_json takes no input); it prints one JSON object.
    out = guest.vm.run(["env", "PYTHONPATH=%s/lib" % guest_vm.GUEST_ROOT, "python3", "-"], input=script.encode())
    data = json.loads(out.stdout)
    assert "crash" not in data, data.get("crash")
    return data


def test_boot_unit_loads_the_certificate_into_the_fs_verity_keyring(result):
    assert result["keyring_id"] > 0
    assert result["unit_start"]["rc"] == 0, result["unit_start"]
    assert result["unit_active"] == "active", result["unit_journal"]
    assert "1 certificate(s) loaded into the .fs-verity keyring" in result["unit_journal"]
    assert result["unit_verify"]["rc"] == 0, result["unit_verify"]
    assert "local-fs-pre.target" in result["unit_before"].split()
    new = [k for k in result["keys_after_unit"] if k not in result["keys_before"]]
    assert len(new) == 1 and "fleet image signer" in new[0][1], result["keys_after_unit"]
    listed = result["cli_list"]
    assert listed["rc"] == 0 and str(new[0][0]) in listed["out"], listed
    # Loaded again: the key is replaced, not added twice.
    assert len(result["load_again"]) == 1
    assert len([k for k in result["keys_after_reload"] if "fleet image signer" in k[1]]) == 1


def test_signed_image_gets_fs_verity_with_its_signature_and_mounts(result):
    digest = result["digest"]
    # Added the ordinary way first: fs-verity without a signature, objects too.
    assert result["unsigned_kernel_signature"] is None and result["object_kernel_signature"] is None
    # Written again with the signature (the kernel takes one only at enable), then a no-op.
    assert result["write_signed"] == [digest, True]
    assert result["write_signed_again"] == [digest, False]
    assert result["measure"] == ["sha256:" + digest, result["measure"][1]]
    # What the kernel holds is the .sig file, byte for byte.
    assert result["signed_kernel_signature"] == result["signature"] == result["sig_file"]
    assert result["mount"]["rc"] == 0, result["mount"]
    assert result["reads"] == {"a.bin": "ok", "sub/b.bin": "ok", "tiny": "ok"}
    assert result["umount"]["rc"] == 0, result["umount"]
    assert result["fsck_errors"] == []


def test_signature_is_checked_again_when_the_image_is_opened_cold(result):
    # With the keyring emptied and the inode evicted, the kernel refuses to open the signed image;
    # with the certificate loaded again, it opens: why the keys unit runs before the mounts.
    assert result["open_without_key"] == "ENOKEY", result["dmesg"]
    assert result["open_after_reload"] == "ok"


def test_kernel_refuses_foreign_and_wrong_signatures_and_nothing_is_published(result):
    refusals = result["refusals"]
    untrusted = refusals["untrusted"]
    assert untrusted["error"][0] == "VeritySignatureError", untrusted
    message = untrusted["error"][1]
    assert message.startswith("images/%s of " % result["digest"]) and message.endswith("; nothing published")
    assert "not in the kernel's .fs-verity keyring" in message and "ENOKEY" in message, message
    assert untrusted["images"] == []
    other = refusals["other_digest"]
    assert other["error"][0] == "VeritySignatureError", other
    assert "does not verify" in other["error"][1] and "EKEYREJECTED" in other["error"][1], other
    assert other["images"] == []
    malformed = refusals["malformed_ioctl"]
    assert malformed["error"][0] == "VeritySignatureError" and "EBADMSG" in malformed["error"][1], malformed
    assert malformed["verity_after"] is False
