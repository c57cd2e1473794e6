# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the object-store tests: source trees, stores, the CLI.

Not a conftest.py: test modules elsewhere do ``from conftest import ...`` and
must get the top-level tests/conftest.py.  Test modules here import these
fixtures by name instead.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from composefs_fleet.store import Store


def write_tree(root: Path, seed: int, files: int = 12, shared_from: "int | None" = None,
               big: int = 200000) -> Dict[str, bytes]:
    """A source tree: small (inline) and larger (object) files, a symlink, a subdirectory.

    Files named ``common*`` depend only on ``shared_from`` (default: none),
    so two trees with the same ``shared_from`` share those objects.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    contents: Dict[str, bytes] = {}
    for i in range(files):
        size = rng.choice([0, 10, 64, 65, 4096, 4097, 70000, big])
        data = rng.randbytes(size)
        name = "sub/f%02d" % i if i % 3 else "f%02d" % i
        contents[name] = data
    if shared_from is not None:
        srng = random.Random(10_000 + shared_from)
        for i in range(4):
            contents["sub/deeper/common%d" % i] = srng.randbytes(srng.choice([300, 9000, 130000]))
    for name, data in contents.items():
        (root / name).write_bytes(data)
    (root / "link").symlink_to("sub/f01")
    (root / "tiny").write_bytes(b"x")
    return contents


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s, created = Store.init(tmp_path / "store", notice=None)
    assert created
    return s


def store_argv() -> List[str]:
    script = Path(sys.executable).parent / "composefs-store"
    if script.is_file() and os.access(str(script), os.X_OK):
        return [str(script)]
    return [sys.executable, "-c",
            "import sys; sys.argv[0] = 'composefs-store'; "
            "from composefs_fleet_cli.composefs_store import main; sys.exit(main())"]


class StoreCli:
    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def run(self, *args: object, **kwargs: object) -> "subprocess.CompletedProcess[str]":
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        argv = store_argv() + ["--repo", str(self.repo)] + [str(a) for a in args]
        return subprocess.run(argv, **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def cli(tmp_path: Path) -> StoreCli:
    return StoreCli(tmp_path / "store")


@pytest.fixture(scope="session")
def make_tree():
    return write_tree


@pytest.fixture(scope="session")
def store_cmd() -> List[str]:
    """argv prefix of composefs-store (without --repo)."""
    return store_argv()


def stored_objects(store: Store) -> "set[str]":
    """The digests of every object in ``store``."""
    return {h for h, _p, _st in store.iter_objects()}


def image_needs(store: Store, digest: str) -> "set[str]":
    """The objects image ``digest`` of ``store`` needs."""
    from composefs_fleet.image_needs import image_objects

    return set(image_objects(store.read_image(digest)).objects)
