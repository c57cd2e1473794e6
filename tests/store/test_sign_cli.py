# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-store sign and verify: the signatures file, keys of openssl and ostree, every refusal.

Keys are made by openssl in the test (signing_fixtures.py).  What ``sign``
writes is checked against the contract (exact JSON keys and statement
lines) and against openssl's own ed25519 verifier; statements ``sign``
will not make (expired, from the future, malformed) are signed by openssl.
``verify`` exits 0 only for a valid statement, 1 with the reason otherwise,
2 on usage errors.
"""
from __future__ import annotations

import base64
import calendar
import json
import os
import time
from pathlib import Path
from typing import List

import pytest

from signing_fixtures import (Key, hidden_cryptography, keys, openssl_sign, openssl_verifies, signatures_file,  # noqa: F401  (fixtures)
                              statement, store_files, tampered_signature, tampered_statement, write_ref,
                              write_signatures)
from store_fixtures import StoreCli, write_tree

HOUR = 3600
PREFIX = "composefs-store: verify: signature of ref app/v1: "


class Repo(StoreCli):
    """A store with app/v1 and app/v2 (two small images) and helpers around sign/verify."""

    def __init__(self, path: Path, trees: Path) -> None:
        super().__init__(path)
        assert self.run("init").returncode == 0
        self.digests = {}
        for number, ref in enumerate(("app/v1", "app/v2"), 1):
            write_tree(trees / ref, number, files=4, big=5000)
            res = self.run("--json", "add-image", "--ref", ref, trees / ref)
            assert res.returncode == 0, res.stderr
            self.digests[ref] = (path / "refs" / ref).read_text().strip()

    def sign(self, ref: str, *signers: Key, extra: List[object] = ()) -> "dict":  # type: ignore[assignment]
        argv: List[object] = ["--json", "sign", ref]
        for key in signers:
            argv += ["--key", key.private]
        res = self.run(*(argv + list(extra)))
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def signatures(self, ref: str = "app/v1") -> bytes:
        return (self.repo / "signatures" / ref).read_bytes()

    def verify(self, *trusted: object, ref: str = "app/v1", revoked: List[object] = ()):  # type: ignore[assignment]
        argv: List[object] = ["verify", ref]
        for key in trusted:
            argv += ["--trusted-key", key]
        for key in revoked:
            argv += ["--revoked-key", key]
        return self.run(*argv)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "store", tmp_path / "trees")


def assert_refused(res, *words: str) -> str:
    """verify's refusal: exit 1, one line "composefs-store: verify: signature of ref app/v1: ...", no traceback."""
    assert res.returncode == 1, "exit %d:\n%s%s" % (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith(PREFIX), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == ""
    for word in words:
        assert word in res.stderr, "no %r in: %s" % (word, res.stderr)
    return res.stderr


# --------------------------------------------------------------------- sign --

def test_sign_writes_the_contract_file_verified_by_openssl(repo: Repo, keys, tmp_path: Path) -> None:
    before = int(time.time())
    out = repo.sign("app/v1", keys["a"])
    after = int(time.time())
    doc = json.loads(repo.signatures())
    assert set(doc) == {"statement", "signatures"}
    lines = doc["statement"].split("\n")
    assert lines[:3] == ["composefs-fleet signed-ref 1", "ref: app/v1", "image: fsverity-sha256:" + repo.digests["app/v1"]]
    assert lines[3].startswith("signed: ") and lines[4:] == [""]   # no expiry, and a final newline
    signed = calendar.timegm(time.strptime(lines[3][8:], "%Y-%m-%dT%H:%M:%SZ"))
    assert before <= signed <= after
    assert doc["signatures"] == [{"key": keys["a"].id, "ed25519": doc["signatures"][0]["ed25519"]}]
    sig = base64.b64decode(doc["signatures"][0]["ed25519"], validate=True)
    assert openssl_verifies(keys["a"], doc["statement"].encode(), sig, tmp_path)
    assert not openssl_verifies(keys["b"], doc["statement"].encode(), sig, tmp_path)
    assert out == {"ref": "app/v1", "image": repo.digests["app/v1"], "signed": lines[3][8:], "expires": None,
                   "keys": [keys["a"].id]}


def test_ostree_secret_key_pem_key_and_openssl_sign_the_same_bytes(keys, tmp_path: Path) -> None:
    """ed25519 is deterministic: the same statement signed from either file format, or by openssl, is the same."""
    from composefs_fleet.ref_trust import sign_statement

    image = "ab" * 32
    pem = sign_statement("app/v1", image, [str(keys["a"].private)], signed=1700000000, expires=1800000000)
    ostree = sign_statement("app/v1", image, [str(keys["a"].ostree_secret)], signed=1700000000, expires=1800000000)
    assert pem == ostree
    doc = json.loads(pem)
    assert doc["statement"] == statement("app/v1", image, 1700000000, 1800000000)
    assert base64.b64decode(doc["signatures"][0]["ed25519"]) == openssl_sign(keys["a"], doc["statement"].encode(), tmp_path)


def test_sign_with_two_keys_either_verifies(repo: Repo, keys) -> None:
    out = repo.sign("app/v1", keys["a"], keys["b"])
    assert sorted(out["keys"]) == sorted([keys["a"].id, keys["b"].id])
    assert {e["key"] for e in json.loads(repo.signatures())["signatures"]} == {keys["a"].id, keys["b"].id}
    for key in (keys["a"], keys["b"]):
        res = repo.verify(key.public)
        assert res.returncode == 0, res.stderr
    res = repo.run("--json", "verify", "app/v1", "--trusted-key", keys["a"].public, "--trusted-key", keys["b"].ostree_public)
    assert res.returncode == 0, res.stderr
    assert sorted(json.loads(res.stdout)["keys"]) == sorted([keys["a"].id, keys["b"].id])


@pytest.mark.parametrize("when, seconds", [("30d", 30 * 86400), ("12h", 12 * HOUR), ("90m", 90 * 60), ("3600s", 3600)])
def test_expires_as_a_duration(repo: Repo, keys, when: str, seconds: int) -> None:
    out = repo.sign("app/v1", keys["a"], extra=["--expires", when])
    signed = calendar.timegm(time.strptime(out["signed"], "%Y-%m-%dT%H:%M:%SZ"))
    assert out["expires"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(signed + seconds))
    assert ("\nexpires: %s\n" % out["expires"]) in json.loads(repo.signatures())["statement"]


@pytest.mark.parametrize("when", ["2099-01-01T00:00:00Z", "2099-01-01T01:00:00+01:00"])
def test_expires_as_a_time(repo: Repo, keys, when: str) -> None:
    out = repo.sign("app/v1", keys["a"], extra=["--expires", when])
    assert out["expires"] == "2099-01-01T00:00:00Z"
    assert json.loads(repo.signatures())["statement"].endswith("\nexpires: 2099-01-01T00:00:00Z\n")


@pytest.mark.parametrize("argv, words", [
    (["--expires", "2000-01-01T00:00:00Z"], ["not in the future"]),
    (["--expires", "soon"], ["--expires", "soon"]),
    (["--expires", "2099-02-30T00:00:00Z"], ["does not exist"]),
])
def test_bad_expiry_is_a_usage_error_and_writes_nothing(repo: Repo, keys, argv: List[str], words: List[str]) -> None:
    before = store_files(repo.repo)
    res = repo.run("sign", "app/v1", "--key", keys["a"].private, *argv)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr
    assert store_files(repo.repo) == before


def test_sign_usage_errors(repo: Repo, keys) -> None:
    res = repo.run("sign", "app/v1")
    assert res.returncode == 2 and "--key" in res.stderr
    res = repo.run("sign", "app/v1", "--expires", "30d", "--fsverity-key", keys["a"].private)
    assert res.returncode == 2 and "go together" in res.stderr
    assert not (repo.repo / "signatures").exists()


@pytest.mark.parametrize("which, words", [
    ("public", ["not an ed25519 private key"]),
    ("ostree_public", ["line 1", "32 bytes", "secret key (64 bytes"]),
    ("missing", ["missing.pem", "No such file"]),
    ("rsa", ["RSA", "ed25519"]),
    ("damaged_ostree", ["public half does not belong"]),
])
def test_sign_refuses_what_is_not_an_ed25519_private_key(repo: Repo, keys, tmp_path: Path, which: str,
                                                         words: List[str]) -> None:
    if which == "missing":
        path = tmp_path / "missing.pem"
    elif which == "rsa":
        path = tmp_path / "rsa.pem"
        import subprocess
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path)],
                       check=True, capture_output=True)
    elif which == "damaged_ostree":
        raw = base64.b64decode(keys["a"].ostree_secret.read_text())
        path = tmp_path / "damaged.sec"
        path.write_text(base64.b64encode(raw[:32] + keys["b"].raw).decode() + "\n")
    else:
        path = getattr(keys["a"], which)
    res = repo.run("sign", "app/v1", "--key", path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("composefs-store: sign: ") and str(path) in res.stderr, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr
    assert not (repo.repo / "signatures").exists()


def test_sign_of_a_missing_ref_writes_nothing(repo: Repo, keys) -> None:
    res = repo.run("sign", "app/v9", "--key", keys["a"].private)
    assert res.returncode == 1 and "app/v9" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (repo.repo / "signatures").exists()


def test_rm_ref_removes_the_signature(repo: Repo, keys) -> None:
    repo.sign("app/v1", keys["a"])
    repo.sign("app/v2", keys["a"])
    res = repo.run("rm-ref", "app/v1")
    assert res.returncode == 0, res.stderr
    assert not (repo.repo / "signatures" / "app" / "v1").exists()
    assert (repo.repo / "signatures" / "app" / "v2").exists()
    res = repo.verify(keys["a"].public)
    assert res.returncode == 1 and "app/v1" in res.stderr, res.stderr


# ------------------------------------------------------------------- verify --

def test_verify_accepts_every_key_form(repo: Repo, keys, tmp_path: Path) -> None:
    repo.sign("app/v1", keys["a"], extra=["--expires", "2099-01-01T00:00:00Z"])
    trusted_d = tmp_path / "trusted.d"
    trusted_d.mkdir()
    (trusted_d / "a").write_bytes(keys["a"].ostree_public.read_bytes())
    (trusted_d / ".ignored").write_text("garbage\n")
    for source in (keys["a"].public, keys["a"].ostree_public, trusted_d):
        res = repo.verify(keys["b"].public, source)
        assert res.returncode == 0, (source, res.stderr)
        assert res.stdout.startswith("ref app/v1 -> %s: signed at " % repo.digests["app/v1"]), res.stdout
        assert "key %s" % keys["a"].id[:16] in res.stdout and "expires 2099-01-01T00:00:00Z" in res.stdout
    res = repo.run("--json", "verify", "app/v1", "--trusted-key", keys["a"].public)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["ref"] == "app/v1" and out["image"] == repo.digests["app/v1"] and out["keys"] == [keys["a"].id]
    assert out["expires"] == "2099-01-01T00:00:00Z"


def test_verify_without_trusted_key_is_a_usage_error(repo: Repo, keys) -> None:
    repo.sign("app/v1", keys["a"])
    res = repo.run("verify", "app/v1")
    assert res.returncode == 2 and "--trusted-key" in res.stderr
    res = repo.run("verify", "app/v1", "--revoked-key", keys["b"].public)
    assert res.returncode == 2 and "--trusted-key" in res.stderr


def test_verify_unsigned(repo: Repo, keys) -> None:
    assert_refused(repo.verify(keys["a"].public), "is missing", "not signed")


def test_verify_untrusted(repo: Repo, keys) -> None:
    repo.sign("app/v1", keys["b"])
    assert_refused(repo.verify(keys["a"].public), "signed by key %s" % keys["b"].id[:16], "none of them a trusted key")


def test_verify_revoked(repo: Repo, keys) -> None:
    repo.sign("app/v1", keys["a"])
    assert_refused(repo.verify(keys["a"].ostree_public, revoked=[keys["a"].public]), "revoked key %s" % keys["a"].id[:16])


def test_verify_revoked_and_untrusted_signatures_do_not_count(repo: Repo, keys) -> None:
    """Signed by a revoked and a trusted key: the trusted one suffices; revoking both refuses it."""
    repo.sign("app/v1", keys["a"], keys["b"])
    res = repo.verify(keys["a"].public, keys["b"].public, revoked=[keys["b"].public])
    assert res.returncode == 0, res.stderr
    assert "key %s" % keys["b"].id[:16] not in res.stdout
    assert_refused(repo.verify(keys["a"].public, revoked=[keys["a"].public, keys["b"].public]), "revoked")


def test_verify_tampered_statement(repo: Repo, keys) -> None:
    repo.sign("app/v1", keys["a"], extra=["--expires", "1d"])
    doc = json.loads(repo.signatures())
    expires = doc["statement"].splitlines()[4]
    write_signatures(repo.repo, "app/v1", tampered_statement(repo.signatures(), expires, "expires: 2099-01-01T00:00:00Z"))
    assert_refused(repo.verify(keys["a"].public), "trusted key %s" % keys["a"].id[:16], "does not match the statement")


def test_verify_tampered_signature(repo: Repo, keys) -> None:
    repo.sign("app/v1", keys["a"])
    write_signatures(repo.repo, "app/v1", tampered_signature(repo.signatures()))
    assert_refused(repo.verify(keys["a"].public), "does not match the statement")


def test_verify_ref_moved_after_signing(repo: Repo, keys) -> None:
    repo.sign("app/v1", keys["a"])
    write_ref(repo.repo, "app/v1", repo.digests["app/v2"])
    assert_refused(repo.verify(keys["a"].public),
                   "vouches for image %s, not %s" % (repo.digests["app/v1"], repo.digests["app/v2"]))


def test_verify_another_refs_statement(repo: Repo, keys) -> None:
    repo.sign("app/v2", keys["a"])
    write_ref(repo.repo, "app/v1", repo.digests["app/v2"])
    write_signatures(repo.repo, "app/v1", repo.signatures("app/v2"))
    assert_refused(repo.verify(keys["a"].public), "signed for ref app/v2, not this one")


def test_verify_expired(repo: Repo, keys, tmp_path: Path) -> None:
    now = time.time()
    write_signatures(repo.repo, "app/v1", signatures_file(
        statement("app/v1", repo.digests["app/v1"], now - 2 * HOUR, now - 60), [keys["a"]], tmp_path))
    assert_refused(repo.verify(keys["a"].public), "expired at %s" % time.strftime("%Y-%m-%dT%H:%M", time.gmtime(now - 60)))


def test_verify_future(repo: Repo, keys, tmp_path: Path) -> None:
    write_signatures(repo.repo, "app/v1", signatures_file(
        statement("app/v1", repo.digests["app/v1"], time.time() + HOUR), [keys["a"]], tmp_path))
    assert_refused(repo.verify(keys["a"].public), "in the future")


def _variants(image: str, signed: float) -> List[str]:
    good = statement("app/v1", image, signed)
    lines = good.split("\n")
    return [
        good + "comment: extra line\n",                               # an extra line
        "\n".join([lines[0], lines[2], lines[1]] + lines[3:]),       # lines out of order
        good.replace("\n", "\r\n"),                                   # CRLF
        good[:-1],                                                    # no final newline
        good.replace("signed-ref 1", "signed-ref 2"),                 # another statement type
        good.replace("fsverity-sha256:", "sha256:"),                  # another digest algorithm
        good.replace(image, image.upper()),                           # upper-case hex
        good.replace("image: ", "image:  "),                          # two spaces
        good.replace("Z\n", "+00:00\n"),                              # a time not in the one form
        good + "expires: 2000-01-01T00:00:00Z\n",                     # expires before signed
    ]


@pytest.mark.parametrize("number", range(10))
def test_verify_signed_but_malformed_statement(repo: Repo, keys, tmp_path: Path, number: int) -> None:
    """Validly signed by a trusted key, yet not exactly the format: refused (parsed strictly, after the signature)."""
    text = _variants(repo.digests["app/v1"], time.time() - 60)[number]
    write_signatures(repo.repo, "app/v1", signatures_file(text, [keys["a"]], tmp_path))
    assert_refused(repo.verify(keys["a"].public), "signed, but")


@pytest.mark.parametrize("content", [
    b"not json",
    b'{"statement": "x", "signatures": []}',
    b'{"statement": "x", "signatures": [{"key": "00", "ed25519": "AA=="}]}',
    b'{"statement": "x", "signatures": [], "extra": 1}',
    b'{"statement": "x", "statement": "y", "signatures": []}',
])
def test_verify_malformed_signatures_file(repo: Repo, keys, content: bytes) -> None:
    write_signatures(repo.repo, "app/v1", content)
    text = assert_refused(repo.verify(keys["a"].public))
    assert "signatures/app/v1" in text


@pytest.mark.parametrize("damage", ["oversized", "symlink", "directory"])
def test_verify_damaged_signatures_file_is_a_signature_error(repo: Repo, keys, damage: str) -> None:
    """A signatures file the store cannot read as one (over 64 KiB, a planted symlink, a directory) is refused as
    "malformed": the agent and the modules tell signature failures apart by SignatureError.reason."""
    from composefs_fleet.errors import SignatureError
    from composefs_fleet.ref_trust import TrustPolicy, verify_ref
    from composefs_fleet.store import Store

    repo.sign("app/v1", keys["a"])
    path = repo.repo / "signatures" / "app" / "v1"
    if damage == "oversized":
        path.write_bytes(b" " * (64 * 1024 + 1))
    elif damage == "symlink":
        good = repo.repo / "elsewhere"
        path.rename(good)
        path.symlink_to(good)
    else:
        path.unlink()
        (path / "x").mkdir(parents=True)
    res = repo.verify(keys["a"].public)
    assert_refused(res, {"oversized": "larger than 65536 bytes", "symlink": "symbolic link",
                         "directory": "not a regular file"}[damage])
    store = Store.open(str(repo.repo), notice=None)
    try:
        with pytest.raises(SignatureError) as info:
            verify_ref(store, "app/v1", TrustPolicy.load([str(keys["a"].public)]))
        assert info.value.reason == "malformed"
    finally:
        store.close()


@pytest.mark.parametrize("which, words", [
    ("private", ["private key", "pubout"]),
    ("missing", ["missing.pub"]),
    ("garbage", ["neither PEM nor a base64 ed25519 key"]),
    ("empty", ["no key in it"]),
])
def test_verify_refuses_unusable_trusted_keys(repo: Repo, keys, tmp_path: Path, which: str, words: List[str]) -> None:
    repo.sign("app/v1", keys["a"])
    path = {"private": keys["a"].private, "missing": tmp_path / "missing.pub",
            "garbage": tmp_path / "garbage.pub", "empty": tmp_path / "empty.pub"}[which]
    if which == "garbage":
        path.write_text("this is not a key\n")
    elif which == "empty":
        path.write_text("# only a comment\n\n")
    res = repo.verify(path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("composefs-store: verify: ") and str(path) in res.stderr, res.stderr
    for word in words:
        assert word in res.stderr, res.stderr


# ---------------------------------------------------------------- the API --

def test_api_verify_ref_reasons_and_boundaries(repo: Repo, keys, tmp_path: Path) -> None:
    """``verify_ref``'s ``now``: valid up to the second before expiry; the 5 min clock-skew tolerance; reasons."""
    from composefs_fleet.errors import SignatureError, StoreError
    from composefs_fleet.ref_trust import TrustPolicy, verify_ref
    from composefs_fleet.store import Store

    signed, expires = 1_900_000_000, 1_900_003_600
    write_signatures(repo.repo, "app/v1", signatures_file(statement("app/v1", repo.digests["app/v1"], signed, expires),
                                                          [keys["a"]], tmp_path))
    store = Store.open(str(repo.repo), notice=None)
    # PEM text itself is a key source too.
    policy = TrustPolicy.load(trusted=[keys["a"].public_pem()], revoked=[str(keys["c"].public)])
    assert not policy.empty and TrustPolicy.load().empty
    st = verify_ref(store, "app/v1", policy, now=expires - 1)
    assert (st.ref, st.image, st.signed, st.expires) == ("app/v1", repo.digests["app/v1"], signed, expires)
    assert st.keys == [keys["a"].id]
    assert verify_ref(store, "app/v1", policy, now=signed - 300).signed == signed
    cases = [(dict(now=expires), "expired"), (dict(now=signed - 301), "future"),
             (dict(now=signed, digest=repo.digests["app/v2"]), "wrong-image")]
    for kwargs, reason in cases:
        with pytest.raises(SignatureError) as info:
            verify_ref(store, "app/v1", policy, **kwargs)
        assert info.value.reason == reason and info.value.ref == "app/v1"
        assert isinstance(info.value, StoreError)
        assert str(info.value).startswith("signature of ref app/v1: ")
    with pytest.raises(SignatureError) as info:
        verify_ref(store, "app/v2", policy, now=signed)
    assert info.value.reason == "unsigned"
    store.close()


def test_api_rollback_against_the_held_statement(keys, tmp_path: Path) -> None:
    from composefs_fleet.errors import SignatureError
    from composefs_fleet.ref_trust import TrustPolicy, verify_signature_bytes

    policy = TrustPolicy.load([str(keys["a"].public)])
    v1, v2 = "11" * 32, "22" * 32
    held = signatures_file(statement("app/v1", v2, 1_800_000_000), [keys["a"]], tmp_path)
    older = signatures_file(statement("app/v1", v1, 1_799_999_999), [keys["a"]], tmp_path)
    newer = signatures_file(statement("app/v1", v1, 1_800_000_001), [keys["a"]], tmp_path)
    same_time = signatures_file(statement("app/v1", v1, 1_800_000_000), [keys["a"]], tmp_path)
    now = 1_800_000_100
    assert verify_signature_bytes(newer, "app/v1", policy, digest=v1, now=now, held=held).image == v1
    assert verify_signature_bytes(held, "app/v1", policy, digest=v2, now=now, held=held).image == v2  # the same again
    for data in (older, same_time):
        with pytest.raises(SignatureError) as info:
            verify_signature_bytes(data, "app/v1", policy, digest=v1, now=now, held=held)
        assert info.value.reason == "rollback"


def test_without_cryptography_sign_and_verify_name_the_package(repo: Repo, keys, tmp_path: Path) -> None:
    """cryptography is imported only for keys: without it the store works and signing says what to install."""
    repo.sign("app/v1", keys["a"])
    env = {"env": {**os.environ, **hidden_cryptography(tmp_path)}}
    before = store_files(repo.repo)
    for argv in (["verify", "app/v1", "--trusted-key", keys["a"].public],
                 ["verify", "app/v1", "--trusted-key", keys["a"].ostree_public],
                 ["sign", "app/v1", "--key", keys["a"].private]):
        res = repo.run(*argv, **env)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert "python3-cryptography" in res.stderr and res.stderr.startswith("composefs-store: %s: " % argv[0]), res.stderr
    assert store_files(repo.repo) == before
    for argv in (["ls"], ["refs"], ["fsck"]):
        res = repo.run(*argv, **env)
        assert res.returncode == 0, (argv, res.stderr)
