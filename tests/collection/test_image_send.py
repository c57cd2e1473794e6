# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.image_send through ansible-playbook (local connection): controller store -> node store.

The controller and the node are this machine: the controller's store and
the node's store are two directories.  What the tests look at is what the
node's store holds afterwards (ref, image bytes, objects, fsck) and what the
task returns (objects and bytes missing and sent, transfers).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from composefs_fleet.errors import RefNotFound
from composefs_fleet.remote_bundle import iter_bundles, pack_objects
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check as fsck

from test_role_foreign_store import run_play

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from store_fixtures import write_tree  # noqa: E402


def run_task(tmp: Path, args: dict, check: bool = False, diff: bool = False) -> "tuple[subprocess.CompletedProcess[str], dict]":
    """One image_send task on localhost; (process, the task's registered result)."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("/usr/bin/python3 (the modules' interpreter) is missing")
    out = tmp / "result.json"
    if out.exists():
        out.unlink()
    tasks = [
        {"name": "send the image", "composefs.fleet.image_send": args, "register": "sent", "ignore_errors": True},
        {"name": "keep the result", "ansible.builtin.copy": {"content": "{{ sent | to_json }}", "dest": str(out)},
         "check_mode": False, "diff": False, "changed_when": False},
    ]
    proc = run_play(tmp, "send", {}, [], tasks, (["--check"] if check else []) + (["--diff"] if diff else []))
    assert out.is_file(), proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture
def controller(tmp_path: Path):
    """The controller's store with app/v1 and app/v2 (sharing their common files)."""
    store, _ = Store.init(tmp_path / "controller", notice=None)
    write_tree(tmp_path / "t1", seed=1, shared_from=7)
    write_tree(tmp_path / "t2", seed=2, shared_from=7)
    many = tmp_path / "t2" / "many"
    many.mkdir()
    for i in range(40):  # many small objects only v2 has: batched, not one transfer each
        (many / ("m%02d" % i)).write_bytes(os.urandom(3000 + 97 * i))
    v1 = add_image(store, tmp_path / "t1", "app/v1").digest
    v2 = add_image(store, tmp_path / "t2", "app/v2").digest
    needed = {d: store.image_objects(d).objects for d in (v1, v2)}
    store.close()
    return tmp_path / "controller", v1, v2, needed


@pytest.fixture
def node(tmp_path: Path) -> Path:
    Store.init(tmp_path / "node", notice=None)[0].close()
    return tmp_path / "node"


def node_objects(node: Path) -> set:
    return {p.parent.name + p.name for p in (node / "objects").glob("??/*") if not p.name.startswith(".")}


def assert_clean(node: Path) -> None:
    with Store.open(node, notice=None) as store:
        report = fsck(store)
    assert report.clean, report.as_dict()


def read_ref(node: Path, ref: str):
    with Store.open(node, notice=None) as store:
        try:
            return store.read_ref(ref)
        except RefNotFound:
            return None


def assert_no_temp_files(tmp_path: Path) -> None:
    """The bundles went: nothing left in the controller's local or the node's remote temporary directories."""
    for top in ("ansible-tmp", "ansible-remote-tmp"):
        left = [p for p in (tmp_path / top).rglob("*") if p.is_file()] if (tmp_path / top).exists() else []
        assert not left, left


