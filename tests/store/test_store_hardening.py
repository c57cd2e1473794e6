# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Issue 13, store: symlinks inside a store are refused, never followed; StrictModes ownership;
private (0700) new stores; meta.json that is hostile; the store's internal structure.

Only names that existed before the issue are imported at the top, so that this file runs (and fails,
test by test) against the old code too.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from composefs_fleet.errors import ComposefsError, StoreError
from composefs_fleet.image_needs import image_objects
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_gc import collect

from store_fixtures import StoreCli, make_tree, store_cmd  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]


def new_store(tmp_path: Path, make_tree, refs=("app",)) -> Store:
    store, _ = Store.init(tmp_path / "s", notice=None)
    for i, ref in enumerate(refs):
        src = tmp_path / ("src-%s" % ref)
        make_tree(src, 300 + i)
        add_image(store, src, ref)
    return store


def plant_link(store_dir: Path, name: str, target: Path) -> Path:
    """Move the store's directory ``name`` aside (if any) and put a symlink to ``target`` in its place."""
    real = store_dir / (name + ".moved")
    if (store_dir / name).exists():
        os.rename(store_dir / name, real)
    os.symlink(target, store_dir / name)
    return real


def outside_dir(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".precious").write_bytes(b"not the store's")  # what gc's debris sweep would take
    return outside


def damage_an_object(store: Store):
    """Flip the first byte of a non-empty object: (its hex digest, its path)."""
    hexd, path, _st = next(h for h in store.iter_objects() if h[2].st_size > 0)
    data = bytearray(Path(os.fsdecode(path)).read_bytes())
    data[0] ^= 1
    Path(os.fsdecode(path)).write_bytes(bytes(data))
    return hexd, path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- A: symlinks where store directories belong ---------------------------------------

@pytest.mark.parametrize("name", ["objects", "images", "refs", "cache", "damaged"])
def test_open_refuses_a_symlinked_store_directory(tmp_path, make_tree, name):
    new_store(tmp_path, make_tree)
    (tmp_path / "s" / "damaged").mkdir()
    plant_link(tmp_path / "s", name, outside_dir(tmp_path))
    with pytest.raises(StoreError, match="%s is a symbolic link where a directory belongs" % name):
        Store.open(tmp_path / "s", notice=None)


def test_gc_refuses_a_symlinked_cache_and_deletes_nothing_outside(tmp_path, make_tree, store_cmd):
    new_store(tmp_path, make_tree)
    assert (tmp_path / "s" / "cache").is_dir()
    outside = outside_dir(tmp_path)
    plant_link(tmp_path / "s", "cache", outside)
    with pytest.raises(StoreError, match="cache is a symbolic link"):
        collect(Store(tmp_path / "s", notice=None))  # not even through a store that was never checked
    res = StoreCli(tmp_path / "s").run("gc")
    assert res.returncode == 1 and "cache is a symbolic link" in res.stderr and "Traceback" not in res.stderr
    assert (outside / ".precious").read_bytes() == b"not the store's"


def test_cache_writes_stay_in_the_directory_opened(tmp_path, make_tree):
    """cache/ swapped for a symlink after the store was opened: the digest cache and the image memo
    are written into the directory the store opened, never through the link."""
    store = new_store(tmp_path, make_tree)
    store = Store.open(tmp_path / "s", notice=None)
    outside = outside_dir(tmp_path)
    real = plant_link(tmp_path / "s", "cache", outside)
    for name in os.listdir(real):
        os.unlink(real / name)
    src = tmp_path / "later"
    make_tree(src, 399)
    os.utime(src / "f00", (1, 1))
    add_image(store, src, "later")
    assert sorted(os.listdir(outside)) == [".precious"]
    assert "images" in os.listdir(real)


def test_gc_deletes_through_the_directories_it_opened(tmp_path, make_tree):
    """images/ swapped for a symlink to a look-alike after opening: gc works on the real images/ and
    deletes nothing in the look-alike (the old gc deleted the copy there, and every object of the
    referenced image, which the look-alike does not hold)."""
    store = new_store(tmp_path, make_tree, refs=("app", "old"))
    old = store.remove_ref("old")
    keep = store.read_ref("app")
    store = Store.open(tmp_path / "s", notice=None)
    outside = outside_dir(tmp_path)
    shutil.copy(tmp_path / "s" / "images" / old, outside / old)
    real = plant_link(tmp_path / "s", "images", outside)
    result = collect(store)
    assert result.removed_images == [old]
    assert (outside / old).exists() and (outside / ".precious").exists()
    assert sorted(os.listdir(real)) == [keep]
    os.unlink(tmp_path / "s" / "images")
    os.rename(real, tmp_path / "s" / "images")
    needed = image_objects(Store.open(tmp_path / "s", notice=None).read_image(keep)).objects
    assert all(store.object_state(h, size) for h, size in needed.items())


