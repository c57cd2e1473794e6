# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Run a playbook against the QEMU guest, as any node would be reached.

The collection is this checkout (symlinked as ansible_collections/composefs/
fleet), modules travel as AnsiballZ over SSH with pipelining, and Ansible's
state (control sockets, temp files) stays in the test's own directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]


def playbook_exe() -> Path:
    """ansible-playbook next to this interpreter; skip (fail under CI=true) without it."""
    exe = Path(sys.executable).parent / "ansible-playbook"
    if not exe.is_file():
        reason = "ansible-playbook is not installed next to %s (pip install -e .[test])" % sys.executable
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true requires it: " + reason, pytrace=False)
        pytest.skip(reason)
    return exe


def run_playbook(guest: Any, tmp: Path, plays: List[Dict[str, Any]],
                 env_extra: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
    """Write ``plays`` and an inventory for ``guest`` into ``tmp`` and run them."""
    exe = playbook_exe()
    collections = tmp / "collections" / "ansible_collections" / "composefs"
    collections.mkdir(parents=True)
    (collections / "fleet").symlink_to(REPO)
    inventory = {"all": {"hosts": {"guest": {
        "ansible_ssh_common_args": "-F %s" % guest.vm.ssh_config,
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_user": "root",
    }}}}
    (tmp / "inventory.json").write_text(json.dumps(inventory))
    (tmp / "playbook.json").write_text(json.dumps(plays))
    env = dict(os.environ)
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(tmp / "collections"),
        "ANSIBLE_PIPELINING": "1",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PATH": "%s:%s" % (Path(sys.executable).parent, env.get("PATH", "")),
    })
    env.update(env_extra or {})
    return subprocess.run([str(exe), "-i", str(tmp / "inventory.json"), str(tmp / "playbook.json")],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=900)
