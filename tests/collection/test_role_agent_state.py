# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent role's install modes: composefs_agent_state: absent, and the packaged agent.

Local connection, every path in the test's temp dir, no service (systemd is
not PID 1 here).
- Installed from the collection, then absent: the role's unit and the agent's
  code go, the configuration stays, a unit someone else wrote stays; again:
  nothing to change.
- Packaged (composefs_agent_packaged): a configuration path the package's unit
  does not read is refused; in check mode the role says it would remove its own
  earlier unit and loose code (they would shadow the package's) and touches
  nothing; the package's /etc/composefs-fleet/agent.json is not written.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from pull_play import local_host, output, recap, run_playbook  # type: ignore[import-not-found]

AGENT_UNIT = "composefs-fleet-agent.service"


def agent_play(tmp: Path, name: str, extra: dict, *options: str) -> "subprocess.CompletedProcess[str]":
    node = tmp / "node"
    play_vars = {"composefs_agent_prefix": str(node / "lib"), "composefs_agent_bin_dir": str(node / "bin"),
                 "composefs_agent_packages": [], "composefs_agent_config": str(node / "etc" / "agent.json"),
                 "composefs_agent_textfile": "", "composefs_agent_unit_dir": str(node / "units"),
                 "composefs_agent_mounts": [], "composefs_agent_stores": [],
                 # Not the machine's /usr/local/lib/systemd/catalog (the handler updates only the system's).
                 "composefs_agent_catalog_dir": str(node / "catalog")}
    play_vars.update(extra)
    plays = [{"name": name, "hosts": "all", "gather_facts": False, "vars": play_vars, "roles": ["composefs.fleet.composefs_agent"]}]
    return run_playbook(tmp, name, plays, {"localhost": local_host()}, *options)


def test_agent_absent_removes_unit_and_code_keeps_configuration(tmp_path):
    node = tmp_path / "node"
    (node / "units").mkdir(parents=True)
    proc = agent_play(tmp_path, "install", {})
    assert proc.returncode == 0, output(proc)
    assert (node / "bin" / "composefs-fleet-agent").is_file() and (node / "units" / AGENT_UNIT).is_file()
    assert (node / "lib" / "composefs_agent.manifest.json").is_file()
    assert (node / "catalog" / "composefs-fleet-agent.catalog").is_file()
    config = (node / "etc" / "agent.json").read_text()
    (node / "units" / "other.service").write_text("[Service]\nExecStart=/bin/true\n")

    proc = agent_play(tmp_path, "absent-check", {"composefs_agent_state": "absent"}, "--check")
    # The unit, the loose code and the journal catalog would go.
    assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 3, output(proc)
    assert (node / "units" / AGENT_UNIT).is_file() and (node / "bin" / "composefs-fleet-agent").is_file()
    proc = agent_play(tmp_path, "absent", {"composefs_agent_state": "absent"})
    assert proc.returncode == 0, output(proc)
    assert not (node / "units" / AGENT_UNIT).exists() and not (node / "lib").exists()
    assert not (node / "catalog" / "composefs-fleet-agent.catalog").exists()
    assert sorted(p.name for p in (node / "bin").iterdir()) == []
    assert (node / "etc" / "agent.json").read_text() == config  # configuration kept
    assert (node / "units" / "other.service").is_file()
    proc = agent_play(tmp_path, "absent-again", {"composefs_agent_state": "absent"})
    assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 0, output(proc)


def test_packaged_agent(tmp_path):
    node = tmp_path / "node"
    (node / "units").mkdir(parents=True)
    proc = agent_play(tmp_path, "loose", {})
    assert proc.returncode == 0, output(proc)
    proc = agent_play(tmp_path, "other-config", {"composefs_agent_packaged": True})
    assert proc.returncode != 0, output(proc)
    assert "composefs_agent_config must be that file, not %s" % (node / "etc" / "agent.json") in proc.stdout, output(proc)

    before = sorted(str(p) for p in node.rglob("*"))
    etc = Path("/etc/composefs-fleet/agent.json")
    had = etc.read_bytes() if etc.exists() else None
    packaged = {"composefs_agent_packaged": True, "composefs_agent_config": str(etc), "composefs_agent_bin_dir": str(node / "bin")}
    proc = agent_play(tmp_path, "packaged-check", packaged, "--check", "--diff")
    assert proc.returncode == 0, output(proc)
    assert sorted(str(p) for p in node.rglob("*")) == before
    assert (etc.read_bytes() if etc.exists() else None) == had
    for task in ("The agent's loose files removed (from the manifest composefs_agent.manifest.json)", "The role's own unit removed"):
        assert "TASK [composefs.fleet.composefs_agent : %s]" % task in proc.stdout, output(proc)
    assert "changed: [localhost] => (item=%s)" % (node / "units" / AGENT_UNIT) in proc.stdout, output(proc)
    # The role's unit template is not used: the package's unit is.
    assert re.search(r"TASK \[composefs.fleet.composefs_agent : Unit composefs-fleet-agent.service\] \**\nskipping: ", proc.stdout), output(proc)
    assert json.loads((node / "lib" / "composefs_agent.manifest.json").read_text())["files"]
