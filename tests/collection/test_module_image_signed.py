# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.image with trusted_keys: signed pulls (file:// remote) and builds that must match a signed ref.

Keys are made by openssl in the test; statements are signed with the core's
sign_ref/sign_statement (what ``composefs-store sign`` runs).  Every refusal
asserts the reason, the message, and that the node's store is byte for byte
as it was (no object, image, signature or ref written).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from composefs_fleet.ref_trust import sign_ref, sign_statement
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_signatures import read_signatures

from pull_play import write_release  # type: ignore[import-not-found]
from signing import make_signed_remote, store_files  # type: ignore[import-not-found]


@pytest.fixture
def remote(tmp_path, keys):
    """A remote store with app/v1 (signed by "release") and app/v2 (unsigned): (its file:// URL, releases, store)."""
    path = tmp_path / "remote"
    releases = make_signed_remote(path, keys["release"])
    store = Store.open(path, notice=None)
    return "file://%s" % path, releases, store


@pytest.fixture
def node(tmp_path):
    return Store.init(tmp_path / "node", notice=None)[0]


def node_top(node) -> Path:
    return Path(os.fsdecode(node.path))


def four_steps(module_runner, args):
    results = [module_runner("image", args, check=True, diff=True), module_runner("image", args, diff=True),
               module_runner("image", args, diff=True), module_runner("image", args, check=True, diff=True)]
    for r in results:
        assert not r.get("failed"), r.get("msg")
    assert [r["changed"] for r in results] == [True, True, False, False]
    return results


@pytest.mark.parametrize("form", ["path", "pem-text", "ostree-text", "directory"])
def test_signed_pull_four_steps(module_runner, remote, node, keys, tmp_path, form):
    url, releases, remote_store = remote
    release = keys["release"]
    if form == "directory":
        trusted = tmp_path / "trusted.d"
        trusted.mkdir()
        (trusted / "release.pub").write_text(release.public_text)
        (trusted / ".ignored").write_text("not a key, skipped as a dot file\n")
        key = str(trusted)
    else:
        key = {"path": str(release.public), "pem-text": release.public_text, "ostree-text": release.ostree}[form]
    args = dict(store=str(node_top(node)), ref="app/v1", remote=url, trusted_keys=[key])
    check, real, again, again_check = four_steps(module_runner, args)
    digest = releases["app/v1"].digest
    for r in (check, real, again, again_check):
        assert r["digest"] == digest
        assert r["pull"]["signature"]["keys"] == [release.id] and r["pull"]["signature"]["expires"] is None
    signed = check["pull"]["signature"]["signed"]
    assert check["diff"] == real["diff"] == {"before": {"ref": "app/v1", "digest": None, "signed": None},
                                              "after": {"ref": "app/v1", "digest": digest, "signed": signed}}
    assert again["diff"]["before"] == again["diff"]["after"]
    # The statement is kept with the ref: the agent and the mount module verify it there.
    assert read_signatures(node, "app/v1") == read_signatures(remote_store, "app/v1")
    assert node.read_ref("app/v1") == digest
    # Key material never appears in a result (no_log): neither the PEM body nor the ostree line.
    body = release.public_text.splitlines()[1]
    for r in (check, real):
        text = json.dumps(r)
        assert body not in text and release.ostree not in text


def refusal(module_runner, node, args, reason, message):
    before = store_files(node_top(node))
    for check in (True, False):
        r = module_runner("image", args, check=check)
        assert r.get("failed") and r.get("reason") == reason, r
        assert message in r["msg"], r["msg"]
        assert store_files(node_top(node)) == before
    return r


def test_unsigned_ref_is_refused(module_runner, remote, node, keys):
    url = remote[0]
    r = refusal(module_runner, node, dict(store=str(node_top(node)), ref="app/v2", remote=url,
                                          trusted_keys=[str(keys["release"].public)]),
                "unsigned", "signature of ref app/v2: ")
    assert "%s/signatures/app/v2 is missing" % url in r["msg"]


def test_untrusted_key_is_refused(module_runner, remote, node, keys):
    refusal(module_runner, node, dict(store=str(node_top(node)), ref="app/v1", remote=remote[0],
                                      trusted_keys=[str(keys["other"].public)]),
            "untrusted", "none of them a trusted key")


