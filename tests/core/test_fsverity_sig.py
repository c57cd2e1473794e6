# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity built-in signatures: our PKCS#7 against ``fsverity sign`` (fsverity-utils).

Keys and certificates are made by ``openssl`` here, with several RSA key
sizes, subjects (one CN; a multi-RDN UTF-8 subject longer than 127 bytes;
a certificate issued by a CA, so issuer and subject differ; serial numbers
with the high bit set) and both hash algorithms; the DER must be byte for
byte what ``fsverity sign`` writes.  Bad keys and certificates give a clear
VeritySignatureError.  The kernel's side (keyring, FS_IOC_ENABLE_VERITY) is
tested in the guest: tests/guest/test_guest_image_signatures.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import pytest

from composefs_fleet import fsverity_digest, fsverity_ioctl, kernel_keyring
from composefs_fleet.errors import VeritySignatureError
from composefs_fleet.fsverity_sig import (MAX_SIGNATURE_SIZE, cert_der, check_signature_der, formatted_digest,
                                          pem_certificates, pkcs7_sign)

pytest.importorskip("cryptography", reason="python3-cryptography is not installed (it makes the RSA signature)")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip("the '%s' program is not in PATH" % tool)
    return path


def openssl(*args: object) -> None:
    res = subprocess.run([_need("openssl")] + [str(a) for a in args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def fsverity_sign(path, out, key, cert, algorithm="sha256") -> bytes:
    subprocess.run([_need("fsverity"), "sign", str(path), str(out), "--key", str(key), "--cert", str(cert),
                    "--hash-alg", algorithm], check=True, capture_output=True)
    return out.read_bytes()


def rsa_key(directory, name, bits):
    key = directory / ("%s.key" % name)
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:%d" % bits, "-out", key)
    return key


def self_signed(directory, name, key, subject, serial=None):
    cert = directory / ("%s.pem" % name)
    args = ["req", "-new", "-x509", "-utf8", "-key", key, "-subj", subject, "-days", "30", "-out", cert]
    if serial is not None:
        args += ["-set_serial", serial]
    openssl(*args)
    return cert


LONG_SUBJECT = ("/C=DE/ST=Berlin/L=Kreuzberg/O=composefs-fleet Ünïcödé GmbH/OU=Image signing"
                "/CN=fs-verity signer with a long common name (64 chars at most)")


@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    """(label, key, cert) for each kind of signer."""
    d = tmp_path_factory.mktemp("signers")
    found = []
    for bits in (1024, 2048, 3072, 4096):
        key = rsa_key(d, "rsa%d" % bits, bits)
        found.append(("rsa%d-cn" % bits, key, self_signed(d, "rsa%d" % bits, key, "/CN=fleet signer %d" % bits)))
    key = rsa_key(d, "long", 2048)
    found.append(("long-subject", key, self_signed(d, "long", key, LONG_SUBJECT, serial="0x80ff00ff00ff00ff00ff")))
    # A leaf issued by a CA: the signature names the CA as issuer, not the leaf's subject.
    ca_key = rsa_key(d, "ca", 2048)
    ca = self_signed(d, "ca", ca_key, "/O=Fleet/CN=Fleet image CA")
    leaf_key = rsa_key(d, "leaf", 3072)
    csr = d / "leaf.csr"
    openssl("req", "-new", "-key", leaf_key, "-subj", "/O=Fleet/OU=builders/CN=build host 7", "-out", csr)
    leaf = d / "leaf.pem"
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "1234567890123456789",
            "-days", "30", "-out", leaf)
    found.append(("ca-issued", leaf_key, leaf))
    return found


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("size", [0, 5000])
def test_byte_identical_to_fsverity_sign(signers, tmp_path, algorithm, size):
    data = bytes((i * 7 + size) % 251 for i in range(size))
    path = tmp_path / "image"
    path.write_bytes(data)
    digest = fsverity_digest.digest_file(path, algorithm)
    outputs = set()
    for label, key, cert in signers:
        expected = fsverity_sign(path, tmp_path / ("%s.sig" % label), key, cert, algorithm)
        ours = pkcs7_sign(digest, key.read_bytes(), cert.read_bytes())
        assert ours == expected, label
        # The certificate as DER gives the same bytes.
        assert pkcs7_sign(digest, key.read_bytes(), cert_der(cert.read_bytes())) == expected, label
        check_signature_der(ours, label)
        outputs.add(ours)
    assert len(outputs) == len(signers)  # each signer's signature differs


def test_ca_issued_signature_names_the_issuer(signers, tmp_path):
    _label, key, cert = [s for s in signers if s[0] == "ca-issued"][0]
    sig = pkcs7_sign(bytes(32), key.read_bytes(), cert.read_bytes())
    # The issuer (the CA's name) is in the signature, the leaf's own CN is not.
    assert b"Fleet image CA" in sig and b"build host 7" not in sig


def test_formatted_digest_layout():
    digest = bytes(range(32))
    assert formatted_digest(digest) == b"FSVerity" + struct.pack("<HH", 1, 32) + digest
    assert formatted_digest(bytes(64)) == b"FSVerity" + struct.pack("<HH", 2, 64) + bytes(64)
    with pytest.raises(VeritySignatureError, match="32 .sha256. or 64 .sha512. bytes, not 20"):
        formatted_digest(bytes(20))


def test_encrypted_key_needs_its_password(signers, tmp_path):
    _label, key, cert = signers[1]
    encrypted = tmp_path / "enc.key"
    openssl("pkey", "-in", key, "-aes256", "-passout", "pass:hunter2", "-out", encrypted)
    plain = pkcs7_sign(bytes(32), key.read_bytes(), cert.read_bytes())
    assert pkcs7_sign(bytes(32), encrypted.read_bytes(), cert.read_bytes(), password=b"hunter2") == plain
    with pytest.raises(VeritySignatureError, match="signing key.*encrypted") as info:
        pkcs7_sign(bytes(32), encrypted.read_bytes(), cert.read_bytes())
    assert "hunter2" not in str(info.value)
    with pytest.raises(VeritySignatureError, match="signing key"):
        pkcs7_sign(bytes(32), encrypted.read_bytes(), cert.read_bytes(), password=b"wrong")


def test_bad_keys_and_certificates(signers, tmp_path):
    _l1, key1, cert1 = signers[0]
    _l2, key2, cert2 = signers[1]
    digest = bytes(32)
    with pytest.raises(VeritySignatureError, match="does not belong to the certificate"):
        pkcs7_sign(digest, key1.read_bytes(), cert2.read_bytes())
    ec_key = tmp_path / "ec.key"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", ec_key)
    with pytest.raises(VeritySignatureError, match="not RSA"):
        pkcs7_sign(digest, ec_key.read_bytes(), cert1.read_bytes())
    ed_key = tmp_path / "ed.key"
    openssl("genpkey", "-algorithm", "ed25519", "-out", ed_key)
    with pytest.raises(VeritySignatureError, match="not RSA"):
        pkcs7_sign(digest, ed_key.read_bytes(), cert1.read_bytes())
    with pytest.raises(VeritySignatureError, match="not a PEM .or DER. private key"):
        pkcs7_sign(digest, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", cert1.read_bytes())
    with pytest.raises(VeritySignatureError, match="not a PEM .or DER. private key"):
        pkcs7_sign(digest, b"garbage", cert1.read_bytes())
    # A certificate passed as the key, a key passed as the certificate.
    with pytest.raises(VeritySignatureError, match="private key"):
        pkcs7_sign(digest, cert1.read_bytes(), cert1.read_bytes())
    with pytest.raises(VeritySignatureError, match="no '-----BEGIN CERTIFICATE-----' block"):
        pkcs7_sign(digest, key1.read_bytes(), key1.read_bytes())
    with pytest.raises(VeritySignatureError, match="not valid base64"):
        pkcs7_sign(digest, key1.read_bytes(), b"-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n")
    der = cert_der(cert1.read_bytes())
    with pytest.raises(VeritySignatureError, match="truncated DER"):
        pkcs7_sign(digest, key1.read_bytes(), der[:-10])
    with pytest.raises(VeritySignatureError, match="not one DER X.509 certificate"):
        pkcs7_sign(digest, key1.read_bytes(), der + b"\x00")
    with pytest.raises(VeritySignatureError, match="32 .sha256. or 64 .sha512. bytes, not 33"):
        pkcs7_sign(bytes(33), key1.read_bytes(), cert1.read_bytes())


def test_cryptography_missing_is_named(signers, monkeypatch):
    _label, key, cert = signers[0]
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(VeritySignatureError, match="python3-cryptography"):
        pkcs7_sign(bytes(32), key.read_bytes(), cert.read_bytes())


def test_check_signature_der(signers):
    _label, key, cert = signers[0]
    sig = pkcs7_sign(bytes(32), key.read_bytes(), cert.read_bytes())
    check_signature_der(sig, "x.sig")
    for bad, message in [(b"", "empty signature"), (sig[:-1], "truncated DER"), (sig + b"\0", "one SEQUENCE"),
                         (b"\x30\x03\x02\x01\x01", "not a PKCS#7 SignedData"),
                         (b"\x30\x80" + sig[2:], "invalid DER length"),
                         (b"\x30" + bytes(MAX_SIGNATURE_SIZE), "larger than the kernel's limit")]:
        with pytest.raises(VeritySignatureError, match=message) as info:
            check_signature_der(bad, "images/abc.sig")
        assert str(info.value).startswith("images/abc.sig: ")


def test_certificate_files(signers, tmp_path):
    pems = [cert.read_bytes() for _label, _key, cert in signers[:2]]
    ders = [cert_der(p) for p in pems]
    assert pem_certificates(b"".join(pems)) == ders
    assert kernel_keyring.certificates_of(b"junk before\n" + b"".join(pems), "bundle.pem") == ders
    assert kernel_keyring.certificates_of(ders[1], "one.der") == ders[1:]
    with pytest.raises(VeritySignatureError, match="^key.pem: PEM without a '-----BEGIN CERTIFICATE-----' block"):
        kernel_keyring.certificates_of(signers[0][1].read_bytes(), "key.pem")
    with pytest.raises(VeritySignatureError, match="^junk.der: not a DER or PEM X.509 certificate"):
        kernel_keyring.certificates_of(b"\x30\x03\x02\x01\x01", "junk.der")


def test_ioctl_numbers():
    if fsverity_ioctl._ioc_layout()[0] != 14:
        pytest.skip("the numbers below are those of asm-generic/ioctl.h architectures")
    assert fsverity_ioctl.FS_IOC_READ_VERITY_METADATA == 0xC0286687
    assert fsverity_ioctl.FS_IOC_ENABLE_VERITY == 0x40806685


def test_fsverity_keys_cli_errors(signers, tmp_path):
    """composefs-fsverity-keys: every file is parsed before the keyring is touched; clear errors, exit 1."""
    certs = tmp_path / "certs.d"
    certs.mkdir()
    (certs / "a.pem").write_bytes(signers[0][2].read_bytes())
    (certs / "b.pem").write_bytes(b"not a certificate")
    res = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.fsverity_keys", "load", str(certs)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.startswith("composefs-fsverity-keys: load: %s/b.pem: not a DER or PEM X.509 certificate "
                                 "(certificate: truncated DER" % certs), res.stderr
    (certs / "b.pem").unlink()
    (certs / ".hidden").write_bytes(b"skipped")
    res = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.fsverity_keys", "load", str(certs / "missing")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "missing: No such file or directory" in res.stderr, res.stderr
    try:
        kernel_keyring.fsverity_keyring_id()
    except VeritySignatureError:
        res = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.fsverity_keys", "load", str(certs)],
                             capture_output=True, text=True)
        assert res.returncode == 1
        assert "the kernel has no .fs-verity keyring" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.fsverity_keys"], capture_output=True, text=True)
    assert res.returncode == 2 and "the following arguments are required: COMMAND" in res.stderr, res.stderr
