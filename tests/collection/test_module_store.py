# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.store, run in-process against real directories (and real
mounts for the "in use" refusals)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from composefs_fleet import mount as cfs_mount
from composefs_fleet import store_stats
from composefs_fleet.store import Store

EMPTY_AFTER = {"state": "present", "format": 1, "digest_algorithm": "sha256", "objects": 0, "images": 0,
               "refs": 0}


def four_steps(module_runner, args, check_effect, diff_before, diff_after):
    """check -> changed, apply -> changed, again -> unchanged, again in check mode -> unchanged."""
    res = module_runner("store", args, check=True, diff=True)
    assert not res.get("failed"), res
    assert res["changed"] is True
    assert res["diff"] == {"before": diff_before, "after": diff_after}
    check_effect(res)
    res = module_runner("store", args, diff=True)
    assert not res.get("failed"), res
    assert res["changed"] is True
    assert res["diff"] == {"before": diff_before, "after": diff_after}
    applied = res
    for check in (False, True):
        res = module_runner("store", args, check=check, diff=True)
        assert not res.get("failed"), res
        assert res["changed"] is False, (check, res)
        assert res["diff"]["before"] == res["diff"]["after"] == diff_after
    return applied


def add_image(store_dir: Path, src: Path, ref: str, ours) -> str:
    """Objects through mkcomposefs --digest-store, then the image and a ref (the store's own add path is
    another module's business)."""
    image = store_dir.parent / ("%s.cfs" % ref.replace("/", "_"))
    res = ours.run("mkcomposefs", "--digest-store=%s" % (store_dir / "objects"), src, image)
    assert res.returncode == 0, res.stderr
    store = Store.open(store_dir, notice=None)
    digest, _written = store.write_image(image.read_bytes())
    store.write_ref(ref, digest)
    return digest


def make_source(root: Path, seed: int) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / ("f%d" % i)).write_bytes(bytes([seed, i]) * (3000 * (i + 1)))
    (root / "sub" / "small").write_bytes(b"tiny")
    (root / "link").symlink_to("f1")
    return root


def debris(parent: Path):
    return sorted(p.name for p in parent.iterdir() if ".removing-" in p.name)


# -- present -------------------------------------------------------------------

def test_create_a_store_with_missing_parents(tmp_path, module_runner):
    location = tmp_path / "a" / "b" / "store"
    args = {"path": str(location)}

    def nothing_written(res):
        assert not (tmp_path / "a").exists()
        assert res["store"]["exists"] is True and res["store"]["objects"] == 0

    applied = four_steps(module_runner, args, nothing_written, {"state": "absent"}, EMPTY_AFTER)
    meta = json.loads((location / "meta.json").read_text())
    assert meta == {"format": 1, "digest": "sha256"}
    assert sorted(p.name for p in location.iterdir()) == ["images", "meta.json", "objects", "refs"]
    Store.open(location, notice=None)  # a valid store for the core too
    store = applied["store"]
    assert store["location"] == str(location)
    assert (store["format"], store["digest_algorithm"]) == (1, "sha256")
    assert (store["objects"], store["images"], store["refs"]) == (0, 0, 0)
    # No fs-verity on this host: the reason comes from the kernel, as the core's mount check sees it.
    assert store["verity_problem"] == cfs_mount.verity_problem(str(location / "objects"))
    assert store["verity_supported"] is (store["verity_problem"] is None)


def test_no_diff_without_diff_mode(tmp_path, module_runner):
    res = module_runner("store", {"path": str(tmp_path / "s")})
    assert res["changed"] is True and "diff" not in res
    assert "path" not in res and "uid" not in res  # no stat info added by exit_json


