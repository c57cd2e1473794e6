# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-store sign and verify: signed refs, and kernel-checked fs-verity image signatures."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, List

SIGN_DESCRIPTION = """\
Sign what REF names now.

With --key (ed25519; repeatable): write DIR/signatures/REF, a statement
binding the ref's name, the image's fs-verity digest, the signing time and
the optional expiry, signed by each key.  Serving the store serves it; pulls
with trusted keys refuse a ref without a valid one.  Keys: PEM as
'openssl genpkey -algorithm ed25519' writes them, or ostree's base64 ed25519
secret key files.

With --fsverity-key and --fsverity-cert (RSA, PEM): write
DIR/images/DIGEST.sig, the PKCS#7 signature of the image file's fs-verity
digest that the kernel checks on every open when the certificate is in its
.fs-verity keyring (byte-identical to 'fsverity sign').  Nodes pass it to
FS_IOC_ENABLE_VERITY when the image gets fs-verity.
"""

SIGN_EPILOG = """\
examples:
  openssl genpkey -algorithm ed25519 -out fleet.key && openssl pkey -in fleet.key -pubout -out fleet.pub
  composefs-store --repo /srv/cfs sign app/v2 --key fleet.key --expires 90d
  composefs-store --repo /var/lib/cfs verify app/v2 --trusted-key fleet.pub
  composefs-store --repo /var/lib/cfs pull https://images.example.com/cfs app/v2 --trusted-key fleet.pub
  composefs-store --repo /srv/cfs sign app/v2 --fsverity-key rsa.key --fsverity-cert rsa.crt
"""

VERIFY_DESCRIPTION = """\
Check that a trusted key signed REF for the image it names now, and that the
statement has not expired.  Exit 0 when it did, 1 (with the reason) when not.
"""


def _add_trust_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--trusted-key", action="append", default=[], metavar="PUB", required=required,
                        help="an ed25519 public key (PEM, or ostree's base64 format; a file or a directory of "
                             "them) whose signatures are trusted (repeatable)%s"
                             % ("" if required else "; with any, the ref must be signed"))
    parser.add_argument("--revoked-key", action="append", default=[], metavar="PUB",
                        help="a key whose signatures never count, even if trusted (repeatable)")


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    """pull's and remote add's --trusted-key/--revoked-key."""
    _add_trust_options(parser, required=False)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    sign = sub.add_parser("sign", parents=[common], help="sign a ref (ed25519) and/or its image (fs-verity, PKCS#7)",
                          description=SIGN_DESCRIPTION, epilog=SIGN_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sign.add_argument("ref", metavar="REF")
    sign.add_argument("--key", action="append", default=[], metavar="KEY",
                      help="ed25519 private key to sign the ref's statement with (repeatable)")
    sign.add_argument("--expires", metavar="WHEN",
                      help="the statement's expiry: a time (2027-01-01T00:00:00Z) or a duration from now "
                           "(90d, 12h, 30m, 3600s, 2w)")
    sign.add_argument("--fsverity-key", metavar="KEY", help="RSA private key (PEM) for the image's fs-verity signature")
    sign.add_argument("--fsverity-cert", metavar="CERT", help="its X.509 certificate (PEM or DER)")

    verify = sub.add_parser("verify", parents=[common], help="check a ref's signature against trusted keys",
                            description=VERIFY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("ref", metavar="REF")
    _add_trust_options(verify, required=True)


def trust_policy(args: argparse.Namespace) -> Any:
    """The TrustPolicy of --trusted-key/--revoked-key (None when no key was given)."""
    if not args.trusted_key and not args.revoked_key:
        return None
    from composefs_fleet.ref_trust import TrustPolicy

    return TrustPolicy.load(args.trusted_key, args.revoked_key)


def _read(path: str, what: str) -> bytes:
    from composefs_fleet.errors import StoreError

    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 20)
    except OSError as exc:
        raise StoreError("%s %s: %s" % (what, path, exc.strerror or exc)) from None


def cmd_sign(args: argparse.Namespace, store: Any, emit: Callable[[Any, List[str]], None],
             fail: Callable[[str], Exception]) -> int:
    from composefs_fleet.ref_statement import StatementError, parse_when

    if not args.key and not args.fsverity_key:
        raise fail("sign: give --key (ed25519, for the ref) and/or --fsverity-key with --fsverity-cert (for the image)")
    if bool(args.fsverity_key) != bool(args.fsverity_cert):
        raise fail("sign: --fsverity-key and --fsverity-cert go together")
    if args.expires and not args.key:
        raise fail("sign: --expires applies to the ref's statement: it needs --key")
    now = int(time.time())
    expires = None
    if args.expires:
        try:
            expires = parse_when(args.expires, now)
        except StatementError as exc:
            raise fail("sign: --expires %s" % exc) from None
        if expires <= now:
            raise fail("sign: --expires %s is not in the future" % args.expires)
    data: dict = {"ref": args.ref}
    lines = []
    if args.fsverity_key:
        from composefs_fleet.fsverity_sig import pkcs7_sign
        from composefs_fleet.store_image_sig import write_image_signature

        key_pem = _read(args.fsverity_key, "--fsverity-key")
        cert = _read(args.fsverity_cert, "--fsverity-cert")
        digest = store.read_ref(args.ref)
        der = pkcs7_sign(bytes.fromhex(digest), key_pem, cert)
        with store.lock.shared():
            write_image_signature(store, digest, der)
        data["image"] = digest
        data["fsverity_signature"] = "images/%s.sig" % digest
        lines.append("signed image %s (fs-verity, PKCS#7, %d bytes): images/%s.sig" % (digest, len(der), digest))
    if args.key:
        from composefs_fleet.ref_trust import sign_ref

        statement = sign_ref(store, args.ref, args.key, expires=expires, now=now)
        data.update(statement.as_dict())
        lines.append("signed ref %s -> %s at %s%s by %s" % (
            statement.ref, statement.image, data["signed"],
            "" if statement.expires is None else ", expires %s" % data["expires"],
            ", ".join("key " + k[:16] for k in statement.keys)))
    emit(data, lines)
    return 0


def cmd_verify(args: argparse.Namespace, store: Any, emit: Callable[[Any, List[str]], None],
               fail: Callable[[str], Exception]) -> int:
    from composefs_fleet.ref_trust import verify_ref

    statement = verify_ref(store, args.ref, trust_policy(args))
    data = statement.as_dict()
    emit(data, ["ref %s -> %s: signed at %s by %s%s" % (
        statement.ref, statement.image, data["signed"], ", ".join("key " + k[:16] for k in statement.keys),
        "" if statement.expires is None else "; expires %s" % data["expires"])])
    return 0
