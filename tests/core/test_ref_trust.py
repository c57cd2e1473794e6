# -*- coding: utf-8 -*-
"""Signed refs at the library level: key formats, the strict statement, and every refusal's reason.

Keys are made by openssl, as users make them; ostree-format files as
ostree's documentation derives them from openssl keys.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest

from composefs_fleet.errors import SignatureError, StoreError
from composefs_fleet.ref_statement import (STATEMENT_TYPE, StatementError, decode_signatures_file,
                                           encode_signatures_file, format_statement, parse_statement, parse_time,
                                           parse_when)
from composefs_fleet.ref_trust import FUTURE_TOLERANCE, TrustPolicy, sign_ref, sign_statement, verify_ref, verify_signature_bytes
from composefs_fleet.sign_keys import load_private_keys, load_public_keys
from composefs_fleet.store import Store
from composefs_fleet.store_signatures import read_signatures

IMAGE_A = "a" * 64
IMAGE_B = "b" * 64
T0 = 1_800_000_000  # 2027-01-15


def _openssl(*args: str, stdin: bytes = b"") -> bytes:
    return subprocess.run(["openssl", *args], input=stdin, check=True, capture_output=True).stdout


class Keys:
    """An ed25519 key pair in every format the tools accept, under ``base``."""

    def __init__(self, base: str, name: str) -> None:
        self.private = os.path.join(base, name + ".pem")
        self.public = os.path.join(base, name + ".pub")
        _openssl("genpkey", "-algorithm", "ed25519", "-out", self.private)
        _openssl("pkey", "-in", self.private, "-pubout", "-out", self.public)
        raw_public = _openssl("pkey", "-in", self.private, "-pubout", "-outform", "DER")[-32:]
        seed = _openssl("pkey", "-in", self.private, "-outform", "DER")[-32:]
        self.ostree_public = os.path.join(base, name + ".ed25519.pub")
        self.ostree_secret = os.path.join(base, name + ".ed25519.sec")
        with open(self.ostree_public, "w") as f:
            f.write(base64.b64encode(raw_public).decode() + "\n")
        with open(self.ostree_secret, "w") as f:
            f.write(base64.b64encode(seed + raw_public).decode() + "\n")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("keys"))
    return {name: Keys(base, name) for name in ("alice", "bob", "mallory")}


def _signed(keys, signer="alice", ref="app/v1", image=IMAGE_A, signed=T0, expires=None) -> bytes:
    return sign_statement(ref, image, [keys[signer].private], signed=signed, expires=expires)


def _policy(keys, *trusted, revoked=()):
    return TrustPolicy.load([keys[k].public for k in trusted], [keys[k].public for k in revoked])


# -- keys ---------------------------------------------------------------------------


def test_every_format_of_one_key_has_the_same_id(keys):
    alice = keys["alice"]
    ids = {load_public_keys(alice.public)[0].id, load_public_keys(alice.ostree_public)[0].id,
           load_public_keys(open(alice.public).read())[0].id, load_private_keys(alice.private)[0].id,
           load_private_keys(alice.ostree_secret)[0].id}
    assert len(ids) == 1
    assert ids != {load_public_keys(keys["bob"].public)[0].id}


def test_a_key_directory_reads_every_visible_regular_file(keys, tmp_path):
    d = tmp_path / "trusted.d"
    d.mkdir()
    (d / "a.pub").write_bytes(open(keys["alice"].public, "rb").read())
    (d / "b.pub").write_bytes(open(keys["bob"].ostree_public, "rb").read())
    (d / ".hidden").write_bytes(open(keys["mallory"].public, "rb").read())
    (d / "sub").mkdir()
    got = {k.id for k in load_public_keys(str(d))}
    assert got == {load_public_keys(keys[n].public)[0].id for n in ("alice", "bob")}


@pytest.mark.parametrize("what, content, message", [
    ("private", None, "holds a private key"),
    ("rsa", None, "RSAPublicKey key; signed refs use ed25519"),
    ("garbage", b"not a key\n", "neither PEM nor a base64 ed25519 key"),
    ("secret-as-public", None, "expected a public key (32 bytes)"),
    ("binary", b"\x30\x2a\x30\x05\xff\xfe", "not text"),
    ("empty", b"# only a comment\n\n", "no key in it"),
])
def test_unusable_trusted_keys_are_refused_by_name(keys, tmp_path, what, content, message):
    path = tmp_path / what
    if what == "private":
        content = open(keys["alice"].private, "rb").read()
    elif what == "rsa":
        _openssl("genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024", "-out", str(tmp_path / "rsa.key"))
        content = _openssl("pkey", "-in", str(tmp_path / "rsa.key"), "-pubout")
    elif what == "secret-as-public":
        content = open(keys["alice"].ostree_secret, "rb").read()
    path.write_bytes(content)
    with pytest.raises(StoreError) as err:
        load_public_keys(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_key_file_and_damaged_secret_key_are_refused(keys, tmp_path):
    with pytest.raises(StoreError, match="No such file"):
        load_public_keys(str(tmp_path / "nope.pub"))
    seed_and_public = base64.b64decode(open(keys["alice"].ostree_secret).read())
    wrong = tmp_path / "wrong.sec"
    wrong.write_text(base64.b64encode(seed_and_public[:32] + bytes(32)).decode())
    with pytest.raises(StoreError, match="does not belong to the seed"):
        load_private_keys(str(wrong))
    encrypted = tmp_path / "enc.pem"
    _openssl("pkey", "-in", keys["alice"].private, "-aes256", "-passout", "pass:x", "-out", str(encrypted))
    with pytest.raises(StoreError, match="encrypted"):
        load_private_keys(str(encrypted))


# -- the statement -----------------------------------------------------------------


def test_statement_round_trips_and_says_what_it_is():
    raw = format_statement("app/v1", IMAGE_A, T0, T0 + 60)
    assert raw.startswith((STATEMENT_TYPE + "\n").encode())
    st = parse_statement(raw)
    assert (st.ref, st.image, st.signed, st.expires) == ("app/v1", IMAGE_A, T0, T0 + 60)
    assert parse_statement(format_statement("x", IMAGE_B, T0)).expires is None


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s[:-1], "does not end with a newline"),
    (lambda s: s + "extra: 1\n", "expected 'expires: '"),
    (lambda s: s + "expires: 2028-01-01T00:00:00Z\nextra: 1\n", "6 lines"),
    (lambda s: s.replace("composefs-fleet signed-ref 1", "composefs-fleet signed-ref 2"), "not a signed-ref statement"),
    (lambda s: s.replace("ref: app/v1", "ref: app/v1/"), "empty component"),
    (lambda s: s.replace("ref: app/v1", "ref: /app/v1"), "absolute"),
    (lambda s: s.replace("ref: app/v1", "ref: app//v1"), "ref"),
    (lambda s: s.replace("ref: app/v1", "ref: ../v1"), "ref"),
    (lambda s: s.replace("fsverity-sha256:", "sha256:"), "expected fsverity-sha256"),
    (lambda s: s.replace("a" * 64, "A" * 64), "expected fsverity-sha256"),
    (lambda s: s.replace("2027-01-15", "2027-02-30"), "does not exist"),
    (lambda s: s.replace("Z\n", "+00:00\n", 1), "is not YYYY-MM-DDTHH:MM:SSZ"),
    (lambda s: "\n".join([s.split("\n")[0], s.split("\n")[2], s.split("\n")[1]] + s.split("\n")[3:]), "expected 'ref: '"),
])
def test_statements_are_parsed_strictly(mutate, message):
    text = format_statement("app/v1", IMAGE_A, T0).decode()
    with pytest.raises(StatementError, match=message):
        parse_statement(mutate(text).encode())


def test_expiry_must_follow_signing():
    with pytest.raises(StatementError, match="not after the signing time"):
        format_statement("app/v1", IMAGE_A, T0, T0)
    text = format_statement("app/v1", IMAGE_A, T0, T0 + 10).decode().replace("expires: 2027-01-15T08:00:10Z",
                                                                             "expires: 2027-01-15T07:00:00Z")
    with pytest.raises(StatementError, match="before it was signed"):
        parse_statement(text.encode())


def test_times_and_durations():
    assert parse_time("2027-01-15T08:00:00Z") == T0
    assert parse_when("30d", T0) == T0 + 30 * 86400
    assert parse_when("+12h", T0) == T0 + 12 * 3600
    assert parse_when("2027-01-15T10:00:00+02:00", 0) == T0
    assert parse_when("2027-01-15 08:00Z", 0) == T0
    for bad in ("tomorrow", "30x", "2027-13-01T00:00:00Z", ""):
        with pytest.raises(StatementError):
            parse_when(bad, T0)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "exactly the keys"),
    (lambda d: d.pop("signatures"), "exactly the keys"),
    (lambda d: d.update(signatures=[]), "0 signatures"),
    (lambda d: d.update(signatures=d["signatures"] * 33), "33 signatures"),
    (lambda d: d["signatures"][0].update(ed25519="!!!"), "not base64"),
    (lambda d: d["signatures"][0].update(ed25519=base64.b64encode(b"x" * 63).decode()), "63 bytes"),
    (lambda d: d["signatures"][0].update(key="K" * 64), "key id"),
    (lambda d: d["signatures"][0].update(by="me"), "exactly \"key\" and \"ed25519\""),
    (lambda d: d.update(statement=7), "must be a string"),
])
def test_signatures_files_are_parsed_strictly(keys, mutate, message):
    doc = json.loads(_signed(keys))
    mutate(doc)
    with pytest.raises(StatementError, match=message):
        decode_signatures_file(json.dumps(doc).encode(), "sig")


def test_an_oversized_signatures_file_is_refused_unparsed():
    with pytest.raises(StatementError, match="larger than"):
        decode_signatures_file(b"{" + b" " * (64 * 1024) + b"}", "sig")


# -- trust decisions ---------------------------------------------------------------


def _reason(data, ref="app/v1", policy=None, **kw) -> str:
    with pytest.raises(SignatureError) as err:
        verify_signature_bytes(data, ref, policy, **kw)
    assert str(err.value).startswith("signature of ref %s: " % ref)
    return err.value.reason


def test_a_trusted_signature_verifies(keys):
    st = verify_signature_bytes(_signed(keys), "app/v1", _policy(keys, "alice"), digest=IMAGE_A, now=T0 + 1)
    assert (st.ref, st.image, st.signed) == ("app/v1", IMAGE_A, T0)
    assert st.keys == [load_public_keys(keys["alice"].public)[0].id]


def test_each_refusal_has_its_reason(keys):
    trust = _policy(keys, "alice")
    good = _signed(keys)
    assert _reason(None, policy=trust, now=T0) == "unsigned"
    assert _reason(b"{", policy=trust, now=T0) == "malformed"
    assert _reason(_signed(keys, "mallory"), policy=trust, now=T0) == "untrusted"
    assert _reason(good, policy=_policy(keys, "alice", revoked=["alice"]), now=T0) == "revoked"
    doc = json.loads(good)
    doc["statement"] = doc["statement"].replace(IMAGE_A, IMAGE_B)
    assert _reason(json.dumps(doc).encode(), policy=trust, now=T0) == "tampered"
    doc = json.loads(good)
    sig = bytearray(base64.b64decode(doc["signatures"][0]["ed25519"]))
    sig[5] ^= 1
    doc["signatures"][0]["ed25519"] = base64.b64encode(bytes(sig)).decode()
    assert _reason(json.dumps(doc).encode(), policy=trust, now=T0) == "tampered"
    assert _reason(good, ref="app/v2", policy=trust, now=T0) == "wrong-ref"
    assert _reason(good, policy=trust, digest=IMAGE_B, now=T0) == "wrong-image"
    assert _reason(_signed(keys, expires=T0 + 60), policy=trust, now=T0 + 60) == "expired"
    assert _reason(good, policy=trust, now=T0 - FUTURE_TOLERANCE - 1) == "future"
    assert _reason(good, policy=TrustPolicy(), now=T0) == "untrusted"


def test_a_signature_for_another_purpose_never_verifies(keys):
    """Only the statement's exact bytes are signed: the same key signing other text proves nothing here."""
    other = format_statement("app/v1", IMAGE_A, T0).replace(STATEMENT_TYPE.encode(), b"something else 1")
    key = load_private_keys(keys["alice"].private)[0]
    forged = encode_signatures_file(format_statement("app/v1", IMAGE_A, T0), [(key.id, key.sign(other))])
    assert _reason(forged, policy=_policy(keys, "alice"), now=T0) == "tampered"


