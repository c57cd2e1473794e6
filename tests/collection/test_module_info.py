"""composefs.fleet.info: facts about real stores and real mounts; never changes anything."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess

import pytest

from composefs_fleet import mount_record
from composefs_fleet.mount import mount_composefs, verity_problem
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_stats import stats


def tree_snapshot(root):
    """Everything under ``root`` (names, sizes, contents hashed): to prove nothing changed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            entry = (st.st_mode, st.st_size, st.st_mtime_ns)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    entry += (hashlib.sha256(f.read()).hexdigest(),)
            out[os.path.relpath(path, root)] = entry
    return out


@pytest.fixture
def store(tmp_path):
    s, _ = Store.init(tmp_path / "store", notice=None)
    for i, ref in enumerate(("one", "two")):
        src = tmp_path / ("src-" + ref)
        (src / "sub").mkdir(parents=True)
        (src / "common").write_bytes(random.Random(0).randbytes(30000))
        (src / "sub" / "own").write_bytes(random.Random(i + 1).randbytes(20000))
        (src / "tiny").write_bytes(b"inline")
        add_image(s, src, "app/" + ref)
    s.write_ref("alias", s.read_ref("app/one"))
    return s


def run_info(module_runner, args, check=False):
    res = module_runner("info", args, check=check)
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] is False
    return res


def test_store_facts(module_runner, store, tmp_path):
    before = tree_snapshot(str(tmp_path / "store"))
    res = run_info(module_runner, {"stores": [str(tmp_path / "store")], "mounts": False})
    assert res["mounts"] == []
    [facts] = res["stores"]
    one, two = store.read_ref("app/one"), store.read_ref("app/two")
    assert facts["location"] == str(tmp_path / "store")
    assert facts["format"] == 1
    assert facts["refs"] == {"alias": one, "app/one": one, "app/two": two}
    problem = verity_problem(store.objects_dir)
    assert facts["verity_supported"] is (problem is None) and facts["verity_problem"] == problem
    images = {i["digest"]: i for i in facts["images"]}
    assert sorted(images) == sorted([one, two])
    assert images[one]["refs"] == ["alias", "app/one"] and images[two]["refs"] == ["app/two"]
    for hexd, image in images.items():
        assert image["objects"] == 2  # common + own; "tiny" is inline
        assert image["missing_count"] == 0 and image["missing_objects"] == []
        assert image["size"] == os.path.getsize(store.image_path(hexd))
        assert image["error"] is None and image["mounted_at"] == []
    expected = stats(store)
    assert facts["stats"] == expected and expected["shared_objects"] == 1
    assert tree_snapshot(str(tmp_path / "store")) == before


def test_missing_objects_are_listed_and_counted(module_runner, store, tmp_path):
    one = store.read_ref("app/one")
    from composefs_fleet.image_needs import image_objects

    needed = sorted(image_objects(store.read_image(one)).objects)
    victim = next(h for h in needed if h in image_objects(store.read_image(store.read_ref("app/two"))).objects)
    os.unlink(store.object_path(victim))
    res = run_info(module_runner, {"stores": [str(tmp_path / "store")]})
    images = {i["digest"]: i for i in res["stores"][0]["images"]}
    for image in images.values():
        assert image["missing_count"] == 1 and image["missing_objects"] == [victim]
    res = run_info(module_runner, {"stores": [str(tmp_path / "store")], "check_objects": False})
    for image in res["stores"][0]["images"]:
        assert image["missing_count"] is None and image["missing_objects"] == []


def test_missing_list_is_capped(module_runner, tmp_path):
    s, _ = Store.init(tmp_path / "store", notice=None)
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(130):
        (src / ("f%03d" % i)).write_bytes(rng.randbytes(100))
    add_image(s, src, "many")
    for hexd, path, _st in list(s.iter_objects()):
        os.unlink(path)
    res = run_info(module_runner, {"stores": [str(tmp_path / "store")], "mounts": False})
    [image] = res["stores"][0]["images"]
    assert image["missing_count"] == 130 and len(image["missing_objects"]) == 100


def test_not_a_store_fails_clearly(module_runner, tmp_path):
    res = module_runner("info", {"stores": [str(tmp_path)]})
    assert res["failed"] and "is not a composefs store" in res["msg"]


def test_foreign_owned_store_needs_allow_foreign_owner(module_runner, store, tmp_path):
    os.chown(tmp_path / "store" / "images", 4242, 4242)
    res = module_runner("info", {"stores": [str(tmp_path / "store")], "mounts": False})
    assert res["failed"] and "belongs to uid 4242" in res["msg"], res
    res = run_info(module_runner, {"stores": [str(tmp_path / "store")], "mounts": False, "allow_foreign_owner": True})
    assert len(res["stores"][0]["images"]) == 2


def test_symlinked_store_directory_is_refused(module_runner, store, tmp_path):
    os.rename(tmp_path / "store" / "refs", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "store" / "refs")
    for allow in (False, True):
        res = module_runner("info", {"stores": [str(tmp_path / "store")], "mounts": False, "allow_foreign_owner": allow})
        assert res["failed"] and "refs is a symbolic link" in res["msg"], res


