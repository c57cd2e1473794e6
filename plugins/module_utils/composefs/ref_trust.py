# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Signed refs: sign a ref's statement, and decide whether a statement is to be trusted.

A statement (:mod:`.ref_statement`) is accepted only when, in this order:

1. the signatures file is well-formed;
2. at least one signature is by a trusted key that is not revoked and
   verifies over the statement's exact bytes (checked *before* the
   statement is parsed);
3. the statement parses strictly;
4. it names this ref (a signature of ``app/v1`` never vouches for
   ``app/v2``) and the image the caller is about to use;
5. it has not expired, and was not signed more than
   :data:`FUTURE_TOLERANCE` seconds in the future (a clock far ahead, or a
   statement made to outlast every later one);
6. it is not older than the statement this store already holds for the
   ref (rollback to an old, once valid image), and not a different image
   at the same signing time.

With trusted keys configured a missing signature is always an error,
never a warning (stricter than ostree's and containers' defaults, which
can be configured to accept unsigned content).  Revoked keys win over
trusted ones.  A failure is a :class:`.errors.SignatureError` whose
``reason`` says which step failed.
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, List, Optional

from .errors import SignatureError, StoreError
from .ref_statement import (Statement, StatementError, decode_signatures_file, encode_signatures_file,
                            format_statement, format_time, parse_statement)
from .sign_keys import KeyFileError, PublicKey, load_private_keys, load_public_keys
from .store import Store
from .store_names import split_ref_name
from .store_signatures import KIND, read_signatures, write_signatures

#: Seconds a statement's signing time may lie ahead of this machine's clock (clock skew).
FUTURE_TOLERANCE = 300


class TrustPolicy:
    """The keys whose signatures count, and the keys that never count again."""

    def __init__(self, trusted: Iterable[PublicKey] = (), revoked: Iterable[PublicKey] = ()) -> None:
        self.revoked: Dict[str, PublicKey] = {key.id: key for key in revoked}
        self.trusted: Dict[str, PublicKey] = {key.id: key for key in trusted}

    @classmethod
    def load(cls, trusted: Iterable[str] = (), revoked: Iterable[str] = (), allow_empty: bool = False) -> "TrustPolicy":
        """Keys from files, directories or PEM texts (:func:`.sign_keys.load_public_keys`).

        A trusted source that yields no key (an empty directory) is an error
        unless ``allow_empty``: given trust must never turn verification off
        silently.  Revocation lists may be empty.
        """
        keys: List[PublicKey] = []
        for source in trusted:
            found = load_public_keys(source)
            if not found and not allow_empty:
                raise KeyFileError("trusted keys %s: no key in it; an empty trust source would turn signature "
                                   "checks off" % ("(PEM text)" if "-----BEGIN" in source else source))
            keys += found
        return cls(keys, [key for source in revoked for key in load_public_keys(source)])

    @property
    def empty(self) -> bool:
        """No trusted key at all: signatures are not asked for."""
        return not self.trusted

    def usable(self) -> Dict[str, PublicKey]:
        return {kid: key for kid, key in self.trusted.items() if kid not in self.revoked}

    def merged(self, other: "TrustPolicy") -> "TrustPolicy":
        """Both policies' trusted keys and both revocation lists."""
        return TrustPolicy(list(self.trusted.values()) + list(other.trusted.values()),
                           list(self.revoked.values()) + list(other.revoked.values()))


def sign_statement(ref: str, image: str, keys: List[str], signed: Optional[int] = None,
                   expires: Optional[int] = None) -> bytes:
    """A signatures file for ``ref`` → ``image`` signed by every private key in ``keys`` (paths)."""
    private = [key for source in keys for key in load_private_keys(source)]
    if not private:
        raise SignatureError(ref, "unsigned", "no signing key given")
    signed = int(time.time()) if signed is None else signed
    try:
        statement = format_statement(ref, image, signed, expires)
    except StatementError as exc:
        raise SignatureError(ref, "malformed", str(exc)) from None
    seen: Dict[str, bytes] = {}
    for key in private:
        seen.setdefault(key.id, key.sign(statement))
    return encode_signatures_file(statement, sorted(seen.items()))


def sign_ref(store: Store, ref: str, keys: List[str], expires: Optional[int] = None,
             now: Optional[int] = None) -> Statement:
    """Sign the image ``ref`` names now and keep the statement in ``signatures/<ref>``."""
    with store.lock.shared():
        image = store.read_ref(ref)
        data = sign_statement(ref, image, keys, signed=now, expires=expires)
        write_signatures(store, ref, data)
    statement, entries = decode_signatures_file(data, ref)
    out = parse_statement(statement)
    out.keys = [key for key, _sig in entries]
    return out