def test_one_good_signature_among_others_is_enough_and_revocation_wins(keys):
    both = sign_statement("app/v1", IMAGE_A, [keys["mallory"].private, keys["alice"].private], signed=T0)
    st = verify_signature_bytes(both, "app/v1", _policy(keys, "alice"), now=T0)
    assert st.keys == [load_public_keys(keys["alice"].public)[0].id]
    assert _reason(both, policy=_policy(keys, "alice", "mallory", revoked=["alice", "mallory"]), now=T0) == "revoked"
    st = verify_signature_bytes(both, "app/v1", _policy(keys, "alice", "mallory", revoked=["mallory"]), now=T0)
    assert len(st.keys) == 1


def test_rollback_to_an_older_statement_is_refused(keys):
    trust = _policy(keys, "alice")
    held = _signed(keys, image=IMAGE_B, signed=T0 + 100)
    assert _reason(_signed(keys), policy=trust, now=T0 + 200, held=held) == "rollback"
    assert _reason(_signed(keys, signed=T0 + 100), policy=trust, now=T0 + 200, held=held) == "rollback"
    # the same statement again, or a newer one, is fine; a damaged held file orders nothing
    verify_signature_bytes(held, "app/v1", trust, now=T0 + 200, held=held)
    verify_signature_bytes(_signed(keys, signed=T0 + 150), "app/v1", trust, now=T0 + 200, held=held)
    verify_signature_bytes(_signed(keys), "app/v1", trust, now=T0 + 200, held=b"garbage")


