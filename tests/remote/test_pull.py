# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-store pull from a store served by a real nginx on 127.0.0.1: what travels, what lands.

Each pull's result is checked on the node (image byte-identical to the
source's, every object byte-identical, fsck clean, refs as expected) and on
the server (nginx's access log: each missing object fetched exactly once,
no object the node had fetched at all).
"""
from __future__ import annotations

import collections
import os
import pty
import stat
import subprocess
from pathlib import Path
from typing import Counter, Dict, List

import pytest

from pull_fixtures import CHUNKED, Node, Source, assert_has_image, build_source, make_node, object_rel, tree_of  # type: ignore[import-not-found]
from pull_fixtures import nginx, node, served, source_template  # type: ignore[import-not-found]  # noqa: F401  (fixtures)
from nginx_server import LogEntry  # type: ignore[import-not-found]

from composefs_fleet.pull import pull
from composefs_fleet.remote_options import RemoteOptions
from composefs_fleet.store import Store

pytestmark = pytest.mark.network


def object_gets(entries: List[LogEntry]) -> Counter[str]:
    """Requests for objects, per path (any status)."""
    return collections.Counter(e.path for e in entries if e.path.startswith("objects/"))


def expect_once(objects: Dict[str, int]) -> Counter[str]:
    return collections.Counter({object_rel(h): 1 for h in objects})


def test_pull_into_empty_store(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    out = node.pull_ok(srv.url, "app/v1")
    assert_has_image(node, served, "app/v1")
    assert node.refs() == {"app/v1": served.digests["app/v1"]}
    needs = served.needs["app/v1"]
    assert out["digest"] == served.digests["app/v1"] and out["changed"] is True and out["image_fetched"] is True
    assert out["previous"] is None and out["url"] == srv.url and out["ref"] == "app/v1"
    assert (out["objects"], out["objects_missing"], out["objects_fetched"]) == (len(needs), len(needs), len(needs))
    assert out["bytes_fetched"] == out["bytes_missing"] == sum(needs.values())
    entries = srv.entries()
    # Every request answered 200 but the image's fs-verity signature, which this source has not (404: none).
    assert all(e.completed and (e.status == 200 or (e.status == 404 and e.path.endswith(".sig"))) for e in entries), entries
    assert object_gets(entries) == expect_once(needs)
    assert srv.fetches(kind="images/") == {"images/" + served.digests["app/v1"]: 1}
    assert srv.fetches(kind="refs/") == {"refs/app/v1": 1}
    # Nothing the image does not use was fetched (v2's own objects, "other", "many").
    assert node.objects() == set(needs)


def test_pull_into_partly_filled_store_fetches_only_what_it_lacks(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1")
    mark = len(srv.entries())
    before = node.objects()
    out = node.pull_ok(srv.url, "app/v2")
    assert_has_image(node, served, "app/v2")
    assert_has_image(node, served, "app/v1")
    lacking = served.only_in("app/v2", "app/v1")
    shared = set(served.needs["app/v2"]) & before
    assert lacking and shared
    second = srv.entries()[mark:]
    assert object_gets(second) == expect_once(lacking)
    assert not {object_rel(h) for h in shared} & set(object_gets(second))
    assert (out["objects_missing"], out["objects_fetched"], out["bytes_fetched"]) == (
        len(lacking), len(lacking), sum(lacking.values()))


def test_objects_added_locally_are_not_fetched(served: Source, node: Node, nginx) -> None:
    """The node built v1 itself (add-image of the same tree): pulling v2 fetches only v2's own objects."""
    srv = nginx(served.path)
    res = node.run("add-image", served.trees["app/v1"], "--ref", "local/v1")
    assert res.returncode == 0, res.stderr
    assert node.refs()["local/v1"] == served.digests["app/v1"]
    node.pull_ok(srv.url, "app/v2")
    assert_has_image(node, served, "app/v2")
    assert object_gets(srv.entries()) == expect_once(served.only_in("app/v2", "app/v1"))


