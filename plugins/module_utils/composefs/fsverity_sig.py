# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity built-in signatures: the PKCS#7 blob ``FS_IOC_ENABLE_VERITY`` takes.

The kernel (``CONFIG_FS_VERITY_BUILTIN_SIGNATURES``) checks, against the
certificates in its ``.fs-verity`` keyring, a detached PKCS#7 SignedData over
``struct fsverity_formatted_digest`` ("FSVerity", le16 algorithm, le16 size,
digest).  ``fsverity sign`` (fsverity-utils, lib/sign_digest.c) makes it with
OpenSSL's ``PKCS7_sign`` and the flags BINARY|DETACHED|NOATTR|NOCERTS: no
signed attributes, no certificates, the signer named by the issuer and serial
number of its certificate.  RSA PKCS#1 v1.5 is deterministic, so the DER built
here is byte-identical to ``fsverity sign``'s for an RSA key (the tests compare
them).  The DER is assembled here with the standard library; only the RSA
operation and key loading use ``cryptography`` (imported when signing, so
reading and checking signatures needs nothing beyond the standard library).
The kernel has no Ed25519 for this, hence RSA.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from typing import Any, List, Optional, Tuple

from .errors import VeritySignatureError
from .fsverity_digest import ALGORITHMS

__all__ = [
    "MAX_SIGNATURE_SIZE",
    "check_signature_der",
    "cert_der",
    "formatted_digest",
    "pem_certificates",
    "pkcs7_sign",
]

#: FS_VERITY_MAX_SIGNATURE_SIZE of the kernel: FS_IOC_ENABLE_VERITY refuses larger ones (EMSGSIZE).
MAX_SIGNATURE_SIZE = 16128

_MAGIC = b"FSVerity"
_FORMATTED_HEADER = struct.Struct("<8sHH")

# DER of the object identifiers used (tag, length, value).
_OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2
_OID_DATA = bytes.fromhex("06092a864886f70d010701")  # 1.2.840.113549.1.7.1
_OID_RSA = bytes.fromhex("06092a864886f70d010101")  # rsaEncryption 1.2.840.113549.1.1.1
_OID_HASH = {
    "sha256": bytes.fromhex("0609608648016503040201"),  # 2.16.840.1.101.3.4.2.1
    "sha512": bytes.fromhex("0609608648016503040203"),  # 2.16.840.1.101.3.4.2.3
}
_NULL = b"\x05\x00"

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.S)


def _algorithm_of(digest: bytes) -> str:
    for name, (_alg_id, size, _block) in ALGORITHMS.items():
        if len(digest) == size:
            return name
    raise VeritySignatureError("an fs-verity digest is 32 (sha256) or 64 (sha512) bytes, not %d" % len(digest))


def formatted_digest(digest: bytes) -> bytes:
    """``struct fsverity_formatted_digest`` of a sha256 (32 bytes) or sha512 (64 bytes) fs-verity digest: what is signed."""
    digest = bytes(digest)
    alg_id = ALGORITHMS[_algorithm_of(digest)][0]
    return _FORMATTED_HEADER.pack(_MAGIC, alg_id, len(digest)) + digest


# -- DER ------------------------------------------------------------------------

def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _read_tlv(data: bytes, pos: int, what: str) -> Tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise VeritySignatureError("%s: truncated DER" % what)
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise VeritySignatureError("%s: multi-byte DER tags are not used here" % what)
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        # 0x80 is BER's indefinite length: not DER.  Four length bytes are far beyond any certificate.
        if count == 0 or count > 4 or pos + count > len(data):
            raise VeritySignatureError("%s: invalid DER length" % what)
        size = int.from_bytes(data[pos:pos + count], "big")
        if size < 0x80 or data[pos] == 0:
            raise VeritySignatureError("%s: non-minimal DER length" % what)
        pos += count
    if pos + size > len(data):
        raise VeritySignatureError("%s: truncated DER (an element of %d bytes)" % (what, size))
    return tag, pos, pos + size


