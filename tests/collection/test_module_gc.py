"""composefs.fleet.gc: check mode reports what would be freed and removes nothing; changed only when something
was removed; a live mount's previous image is kept; a fresh node in check mode has nothing to collect."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from composefs_fleet import mount_record
from composefs_fleet.mount import mount_composefs
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image

from test_module_info import tree_snapshot


@pytest.fixture
def store(tmp_path):
    """Images app/one and app/two, each with one object of its own, and one shared object."""
    s, _ = Store.init(tmp_path / "store", notice=None)
    for i, ref in enumerate(("one", "two")):
        src = tmp_path / ("src-" + ref)
        src.mkdir()
        (src / "common").write_bytes(random.Random(0).randbytes(30000))
        (src / "own").write_bytes(random.Random(i + 40).randbytes(20000 + i))
        add_image(s, src, "app/" + ref)
    return s


def run_gc(module_runner, args, check=False, diff=False):
    res = module_runner("gc", args, check=check, diff=diff)
    assert not res.get("failed"), res.get("msg")
    return res


def _content(root):
    """The store's files, but for its lock files (a dry run takes the locks too)."""
    return {k: v for k, v in tree_snapshot(root).items() if not k.endswith(".lock")}


def _objects(store):
    return {h for h, _p, _st in store.iter_objects()}


def test_check_mode_reports_what_would_be_freed(module_runner, store, tmp_path):
    two = store.remove_ref("app/two")
    args = {"path": str(tmp_path / "store"), "tmp_grace": 0, "history_dir": str(tmp_path / "history")}
    before = _content(str(tmp_path / "store"))
    objects_before = _objects(store)
    would = run_gc(module_runner, args, check=True, diff=True)
    assert would["changed"] is True
    assert would["removed_images"] == [two] and would["freed"]["images"] == 1
    assert would["freed"]["objects"] == 1 and would["freed"]["object_bytes"] == 20001
    assert would["freed"]["bytes"] == would["freed"]["image_bytes"] + 20001 > 20001
    assert would["kept_images"] == [store.read_ref("app/one")] and would["kept_objects"] == 2
    assert would["diff"]["before"] == {"images": sorted([two, store.read_ref("app/one")]), "objects": 3}
    assert would["diff"]["after"] == {"images": [store.read_ref("app/one")], "objects": 2}
    assert _content(str(tmp_path / "store")) == before

    done = run_gc(module_runner, args)
    assert done["changed"] is True and done["freed"] == would["freed"]
    assert done["removed_images"] == [two] and two not in store.list_images()
    assert len(objects_before - _objects(store)) == 1

    again = run_gc(module_runner, args)
    assert again["changed"] is False and again["freed"]["bytes"] == 0 and again["removed_images"] == []
    assert run_gc(module_runner, args, check=True)["changed"] is False


def test_fresh_node_check_mode_has_nothing_to_collect(module_runner, tmp_path):
    missing = tmp_path / "new" / "store"
    res = run_gc(module_runner, {"path": str(missing)}, check=True, diff=True)
    assert res["changed"] is False and res["freed"]["bytes"] == 0
    assert "does not exist yet" in res["msg"]
    assert not (tmp_path / "new").exists()
    # Not in check mode: a store that is not there is an error naming it.
    res = module_runner("gc", {"path": str(missing)})
    assert res.get("failed") and str(missing) in res["msg"] and "not a composefs store" in res["msg"]


def test_bad_tmp_grace_is_refused(module_runner, store, tmp_path):
    res = module_runner("gc", {"path": str(tmp_path / "store"), "tmp_grace": -1})
    assert res.get("failed") and "tmp_grace" in res["msg"]


@pytest.mark.kernel
def test_previous_image_of_a_live_mount_is_kept(module_runner, store, tmp_path):
    one, two = store.read_ref("app/one"), store.read_ref("app/two")
    where, history = tmp_path / "m", tmp_path / "history"
    where.mkdir()
    try:
        for digest in (one, two):
            mount_composefs(store.image_path(digest), where, [store.objects_dir], replace=True,
                            history_dir=str(history))
        store.remove_ref("app/one")
        store.remove_ref("app/two")
        res = run_gc(module_runner, {"path": str(tmp_path / "store"), "history_dir": str(history)})
        assert res["changed"] is False and res["removed_images"] == []
        assert res["previous_images"] == [{"where": str(where), "image_digest": one, "in_store": True, "kept": True,
                                           "reason": None, "image_file": os.fsdecode(store.image_path(one))}]
        assert sorted(res["kept_images"]) == sorted([one, two])
    finally:
        for _ in range(2):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        mount_record.prune()
    res = run_gc(module_runner, {"path": str(tmp_path / "store"), "history_dir": str(history)})
    assert res["changed"] is True and sorted(res["removed_images"]) == sorted([one, two])


@pytest.mark.kernel
def test_previous_image_that_cannot_be_kept_is_a_warning(module_runner, store, tmp_path):
    """The previous image was a file outside the store, replaced since: its objects are unknown, nothing reads
    them now; gc goes on and says the rollback needs the image again."""
    import shutil

    one, two = store.read_ref("app/one"), store.read_ref("app/two")
    where, history, app = tmp_path / "m", tmp_path / "history", tmp_path / "app.cfs"
    where.mkdir()
    shutil.copyfile(store.image_path(one), app)
    try:
        mount_composefs(app, where, [store.objects_dir], replace=True, history_dir=str(history))
        mount_composefs(store.image_path(two), where, [store.objects_dir], replace=True, history_dir=str(history))
        store.remove_ref("app/one")
        os.unlink(store.image_path(one))  # only app.cfs had it, and that is replaced now
        shutil.copyfile(store.image_path(two), app)
        res = run_gc(module_runner, {"path": str(tmp_path / "store"), "history_dir": str(history)}, check=True)
        [previous] = res["previous_images"]
        assert previous["kept"] is False and previous["in_store"] is False and previous["image_digest"] == one
        assert previous["image_file"] == str(app) and "now has digest %s" % two in previous["reason"]
        assert "previous image %s of %s cannot be kept" % (one, where) in json.dumps(res.get("warnings")), res
        assert res["changed"] is True and res["freed"]["objects"] == 1  # the object only image one needed
    finally:
        for _ in range(2):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        mount_record.prune()