def test_damaged_image_is_reported_not_fatal(module_runner, store, tmp_path):
    two = store.read_ref("app/two")
    with open(store.image_path(two), "r+b") as f:
        f.truncate(100)
    res = run_info(module_runner, {"stores": [str(tmp_path / "store")], "mounts": False})
    images = {i["digest"]: i for i in res["stores"][0]["images"]}
    assert images[two]["error"] and images[two]["objects"] is None
    assert images[store.read_ref("app/one")]["error"] is None


@pytest.mark.kernel
def test_mounts_with_and_without_record(module_runner, store, tmp_path):
    one, two = store.read_ref("app/one"), store.read_ref("app/two")
    targets = [tmp_path / "mnt one", tmp_path / "mnt,two:x=y"]
    for t in targets:
        t.mkdir()
    try:
        r1 = mount_composefs(store.image_path(one), targets[0], [store.objects_dir])
        r2 = mount_composefs(store.image_path(two), targets[1], [store.objects_dir], record_dir=None)
        assert r1.record_path and r2.record_path is None
        for check in (False, True):
            res = run_info(module_runner, {"stores": [str(tmp_path / "store")]}, check=check)
            mounts = {m["where"]: m for m in res["mounts"] if m["where"].startswith(str(tmp_path))}
            assert sorted(mounts) == sorted(str(t) for t in targets)
            m1, m2 = mounts[str(targets[0])], mounts[str(targets[1])]
            for m in (m1, m2):
                assert (m["fstype"], m["source"]) == ("overlay", "composefs")
                assert m["basedirs"] == [os.fsdecode(store.objects_dir)]
                assert m["verity"] == "off" and "datadir+=" in m["options"]
            assert m1["recorded"] is True and m1["image_digest"] == one
            assert m1["image_file"] == os.fsdecode(store.image_path(one))
            assert m2["recorded"] is False and m2["image_digest"] is None and m2["image_file"] is None
            images = {i["digest"]: i for i in res["stores"][0]["images"]}
            assert images[one]["mounted_at"] == [str(targets[0])]
            assert images[two]["mounted_at"] == []  # unknown without a record
    finally:
        for t in targets:
            subprocess.run(["umount", str(t)], capture_output=True)
    # The record of the first mount is stale now: info must not believe it.
    res = run_info(module_runner, {})
    assert not [m for m in res["mounts"] if m["where"].startswith(str(tmp_path))]
    mount_record.prune()
    assert not os.path.exists(mount_record.record_path(targets[0]))


@pytest.mark.kernel
def test_mounts_report_ref_and_previous_image(module_runner, store, tmp_path, monkeypatch):
    """After a switch: the ref mounted and the image shown before (what a rollback mounts), from the mount
    record; a record that does not know it is completed from the mount point's history, if that history
    describes the image mounted now."""
    from ansible_collections.composefs.fleet.plugins.module_utils.composefs import mount_history

    one, two = store.read_ref("app/one"), store.read_ref("app/two")
    switched, older, stale = tmp_path / "switched", tmp_path / "older", tmp_path / "stale"
    history = tmp_path / "history"
    for t in (switched, older, stale):
        t.mkdir()
    try:
        mount_composefs(store.image_path(one), switched, [store.objects_dir], ref="app/one", history_dir=str(history))
        mount_composefs(store.image_path(two), switched, [store.objects_dir], ref="app/two", replace=True,
                        history_dir=str(history))
        for t in (older, stale):  # records without a previous image, histories written by hand
            mount_composefs(store.image_path(two), t, [store.objects_dir], history_dir=None)
        objects = [os.fsdecode(store.objects_dir)]
        mount_history.note_mount(str(older), os.fsdecode(store.image_path(two)), two, objects, "off", ref="app/two",
                                 directory=str(history),
                                 replaced={"image": os.fsdecode(store.image_path(one)), "image_digest": one})
        mount_history.note_mount(str(stale), os.fsdecode(store.image_path(one)), one, objects, "off",
                                 directory=str(history),
                                 replaced={"image": os.fsdecode(store.image_path(two)), "image_digest": two})
        monkeypatch.setattr(mount_history, "HISTORY_DIR", str(history))
        res = run_info(module_runner, {})
        mounts = {m["where"]: m for m in res["mounts"] if m["where"].startswith(str(tmp_path))}
        for where, ref in ((switched, "app/two"), (older, "app/two")):
            m = mounts[str(where)]
            assert (m["image_digest"], m["ref"]) == (two, ref), m
            assert m["previous_image_digest"] == one, m
            assert m["previous_image_file"] == os.fsdecode(store.image_path(one))
        m = mounts[str(stale)]  # its history describes another image: not believed
        assert m["image_digest"] == two and m["previous_image_digest"] is None and m["previous_image_file"] is None
        assert m["ref"] is None
    finally:
        for t in (switched, switched, older, stale):
            subprocess.run(["umount", "-l", str(t)], capture_output=True)
