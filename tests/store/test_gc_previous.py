# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""gc keeps the image a live mount showed before its last switch (and its objects) until the mount moves
again, so that a rollback works offline; ``composefs-store gc`` says what it kept for that reason.

Kernel tier: real mounts through our mount code (switching with ``replace``), each test with its own
mount history directory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from composefs_fleet import mount_history, mount_record, mountinfo
from composefs_fleet.errors import UnmountError
from composefs_fleet.mount import mount_composefs
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_gc import collect

from store_fixtures import image_needs as _needs, make_tree, store, store_cmd  # noqa: F401  (fixtures)
from store_fixtures import stored_objects as _objects

pytestmark = pytest.mark.kernel


@pytest.fixture
def where(tmp_path):
    """A mount point, every composefs mount stacked on it undone at teardown."""
    target = tmp_path / "m"
    target.mkdir()
    yield target
    for _ in range(8):
        top = mountinfo.top_mount(target)
        if top is None or not top.is_composefs():
            break
        try:
            mount_record.unmount(target)
        except UnmountError:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
            mount_record.remove_record(target)


def _images(store: Store, tmp_path: Path, make_tree, names, seed: int):
    """Images of the store named by refs ``names``, each with objects the others do not have."""
    digests = {}
    for i, name in enumerate(names):
        make_tree(tmp_path / name, seed + i)
        digests[name] = add_image(store, tmp_path / name, name).digest
    for name, digest in digests.items():
        others = set().union(*(_needs(store, d) for n, d in digests.items() if n != name))
        assert _needs(store, digest) - others, name
    return digests


def _switch(image, where: Path, store: Store, history: Path, **kw):
    return mount_composefs(image, where, [store.objects_dir], record_dir="", replace=True,
                           history_dir=str(history), **kw)


def test_gc_keeps_the_previous_image_until_the_mount_moves_again(store, tmp_path, make_tree, where, store_cmd):
    img = _images(store, tmp_path, make_tree, ["a", "b", "c"], 7160)
    history = tmp_path / "history"
    _switch(store.image_path(img["a"]), where, store, history)
    result = _switch(store.image_path(img["b"]), where, store, history)
    assert result.previous and result.previous["image_digest"] == img["a"]
    for name in ("a", "b"):
        store.remove_ref(name)
    need_a = _needs(store, img["a"])

    # The CLI says why a survives (dry run: nothing removed).
    res = subprocess.run(store_cmd + ["--repo", os.fsdecode(store.path), "gc", "--dry-run",
                                      "--history-dir", str(history)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "kept previous image %s of %s for a rollback" % (img["a"], where) in res.stdout, res.stdout

    result = collect(store, tmp_grace=0, history_dir=str(history))
    assert result.kept_previous == [{"where": str(where), "image_digest": img["a"],
                                     "image_file": os.fsdecode(store.image_path(img["a"])), "in_store": True}]
    assert not result.removed_images and not result.removed_objects
    assert img["a"] in store.list_images() and need_a <= _objects(store)

    # Rollback works from what was kept; then c moves the mount on: b is previous, a goes.
    _switch(store.image_path(img["c"]), where, store, history)
    result = collect(store, tmp_grace=0, history_dir=str(history))
    assert result.removed_images == [img["a"]]
    assert need_a - _needs(store, img["b"]) - _needs(store, img["c"]) <= set(result.removed_objects)
    assert [k["image_digest"] for k in result.kept_previous] == [img["b"]]
    assert img["b"] in store.list_images() and _needs(store, img["b"]) <= _objects(store)


def test_history_of_a_live_mount_keeps_its_previous_image(store, tmp_path, make_tree, where):
    """A mount whose record knows no previous image (made without a history): the mount point's history
    names it, and counts while a composefs mount is on that mount point."""
    img = _images(store, tmp_path, make_tree, ["a", "b"], 7170)
    history = tmp_path / "history"
    mount_composefs(store.image_path(img["b"]), where, [store.objects_dir], record_dir="", history_dir=None)
    mount_history.note_mount(str(where), os.fsdecode(store.image_path(img["b"])), img["b"],
                             [os.fsdecode(store.objects_dir)], "off", directory=str(history),
                             replaced={"image": os.fsdecode(store.image_path(img["a"])), "image_digest": img["a"]})
    store.remove_ref("a")
    assert collect(store, dry_run=True, tmp_grace=0, history_dir=None).removed_images == [img["a"]]
    result = collect(store, dry_run=True, tmp_grace=0, history_dir=str(history))
    assert not result.removed_images and [k["image_digest"] for k in result.kept_previous] == [img["a"]]

    # The history of a mount point with nothing mounted keeps nothing.
    mount_record.unmount(where)
    result = collect(store, tmp_grace=0, history_dir=str(history))
    assert img["a"] in result.removed_images and not result.kept_previous


def test_previous_image_outside_the_store_keeps_its_objects_while_the_file_is_intact(store, tmp_path, make_tree,
                                                                                     where):
    img = _images(store, tmp_path, make_tree, ["a", "b"], 7180)
    history = tmp_path / "history"
    app = tmp_path / "app.cfs"
    shutil.copyfile(store.image_path(img["a"]), app)
    need_a = _needs(store, img["a"])
    only_a = need_a - _needs(store, img["b"])
    _switch(app, where, store, history)
    _switch(store.image_path(img["b"]), where, store, history)
    store.remove_ref("a")
    os.unlink(store.image_path(img["a"]))  # only app.cfs has it now
    result = collect(store, tmp_grace=0, history_dir=str(history))
    assert not result.removed_objects and need_a <= _objects(store)
    assert result.kept_previous == [{"where": str(where), "image_digest": img["a"], "image_file": str(app),
                                     "in_store": False}]

    # app.cfs replaced: its objects are unknown; nothing reads them now, so gc reports it and goes on.
    shutil.copyfile(store.image_path(img["b"]), app)
    result = collect(store, tmp_grace=0, history_dir=str(history))
    assert only_a <= set(result.removed_objects)
    assert [(m["where"], m["image_digest"]) for m in result.missing_previous] == [(str(where), img["a"])]
    assert "now has digest %s" % img["b"] in result.missing_previous[0]["reason"]
    assert "refusing" not in result.missing_previous[0]["reason"]
    assert json.dumps(result.as_dict())  # what the CLI's --json and the gc module return
