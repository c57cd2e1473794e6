# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The object store's core API: layout, names, add, fsck, gc, cache, stats, locks."""
from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from composefs_fleet import fsverity_digest
from composefs_fleet.dump import write_dump
from composefs_fleet.erofs_reader import read_image_file
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.image_needs import image_objects
from composefs_fleet.errors import RefNotFound, StoreError
from composefs_fleet.store import Store
from composefs_fleet.store_names import check_digest_hex, split_ref_name
from composefs_fleet.store_add import add_image
from composefs_fleet.store_stats import stats
from composefs_fleet.store_fsck import check
from composefs_fleet.store_gc import collect, objects_from_mounted_tree

from store_fixtures import make_tree, store, store_cmd  # noqa: F401  (fixtures)


def expected_digest(src: Path) -> str:
    return fsverity_digest.digest_bytes(build_image(build_tree_from_directory(str(src)))).hex()


def all_objects(store: Store):
    return sorted(h for h, _p, _st in store.iter_objects())


# -- layout and metadata -----------------------------------------------------------

def test_init_layout_and_reopen(tmp_path):
    s, created = Store.init(tmp_path / "s", notice=None)
    assert created
    for sub in ("objects", "images", "refs"):
        assert (tmp_path / "s" / sub).is_dir()
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta == {"format": 1, "digest": "sha256"}
    again, created = Store.init(tmp_path / "s", notice=None)
    assert not created
    Store.open(tmp_path / "s", notice=None)


def test_open_refuses_non_store_newer_format_and_other_digest(tmp_path):
    with pytest.raises(StoreError, match="not a composefs store.*init"):
        Store.open(tmp_path, notice=None)
    Store.init(tmp_path / "s", notice=None)
    meta = tmp_path / "s" / "meta.json"
    meta.write_text(json.dumps({"format": 2, "digest": "sha256"}))
    with pytest.raises(StoreError, match="format 2 is newer than this tool supports"):
        Store.open(tmp_path / "s", notice=None)
    meta.write_text(json.dumps({"format": 1, "digest": "sha512"}))
    with pytest.raises(StoreError, match="sha512"):
        Store.open(tmp_path / "s", notice=None)
    meta.write_text("{broken")
    with pytest.raises(StoreError, match="damaged"):
        Store.open(tmp_path / "s", notice=None)


def test_objects_dir_symlink_refused(tmp_path):
    Store.init(tmp_path / "s", notice=None)
    os.rename(tmp_path / "s" / "objects", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "s" / "objects")
    with pytest.raises(StoreError, match="objects is a symbolic link where a directory belongs: refused"):
        Store.open(tmp_path / "s", notice=None)


# -- names -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/", "../x", "a/../b", ".", "..", "a/.hidden", ".x",
                                  "a\nb", "a\0b", "x" * 256, "a/" * 600])
def test_bad_ref_names_refused(store, name):
    with pytest.raises(StoreError):
        split_ref_name(name)
    with pytest.raises(StoreError):
        store.write_ref(name, "0" * 64)


@pytest.mark.parametrize("name", ["a", "app/v1", "a-b_c.1/x@y", "deep/er/and/deeper", "spaces are fine"])
def test_good_ref_names_round_trip(store, name):
    store.write_ref(name, "ab" * 32)
    assert store.read_ref(name) == "ab" * 32
    assert name in store.list_refs()
    assert store.remove_ref(name) == "ab" * 32
    assert store.list_refs() == []
    # Directories made for the ref are gone again.
    assert os.listdir(store.refs_dir) == []


@pytest.mark.parametrize("bad", ["A" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, "g" * 64, "a" * 62 + "/a"])
def test_digest_names_validated_before_paths(store, bad):
    with pytest.raises(StoreError, match="invalid digest"):
        check_digest_hex(bad)
    with pytest.raises(StoreError):
        store.object_path(bad)
    with pytest.raises(StoreError):
        store.image_path(bad)
    with pytest.raises(StoreError):
        store.write_ref("x", bad)


