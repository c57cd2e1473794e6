# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent follows mounts that move: what a mount should show comes from its mount history.

Real mounts and switches (``mount_composefs(replace=True)``, as the mount module switches) into a
history directory of the test's own; the agent reads it again every pass, so a switch or a rollback
is checked against the new image without a new configuration.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
from agent_fixtures import Node, kinds, node, run_once  # noqa: F401  (node: a fixture)

from composefs_fleet import mount_history, mount_record, mountinfo
from composefs_fleet.image_needs import image_file_objects
from composefs_fleet_agent.checks import Checker
from composefs_fleet_agent.config import ConfigError, load, parse

pytestmark = pytest.mark.kernel


def _where(node: Node) -> Path:
    return node.base / "mnt" / "app"


def _watch_only(node: Node, where: Path, **extra: object) -> Path:
    """A configuration naming the mount point only, as the role writes it."""
    node.mounts.append(dict({"where": str(where), "remount": True}, **extra))
    return node.write_config()


def _kinds_of(result) -> List[str]:
    return [f.kind for f in result.findings]


def test_a_switch_is_followed_without_a_new_configuration(node: Node):
    v1, v2 = node.image("app/v1", 1), node.image("app/v2", 2)
    where = _where(node)
    node.mount(v1, where, ref="app/v1")
    cfg = load(str(_watch_only(node, where)))
    checker = Checker(lambda f: None, lambda: None, history_dir=str(node.history_dir))
    first = checker.run(cfg, 1, quarantine=False)
    assert first.healthy, [f.message for f in first.findings]
    node.mount(v2, where, replace=True, ref="app/v2")
    assert mount_history.load(str(where), str(node.history_dir))["previous"]["image_digest"] == v1
    second = checker.run(cfg, 2, quarantine=False)
    assert second.healthy and second.objects >= 3, [f.message for f in second.findings]
    # The objects checked now are v2's: one of them missing is reported against v2.
    only_v2 = sorted(set(image_file_objects(node.image_path(v2)).objects)
                     - set(image_file_objects(node.image_path(v1)).objects))
    assert only_v2
    gone = node.store_path / "objects" / only_v2[0][:2] / only_v2[0][2:]
    gone.unlink()
    third = checker.run(cfg, 3, quarantine=False)
    assert _kinds_of(third) == ["object-missing"]
    assert third.findings[0].fields["image_digest"] == v2 and third.findings[0].fields["object"] == only_v2[0]


def test_the_history_wins_over_a_stale_image_in_the_configuration(node: Node):
    v1, v2 = node.image("app/v1", 1), node.image("app/v2", 2)
    where = _where(node)
    node.mount(v1, where)
    node.mount(v2, where, replace=True)
    node.add_mount(v1, where, remount=True)  # what a role run long ago wrote: v1
    res = run_once(node.write_config())
    assert res.returncode == 0, res.stderr
    assert kinds(res.stderr) == ["config-loaded", "pass-summary"]


def test_a_missing_mount_comes_back_with_the_image_of_its_history(node: Node):
    v1, v2 = node.image("app/v1", 1), node.image("app/v2", 2)
    where = _where(node)
    node.mount(v1, where)
    node.mount(v2, where, replace=True)
    node.add_mount(v1, where, remount=True)
    config = node.write_config()
    for _ in range(4):  # the switched-away mount may still be stacked below until detached
        top = mountinfo.top_mount(where)
        if top is None or not top.is_composefs():
            break
        mount_record.unmount(where)
    res = run_once(config)
    assert res.returncode == 0, res.stderr
    assert kinds(res.stderr) == ["config-loaded", "mount-missing", "mount-remounted", "pass-summary"]
    assert "expected image %s" % v2 in res.stderr
    assert mount_record.live_record(where)["image_digest"] == v2
    # The remount noted the same image: the previous one (for a rollback) is still v1.
    entry = mount_history.load(str(where), str(node.history_dir))
    assert entry["image_digest"] == v2 and entry["previous"]["image_digest"] == v1


def test_a_rollback_by_digest_is_followed(node: Node):
    v1, v2 = node.image("app/v1", 1), node.image("app/v2", 2)
    where = _where(node)
    node.mount(v1, where, ref="app/v1")
    node.mount(v2, where, replace=True, ref="app/v2")
    config = _watch_only(node, where)
    assert run_once(config).returncode == 0
    previous = mount_history.load(str(where), str(node.history_dir))["previous"]
    node.mount(previous["image_digest"], where, replace=True)
    entry = mount_history.load(str(where), str(node.history_dir))
    assert entry["image_digest"] == v1 and entry["ref"] is None and entry["previous"]["image_digest"] == v2
    res = run_once(config, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["healthy"] is True
    assert out["expected"] == [{"where": str(where), "image": node.image_path(v1), "image_digest": v1, "ref": None,
                                "source": "mount history"}]


def test_a_record_that_disagrees_with_the_history_is_the_wrong_image(node: Node):
    v1, v2 = node.image("app/v1", 1), node.image("app/v2", 2)
    where = _where(node)
    node.mount(v1, where)
    node.mount(v2, where, replace=True, history=False)  # switched by a tool that keeps no history
    res = run_once(_watch_only(node, where))
    assert res.returncode == 1 and "mount-wrong-image" in kinds(res.stderr)
    assert "shows image %s, expected %s (from its mount history)" % (v2, v1) in res.stderr


def test_without_history_or_image_nothing_is_checked_and_that_is_a_problem(node: Node):
    where = _where(node)
    where.mkdir(parents=True)
    res = run_once(_watch_only(node, where))
    assert res.returncode == 1
    assert kinds(res.stderr) == ["config-loaded", "mount-history-missing", "pass-summary"]
    assert "%s has no mount history in %s" % (where, node.history_dir) in res.stderr
    assert node.metrics()['findings{kind="mount-history-missing"}'] == 1


def test_configuration_needs_only_where():
    cfg = parse(json.dumps({"mounts": [{"where": "/srv/app", "remount": True, "ref": "app/current",
                                        "verity": "boot"}]}).encode())
    spec = cfg.mounts[0]
    assert (spec.where, spec.image, spec.digest, spec.basedirs, spec.ref) == ("/srv/app", None, None, [], "app/current")


@pytest.mark.parametrize("given", [{"image": "/s/images/" + "a" * 64}, {"digest": "a" * 64},
                                   {"image": "/s/images/" + "a" * 64, "digest": "a" * 64},
                                   {"basedirs": ["/s/objects"]}])
def test_a_partial_fallback_image_is_refused(given):
    with pytest.raises(ConfigError) as err:
        parse(json.dumps({"mounts": [dict({"where": "/srv/app"}, **given)]}).encode())
    assert "mounts[0]: image, digest and basedirs go together" in str(err.value)
