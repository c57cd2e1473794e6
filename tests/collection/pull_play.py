# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Helpers of the pull tests that run ansible-playbook: a remote store to serve, a playbook run.

Not a conftest.py: tests/collection/test_module_image_remote.py and
tests/remote/test_fleet_drill.py import it by name.  ansible-playbook runs
this checkout as the collection ``composefs.fleet`` (a symlink under the
test's temp dir in ANSIBLE_COLLECTIONS_PATH), with no ansible.cfg, on hosts
with the local connection and /usr/bin/python3 as the modules' interpreter.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

from composefs_fleet.image_needs import image_file_objects
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image

REPO = Path(__file__).resolve().parents[2]
NODE_PYTHON = "/usr/bin/python3"
PLAY_TIMEOUT = 600


def write_release(root: Path, version: int) -> None:
    """A small tree: files shared by every version, files of this version only, an inline one."""
    rng = random.Random(1000 + version)
    (root / "lib").mkdir(parents=True)
    for i in range(4):  # the same in every version: fetched once per node
        (root / "lib" / ("common%d" % i)).write_bytes(random.Random(i).randbytes(3000 + 700 * i))
    for i in range(3):
        (root / ("v%d-%d.bin" % (version, i))).write_bytes(rng.randbytes(5000 + 1000 * i))
    (root / "VERSION").write_text("%d\n" % version)  # small: inline in the image, no object


class Release(NamedTuple):
    digest: str
    objects: Dict[str, int]  # {hex digest: size} of the objects the image uses


def make_remote(path: Path, versions=(1, 2)) -> Dict[str, Release]:
    """A store at ``path`` with refs ``app/v<N>``."""
    releases = {}
    with Store.init(path, notice=None)[0] as store:
        for version in versions:
            tree = path.parent / ("release-v%d" % version)
            write_release(tree, version)
            ref = "app/v%d" % version
            digest = add_image(store, str(tree), ref).digest
            releases[ref] = Release(digest, dict(image_file_objects(store.image_path(digest)).objects))
    return releases


def object_path(hexd: str) -> str:
    """The object's path in a store (and in its URL)."""
    return "objects/%s/%s" % (hexd[:2], hexd[2:])


def local_host(**host_vars: object) -> Dict[str, object]:
    return dict({"ansible_connection": "local", "ansible_python_interpreter": NODE_PYTHON}, **host_vars)


def run_playbook(tmp: Path, name: str, plays: List[dict], hosts: Dict[str, dict], *args: str,
                 env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
    """ansible-playbook ``args`` of ``plays`` (written as JSON) on ``hosts`` ({name: host vars})."""
    exe = Path(sys.executable).parent / "ansible-playbook"
    if not exe.is_file():
        pytest.skip("ansible-playbook is not installed next to %s" % sys.executable)
    if not os.path.exists(NODE_PYTHON):
        pytest.skip("%s (the modules' interpreter) is missing" % NODE_PYTHON)
    collections = tmp / "collections" / "ansible_collections" / "composefs"
    if not collections.exists():
        collections.mkdir(parents=True)
        (collections / "fleet").symlink_to(REPO)
    (tmp / ("%s.json" % name)).write_text(json.dumps(plays))
    (tmp / ("%s-inventory.json" % name)).write_text(json.dumps({"all": {"hosts": hosts}}))
    full_env = dict(os.environ)
    full_env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(tmp / "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote-tmp"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "PATH": "%s:%s" % (Path(sys.executable).parent, os.environ.get("PATH", "")),
    })
    full_env.update(env or {})
    return subprocess.run([str(exe), "-i", str(tmp / ("%s-inventory.json" % name)), *args, str(tmp / ("%s.json" % name))],
                          capture_output=True, text=True, env=full_env, stdin=subprocess.DEVNULL,
                          timeout=PLAY_TIMEOUT, cwd=str(tmp))


def output(proc: "subprocess.CompletedProcess[str]") -> str:
    """The end of a run's output, for an assertion's message."""
    return proc.stdout[-8000:] + proc.stderr[-3000:]


def recap(proc: "subprocess.CompletedProcess[str]") -> Dict[str, Dict[str, int]]:
    """PLAY RECAP: {host: {"ok": n, "changed": n, "failed": n, ...}}."""
    out: Dict[str, Dict[str, int]] = {}
    lines = proc.stdout.splitlines()
    if "PLAY RECAP" not in proc.stdout:
        return out
    start = max(i for i, line in enumerate(lines) if line.startswith("PLAY RECAP"))
    for line in lines[start + 1:]:
        if ":" not in line:
            continue
        host, _, counts = line.partition(":")
        fields = dict(item.split("=", 1) for item in counts.split() if "=" in item)
        out[host.strip()] = {key: int(value) for key, value in fields.items()}
    return out
