# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.image run for real (in-process main()) against real stores and trees."""
from __future__ import annotations

import io
import os
import random
import stat
import time
from pathlib import Path

import pytest

from composefs_fleet import fsverity_digest
from composefs_fleet.dump import write_dump
from composefs_fleet.erofs_reader import image_version, read_image_file
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.errors import RefNotFound
from composefs_fleet.store import Store
from composefs_fleet.store_fsck import check as fsck


def write_tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True)
    for i in range(16):
        size = rng.choice([0, 10, 64, 65, 4096, 70000])
        (root / ("sub/f%02d" % i if i % 2 else "f%02d" % i)).write_bytes(rng.randbytes(size))
    (root / "link").symlink_to("sub/f01")
    os.setxattr(root / "f00", "user.note", b"hello")


def snapshot(top: Path):
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            entry = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if stat.S_ISREG(st.st_mode):
                entry += (Path(full).read_bytes(),)
            out[os.path.relpath(full, top)] = entry
    return out


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    write_tree(root, 1)
    time.sleep(1.1)  # older than the digest cache's racy window: cacheable
    return root


@pytest.fixture
def store(tmp_path):
    return Store.init(tmp_path / "store", notice=None)[0]


def tree_digest(src: Path, **options) -> str:
    return fsverity_digest.digest_bytes(build_image(build_tree_from_directory(str(src)), **options)).hex()


def four_steps(module_runner, args, expect_changed=True):
    """check -> real -> idempotent -> idempotent check; the results."""
    results = [module_runner("image", args, check=True, diff=True),
               module_runner("image", args, diff=True),
               module_runner("image", args, diff=True),
               module_runner("image", args, check=True, diff=True)]
    for r in results:
        assert not r.get("failed"), r.get("msg")
    assert [r["changed"] for r in results] == [expect_changed, expect_changed, False, False]
    return results


def test_present_directory_four_steps(module_runner, store, src):
    top = Path(os.fsdecode(store.path))
    args = dict(store=str(top), ref="app/v1", src=str(src))
    want = tree_digest(src)
    before = snapshot(top)
    check, real, again, again_check = four_steps(module_runner, args)
    # The check run predicted exactly what the real run did, and wrote nothing.
    assert check["digest"] == real["digest"] == again["digest"] == again_check["digest"] == want
    for key in ("objects", "objects_written", "bytes_written", "files_hashed", "image_written"):
        assert check["image"][key] == real["image"][key], key
    assert real["image"]["objects_written"] == real["image"]["objects"] > 0 and real["image"]["image_written"]
    assert real["diff"] == check["diff"] == {"before": {"ref": "app/v1", "digest": None},
                                              "after": {"ref": "app/v1", "digest": want}}
    # Idempotent runs: nothing hashed, everything from the digest cache.
    for r in (again, again_check):
        assert r["diff"]["before"] == r["diff"]["after"] == {"ref": "app/v1", "digest": want}
        assert r["image"]["files_hashed"] == 0 and r["image"]["cache_hits"] == real["image"]["files_hashed"]
        assert r["image"]["objects_written"] == 0 and not r["image"]["image_written"]
        assert r["image"]["previous_digest"] == want
    # The real effect on disk.
    assert store.read_ref("app/v1") == want
    assert fsverity_digest.digest_file(store.image_path(want)).hex() == want
    assert check_store(store)
    assert "path" not in real  # exit_json would have added stat info
    assert before != snapshot(top)


def check_store(store):
    report = fsck(store)
    assert report.clean, report.errors
    return True


def test_check_mode_writes_nothing(module_runner, store, src):
    top = Path(os.fsdecode(store.path))
    module_runner("image", dict(store=str(top), ref="other", src=str(src), use_epoch=True))
    before = snapshot(top)
    r = module_runner("image", dict(store=str(top), ref="app", src=str(src)), check=True)
    assert r["changed"] and not r.get("failed")
    assert snapshot(top) == before


def test_one_changed_file_rehashes_only_it(module_runner, store, src):
    args = dict(store=os.fsdecode(store.path), ref="app", src=str(src))
    first = module_runner("image", args)
    victim = src / "sub" / "f01"
    victim.write_bytes(b"new content, longer than 64 bytes so that it is an object " * 4)
    results = four_steps(module_runner, args)
    want = tree_digest(src)
    check, real = results[0], results[1]
    for r in (check, real):
        assert r["image"]["files_hashed"] == 1 and r["image"]["objects_written"] == 1
        assert r["image"]["image_written"]
        assert r["diff"] == {"before": {"ref": "app", "digest": first["digest"]},
                             "after": {"ref": "app", "digest": want}}
    assert store.read_ref("app") == want != first["digest"]
    # The old image stays (gc's job), the ref moved.
    assert os.path.exists(store.image_path(first["digest"]))


