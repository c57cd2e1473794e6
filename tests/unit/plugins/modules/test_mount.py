# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.mount: arguments, errors, units in check/diff mode (no mounts)."""

from __future__ import annotations

import os
import random

import pytest


from ansible_collections.composefs.fleet.plugins.modules import mount
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.mount import verity_problem
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store import Store
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store_add import add_image
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.systemd_unit import unit_name


def _rand(seed, size):
    """Deterministic random bytes (random.randbytes needs Python 3.9)."""
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little")


def run(capsys, args, check=False, diff=False):
    return run_module(mount, capsys, args, check, diff)


@pytest.fixture
def env(tmp_path):
    store, _created = Store.init(str(tmp_path / "store"), notice=None)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "big").write_bytes(_rand(1, 20000))
    (src / "small").write_bytes(b"small\n")
    add_image(store, str(src), "app/one")
    (src / "small").write_bytes(b"other\n")
    add_image(store, str(src), "app/two")
    return {
        "tmp": tmp_path,
        "store": str(tmp_path / "store"),
        "units": str(tmp_path / "units"),
        "where": str(tmp_path / "mnt point"),
        "digest": store.read_ref("app/one"),
        "image_file": os.fsdecode(store.image_path(store.read_ref("app/one"))),
    }


def args_for(env, state, **extra):
    args = {"path": env["where"], "store": env["store"], "image": "app/one", "state": state,
            "unit_dir": env["units"]}
    args.update(extra)
    return args


# -- argument validation ---------------------------------------------------------------

def test_path_is_required(capsys):
    res = run(capsys, {"state": "mounted", "image": "/x"})
    assert res["failed"] and "path" in res["msg"]


def test_state_is_required(capsys, env):
    res = run(capsys, {"path": env["where"], "image": "/x"})
    assert res["failed"] and "state" in res["msg"]


def test_bad_verity_choice(capsys, env):
    res = run(capsys, args_for(env, "mounted", verity="maybe"))
    assert res["failed"] and "verity" in res["msg"]


@pytest.mark.parametrize("state", ["mounted", "present", "remounted"])
def test_image_required(capsys, env, state):
    res = run(capsys, {"path": env["where"], "state": state})
    assert res["failed"] and "image" in res["msg"]


def test_name_alias(capsys, env):
    args = args_for(env, "present")
    args["name"] = args.pop("path")
    res = run(capsys, args, check=True)
    assert not res.get("failed"), res.get("msg")
    assert res["mount"]["where"] == env["where"]


def test_upperdir_without_workdir(capsys, env):
    res = run(capsys, args_for(env, "mounted", upperdir=str(env["tmp"] / "up")))
    assert res["failed"] and "workdir" in res["msg"]


def test_digest_and_pin_digest_exclusive(capsys, env):
    res = run(capsys, args_for(env, "mounted", digest=env["digest"], pin_digest=True))
    assert res["failed"] and "mutually exclusive" in res["msg"]


def test_relative_path(capsys, env):
    res = run(capsys, args_for(env, "mounted", path="relative/mnt"))
    assert res["failed"] and "absolute path" in res["msg"]


# -- errors ------------------------------------------------------------------------------

def test_ref_needs_a_store(capsys, env):
    res = run(capsys, {"path": env["where"], "image": "app/one", "state": "present", "unit_dir": env["units"]})
    assert res["failed"] and "store is required" in res["msg"]


def test_not_a_store(capsys, env):
    res = run(capsys, args_for(env, "present", store=str(env["tmp"])))
    assert res["failed"] and "is not a composefs store" in res["msg"]


def test_group_writable_store_needs_allow_foreign_owner(capsys, env):
    os.chmod(env["store"], 0o770)
    res = run(capsys, args_for(env, "present"), check=True)
    assert res.get("failed") and "writable by its group" in res["msg"] and "allow_foreign_owner" in res["msg"]
    res = run(capsys, args_for(env, "present", allow_foreign_owner=True), check=True)
    assert res["changed"] is True and not res.get("failed"), res
    assert not os.path.exists(env["units"])


def test_unknown_ref_and_digest(capsys, env):
    res = run(capsys, args_for(env, "present", image="app/missing"))
    assert res["failed"] and "no ref app/missing" in res["msg"]
    res = run(capsys, args_for(env, "present", image="ab" * 32))
    assert res["failed"] and "is not in the store" in res["msg"]


