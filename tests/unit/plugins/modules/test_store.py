# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.store: arguments, check/diff logic, refusals,
and the mountinfo parsing behind "the store is in use" (no mounts made here;
real mounts: tests/collection/test_module_store.py)."""

from __future__ import annotations

import json
import os

import pytest


from ansible_collections.composefs.fleet.plugins.modules import store as store_module
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module
from ansible_collections.composefs.fleet.plugins.module_utils.composefs import store_admin
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store import Store

EMPTY = {"state": "present", "format": 1, "digest_algorithm": "sha256", "objects": 0, "images": 0, "refs": 0}


def run(capsys, args, check=False, diff=False):
    return run_module(store_module, capsys, args, check, diff)


def listing(path):
    out = []
    for dirpath, dirnames, filenames in os.walk(str(path)):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            out.append(os.path.relpath(os.path.join(dirpath, name), str(path)))
    return sorted(out)


# -- arguments -------------------------------------------------------------------

def test_path_is_required(capsys):
    res = run(capsys, {})
    assert res["failed"] is True and "path" in res["msg"]


@pytest.mark.parametrize("args, word", [
    ({"state": "deleted"}, "state"),
    ({"force": "sometimes"}, "force"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_arguments(capsys, tmp_path, args, word):
    full = dict(args, path=str(tmp_path / "s"))
    res = run(capsys, full)
    assert res["failed"] is True and word in res["msg"]
    assert not (tmp_path / "s").exists()


def test_path_is_expanded(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    res = run(capsys, {"path": "~/store"})
    assert res["changed"] is True and res["store"]["location"] == str(tmp_path / "store")
    assert (tmp_path / "store" / "meta.json").is_file()


# -- present -------------------------------------------------------------------

def test_check_mode_predicts_and_writes_nothing(capsys, tmp_path):
    location = tmp_path / "new" / "store"
    res = run(capsys, {"path": str(location)}, check=True, diff=True)
    assert res["changed"] is True
    assert res["diff"] == {"before": {"state": "absent"}, "after": EMPTY}
    assert res["store"]["exists"] is True and res["store"]["format"] == 1
    assert isinstance(res["store"]["verity_supported"], bool)
    assert res["store"]["verity_supported"] is (res["store"]["verity_problem"] is None)
    assert not (tmp_path / "new").exists()


def test_create_then_idempotent(capsys, tmp_path):
    location = tmp_path / "store"
    res = run(capsys, {"path": str(location)}, diff=True)
    assert res["changed"] is True and res["diff"]["after"] == EMPTY
    assert listing(location) == ["images", "meta.json", "objects", "refs"]
    for check in (False, True):
        res = run(capsys, {"path": str(location)}, check=check, diff=True)
        assert res["changed"] is False
        assert res["diff"] == {"before": EMPTY, "after": EMPTY}
    assert "diff" not in run(capsys, {"path": str(location)})


def test_counts(capsys, tmp_path):
    location = tmp_path / "store"
    store, _created = Store.init(str(location), notice=None)
    digest = "ab" * 32
    store.write_ref("one", digest)
    store.write_ref("sub/two", digest)
    os.makedirs(str(location / "objects" / "ab"))
    (location / "objects" / "ab" / ("cd" * 31)).write_bytes(b"x")
    (location / "objects" / "ab" / "not-an-object").write_bytes(b"x")
    (location / "images" / digest).write_bytes(b"not really an image")
    res = run(capsys, {"path": str(location)})
    assert (res["store"]["objects"], res["store"]["images"], res["store"]["refs"]) == (1, 1, 2)


def test_lost_and_found_only_counts_as_empty(capsys, tmp_path):
    location = tmp_path / "fs"
    (location / "lost+found").mkdir(parents=True)
    res = run(capsys, {"path": str(location)})
    assert res["changed"] is True
    assert listing(location) == ["images", "lost+found", "meta.json", "objects", "refs"]


@pytest.mark.parametrize("check", [True, False])
def test_foreign_directory_is_refused(capsys, tmp_path, check):
    location = tmp_path / "home"
    location.mkdir()
    (location / ".bashrc").write_text("x")
    res = run(capsys, {"path": str(location)}, check=check)
    assert res["failed"] is True and "not a composefs store" in res["msg"]
    assert listing(location) == [".bashrc"]


def test_dangling_symlink_is_refused(capsys, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    res = run(capsys, {"path": str(link)})
    assert res["failed"] is True and "not a directory" in res["msg"]
    assert not (tmp_path / "nowhere").exists()


def test_damaged_store_is_reported(capsys, tmp_path):
    location = tmp_path / "store"
    Store.init(str(location), notice=None)
    (location / "meta.json").write_text('{"format": "one"}')
    res = run(capsys, {"path": str(location)})
    assert res["failed"] is True and "meta.json is damaged" in res["msg"]


def test_unwritable_parent_fails_cleanly(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run(capsys, {"path": str(blocker / "store")})
    assert res["failed"] is True and "cannot create" in res["msg"], res


# -- absent --------------------------------------------------------------------

def test_absent_missing_is_unchanged(capsys, tmp_path):
    for check in (True, False):
        res = run(capsys, {"path": str(tmp_path / "none"), "state": "absent"}, check=check, diff=True)
        assert res["changed"] is False
        assert res["diff"] == {"before": {"state": "absent"}, "after": {"state": "absent"}}
        assert res["store"]["exists"] is False


def test_absent_four_steps(capsys, tmp_path):
    location = tmp_path / "store"
    Store.init(str(location), notice=None)
    args = {"path": str(location), "state": "absent"}
    res = run(capsys, args, check=True, diff=True)
    assert res["changed"] is True and res["diff"] == {"before": EMPTY, "after": {"state": "absent"}}
    assert (location / "meta.json").is_file()
    res = run(capsys, args, diff=True)
    assert res["changed"] is True and not os.path.lexists(str(location))
    assert os.listdir(str(tmp_path)) == []
    for check in (False, True):
        assert run(capsys, args, check=check)["changed"] is False


def test_refs_need_force(capsys, tmp_path):
    location = tmp_path / "store"
    store, _created = Store.init(str(location), notice=None)
    for i in range(7):
        store.write_ref("r%d" % i, "%02x" % i * 32)
    res = run(capsys, {"path": str(location), "state": "absent"})
    assert res["failed"] is True and "7 ref(s)" in res["msg"] and "r0, r1, r2, r3, r4, ..." in res["msg"]
    assert res["refs"] == 7 and len(listing(location / "refs")) == 7
    res = run(capsys, {"path": str(location), "state": "absent", "force": True}, check=True, diff=True)
    assert res["changed"] is True and res["diff"]["before"]["refs"] == 7
    assert (location / "meta.json").is_file()
    res = run(capsys, {"path": str(location), "state": "absent", "force": True})
    assert res["changed"] is True and not os.path.lexists(str(location))


def test_absent_leaves_non_stores_alone(capsys, tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_text("x")
    (tmp_path / "file").write_text("y")
    for name in ("dir", "file"):
        res = run(capsys, {"path": str(tmp_path / name), "state": "absent", "force": True})
        assert res["changed"] is False and "not a composefs store" in json.dumps(res["warnings"])
    assert listing(tmp_path) == ["dir", "dir/x", "file"]


# -- what counts as "in use" (parsing only) ------------------------------------------

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:40 / /srv/a rw,relatime - overlay composefs ro,lowerdir+=/,datadir+=/var/lib/st\\040ore/objects,redirect_dir=on
31 22 0:41 / /srv/b rw,relatime - overlay composefs ro,lowerdir=/run/.composefs.x::/var/lib/other/objects
32 22 0:42 / /var/lib/st\\040ore/refs/mnt rw - tmpfs tmpfs rw
33 22 0:43 / /var/lib/st\\040ore2 rw - tmpfs tmpfs rw
34 22 0:44 / /srv/c rw - overlay overlay rw,lowerdir=/l1:/var/lib/st\\040ore/images,upperdir=/u,workdir=/w
"""