def test_revoked_key_is_refused(module_runner, remote, node, keys):
    release = keys["release"]
    refusal(module_runner, node, dict(store=str(node_top(node)), ref="app/v1", remote=remote[0],
                                      trusted_keys=[str(release.public)], revoked_keys=[release.ostree]),
            "revoked", "signed only by revoked key %s" % release.id[:16])


def test_signed_pull_keeps_the_ref_name(module_runner, remote, node, keys):
    before = store_files(node_top(node))
    r = module_runner("image", dict(store=str(node_top(node)), ref="app/current", remote_ref="app/v1", remote=remote[0],
                                    trusted_keys=[str(keys["release"].public)]))
    assert r["failed"] and "a signed ref keeps its name" in r["msg"], r
    assert store_files(node_top(node)) == before


def test_empty_trust_directory_is_an_error_not_unchecked(module_runner, remote, node, tmp_path):
    (tmp_path / "empty.d").mkdir()
    before = store_files(node_top(node))
    r = module_runner("image", dict(store=str(node_top(node)), ref="app/v2", remote=remote[0],
                                    trusted_keys=[str(tmp_path / "empty.d")]))
    assert r["failed"] and "no key in it; an empty trust source would turn signature checks off" in r["msg"], r
    assert store_files(node_top(node)) == before


# -- builds from src that must match the ref's signed statement ------------------------------------


@pytest.fixture
def built(tmp_path, node, keys):
    """app/v1 built from a tree into the node's store and signed there: (tree, digest)."""
    tree = tmp_path / "tree"
    write_release(tree, 1)
    time.sleep(1.1)  # older than the digest cache's racy window
    digest = add_image(node, str(tree), "app/v1").digest
    sign_ref(node, "app/v1", [str(keys["release"].private)])
    return tree, digest


def test_build_matching_the_stores_statement_is_unchanged(module_runner, node, keys, built):
    tree, digest = built
    args = dict(store=str(node_top(node)), ref="app/v1", src=str(tree), trusted_keys=[str(keys["release"].public)])
    for check in (True, False):
        r = module_runner("image", args, check=check, diff=True)
        assert not r.get("failed") and r["changed"] is False, r
        assert r["digest"] == digest and r["image"]["signature"]["keys"] == [keys["release"].id]
        assert r["image"]["signature_written"] is False


def test_build_that_differs_from_the_signed_image_moves_nothing(module_runner, node, keys, built):
    tree, digest = built
    (tree / "VERSION").write_text("tampered\n")
    (tree / "new-file").write_bytes(os.urandom(9000))
    r = refusal(module_runner, node, dict(store=str(node_top(node)), ref="app/v1", src=str(tree),
                                          trusted_keys=[str(keys["release"].public)]),
                "wrong-image", "the statement vouches for image %s, the image built from %s is " % (digest, tree))
    assert "the ref was not moved" in r["msg"]
    assert node.read_ref("app/v1") == digest


def test_build_of_a_ref_without_statement_is_refused(module_runner, node, keys, built):
    tree, _digest = built
    refusal(module_runner, node, dict(store=str(node_top(node)), ref="app/v9", src=str(tree),
                                      trusted_keys=[str(keys["release"].public)]),
            "unsigned", "signatures/app/v9 is missing")


