# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The role composefs_agent installs the journal catalog with the agent (ansible-playbook on this machine).

Every path in the test's temp dir: the catalog goes to a directory journalctl
does not read, so the handler (journalctl --update-catalog) is skipped and the
machine's catalog database is left alone; the guest test shows journalctl -x
using the catalog the role installed (tests/guest/test_guest_agent.py).
"""
from __future__ import annotations

import re
from pathlib import Path

from pull_play import local_host, output, recap, run_playbook  # type: ignore[import-not-found]
from test_roles import agent_command  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "agent" / "catalog" / "composefs-fleet-agent.catalog"


def _play(tmp: Path, name: str, agent_vars: dict, *options: str):
    plays = [{"name": name, "hosts": "all", "gather_facts": False, "vars": agent_vars,
              "roles": ["composefs.fleet.composefs_agent"]}]
    return run_playbook(tmp, name, plays, {"localhost": local_host()}, *options)


def _result(stdout: str, task: str) -> str:
    """What a task of the role printed ("" when it did not run)."""
    m = re.search(r"TASK \[composefs\.fleet\.composefs_agent : %s\] \**\n(.*?)\n\n" % re.escape(task), stdout, re.S)
    return m.group(1).strip() if m else ""


def _vars(tmp: Path, **extra: object) -> dict:
    node = tmp / "node"
    out = {"composefs_agent_install": True, "composefs_agent_prefix": str(node / "lib"),
           "composefs_agent_bin_dir": str(node / "bin"), "composefs_agent_packages": [],
           "composefs_agent_config": str(node / "etc" / "agent.json"), "composefs_agent_textfile": "",
           "composefs_agent_unit_dir": str(node / "units"), "composefs_agent_mounts": [], "composefs_agent_stores": [],
           "composefs_agent_catalog_dir": str(node / "catalog")}
    out.update(extra)
    (node / "units").mkdir(parents=True, exist_ok=True)
    return out


def test_the_catalog_is_installed_with_the_agent_once(tmp_path: Path):
    installed = tmp_path / "node" / "catalog" / CATALOG.name
    agent_vars = _vars(tmp_path)
    check = _play(tmp_path, "check", agent_vars, "--check")
    assert check.returncode == 0, output(check)
    assert not installed.parent.exists()
    assert "changed: [localhost]" in check.stdout and "Journal catalog of the agent's MESSAGE_IDs" in check.stdout

    first = _play(tmp_path, "first", agent_vars)
    assert first.returncode == 0, output(first)
    assert installed.read_bytes() == CATALOG.read_bytes()
    assert oct(installed.stat().st_mode & 0o7777) == "0o644"
    # Not a directory journalctl reads: the handler leaves the machine's catalog database alone.
    assert "RUNNING HANDLER [composefs.fleet.composefs_agent : Update the journal catalog]" in first.stdout, output(first)
    handler = first.stdout.split("Update the journal catalog]", 1)[1].split("\n\n", 1)[0]
    assert "skipping: [localhost]" in handler, output(first)

    second = _play(tmp_path, "second", agent_vars)
    assert second.returncode == 0, output(second)
    assert recap(second)["localhost"]["changed"] == 0, output(second)


def test_the_catalog_goes_when_the_package_brings_the_agent_or_the_agent_goes(tmp_path: Path):
    # composefs_agent_packaged: the package installs its own catalog under /usr/lib. Its configuration
    # must be /etc/composefs-fleet/agent.json, which a test may not write on this machine: check mode.
    installed = tmp_path / "node" / "catalog" / CATALOG.name
    first = _play(tmp_path, "install", _vars(tmp_path))
    assert first.returncode == 0 and installed.is_file(), output(first)
    packaged = _play(tmp_path, "packaged", _vars(tmp_path, composefs_agent_packaged=True,
                                                 composefs_agent_config="/etc/composefs-fleet/agent.json"), "--check")
    assert packaged.returncode == 0 and installed.is_file(), output(packaged)
    assert _result(packaged.stdout, "Journal catalog of the agent's MESSAGE_IDs removed (the package brings its own, or the "
                                    "agent goes)") == "changed: [localhost]", output(packaged)
    # composefs_agent_state: absent, for real.
    gone = _play(tmp_path, "remove", _vars(tmp_path, composefs_agent_state="absent"))
    assert gone.returncode == 0, output(gone)
    assert not installed.exists()
    assert _result(gone.stdout, "Journal catalog of the agent's MESSAGE_IDs removed (the package brings its own, or the "
                                "agent goes)") == "changed: [localhost]", output(gone)
    again = _play(tmp_path, "remove-again", _vars(tmp_path, composefs_agent_state="absent"))
    assert again.returncode == 0 and recap(again)["localhost"]["changed"] == 0, output(again)


def test_no_catalog_without_installing_the_agent_or_with_an_empty_directory(tmp_path: Path):
    for extra in ({"composefs_agent_catalog_dir": ""}, {"composefs_agent_install": False}):
        agent_vars = _vars(tmp_path, **extra)
        proc = _play(tmp_path, "none", agent_vars, "--check")
        assert proc.returncode == 0, output(proc)
        for task in ("Directory of local journal catalogs", "Journal catalog of the agent's MESSAGE_IDs",
                     "Journal catalog of the agent's MESSAGE_IDs removed (the package brings its own, or the agent goes)"):
            assert _result(proc.stdout, task) in ("", "skipping: [localhost]"), (extra, task, output(proc))
    assert not (tmp_path / "node" / "catalog").exists()
    # Installed by other means (composefs_agent_install: false): a catalog there is left as it is.
    installed = tmp_path / "node" / "catalog" / CATALOG.name
    installed.parent.mkdir(parents=True)
    installed.write_text("kept\n")
    proc = _play(tmp_path, "keep", _vars(tmp_path, composefs_agent_install=False,
                                         composefs_agent_bin_dir=str(agent_command(tmp_path))))
    assert proc.returncode == 0, output(proc)
    assert installed.read_text() == "kept\n"


def test_a_relative_catalog_directory_is_refused(tmp_path: Path):
    proc = _play(tmp_path, "relative", _vars(tmp_path, composefs_agent_catalog_dir="usr/local/lib/systemd/catalog"))
    assert proc.returncode != 0
    assert "usr/local/lib/systemd/catalog" in proc.stdout and "must be absolute" in proc.stdout, output(proc)