def test_mountinfo_users(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    users = store_admin._mountinfo_users("/var/lib/st ore", str(path))
    assert users == [
        "the overlay on /srv/a uses /var/lib/st ore/objects",
        "/var/lib/st ore/refs/mnt is a mount point inside the store",
        "the overlay on /srv/c uses /var/lib/st ore/images",
    ]
    assert store_admin._mountinfo_users("/var/lib/elsewhere", str(path)) == []
    # The store's own mount point is not "inside" it.
    assert store_admin._mountinfo_users("/var/lib/st ore2", str(path)) == []


def test_refusal_order():
    plan = store_admin.RemovePlan()
    assert store_admin.refusal(plan, force=False) is None
    plan.refs = ["a"]
    assert "1 ref(s) (a)" in store_admin.refusal(plan, force=False)
    assert store_admin.refusal(plan, force=True) is None
    plan.users = ["x is mounted"]
    assert store_admin.refusal(plan, force=True) == "the store is in use: x is mounted"


def test_path_state(tmp_path):
    assert store_admin.path_state(str(tmp_path / "none")) == store_admin.MISSING
    (tmp_path / "e").mkdir()
    assert store_admin.path_state(str(tmp_path / "e")) == store_admin.EMPTY
    (tmp_path / "e" / "lost+found").mkdir()
    assert store_admin.path_state(str(tmp_path / "e")) == store_admin.EMPTY
    (tmp_path / "e" / "x").write_text("")
    assert store_admin.path_state(str(tmp_path / "e")) == store_admin.NOT_A_STORE
    (tmp_path / "e" / "meta.json").write_text("")
    assert store_admin.path_state(str(tmp_path / "e")) == store_admin.STORE
    assert store_admin.path_state(str(tmp_path / "e" / "x")) == store_admin.NOT_A_DIRECTORY
    (tmp_path / "l").symlink_to(tmp_path / "e")
    assert store_admin.path_state(str(tmp_path / "l")) == store_admin.STORE
