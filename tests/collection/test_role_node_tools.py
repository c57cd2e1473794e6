# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The node role's loose tools (composefs_node_tools: ours): dpkg ownership, manifest, uninstall.

- install_tools.py refuses to overwrite a file a Debian package owns, asked of
  this machine's real dpkg database (dpkg-query -S), also when the destination
  is named through a directory link (merged /usr); nothing is written.  The
  destination is a real package's file: the script runs in a private mount
  namespace with a temp dir bound over that file's directory, so that even a
  broken check could only write into the temp dir.
- What it installs is listed in its manifest; --uninstall removes exactly that,
  keeping a file another role's manifest lists, a file changed since, and
  anything it did not install; --check removes nothing.
- The role: tools installed, the same run again changes nothing,
  composefs_node_tools_state: absent in check mode predicts and removes nothing,
  then removes the tools (a stranger's file in the same directories stays), and
  again changes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from pull_play import local_host, output, recap, run_playbook  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "roles" / "composefs_node" / "files" / "install_tools.py"
# Package files whose directory a test may hide under a bind mount (documentation: nothing the test runs needs it).
OWNED_CANDIDATES = ("/usr/share/doc/coreutils/copyright", "/usr/share/doc/bash/copyright", "/usr/share/doc/dpkg/copyright",
                    "/usr/share/doc/libc6/copyright")


def bundle(tmp: Path, commands: Dict[str, str], role: str = "composefs_node") -> Path:
    """A small bundle: package demo (demo.cli prints hi) and ``commands``."""
    path = tmp / ("%s-bundle.json" % role)
    path.write_text(json.dumps({"role": role, "packages": {"demo": {"__init__.py": "", "cli.py": "def main():\n    print('hi')\n"}},
                                "commands": commands}))
    return path


def installer(*args: str, wrap: Optional[List[str]] = None) -> "tuple[int, dict]":
    proc = subprocess.run((wrap or []) + [sys.executable, str(INSTALLER), *args], capture_output=True, text=True, timeout=120)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError:
        raise AssertionError("no JSON from install_tools.py (exit %d): %s %s" % (proc.returncode, proc.stdout, proc.stderr))


def dpkg_owner(path: str) -> Optional[str]:
    proc = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True)
    return proc.stdout.split(":")[0] if proc.returncode == 0 else None


def files_under(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_refuses_to_overwrite_a_file_a_package_owns(tmp_path):
    if shutil.which("dpkg-query") is None:
        pytest.skip("dpkg-query is missing: no Debian package database to ask")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) (util-linux) for a private mount namespace over the package's directory")
    found = [(p, dpkg_owner(p)) for p in OWNED_CANDIDATES if os.path.isdir(os.path.dirname(p))]
    found = [(p, owner) for p, owner in found if owner]
    if not found:
        pytest.skip("none of %s is owned by an installed package here" % ", ".join(OWNED_CANDIDATES))
    owned, package = found[0]
    shadow, prefix = tmp_path / "shadow", tmp_path / "prefix"
    shadow.mkdir()
    # The same file named through a link to its directory: dpkg knows it only by the real name.
    (tmp_path / "alias").symlink_to(os.path.dirname(owned))
    aliased = str(tmp_path / "alias" / os.path.basename(owned))
    for destination in (owned, aliased):
        spec = bundle(tmp_path, {destination: "demo.cli", str(tmp_path / "bin" / "demo"): "demo.cli"})
        wrap = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$0" "$1" && shift && exec "$@"', str(shadow), os.path.dirname(owned)]
        rc, result = installer("--bundle", str(spec), "--prefix", str(prefix), "--python", sys.executable, wrap=wrap)
        assert rc == 1 and result["failed"] is True, result
        assert "%s (package %s)" % (destination, package) in result["msg"], result
        assert "nothing was written" in result["msg"]
        assert files_under(shadow) == [] and not prefix.exists() and not (tmp_path / "bin").exists()
    assert dpkg_owner(owned) == package and os.path.isfile(owned)  # the real file: untouched


