# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Pulls side by side with gc, with each other and with readers of a mounted image.

nginx throttles (limit_rate) so that a pull is still running when the other
party starts; the access log says when some objects have arrived.  nginx lets
a response send ``limit_rate`` bytes in its first second: a 100 KB object at
80 KB/s takes about a second, so 24 objects with --jobs 8 take about 3 s.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pull_fixtures import MANY_COUNT, Node, Source, assert_has_image, tree_of, wait_exit  # type: ignore[import-not-found]
from pull_fixtures import nginx, node, served, source_template  # type: ignore[import-not-found]  # noqa: F401  (fixtures)

pytestmark = pytest.mark.network

THROTTLE = "80k"


def objects_sent(count: int):
    return lambda entries: sum(e.path.startswith("objects/") and e.completed for e in entries) >= count


def test_gc_during_a_pull_removes_nothing_the_pull_fetched(served: Source, node: Node, nginx) -> None:
    # Garbage for gc: an image no ref names any more, with objects of its own.
    assert node.run("add-image", served.trees["other"], "--ref", "junk").returncode == 0
    assert node.run("rm-ref", "junk").returncode == 0
    junk = set(served.needs["other"])
    assert junk <= node.objects()
    srv = nginx(served.path, limit_rate=THROTTLE)
    pulling = node.popen("pull", "--jobs", "8", srv.url, "many")
    try:
        srv.wait_for(objects_sent(4), what="4 objects sent")
        assert pulling.poll() is None, "the pull ended before gc could start"
        gc = node.run("--json", "gc", "--tmp-grace", "0")
    finally:
        pulled = wait_exit(pulling, 120, "pull beside gc")
    assert gc.returncode == 0, gc.stderr
    assert pulled.returncode == 0, pulled.stderr
    assert_has_image(node, served, "many")
    assert not junk & node.objects(), "gc did not run: the unreferenced objects are still there"
    assert node.debris() == []


def test_two_pulls_of_one_ref_at_once(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path, limit_rate=THROTTLE)
    first = node.popen("pull", "--jobs", "8", srv.url, "many")
    srv.wait_for(objects_sent(2), what="2 objects sent")
    second = node.popen("pull", "--jobs", "8", srv.url, "many")
    results = [wait_exit(p, 120, "two pulls at once") for p in (first, second)]
    for res in results:
        assert res.returncode == 0, res.stderr
    assert node.refs() == {"many": served.digests["many"]}
    assert_has_image(node, served, "many")
    assert node.debris() == []
    # Each object went over the wire at most twice (once per pull), none more.
    assert max(srv.fetches(kind="objects/").values()) <= 2
    assert len(srv.fetches(kind="objects/")) == MANY_COUNT


def test_two_pulls_of_images_sharing_objects_at_once(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path, limit_rate=THROTTLE)
    procs = [node.popen("pull", "--jobs", "8", srv.url, ref) for ref in ("app/v1", "app/v2")]
    for proc in procs:
        res = wait_exit(proc, 120, "two pulls at once")
        assert res.returncode == 0, res.stderr
    assert_has_image(node, served, "app/v1")
    assert_has_image(node, served, "app/v2")
    assert node.debris() == []


def test_add_image_runs_beside_a_pull(served: Source, node: Node, nginx) -> None:
    """Both hold the store's lock shared: an add-image ends while a pull is still fetching (for about 6 s:
    2 s per object at 40 KB/s, time enough for add-image on a busy machine)."""
    srv = nginx(served.path, limit_rate="40k")
    pulling = node.popen("pull", "--jobs", "8", srv.url, "many")
    try:
        srv.wait_for(objects_sent(2), what="2 objects sent")
        added = node.run("add-image", served.trees["other"], "--ref", "local/other")
        assert pulling.poll() is None, "the pull ended before add-image did: they did not run side by side"
    finally:
        pulled = wait_exit(pulling, 120, "pull beside add-image")
    assert added.returncode == 0, added.stderr
    assert pulled.returncode == 0, pulled.stderr
    assert_has_image(node, served, "many")
    assert_has_image(node, served, "other", "local/other")


@pytest.mark.kernel
def test_readers_of_a_mounted_image_are_not_blocked_by_a_pull(served: Source, node: Node, nginx, ours,
                                                              tmp_path: Path) -> None:
    srv = nginx(served.path, limit_rate=THROTTLE)
    node.pull_ok(srv.url, "app/v1")
    where = tmp_path / "mnt"
    where.mkdir()
    image = node.repo / "images" / served.digests["app/v1"]
    res = ours.run("mount.composefs", "-o", "basedir=%s" % (node.repo / "objects"), image, where)
    assert res.returncode == 0, res.stderr
    try:
        mark = len(srv.entries())
        pulling = node.popen("pull", "--jobs", "8", srv.url, "many")
        try:
            srv.wait_for(lambda es: objects_sent(2)(es[mark:]), what="2 objects sent")
            assert tree_of(where) == tree_of(served.trees["app/v1"])
            assert pulling.poll() is None, "the pull ended before the mount was read: nothing shown"
        finally:
            pulled = wait_exit(pulling, 120, "pull beside a mount")
        assert pulled.returncode == 0, pulled.stderr
    finally:
        done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert_has_image(node, served, "many")