def _children(data: bytes, start: int, end: int, what: str) -> List[Tuple[int, int, int, int]]:
    """(tag, element start, content start, end) of each element between ``start`` and ``end``."""
    found = []
    pos = start
    while pos < end:
        tag, content, stop = _read_tlv(data, pos, what)
        if stop > end:
            raise VeritySignatureError("%s: DER element overruns its container" % what)
        found.append((tag, pos, content, stop))
        pos = stop
    return found


def pem_certificates(pem: bytes) -> List[bytes]:
    """The DER of every ``CERTIFICATE`` block of PEM text (each checked to be X.509)."""
    found = []
    for match in _PEM_CERT.finditer(bytes(pem)):
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            raise VeritySignatureError("PEM certificate %d is not valid base64" % (len(found) + 1)) from None
        _issuer_and_serial(der)
        found.append(der)
    return found


def cert_der(cert: bytes) -> bytes:
    """The DER of an X.509 certificate given as DER or PEM (the first certificate of a PEM file)."""
    cert = bytes(cert)
    if b"-----BEGIN" in cert:
        found = pem_certificates(cert)
        if not found:
            raise VeritySignatureError("the certificate is PEM but holds no '-----BEGIN CERTIFICATE-----' block")
        return found[0]
    _issuer_and_serial(cert)
    return cert


def _issuer_and_serial(cert: bytes) -> bytes:
    """IssuerAndSerialNumber of a DER certificate: its issuer Name and serial INTEGER, copied byte for byte."""
    what = "certificate"
    tag, start, end = _read_tlv(cert, 0, what)
    if tag != 0x30 or end != len(cert):
        raise VeritySignatureError("the certificate is not one DER X.509 certificate (SEQUENCE)")
    parts = _children(cert, start, end, what)
    if len(parts) != 3 or parts[0][0] != 0x30:
        raise VeritySignatureError("the certificate is not X.509 (Certificate: tbsCertificate, algorithm, signature)")
    tbs = _children(cert, parts[0][2], parts[0][3], what)
    if tbs and tbs[0][0] == 0xA0:  # [0] EXPLICIT version
        tbs = tbs[1:]
    # serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name, ...
    if len(tbs) < 3 or tbs[0][0] != 0x02 or tbs[2][0] != 0x30:
        raise VeritySignatureError("the certificate is not X.509 (no serial number and issuer)")
    serial = cert[tbs[0][1]:tbs[0][3]]
    issuer = cert[tbs[2][1]:tbs[2][3]]
    return _seq(issuer, serial)


# -- signing ----------------------------------------------------------------------

def _crypto() -> Any:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
    except ImportError as exc:
        raise VeritySignatureError("signing needs the Python package 'cryptography' (Debian: python3-cryptography): %s"
                                   % exc) from None
    return x509, hashes, serialization, padding, rsa


def _load_key(key_pem: bytes, password: Optional[bytes]) -> Any:
    _x509, _hashes, serialization, _padding, rsa = _crypto()
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        if b"-----BEGIN" in key_pem:
            key = serialization.load_pem_private_key(key_pem, password=password)
        else:
            key = serialization.load_der_private_key(key_pem, password=password)
    except TypeError as exc:
        # Raised for a missing or unexpected password.
        raise VeritySignatureError("the fs-verity signing key: %s" % exc) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise VeritySignatureError("the fs-verity signing key is not a PEM (or DER) private key: %s"
                                   % (str(exc).splitlines() or [type(exc).__name__])[0]) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise VeritySignatureError("the fs-verity signing key is %s, not RSA: only RSA signatures are deterministic "
                                   "(byte-identical to 'fsverity sign') and accepted by every kernel"
                                   % type(key).__name__.replace("_", "").replace("PrivateKey", " key"))
    return key


