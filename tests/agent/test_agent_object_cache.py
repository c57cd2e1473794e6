# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent's on-disk list of each mounted image's objects (``--once`` lists an image once).

The cache is believed only from root's own directory, reached without
following links, and only a file that names its image and carries a correct
checksum; anything else is ignored and listed again.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from agent_fixtures import Node, cache_dir_of, kinds, node, run_once  # noqa: F401  (node: a fixture)

from composefs_fleet_agent import checks, object_cache
from composefs_fleet_agent.checks import Checker
from composefs_fleet_agent.config import load

DIGEST = "ab" * 32
OBJECTS = [hashlib.sha256(b"%d" % i).digest() for i in range(5)]


def test_stored_list_comes_back(tmp_path: Path):
    cache = str(tmp_path / "var" / "cache" / "agent")
    assert object_cache.load(cache, DIGEST) is None  # missing directory: nothing, no error
    assert object_cache.store(cache, DIGEST, OBJECTS)
    assert object_cache.load(cache, DIGEST) == OBJECTS
    assert object_cache.load(cache, "cd" * 32) is None
    entry = Path(cache) / (DIGEST + object_cache.SUFFIX)
    assert entry.stat().st_mode & 0o777 == 0o600
    assert not [p for p in Path(cache).iterdir() if p != entry], "no temporary file left behind"


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "other-image", "count"])
def test_damaged_or_foreign_entries_are_not_believed(tmp_path: Path, damage: str):
    cache = str(tmp_path / "cache")
    assert object_cache.store(cache, DIGEST, OBJECTS)
    entry = Path(cache) / (DIGEST + object_cache.SUFFIX)
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-40] ^= 1
    elif damage == "truncate":
        del data[-1]
    elif damage == "append":
        data += b"\0" * 32
    elif damage == "other-image":
        # A valid entry of another image, filed under this one's name.
        assert object_cache.store(cache, "cd" * 32, OBJECTS)
        data = bytearray((Path(cache) / ("cd" * 32 + object_cache.SUFFIX)).read_bytes())
    elif damage == "count":
        # A count that promises more objects than the file holds, checksum made to match.
        header = object_cache._HEADER
        magic, digest, count = header.unpack_from(data)
        body = header.pack(magic, digest, count + 1) + bytes(data[header.size:-32])
        data = bytearray(body + hashlib.sha256(body).digest())
    entry.write_bytes(bytes(data))
    assert object_cache.load(cache, DIGEST) is None


def test_links_and_open_directories_are_refused(tmp_path: Path):
    real = tmp_path / "real"
    assert object_cache.store(str(real), DIGEST, OBJECTS)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert object_cache.load(str(link), DIGEST) is None, "a linked cache directory is not followed"
    assert not object_cache.store(str(link / "sub"), DIGEST, OBJECTS)
    # A linked entry in the right directory is not followed either.
    other = tmp_path / "other"
    assert object_cache.store(str(other), DIGEST, OBJECTS)
    planted = real / ("cd" * 32 + object_cache.SUFFIX)
    planted.symlink_to(other / (DIGEST + object_cache.SUFFIX))
    assert object_cache.load(str(real), "cd" * 32) is None
    # A directory others may write to: anyone could have planted its entries.
    os.chmod(real, 0o777)
    assert object_cache.load(str(real), DIGEST) is None
    assert not object_cache.store(str(real), DIGEST, OBJECTS)
    os.chmod(real, 0o700)
    assert object_cache.load(str(real), DIGEST) == OBJECTS
    assert object_cache.load("relative/dir", DIGEST) is None


def test_prune_keeps_only_what_is_named(tmp_path: Path):
    cache = str(tmp_path / "cache")
    for digest in (DIGEST, "cd" * 32):
        assert object_cache.store(cache, digest, OBJECTS)
    (Path(cache) / "notes.txt").write_text("not ours")
    assert object_cache.prune(cache, [DIGEST]) == ["cd" * 32 + object_cache.SUFFIX]
    assert sorted(p.name for p in Path(cache).iterdir()) == [DIGEST + object_cache.SUFFIX, "notes.txt"]
    assert object_cache.prune(str(tmp_path / "missing"), []) == []


@pytest.mark.kernel
def test_a_fresh_checker_lists_each_image_once(node: Node, monkeypatch: pytest.MonkeyPatch):
    """Two checkers (two runs of --once) with one cache: the image is listed by the first only."""
    digest = node.image("app", 1)
    where = node.base / "mnt" / "app"
    node.mount(digest, where)
    node.add_mount(digest, where)
    cfg = load(str(node.write_config()))
    listed = []
    real = checks.image_file_objects

    def counting(path, progress=None):
        listed.append(path)
        return real(path, progress=progress)

    monkeypatch.setattr(checks, "image_file_objects", counting)
    cache = str(cache_dir_of(node.config_path))
    first = Checker(lambda f: None, lambda: None, history_dir=str(node.history_dir), cache_dir=cache)
    result = first.run(cfg, 1, quarantine=False)
    assert result.healthy and result.objects == len(node.objects()) and len(listed) == 1
    second = Checker(lambda f: None, lambda: None, history_dir=str(node.history_dir), cache_dir=cache)
    again = second.run(cfg, 1, quarantine=False)
    assert again.healthy and again.objects == result.objects and len(listed) == 1, "listed again"
    assert second.image_objects[digest] == first.image_objects[digest]
    # Without a cache directory every run lists.
    Checker(lambda f: None, lambda: None, history_dir=str(node.history_dir)).run(cfg, 1, quarantine=False)
    assert len(listed) == 2


@pytest.mark.kernel
def test_once_keeps_the_list_and_drops_it_with_the_mount(node: Node):
    digest = node.image("app", 1)
    where = node.base / "mnt" / "app"
    node.mount(digest, where)
    node.add_mount(digest, where)
    config = node.write_config()
    res = run_once(config)
    assert res.returncode == 0, res.stderr
    cache = cache_dir_of(config)
    entry = cache / (digest + object_cache.SUFFIX)
    assert object_cache.load(str(cache), digest) is not None and entry.exists()
    # A damaged entry is listed again and rewritten, the pass stays healthy.
    entry.write_bytes(b"garbage")
    res = run_once(config)
    assert res.returncode == 0 and kinds(res.stderr) == ["config-loaded", "pass-summary"], res.stderr
    assert len(object_cache.load(str(cache), digest) or []) == node.metrics()["objects_checked"]
    # No mount configured any more: its list goes.
    node.mounts.clear()
    assert run_once(node.write_config()).returncode == 0
    assert not entry.exists()
