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
import shutil
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


# Records every task result of a run by task name (a role's looped tasks cannot be registered from
# the play, and ansible-core has no JSON callback).
RECORD_CALLBACK = r"""
import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "composefs_record"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = {}

    def _record(self, result, status):
        task = getattr(result, "task", None) or result._task
        data = result.result if hasattr(type(result), "result") else result._result
        self.records[task.name or task.action] = dict(data, _status=status)

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._record(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        with open(os.environ["COMPOSEFS_RECORD"], "w") as f:
            json.dump(self.records, f, default=str)
"""


def run_recorded(guest: Any, tmp: Path, plays: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Run ``plays`` (see :func:`run_playbook`) with every task's result recorded: task name ->
    result (``_status`` ok/failed/skipped/unreachable), and ``_playbook``: exit code and output
    tails.  Fails the test when the run recorded nothing; ``tmp`` is removed afterwards."""
    (tmp / "callbacks").mkdir()
    (tmp / "callbacks" / "composefs_record.py").write_text(RECORD_CALLBACK)
    record = tmp / "results.json"
    res = run_playbook(guest, tmp, plays, {
        "ANSIBLE_CALLBACK_PLUGINS": str(tmp / "callbacks"),
        "ANSIBLE_CALLBACKS_ENABLED": "composefs_record",
        "COMPOSEFS_RECORD": str(record),
    })
    try:
        out = json.loads(record.read_text())
    except (OSError, ValueError):
        pytest.fail("the playbook recorded no results (exit %d):\n%s\n%s"
                    % (res.returncode, res.stdout[-4000:], res.stderr[-3000:]), pytrace=False)
    out["_playbook"] = {"rc": res.returncode, "stdout": res.stdout[-6000:], "stderr": res.stderr[-3000:]}
    shutil.rmtree(str(tmp), ignore_errors=True)
    return out


def node_play(work: str, store: str, images: List[Dict[str, Any]], tasks: List[Dict[str, Any]],
              mounts: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """One play on the guest: the role composefs.fleet.composefs_node with our tools, the store
    ``store``, ``images`` and ``mounts``, then ``tasks``."""
    return [{
        "hosts": "guest",
        "gather_facts": False,
        "vars": {
            # Our tools, mount.composefs in /sbin where mount(8) looks for
            # helpers (the copies tests/guest/guest_vm.py puts in /usr/local
            # are not found there): the unit can then mount at boot.
            "composefs_node_tools": "ours",
            # Code and commands in the test's directory: the wrappers the
            # other guest tests use in /usr/local stay as they are.
            "composefs_node_prefix": work + "/lib",
            "composefs_node_bin_dir": work + "/bin",
            "composefs_node_stores": [{"path": store}],
            "composefs_node_images": images,
            "composefs_node_mounts": mounts or [],
        },
        "roles": ["composefs.fleet.composefs_node"],
        "tasks": tasks,
    }]