def test_build_with_a_signature_file(module_runner, tmp_path, node, keys):
    """A new release: its statement comes as a file, is verified before the build, and is stored with the ref."""
    release = keys["release"]
    old, new = tmp_path / "v1", tmp_path / "v2"
    write_release(old, 1)
    write_release(new, 2)
    time.sleep(1.1)
    old_digest = add_image(node, str(old), "app/v1").digest
    sign_ref(node, "app/v1", [str(release.private)], now=int(time.time()) - 600)
    with Store.init(tmp_path / "scratch", notice=None)[0] as scratch:  # the release's digest, built elsewhere
        new_digest = add_image(scratch, str(new), "x").digest
    signature = tmp_path / "app-v1.sig"
    signature.write_bytes(sign_statement("app/v1", new_digest, [str(release.private)]))
    args = dict(store=str(node_top(node)), ref="app/v1", src=str(new), signature=str(signature),
                trusted_keys=[str(release.public)])
    check, real, again, again_check = four_steps(module_runner, args)
    assert check["image"]["signature_written"] and real["image"]["signature_written"]
    assert not again["image"]["signature_written"] and not again_check["image"]["signature_written"]
    assert real["diff"]["before"]["digest"] == old_digest and real["diff"]["after"]["digest"] == new_digest
    assert real["diff"]["before"]["signed"] != real["diff"]["after"]["signed"]
    assert node.read_ref("app/v1") == new_digest
    assert read_signatures(node, "app/v1") == signature.read_bytes()

    # An older statement (rollback), one for another ref, one by an untrusted key: refused, nothing changes.
    older = tmp_path / "older.sig"
    older.write_bytes(sign_statement("app/v1", old_digest, [str(release.private)], signed=int(time.time()) - 300))
    args.update(src=str(old), signature=str(older))
    refusal(module_runner, node, args, "rollback", "refused as a rollback")
    moved = tmp_path / "moved.sig"
    moved.write_bytes(sign_statement("app/v2", old_digest, [str(release.private)]))
    args.update(signature=str(moved))
    refusal(module_runner, node, args, "wrong-ref", "was signed for ref app/v2, not this one")
    foreign = tmp_path / "foreign.sig"
    foreign.write_bytes(sign_statement("app/v1", old_digest, [str(keys["other"].private)]))
    args.update(signature=str(foreign))
    refusal(module_runner, node, args, "untrusted", "none of them a trusted key")
    assert node.read_ref("app/v1") == new_digest


def test_signature_and_expected_digest_must_agree(module_runner, node, keys, built):
    tree, digest = built
    other = "ab" * 32
    refusal(module_runner, node, dict(store=str(node_top(node)), ref="app/v1", src=str(tree), expected_digest=other,
                                      trusted_keys=[str(keys["release"].public)]),
            "wrong-image", "the statement vouches for image %s, expected_digest is %s" % (digest, other))


def test_signature_needs_trusted_keys(module_runner, node, tmp_path):
    r = module_runner("image", dict(store=str(node_top(node)), ref="app/v1", src=str(tmp_path),
                                    signature=str(tmp_path / "x.sig")))
    assert r["failed"] and "missing parameter(s) required by 'signature': trusted_keys" in r["msg"], r


def test_build_without_trusted_keys_never_moves_a_signed_ref(module_runner, tmp_path, node, built):
    """As a pull without trusted keys: the statement in the store would be left naming another image."""
    tree, digest = built
    r = module_runner("image", dict(store=str(node_top(node)), ref="app/v1", src=str(tree)), check=True)
    assert not r.get("failed") and r["changed"] is False, r  # confirming the image the ref names is fine
    (tree / "VERSION").write_text("unsigned change\n")
    for extra in ({}, {"expected_digest": "cd" * 32}):
        refusal(module_runner, node, dict(store=str(node_top(node)), ref="app/v1", src=str(tree), **extra),
                "unsigned", "a build without trusted_keys would move it to the unverified image ")
    assert node.read_ref("app/v1") == digest


def test_check_mode_plans_a_signed_build_into_a_store_not_made_yet(module_runner, tmp_path, keys):
    tree = tmp_path / "tree"
    write_release(tree, 1)
    with Store.init(tmp_path / "scratch", notice=None)[0] as scratch:
        digest = add_image(scratch, str(tree), "x").digest
    signature = tmp_path / "app-v1.sig"
    signature.write_bytes(sign_statement("app/v1", digest, [str(keys["release"].private)]))
    args = dict(store=str(tmp_path / "new-store"), ref="app/v1", src=str(tree), trusted_keys=[str(keys["release"].public)])
    r = module_runner("image", dict(args, signature=str(signature)), check=True)
    assert not r.get("failed") and r["changed"] and r["digest"] == digest and r["image"]["signature_written"], r
    r = module_runner("image", args, check=True)  # a new store holds no statement
    assert r.get("failed") and r["reason"] == "unsigned", r
    assert not (tmp_path / "new-store").exists()