def test_ref_symlink_tricks_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(store.refs_dir, b"evil"))
    with pytest.raises(StoreError, match="not a directory"):
        store.write_ref("evil/x", "ab" * 32)
    assert list(outside.iterdir()) == []
    target = outside / "file"
    target.write_text("cd" * 32 + "\n")
    os.symlink(target, os.path.join(store.refs_dir, b"link"))
    with pytest.raises(StoreError, match="symbolic link"):
        store.read_ref("link")
    assert "link" not in store.list_refs()
    # Replacing a planted symlink with a ref never writes through it.
    store.write_ref("link", "ab" * 32)
    assert target.read_text() == "cd" * 32 + "\n"
    assert store.read_ref("link") == "ab" * 32


def test_ref_prefix_conflicts(store):
    store.write_ref("a/b", "ab" * 32)
    with pytest.raises(StoreError, match="refs named a/"):
        store.write_ref("a", "ab" * 32)
    with pytest.raises(StoreError, match="not a directory"):
        store.write_ref("a/b/c", "ab" * 32)
    with pytest.raises(RefNotFound):
        store.read_ref("nope/x")
    with pytest.raises(RefNotFound):
        store.remove_ref("nope")


def test_missing_ref_names_the_store_and_close_matches(store):
    with pytest.raises(RefNotFound) as exc:
        store.read_ref("app/v1")
    assert str(exc.value) == "no ref app/v1 in the store %s (it has no refs)" % os.fsdecode(store.path)
    for name in ("app/v1", "app/v2", "db/main"):
        store.write_ref(name, "ab" * 32)
    with pytest.raises(RefNotFound) as exc:
        store.read_ref("app/v3")
    assert str(exc.value).startswith("no ref app/v3 in the store %s; close matches: " % os.fsdecode(store.path))
    assert "app/v1" in str(exc.value) and "app/v2" in str(exc.value) and "db/main" not in str(exc.value)
    with pytest.raises(RefNotFound) as exc:
        store.read_ref("zzzzzzzz")
    assert "none of its 3 refs is close" in str(exc.value)


# -- add ---------------------------------------------------------------------------

def test_add_directory_matches_mkcomposefs_and_fsck_clean(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 1)
    result = add_image(store, src, "app/v1")
    assert result.digest == expected_digest(src)
    assert store.read_ref("app/v1") == result.digest
    image = Path(os.fsdecode(store.image_path(result.digest)))
    assert fsverity_digest.digest_file(str(image)).hex() == result.digest
    needed = image_objects(read_image_file(str(image)))
    assert needed.objects and sorted(needed.objects) == all_objects(store)
    for hexd in needed.objects:
        assert fsverity_digest.digest_file(store.object_path(hexd)).hex() == hexd
    report = check(store)
    assert report.clean, report.errors
    assert report.objects == len(needed.objects) and report.images == 1 and report.refs == 1


def test_same_content_twice_is_stored_once(store, tmp_path, make_tree):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 7)
    make_tree(b, 7)  # same content, other inodes
    r1 = add_image(store, a, "one", use_epoch=True)  # mtimes differ, contents do not
    objects = all_objects(store)
    r2 = add_image(store, b, "two", use_epoch=True)
    assert r1.digest == r2.digest and r2.objects_written == 0 and not r2.image_written
    assert all_objects(store) == objects
    assert store.list_images() == [r1.digest]


def test_ref_moves_to_new_image(store, tmp_path, make_tree):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 1)
    make_tree(b, 2)
    r1 = add_image(store, a, "app")
    r2 = add_image(store, b, "app")
    assert r2.previous == r1.digest and store.read_ref("app") == r2.digest


def test_add_dump_and_image_sources(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 3)
    first = add_image(store, src, "dir")
    # A dump of the same tree builds the same image; its objects are already here.
    out = io.BytesIO()
    write_dump(read_image_file(os.fsdecode(store.image_path(first.digest))), out)
    dump = tmp_path / "tree.dump"
    dump.write_bytes(out.getvalue())
    r = add_image(store, dump, "dump")
    assert r.digest == first.digest and r.source_kind == "dump"
    # An existing image file is stored as it is.
    image = tmp_path / "copy.cfs"
    image.write_bytes(Path(os.fsdecode(store.image_path(first.digest))).read_bytes())
    r = add_image(store, image, "image")
    assert r.digest == first.digest and r.source_kind == "image"
    # stdin dump
    r = add_image(store, "-", "stdin", stdin=io.BytesIO(out.getvalue()))
    assert r.digest == first.digest


