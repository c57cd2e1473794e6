# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Signed pulls from a store served by nginx on 127.0.0.1, with keys made by openssl in the test.

With trusted keys (``--trusted-key``, or kept per remote in remotes.json), a
pull fetches ``signatures/<ref>`` and verifies it before anything is
written.  Each refusal is checked the same way: exit 1, one line naming the
URL, the ref and why; the node's store exactly as before, file by file
(no object, image, ref or signature written); and nginx's access log shows
that no image or object was even fetched.  The statements a signer must not
be able to make with ``sign`` (expired, from the future, back-dated) are
signed here by ``openssl pkeyutl``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import pytest

from pull_fixtures import Node, Source, assert_failed, assert_has_image  # type: ignore[import-not-found]
from pull_fixtures import nginx, node, served, source_template  # type: ignore[import-not-found]  # noqa: F401  (fixtures)
from signing_fixtures import (Key, hidden_cryptography, keys, signatures_file, statement, store_files,  # type: ignore[import-not-found]  # noqa: F401
                              tampered_signature, tampered_statement, write_ref, write_signatures)

pytestmark = pytest.mark.network

HOUR = 3600


def sign_served(served: Source, ref: str, *signers: Key, expires: str = "") -> bytes:
    """``composefs-store sign`` in the served store (as its publisher does); the file it wrote."""
    argv: List[object] = ["sign", ref]
    for key in signers:
        argv += ["--key", key.private]
    if expires:
        argv += ["--expires", expires]
    res = Node(served.path).run(*argv)
    assert res.returncode == 0, res.stderr
    return (served.path / "signatures" / ref).read_bytes()


def refused(node: Node, srv, ref: str, options: List[object], reason_words: List[str],
            before: Dict[str, str], mark: int = 0) -> str:
    """The pull fails as a signature refusal should, and nothing was fetched past the statement or written."""
    res = node.pull(srv.url, ref, *options)
    text = assert_failed(res, srv.url, r"^composefs-store: pull: ", r"signature of ref %s: " % ref, *reason_words)
    assert store_files(node.repo) == before, "the refused pull changed the node's store"
    fetched = [e.path for e in srv.entries()[mark:] if e.path.startswith(("images/", "objects/"))]
    assert fetched == [], "fetched before the signature was accepted: %s" % fetched
    return text


def content_requests(entries) -> List[str]:
    """Requests for images and objects, but the image's fs-verity signature (images/<digest>.sig): a pull of an
    image it already has still asks for that, to hand it to the kernel if the image lacks it."""
    return [e.path for e in entries if e.path.startswith(("images/", "objects/")) and not e.path.endswith(".sig")]


def trust(key: Key) -> List[object]:
    return ["--trusted-key", key.public]


# ------------------------------------------------------------------ success --

def test_signed_pull_verifies_stores_the_statement_and_reports_it(served: Source, node: Node, nginx, keys) -> None:
    data = sign_served(served, "app/v1", keys["a"], expires="30d")
    srv = nginx(served.path)
    out = node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert_has_image(node, served, "app/v1")
    # The statement travels with the ref, byte for byte, so the node can verify it again (agent, mount).
    assert (node.repo / "signatures" / "app" / "v1").read_bytes() == data
    doc = json.loads(data)
    signed_line = [line for line in doc["statement"].splitlines() if line.startswith("signed: ")][0]
    expires_line = [line for line in doc["statement"].splitlines() if line.startswith("expires: ")][0]
    assert out["signature"] == {"keys": [keys["a"].id], "signed": signed_line[8:], "expires": expires_line[9:]}
    assert isinstance(out["verify_seconds"], float) and out["verify_seconds"] > 0
    assert out["changed"] is True
    assert srv.fetches(kind="signatures/") == {"signatures/app/v1": 1}
    res = node.run("verify", "app/v1", *trust(keys["a"]))
    assert res.returncode == 0, res.stderr