def pkcs7_sign(digest: bytes, key_pem: bytes, cert: bytes, password: Optional[bytes] = None) -> bytes:
    """PKCS#7 DER signature of an fs-verity ``digest`` (32 bytes: sha256, 64: sha512) for FS_IOC_ENABLE_VERITY.

    ``key_pem``: the RSA private key (PEM as ``openssl genpkey`` writes it, or DER;
    ``password`` if it is encrypted); ``cert``: its X.509 certificate (DER or PEM),
    the one loaded into the ``.fs-verity`` keyring of the nodes.  The result is
    byte-identical to ``fsverity sign FILE OUT --key KEY --cert CERT``.  Raises
    :class:`.errors.VeritySignatureError` naming what is wrong (key, certificate,
    key and certificate not a pair).
    """
    algorithm = _algorithm_of(bytes(digest))
    message = formatted_digest(digest)
    der_cert = cert_der(cert)
    key = _load_key(bytes(key_pem), password)
    x509, hashes, _serialization, padding, _rsa = _crypto()
    try:
        cert_key = x509.load_der_x509_certificate(der_cert).public_key()
    except ValueError as exc:
        raise VeritySignatureError("the fs-verity certificate cannot be read: %s" % exc) from None
    # OpenSSL's PKCS7_sign_add_signer refuses such a pair too ("key values mismatch"); the kernel would
    # only ever answer EKEYREJECTED on every node.
    if not hasattr(cert_key, "public_numbers") or cert_key.public_numbers() != key.public_key().public_numbers():
        raise VeritySignatureError("the fs-verity signing key does not belong to the certificate "
                                   "(its public key differs)")
    hash_cls = hashes.SHA256 if algorithm == "sha256" else hashes.SHA512
    signature = key.sign(message, padding.PKCS1v15(), hash_cls())
    hash_alg = _seq(_OID_HASH[algorithm], _NULL)
    signer_info = _seq(
        _der(0x02, b"\x01"),                 # version 1: issuerAndSerialNumber
        _issuer_and_serial(der_cert),
        hash_alg,                            # digestAlgorithm; no authenticatedAttributes (NOATTR)
        _seq(_OID_RSA, _NULL),               # digestEncryptionAlgorithm
        _der(0x04, signature),               # encryptedDigest
    )
    signed_data = _seq(
        _der(0x02, b"\x01"),                 # version 1
        _der(0x31, hash_alg),                # digestAlgorithms SET
        _seq(_OID_DATA),                     # contentInfo without content (DETACHED)
        _der(0x31, signer_info),             # signerInfos SET; no certificates (NOCERTS), no crls
    )
    return _seq(_OID_SIGNED_DATA, _der(0xA0, signed_data))


def check_signature_der(data: bytes, what: str) -> None:
    """Refuse what cannot be an fs-verity PKCS#7 signature: empty, larger than the kernel
    takes, not one DER ContentInfo of type signedData.

    A structural check (fsck, a fetched ``.sig``) so that garbage is named
    before the kernel answers EBADMSG; whether it verifies only the kernel says.
    """
    if not data:
        raise VeritySignatureError("%s: empty signature" % what)
    if len(data) > MAX_SIGNATURE_SIZE:
        raise VeritySignatureError("%s: %d bytes, larger than the kernel's limit for fs-verity signatures (%d)"
                                   % (what, len(data), MAX_SIGNATURE_SIZE))
    tag, start, end = _read_tlv(data, 0, what)
    if tag != 0x30 or end != len(data):
        raise VeritySignatureError("%s: not a DER PKCS#7 ContentInfo (one SEQUENCE)" % what)
    parts = _children(data, start, end, what)
    if len(parts) != 2 or data[parts[0][1]:parts[0][3]] != _OID_SIGNED_DATA or parts[1][0] != 0xA0:
        raise VeritySignatureError("%s: not a PKCS#7 SignedData" % what)