def test_dump_with_missing_objects_needs_objects_from(tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 4)
    digest_store = tmp_path / "ds"
    root = build_tree_from_directory(str(src), digest_store=str(digest_store))
    image = tmp_path / "img.cfs"
    image.write_bytes(build_image(root))
    store, _ = Store.init(tmp_path / "s", notice=None)
    with pytest.raises(StoreError, match="not in the store.*--objects-from"):
        add_image(store, image, "x")
    assert store.list_images() == [] and store.list_refs() == []
    r = add_image(store, image, "x", objects_from=digest_store)
    assert r.objects_written == r.objects > 0
    assert check(store).clean
    # A foreign object with the wrong content is refused, never stored.
    store2, _ = Store.init(tmp_path / "s2", notice=None)
    victim = next(p for p in digest_store.rglob("*") if p.is_file())
    victim.write_bytes(b"evil" * 100)
    with pytest.raises(StoreError, match="does not hold the content its name says"):
        add_image(store2, image, "x", objects_from=digest_store)
    assert all_objects(store2) == [] or victim.parent.name + victim.name not in all_objects(store2)


def test_add_refuses_bad_sources(store, tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        add_image(store, tmp_path / "missing", "x")
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "dlink")
    with pytest.raises(StoreError, match="symbolic link to a directory"):
        add_image(store, tmp_path / "dlink", "x")
    (tmp_path / "garbage").write_bytes(b"not a dump\n")
    with pytest.raises(Exception):
        add_image(store, tmp_path / "garbage", "x")
    with pytest.raises(StoreError):
        add_image(store, tmp_path / "d", "../x")
    assert store.list_refs() == [] and store.list_images() == []


# -- digest cache ------------------------------------------------------------------

def test_digest_cache_skips_quiet_files_and_sees_changes(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 5)
    time.sleep(1.1)  # older than the racy window: cacheable
    first = add_image(store, src, "v1")
    assert first.files_hashed > 0 and first.cache_hits == 0
    second = add_image(store, src, "v1")
    assert second.files_hashed == 0 and second.cache_hits == first.files_hashed
    assert second.digest == first.digest
    # Same size, mtime restored: only ctime tells -- and it must.
    victim = next(p for p in sorted(src.rglob("f*")) if p.is_file() and p.stat().st_size > 64)
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = add_image(store, src, "v1")
    assert third.files_hashed == 1
    assert third.digest == expected_digest(src) != first.digest
    assert check(store).clean


def test_racy_files_are_not_cached(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 6)
    add_image(store, src, "v1")  # files were just written: not recorded
    again = add_image(store, src, "v1")
    assert again.cache_hits == 0 and again.files_hashed > 0


def test_damaged_cache_is_ignored(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 8)
    time.sleep(1.1)
    first = add_image(store, src, "v1")
    cache = Path(os.fsdecode(store.cache_path))
    raw = cache.read_bytes()
    # Flip a digest character: the checksum no longer matches, nothing is trusted.
    pos = raw.index(b"\n", 40) - 3
    cache.write_bytes(raw[:pos] + (b"0" if raw[pos:pos + 1] != b"0" else b"1") + raw[pos + 1:])
    again = add_image(store, src, "v1")
    assert again.cache_hits == 0 and again.digest == first.digest


def test_cache_hit_needs_the_object(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 9)
    time.sleep(1.1)
    first = add_image(store, src, "v1")
    store.remove_ref("v1")
    collect(store, tmp_grace=0)
    assert all_objects(store) == []
    again = add_image(store, src, "v1")
    assert again.cache_hits == 0 and again.digest == first.digest
    assert check(store).clean


# -- fsck ------------------------------------------------------------------------

def _one_object(store):
    hexd, path, _st = next(iter(store.iter_objects()))
    return hexd, Path(os.fsdecode(path))


def test_fsck_finds_and_repairs_a_damaged_object(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 10)
    r = add_image(store, src, "v1")
    hexd, path = _one_object(store)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    report = check(store)
    assert not report.clean
    assert any(hexd[2:] in e and "damaged" in e for e in report.errors)
    repaired = check(store, repair=True)
    assert repaired.moved and not path.exists()
    assert len(list(Path(os.fsdecode(store.damaged_dir)).iterdir())) == 1
    assert any("missing" in e for e in repaired.errors)  # the image now misses it
    again = add_image(store, src, "v1")
    assert again.digest == r.digest and again.objects_written == 1
    assert check(store).clean


