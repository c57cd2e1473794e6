# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Agent passes against real stores and real composefs mounts on this machine.

This kernel has no fs-verity, so digests are computed in userspace here and
enabling fs-verity is proven in the guest (tests/guest/); every other
finding and repair is exercised for real below, through ``--once``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from agent_fixtures import Node, kinds, node, run_once  # noqa: F401  (node: a fixture)

from composefs_fleet import mount_record, mountinfo
from composefs_fleet_agent.checks import Checker
from composefs_fleet_agent.config import load

pytestmark = pytest.mark.kernel



def _app(node: Node, remount: bool = True, history: bool = True, **extra: object):
    digest = node.image("app", 1)
    where = node.base / "mnt" / "app"
    node.mount(digest, where, history=history)
    node.add_mount(digest, where, remount=remount, **extra)
    return digest, where


def test_healthy_node_passes_and_the_textfile_says_so(node: Node):
    _app(node)
    res = run_once(node.write_config())
    assert res.returncode == 0, res.stderr
    assert kinds(res.stderr) == ["config-loaded", "pass-summary"]
    m = node.metrics()
    assert m["healthy"] == 1 and m["mounts_checked"] == 1 and m["objects_checked"] == len(node.objects())
    assert m["objects_checked"] >= 3 and m['findings{kind="object-missing"}'] == 0 and m["config_valid"] == 1


def test_deleted_and_changed_objects_are_reported(node: Node):
    _app(node)
    gone, changed = node.objects()[:2]
    gone.unlink()
    data = bytearray(changed.read_bytes())
    data[0] ^= 1
    changed.write_bytes(bytes(data))
    res = run_once(node.write_config())
    assert res.returncode == 1
    assert sorted(k for k in kinds(res.stderr) if k.startswith("object")) == ["object-digest-mismatch",
                                                                               "object-missing"]
    assert changed.exists(), "without quarantine a mismatching object stays where it is"
    m = node.metrics()
    assert m['findings{kind="object-missing"}'] == 1 and m['findings{kind="object-digest-mismatch"}'] == 1
    assert m["healthy"] == 0


def test_quarantine_moves_only_the_mismatching_object(node: Node):
    _app(node)
    changed = node.objects()[0]
    changed.write_bytes(changed.read_bytes() + b"tampered")
    res = run_once(node.write_config(), "--quarantine")
    assert res.returncode == 1 and "object-quarantined" in kinds(res.stderr)
    moved = list((node.store_path / "damaged").iterdir())
    assert len(moved) == 1 and moved[0].read_bytes().endswith(b"tampered") and not changed.exists()
    assert moved[0].name.startswith(changed.parent.name + changed.name)
    assert all(p.exists() for p in node.objects())  # the others stay


def test_unmounted_mount_comes_back_when_configured(node: Node):
    digest, where = _app(node)
    mount_record.unmount(where)
    res = run_once(node.write_config())
    assert res.returncode == 0, res.stderr
    assert kinds(res.stderr) == ["config-loaded", "mount-missing", "mount-remounted", "pass-summary"]
    top = mountinfo.top_mount(where)
    assert top is not None and top.is_composefs()
    assert mount_record.live_record(where)["image_digest"] == digest
    assert node.metrics()['repairs{kind="mount-remounted"}'] == 1
    assert sorted(os.listdir(where)) == sorted(os.listdir(node.base / "tree-app"))


def test_unmounted_mount_stays_down_without_remount(node: Node):
    _app(node, remount=False)
    where = Path(node.mounts[0]["where"])
    mount_record.unmount(where)
    res = run_once(node.write_config())
    assert res.returncode == 1 and "mount-missing" in kinds(res.stderr)
    assert mountinfo.top_mount(where) is None or not mountinfo.top_mount(where).is_composefs()


def test_replaced_image_is_reported_and_never_mounted(node: Node):
    digest, where = _app(node)
    other = node.image("other", 2)
    image = Path(node.image_path(digest))
    image.unlink()
    shutil.copyfile(node.image_path(other), image)
    mount_record.unmount(where)
    res = run_once(node.write_config())
    assert res.returncode == 1
    found = kinds(res.stderr)
    assert "image-digest-mismatch" in found and "mount-remount-failed" in found and "mount-remounted" not in found
    assert other in res.stderr and "not mounting" in res.stderr
    assert mountinfo.top_mount(where) is None or not mountinfo.top_mount(where).is_composefs()