def test_sign_and_verify_a_ref_in_a_store(keys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(10000))
    from composefs_fleet.store_add import add_image

    store, _ = Store.init(str(tmp_path / "store"))
    digest = add_image(store, str(src), "app/v1").digest
    st = sign_ref(store, "app/v1", [keys["alice"].ostree_secret], expires=T0 * 2)
    assert st.image == digest and read_signatures(store, "app/v1") is not None
    assert verify_ref(store, "app/v1", _policy(keys, "alice")).image == digest
    with pytest.raises(SignatureError, match="vouches for image"):
        verify_ref(store, "app/v1", _policy(keys, "alice"), digest=IMAGE_B)
    store.write_ref("app/v1", IMAGE_B)  # the ref moved without a new signature
    with pytest.raises(SignatureError) as err:
        verify_ref(store, "app/v1", _policy(keys, "alice"))
    assert err.value.reason == "wrong-image"
    store.remove_ref("app/v1")
    assert read_signatures(store, "app/v1") is None


def test_fsck_checks_the_form_of_signatures(keys, tmp_path):
    from composefs_fleet.store_add import add_image
    from composefs_fleet.store_fsck import check
    from composefs_fleet.store_signatures import write_signatures

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    store, _ = Store.init(str(tmp_path / "store"))
    add_image(store, str(src), "app/v1")
    sign_ref(store, "app/v1", [keys["alice"].private])
    assert check(store).clean and not check(store).notes
    write_signatures(store, "app/v2", _signed(keys, ref="app/v1"))
    write_signatures(store, "app/v3", b"{}")
    result = check(store)
    assert not result.clean
    assert any("signatures/app/v2: the statement is for ref app/v1" in e for e in result.errors)
    assert any(e.startswith("signatures/app/v3: ") and "exactly the keys" in e for e in result.errors)
    store.write_ref("app/v1", IMAGE_B)
    assert any("moved without a new signature" in n for n in check(store).notes)


def test_an_empty_trust_source_is_refused_not_ignored(keys, tmp_path):
    empty = tmp_path / "trusted.d"
    empty.mkdir()
    with pytest.raises(StoreError, match="no key in it; an empty trust source would turn signature checks off"):
        TrustPolicy.load([str(empty)])
    assert TrustPolicy.load([str(empty)], allow_empty=True).empty
    assert not TrustPolicy.load([keys["alice"].public], [str(empty)]).empty  # an empty revocation list is fine
