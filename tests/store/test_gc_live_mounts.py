# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""gc and live mounts: the objects a mount reads are kept, or gc refuses; images are never read whole.

Every test here mounts for real (kernel tier) through our mount code, which
records each mount, or as plain erofs on a loop device.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from composefs_fleet import mount_record, mountinfo
from composefs_fleet.errors import StoreError, UnmountError
from composefs_fleet.mount import mount_composefs
from composefs_fleet.image_needs import image_objects
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_gc import collect

from store_fixtures import make_tree, store  # noqa: F401  (fixtures)

pytestmark = pytest.mark.kernel


def _objects(store: Store):
    return {h for h, _p, _st in store.iter_objects()}


def _needs(store: Store, digest: str):
    return set(image_objects(store.read_image(digest)).objects)


@pytest.fixture
def mounts():
    """Mount points to undo at teardown (records go with them)."""
    done = []
    yield done
    for where in reversed(done):
        for _ in range(4):
            top = mountinfo.top_mount(where)
            if top is None or not top.is_composefs():
                break
            try:
                mount_record.unmount(where)
            except UnmountError:
                # Busy: something else on this machine (another gc?) walks it right now.
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
                mount_record.remove_record(where)


def _two_images(store: Store, tmp_path: Path, make_tree, seed: int):
    """Images a and b of the store (a with objects of its own), and app.cfs: a copy of a outside the store."""
    make_tree(tmp_path / "a", seed)
    make_tree(tmp_path / "b", seed + 1)
    a = add_image(store, tmp_path / "a", "a").digest
    b = add_image(store, tmp_path / "b", "b").digest
    assert _needs(store, a) - _needs(store, b)
    app = tmp_path / "app.cfs"
    shutil.copyfile(store.image_path(a), app)
    return a, b, app


def _replace(app: Path, store: Store, digest: str) -> None:
    """Replace ``app`` by a copy of image ``digest``, as an update does (rename over it)."""
    shutil.copyfile(store.image_path(digest), app.with_name("new.cfs"))
    os.rename(app.with_name("new.cfs"), app)


def _mount(image, where: Path, store: Store, mounts, **kw):
    where.mkdir()
    mount_composefs(image, where, [store.objects_dir], record_dir="", **kw)
    mounts.append(where)


def test_store_image_deleted_after_mounting_makes_gc_refuse(store, tmp_path, make_tree, mounts):
    """Regression: the image file of a live mount gone, gc walked the overlay (redirects hidden), found
    nothing and deleted every object the mount reads."""
    make_tree(tmp_path / "a", 50)
    digest = add_image(store, tmp_path / "a", "a").digest
    need = _needs(store, digest)
    _mount(store.image_path(digest), tmp_path / "m", store, mounts)
    store.remove_ref("a")
    os.unlink(store.image_path(digest))
    with pytest.raises(StoreError, match=r"composefs mount on %s: its image %s is not in the store and .* cannot "
                       r"be read: No such file or directory \(deleted or moved after mounting\?\).*refusing"
                       % (tmp_path / "m", digest)):
        collect(store, tmp_grace=0)
    assert need <= _objects(store)


def test_image_replaced_after_mounting_keeps_the_mounted_one(store, tmp_path, make_tree, mounts):
    """Regression: gc listed whatever file was now at the recorded path (image b), and deleted image a
    and its objects, which the mount still reads."""
    a, b, app = _two_images(store, tmp_path, make_tree, 51)
    need_a = _needs(store, a)
    _mount(app, tmp_path / "m", store, mounts)
    _replace(app, store, b)
    store.remove_ref("a")
    result = collect(store, tmp_grace=0)
    assert a in store.list_images() and a in result.kept_images
    assert need_a <= _objects(store)
    assert any(str(tmp_path / "m") in m for m in result.mounted), result.mounted