def test_send_into_empty_store_then_v2_only_missing_then_unchanged(tmp_path, controller, node):
    src, v1, v2, needed = controller
    args = dict(store=str(node), ref="app/v1", from_store=str(src))
    proc, res = run_task(tmp_path, args, diff=True)
    assert not res.get("failed"), res
    assert res["changed"] and res["digest"] == v1 and res["previous_digest"] is None
    assert res["objects"] == res["objects_missing"] == res["objects_sent"] == res["objects_written"] == len(needed[v1])
    assert res["bytes_sent"] == sum(needed[v1].values())
    assert res["image_written"] and res["transfers"] == 2  # the image, one bundle (default batch_size 256 MiB)
    assert res["diff"] == {"before": {"ref": "app/v1", "digest": None}, "after": {"ref": "app/v1", "digest": v1}}
    assert read_ref(node, "app/v1") == v1
    assert (node / "images" / v1).read_bytes() == (src / "images" / v1).read_bytes()
    assert node_objects(node) == set(needed[v1])
    assert_clean(node)
    assert_no_temp_files(tmp_path)

    # v2 to a node with v1: only what v1 does not have, in small batches.
    batch = 100_000
    args = dict(store=str(node), ref="app/current", from_store=str(src), from_ref="app/v2", batch_size=batch)
    proc, res = run_task(tmp_path, args)
    assert not res.get("failed"), res
    lacking = set(needed[v2]) - set(needed[v1])
    assert 0 < len(lacking) < len(needed[v2])
    lacking_bytes = sum(needed[v2][h] for h in lacking)
    assert (res["objects"], res["objects_missing"], res["objects_sent"], res["objects_written"]) == \
        (len(needed[v2]), len(lacking), len(lacking), len(lacking))
    assert res["bytes_missing"] == res["bytes_sent"] == lacking_bytes
    # One transfer for the image, then one per bundle file, packed first fit largest first.
    assert res["transfers"] == 1 + len(pack_objects({h: needed[v2][h] for h in lacking}, batch))
    assert 3 <= res["transfers"] <= math.ceil(2 * lacking_bytes / batch) + 2 < len(lacking)
    assert read_ref(node, "app/current") == v2 and read_ref(node, "app/v1") == v1
    assert node_objects(node) == set(needed[v1]) | set(needed[v2])
    assert_clean(node)

    # Again: nothing changes, nothing but the image travels.
    proc, res = run_task(tmp_path, args, check=False)
    assert not res.get("failed"), res
    assert (res["changed"], res["objects_missing"], res["objects_sent"], res["transfers"]) == (False, 0, 0, 1)
    assert "changed=0" in proc.stdout.split("PLAY RECAP")[-1]
    proc, res = run_task(tmp_path, args, check=True)
    assert (res["changed"], res["objects_missing"]) == (False, 0)
    assert_no_temp_files(tmp_path)


def test_check_mode_writes_nothing_and_reports_counts(tmp_path, controller, node):
    src, v1, _v2, needed = controller
    before = sorted(str(p.relative_to(node)) for p in node.rglob("*"))
    args = dict(store=str(node), ref="app/v1", from_store=str(src))
    proc, res = run_task(tmp_path, args, check=True, diff=True)
    assert not res.get("failed"), res
    assert res["changed"] and res["digest"] == v1
    assert (res["objects_missing"], res["bytes_missing"]) == (len(needed[v1]), sum(needed[v1].values()))
    assert (res["objects_sent"], res["objects_written"], res["image_written"], res["transfers"]) == (0, 0, False, 1)
    assert res["diff"]["after"] == {"ref": "app/v1", "digest": v1}
    assert sorted(str(p.relative_to(node)) for p in node.rglob("*")) == before
    # A store that does not exist yet is planned as an empty one (and not created).
    args["store"] = str(tmp_path / "not-yet")
    proc, res = run_task(tmp_path, args, check=True, diff=True)
    assert not res.get("failed"), res
    assert res["changed"] and res["diff"] == {"before": {"ref": "app/v1", "digest": None}, "after": {"ref": "app/v1", "digest": v1}}
    assert res["objects_missing"] == len(needed[v1]) and not (tmp_path / "not-yet").exists()
    assert any("does not exist yet" in w for w in res.get("warnings", [])), res