def test_existing_store_reports_its_counts(tmp_path, module_runner, ours):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    add_image(location, make_source(tmp_path / "src1", 1), "app/one", ours)
    add_image(location, make_source(tmp_path / "src2", 2), "two", ours)
    (location / "refs" / "three").write_text(open(location / "refs" / "two").read())
    for check in (True, False):
        res = module_runner("store", {"path": str(location)}, check=check, diff=True)
        assert res["changed"] is False, res
        stats = store_stats.stats(Store.open(location, notice=None))
        want = {"objects": stats["objects"], "images": 2, "refs": 3}
        assert {k: res["store"][k] for k in want} == want
        assert stats["objects"] == 10  # 5 distinct files of each source; "tiny" is inlined
        assert res["diff"]["before"] == res["diff"]["after"] == dict(EMPTY_AFTER, **want)


@pytest.mark.parametrize("content", [[], ["lost+found"]], ids=["empty", "lost+found-only"])
def test_empty_directory_becomes_a_store(tmp_path, module_runner, content):
    location = tmp_path / "store"
    location.mkdir()
    for name in content:
        (location / name).mkdir()

    def untouched(res):
        assert sorted(p.name for p in location.iterdir()) == content

    four_steps(module_runner, {"path": str(location)}, untouched, {"state": "absent"}, EMPTY_AFTER)
    assert sorted(p.name for p in location.iterdir()) == sorted(["images", "meta.json", "objects", "refs"] + content)


def test_non_empty_directory_is_not_adopted(tmp_path, module_runner):
    location = tmp_path / "data"
    location.mkdir()
    (location / "precious").write_text("keep me")
    for check in (True, False):
        res = module_runner("store", {"path": str(location)}, check=check)
        assert res["failed"] is True
        assert "not a composefs store" in res["msg"] and "refusing" in res["msg"]
        assert sorted(p.name for p in location.iterdir()) == ["precious"]


def test_a_file_is_not_turned_into_a_store(tmp_path, module_runner):
    location = tmp_path / "file"
    location.write_text("x")
    res = module_runner("store", {"path": str(location)})
    assert res["failed"] is True and "not a directory" in res["msg"]
    assert location.read_text() == "x"


@pytest.mark.parametrize("meta, words", [
    (b"{not json", "damaged"),
    (b'{"format": 2, "digest": "sha256"}\n', "newer than this tool supports"),
    (b'{"format": 1, "digest": "sha512"}\n', "not supported"),
])
def test_damaged_or_foreign_store_fails_clearly(tmp_path, module_runner, meta, words):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    (location / "meta.json").write_bytes(meta)
    res = module_runner("store", {"path": str(location)}, check=True)
    assert res["failed"] is True and words in res["msg"], res
    assert "Traceback" not in res["msg"]
    res = module_runner("store", {"path": str(location)})
    assert res["failed"] is True and words in res["msg"]
    assert (location / "meta.json").read_bytes() == meta


def test_missing_subdirectory_is_reported(tmp_path, module_runner):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    os.rmdir(location / "refs")
    res = module_runner("store", {"path": str(location)})
    assert res["failed"] is True and "refs is missing" in res["msg"]


def _mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_new_store_is_private_unless_shared_layout(tmp_path, module_runner):
    res = module_runner("store", {"path": str(tmp_path / "private")})
    assert res["changed"] is True, res
    assert _mode(tmp_path / "private") == _mode(tmp_path / "private" / "objects") == 0o700
    res = module_runner("store", {"path": str(tmp_path / "shared"), "shared_layout": True})
    assert res["changed"] is True, res
    assert _mode(tmp_path / "shared") == _mode(tmp_path / "shared" / "images") == 0o755
    res = module_runner("store", {"path": str(tmp_path / "shared")})
    assert res["changed"] is False and not res.get("failed"), res  # 0755 passes the ownership check


