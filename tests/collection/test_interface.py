# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Interface fixes of issue 16, beyond test_module_image / test_check_mode_fresh_node: every xattrs
spelling against the image C mkcomposefs options would give, digest spellings, missing refs in the CLI
and the mount module, and what check and diff mode say on a fresh node."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from composefs_fleet import fsverity_digest
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.store import Store
from composefs_fleet.store_names import parse_digest
from test_module_image import write_tree


def tree_digest(src: Path, **options) -> str:
    return fsverity_digest.digest_bytes(build_image(build_tree_from_directory(str(src), **options))).hex()


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    write_tree(root, 1)  # f00 has a user.* xattr
    os.setxattr(root / "sub" / "f01", "trusted.note", b"kept with xattrs all only")
    time.sleep(1.1)  # older than the digest cache's racy window
    return root


@pytest.fixture
def store(tmp_path):
    return Store.init(tmp_path / "store", notice=None)[0]


# ---- xattrs: one choice; the older booleans by value

@pytest.mark.parametrize("options, build", [
    (dict(), dict()),
    (dict(xattrs="all"), dict()),
    (dict(xattrs="user"), dict(user_xattrs=True)),
    (dict(xattrs="none"), dict(skip_xattrs=True)),
    (dict(skip_xattrs=False, user_xattrs=True), dict(user_xattrs=True)),  # refused by presence before issue 16
    (dict(skip_xattrs=True, user_xattrs=False), dict(skip_xattrs=True)),
    (dict(skip_xattrs=False, user_xattrs=False), dict()),
    (dict(xattrs="user", user_xattrs=True, skip_xattrs=False), dict(user_xattrs=True)),
    (dict(user_xattrs=True), dict(user_xattrs=True)),
    (dict(skip_xattrs=True), dict(skip_xattrs=True)),
], ids=lambda v: ",".join("%s=%s" % kv for kv in sorted(v.items())) or "default")
def test_xattrs_spellings_build_the_image_mkcomposefs_would(module_runner, store, src, options, build):
    r = module_runner("image", dict(store=os.fsdecode(store.path), ref="app", src=str(src), **options))
    assert not r.get("failed"), r.get("msg")
    assert r["digest"] == tree_digest(src, **build)


def test_the_three_xattrs_choices_give_three_images(src):
    # Else the test above could not tell the choices apart.
    assert len({tree_digest(src), tree_digest(src, user_xattrs=True), tree_digest(src, skip_xattrs=True)}) == 3


@pytest.mark.parametrize("options", [
    dict(skip_xattrs=True, user_xattrs=True),
    dict(xattrs="all", skip_xattrs=True),
    dict(xattrs="user", skip_xattrs=True),
    dict(xattrs="none", user_xattrs=True),
    dict(xattrs="all", user_xattrs=True),
])
def test_contradicting_xattrs_values_are_refused_in_both_modes(module_runner, store, src, options):
    for check in (True, False):
        r = module_runner("image", dict(store=os.fsdecode(store.path), ref="app", src=str(src), **options), check=check)
        assert r["failed"] and "contradict" in r["msg"], r.get("msg")
        assert [name for name in options if name in r["msg"]] == list(options), r["msg"]  # names every option
    assert store.list_refs() == [] and store.list_images() == []


# ---- digests: one parser

def test_parse_digest_spellings():
    hexd = "ab" * 32
    for text in (hexd, hexd.upper(), "sha256:" + hexd, "SHA256:" + hexd.upper(), "  sha256:%s\n" % hexd):
        assert parse_digest(text) == hexd
    for bad in ("", "sha256:", "sha512:" + hexd, hexd[:-1], hexd + "0", "sha256:sha256:" + hexd, "g" * 64, "sha256: " + hexd):
        assert parse_digest(bad) is None, bad