def test_second_signed_pull_is_a_no_op(served: Source, node: Node, nginx, keys) -> None:
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    before = store_files(node.repo)
    mark = len(srv.entries())
    out = node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert out["changed"] is False and out["objects_fetched"] == 0 and out["image_fetched"] is False
    assert out["signature"]["keys"] == [keys["a"].id]
    assert store_files(node.repo) == before
    second = srv.entries()[mark:]
    assert content_requests(second) == []
    assert "signatures/app/v1" in [e.path for e in second]   # verified again, not trusted from the last time


def test_newer_statement_for_another_image_is_accepted(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    now = time.time()
    write_signatures(served.path, "app/v1", signatures_file(statement("app/v1", served.digests["app/v1"], now - HOUR),
                                                            [keys["a"]], tmp_path))
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    # The publisher moves app/v1 to v2's image and signs it now: newer than what the node holds.
    write_ref(served.path, "app/v1", served.digests["app/v2"])
    data = sign_served(served, "app/v1", keys["a"])
    out = node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert out["previous"] == served.digests["app/v1"] and out["digest"] == served.digests["app/v2"]
    assert out["changed"] is True
    assert node.refs() == {"app/v1": served.digests["app/v2"]}
    assert (node.repo / "signatures" / "app" / "v1").read_bytes() == data


def test_ostree_format_keys_and_key_directories(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    """Signed with ostree's secret key file; trusted as ostree's public key file, and as a trusted.d directory."""
    res = Node(served.path).run("sign", "app/v1", "--key", keys["a"].ostree_secret)
    assert res.returncode == 0, res.stderr
    srv = nginx(served.path)
    out = node.pull_ok(srv.url, "app/v1", "--trusted-key", keys["a"].ostree_public)
    assert out["signature"]["keys"] == [keys["a"].id]   # the same id as its PEM form
    trusted_d = tmp_path / "trusted.d"
    trusted_d.mkdir()
    (trusted_d / "b.pub").write_bytes(keys["b"].public.read_bytes())
    (trusted_d / "a.ostree").write_bytes(keys["a"].ostree_public.read_bytes())
    (trusted_d / ".hidden").write_text("not a key: dot files are skipped\n")
    other = Node(tmp_path / "node2")
    assert other.run("init").returncode == 0
    out = other.pull_ok(srv.url, "app/v1", "--trusted-key", trusted_d)
    assert out["signature"]["keys"] == [keys["a"].id]
    assert_has_image(other, served, "app/v1")


def test_one_trusted_signature_among_untrusted_ones_suffices(served: Source, node: Node, nginx, keys) -> None:
    sign_served(served, "app/v1", keys["b"], keys["a"])
    srv = nginx(served.path)
    out = node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert out["signature"]["keys"] == [keys["a"].id]


def test_pull_without_trusted_keys_ignores_signatures(served: Source, node: Node, nginx, keys) -> None:
    """No trusted key: today's behaviour (no signature asked for, none fetched)."""
    srv = nginx(served.path)
    out = node.pull_ok(srv.url, "app/v1")
    assert out["signature"] is None
    assert not srv.fetches(kind="signatures/")
    assert_has_image(node, served, "app/v1")


# ----------------------------------------------------------------- refusals --

def test_unsigned_ref_is_refused_when_keys_are_trusted(served: Source, node: Node, nginx, keys) -> None:
    srv = nginx(served.path)
    before = store_files(node.repo)
    text = refused(node, srv, "app/v1", trust(keys["a"]), ["signatures/app/v1 is missing", "not signed"], before)
    assert "warning" not in text.lower()


def test_signature_by_an_untrusted_key_is_refused(served: Source, node: Node, nginx, keys) -> None:
    sign_served(served, "app/v1", keys["b"])
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]), ["signed by key %s" % keys["b"].id[:16], "none of them a trusted key"],
            store_files(node.repo))


def test_signature_by_a_revoked_key_is_refused(served: Source, node: Node, nginx, keys) -> None:
    """Revoked wins over trusted, whatever the format each list names the key in."""
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]) + ["--revoked-key", keys["a"].ostree_public],
            ["revoked key %s" % keys["a"].id[:16]], store_files(node.repo))


