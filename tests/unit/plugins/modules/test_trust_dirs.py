# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.trust_dirs: unlisted files removed (links not followed), check mode, diff, bad input."""

from __future__ import annotations

import os

from ansible_collections.composefs.fleet.plugins.modules import trust_dirs
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module


def make_node(tmp_path):
    trusted = tmp_path / "keys" / "trusted.d"
    trusted.mkdir(parents=True)
    for name in ("release.pub", "old.pub"):
        (trusted / name).write_text(name)
    (trusted / "sub").mkdir()
    (trusted / "sub" / "inner.pub").write_text("inner")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep-me").write_text("not ours")
    (trusted / "link").symlink_to(outside)
    unit = tmp_path / "units" / "keys.service"
    unit.parent.mkdir()
    unit.write_text("[Unit]\n")
    args = {"dirs": [{"path": str(trusted), "keep": ["release.pub"]},
                     {"path": str(tmp_path / "keys" / "revoked.d"), "keep": []}],
            "absent": [str(unit), str(tmp_path / "units" / "never-there.service")]}
    return trusted, outside, unit, args


def test_check_mode_and_diff_name_what_would_go_and_change_nothing(tmp_path, capsys):
    trusted, _outside, unit, args = make_node(tmp_path)
    result = run_module(trust_dirs, capsys, args, check=True, diff=True)
    expected = [str(trusted / name) for name in ("link", "old.pub", "sub")] + [str(unit)]
    assert result["changed"] is True and result["removed"] == expected
    assert result["diff"]["before"] == "".join(path + "\n" for path in expected) and result["diff"]["after"] == ""
    assert sorted(os.listdir(trusted)) == ["link", "old.pub", "release.pub", "sub"] and unit.exists()
    assert not (tmp_path / "keys" / "revoked.d").exists()  # a missing directory is not created


def test_unlisted_files_removed_links_not_followed_then_nothing_to_do(tmp_path, capsys):
    trusted, outside, unit, args = make_node(tmp_path)
    result = run_module(trust_dirs, capsys, args)
    assert result["changed"] is True and len(result["removed"]) == 4
    assert os.listdir(trusted) == ["release.pub"] and not unit.exists()
    assert (outside / "keep-me").read_text() == "not ours"
    result = run_module(trust_dirs, capsys, args)
    assert result["changed"] is False and result["removed"] == []


def test_nothing_configured_empties_the_directory(tmp_path, capsys):
    trusted, _outside, _unit, args = make_node(tmp_path)
    result = run_module(trust_dirs, capsys, {"dirs": [{"path": str(trusted)}]})
    assert result["changed"] is True and os.listdir(trusted) == []


def test_bad_names_and_relative_paths_are_refused(tmp_path, capsys):
    trusted, _outside, _unit, args = make_node(tmp_path)
    result = run_module(trust_dirs, capsys, {"dirs": [{"path": str(trusted), "keep": ["../escape.pub"]}]})
    assert result["failed"] is True and "'../escape.pub'" in result["msg"] and str(trusted) in result["msg"]
    result = run_module(trust_dirs, capsys, {"absent": ["units/x.service"]})
    assert result["failed"] is True and "units/x.service" in result["msg"]
    assert sorted(os.listdir(trusted)) == ["link", "old.pub", "release.pub", "sub"]