def test_option_change_moves_the_ref(module_runner, store, src):
    args = dict(store=os.fsdecode(store.path), ref="app", src=str(src))
    first = module_runner("image", args)
    results = four_steps(module_runner, dict(args, use_epoch=True, skip_xattrs=True))
    assert results[1]["digest"] != first["digest"]
    assert results[1]["image"]["files_hashed"] == 0 and results[1]["image"]["objects_written"] == 0
    root = build_tree_from_directory(str(src), use_epoch=True, skip_xattrs=True)
    assert results[1]["digest"] == fsverity_digest.digest_bytes(build_image(root)).hex()
    # The one xattrs choice means the same as the old flags; false flags never contradict it.
    for same in (dict(xattrs="none"), dict(xattrs="none", skip_xattrs=True), dict(xattrs="none", user_xattrs=False)):
        again = module_runner("image", dict(args, use_epoch=True, **same))
        assert not again.get("failed") and again["changed"] is False and again["digest"] == results[1]["digest"]
    user = module_runner("image", dict(args, use_epoch=True, skip_xattrs=False, user_xattrs=True))
    assert user["changed"] is True
    assert module_runner("image", dict(args, use_epoch=True, xattrs="user"))["changed"] is False


def test_expected_digest(module_runner, store, src, tmp_path):
    top = Path(os.fsdecode(store.path))
    args = dict(store=str(top), ref="app", src=str(src))
    # An earlier add of another tree made the lock files and the cache: any other write shows.
    write_tree(tmp_path / "other", 2)
    module_runner("image", dict(args, ref="other", src=str(tmp_path / "other")))
    before = snapshot(top)
    for check in (True, False):
        r = module_runner("image", dict(args, expected_digest="00" * 32), check=check)
        assert r["failed"] and "not the expected" in r["msg"] and r["digest"] == tree_digest(src)
        assert snapshot(top) == before  # no object, image, ref or cache written
    r = module_runner("image", dict(args, expected_digest="not-a-digest"))
    assert r["failed"] and "64 hexadecimal digits" in r["msg"]
    # The sha256: prefix (as OCI tools and fsverity measure print digests) names the same digest.
    r = module_runner("image", dict(args, ref="prefixed", expected_digest="sha256:" + tree_digest(src).upper()))
    assert not r.get("failed") and r["digest"] == tree_digest(src)
    results = four_steps(module_runner, dict(args, expected_digest=tree_digest(src).upper()))
    assert results[1]["digest"] == store.read_ref("app")
    assert check_store(store)


@pytest.mark.oracle
@pytest.mark.parametrize("version", [0, 1])
def test_format_version_matches_c_mkcomposefs(module_runner, oracle, store, src, tmp_path, version):
    out = tmp_path / "c.cfs"
    res = oracle.run("mkcomposefs", "--digest-store=%s" % (tmp_path / "ds"), "--min-version=%d" % version,
                     src, out)
    assert res.returncode == 0, res.stderr
    want = fsverity_digest.digest_file(str(out)).hex()
    r = module_runner("image", dict(store=os.fsdecode(store.path), ref="v", src=str(src), format_version=version))
    assert not r.get("failed"), r.get("msg")
    assert r["digest"] == want


def test_format_versions_differ(module_runner, store, src):
    args = dict(store=os.fsdecode(store.path), ref="v", src=str(src))
    v0 = module_runner("image", dict(args, format_version=0))
    v1 = module_runner("image", dict(args, format_version=1))
    assert v1["changed"] and v0["digest"] != v1["digest"] == tree_digest(src, min_version=1)
    for result, version in ((v0, 0), (v1, 1)):
        with open(store.image_path(result["digest"]), "rb") as f:
            assert image_version(f.read()) == version


def test_dump_and_image_sources(module_runner, store, src, tmp_path):
    args = dict(store=os.fsdecode(store.path), src=str(src))
    first = module_runner("image", dict(args, ref="dir"))
    out = io.BytesIO()
    write_dump(read_image_file(os.fsdecode(store.image_path(first["digest"]))), out)
    dump = tmp_path / "tree.dump"
    dump.write_bytes(out.getvalue())
    results = four_steps(module_runner, dict(args, ref="dump", src=str(dump)))
    assert results[1]["image"]["source_kind"] == "dump" and results[1]["digest"] == first["digest"]
    assert not results[1]["image"]["image_written"]  # only the ref is new
    image = tmp_path / "copy.cfs"
    image.write_bytes(Path(os.fsdecode(store.image_path(first["digest"]))).read_bytes())
    results = four_steps(module_runner, dict(args, ref="image", src=str(image)))
    assert results[1]["image"]["source_kind"] == "image" and results[1]["digest"] == first["digest"]
    r = module_runner("image", dict(args, ref="image2", src=str(image), use_epoch=True))
    assert r["failed"] and "cannot apply to an existing image" in r["msg"]


