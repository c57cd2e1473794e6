# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""A node in a temp directory for the agent tests: a store, images, real mounts, a config."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from composefs_fleet import mount_record, mountinfo
from composefs_fleet.mount import mount_composefs
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image


def write_tree(root: Path, seed: int, files: int = 6) -> None:
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / ("sub/f%d" % i if i % 2 else "f%d" % i)).write_bytes(rng.randbytes(rng.choice([100, 5000, 70000])))
    (root / "small").write_bytes(b"inline")


class Node:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.store_path = base / "store"
        self.store, _ = Store.init(self.store_path, notice=None)
        self.textfile = base / "metrics" / "agent.prom"
        self.textfile.parent.mkdir()
        self.mounted: List[Path] = []
        self.config_path = base / "agent.json"
        # The mount history of this node's mounts (run_once points the agent at it).
        self.history_dir = history_dir_of(self.config_path)
        self.mounts: List[Dict[str, object]] = []

    def image(self, name: str, seed: int) -> str:
        tree = self.base / ("tree-" + name)
        write_tree(tree, seed)
        return add_image(self.store, tree, name).digest

    def image_path(self, digest: str) -> str:
        return os.fsdecode(self.store.image_path(digest))

    def mount(self, digest: str, where: Path, record: bool = True, history: bool = True, replace: bool = False,
              ref: Optional[str] = None) -> None:
        """Mount as the mount module does; ``history``: note it in this node's mount history
        (without, the agent expects what its configuration names)."""
        where.mkdir(parents=True, exist_ok=True)
        # The agent (a separate process) reads the records where every mount leaves them.
        mount_composefs(self.image_path(digest), where, [str(self.store_path / "objects")],
                        record_dir="" if record else None, history_dir=str(self.history_dir) if history else None,
                        replace=replace, ref=ref, store=self.store_path if ref else None)
        if where not in self.mounted:
            self.mounted.append(where)

    def add_mount(self, digest: str, where: Path, **extra: object) -> None:
        spec = {"where": str(where), "image": self.image_path(digest), "digest": digest,
                "basedirs": [str(self.store_path / "objects")], "verity": "auto"}
        spec.update(extra)
        self.mounts.append(spec)

    def write_config(self, **extra: object) -> Path:
        doc = {"version": 1, "interval": 3600, "textfile": str(self.textfile),
               "stores": [{"path": str(self.store_path)}], "mounts": self.mounts}
        doc.update(extra)
        self.config_path.write_text(json.dumps(doc))
        return self.config_path

    def objects(self) -> List[Path]:
        return sorted(p for p in (self.store_path / "objects").rglob("*") if p.is_file())

    def metrics(self) -> Dict[str, float]:
        out = {}
        for line in self.textfile.read_text().splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key.replace("composefs_fleet_agent_", "")] = float(value)
        return out

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            for _ in range(4):
                top = mountinfo.top_mount(where)
                if top is None or not top.is_composefs():
                    break
                mount_record.unmount(where)
        self.mounted.clear()


def history_dir_of(config: Path) -> Path:
    return config.parent / "history"


def cache_dir_of(config: Path) -> Path:
    """The agent's object-list cache of a test (never the machine's own /var/cache)."""
    return config.parent / "cache"


def run_once(config: Path, *args: str, env: Optional[Dict[str, str]] = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "composefs_fleet_agent", "--once", "--no-journal", "--config",
                           str(config), "--history-dir", str(history_dir_of(config)),
                           "--cache-dir", str(cache_dir_of(config))] + list(args),
                          capture_output=True, text=True, timeout=300, env=env)


def kinds(stderr: str) -> List[str]:
    """Finding kinds of the plain log lines, in order: "<3>object-missing: ..."."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("<") and ">" in line:
            out.append(line.split(">", 1)[1].split(":", 1)[0])
    return out


@pytest.fixture
def node(tmp_path: Path):
    """A store in ``tmp_path``; its mounts are undone at teardown."""
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.unmount_all()
