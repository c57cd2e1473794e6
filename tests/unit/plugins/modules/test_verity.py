# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.verity: arguments, file selection, digests,
expected_digest, check mode and the ``unsupported`` choice.  Nothing here
enables fs-verity (check mode, or filesystems without it such as tmpfs);
real enabling: tests/guest/test_guest_verity_module.py."""

from __future__ import annotations

import json
import os

import pytest


from ansible_collections.composefs.fleet.plugins.modules import verity
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module
from ansible_collections.composefs.fleet.plugins.module_utils.composefs import fsverity_digest, fsverity_ioctl, verity_files
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.errors import (
    VerityError, VerityNotSupported)

# The kernel's digest of an empty file (fsverity-utils; checked against the kernel in the guest tests).
EMPTY_DIGEST = "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"


def run(capsys, args, check=False, diff=False):
    return run_module(verity, capsys, args, check, diff)


def has_verity(path):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return fsverity_ioctl.verity_enabled(fd)
    finally:
        os.close(fd)


def fs_supports_verity(path):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        fsverity_ioctl.measure_verity(fd)
    except VerityNotSupported:
        return False
    except VerityError:
        return True
    finally:
        os.close(fd)
    return True


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a").write_bytes(b"")
    (root / "b" / "one").write_bytes(b"1" * 5000)
    (root / "b" / "c" / "two").write_bytes(b"2" * 9000)
    (root / "z").write_bytes(b"z")
    (root / "link").symlink_to("z")
    (root / "b" / "up").symlink_to("..")
    os.mkfifo(str(root / "fifo"))
    os.link(str(root / "z"), str(root / "z-again"))
    return root


@pytest.fixture
def tmpfs_file():
    """A file on tmpfs, which never has fs-verity."""
    base = "/dev/shm"
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) for a filesystem without fs-verity")
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsverity_ioctl.measure_verity(fd)
    except VerityNotSupported:
        pass
    except VerityError:
        pytest.skip("/dev/shm answers fs-verity questions: not the tmpfs this test needs")
    finally:
        os.close(fd)
    path = os.path.join(base, "composefs-fleet-unit-%d" % os.getpid())
    with open(path, "wb") as f:
        f.write(b"on tmpfs")
    yield path
    os.unlink(path)


# -- arguments -------------------------------------------------------------------

@pytest.mark.parametrize("args, word", [
    ({}, "paths"),
    ({"paths": []}, "paths is empty"),
    ({"paths": ["/x"], "unsupported": "warn"}, "unsupported"),
    ({"paths": ["/x"], "recurse": "deep"}, "recurse"),
])
def test_bad_arguments(capsys, args, word):
    res = run(capsys, args)
    assert res["failed"] is True and word in res["msg"]


@pytest.mark.parametrize("text, want", [
    ("AB" * 32, "ab" * 32),
    ("sha256:" + "0f" * 32, "0f" * 32),
    ("  " + "12" * 32 + "\n", "12" * 32),
])
def test_normalize_digest(text, want):
    assert verity_files.normalize_digest(text) == want


@pytest.mark.parametrize("text", ["", "ab" * 31, "ab" * 33, "sha512:" + "ab" * 32, "xy" * 32])
def test_normalize_digest_rejects(text):
    with pytest.raises(VerityError, match="64 hex digits"):
        verity_files.normalize_digest(text)


# -- selecting files --------------------------------------------------------------

def test_tree_walk_is_sorted_and_never_follows_symlinks(tree):
    found = verity_files.find_files([str(tree)], recurse=True)
    names = [os.path.relpath(vf.name, str(tree)) for vf in found]
    assert names == ["a", "b/c/two", "b/one", "z"]  # z-again is z; no link, fifo, or "up" loop
    assert [vf.top_level for vf in found] == [False] * 4


def test_named_files_are_taken_once_and_symlinks_followed(tree):
    found = verity_files.find_files([str(tree / "link"), str(tree / "z"), str(tree / "z-again")], recurse=False)
    assert [vf.name for vf in found] == [str(tree / "link")]
    assert found[0].top_level is True


@pytest.mark.parametrize("name, message", [
    ("b", "is a directory: set recurse"),
    ("fifo", "not a regular file or directory"),
    ("missing", "does not exist"),
])
def test_find_files_errors(tree, name, message):
    with pytest.raises(VerityError, match=message):
        verity_files.find_files([str(tree / name)], recurse=False)


def test_module_reports_selection_errors(capsys, tree):
    res = run(capsys, {"paths": [str(tree)]})
    assert res["failed"] is True and "is a directory" in res["msg"]
    (tree / "dangling").symlink_to("nowhere")
    res = run(capsys, {"paths": [str(tree / "dangling")]})
    assert res["failed"] is True and "dangling symbolic link" in res["msg"]


# -- digests and check mode ------------------------------------------------------------

def test_check_mode_digests_and_prediction(capsys, tree):
    res = run(capsys, {"paths": [str(tree)], "recurse": True, "unsupported": "skip"}, check=True, diff=True)
    assert not res.get("failed"), res
    files = res["files"]
    assert [f["digest"] for f in files] == [fsverity_digest.digest_file(f["file"]).hex() for f in files]
    assert files[0]["digest"] == EMPTY_DIGEST
    supported = fs_supports_verity(tree / "a")
    assert res["verity_supported"] is supported
    if supported:
        assert res["changed"] is True and res["enabled"] == 4
        assert res["diff"]["after"] == {"fsverity_enabled": sorted(f["file"] for f in files)}
    else:
        assert res["changed"] is False and res["enabled"] == 0
        assert res["diff"]["after"] == {"fsverity_enabled": []}
        assert "fs-verity is not supported" in res["verity_problem"]
    assert res["diff"]["before"] == {"fsverity_enabled": []}
    assert not any(has_verity(f["file"]) for f in files)  # check mode enabled nothing


@pytest.mark.parametrize("check", [True, False])
def test_expected_digest_mismatch_fails(capsys, tree, check):
    target = tree / "b" / "one"
    res = run(capsys, {"paths": [str(target)], "expected_digest": EMPTY_DIGEST}, check=check)
    assert res["failed"] is True
    assert EMPTY_DIGEST in res["msg"] and fsverity_digest.digest_file(str(target)).hex() in res["msg"]
    assert "not enabled" in res["msg"]
    assert not has_verity(target)


def test_expected_digest_needs_one_file(capsys, tree):
    res = run(capsys, {"paths": [str(tree / "a"), str(tree / "z")], "expected_digest": EMPTY_DIGEST})
    assert res["failed"] is True and "exactly one regular file" in res["msg"]


# -- unsupported: fail or skip ------------------------------------------------------------

@pytest.mark.parametrize("check", [True, False])
def test_unsupported_fail(capsys, tmpfs_file, check):
    res = run(capsys, {"paths": [tmpfs_file]}, check=check)
    assert res["failed"] is True
    assert "fs-verity is not supported" in res["msg"] and "nothing was enabled" in res["msg"]
    assert res["verity_supported"] is False and res["enabled"] == 0
    assert res["files"][0]["digest"] == fsverity_digest.digest_bytes(b"on tmpfs").hex()


@pytest.mark.parametrize("check", [True, False])
def test_unsupported_skip(capsys, tmpfs_file, check):
    digest = fsverity_digest.digest_bytes(b"on tmpfs").hex()
    res = run(capsys, {"paths": [tmpfs_file], "unsupported": "skip", "expected_digest": digest}, check=check,
              diff=True)
    assert not res.get("failed"), res
    assert res["changed"] is False and res["enabled"] == 0
    assert res["files"] == [{"file": tmpfs_file, "digest": digest, "verity_before": False, "verity_after": False,
                             "verity_supported": False}]
    assert res["diff"] == {"before": {"fsverity_enabled": []}, "after": {"fsverity_enabled": []}}
    assert "fs-verity left off on 1 file(s)" in json.dumps(res["warnings"])


def test_core_enable_respects_the_choice(tmpfs_file):
    planned = verity_files.plan([tmpfs_file])
    assert planned.to_enable == [] and len(planned.unsupported) == 1
    with pytest.raises(VerityNotSupported):
        verity_files.enable(planned)
    assert verity_files.enable(planned, skip_unsupported=True) == []
