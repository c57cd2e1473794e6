# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.image: arguments, errors, check/diff logic on temporary stores."""

from __future__ import annotations

import os

import pytest


from ansible_collections.composefs.fleet.plugins.modules import image
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.errors import RefNotFound
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store import Store


def run(capsys, args, check=False, diff=False):
    return run_module(image, capsys, args, check, diff)


def listing(top):
    """Names, sizes and mtimes of everything under ``top`` (what any write would change)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, top)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def store(tmp_path):
    return Store.init(str(tmp_path / "store"), notice=None)[0]


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    for i, size in enumerate([0, 5, 64, 65, 3000, 9000]):
        (root / ("sub/f%d" % i if i % 2 else "f%d" % i)).write_bytes(os.urandom(size))
    return root


def args_for(store, src, **more):
    base = {"store": os.fsdecode(store.path), "ref": "app", "src": str(src)}
    base.update(more)
    return base


@pytest.mark.parametrize("args, message", [
    ({"store": "/x", "ref": "a"}, "src"),
    ({"ref": "a", "src": "/"}, "store"),
    ({"store": "/x", "ref": "a", "src": "/", "state": "gone"}, "state"),
    ({"store": "/x", "ref": "a", "src": "/", "format_version": 3}, "format_version"),
    ({"store": "/x", "ref": "a", "src": "/", "skip_xattrs": True, "user_xattrs": True}, "contradict each other"),
    ({"store": "/x", "ref": "a", "src": "/", "skip_xattrs": True, "xattrs": "user"}, "contradicts xattrs: user"),
    ({"store": "/x", "ref": "a", "src": "/", "expected_digest": "abc"}, "64 hexadecimal digits"),
    ({"store": "/x", "ref": "a", "src": "/", "expected_digest": "sha512:" + "0" * 64}, "64 hexadecimal digits"),
    ({"store": "/x", "ref": "/abs", "src": "/"}, "absolute"),
    ({"store": "/x", "ref": "a/../b", "state": "absent"}, "'..'"),
])
def test_bad_arguments(capsys, args, message):
    res = run(capsys, args)
    assert res["failed"] and message in res["msg"], res["msg"]


def test_present_check_then_apply_then_idempotent(capsys, store, src):
    top = os.fsdecode(store.path)
    before = listing(top)
    predicted = run(capsys, args_for(store, src), check=True, diff=True)
    assert predicted["changed"] is True
    assert listing(top) == before  # check mode wrote nothing
    applied = run(capsys, args_for(store, src), diff=True)
    assert applied["changed"] is True and applied["digest"] == predicted["digest"]
    assert applied["diff"] == predicted["diff"] == {"before": {"ref": "app", "digest": None},
                                                    "after": {"ref": "app", "digest": applied["digest"]}}
    assert applied["image"]["objects"] == 3  # the files above 64 bytes
    assert applied["image"]["objects_written"] == predicted["image"]["objects_written"] == 3
    assert store.read_ref("app") == applied["digest"]
    for check in (False, True):
        again = run(capsys, args_for(store, src), check=check, diff=True)
        assert again["changed"] is False and again["digest"] == applied["digest"]
        assert again["image"]["previous_digest"] == applied["digest"]
        assert again["diff"]["before"] == again["diff"]["after"]


def test_ref_moves_when_the_tree_changes(capsys, store, src):
    first = run(capsys, args_for(store, src))
    (src / "f4").write_bytes(b"changed" * 100)
    res = run(capsys, args_for(store, src), diff=True)
    assert res["changed"] and res["digest"] != first["digest"]
    assert res["image"]["previous_digest"] == first["digest"]
    assert res["diff"]["before"]["digest"] == first["digest"]
    assert res["image"]["objects_written"] == 1


def test_expected_digest_mismatch_stores_nothing(capsys, store, src):
    top = os.fsdecode(store.path)
    before = listing(top)
    for check in (True, False):
        res = run(capsys, args_for(store, src, expected_digest="1" * 64), check=check)
        assert res["failed"] and "not the expected" in res["msg"]
        assert len(res["digest"]) == 64
    after = listing(top)
    for name in ("lock", "gate.lock"):  # the real run took the store lock
        after.pop(name, None)
    assert after == before
    right = res["digest"]
    res = run(capsys, args_for(store, src, expected_digest=right.upper()))
    assert res["changed"] and res["digest"] == right == store.read_ref("app")


def test_image_source_refuses_filters(capsys, store, src, tmp_path):
    made = run(capsys, args_for(store, src))
    copy = tmp_path / "copy.cfs"
    with open(store.image_path(made["digest"]), "rb") as f:
        copy.write_bytes(f.read())
    res = run(capsys, args_for(store, copy, ref="img", skip_devices=True))
    assert res["failed"] and "cannot apply to an existing image" in res["msg"]
    res = run(capsys, args_for(store, copy, ref="img"))
    assert res["changed"] and res["digest"] == made["digest"] and res["image"]["source_kind"] == "image"
    assert res["image"]["image_written"] is False


def test_not_a_store(capsys, tmp_path, src):
    res = run(capsys, {"store": str(tmp_path / "missing"), "ref": "a", "src": str(src)})
    assert res["failed"] and "not a composefs store" in res["msg"]
    res = run(capsys, {"store": str(tmp_path / "missing"), "ref": "a", "src": str(src)}, check=True)
    assert res["changed"] and not res.get("failed")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("check", [True, False])
def test_group_writable_store_needs_allow_foreign_owner(capsys, store, src, check):
    top = os.fsdecode(store.path)
    os.chmod(top, 0o770)
    before = listing(top)
    res = run(capsys, args_for(store, src), check=check)
    assert res.get("failed") and "writable by its group" in res["msg"] and "allow_foreign_owner" in res["msg"]
    assert listing(top) == before
    res = run(capsys, args_for(store, src, allow_foreign_owner=True), check=check)
    assert res["changed"] is True and not res.get("failed"), res


def test_missing_source(capsys, store, tmp_path):
    res = run(capsys, args_for(store, tmp_path / "nothing"))
    assert res["failed"] and "no such file or directory" in res["msg"]


def test_absent(capsys, store, src):
    made = run(capsys, args_for(store, src))
    absent = {"store": os.fsdecode(store.path), "ref": "app", "state": "absent"}
    res = run(capsys, absent, check=True, diff=True)
    assert res["changed"] and store.read_ref("app") == made["digest"]
    assert res["diff"] == {"before": {"ref": "app", "digest": made["digest"]}, "after": {"ref": "app", "digest": None}}
    res = run(capsys, absent)
    assert res["changed"] and res["removed"] and res["digest"] == made["digest"]
    with pytest.raises(RefNotFound):
        store.read_ref("app")
    assert os.path.exists(store.image_path(made["digest"]))  # left for gc
    for check in (False, True):
        res = run(capsys, absent, check=check)
        assert res["changed"] is False and res["removed"] is False and res["digest"] is None