def test_pull_again_fetches_nothing(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v2")
    mark = len(srv.entries())
    out = node.pull_ok(srv.url, "app/v2")
    assert out["changed"] is False and out["objects_fetched"] == 0 and out["image_fetched"] is False
    assert out["previous"] == served.digests["app/v2"]
    again = srv.entries()[mark:]
    # The image's signature is asked for again (handed to the kernel if the image lacks it); nothing else.
    assert not object_gets(again) and not [e for e in again if e.path.startswith("images/") and not e.path.endswith(".sig")], again
    assert_has_image(node, served, "app/v2")


def test_object_lost_on_the_node_is_fetched_again(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1")
    lost = sorted(served.needs["app/v1"])[0]
    (node.repo / object_rel(lost)).unlink()
    mark = len(srv.entries())
    out = node.pull_ok(srv.url, "app/v1")
    assert (out["objects_missing"], out["objects_fetched"], out["changed"]) == (1, 1, True)
    assert object_gets(srv.entries()[mark:]) == {object_rel(lost): 1}
    assert_has_image(node, served, "app/v1")


def test_pull_moves_a_local_ref_and_names_another(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1", "--ref", "app/current")
    assert node.refs() == {"app/current": served.digests["app/v1"]}
    out = node.pull_ok(srv.url, "app/v2", "--ref", "app/current")
    assert out["previous"] == served.digests["app/v1"] and out["changed"] is True
    assert node.refs() == {"app/current": served.digests["app/v2"]}
    assert_has_image(node, served, "app/v2", "app/current")


def test_dry_run_fetches_no_object_and_writes_nothing(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1")
    objects, refs, mark = node.objects(), node.refs(), len(srv.entries())
    out = node.pull_ok(srv.url, "app/v2", "--dry-run")
    lacking = served.only_in("app/v2", "app/v1")
    assert (out["objects_missing"], out["bytes_missing"]) == (len(lacking), sum(lacking.values()))
    assert out["objects_fetched"] == 0 and out["changed"] is True
    assert not object_gets(srv.entries()[mark:])
    assert (node.objects(), node.refs()) == (objects, refs)
    assert served.digests["app/v2"] not in node.images()
    node.fsck()


def test_jobs_share_keepalive_connections(served: Source, node: Node, nginx) -> None:
    """24 objects with --jobs 2: at most a couple of connections, each carrying many requests."""
    srv = nginx(served.path)
    node.pull_ok(srv.url, "many", "--jobs", "2")
    assert_has_image(node, served, "many")
    objects = [e for e in srv.entries() if e.path.startswith("objects/")]
    assert len(objects) == len(served.needs["many"])
    connections = {e.connection for e in objects}
    assert len(connections) <= 2, "objects came over %d connections with --jobs 2" % len(connections)
    assert max(e.connection_requests for e in objects) > 2


def test_pull_without_keepalive_still_works(served: Source, node: Node, nginx) -> None:
    """A server that closes every connection after one response (keepalive_timeout 0)."""
    srv = nginx(served.path, keepalive_timeout="0")
    node.pull_ok(srv.url, "app/v2", "--jobs", "3")
    assert_has_image(node, served, "app/v2")
    assert all(e.connection_requests == 1 for e in srv.entries())


@pytest.mark.parametrize("suffix", ["/", ""])
def test_url_forms(served: Source, node: Node, nginx, suffix: str) -> None:
    """The store's URL with and without a trailing slash."""
    srv = nginx(served.path)
    node.pull_ok(srv.url + suffix, "app/v1")
    assert_has_image(node, served, "app/v1")


def test_shared_layout_source_and_node(tmp_path: Path, nginx) -> None:
    """A source store made with --shared-layout (the C tools' 0755) serves the same; so does a node's."""
    src = build_source(tmp_path / "shared", shared_layout=True)
    assert stat.S_IMODE(os.stat(str(src.path / "objects")).st_mode) == 0o755
    srv = nginx(src.path)
    shared_node = make_node(tmp_path / "node", "--shared-layout")
    shared_node.pull_ok(srv.url, "app/v2")
    assert_has_image(shared_node, src, "app/v2")


def test_python_api(served: Source, tmp_path: Path, nginx) -> None:
    srv = nginx(served.path)
    store, _created = Store.init(tmp_path / "api-node", notice=None)
    seen = []
    opts = RemoteOptions(timeout=10.0, retries=1)
    res = pull(store, srv.url, "app/v1", ref="x/y", options=opts, jobs=3, progress=lambda *a: seen.append(a))
    out = res.as_dict()
    assert set(out) >= {"url", "remote_ref", "ref", "digest", "previous", "changed", "objects", "objects_missing",
                        "bytes_missing", "objects_fetched", "bytes_fetched", "image_fetched"}
    assert (out["remote_ref"], out["ref"], out["digest"]) == ("app/v1", "x/y", served.digests["app/v1"])
    assert store.read_ref("x/y") == served.digests["app/v1"]
    assert seen and seen[-1][0] == seen[-1][1] == out["objects_fetched"]
    store.close()
    assert_has_image(Node(tmp_path / "api-node"), served, "app/v1", "x/y")


def test_file_remote(served: Source, node: Node) -> None:
    out = node.pull_ok("file://" + str(served.path), "app/v2")
    assert out["objects_fetched"] == len(served.needs["app/v2"])
    assert_has_image(node, served, "app/v2")


def test_named_remotes(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    res = node.run("remote", "add", "origin", srv.url)
    assert res.returncode == 0, res.stderr
    res = node.run("remote", "add", "local", "file://" + str(served.path))
    assert res.returncode == 0, res.stderr
    ls = node.run("remote", "ls")
    assert ls.returncode == 0 and "origin\t" + srv.url in ls.stdout and "local\tfile://" in ls.stdout, ls.stdout
    node.pull_ok("origin", "app/v1")
    assert object_gets(srv.entries()) == expect_once(served.needs["app/v1"])
    node.pull_ok("local", "app/v2")
    assert_has_image(node, served, "app/v1")
    assert_has_image(node, served, "app/v2")
    assert node.run("remote", "rm", "origin").returncode == 0
    assert "origin" not in node.run("remote", "ls").stdout
    gone = node.pull("origin", "app/v1")
    assert gone.returncode != 0 and "origin" in gone.stderr and "Traceback" not in gone.stderr


def test_progress_line_only_on_a_terminal(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    piped = node.pull(srv.url, "app/v1")
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(node.argv("pull", srv.url, "app/v2"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=slave, timeout=120)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    shown = b"".join(chunks).decode(errors="replace")
    lacking = len(served.only_in("app/v2", "app/v1"))
    assert "%d/%d objects" % (lacking, lacking) in shown, shown


@pytest.mark.kernel
def test_pulled_image_mounts_with_the_source_tree(served: Source, node: Node, nginx, ours, tmp_path: Path) -> None:
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1")
    node.pull_ok(srv.url, "app/v2")
    for ref in ("app/v1", "app/v2"):
        where = tmp_path / ("mnt-" + ref.replace("/", "-"))
        where.mkdir()
        image = node.repo / "images" / served.digests[ref]
        res = ours.run("mount.composefs", "-o", "basedir=%s" % (node.repo / "objects"), image, where)
        assert res.returncode == 0, res.stderr
        try:
            assert tree_of(where) == tree_of(served.trees[ref])
        finally:
            done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
            assert done.returncode == 0, done.stderr


def test_chunked_responses(served: Source, node: Node, nginx) -> None:
    """Responses without Content-Length (chunked), as a filtering proxy or a CDN may send them."""
    srv = nginx(served.path, extra_server=CHUNKED)
    node.pull_ok(srv.url, "app/v2")
    assert_has_image(node, served, "app/v2")
    assert object_gets(srv.entries()) == expect_once(served.needs["app/v2"])