def test_missing_image_file(capsys, env):
    res = run(capsys, {"path": env["where"], "image": str(env["tmp"] / "nope.cfs"), "basedir": [env["store"]],
                       "state": "present", "unit_dir": env["units"]})
    assert res["failed"] and "does not exist" in res["msg"]


def test_image_file_needs_basedir(capsys, env):
    res = run(capsys, {"path": env["where"], "image": env["image_file"], "state": "present",
                       "unit_dir": env["units"]})
    assert res["failed"] and "basedir is required" in res["msg"]


def test_digest_mismatch(capsys, env):
    res = run(capsys, args_for(env, "present", digest="0" * 64))
    assert res["failed"] and "does not match the image" in res["msg"]


def test_newline_in_mount_point_cannot_be_a_unit(capsys, env):
    res = run(capsys, args_for(env, "present", path=str(env["tmp"] / "new\nline")))
    assert res["failed"] and "newline" in res["msg"]
    assert not os.path.exists(env["units"])


def test_verity_require_without_fsverity(capsys, env):
    problem = verity_problem(os.path.join(env["store"], "objects"))
    if problem is None:
        pytest.skip("the temp filesystem has fs-verity: verity=require is possible here")
    res = run(capsys, args_for(env, "present", verity="require"))
    assert res["failed"] and "has no fs-verity" in res["msg"] and problem in res["msg"]


# -- the unit: present and absent without mounting ------------------------------------

def test_present_four_steps_and_absent(capsys, env):
    unit_file = os.path.join(env["units"], unit_name(env["where"]))
    link = os.path.join(env["units"], "local-fs.target.wants", unit_name(env["where"]))
    results = [run(capsys, args_for(env, "present"), check=c, diff=True) for c in (True, False, False, True)]
    assert [r["changed"] for r in results] == [True, True, False, False]
    first = results[0]
    assert first["actions"] == ["wrote unit", "enabled unit"]
    assert first["diff"]["before"]["unit"] is None and first["diff"]["before"]["enabled"] is False
    text = "\n".join(first["diff"]["after"]["unit"]) + "\n"
    assert "What=%s\n" % env["image_file"] in text and "Where=%s\n" % env["where"] in text
    assert "Options=basedir=%s/objects" % env["store"] in text
    with open(unit_file) as f:
        assert f.read() == text
    assert os.readlink(link) == unit_file
    assert results[2]["diff"]["before"] == results[2]["diff"]["after"]
    assert results[2]["mount"]["mounted"] is False and results[2]["mount"]["unit_file"] == unit_file

    # Another image: the unit changes (diff shows both texts), once.
    other = [run(capsys, args_for(env, "present", image="app/two"), check=c, diff=True) for c in (True, False, False)]
    assert [r["changed"] for r in other] == [True, True, False]
    assert other[0]["actions"] == ["updated unit"]
    assert other[0]["diff"]["before"]["unit"] == text.splitlines()
    assert other[0]["diff"]["after"]["unit"] != text.splitlines()

    results = [run(capsys, args_for(env, "absent"), check=c, diff=True) for c in (True, False, False, True)]
    assert [r["changed"] for r in results] == [True, True, False, False]
    assert results[1]["actions"] == ["disabled unit", "removed unit"]
    assert results[1]["diff"]["after"]["unit"] is None
    assert not os.path.exists(unit_file) and not os.path.lexists(link)


def test_check_mode_writes_nothing(capsys, env):
    res = run(capsys, args_for(env, "mounted"), check=True, diff=True)
    assert res["changed"] and res["actions"] == ["mounted", "wrote unit", "enabled unit"]
    assert res["diff"]["after"]["mounted"] is True and res["diff"]["after"]["image_digest"] == env["digest"]
    assert not os.path.exists(env["units"]) and not os.path.exists(env["where"])


def test_wrong_wants_link_is_fixed(capsys, env):
    run(capsys, args_for(env, "present"))
    link = os.path.join(env["units"], "local-fs.target.wants", unit_name(env["where"]))
    os.unlink(link)
    os.symlink("/elsewhere", link)
    res = run(capsys, args_for(env, "present"))
    assert res["changed"] and res["actions"] == ["enabled unit"]
    assert os.readlink(link) == os.path.join(env["units"], unit_name(env["where"]))


def test_unmounted_when_nothing_is_mounted(capsys, env):
    res = run(capsys, args_for(env, "unmounted"), diff=True)
    assert res["changed"] is False and res["action"] == "none"