def test_foreign_or_writable_store_needs_allow_foreign_owner(tmp_path, module_runner):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    os.chmod(location / "objects", 0o777)
    res = module_runner("store", {"path": str(location)})
    assert res["failed"] is True and "writable by group and others" in res["msg"], res
    res = module_runner("store", {"path": str(location), "allow_foreign_owner": True})
    assert not res.get("failed") and res["changed"] is False, res
    os.chmod(location / "objects", 0o700)
    os.chown(location, 4242, 4242)
    for force in (False, True):  # force overrides damage, not ownership
        res = module_runner("store", {"path": str(location), "state": "absent", "force": force})
        assert res["failed"] is True and "belongs to uid 4242" in res["msg"] and location.exists(), res
    res = module_runner("store", {"path": str(location), "state": "absent", "allow_foreign_owner": True})
    assert res["changed"] is True and not location.exists(), res


def test_bad_arguments_fail(tmp_path, module_runner):
    res = module_runner("store", {"path": str(tmp_path), "state": "gone"})
    assert res["failed"] is True and "state" in res["msg"]
    res = module_runner("store", {})
    assert res["failed"] is True and "path" in res["msg"]


# -- absent --------------------------------------------------------------------

def test_remove_an_empty_store(tmp_path, module_runner):
    location = tmp_path / "store"
    Store.init(location, notice=None)

    def still_there(res):
        assert (location / "meta.json").is_file()
        assert res["store"]["exists"] is False

    four_steps(module_runner, {"path": str(location), "state": "absent"}, still_there, EMPTY_AFTER,
               {"state": "absent"})
    assert not os.path.lexists(location)
    assert list(tmp_path.iterdir()) == []  # no renamed leftovers


def test_store_with_refs_needs_force(tmp_path, module_runner, ours):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    add_image(location, make_source(tmp_path / "src", 3), "app/v1", ours)
    add_image(location, make_source(tmp_path / "src2", 4), "app/v2", ours)
    objects = sorted(str(p.relative_to(location)) for p in (location / "objects").rglob("*"))
    for check in (True, False):
        res = module_runner("store", {"path": str(location), "state": "absent"}, check=check)
        assert res["failed"] is True, res
        assert "2 ref(s)" in res["msg"] and "app/v1" in res["msg"] and "force" in res["msg"]
    assert sorted(str(p.relative_to(location)) for p in (location / "objects").rglob("*")) == objects

    before = dict(EMPTY_AFTER, objects=10, images=2, refs=2)
    four_steps(module_runner, {"path": str(location), "state": "absent", "force": True},
               lambda res: (location / "meta.json").is_file() or pytest.fail("check mode removed the store"),
               before, {"state": "absent"})
    assert not os.path.lexists(location)
    assert debris(tmp_path) == []


def test_damaged_store_is_removed_only_with_force(tmp_path, module_runner):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    (location / "meta.json").write_text("garbage")
    res = module_runner("store", {"path": str(location), "state": "absent"})
    assert res["failed"] is True and "damaged" in res["msg"] and "force" in res["msg"]
    assert (location / "meta.json").read_text() == "garbage"
    res = module_runner("store", {"path": str(location), "state": "absent", "force": True}, diff=True)
    assert res["changed"] is True and not os.path.lexists(location), res
    assert res["diff"]["after"] == {"state": "absent"}


def test_absent_leaves_a_directory_that_is_no_store_alone(tmp_path, module_runner):
    location = tmp_path / "data"
    location.mkdir()
    (location / "precious").write_text("keep me")
    for check in (True, False):
        res = module_runner("store", {"path": str(location), "state": "absent", "force": True}, check=check,
                            diff=True)
        assert res["changed"] is False and not res.get("failed"), res
        assert "not a composefs store" in json.dumps(res.get("warnings")), res
        assert res["diff"] == {"before": {"state": "absent"}, "after": {"state": "absent"}}
    assert (location / "precious").read_text() == "keep me"


def test_absent_refuses_a_symlink(tmp_path, module_runner):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    link = tmp_path / "link"
    link.symlink_to(location)
    res = module_runner("store", {"path": str(link), "state": "absent"})
    assert res["failed"] is True and "symbolic link" in res["msg"]
    assert (location / "meta.json").is_file() and link.is_symlink()
    # present through the symlink is fine: the store is there.
    res = module_runner("store", {"path": str(link)})
    assert res["changed"] is False and not res.get("failed"), res