def test_tampered_statement_is_refused(served: Source, node: Node, nginx, keys) -> None:
    data = sign_served(served, "app/v1", keys["a"], expires="1d")
    # Still a well-formed statement for the same ref and image, only lasting longer than signed for.
    doc = json.loads(data)
    expires = [line for line in doc["statement"].splitlines() if line.startswith("expires: ")][0]
    write_signatures(served.path, "app/v1", tampered_statement(data, expires, "expires: 2099-01-01T00:00:00Z"))
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]), ["tampered|does not match the statement|changed after signing"],
            store_files(node.repo))


def test_tampered_signature_is_refused(served: Source, node: Node, nginx, keys) -> None:
    write_signatures(served.path, "app/v1", tampered_signature(sign_served(served, "app/v1", keys["a"])))
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]), ["trusted key %s" % keys["a"].id[:16], "does not match"],
            store_files(node.repo))


def test_signature_of_one_ref_never_vouches_for_another(served: Source, node: Node, nginx, keys) -> None:
    """app/v1's statement copied to app/v2, with app/v2 moved to v1's image: the signature is valid, the name is not."""
    data = sign_served(served, "app/v1", keys["a"])
    write_signatures(served.path, "app/v2", data)
    write_ref(served.path, "app/v2", served.digests["app/v1"])
    srv = nginx(served.path)
    refused(node, srv, "app/v2", trust(keys["a"]), ["signed for ref app/v1, not this one"], store_files(node.repo))


def test_statement_for_another_image_is_refused(served: Source, node: Node, nginx, keys) -> None:
    """The ref moved on the server after signing: the signature vouches for the old image only."""
    sign_served(served, "app/v1", keys["a"])
    write_ref(served.path, "app/v1", served.digests["app/v2"])
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]),
            ["vouches for image %s, not %s" % (served.digests["app/v1"], served.digests["app/v2"])], store_files(node.repo))


def test_expired_statement_is_refused(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    now = time.time()
    write_signatures(served.path, "app/v1", signatures_file(
        statement("app/v1", served.digests["app/v1"], now - 2 * HOUR, expires=now - HOUR), [keys["a"]], tmp_path))
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]), ["expired at %s" % time.strftime("%Y-%m-%dT%H", time.gmtime(now - HOUR))],
            store_files(node.repo))


def test_statement_from_the_future_is_refused(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    """Signed an hour ahead (more than the 5 min clock-skew tolerance): it would outrank every later statement."""
    now = time.time()
    write_signatures(served.path, "app/v1", signatures_file(statement("app/v1", served.digests["app/v1"], now + HOUR),
                                                            [keys["a"]], tmp_path))
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]), ["in the future"], store_files(node.repo))


