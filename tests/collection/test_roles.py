# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The roles composefs_node and composefs_agent through ansible-playbook on this machine.

Local connection, every path in the test's temp dir, no service started
(systemd is not PID 1 here; the units are written for a next boot only).
- Check mode and diff mode on a fresh node (gc included): both roles succeed, say what
  they would change (the diff shows the unit and the agent configuration),
  and create nothing.
- The old role names (composefs.fleet.node, composefs.fleet.agent) and
  variable names (node_*, agent_*) still work, with a deprecation warning
  naming old and new; the new names give none.
- composefs_node_gc: gc runs last on the stores (a dropped ref's image and
  objects freed; nothing more the next time).
- The agent's unit is Type=notify-reload where systemctl --version says
  253 or newer, else Type=notify with ExecReload= sending SIGHUP.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from composefs_fleet.store import Store

from pull_play import local_host, output, recap, run_playbook  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[2]
AGENT_UNIT = "composefs-fleet-agent.service"


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "big").write_bytes(bytes(range(256)) * 40)
    (root / "small").write_text("small\n")
    return root


def agent_command(tmp: Path) -> Path:
    """The agent's command for composefs_agent_install: false (the role validates its configuration with it)."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    agent = bindir / "composefs-fleet-agent"
    agent.write_text("#!/bin/sh\nPYTHONPATH=%s exec %s -m composefs_fleet_agent \"$@\"\n" % (REPO / ".shim", sys.executable))
    agent.chmod(0o755)
    return bindir


def role_vars(tmp: Path, prefix: str = "composefs_") -> Dict[str, Dict[str, object]]:
    """Variables of both roles (node: store, image from a tree, mount; agent: watching it), under ``prefix``."""
    store, node = str(tmp / "node" / "store"), tmp / "node"
    node_vars = {
        "node_tools": "none",
        "node_unit_dir": str(node / "units"),
        "node_keys_dir": str(node / "keys"),
        "node_stores": [{"path": store}],
        "node_images": [{"store": store, "ref": "app/v1", "src": str(tmp / "src")}],
        "node_mounts": [{"path": str(node / "mnt"), "store": store, "image": "app/v1", "state": "present"}],
    }
    agent_vars = {
        "agent_install": False,
        "agent_bin_dir": str(tmp / "bin"),
        "agent_config": str(node / "etc" / "agent.json"),
        "agent_textfile": "",
        "agent_unit_dir": str(node / "units"),
        "agent_mounts": [dict(node_vars["node_mounts"][0], state="mounted")],  # type: ignore[index]
    }
    return {"node": {prefix + k: v for k, v in node_vars.items()}, "agent": {prefix + k: v for k, v in agent_vars.items()}}


def play(tmp: Path, name: str, roles: List[object], play_vars: Dict[str, object], *options: str,
         env: "Dict[str, str] | None" = None) -> "subprocess.CompletedProcess[str]":
    plays = [{"name": name, "hosts": "all", "gather_facts": False, "vars": play_vars, "roles": roles}]
    return run_playbook(tmp, name, plays, {"localhost": local_host()}, *options, env=env)


def deprecations(proc: "subprocess.CompletedProcess[str]") -> str:
    """The deprecation warnings of a run (on stderr or stdout, as the callback puts them), joined."""
    text = re.sub(r"\s+", " ", proc.stdout + proc.stderr)
    return " ".join(re.findall(r"\[DEPRECATION WARNING\]: (.*?This feature will be removed from .*? version [0-9.]*[0-9])", text))


def test_check_and_diff_on_a_fresh_node(tmp_path):
    make_tree(tmp_path / "src")
    agent_command(tmp_path)
    names = role_vars(tmp_path)
    node = tmp_path / "node"
    # Both roles with everything they install: our tools under the node dir too (a prefix, bin and sbin there),
    # and gc of the store that does not exist yet.
    node_vars = dict(names["node"], composefs_node_tools="ours", composefs_node_prefix=str(node / "lib"),
                     composefs_node_bin_dir=str(node / "bin"), composefs_node_sbin_dir=str(node / "sbin"),
                     composefs_node_mounts=[dict(names["node"]["composefs_node_mounts"][0], state="mounted")],
                     composefs_node_gc=True)
    agent_vars = dict(names["agent"], composefs_agent_install=True, composefs_agent_prefix=str(node / "lib"),
                      composefs_agent_bin_dir=str(node / "bin"), composefs_agent_packages=[])
    roles = ["composefs.fleet.composefs_node", {"role": "composefs.fleet.composefs_agent", "vars": agent_vars}]
    proc = play(tmp_path, "check", roles, node_vars, "--check", "--diff")
    assert proc.returncode == 0, output(proc)
    assert not node.exists(), sorted(str(p) for p in node.rglob("*"))  # nothing created
    counts = recap(proc)["localhost"]
    assert counts["changed"] > 0 and counts["failed"] == 0, counts
    # What would change: the store, the image, the mount (and its unit), the agent's configuration and unit.
    assert "+++ after: %s" % (node / "etc" / "agent.json") in proc.stdout, output(proc)
    assert '"where": "%s"' % (node / "mnt") in proc.stdout  # the configuration's text in the diff
    assert "+ExecStart=\"%s\"" % (node / "bin" / "composefs-fleet-agent") in proc.stdout  # the unit's text
    assert "changed: [localhost] => (item=%s)" % (node / "store") in proc.stdout
    assert "changed: [localhost] => (item=%s)" % (node / "mnt") in proc.stdout
    assert deprecations(proc) == ""


def test_old_role_and_variable_names_work_and_warn(tmp_path):
    make_tree(tmp_path / "src")
    agent_command(tmp_path)
    node = tmp_path / "node"
    old = role_vars(tmp_path, prefix="")
    roles = ["composefs.fleet.node", {"role": "composefs.fleet.agent", "vars": old["agent"]}]
    proc = play(tmp_path, "old", roles, old["node"])
    assert proc.returncode == 0, output(proc)
    # The old variables took effect: the store, the ref, the unit of the mount, the agent's configuration.
    assert (node / "store" / "refs" / "app" / "v1").exists()
    assert [p.name for p in (node / "units").iterdir() if p.name.endswith(".mount")]
    config = json.loads((node / "etc" / "agent.json").read_text())
    assert [m["where"] for m in config["mounts"]] == [str(node / "mnt")]
    assert (node / "units" / AGENT_UNIT).is_file()
    warned = deprecations(proc)
    for old_name, new_name in (("composefs.fleet.node", "composefs.fleet.composefs_node"),
                               ("composefs.fleet.agent", "composefs.fleet.composefs_agent")):
        assert "the role name %s is deprecated, use %s instead" % (old_name, new_name) in warned, output(proc)
    for name in ("node_tools", "node_unit_dir", "node_stores", "node_images", "node_mounts", "node_keys_dir"):
        assert "the variable %s is deprecated, set composefs_%s instead" % (name, name) in warned, output(proc)
    for name in ("agent_install", "agent_config", "agent_mounts", "agent_unit_dir"):
        assert "the variable %s is deprecated, set composefs_%s instead" % (name, name) in warned, output(proc)
    assert "removed from collection 'composefs.fleet' version 1.0.0" in warned, warned

    # The same node under the new names: nothing to change, no warning.
    new = role_vars(tmp_path)
    roles = ["composefs.fleet.composefs_node", {"role": "composefs.fleet.composefs_agent", "vars": new["agent"]}]
    proc = play(tmp_path, "new", roles, new["node"])
    assert proc.returncode == 0, output(proc)
    assert recap(proc)["localhost"]["changed"] == 0, output(proc)
    assert deprecations(proc) == "", output(proc)


def test_node_role_gc(tmp_path):
    make_tree(tmp_path / "src")
    (tmp_path / "src2").mkdir()
    (tmp_path / "src2" / "only-v2").write_bytes(bytes(range(255, -1, -1)) * 50)
    names = role_vars(tmp_path)["node"]
    store = tmp_path / "node" / "store"
    images = names["composefs_node_images"] + [{"store": str(store), "ref": "app/v2", "src": str(tmp_path / "src2")}]
    proc = play(tmp_path, "build", ["composefs.fleet.composefs_node"], dict(names, composefs_node_images=images))
    assert proc.returncode == 0, output(proc)
    with Store.open(store, notice=None) as s:
        v1, v2 = s.read_ref("app/v1"), s.read_ref("app/v2")
    objects = sorted(p.relative_to(store) for p in (store / "objects").glob("*/*"))
    # app/v2 dropped: in check mode gc reports nothing to free yet (the ref is still there), nothing removed.
    images[1]["state"] = "absent"
    gc_vars = dict(names, composefs_node_images=images, composefs_node_gc=True)
    proc = play(tmp_path, "check", ["composefs.fleet.composefs_node"], gc_vars, "--check")
    assert proc.returncode == 0, output(proc)
    assert (store / "images" / v2).exists() and (store / "refs" / "app" / "v2").exists()
    # For real: the ref goes, then gc frees v2's image and the object only v2 used; v1 (its ref) stays.
    proc = play(tmp_path, "gc", ["composefs.fleet.composefs_node"], gc_vars)
    assert proc.returncode == 0, output(proc)
    assert "TASK [composefs.fleet.composefs_node : Store maintenance, garbage collection" in proc.stdout
    assert not (store / "images" / v2).exists() and (store / "images" / v1).exists()
    left = sorted(p.relative_to(store) for p in (store / "objects").glob("*/*"))
    assert len(left) == len(objects) - 1 and set(left) < set(objects)
    # Nothing more to collect: no change.
    proc = play(tmp_path, "again", ["composefs.fleet.composefs_node"], gc_vars)
    assert proc.returncode == 0, output(proc)
    assert recap(proc)["localhost"]["changed"] == 0, output(proc)


def fake_systemctl(tmp: Path, version: "int | None") -> Dict[str, str]:
    """A PATH whose first systemctl prints ``systemd VERSION`` (None: one that fails as a missing command does)."""
    bindir = tmp / ("systemctl-%s" % version)
    bindir.mkdir()
    tool = bindir / "systemctl"
    if version is None:
        tool.write_text("#!/bin/sh\necho 'systemctl: command not found' >&2\nexit 127\n")
    else:
        tool.write_text("#!/bin/sh\necho 'systemd %d (%d.1-1)'\necho '+PAM +AUDIT'\n" % (version, version))
    tool.chmod(0o755)
    return {"PATH": "%s:%s:%s" % (bindir, Path(sys.executable).parent, os.environ.get("PATH", ""))}


def test_agent_unit_type_follows_systemd_version(tmp_path):
    agent_command(tmp_path)
    names = role_vars(tmp_path)
    unit = tmp_path / "node" / "units" / AGENT_UNIT
    unit.parent.mkdir(parents=True)  # the role writes into an existing unit directory
    agent_vars = dict(names["agent"], composefs_agent_mounts=[])
    for version, unit_type in ((257, "notify-reload"), (253, "notify-reload"), (252, "notify"), (None, "notify")):
        env = fake_systemctl(tmp_path, version)
        proc = play(tmp_path, "unit-%s" % version, ["composefs.fleet.composefs_agent"], agent_vars, env=env)
        assert proc.returncode == 0, output(proc)
        text = unit.read_text()
        assert re.findall(r"^Type=(.*)$", text, re.M) == [unit_type], text
        # notify-reload: systemd sends SIGHUP itself and waits for READY=1; notify: ExecReload= sends it.
        assert ("ExecReload=/bin/kill -HUP $MAINPID" in text) == (unit_type == "notify"), text
