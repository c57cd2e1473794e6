# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.verity on this host, whose kernel has no fs-verity: the
``unsupported`` behaviour, digests (against the core and composefs-info),
expected_digest, trees and symlinks.  Enabling for real is tested in the
QEMU guest (tests/guest/test_guest_verity_module.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from composefs_fleet import fsverity_digest, fsverity_ioctl
from composefs_fleet.errors import VerityNotSupported

SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096 * 128 + 5]


def _fs_has_no_verity(path: Path) -> str:
    """The kernel's answer for a file at ``path`` (these tests need the unsupported case)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        fsverity_ioctl.measure_verity(fd)
    except VerityNotSupported as exc:
        return str(exc)
    except Exception:
        return ""
    finally:
        os.close(fd)
    return ""


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    out = {}
    for size in SIZES:
        p = root / ("f%d" % size)
        p.write_bytes(bytes((i * 7 + size) % 251 for i in range(size)))
        out[size] = p
    problem = _fs_has_no_verity(out[0])
    if not problem:
        pytest.skip("the filesystem of %s has fs-verity: these tests cover a filesystem without it "
                    "(real enabling: tests/guest/test_guest_verity_module.py)" % tmp_path)
    return out


def has_verity(path) -> bool:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return fsverity_ioctl.verity_enabled(fd)
    finally:
        os.close(fd)


def measure_file(ours, *paths):
    res = ours.run("composefs-info", "measure-file", *paths)
    assert res.returncode == 0, res.stderr
    return res.stdout.decode().split()


def test_unsupported_fail_is_the_default_and_enables_nothing(files, module_runner):
    paths = [str(files[s]) for s in SIZES]
    for check in (True, False):
        res = module_runner("verity", {"paths": paths}, check=check, diff=True)
        assert res["failed"] is True, res
        assert "fs-verity is not supported" in res["msg"] and "nothing was enabled" in res["msg"]
        assert "6 of 6 file(s)" in res["msg"]
        assert res["verity_supported"] is False and res["enabled"] == 0
        assert [f["verity_after"] for f in res["files"]] == [False] * 6
    assert not any(has_verity(p) for p in paths)


def test_unsupported_skip_reports_digests_and_changes_nothing(files, module_runner, ours):
    paths = [str(files[s]) for s in SIZES]
    want = measure_file(ours, *paths)
    assert len(set(want)) == len(want)  # different contents, different digests
    for check in (True, False, False, True):
        res = module_runner("verity", {"paths": paths, "unsupported": "skip"}, check=check, diff=True)
        assert not res.get("failed"), res
        assert res["changed"] is False and res["enabled"] == 0
        assert res["verity_supported"] is False and "fs-verity is not supported" in res["verity_problem"]
        assert [f["file"] for f in res["files"]] == paths
        assert [f["digest"] for f in res["files"]] == want
        assert [f["digest"] for f in res["files"]] == [fsverity_digest.digest_file(p).hex() for p in paths]
        for f in res["files"]:
            assert (f["verity_before"], f["verity_after"], f["verity_supported"]) == (False, False, False)
        assert res["diff"] == {"before": {"fsverity_enabled": []}, "after": {"fsverity_enabled": []}}
        assert "fs-verity left off on 6 file(s)" in json.dumps(res["warnings"])


@pytest.mark.oracle
def test_digests_equal_the_c_composefs_info(files, module_runner, oracle):
    paths = [str(files[s]) for s in SIZES]
    res = oracle.run("composefs-info", "measure-file", *paths)
    assert res.returncode == 0, res.stderr
    got = module_runner("verity", {"paths": paths, "unsupported": "skip"})
    c_digests = res.stdout.decode().split()
    assert [f["digest"] for f in got["files"]][1:] == c_digests[1:]
    # composefs 1.0.8 hashes an empty file wrongly (fixed upstream in a66faad, #442); the module reports the
    # kernel's value (the guest's fs-verity tests check userspace == kernel for size 0).
    assert c_digests[0] == "cfc3391077edfd51859f6e5e16e03f82b1da3ee1a35d418b0d0b3b57740b4405"
    assert got["files"][0]["digest"] == "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"


def test_expected_digest_match_and_spellings(files, module_runner):
    target = str(files[4097])
    digest = fsverity_digest.digest_file(target).hex()
    for spelling in (digest, digest.upper(), "sha256:" + digest, " %s\n" % digest):
        res = module_runner("verity", {"paths": [target], "expected_digest": spelling, "unsupported": "skip"})
        assert not res.get("failed"), (spelling, res)
        assert res["files"][0]["digest"] == digest and res["changed"] is False


@pytest.mark.parametrize("unsupported", ["fail", "skip"])
def test_expected_digest_mismatch_fails_first(files, module_runner, unsupported):
    target = str(files[4096])
    digest = fsverity_digest.digest_file(target).hex()
    wrong = fsverity_digest.digest_file(str(files[4097])).hex()
    for check in (True, False):
        res = module_runner("verity", {"paths": [target], "expected_digest": wrong, "unsupported": unsupported},
                            check=check)
        assert res["failed"] is True
        assert digest in res["msg"] and wrong in res["msg"] and "not enabled" in res["msg"], res["msg"]
    assert not has_verity(target)


@pytest.mark.parametrize("value", ["abc", "z" * 64, "sha512:" + "0" * 64, "0" * 63])
def test_expected_digest_must_be_a_digest(files, module_runner, value):
    res = module_runner("verity", {"paths": [str(files[1])], "expected_digest": value})
    assert res["failed"] is True and "64 hex digits" in res["msg"]


def test_expected_digest_needs_exactly_one_file(files, module_runner):
    digest = fsverity_digest.digest_file(str(files[1])).hex()
    res = module_runner("verity", {"paths": [str(files[1]), str(files[0])], "expected_digest": digest})
    assert res["failed"] is True and "exactly one regular file" in res["msg"] and "name 2" in res["msg"]
    res = module_runner("verity", {"paths": [str(files[1].parent)], "recurse": True, "expected_digest": digest})
    assert res["failed"] is True and "name 6" in res["msg"]
    # The same file twice is one file.
    res = module_runner("verity", {"paths": [str(files[1]), str(files[1])], "expected_digest": digest,
                                   "unsupported": "skip"})
    assert not res.get("failed") and len(res["files"]) == 1, res


def test_directory_needs_recurse(files, module_runner):
    res = module_runner("verity", {"paths": [str(files[0].parent)]})
    assert res["failed"] is True and "is a directory" in res["msg"] and "recurse" in res["msg"]


def test_recurse_takes_regular_files_only_and_never_follows_symlinks(tmp_path, files, module_runner, ours):
    root = files[0].parent
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "z").write_bytes(b"zz" * 5000)
    (root / "sub" / "a").write_bytes(b"a")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not in the tree")
    (root / "link-out").symlink_to(outside / "secret")
    (root / "dirlink-out").symlink_to(outside)
    (root / "link-in").symlink_to("f1")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(str(root / "fifo"))
    os.link(str(root / "f4096"), str(root / "hardlink-to-f4096"))
    res = module_runner("verity", {"paths": [str(root)], "recurse": True, "unsupported": "skip"}, diff=True)
    assert not res.get("failed"), res
    names = [os.path.relpath(f["file"], str(root)) for f in res["files"]]
    # Sorted walk; the hard link is the same file as f4096 (seen first); nothing outside, no fifo.
    assert names == ["f0", "f1", "f1572869", "f4095", "f4096", "f4097", "sub/a", "sub/deeper/z"]
    digests = measure_file(ours, *[f["file"] for f in res["files"]])
    assert [f["digest"] for f in res["files"]] == digests
    # A directory named through a symlink is walked (only top-level names are followed).
    res = module_runner("verity", {"paths": [str(root / "dirlink-out")], "recurse": True, "unsupported": "skip"})
    assert [f["file"] for f in res["files"]] == [str(root / "dirlink-out" / "secret")]


def test_top_level_symlink_to_a_file_is_followed(files, module_runner):
    link = files[1].parent / "named-link"
    link.symlink_to(files[4097])
    res = module_runner("verity", {"paths": [str(link)], "unsupported": "skip"})
    assert res["files"][0]["file"] == str(link)
    assert res["files"][0]["digest"] == fsverity_digest.digest_file(str(files[4097])).hex()


@pytest.mark.parametrize("kind", ["missing", "dangling", "fifo"])
def test_bad_paths_fail_clearly(tmp_path, files, module_runner, kind):
    path = tmp_path / kind
    if kind == "dangling":
        path.symlink_to("nowhere")
    elif kind == "fifo":
        os.mkfifo(str(path))
    res = module_runner("verity", {"paths": [str(files[1]), str(path)], "unsupported": "skip"})
    assert res["failed"] is True
    want = {"missing": "does not exist", "dangling": "dangling symbolic link",
            "fifo": "not a regular file or directory"}[kind]
    assert want in res["msg"] and str(path) in res["msg"], res["msg"]


def test_argument_errors(files, module_runner):
    res = module_runner("verity", {"paths": []})
    assert res["failed"] is True and "paths is empty" in res["msg"]
    res = module_runner("verity", {"paths": [str(files[1])], "unsupported": "ignore"})
    assert res["failed"] is True and "unsupported" in res["msg"]
    res = module_runner("verity", {})
    assert res["failed"] is True and "paths" in res["msg"]

