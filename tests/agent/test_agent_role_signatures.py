# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent role writes the signed-ref keys into agent.json: ansible-playbook on this machine.

Local connection, composefs_agent_install false (this checkout's agent as the command),
units in a temp dir, nothing mounted. A mount by ref carries its ref and the
configuration its trusted and revoked keys; the role's validation
(``--check-config``) refuses a trusted key path that does not exist.
"""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image

REPO = Path(__file__).resolve().parents[2]


def _pull_play() -> ModuleType:
    """tests/collection/pull_play.py (its playbook runner): tests/collection is on sys.path only when
    its own tests are collected."""
    if str(REPO / "tests" / "collection") not in sys.path:
        sys.path.append(str(REPO / "tests" / "collection"))
    return importlib.import_module("pull_play")


def test_role_writes_ref_and_keys_and_refuses_a_missing_key(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test's ed25519 key)")
    pytest.importorskip("cryptography", reason="the Python package cryptography (python3-cryptography) is missing")
    play = _pull_play()
    store = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(bytes(range(256)) * 40)
    with Store.init(store, notice=None)[0] as s:
        digest = add_image(s, str(src), "app/v1").digest
    trusted, revoked = tmp_path / "trusted.d", tmp_path / "revoked.d"
    trusted.mkdir()
    revoked.mkdir()
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "k.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "k.pem"), "-pubout", "-out", str(trusted / "k.pub")],
                   check=True)
    # The agent's command (composefs_agent_install: false): the console script next to this Python, which
    # imports the agent from PYTHONPATH (this checkout's, as for every CLI the tests run).
    installed = Path(sys.executable).parent / "composefs-fleet-agent"
    if not installed.is_file():
        pytest.skip("%s is not installed (pip install -e . installs it)" % installed)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    agent = bindir / "composefs-fleet-agent"
    agent.symlink_to(installed)
    config = tmp_path / "agent.json"
    (tmp_path / "units").mkdir()
    agent_vars = {"composefs_agent_install": False, "composefs_agent_bin_dir": str(bindir), "composefs_agent_config": str(config),
                  "composefs_agent_textfile": "", "composefs_agent_unit_dir": str(tmp_path / "units"), "composefs_agent_stores": [],
                  "composefs_agent_trusted_keys": [str(trusted)], "composefs_agent_revoked_keys": [str(revoked)],
                  "composefs_agent_mounts": [{"path": str(tmp_path / "mnt"), "store": str(store), "image": "app/v1"},
                                   {"path": str(tmp_path / "mnt2"), "store": str(store), "image": digest}]}

    def run(name: str) -> "subprocess.CompletedProcess[str]":
        plays = [{"name": name, "hosts": "all", "gather_facts": False,
                  "roles": [{"role": "composefs.fleet.composefs_agent", "vars": agent_vars}]}]
        return play.run_playbook(tmp_path, name, plays, {"localhost": play.local_host()})

    proc = run("signed")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads(config.read_text())
    assert doc["trusted_keys"] == [str(trusted)] and doc["revoked_keys"] == [str(revoked)]
    by_ref, by_digest = doc["mounts"]
    # By ref: the ref only (the agent reads the image from the mount history), never the digest it names now.
    assert by_ref == {"where": str(tmp_path / "mnt"), "remount": False, "ref": "app/v1"}, by_ref
    assert "ref" not in by_digest, by_digest  # named by digest: no ref, no signature to check
    assert by_digest["image"] == "%s/images/%s" % (store, digest) and by_digest["digest"] == digest, by_digest
    # What the role wrote is what the agent reads: the ref mount's signature is checked.
    check = subprocess.run([str(agent), "--check-config", "--config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    agent_vars["composefs_agent_trusted_keys"] = [str(tmp_path / "no-such.d")]
    proc = run("missing-key")
    assert proc.returncode != 0
    assert "keys: key file %s: No such file or directory" % (tmp_path / "no-such.d") in proc.stdout, proc.stdout[-6000:]
    # The validation kept the old configuration in place.
    assert json.loads(config.read_text())["trusted_keys"] == [str(trusted)]
