# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The fleet drill: 50 nodes pull v1, then v2, from one nginx with 10 forks; a second run changes nothing.

Each node is an inventory host with the local connection and its own store
(host variable ``store_root`` under the test's temp dir); the play runs the
node role (no tools installed: ``composefs_node_tools: none``), whose image items pull
``app/current`` from the served store.  What is checked is read from the node
stores' directories and from nginx's access log, not from the modules'
answers alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from composefs_fleet.store import Store
from composefs_fleet.store_fsck import check as fsck

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "collection"))
from pull_play import local_host, make_remote, object_path, output, recap, run_playbook  # noqa: E402

from nginx_server import nginx  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.network

NODES = 50
FORKS = 10


def node_ref(root: Path) -> str:
    return (root / "refs" / "app" / "current").read_text().strip()


def test_fifty_nodes_pull_v1_then_v2_and_converge(tmp_path, nginx):
    remote = tmp_path / "remote" / "store"
    remote.parent.mkdir()
    releases = make_remote(remote)
    v1, v2 = releases["app/v1"], releases["app/v2"]
    only_v2 = set(v2.objects) - set(v1.objects)
    assert only_v2 and set(v2.objects) & set(v1.objects)  # v2 shares objects with v1 and has new ones
    srv = nginx(remote)

    roots = {"node%02d" % i: tmp_path / "nodes" / ("node%02d" % i) / "store" for i in range(NODES)}
    hosts = {name: local_host(store_root=str(root)) for name, root in roots.items()}
    play_vars = {
        "composefs_node_tools": "none",
        "composefs_node_stores": [{"path": "{{ store_root }}"}],
        "composefs_node_images": [{"store": "{{ store_root }}", "ref": "app/current", "remote": srv.url,
                         "remote_ref": "{{ release }}", "jobs": 4}],
    }
    plays = [{"name": "fleet", "hosts": "all", "gather_facts": False, "vars": play_vars,
              "roles": ["composefs.fleet.composefs_node"]}]

    def converge(release: str, expect_changed: bool) -> None:
        # Pipelining: each module runs from the interpreter's stdin, no temp files per task (fewer forks and writes).
        proc = run_playbook(tmp_path, "fleet", plays, hosts, "-f", str(FORKS), "-e", "release=%s" % release,
                            env={"ANSIBLE_PIPELINING": "1"})
        assert proc.returncode == 0, output(proc)
        counts = recap(proc)
        assert sorted(counts) == sorted(roots), output(proc)
        failed = {h: c for h, c in counts.items() if c.get("failed") or c.get("unreachable")}
        assert not failed, output(proc)
        changed = {h for h, c in counts.items() if c["changed"]}
        assert changed == (set(roots) if expect_changed else set()), output(proc)

    converge("app/v1", True)
    assert {name: node_ref(root) for name, root in roots.items()} == {name: v1.digest for name in roots}
    # Every node fetched each object of v1 once.
    assert srv.fetches(kind="objects/") == {object_path(h): NODES for h in v1.objects}

    converge("app/v2", True)
    assert {name: node_ref(root) for name, root in roots.items()} == {name: v2.digest for name in roots}
    # Only what v2 added travelled: the objects shared with v1 were not fetched again.
    fetched = srv.fetches(kind="objects/")
    assert {p: n for p, n in fetched.items()} == dict({object_path(h): NODES for h in v1.objects},
                                                      **{object_path(h): NODES for h in only_v2})
    assert srv.fetches(kind="images/") == {"images/" + v1.digest: NODES, "images/" + v2.digest: NODES}

    converge("app/v2", False)
    assert srv.fetches(kind="objects/") == fetched  # nothing fetched by the idempotent run

    for name in ("node00", "node24", "node49"):
        with Store.open(roots[name], notice=None) as store:
            report = fsck(store)
        assert report.clean, (name, report.errors)
        for hexd in v2.objects:
            assert (roots[name] / object_path(hexd)).read_bytes() == (remote / object_path(hexd)).read_bytes()
