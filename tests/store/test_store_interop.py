# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The store and the C composefs 1.0.8 tools use each other's objects."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from composefs_fleet import fsverity_digest
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check

from store_fixtures import make_tree, store_cmd  # noqa: F401  (fixtures)

pytestmark = pytest.mark.oracle


def test_c_mkcomposefs_into_our_objects_passes_fsck(oracle, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 61, files=30)
    store, _ = Store.init(tmp_path / "store", notice=None)
    image = tmp_path / "c.cfs"
    res = oracle.run("mkcomposefs", "--digest-store=" + os.fsdecode(store.objects_dir), src, image)
    assert res.returncode == 0, res.stderr
    # The C tool's objects are already where the store keeps them: nothing to copy.
    result = add_image(store, image, "from-c")
    assert result.objects_written == 0 and result.objects > 0
    assert result.digest == fsverity_digest.digest_file(str(image)).hex()
    report = check(store)
    assert report.clean, report.errors
    assert report.objects == result.objects
    # Our directory add of the same tree is the same image (byte-identical writer).
    ours = add_image(store, src, "from-ours")
    assert ours.digest == result.digest and ours.objects_written == 0
    assert store.list_images() == [result.digest]


def test_our_objects_satisfy_the_c_tools(oracle, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 62, files=30)
    store, _ = Store.init(tmp_path / "store", notice=None)
    result = add_image(store, src, "app")
    image = os.fsdecode(store.image_path(result.digest))
    basedir = "--basedir=" + os.fsdecode(store.objects_dir)
    missing = oracle.run("composefs-info", basedir, "missing-objects", image)
    assert missing.returncode == 0 and missing.stdout == b"", missing.stderr
    listed = oracle.run("composefs-info", "objects", image)
    assert listed.returncode == 0
    names = sorted(line.decode() for line in listed.stdout.splitlines())
    assert names == sorted("%s/%s" % (h[:2], h[2:]) for h, _p, _st in store.iter_objects())
    # C mkcomposefs writing into our store skips what we stored, and builds the same image.
    c_image = tmp_path / "c.cfs"
    res = oracle.run("mkcomposefs", "--digest-store=" + os.fsdecode(store.objects_dir), "--print-digest", src,
                     c_image)
    assert res.returncode == 0 and res.stdout.decode().strip() == result.digest
    # Removing an object is seen by the C tool too.
    victim = next(iter(store.iter_objects()))
    os.unlink(victim[1])
    missing = oracle.run("composefs-info", basedir, "missing-objects", image)
    assert missing.stdout.decode().split() == ["%s/%s" % (victim[0][:2], victim[0][2:])]


def test_c_digest_store_imported_with_objects_from(oracle, tmp_path, make_tree, store_cmd):
    import subprocess

    src = tmp_path / "src"
    make_tree(src, 63, files=20)
    digest_store = tmp_path / "c-objects"
    image = tmp_path / "c.cfs"
    res = oracle.run("mkcomposefs", "--digest-store=%s" % digest_store, src, image)
    assert res.returncode == 0, res.stderr
    repo = tmp_path / "store"
    base = store_cmd + ["--repo", str(repo)]
    assert subprocess.run(base + ["init"], capture_output=True).returncode == 0
    res = subprocess.run(base + ["add-image", str(image), "--ref", "x"], capture_output=True, text=True)
    assert res.returncode == 1 and "--objects-from" in res.stderr
    res = subprocess.run(base + ["add-image", str(image), "--ref", "x", "--objects-from", str(digest_store)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    missing = oracle.run("composefs-info", "--basedir=%s" % (repo / "objects"), "missing-objects", image)
    assert missing.stdout == b""
    assert subprocess.run(base + ["fsck"], capture_output=True).returncode == 0
    assert sorted(p.name for p in Path(repo / "objects").rglob("*") if p.is_file()) == \
        sorted(p.name for p in digest_store.rglob("*") if p.is_file())