def test_outside_image_replaced_after_mounting_makes_gc_refuse(store, tmp_path, make_tree, mounts, ours):
    """An image built outside the store (mkcomposefs --digest-store): listed from its file while the file
    has the recorded digest; once replaced, its objects are unknown: refuse."""
    make_tree(tmp_path / "src", 53)
    make_tree(tmp_path / "b", 54)
    other = add_image(store, tmp_path / "b", "b").digest
    app = tmp_path / "app.cfs"
    res = ours.run("mkcomposefs", "--digest-store=%s" % os.fsdecode(store.objects_dir), tmp_path / "src", app)
    assert res.returncode == 0, res.stderr
    need = _objects(store) - _needs(store, other)
    assert need
    _mount(app, tmp_path / "m", store, mounts)
    result = collect(store, tmp_grace=0)  # the file is intact: its objects are kept
    assert need <= _objects(store) and not result.removed_objects
    _replace(app, store, other)
    with pytest.raises(StoreError, match=r"now has digest %s \(replaced after mounting\?\), so its objects are "
                       r"unknown; refusing" % other):
        collect(store, tmp_grace=0)
    assert need <= _objects(store)


GC_RSS = """
import json, resource, sys, tracemalloc
from composefs_fleet.store import Store
from composefs_fleet.errors import UnmountError
from composefs_fleet.store_gc import collect
tracemalloc.start()
result = collect(Store.open(sys.argv[1], notice=None), tmp_grace=0)
print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "mounted": result.mounted,
                  "removed": result.removed_objects, "peak_alloc": tracemalloc.get_traced_memory()[1]}))
"""


def test_gc_does_not_read_a_loop_device_whole(store, tmp_path, make_tree, kernel_mount):
    """Regression: gc read every loop device into memory; an image with a 1 GiB tail (a partition, a
    loop device larger than its image) must cost only its metadata."""
    make_tree(tmp_path / "a", 55)
    digest = add_image(store, tmp_path / "a", "a").digest
    need = _needs(store, digest)
    big = tmp_path / "big.cfs"
    shutil.copyfile(store.image_path(digest), big)
    tail = 1 << 30
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) + tail)  # sparse: costs no disk
    kernel_mount.mount_erofs(big, tmp_path / "m")
    store.remove_ref("a")
    res = subprocess.run([sys.executable, "-c", GC_RSS, os.fsdecode(store.path)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert any("backing file %s" % big in m for m in out["mounted"]), out["mounted"]
    assert need <= _objects(store)
    # Reading the device into memory is what Python allocates: at most a fraction of the tail.
    assert out["peak_alloc"] < tail // 8, out
    # Pages of the mapped device also count as resident: 45 MB alone here, but up to 264 MB in
    # full test runs (unexplained; mapped page cache, not memory gc allocates).  Whole = 1 GiB.
    assert out["maxrss_kib"] * 1024 < tail // 2, out


def test_file_backed_erofs_replaced_after_mounting_is_read_from_its_tree(store, tmp_path, make_tree):
    """Regression: for an erofs mount of a file (Linux 6.12+), gc listed whatever file was now at the
    mount's source path; the mounted tree itself tells what it reads."""
    from composefs_fleet import mount_api as api

    a, b, app = _two_images(store, tmp_path, make_tree, 56)
    need_a = _needs(store, a)
    target = tmp_path / "m"
    target.mkdir()
    try:
        with api.FsContext("erofs") as ctx:
            ctx.set_string("source", str(app))
            ctx.set_flag("ro")
            ctx.create()
            mnt_fd = ctx.mount(api.MOUNT_ATTR_RDONLY)
    except api.MountError as exc:
        pytest.skip("no file-backed erofs on this kernel (Linux 6.12+): %s" % exc)
    try:
        api.move_mount(mnt_fd, target)
    finally:
        os.close(mnt_fd)
    try:
        _replace(app, store, b)
        store.remove_ref("a")
        result = collect(store, tmp_grace=0)
        assert any(str(target) in m for m in result.mounted), result.mounted
        assert need_a <= _objects(store)
    finally:
        api.umount(target)