def test_fsck_repair_never_moves_into_a_symlinked_damaged(tmp_path, make_tree):
    store = new_store(tmp_path, make_tree)
    hexd, path = damage_an_object(store)
    outside = outside_dir(tmp_path)
    plant_link(tmp_path / "s", "damaged", outside)
    res = StoreCli(tmp_path / "s").run("fsck", "--repair")
    assert res.returncode == 1 and "damaged is a symbolic link" in res.stderr, res.stderr
    assert sorted(os.listdir(outside)) == [".precious"]
    assert Path(os.fsdecode(path)).exists()


# -- B: ownership (StrictModes) and modes ------------------------------------------------

@pytest.mark.parametrize("where", ["", "objects", "refs"])
def test_foreign_owner_refused_unless_allowed(tmp_path, make_tree, where):
    new_store(tmp_path, make_tree)
    os.chown(tmp_path / "s" / where, 4242, 4242)
    with pytest.raises(StoreError, match="belongs to uid 4242"):
        Store.open(tmp_path / "s", notice=None)
    Store.open(tmp_path / "s", notice=None, allow_foreign=True).list_images()
    cli = StoreCli(tmp_path / "s")
    res = cli.run("ls")
    assert res.returncode == 1 and "uid 4242" in res.stderr and "--allow-foreign-owner" in res.stderr
    assert cli.run("ls", "--allow-foreign-owner").returncode == 0
    assert cli.run("--allow-foreign-owner", "gc", "--dry-run").returncode == 0


@pytest.mark.parametrize("where,bits,who", [("", 0o020, "its group"), ("images", 0o002, "others"),
                                            ("cache", 0o022, "group and others")])
def test_group_or_other_writable_refused_unless_allowed(tmp_path, make_tree, where, bits, who):
    new_store(tmp_path, make_tree)
    target = tmp_path / "s" / where
    os.chmod(target, mode_of(target) | bits)
    with pytest.raises(StoreError, match="writable by %s" % who):
        Store.open(tmp_path / "s", notice=None)
    Store.open(tmp_path / "s", notice=None, allow_foreign=True)


def test_new_store_is_private(tmp_path, make_tree):
    old_umask = os.umask(0)
    try:
        store = new_store(tmp_path, make_tree)
    finally:
        os.umask(old_umask)
    for sub in ("", "objects", "images", "refs", "cache"):
        assert mode_of(tmp_path / "s" / sub) == 0o700, sub
    empty = tmp_path / "empty"
    empty.mkdir()
    os.chmod(empty, 0o777)  # an empty directory that becomes a store gets the store's mode
    Store.init(empty, notice=None)
    assert mode_of(empty) == 0o700
    Store.open(store.path, notice=None)


def test_shared_layout_keeps_the_c_tools_modes(tmp_path, make_tree):
    store, created = Store.init(tmp_path / "s", notice=None, mode=0o755)
    assert created
    src = tmp_path / "src"
    make_tree(src, 310)
    add_image(store, src, "app")
    for sub in ("", "objects", "images", "refs", "cache"):
        assert mode_of(tmp_path / "s" / sub) == 0o755, sub
    Store.open(tmp_path / "s", notice=None)  # 0755 passes the ownership check
    res = StoreCli(tmp_path / "c").run("init", "--shared-layout")
    assert res.returncode == 0, res.stderr
    assert mode_of(tmp_path / "c") == mode_of(tmp_path / "c" / "objects") == 0o755
    assert StoreCli(tmp_path / "p").run("init").returncode == 0
    assert mode_of(tmp_path / "p") == mode_of(tmp_path / "p" / "objects") == 0o700
    assert "--shared-layout" in StoreCli(tmp_path / "p").run("init", "--help").stdout
    assert "--allow-foreign-owner" in StoreCli(tmp_path / "p").run("--help").stdout


def test_non_empty_group_writable_directory_is_not_adopted(tmp_path):
    where = tmp_path / "s"
    where.mkdir()
    (where / "something").write_text("x")
    os.chmod(where, 0o775)
    with pytest.raises(StoreError, match="writable by its group"):
        Store.init(where, notice=None)
    assert mode_of(where) == 0o775 and not (where / "meta.json").exists()


# -- C: meta.json ------------------------------------------------------------------------

def test_deeply_nested_meta_json_is_a_clear_error(tmp_path, store_cmd):
    Store.init(tmp_path / "s", notice=None)
    (tmp_path / "s" / "meta.json").write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(StoreError, match="meta.json.*nested too deeply"):
        Store.open(tmp_path / "s", notice=None)
    res = StoreCli(tmp_path / "s").run("ls")
    assert res.returncode == 1 and "nested too deeply" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("body", ['{"format": true, "digest": "sha256"}', '{"format": 1.0, "digest": "sha256"}',
                                  '["format", 1]', '{"digest": "sha256"}'])