def test_verity_and_image_take_the_digest_fsverity_measure_prints(module_runner, store, src, tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x" * 5000)
    want = fsverity_digest.digest_file(str(f)).hex()
    r = module_runner("verity", dict(paths=[str(f)], expected_digest="sha256:" + want.upper(), unsupported="skip"), check=True)
    assert not r.get("failed") and r["files"][0]["digest"] == want, r.get("msg")
    r = module_runner("verity", dict(paths=[str(f)], expected_digest="sha256:" + "0" * 63, unsupported="skip"), check=True)
    assert r["failed"] and "not a sha256 fs-verity digest" in r["msg"]
    r = module_runner("image", dict(store=os.fsdecode(store.path), ref="app", src=str(src),
                                    expected_digest=" sha256:%s " % tree_digest(src)))
    assert not r.get("failed") and r["changed"] and store.read_ref("app") == tree_digest(src), r.get("msg")


# ---- a missing ref names the store and the refs of similar names, wherever it is read

def test_cli_rm_ref_of_a_missing_ref_lists_close_matches(store):
    where = os.fsdecode(store.path)
    for name in ("app/v1", "web/v1"):
        store.write_ref(name, "ab" * 32)
    res = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.composefs_store", "--repo", where, "rm-ref", "app/v2"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no ref app/v2 in the store %s; close matches: app/v1" % where in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(store.list_refs()) == ["app/v1", "web/v1"]


def test_mount_module_missing_ref_lists_close_matches(module_runner, store, tmp_path):
    where = os.fsdecode(store.path)
    store.write_ref("app/v1", "ab" * 32)
    target = tmp_path / "mnt"
    target.mkdir()
    r = module_runner("mount", dict(path=str(target), image="app/v2", store=where, state="ephemeral"))
    assert r["failed"] and "no ref app/v2 in the store %s; close matches: app/v1" % where in r["msg"], r
    assert os.listdir(target) == []


# ---- check and diff mode on a fresh node: nothing created, the result says what would be

def test_fresh_node_image_with_its_src_in_place(module_runner, tmp_path, src):
    fresh = tmp_path / "node" / "store"
    r = module_runner("image", dict(store=str(fresh), ref="app/v1", src=str(src), xattrs="user"), check=True, diff=True)
    assert not r.get("failed"), r["msg"]
    want = tree_digest(src, user_xattrs=True)
    assert r["changed"] and r["digest"] == want and r["image"]["image_written"]
    assert r["diff"] == {"before": {"ref": "app/v1", "digest": None}, "after": {"ref": "app/v1", "digest": want}}
    r = module_runner("image", dict(store=str(fresh), ref="app/v1", state="absent"), check=True, diff=True)
    assert not r.get("failed") and not r["changed"] and r["digest"] is None
    assert not (tmp_path / "node").exists()


def test_fresh_node_info_reports_the_empty_store_it_would_be(module_runner, tmp_path, store):
    fresh = tmp_path / "node" / "store"
    empty = tmp_path / "empty"  # a new disk's mount point: the store module initialises it in place
    empty.mkdir()
    r = module_runner("info", dict(stores=[str(fresh), str(empty), os.fsdecode(store.path)], mounts=False), check=True)
    assert not r.get("failed"), r["msg"]
    planned, planned_empty, existing = r["stores"]
    assert (planned["location"], planned["exists"], planned_empty["exists"], existing["exists"]) == (str(fresh), False, False, True)
    assert (planned["refs"], planned["images"], planned["format"]) == ({}, [], existing["format"])
    # Every key a real entry has, zero stats: a play that reads them works in check mode as for real.
    assert sorted(planned) == sorted(existing) and sorted(planned["stats"]) == sorted(existing["stats"])
    assert planned["stats"]["objects"] == planned["stats"]["images"] == planned["stats"]["refs"] == 0
    assert not (tmp_path / "node").exists() and os.listdir(empty) == []
    r = module_runner("info", dict(stores=[str(empty)], mounts=False))
    assert r["failed"] and "not a composefs store" in r["msg"]  # outside check mode info reads, it does not plan


def test_fresh_node_verity_diff_says_what_would_be_enabled(module_runner, tmp_path):
    fresh = tmp_path / "node" / "store"
    there = tmp_path / "there"
    there.write_bytes(b"y" * 100)
    paths = [str(fresh / "image.cfs"), str(there)]
    r = module_runner("verity", dict(paths=paths, unsupported="skip"), check=True, diff=True)
    assert not r.get("failed"), r["msg"]
    assert r["changed"] and r["missing"] == [paths[0]] and [f["file"] for f in r["files"]] == [paths[1]]
    assert paths[0] in r["diff"]["after"]["fsverity_enabled"] and paths[0] not in r["diff"]["before"]["fsverity_enabled"]
    assert r["enabled"] == 1 + sum(1 for f in r["files"] if f["verity_after"] and not f["verity_before"])
    assert not (tmp_path / "node").exists()