def test_rollback_to_an_older_statement_is_refused(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    """The node holds app/v1 -> v2 signed now; the server replays the once valid statement app/v1 -> v1 of an hour ago."""
    now = time.time()
    old = signatures_file(statement("app/v1", served.digests["app/v1"], now - HOUR), [keys["a"]], tmp_path)
    write_ref(served.path, "app/v1", served.digests["app/v2"])
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    write_ref(served.path, "app/v1", served.digests["app/v1"])
    write_signatures(served.path, "app/v1", old)
    refused(node, srv, "app/v1", trust(keys["a"]), ["before the one this store holds", "rollback"],
            store_files(node.repo), mark=len(srv.entries()))
    assert node.refs() == {"app/v1": served.digests["app/v2"]}


def test_same_signing_time_for_another_image_is_refused(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    signed = time.time() - 60
    write_signatures(served.path, "app/v1", signatures_file(statement("app/v1", served.digests["app/v1"], signed),
                                                            [keys["a"]], tmp_path))
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    write_ref(served.path, "app/v1", served.digests["app/v2"])
    write_signatures(served.path, "app/v1", signatures_file(statement("app/v1", served.digests["app/v2"], signed),
                                                            [keys["a"]], tmp_path))
    refused(node, srv, "app/v1", trust(keys["a"]), ["same signing time"], store_files(node.repo), mark=len(srv.entries()))


def test_malformed_signatures_file_is_refused(served: Source, node: Node, nginx, keys) -> None:
    write_signatures(served.path, "app/v1", b'{"statement": "x", "signatures": "not a list"}')
    srv = nginx(served.path)
    refused(node, srv, "app/v1", trust(keys["a"]), ["signatures"], store_files(node.repo))


def test_rename_with_ref_is_refused_for_a_signed_pull(served: Source, node: Node, nginx, keys) -> None:
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    before = store_files(node.repo)
    res = node.pull(srv.url, "app/v1", "--ref", "prod/app", *trust(keys["a"]))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "signed ref keeps its name" in res.stderr and "prod/app" in res.stderr, res.stderr
    assert store_files(node.repo) == before
    assert srv.entries() == []   # refused before a single request
    out = node.pull_ok(srv.url, "app/v1", "--ref", "app/v1", *trust(keys["a"]))   # its own name: fine
    assert out["signature"]["keys"] == [keys["a"].id]
    assert_has_image(node, served, "app/v1")


# ------------------------------------------------------ trust kept per remote --

def test_trust_configured_per_remote(served: Source, node: Node, nginx, keys) -> None:
    srv = nginx(served.path)
    res = node.run("remote", "add", "origin", srv.url, "--trusted-key", keys["a"].public,
                   "--revoked-key", keys["c"].ostree_public)
    assert res.returncode == 0, res.stderr
    remotes = json.loads((node.repo / "remotes.json").read_text())["remotes"]
    assert remotes["origin"]["trusted_keys"] == [str(keys["a"].public)]
    assert remotes["origin"]["revoked_keys"] == [str(keys["c"].ostree_public)]
    before = store_files(node.repo)

    # No --trusted-key on the command line: the remote's configuration asks for a signature.
    res = node.pull("origin", "app/v1")
    assert res.returncode == 1 and "signatures/app/v1 is missing" in res.stderr, res.stderr
    assert store_files(node.repo) == before

    sign_served(served, "app/v1", keys["b"])
    res = node.pull("origin", "app/v1")
    assert res.returncode == 1 and "none of them a trusted key" in res.stderr, res.stderr
    assert store_files(node.repo) == before

    # A key the command line trusts does not outweigh the remote's revocation list.
    sign_served(served, "app/v1", keys["c"])
    res = node.pull("origin", "app/v1", *trust(keys["c"]))
    assert res.returncode == 1 and "revoked key %s" % keys["c"].id[:16] in res.stderr, res.stderr
    assert store_files(node.repo) == before

    sign_served(served, "app/v1", keys["a"])
    res = node.pull("origin", "app/v1", "--ref", "prod/app")   # the remote's keys make it a signed pull
    assert res.returncode == 1 and "signed ref keeps its name" in res.stderr, res.stderr
    assert store_files(node.repo) == before
    out = node.pull_ok("origin", "app/v1")
    assert out["signature"]["keys"] == [keys["a"].id]
    assert_has_image(node, served, "app/v1")


def test_remote_add_refuses_a_missing_or_private_key(node: Node, keys, tmp_path: Path) -> None:
    res = node.run("remote", "add", "origin", "http://127.0.0.1:9/cfs", "--trusted-key", tmp_path / "missing.pub")
    assert res.returncode == 1 and "missing.pub" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = node.run("remote", "add", "origin", "http://127.0.0.1:9/cfs", "--trusted-key", keys["a"].private)
    assert res.returncode == 1 and "private key" in res.stderr, res.stderr
    assert not (node.repo / "remotes.json").exists()


# ------------------------------------------------------------- more details --

def test_newer_statement_for_the_same_image_replaces_the_held_one(served: Source, node: Node, nginx, keys,
                                                                  tmp_path: Path) -> None:
    now = time.time()
    digest = served.digests["app/v1"]
    write_signatures(served.path, "app/v1", signatures_file(statement("app/v1", digest, now - 120), [keys["a"]], tmp_path))
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    renewed = signatures_file(statement("app/v1", digest, now - 60, now + HOUR), [keys["a"]], tmp_path)
    write_signatures(served.path, "app/v1", renewed)
    before = store_files(node.repo)
    mark = len(srv.entries())
    out = node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert out["changed"] is True and out["objects_fetched"] == 0 and out["image_fetched"] is False
    assert out["signature"]["expires"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(now + HOUR)))
    after = store_files(node.repo)
    assert {k for k in after if after[k] != before.get(k)} == {"signatures/app/v1"}
    assert (node.repo / "signatures" / "app" / "v1").read_bytes() == renewed
    assert content_requests(srv.entries()[mark:]) == []


def test_dry_run_verifies_and_writes_nothing(served: Source, node: Node, nginx, keys) -> None:
    sign_served(served, "app/v1", keys["b"])
    srv = nginx(served.path)
    before = store_files(node.repo)
    res = node.pull(srv.url, "app/v1", "--dry-run", *trust(keys["a"]))
    assert res.returncode == 1 and "none of them a trusted key" in res.stderr, res.stderr
    sign_served(served, "app/v1", keys["a"])
    out = node.pull_ok(srv.url, "app/v1", "--dry-run", *trust(keys["a"]))
    assert out["signature"]["keys"] == [keys["a"].id]
    assert store_files(node.repo) == before


def test_oversized_remote_signatures_file_is_refused(served: Source, node: Node, nginx, keys) -> None:
    """At most 64 KiB is read: a server sending more is refused before anything is written."""
    data = sign_served(served, "app/v1", keys["a"])
    write_signatures(served.path, "app/v1", data + b" " * (64 * 1024))
    srv = nginx(served.path)
    before = store_files(node.repo)
    res = node.pull(srv.url, "app/v1", *trust(keys["a"]))
    assert_failed(res, srv.url + "/signatures/app/v1", "65536")
    assert store_files(node.repo) == before
    assert not [e.path for e in srv.entries() if e.path.startswith(("images/", "objects/"))]


def test_remote_key_file_gone_is_a_clear_error(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    key = tmp_path / "fleet.pub"
    key.write_bytes(keys["a"].public.read_bytes())
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    assert node.run("remote", "add", "origin", srv.url, "--trusted-key", key).returncode == 0
    key.unlink()
    before = store_files(node.repo)
    res = node.pull("origin", "app/v1")
    assert res.returncode == 1 and str(key) in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert store_files(node.repo) == before
    assert srv.entries() == []


def test_human_output_reports_the_signature(served: Source, node: Node, nginx, keys) -> None:
    sign_served(served, "app/v1", keys["a"], expires="2099-01-01T00:00:00Z")
    srv = nginx(served.path)
    res = node.pull(srv.url, "app/v1", *trust(keys["a"]))
    assert res.returncode == 0, res.stderr
    line = [ln for ln in res.stdout.splitlines() if "signed at" in ln]
    assert len(line) == 1, res.stdout
    assert "by key %s" % keys["a"].id[:16] in line[0] and "expires 2099-01-01T00:00:00Z" in line[0], line
    assert "checked in" in line[0], line


def test_without_cryptography_a_signed_pull_fails_clearly_and_writes_nothing(served: Source, node: Node, nginx, keys,
                                                                             tmp_path: Path) -> None:
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    env = hidden_cryptography(tmp_path)
    before = store_files(node.repo)
    res = node.pull(srv.url, "app/v1", "--trusted-key", keys["a"].ostree_public, env=env)
    assert res.returncode == 1 and "python3-cryptography" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert store_files(node.repo) == before
    assert not [e.path for e in srv.entries() if e.path.startswith(("images/", "objects/"))]
    out = node.pull_ok(srv.url, "app/v1", env=env)   # without trusted keys nothing needs it
    assert out["signature"] is None


def test_pull_without_keys_does_not_move_a_signed_ref(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    """Once the node holds a statement for a ref, a pull that checks none must not replace its image."""
    # A minute ago: the statement signed below for another image must be newer, not of the same second.
    write_signatures(served.path, "app/v1", signatures_file(statement("app/v1", served.digests["app/v1"], time.time() - 60),
                                                            [keys["a"]], tmp_path))
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert node.pull_ok(srv.url, "app/v1")["changed"] is False   # the same image: nothing to refuse
    write_ref(served.path, "app/v1", served.digests["app/v2"])
    sign_served(served, "app/v1", keys["a"])
    refused(node, srv, "app/v1", [], ["holds a signed statement", "--trusted-key"], store_files(node.repo),
            mark=len(srv.entries()))
    out = node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert out["digest"] == served.digests["app/v2"]
    assert_has_image(node, served, "app/v2", "app/v1")


def test_publication_order_objects_image_signature_ref(served: Source, nginx, keys, tmp_path: Path,
                                                       monkeypatch) -> None:
    """Objects, then the image, then signatures/<ref>, the ref last: a pull cut short never leaves the ref naming
    an image its statement does not vouch for (which the next verify would report as wrong-image)."""
    from composefs_fleet import pull as pull_module
    from composefs_fleet.objects import ObjectBatch
    from composefs_fleet.ref_trust import TrustPolicy
    from composefs_fleet.store import Store

    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    events: List[str] = []

    def recording(name: str, original):
        def call(*args, **kwargs):
            events.append(name)
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(ObjectBatch, "commit", recording("objects", ObjectBatch.commit))
    monkeypatch.setattr(Store, "write_image", recording("image", Store.write_image))
    monkeypatch.setattr(pull_module, "write_signatures", recording("signature", pull_module.write_signatures))
    monkeypatch.setattr(Store, "write_ref", recording("ref", Store.write_ref))
    store, _created = Store.init(tmp_path / "node", notice=None)
    try:
        result = pull_module.pull(store, srv.url, "app/v1", trust=TrustPolicy.load([str(keys["a"].public)]))
    finally:
        store.close()
    assert result.signature is not None and result.signature["keys"] == [keys["a"].id]
    assert "objects" in events
    last_objects = max(i for i, e in enumerate(events) if e == "objects")
    assert events[last_objects + 1:] == ["image", "signature", "ref"], events


def test_concurrent_pull_of_an_older_statement_is_refused(served: Source, nginx, keys, tmp_path: Path,
                                                          monkeypatch) -> None:
    """Two pulls of app/v1 at once: one from a stale mirror (app/v1 -> v1, signed an hour ago), one from the
    publisher (app/v1 -> v2, signed a minute ago).  The stale one has verified its statement against what the
    node held then (nothing) when the fresh one completes; it must still not publish: rollback."""
    import threading

    from composefs_fleet import pull as pull_module
    from composefs_fleet.errors import SignatureError
    from composefs_fleet.ref_trust import TrustPolicy
    from composefs_fleet.store import Store

    now = time.time()
    stale = served.copy(tmp_path / "stale")
    write_signatures(stale.path, "app/v1", signatures_file(statement("app/v1", served.digests["app/v1"], now - HOUR),
                                                           [keys["a"]], tmp_path))
    write_ref(served.path, "app/v1", served.digests["app/v2"])
    write_signatures(served.path, "app/v1", signatures_file(statement("app/v1", served.digests["app/v2"], now - 60),
                                                            [keys["a"]], tmp_path))
    fresh_srv, stale_srv = nginx(served.path), nginx(stale.path)
    verified, resume = threading.Event(), threading.Event()
    original = pull_module._verified_signatures

    def held_back(store, transport, ref, result, trust):
        out = original(store, transport, ref, result, trust)
        if transport.url == stale_srv.url:
            verified.set()
            resume.wait(60)
        return out

    monkeypatch.setattr(pull_module, "_verified_signatures", held_back)
    policy = TrustPolicy.load([str(keys["a"].public)])
    store, _created = Store.init(tmp_path / "node", notice=None)
    errors: List[Exception] = []

    def stale_pull() -> None:
        try:
            pull_module.pull(store, stale_srv.url, "app/v1", trust=policy)
        except Exception as exc:  # the outcome under test
            errors.append(exc)

    thread = threading.Thread(target=stale_pull)
    thread.start()
    try:
        assert verified.wait(60), "the stale pull did not get to its verification"
        pull_module.pull(store, fresh_srv.url, "app/v1", trust=policy)
    finally:
        resume.set()
        thread.join(60)
    try:
        assert len(errors) == 1 and isinstance(errors[0], SignatureError), errors
        assert errors[0].reason == "rollback" and stale_srv.url in str(errors[0]), errors[0]
        assert store.read_ref("app/v1") == served.digests["app/v2"]
        assert (tmp_path / "node" / "signatures" / "app" / "v1").read_bytes() == \
            (served.path / "signatures" / "app" / "v1").read_bytes()
    finally:
        store.close()


def test_signed_pull_from_a_file_remote(served: Source, node: Node, keys) -> None:
    """The statement travels over every transport: a file:// remote refuses and accepts as nginx does."""
    url = "file://" + str(served.path)
    sign_served(served, "app/v1", keys["b"])
    before = store_files(node.repo)
    res = node.pull(url, "app/v1", *trust(keys["a"]))
    assert_failed(res, url, r"signature of ref app/v1: ", "none of them a trusted key")
    assert store_files(node.repo) == before
    data = sign_served(served, "app/v1", keys["a"])
    out = node.pull_ok(url, "app/v1", *trust(keys["a"]))
    assert out["signature"]["keys"] == [keys["a"].id]
    assert (node.repo / "signatures" / "app" / "v1").read_bytes() == data
    assert_has_image(node, served, "app/v1")


# ------------------------------------------- fs-verity image signatures (.sig) --

def image_sig_missing() -> str:
    """Why the .sig tests cannot run here ("" when they can): they compare with fsverity-utils."""
    import shutil

    if shutil.which("fsverity") is None:
        return "fsverity not on PATH (Debian package fsverity)"
    return ""


def fsverity_signature(image: Path, workdir: Path) -> bytes:
    """``fsverity sign`` of the image with a fresh RSA key and self-signed certificate (openssl)."""
    import subprocess

    key, cert, out = workdir / "fsverity.key", workdir / "fsverity.crt", workdir / "image.sig"
    for argv in (["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                  "-days", "30", "-subj", "/CN=composefs-fleet pull test"],
                 ["fsverity", "sign", str(image), str(out), "--key", str(key), "--cert", str(cert)]):
        res = subprocess.run(argv, capture_output=True, text=True)
        assert res.returncode == 0, "%s: %s" % (argv[0], res.stderr)
    return out.read_bytes()


def test_pull_carries_the_image_fs_verity_signature(served: Source, node: Node, nginx, keys, tmp_path: Path) -> None:
    reason = image_sig_missing()
    if reason:
        pytest.skip(reason)
    digest = served.digests["app/v1"]
    sig = fsverity_signature(served.image("app/v1"), tmp_path)
    (served.path / "images" / (digest + ".sig")).write_bytes(sig)
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", *trust(keys["a"]))
    assert (node.repo / "images" / (digest + ".sig")).read_bytes() == sig
    assert srv.fetches(kind="images/") == {"images/" + digest: 1, "images/%s.sig" % digest: 1}
    # An image without a signature file (404) is pulled as before, with none.
    node.pull_ok(srv.url, "app/v2")
    assert not (node.repo / "images" / (served.digests["app/v2"] + ".sig")).exists()


def test_oversized_image_signature_is_refused(served: Source, node: Node, nginx, keys) -> None:
    """Over 64 KiB (the contract's bound; the pull's is the kernel's 16128 bytes) is refused before any object
    is fetched, and nothing is written."""
    reason = image_sig_missing()
    if reason:
        pytest.skip(reason)
    digest = served.digests["app/v1"]
    (served.path / "images" / (digest + ".sig")).write_bytes(b"\x30" * (64 * 1024 + 1))
    sign_served(served, "app/v1", keys["a"])
    srv = nginx(served.path)
    before = store_files(node.repo)
    res = node.pull(srv.url, "app/v1", *trust(keys["a"]))
    assert_failed(res, "images/%s.sig" % digest, r"more than the \d+ accepted")
    assert store_files(node.repo) == before
    assert not [e.path for e in srv.entries() if e.path.startswith("objects/")]   # refused before the objects
