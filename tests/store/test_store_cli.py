# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-store: commands, output, errors and exit codes."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from store_fixtures import cli, make_tree, store_cmd  # noqa: F401  (fixtures)


def test_help_explains(cli, store_cmd):
    res = subprocess.run(store_cmd + ["--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for word in ("init", "add-image", "ls", "refs", "rm-ref", "fsck", "gc", "stats", "objects/XX/YYYY",
                 "exit status"):
        assert word in res.stdout
    res = subprocess.run(store_cmd + ["--repo", "x", "add-image", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--objects-from" in res.stdout and "--ref" in res.stdout


def test_usage_errors_exit_2(cli, tmp_path, store_cmd):
    res = subprocess.run(store_cmd, capture_output=True, text=True, env={**os.environ, "COMPOSEFS_STORE": ""})
    assert res.returncode == 2 and "COMMAND is required" in res.stderr
    res = subprocess.run(store_cmd + ["ls"], capture_output=True, text=True,
                         env={**os.environ, "COMPOSEFS_STORE": ""})
    assert res.returncode == 2 and "--repo" in res.stderr
    res = cli.run("add-image", tmp_path)  # no --ref
    assert res.returncode == 2 and "--ref" in res.stderr
    res = cli.run("frobnicate")
    assert res.returncode == 2


def test_uninitialised_store_is_a_clear_error(cli):
    res = cli.run("ls")
    assert res.returncode == 1
    assert "not a composefs store" in res.stderr and "init" in res.stderr
    assert "Traceback" not in res.stderr


def test_full_cycle(cli, tmp_path, make_tree):
    a, b = tmp_path / "a", tmp_path / "b"
    make_tree(a, 1, shared_from=5)
    make_tree(b, 2, shared_from=5)
    assert cli.run("init").returncode == 0
    again = cli.run("init")
    assert again.returncode == 0 and "already" in again.stdout
    res = cli.run("add-image", a, "--ref", "app/v1")
    assert res.returncode == 0, res.stderr
    digest_a = res.stdout.split()[0]
    assert len(digest_a) == 64
    res = cli.run("--json", "add-image", b, "--ref", "app/v2")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    digest_b = info["digest"]
    assert info["ref"] == "app/v2" and info["source_kind"] == "directory"
    refs = cli.run("refs")
    assert refs.stdout.splitlines() == ["%s app/v1" % digest_a, "%s app/v2" % digest_b]
    ls = json.loads(cli.run("--json", "ls").stdout)
    assert {row["digest"]: row["refs"] for row in ls} == {digest_a: ["app/v1"], digest_b: ["app/v2"]}
    stats = json.loads(cli.run("--json", "stats").stdout)
    assert stats["images"] == 2 and stats["shared_objects"] >= 1 and stats["saved_bytes"] > 0
    assert "saved by sharing" in cli.run("stats").stdout
    fsck = cli.run("fsck")
    assert fsck.returncode == 0 and fsck.stdout.splitlines()[-1].startswith("clean:")
    rm = cli.run("rm-ref", "app/v1")
    assert rm.returncode == 0 and digest_a in rm.stdout
    dry = cli.run("gc", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("would remove 1 images")
    gc = json.loads(cli.run("--json", "gc", "--tmp-grace", "0").stdout)
    assert gc["removed_images"] == [digest_a] and gc["removed_objects"]
    assert cli.run("refs").stdout.splitlines() == ["%s app/v2" % digest_b]
    assert cli.run("fsck").returncode == 0


def test_errors_are_clear(cli, tmp_path, make_tree):
    cli.run("init")
    src = tmp_path / "src"
    make_tree(src, 3)
    for bad in ("../x", "/abs", "a//b", "a/.x"):
        res = cli.run("add-image", src, "--ref", bad)
        assert res.returncode == 1 and "ref name" in res.stderr and "Traceback" not in res.stderr
    res = cli.run("add-image", tmp_path / "nope", "--ref", "x")
    assert res.returncode == 1 and "no such file" in res.stderr
    res = cli.run("rm-ref", "nope")
    assert res.returncode == 1 and "no ref nope" in res.stderr
    res = cli.run("add-image", src, "--ref", "x", "--skip-xattrs", "--user-xattrs")
    assert res.returncode == 2
    assert cli.run("refs").stdout == ""


def test_fsck_exit_code_and_repair(cli, tmp_path, make_tree):
    cli.run("init")
    src = tmp_path / "src"
    make_tree(src, 4)
    assert cli.run("add-image", src, "--ref", "r").returncode == 0
    obj = next(p for p in (Path(cli.repo) / "objects").rglob("*") if p.is_file())
    obj.write_bytes(obj.read_bytes() + b"!")
    res = cli.run("fsck")
    assert res.returncode == 1 and "DAMAGED" in res.stdout and obj.parent.name + obj.name in res.stdout
    res = cli.run("fsck", "--repair")
    assert res.returncode == 1 and "moved aside" in res.stdout
    assert not obj.exists()
    assert cli.run("add-image", src, "--ref", "r").returncode == 0
    assert cli.run("fsck").returncode == 0


def test_newer_store_format_refused(cli):
    cli.run("init")
    (Path(cli.repo) / "meta.json").write_text('{"format": 99, "digest": "sha256"}')
    res = cli.run("refs")
    assert res.returncode == 1 and "newer than this tool supports" in res.stderr


def test_repo_option_after_the_command(tmp_path, store_cmd):
    repo = tmp_path / "r"
    res = subprocess.run(store_cmd + ["init", "--repo", str(repo)], capture_output=True, text=True)
    assert res.returncode == 0 and (repo / "meta.json").is_file()
    res = subprocess.run(store_cmd + ["refs", "--repo", str(repo), "--json"], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout) == []


def _store_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_image_dry_run_and_expected_digest(cli, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 1, shared_from=5)
    assert cli.run("init").returncode == 0
    repo = Path(cli.repo)
    plan = cli.run("add-image", src, "--ref", "app/v1", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.startswith("would add ")
    digest = plan.stdout.split()[2]
    assert cli.run("refs").stdout.strip() == ""  # nothing published
    before = _store_files(repo)
    wrong = "0" * 64
    res = cli.run("add-image", src, "--ref", "app/v1", "--expected-digest", wrong)
    assert res.returncode == 1 and digest in res.stderr and "nothing was stored" in res.stderr
    assert cli.run("refs").stdout.strip() == ""
    after = _store_files(repo)
    assert {k for k in after if k.startswith(("objects/", "images/", "refs/"))} == \
        {k for k in before if k.startswith(("objects/", "images/", "refs/"))}
    res = cli.run("add-image", src, "--ref", "app/v1", "--expected-digest", digest)
    assert res.returncode == 0 and res.stdout.split()[0] == digest
    assert digest in cli.run("refs").stdout
