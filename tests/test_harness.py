# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The harness itself: oracle fixture, kernel-mount checks, CI strictness, skip summary."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest


def _root_conftest():
    # By path: with conftest.py files in subdirectories too, "import conftest"
    # would get whichever of them pytest loaded last.
    spec = importlib.util.spec_from_file_location("composefs_fleet_root_conftest",
                                                  str(Path(__file__).parent / "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _root_conftest()
CAP_SYS_ADMIN = _conftest.CAP_SYS_ADMIN
kernel_mount_missing = _conftest.kernel_mount_missing
load_oracle = _conftest.load_oracle

COMPOSEFS_MAGIC = 0xD078629A
EROFS_SUPER_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024

ALL_CAPS = 1 << CAP_SYS_ADMIN
GOOD_FS = "nodev\tproc\n\terofs\nnodev\toverlay\n"
TOOLS_OK = {"mount": True, "umount": True}


@pytest.mark.oracle
def test_oracle_mkcomposefs_prints_usage(oracle):
    # The C tool has no --help: it rejects the option, prints usage to stderr, exits 1.
    res = oracle.run("mkcomposefs", "--help")
    assert res.returncode == 1
    assert b"Usage: mkcomposefs [OPTIONS] SOURCE IMAGE" in res.stderr
    assert b"--digest-store=PATH" in res.stderr
    assert oracle.version == "1.0.8"
    assert oracle.debian_version.startswith("1.0.8")


@pytest.mark.oracle
def test_oracle_builds_an_image(oracle, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"hi\n")
    (src / "big").write_bytes(bytes(range(256)) * 20)
    store = tmp_path / "store"
    image = tmp_path / "image.cfs"
    res = oracle.run("mkcomposefs", "--digest-store=%s" % store, "--print-digest", src, image)
    assert res.returncode == 0, res.stderr
    digest = res.stdout.decode().strip()
    assert len(digest) == 64 and int(digest, 16) >= 0
    data = image.read_bytes()
    assert struct.unpack_from("<I", data, 0)[0] == COMPOSEFS_MAGIC
    assert struct.unpack_from("<I", data, EROFS_SUPER_OFFSET)[0] == EROFS_SUPER_MAGIC
    # Only the file too big to inline goes into the store.
    stored = [p for p in store.rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].read_bytes() == (src / "big").read_bytes()


def test_oracle_loader_names_the_missing_directory(tmp_path):
    found, reason = load_oracle(tmp_path / "nowhere")
    assert found is None
    assert reason == "C oracle composefs 1.0.8 not found in %s: run scripts/fetch-oracle" % (tmp_path / "nowhere")


def test_kernel_check_accepts_a_capable_machine():
    assert kernel_mount_missing(0, GOOD_FS, ALL_CAPS, True, TOOLS_OK) == []


def test_kernel_check_names_each_missing_piece():
    missing = kernel_mount_missing(1000, "nodev\tproc\n", 0, False, {"mount": True, "umount": False})
    assert missing == [
        "not root (euid 1000)",
        "no CAP_SYS_ADMIN",
        "erofs not in /proc/filesystems",
        "overlay not in /proc/filesystems",
        "/dev/loop-control missing",
        "umount not on PATH",
    ]


@pytest.mark.kernel
@pytest.mark.oracle
def test_kernel_mount_of_an_oracle_image(oracle, kernel_mount, tmp_path):
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    payload = b"composefs-fleet " * 100
    (src / "dir" / "file").write_bytes(payload)
    (src / "link").symlink_to("dir/file")
    store = tmp_path / "store"
    image = tmp_path / "image.cfs"
    res = oracle.run("mkcomposefs", "--digest-store=%s" % store, src, image)
    assert res.returncode == 0, res.stderr
    mnt = kernel_mount.mount_composefs(image, tmp_path / "mnt", store)
    assert (mnt / "dir" / "file").read_bytes() == payload
    assert (mnt / "link").resolve() == (mnt / "dir" / "file").resolve()
    assert hashlib.sha256((mnt / "link").read_bytes()).digest() == hashlib.sha256(payload).digest()


INNER = textwrap.dedent("""
    import pytest

    @pytest.mark.oracle
    def test_needs_oracle():
        pass

    @pytest.mark.guest
    def test_needs_guest():
        pass
""")


def _inner_run(pytester, monkeypatch, tmp_path: Path, ci: str):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("COMPOSEFS_FLEET_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CI", ci)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_missing_oracle_skips_and_is_summarised(pytester, monkeypatch, tmp_path):
    result = _inner_run(pytester, monkeypatch, tmp_path, ci="")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([
        "*SKIPPED TESTS SUMMARY: 2 skipped*",
        "*1 x C oracle composefs 1.0.8 not found in *empty-cache/oracle/1.0.8: run scripts/fetch-oracle",
        "*1 x QEMU guest not available: *guest_vm.py missing",
    ])


def test_missing_oracle_fails_under_ci(pytester, monkeypatch, tmp_path):
    result = _inner_run(pytester, monkeypatch, tmp_path, ci="true")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*CI=true requires it: C oracle composefs 1.0.8 not found*"])
    result.stdout.fnmatch_lines(["*CI=true requires it: QEMU guest not available: *guest_vm.py missing*"])
    assert result.ret == 1



@pytest.mark.oracle
def test_oracle_copy_runs_as_an_unprivileged_user(oracle):
    # The cache sits under a 0700 home; copy_to gives tests running as nobody a reachable oracle.
    if os.geteuid() != 0:
        pytest.skip("not root: cannot switch to user nobody")
    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="cfs-harness-"))
    try:
        os.chmod(str(top), 0o755)
        copy = oracle.copy_to(top / "oracle")

        def as_nobody() -> None:
            os.setgid(65534)
            os.setuid(65534)

        res = subprocess.run(copy.argv("mkcomposefs") + ["--help"], capture_output=True,
                             preexec_fn=as_nobody)
        assert res.returncode == 1 and b"Usage: mkcomposefs" in res.stderr
    finally:
        shutil.rmtree(str(top))


def test_hypothesis_runs_derandomized_without_a_database():
    # The test command must never fail on a draw (scripts/fuzz explores).
    from hypothesis import settings

    if os.environ.get(_conftest.HYPOTHESIS_PROFILE_ENV):
        pytest.skip("hypothesis profile chosen by %s" % _conftest.HYPOTHESIS_PROFILE_ENV)
    current = settings.default
    assert current.derandomize is True and current.database is None and current.deadline is None


def test_fuzz_script_explores_within_its_budget(tmp_path):
    # A zero budget runs no round: the loop, its arguments and its exit status.
    script = Path(__file__).resolve().parents[1] / "scripts" / "fuzz"
    res = subprocess.run(["bash", str(script), "0", "-k", "nothing"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON="false"), timeout=60)
    assert res.returncode == 0 and "0 rounds in 0 s, no failure" in res.stdout, res.stderr
    res = subprocess.run(["bash", str(script), "5", "-k", "nothing"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON="false"), timeout=60)
    assert res.returncode == 1 and "round 1 failed" in res.stderr