def test_image_source_with_objects_from(module_runner, store, src, tmp_path):
    digest_store = tmp_path / "ds"
    image = tmp_path / "img.cfs"
    image.write_bytes(build_image(build_tree_from_directory(str(src), digest_store=str(digest_store))))
    args = dict(store=os.fsdecode(store.path), ref="x", src=str(image))
    r = module_runner("image", args)
    assert r["failed"] and "not in the store" in r["msg"]
    results = four_steps(module_runner, dict(args, objects_from=str(digest_store)))
    assert results[0]["image"]["objects_written"] == results[1]["image"]["objects_written"] > 0
    assert check_store(store)


def test_absent_four_steps(module_runner, store, src):
    top = Path(os.fsdecode(store.path))
    made = module_runner("image", dict(store=str(top), ref="app/v1", src=str(src)))
    args = dict(store=str(top), ref="app/v1", state="absent")
    results = four_steps(module_runner, args)
    assert results[0]["diff"] == results[1]["diff"] == {"before": {"ref": "app/v1", "digest": made["digest"]},
                                                        "after": {"ref": "app/v1", "digest": None}}
    assert results[2]["diff"]["before"] == results[2]["diff"]["after"] == {"ref": "app/v1", "digest": None}
    assert results[1]["removed"] and not results[2]["removed"]
    with pytest.raises(RefNotFound):
        store.read_ref("app/v1")
    assert not (top / "refs" / "app").exists()  # the emptied directory went too
    # The image and its objects stay until gc.
    assert os.path.exists(store.image_path(made["digest"])) and list(store.iter_objects())
    # No store at all: nothing to remove.
    r = module_runner("image", dict(args, store=str(top.parent / "nowhere")))
    assert r["changed"] is False and not r.get("failed")


def test_missing_store(module_runner, tmp_path, src):
    where = tmp_path / "later"
    args = dict(store=str(where), ref="app", src=str(src))
    r = module_runner("image", args)
    assert r["failed"] and "not a composefs store" in r["msg"] and "composefs.fleet.store" in r["msg"]
    # In check mode a store that the store module would create is planned as empty.
    r = module_runner("image", args, check=True)
    assert r["changed"] and not r.get("failed") and r["digest"] == tree_digest(src)
    assert not where.exists()
    # A non-empty directory that is no store is refused in both modes.
    where.mkdir()
    (where / "junk").write_text("x")
    for check in (True, False):
        r = module_runner("image", args, check=check)
        assert r["failed"] and "not a composefs store" in r["msg"]


@pytest.mark.parametrize("args, message", [
    (dict(ref="a"), "state is present but any of the following are missing: src, remote"),
    (dict(ref="a", src="/nonexistent/dir"), "no such file or directory"),
    (dict(ref="../a", src="/"), "contains '..'"),
    (dict(ref="a", src="/", skip_xattrs=True, user_xattrs=True), "contradict each other"),
    (dict(ref="a", src="/", xattrs="all", user_xattrs=True), "user_xattrs: true means xattrs: user"),
    (dict(ref="a", src="/", xattrs="bogus"), "xattrs"),
    (dict(ref="a", remote="https://127.0.0.1:9/s", xattrs="user"), "xattrs shapes an image built from src"),
    (dict(ref="a", src="/", format_version=2), "format_version"),
])
def test_bad_arguments(module_runner, store, args, message):
    r = module_runner("image", dict(args, store=os.fsdecode(store.path)))
    assert r["failed"] and message in r["msg"], r["msg"]
    assert store.list_refs() == [] and store.list_images() == []


@pytest.mark.parametrize("make_foreign, message", [
    (lambda top: os.chmod(top, 0o770), "is writable by its group (mode 0770)"),
    (lambda top: os.chown(top / "images", 4242, 4242), "images belongs to uid 4242"),
], ids=["group-writable", "foreign-owner"])
def test_foreign_or_writable_store_needs_allow_foreign_owner(module_runner, store, src, make_foreign, message):
    top = Path(os.fsdecode(store.path))
    make_foreign(top)
    args = dict(store=str(top), ref="app/v1", src=str(src))
    for state, check in (("present", True), ("present", False), ("absent", False)):
        r = module_runner("image", dict(args, state=state), check=check)
        assert r.get("failed") and message in r["msg"] and "allow_foreign_owner" in r["msg"], r
        assert "Traceback" not in r["msg"]
    with Store(top, notice=None, allow_foreign=True) as seen:
        assert seen.list_refs() == [] and seen.list_images() == [] and not list(seen.iter_objects())
    four_steps(module_runner, dict(args, allow_foreign_owner=True))
    r = module_runner("image", dict(args, state="absent", allow_foreign_owner=True))
    assert r["changed"] is True and r["removed"] is True, r
