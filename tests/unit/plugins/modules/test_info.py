# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.info: arguments, store facts, errors (no mounts made)."""

from __future__ import annotations

import os
import random

import pytest


from ansible_collections.composefs.fleet.plugins.modules import info
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store import Store
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store_add import add_image


def _rand(seed, size):
    """Deterministic random bytes (random.randbytes needs Python 3.9)."""
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little")


def run(capsys, args, check=False, diff=False):
    return run_module(info, capsys, args, check, diff)


@pytest.fixture
def store(tmp_path):
    s, _created = Store.init(str(tmp_path / "store"), notice=None)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(_rand(1, 5000))
    (src / "b").write_bytes(_rand(2, 5000))
    add_image(s, str(src), "one")
    return s


def test_defaults(capsys):
    res = run(capsys, {})
    assert res["changed"] is False and res["stores"] == []
    assert isinstance(res["mounts"], list)
    for m in res["mounts"]:
        assert (m["fstype"], m["source"]) == ("overlay", "composefs")


def test_bad_types(capsys):
    res = run(capsys, {"mounts": "perhaps"})
    assert res["failed"] and "mounts" in res["msg"]
    res = run(capsys, {"stores": {"a": 1}})
    assert res["failed"] and "stores" in res["msg"]


@pytest.mark.parametrize("check", [False, True])
def test_store_facts(capsys, store, check):
    location = os.fsdecode(store.path)
    res = run(capsys, {"stores": [location], "mounts": False}, check=check)
    assert res["changed"] is False and res["mounts"] == []
    [facts] = res["stores"]
    digest = store.read_ref("one")
    assert facts["refs"] == {"one": digest}
    [image] = facts["images"]
    assert image["digest"] == digest and image["refs"] == ["one"]
    assert image["objects"] == 2 and image["missing_count"] == 0
    assert facts["stats"]["objects"] == 2 and facts["stats"]["images"] == 1


def test_missing_object(capsys, store):
    victim = next(iter(store.iter_objects()))
    os.unlink(victim[1])
    res = run(capsys, {"stores": [os.fsdecode(store.path)], "mounts": False})
    [image] = res["stores"][0]["images"]
    assert image["missing_count"] == 1 and image["missing_objects"] == [victim[0]]


def test_not_a_store(capsys, tmp_path):
    res = run(capsys, {"stores": [str(tmp_path)]})
    assert res["failed"] and "is not a composefs store" in res["msg"]