def test_corrupted_controller_object_is_refused_on_the_node(tmp_path, controller, node):
    src, v1, _v2, needed = controller
    victim = max(needed[v1], key=lambda h: (needed[v1][h], h))
    path = src / "objects" / victim[:2] / victim[2:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    args = dict(store=str(node), ref="app/v1", from_store=str(src))
    proc, res = run_task(tmp_path, args)
    assert res.get("failed"), res
    assert "controller:%s/objects/%s/%s" % (src, victim[:2], victim[2:]) in res["msg"], res["msg"]
    assert "fs-verity digest is" in res["msg"] and "not its name" in res["msg"], res["msg"]
    assert "fsck" in res["msg"]
    assert read_ref(node, "app/v1") is None
    assert not (node / "images" / v1).exists()
    assert victim not in node_objects(node)
    assert_clean(node)
    assert_no_temp_files(tmp_path)


def test_missing_ref_on_the_controller_fails_clearly(tmp_path, controller, node):
    src, _v1, _v2, _needed = controller
    proc, res = run_task(tmp_path, dict(store=str(node), ref="app/v9", from_store=str(src)))
    assert res.get("failed") and res["msg"].startswith("controller store %s: no ref app/v9 in the store %s; close matches: "
                                                       % (src, src)), res
    assert "app/v1" in res["msg"] and "app/v2" in res["msg"]
    assert read_ref(node, "app/v9") is None


def test_an_object_lost_on_the_node_is_sent_again_alone(tmp_path, controller, node):
    src, v1, _v2, needed = controller
    args = dict(store=str(node), ref="app/v1", from_store=str(src))
    proc, res = run_task(tmp_path, args)
    assert not res.get("failed") and res["changed"], res
    lost = min(needed[v1])
    (node / "objects" / lost[:2] / lost[2:]).unlink()
    proc, res = run_task(tmp_path, args)
    assert not res.get("failed"), res
    # The ref already names the image, but the store lacks an object: it is sent (alone) and published.
    assert (res["changed"], res["previous_digest"], res["objects_missing"], res["objects_sent"], res["transfers"]) == \
        (True, v1, 1, 1, 2)
    assert node_objects(node) == set(needed[v1])
    assert_clean(node)


def test_the_module_alone_says_it_needs_its_action_plugin(module_runner, node):
    res = module_runner("image_send", dict(store=str(node), ref="app/v1", from_store="/nowhere"))
    assert res.get("failed") and "runs through its action plugin" in res["msg"], res


def test_foreign_owner_node_store_needs_the_option_and_from_store_may_be_relative(tmp_path, controller, node):
    src, v1, _v2, _needed = controller
    os.chmod(node, 0o770)
    # Relative to the playbook's directory (the test's temp dir).
    args = dict(store=str(node), ref="app/v1", from_store=os.path.relpath(src, tmp_path))
    proc, res = run_task(tmp_path, args)
    assert res.get("failed") and "is writable by its group (mode 0770)" in res["msg"], res
    assert "allow_foreign_owner" in res["msg"]
    args["allow_foreign_owner"] = True
    proc, res = run_task(tmp_path, args)
    assert not res.get("failed") and res["changed"] and res["digest"] == v1, res
    with Store.open(node, notice=None, allow_foreign=True) as store:
        assert store.read_ref("app/v1") == v1


def test_apply_refuses_a_bundle_whose_ref_is_not_the_digest_the_controller_named(module_runner, tmp_path, controller,
                                                                                   node):
    src, v1, v2, needed = controller
    out = tmp_path / "bundles"
    out.mkdir()
    with Store.open(src, notice=None) as store:
        files = list(iter_bundles(store, str(out), digest=v1, ref="app/v1", prefix="image"))
        files += list(iter_bundles(store, str(out), [sorted(needed[v1])], prefix="objects"))
    args = dict(store=str(node), ref="app/v1", from_store=str(src), _bundles=[f.path for f in files], _digest=v2)
    res = module_runner("image_send", dict(args, _phase="apply"))
    assert res.get("failed") and "names %r, not %s: refused" % (v1.encode(), v2) in res["msg"], res
    res = module_runner("image_send", dict(args, _phase="plan"))
    assert res.get("failed") and "the bundle's ref names %s, the controller's %s" % (v1, v2) in res["msg"], res
    assert read_ref(node, "app/v1") is None and not node_objects(node)
    # With the right digest, the module alone (as the action plugin runs it) publishes it all.
    res = module_runner("image_send", dict(args, _phase="apply", _digest=v1))
    assert not res.get("failed") and res["changed"] and res["objects_fetched"] == len(needed[v1]), res
    assert read_ref(node, "app/v1") == v1
    assert_clean(node)