def verify_signature_bytes(data: Optional[bytes], ref: str, policy: TrustPolicy, digest: Optional[str] = None,
                           now: Optional[float] = None, held: Optional[bytes] = None,
                           shown: Optional[str] = None) -> Statement:
    """The statement of the signatures file ``data`` if it vouches for ``ref`` → ``digest`` (see the module).

    ``held`` is the signatures file this store already has for the ref
    (rollback check); ``shown`` names ``data`` in messages.
    """
    canonical = b"/".join(split_ref_name(ref)).decode("utf-8", "surrogateescape")
    shown = shown or "signatures/" + canonical
    if policy.empty:
        raise SignatureError(canonical, "untrusted", "no trusted key is configured to verify it with")
    if data is None:
        raise SignatureError(canonical, "unsigned", "%s is missing: the ref is not signed, and trusted keys are "
                                                    "configured, so it is refused" % shown)
    try:
        statement_bytes, entries = decode_signatures_file(data, shown)
    except StatementError as exc:
        raise SignatureError(canonical, "malformed", str(exc)) from None
    usable = policy.usable()
    good: List[str] = []
    revoked: List[str] = []
    bad: List[str] = []
    for kid, sig in entries:
        if kid in policy.revoked:
            revoked.append(kid)
        elif kid in usable:
            (good if usable[kid].verify(sig, statement_bytes) else bad).append(kid)
    if not good:
        if revoked:
            raise SignatureError(canonical, "revoked", "signed only by revoked key %s (%s)"
                                 % (revoked[0][:16], policy.revoked[revoked[0]].source))
        if bad:
            raise SignatureError(canonical, "tampered", "the signature by trusted key %s (%s) does not match the "
                                 "statement: changed after signing" % (bad[0][:16], usable[bad[0]].source))
        raise SignatureError(canonical, "untrusted", "signed by %s, none of them a trusted key"
                             % ", ".join("key " + kid[:16] for kid, _sig in entries))
    try:
        statement = parse_statement(statement_bytes)
    except StatementError as exc:
        raise SignatureError(canonical, "malformed", "signed, but %s" % exc) from None
    statement.keys = good
    if statement.ref != canonical:
        raise SignatureError(canonical, "wrong-ref", "the statement was signed for ref %s, not this one: "
                                                     "refused (a signature never moves to another ref)" % statement.ref)
    if digest is not None and statement.image != digest:
        raise SignatureError(canonical, "wrong-image", "the statement vouches for image %s, not %s"
                             % (statement.image, digest))
    now = time.time() if now is None else now
    if statement.expires is not None and now >= statement.expires:
        raise SignatureError(canonical, "expired", "the statement expired at %s" % format_time(statement.expires))
    if statement.signed > now + FUTURE_TOLERANCE:
        raise SignatureError(canonical, "future", "the statement was signed at %s, in the future (this "
                                                  "machine's clock: %s)" % (format_time(statement.signed), format_time(int(now))))
    previous = _held_statement(held, shown)
    if previous is not None:
        if statement.signed < previous.signed:
            raise SignatureError(canonical, "rollback", "the statement was signed at %s, before the one this store "
                                 "holds (%s, image %s): refused as a rollback"
                                 % (format_time(statement.signed), format_time(previous.signed), previous.image))
        if statement.signed == previous.signed and statement.image != previous.image:
            raise SignatureError(canonical, "rollback", "the statement names image %s with the same signing time "
                                 "(%s) as the one this store holds for image %s"
                                 % (statement.image, format_time(statement.signed), previous.image))
    return statement


def _held_statement(held: Optional[bytes], shown: str) -> Optional[Statement]:
    """The statement of the signatures file this store keeps for the ref (verified when it was stored)."""
    if held is None:
        return None
    try:
        statement_bytes, _entries = decode_signatures_file(held, shown)
        return parse_statement(statement_bytes)
    except StatementError:
        return None  # damaged: it orders nothing; the new statement is verified on its own


def verify_ref(store: Store, ref: str, policy: TrustPolicy, digest: Optional[str] = None,
               now: Optional[float] = None) -> Statement:
    """The statement ``signatures/<ref>`` of this store, if it vouches for the image (``digest``,
    default: the one ``refs/<ref>`` names)."""
    if digest is None:
        digest = store.read_ref(ref)
    try:
        data = read_signatures(store, ref)
    except SignatureError:
        raise
    except StoreError as exc:
        # Oversized, a planted symlink, a directory: a signature failure like any other, so callers
        # that tell reasons apart (agent, modules) report it as one instead of a store error.
        canonical = b"/".join(split_ref_name(ref)).decode("utf-8", "surrogateescape")
        what = str(exc)
        what = what[len(KIND):].lstrip() if what.startswith(KIND) else what  # "signature of ref X is ..." -> "X is ..."
        raise SignatureError(canonical, "malformed", "signatures/%s" % what) from None
    return verify_signature_bytes(data, ref, policy, digest=digest, now=now)


__all__ = ["FUTURE_TOLERANCE", "TrustPolicy", "sign_ref", "sign_statement", "verify_ref", "verify_signature_bytes"]