def test_manifest_and_uninstall(tmp_path):
    prefix, bindir = tmp_path / "prefix", tmp_path / "bin"
    spec = bundle(tmp_path, {str(bindir / "demo"): "demo.cli", str(bindir / "demo2"): "demo.cli"})
    rc, result = installer("--bundle", str(spec), "--prefix", str(prefix), "--python", sys.executable)
    assert rc == 0 and result["changed"] is True, result
    manifest = json.loads((prefix / "composefs_node.manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted([str(bindir / "demo"), str(bindir / "demo2"), str(prefix / "demo" / "__init__.py"),
                                                str(prefix / "demo" / "cli.py"), str(spec)])
    assert subprocess.run([str(bindir / "demo")], capture_output=True, text=True).stdout == "hi\n"
    rc, result = installer("--bundle", str(spec), "--prefix", str(prefix), "--python", sys.executable)
    assert rc == 0 and result == {"changed": False, "written": [], "removed": []}, result

    # The agent role's manifest lists the core too; one command was changed by hand; a stranger's file sits beside.
    other = bundle(tmp_path, {str(bindir / "agent"): "demo.cli"}, role="composefs_agent")
    rc, result = installer("--bundle", str(other), "--prefix", str(prefix), "--python", sys.executable)
    assert rc == 0, result
    (bindir / "demo2").write_text("#!/bin/sh\necho mine\n")
    (bindir / "stranger").write_text("not ours\n")
    before = files_under(tmp_path)
    rc, result = installer("--uninstall", "--role", "composefs_node", "--prefix", str(prefix), "--check")
    assert rc == 0 and result["changed"] is True and str(bindir / "demo") in result["removed"], result
    assert files_under(tmp_path) == before  # --check: nothing removed

    rc, result = installer("--uninstall", "--role", "composefs_node", "--prefix", str(prefix))
    assert rc == 0 and result["changed"] is True, result
    assert sorted(result["removed"]) == sorted([str(bindir / "demo"), str(spec), str(prefix / "composefs_node.manifest.json")])
    kept = {k["path"]: k["why"] for k in result["kept"]}
    assert kept == {str(bindir / "demo2"): "it changed since it was installed",
                    str(prefix / "demo" / "__init__.py"): "another role's manifest lists it",
                    str(prefix / "demo" / "cli.py"): "another role's manifest lists it"}, kept
    assert (bindir / "stranger").read_text() == "not ours\n" and (bindir / "agent").is_file()
    rc, result = installer("--uninstall", "--role", "composefs_node", "--prefix", str(prefix))
    assert rc == 0 and result["changed"] is False and result["removed"] == [], result
    # The agent's turn: the shared core goes with it, then the empty prefix.
    rc, result = installer("--uninstall", "--role", "composefs_agent", "--prefix", str(prefix))
    assert rc == 0 and str(prefix / "demo" / "cli.py") in result["removed"], result
    assert not prefix.exists()
    assert files_under(bindir) == ["demo2", "stranger"]


def test_bad_manifest_is_refused_naming_it(tmp_path):
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "composefs_node.manifest.json").write_text('{"files": {"relative": "x"}}')
    rc, result = installer("--uninstall", "--role", "composefs_node", "--prefix", str(prefix))
    assert rc == 1 and "manifest %s" % (prefix / "composefs_node.manifest.json") in result["msg"], result


def node_play(tmp: Path, name: str, state: str, *options: str) -> "subprocess.CompletedProcess[str]":
    node = tmp / "node"
    play_vars = {"composefs_node_tools": "ours", "composefs_node_tools_state": state,
                 "composefs_node_prefix": str(node / "lib"), "composefs_node_bin_dir": str(node / "bin"),
                 "composefs_node_sbin_dir": str(node / "sbin"),
                 "composefs_node_fsverity_keys_command": str(node / "sbin" / "composefs-fsverity-keys"),
                 "composefs_node_unit_dir": str(node / "units"), "composefs_node_keys_dir": str(node / "keys")}
    plays = [{"name": name, "hosts": "all", "gather_facts": False, "vars": play_vars, "roles": ["composefs.fleet.composefs_node"]}]
    return run_playbook(tmp, name, plays, {"localhost": local_host()}, *options)


def test_role_installs_and_removes_its_tools(tmp_path):
    node = tmp_path / "node"
    proc = node_play(tmp_path, "install", "present")
    assert proc.returncode == 0, output(proc)
    commands = sorted(p.name for p in (node / "bin").iterdir()) + sorted(p.name for p in (node / "sbin").iterdir())
    assert commands == ["composefs-info", "composefs-store", "mkcomposefs", "composefs-fsverity-keys", "mount.composefs"]
    manifest = json.loads((node / "lib" / "composefs_node.manifest.json").read_text())["files"]
    assert str(node / "sbin" / "mount.composefs") in manifest and str(node / "lib" / "bundle.json") in manifest
    res = subprocess.run([str(node / "bin" / "mkcomposefs"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "mkcomposefs" in res.stdout
    proc = node_play(tmp_path, "again", "present")
    assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 0, output(proc)

    (node / "bin" / "stranger").write_text("someone else's\n")
    before = files_under(node)
    proc = node_play(tmp_path, "absent-check", "absent", "--check")
    assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 1, output(proc)
    assert files_under(node) == before
    proc = node_play(tmp_path, "absent", "absent")
    assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 1, output(proc)
    # Only what is not the role's is left: the stranger and the (empty) directories the role does not own.
    assert files_under(node) == ["bin", "bin/stranger", "sbin"], files_under(node)
    proc = node_play(tmp_path, "absent-again", "absent")
    assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 0, output(proc)