def test_fsck_reports_strays_symlinks_missing_and_dangling(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 11)
    add_image(store, src, "v1")
    hexd, path = _one_object(store)
    path.unlink()
    (Path(os.fsdecode(store.objects_dir)) / "zz").mkdir()
    os.makedirs(os.path.join(store.objects_dir, b"ab"), exist_ok=True)
    link = os.path.join(store.objects_dir, b"ab", b"d" * 62)
    os.symlink("/etc/passwd", link)
    store.write_ref("dangling", "ef" * 32)
    (Path(os.fsdecode(store.objects_dir)) / ".tmpdebris").write_bytes(b"x")
    report = check(store)
    text = "\n".join(report.errors)
    assert "missing" in text and "zz" in text and "not a regular file" in text
    assert "ref dangling: image" in text and "is missing" in text
    assert any(".tmpdebris" in n for n in report.notes)
    check(store, repair=True)
    assert not os.path.lexists(link)


def test_fsck_damaged_image(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 12)
    r = add_image(store, src, "v1")
    image = Path(os.fsdecode(store.image_path(r.digest)))
    image.write_bytes(image.read_bytes()[:-1] + b"\x01")
    report = check(store)
    assert not report.clean and any("images/" + r.digest in e for e in report.errors)
    assert any("ref v1" in e for e in report.errors)
    # Adding the source again replaces the damaged image with a good one.
    again = add_image(store, src, "v1")
    assert again.digest == r.digest and again.image_written
    assert check(store).clean


# -- gc --------------------------------------------------------------------------

def test_gc_keeps_reachable_removes_the_rest(store, tmp_path, make_tree):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 20, shared_from=1)
    make_tree(b, 21, shared_from=1)
    ra = add_image(store, a, "a")
    rb = add_image(store, b, "b")
    need_a = set(image_objects(store.read_image(ra.digest)).objects)
    need_b = set(image_objects(store.read_image(rb.digest)).objects)
    assert need_a & need_b
    before = set(all_objects(store))
    dry = collect(store, dry_run=True, tmp_grace=0)
    assert dry.removed_objects == [] and dry.removed_images == []
    store.remove_ref("a")
    dry = collect(store, dry_run=True, tmp_grace=0)
    assert set(dry.removed_objects) == need_a - need_b and dry.removed_images == [ra.digest]
    assert set(all_objects(store)) == before  # dry run removed nothing
    real = collect(store, tmp_grace=0)
    assert set(real.removed_objects) == need_a - need_b
    assert set(all_objects(store)) == need_b
    assert store.list_images() == [rb.digest]
    assert check(store).clean


def test_gc_refuses_with_a_damaged_ref(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 22)
    r = add_image(store, src, "good")
    store.write_ref("bad", r.digest)
    store.remove_ref("good")
    (Path(os.fsdecode(store.refs_dir)) / "bad").write_text("garbage\n")
    with pytest.raises(StoreError, match="ref bad is damaged.*before collecting garbage"):
        collect(store, tmp_grace=0)
    assert store.list_images() == [r.digest] and all_objects(store)


def test_gc_temp_files_and_grace(store, tmp_path):
    objects = Path(os.fsdecode(store.objects_dir))
    fresh = objects / ".tmpfresh"
    old = objects / ".tmpold"
    fresh.write_bytes(b"x")
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    image_tmp = Path(os.fsdecode(store.images_dir)) / ".tmpimg"
    image_tmp.write_bytes(b"x")
    collect(store)
    assert not old.exists() and not image_tmp.exists()
    assert fresh.exists()  # a C mkcomposefs may still be writing it
    collect(store, tmp_grace=0)
    assert not fresh.exists()