def test_another_image_at_the_mount_point_is_found(node: Node):
    digest = node.image("app", 1)
    other = node.image("other", 2)
    where = node.base / "mnt" / "app"
    node.mount(other, where, history=False)  # no history: the configuration says what it should show
    node.add_mount(digest, where)
    res = run_once(node.write_config())
    assert res.returncode == 1 and "mount-wrong-image" in kinds(res.stderr)
    assert "shows image %s, expected %s (from its configuration)" % (other, digest) in res.stderr


def test_mount_without_record_is_unknown_but_objects_still_checked(node: Node):
    digest = node.image("app", 1)
    where = node.base / "mnt" / "app"
    node.mount(digest, where, record=False)
    node.add_mount(digest, where)
    node.objects()[0].unlink()
    res = run_once(node.write_config())
    assert res.returncode == 1
    assert {"mount-image-unknown", "object-missing"} <= set(kinds(res.stderr))


def test_options_that_differ_are_reported(node: Node):
    _app(node, verity="require", history=False)
    res = run_once(node.write_config())
    found = kinds(res.stderr)
    assert res.returncode == 1 and "mount-options-differ" in found and "verity=off (expected require)" in res.stderr
    # No fs-verity on this machine's filesystems: objects cannot carry it, which a required mode reports.
    assert "object-verity-missing" in found


def test_unreadable_store_does_not_stop_the_pass(node: Node):
    _app(node)
    (node.store_path / "meta.json").rename(node.store_path / "meta.json.away")
    missing_store = node.base / "no-such-store"
    cfg = node.write_config(stores=[{"path": str(missing_store)}, {"path": str(node.store_path)}])
    res = run_once(cfg)
    assert res.returncode == 1
    assert kinds(res.stderr).count("store-unreadable") == 2
    assert node.metrics()["mounts_checked"] == 1 and node.metrics()["objects_checked"] >= 3


def test_mount_vanishing_mid_pass_costs_nothing_but_that_mount(node: Node):
    digest, where = _app(node)
    cfg = load(str(node.write_config()))
    logged = []

    def tick() -> None:
        top = mountinfo.top_mount(where)
        if top is not None and top.is_composefs():
            mount_record.unmount(where)

    checker = Checker(logged.append, tick, history_dir=str(node.history_dir))
    result = checker.run(cfg, 1, quarantine=False)
    assert mountinfo.top_mount(where) is None or not mountinfo.top_mount(where).is_composefs()
    assert result.objects == len(node.objects()) and result.healthy, [f.message for f in result.findings]
    again = checker.run(cfg, 2, quarantine=False)
    assert [f.kind for f in again.findings] == ["mount-missing", "mount-remounted"]


def test_digest_cache_never_hides_a_change(node: Node):
    _app(node)
    cfg = load(str(node.write_config()))
    checker = Checker(lambda f: None, lambda: None, history_dir=str(node.history_dir))
    assert checker.run(cfg, 1, quarantine=False).healthy
    hashed = len(checker.digests.entries)
    assert hashed == len(node.objects()) + 1  # and the image file
    assert checker.run(cfg, 2, quarantine=False).healthy and len(checker.digests.entries) == hashed
    # Same size, same mtime: only ctime (which no one can set back) tells the change.
    victim = node.objects()[0]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    with open(victim, "r+b") as f:
        f.write(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = checker.run(cfg, 3, quarantine=False)
    assert [f.kind for f in third.findings] == ["object-digest-mismatch"]


def test_journal_socket_missing_means_plain_lines(node: Node, tmp_path: Path):
    """Without journald (this machine has none), entries still reach stderr, with priorities."""
    _app(node)
    env = dict(os.environ)
    res = subprocess.run([os.sys.executable, "-m", "composefs_fleet_agent", "--once", "--config",
                          str(node.write_config()), "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0
    if os.path.exists("/run/systemd/journal/socket"):
        pytest.skip("journald runs here: entries go to the journal, not stderr")
    assert "<6>pass-summary: pass 1: healthy" in res.stderr


def test_remount_refuses_a_symlink_in_the_parents_of_where(node: Node):
    """A link planted in a parent of the mount point must not move the agent's (root) mount elsewhere."""
    digest = node.image("app", 1)
    real = node.base / "elsewhere"
    (real / "app").mkdir(parents=True)
    (node.base / "mnt").symlink_to(real)
    node.mounted.append(real / "app")  # undone at teardown, should the mount happen after all
    node.add_mount(digest, node.base / "mnt" / "app", remount=True)
    res = run_once(node.write_config())
    assert res.returncode == 1
    assert kinds(res.stderr) == ["config-loaded", "mount-missing", "mount-remount-failed", "pass-summary"], res.stderr
    assert "%s is a symbolic link: refused" % (node.base / "mnt") in res.stderr
    assert mountinfo.top_mount(real / "app") is None