# -- absent while in use (real mounts) ---------------------------------------------

@pytest.fixture
def mounts():
    done = []
    yield done
    for target in reversed(done):
        subprocess.run(["umount", str(target)], capture_output=True)


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True, capture_output=True)


@pytest.mark.kernel
def test_absent_refuses_while_an_image_of_the_store_is_mounted(tmp_path, module_runner, ours, mounts):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    digest = add_image(location, make_source(tmp_path / "src", 5), "app", ours)
    target = tmp_path / "mnt"
    target.mkdir()
    store = Store.open(location, notice=None)
    cfs_mount.mount_composefs(store.image_path(digest), str(target), [str(location / "objects")])
    mounts.append(target)
    assert (target / "f2").read_bytes() == (tmp_path / "src" / "f2").read_bytes()
    for check in (True, False):
        res = module_runner("store", {"path": str(location), "state": "absent", "force": True}, check=check)
        assert res["failed"] is True, res
        assert "in use" in res["msg"] and str(location / "objects") in res["msg"], res["msg"]
    assert (target / "f2").read_bytes() == (tmp_path / "src" / "f2").read_bytes()
    assert (location / "meta.json").is_file()
    _umount(target)
    mounts.remove(target)
    res = module_runner("store", {"path": str(location), "state": "absent", "force": True})
    assert res["changed"] is True and not os.path.lexists(location), res


@pytest.mark.kernel
@pytest.mark.parametrize("lower", ["fd", "legacy"])
def test_absent_refuses_while_an_outside_image_uses_the_objects(tmp_path, module_runner, ours, mounts, lower):
    """An image file outside the store, mounted with the store's objects as basedir (both overlay ways)."""
    location = tmp_path / "store"
    Store.init(location, notice=None)
    image = tmp_path / "outside.cfs"
    res = ours.run("mkcomposefs", "--digest-store=%s" % (location / "objects"), make_source(tmp_path / "src", 6),
                   image)
    assert res.returncode == 0, res.stderr
    target = tmp_path / "mnt"
    target.mkdir()
    cfs_mount.mount_composefs(str(image), str(target), [str(location / "objects")], lower=lower)
    mounts.append(target)
    res = module_runner("store", {"path": str(location), "state": "absent"})
    assert res["failed"] is True and "in use" in res["msg"], res
    assert len(list((location / "objects").rglob("*"))) > 0
    _umount(target)
    mounts.remove(target)
    res = module_runner("store", {"path": str(location), "state": "absent"})
    assert res["changed"] is True and not os.path.lexists(location), res


@pytest.mark.kernel
def test_absent_refuses_a_mount_point_inside_the_store(tmp_path, module_runner, mounts):
    location = tmp_path / "store"
    Store.init(location, notice=None)
    inner = location / "refs" / "mnt"
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    mounts.append(inner)
    (inner / "keep").write_text("x")
    res = module_runner("store", {"path": str(location), "state": "absent", "force": True})
    assert res["failed"] is True and "mount point inside the store" in res["msg"], res
    assert (inner / "keep").read_text() == "x"


@pytest.mark.kernel
def test_store_that_is_a_mount_point_is_emptied(tmp_path, module_runner, mounts, ours):
    location = tmp_path / "store"
    location.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(location)], check=True)
    mounts.append(location)
    (location / "lost+found").mkdir()
    res = module_runner("store", {"path": str(location)})
    assert res["changed"] is True, res
    add_image(location, make_source(tmp_path / "src", 7), "app", ours)
    res = module_runner("store", {"path": str(location), "state": "absent", "force": True})
    assert res["changed"] is True and not res.get("failed"), res
    assert os.path.ismount(location) and list(location.iterdir()) == []
    res = module_runner("store", {"path": str(location), "state": "absent"})
    assert res["changed"] is False, res