def test_gc_waits_for_an_add_in_flight(store, tmp_path, store_cmd):
    # An add holds the shared lock and has written an object no ref names yet.
    orphan = "12" * 32
    obj = Path(os.fsdecode(store.object_path(orphan)))
    with store.lock.shared():
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(b"in flight")
        proc = subprocess.Popen(store_cmd + ["--repo", os.fsdecode(store.path), "gc"],
                                stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stderr.readline()
            assert "waiting for the store lock" in line
            assert obj.exists() and proc.poll() is None
        except BaseException:
            proc.kill()
            raise
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not obj.exists() and "removed 0 images (0 B), 1 objects" in out


@pytest.mark.kernel
def test_gc_keeps_mounted_images(store, tmp_path, make_tree, kernel_mount):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 30)
    make_tree(b, 31)
    ra = add_image(store, a, "a")
    rb = add_image(store, b, "b")
    need_a = set(image_objects(store.read_image(ra.digest)).objects)
    need_b = set(image_objects(store.read_image(rb.digest)).objects)
    # a: mounted from the store itself; b: from a copy outside the store.
    kernel_mount.mount_erofs(Path(os.fsdecode(store.image_path(ra.digest))), tmp_path / "ma")
    copy = tmp_path / "copy.cfs"
    copy.write_bytes(Path(os.fsdecode(store.image_path(rb.digest))).read_bytes())
    kernel_mount.mount_composefs(copy, tmp_path / "mb", Path(os.fsdecode(store.objects_dir)))
    copy.unlink()  # still mounted: gc must read it through its loop device
    store.remove_ref("a")
    store.remove_ref("b")
    result = collect(store, tmp_grace=0)
    assert len(result.mounted) >= 2
    assert ra.digest in store.list_images() and rb.digest not in store.list_images()
    assert need_a | need_b <= set(all_objects(store))
    kernel_mount.unmount_all()
    collect(store, tmp_grace=0)
    assert all_objects(store) == [] and store.list_images() == []


@pytest.mark.kernel
def test_objects_from_a_mounted_tree(store, tmp_path, make_tree, kernel_mount):
    src = tmp_path / "src"
    make_tree(src, 32)
    r = add_image(store, src, "a")
    mnt = kernel_mount.mount_erofs(Path(os.fsdecode(store.image_path(r.digest))), tmp_path / "m")
    assert objects_from_mounted_tree(os.fsencode(mnt)) == set(image_objects(store.read_image(r.digest)).objects)


# -- stats -------------------------------------------------------------------------

def test_stats_sharing(store, tmp_path, make_tree):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 40, shared_from=2)
    make_tree(b, 41, shared_from=2)
    ra = add_image(store, a, "a")
    rb = add_image(store, b, "b")
    na = image_objects(store.read_image(ra.digest))
    nb = image_objects(store.read_image(rb.digest))
    shared = set(na.objects) & set(nb.objects)
    data = stats(store)
    assert data["objects"] == len(set(na.objects) | set(nb.objects))
    assert data["images"] == 2 and data["refs"] == 2
    assert data["shared_objects"] == len(shared)
    unique = sum(s for h, s in {**na.objects, **nb.objects}.items())
    assert data["object_bytes"] == unique
    assert data["logical_bytes"] == na.logical_bytes + nb.logical_bytes
    assert data["saved_bytes"] == na.logical_bytes + nb.logical_bytes - unique > 0


@pytest.mark.kernel
def test_gc_keeps_images_mounted_by_fd_and_refuses_unknown_mounts(store, tmp_path, make_tree, kernel_mount):
    """Our mounts hand EROFS to overlayfs as a detached fd: no loop device and
    no erofs mount shows the image, only the mount record does."""
    from composefs_fleet.mount import mount_composefs

    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 40)
    make_tree(b, 41)
    ra = add_image(store, a, "a")
    rb = add_image(store, b, "b")
    need_a = set(image_objects(store.read_image(ra.digest)).objects)
    ma, mb = tmp_path / "ma", tmp_path / "mb"
    ma.mkdir()
    mb.mkdir()
    mounted = []
    try:
        mount_composefs(store.image_path(ra.digest), ma, [store.objects_dir])
        mounted.append(ma)
        store.remove_ref("a")
        result = collect(store, tmp_grace=0)
        assert ra.digest in store.list_images(), "gc removed the image of a live mount"
        assert need_a <= set(all_objects(store))
        assert any(str(ma) in where for where in result.mounted), result.mounted
        # A composefs mount of this store without a record: its image is unknown.
        mount_composefs(store.image_path(rb.digest), mb, [store.objects_dir], record_dir=None)
        mounted.append(mb)
        store.remove_ref("b")
        with pytest.raises(StoreError, match="no mount record"):
            collect(store, tmp_grace=0)
        assert rb.digest in store.list_images()
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", str(where)], check=True)
    collect(store, tmp_grace=0)
    assert all_objects(store) == [] and store.list_images() == []
