# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The node and agent roles with a store refused by the owner check (sshd StrictModes).

ansible-playbook runs both roles on this machine (local connection, no tools
installed, units and the agent's configuration in a temp dir, mounts only as
units: nothing is mounted).  A group-writable store listed in ``composefs_node_stores``
with ``allow_foreign_owner`` is accepted by the store task and, through the
role, by the image and mount tasks of that store (its path given with a
trailing slash there); without the key the role fails on it.  The agent role
reads nothing in the store (a mount by ref is written with its ref only).  ``shared_layout`` makes a new store 0755.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from composefs_fleet.store import Store
from composefs_fleet.systemd_unit import unit_name

from pull_play import local_host, run_playbook  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[2]


def run_play(tmp: Path, name: str, play_vars: dict, roles: list, tasks: "list | None" = None,
             options: "list[str] | None" = None) -> "subprocess.CompletedProcess[str]":
    """ansible-playbook of one play on localhost (local connection); ``options`` such as --check."""
    play = [{"name": name, "hosts": "all", "gather_facts": False, "vars": play_vars, "roles": roles,
             "tasks": tasks or []}]
    return run_playbook(tmp, name, play, {"localhost": local_host()}, *(options or []))


def test_roles_pass_allow_foreign_owner_and_shared_layout(tmp_path):
    store = tmp_path / "store"
    Store.init(store, notice=None)
    os.chmod(store, 0o770)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "big").write_bytes(os.urandom(5000))
    (src / "small").write_text("small\n")
    # The agent's command (composefs_agent_install: false): this checkout's agent.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    agent = bindir / "composefs-fleet-agent"
    agent.write_text("#!/bin/sh\nPYTHONPATH=%s exec %s -m composefs_fleet_agent \"$@\"\n"
                     % (REPO / ".shim", sys.executable))
    agent.chmod(0o755)
    mnt = tmp_path / "mnt"
    units = tmp_path / "units"
    play_vars = {
        "composefs_node_tools": "none",
        "composefs_node_unit_dir": str(units),
        "composefs_node_stores": [{"path": str(store), "allow_foreign_owner": True},
                                  {"path": str(tmp_path / "shared"), "shared_layout": True}],
        "composefs_node_images": [{"store": str(store) + "/", "ref": "app/v1", "src": str(src)}],
        "composefs_node_mounts": [{"path": str(mnt), "store": str(store) + "/", "image": "app/v1", "state": "present"}],
    }
    agent_vars = {"composefs_agent_install": False, "composefs_agent_bin_dir": str(bindir),
                  "composefs_agent_config": str(tmp_path / "agent.json"),
                  "composefs_agent_textfile": "", "composefs_agent_unit_dir": str(units),
                  # Watched (state mounted): written with its ref.
                  "composefs_agent_mounts": [dict(play_vars["composefs_node_mounts"][0], state="mounted")]}
    roles = ["composefs.fleet.composefs_node", {"role": "composefs.fleet.composefs_agent", "vars": agent_vars}]
    proc = run_play(tmp_path, "allowed", play_vars, roles)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert os.stat(store).st_mode & 0o777 == 0o770  # an existing store keeps its modes
    assert os.stat(tmp_path / "shared").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "shared" / "objects").st_mode & 0o777 == 0o755
    assert (units / unit_name(str(mnt))).is_file()
    config = json.loads((tmp_path / "agent.json").read_text())
    assert config["mounts"] == [{"where": str(mnt), "remount": False, "ref": "app/v1"}]

    # Without the key, the store (and so everything in it) is refused.
    play_vars["composefs_node_stores"] = [{"path": str(store)}]
    proc = run_play(tmp_path, "refused", play_vars, ["composefs.fleet.composefs_node"])
    assert proc.returncode != 0
    assert "is writable by its group (mode 0770)" in proc.stdout and "allow_foreign_owner" in proc.stdout, \
        proc.stdout[-6000:]
    # The agent role does not open the store (the agent reads the mount history on the node): no refusal.
    agent_vars["composefs_agent_stores"] = [{"path": str(store)}]
    proc = run_play(tmp_path, "agent-alone", play_vars, [{"role": "composefs.fleet.composefs_agent", "vars": agent_vars}])
    assert proc.returncode == 0, proc.stdout[-6000:]