def test_meta_json_format_must_be_an_integer(tmp_path, body):
    Store.init(tmp_path / "s", notice=None)
    (tmp_path / "s" / "meta.json").write_text(body)
    with pytest.raises(StoreError, match="meta.json"):
        Store.open(tmp_path / "s", notice=None)


@pytest.mark.timeout(60)
def test_meta_json_fifo_does_not_hang(tmp_path):
    Store.init(tmp_path / "s", notice=None)
    os.unlink(tmp_path / "s" / "meta.json")
    os.mkfifo(tmp_path / "s" / "meta.json")
    with pytest.raises(StoreError, match="meta.json is not a regular file"):
        Store.open(tmp_path / "s", notice=None)


# -- D: structure --------------------------------------------------------------------------

def test_no_module_imports_private_names_and_store_does_not_import_store_add():
    offenders = []
    for path in sorted(p for top in ("plugins", "cli", "agent") for p in (REPO / top).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                offenders += ["%s: %s.%s" % (path.relative_to(REPO), node.module, a.name) for a in node.names
                              if a.name.startswith("_")]
                if path.name == "store.py" and "module_utils" in path.parts and (node.module or "").endswith("store_add"):
                    offenders.append("store.py imports store_add")
    assert offenders == []


def test_one_image_objects_method(tmp_path, make_tree):
    store = new_store(tmp_path, make_tree)
    hexd = store.read_ref("app")
    lean = store.image_objects(hexd)
    tree = image_objects(store.read_image(hexd))
    assert lean.objects == tree.objects and lean.objects and lean.logical_bytes == tree.logical_bytes
    assert lean.image_bytes == os.path.getsize(store.image_path(hexd))


def test_shared_read_only_lock_creates_nothing(tmp_path):
    missing = Store(tmp_path / "not-yet", notice=None)
    with missing.lock.shared_read_only():
        pass
    assert not (tmp_path / "not-yet").exists()
    store, _ = Store.init(tmp_path / "s", notice=None)
    with store.lock.shared_read_only():
        pass
    assert not (tmp_path / "s" / "lock").exists()
    with store.lock.shared():
        with store.lock.shared_read_only():  # shared with a running add
            pass
    assert (tmp_path / "s" / "lock").exists()


def test_force_does_not_override_the_owner_check(tmp_path):
    from composefs_fleet import store_admin

    Store.init(tmp_path / "s", notice=None)
    os.chown(tmp_path / "s", 4242, 4242)
    with pytest.raises(StoreError, match="belongs to uid 4242"):
        store_admin.plan_removal(Store(tmp_path / "s", notice=None))
    with pytest.raises(StoreError, match="not a composefs store"):
        Store.open(tmp_path / "missing", notice=None)


@pytest.mark.parametrize("name", ["lock", "gate.lock", "gc.lock"])
def test_lock_files_are_never_opened_through_a_link(tmp_path, name):
    store, _ = Store.init(tmp_path / "s", notice=None)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / "s" / name)
    with pytest.raises(ComposefsError, match="%s of the store is a symbolic link" % name):
        with store.lock.collector():
            with store.lock.exclusive():
                pass
    assert target.read_bytes() == b"keep"


def test_dropped_stores_keep_no_descriptors(tmp_path, make_tree):
    new_store(tmp_path, make_tree)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        store = Store.open(tmp_path / "s", notice=None)
        with store.lock.shared():
            store.list_refs()
        del store
    assert len(os.listdir("/proc/self/fd")) == before


def test_fsck_repair_never_moves_into_a_foreign_damaged(tmp_path, make_tree):
    store = new_store(tmp_path, make_tree)
    hexd, path = damage_an_object(store)
    os.mkdir(tmp_path / "s" / "damaged", 0o700)
    os.chown(tmp_path / "s" / "damaged", 4242, 4242)
    res = StoreCli(tmp_path / "s").run("fsck", "--repair")
    assert res.returncode == 1 and "uid 4242" in res.stderr, res.stderr
    assert os.listdir(tmp_path / "s" / "damaged") == []
    assert Path(os.fsdecode(path)).exists()


def test_agent_quarantine_never_moves_into_a_foreign_directory(tmp_path, make_tree):
    from composefs_fleet.objects import quarantine_object
    from composefs_fleet.safe_dirs import UnsafePathError

    store = new_store(tmp_path, make_tree)
    hexd, path, st = next(h for h in store.iter_objects() if h[2].st_size > 0)
    os.mkdir(tmp_path / "s" / "damaged", 0o700)
    os.chown(tmp_path / "s" / "damaged", 4242, 4242)
    with pytest.raises(UnsafePathError, match="uid 4242"):
        quarantine_object(store.objects_dir, hexd, (st.st_dev, st.st_ino), store.path, b"damaged")
    assert os.listdir(tmp_path / "s" / "damaged") == []
    assert Path(os.fsdecode(path)).exists()
