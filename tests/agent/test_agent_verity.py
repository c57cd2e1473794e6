# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent's object checks use fsverity_ioctl's helpers: sealing an object
whose content matches its name, reporting what the kernel refuses.

The host kernel has no fs-verity: the "not supported" answers are real, the
others are the kernel's replies stood in for (tests/guest runs them for real).
"""
from __future__ import annotations

import os

import pytest

from composefs_fleet import fsverity_digest, fsverity_ioctl
from composefs_fleet.errors import VerityError, VerityNotEnabled, VerityNotSupported
from composefs_fleet_agent.checks import Checker, PassResult
from composefs_fleet_agent.config import Config


class Kernel:
    def __init__(self, monkeypatch, enable_error=None, enabled_with=None):
        self.enable_error = enable_error
        self.enabled_with = enabled_with  # what the kernel measures after enabling (None: the content)
        self.measured = {}
        self.calls = []
        monkeypatch.setattr(fsverity_ioctl, "enable_verity", self.enable)
        monkeypatch.setattr(fsverity_ioctl, "measure_verity", self.measure)

    def enable(self, fd, *args, signature=None):
        assert signature is None  # the agent seals objects, which carry no built-in signature
        self.calls.append("enable")
        if self.enable_error is not None:
            raise self.enable_error
        ino = os.fstat(fd).st_ino
        self.measured[ino] = ("sha256", self.enabled_with or fsverity_digest.digest_fd(fd))
        return True

    def measure(self, fd):
        self.calls.append("measure")
        found = self.measured.get(os.fstat(fd).st_ino)
        if found is None:
            raise VerityNotEnabled("fs-verity is not enabled on this file (errno 61, ENODATA)")
        return found


def _checker():
    checker = Checker(log=lambda finding: None, tick=lambda: None)
    checker.result = PassResult(1)
    checker.quarantine = False
    return checker


def _check(checker, tmp_path, data=b"object" * 1000, require=False, name="obj"):
    hexd = fsverity_digest.digest_bytes(data).hex()
    path = tmp_path / name
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        checker._check_object(fd, os.fstat(fd), str(path), str(tmp_path), hexd, True, require,
                              {"object": hexd, "path": str(path)})
    finally:
        os.close(fd)
    return [(f.kind, f.resolved, f.message) for f in checker.result.findings]


def test_object_with_right_content_is_sealed(tmp_path, monkeypatch):
    kernel = Kernel(monkeypatch)
    found = _check(_checker(), tmp_path)
    assert [(k, r) for k, r, _m in found] == [("object-verity-missing", True), ("object-verity-enabled", False)]
    assert kernel.calls == ["measure", "enable", "measure"]


def test_object_changed_while_sealed_is_a_mismatch(tmp_path, monkeypatch):
    Kernel(monkeypatch, enabled_with=b"\1" * 32)
    found = _check(_checker(), tmp_path)
    assert [(k, r) for k, r, _m in found] == [("object-verity-missing", False), ("object-digest-mismatch", False)]
    assert "changed while being sealed: measured " + "01" * 32 in found[1][2]


def test_enable_failure_is_reported_not_resolved(tmp_path, monkeypatch):
    Kernel(monkeypatch, enable_error=VerityError("FS_IOC_ENABLE_VERITY failed: no space left for the Merkle tree"))
    found = _check(_checker(), tmp_path)
    assert len(found) == 1 and found[0][:2] == ("object-verity-missing", False)
    assert "enabling it failed" in found[0][2] and "no space left" in found[0][2]


@pytest.mark.parametrize("require", [False, True])
def test_filesystem_without_verity_is_asked_once_per_pass(tmp_path, monkeypatch, require):
    if fsverity_ioctl._kernel_has_fsverity() is not False:
        pytest.skip("this kernel has CONFIG_FS_VERITY, or its config cannot be read (/proc/config.gz, /boot/config-*): the unsupported path needs a kernel without it (the guest tier covers the kernel with it)")
    calls = []
    real_measure, real_enable = fsverity_ioctl.measure_verity, fsverity_ioctl.enable_verity
    monkeypatch.setattr(fsverity_ioctl, "measure_verity", lambda fd: calls.append("measure") or real_measure(fd))
    monkeypatch.setattr(fsverity_ioctl, "enable_verity", lambda fd, *a: calls.append("enable") or real_enable(fd, *a))
    checker = _checker()
    found = _check(checker, tmp_path, require=require)
    # Nothing to repair; a mount that requires fs-verity is told it cannot have it.
    assert [(k, r) for k, r, _m in found] == ([("object-verity-missing", False)] if require else [])
    assert calls == ["measure"]
    # The next object of this filesystem: the kernel is not asked again ...
    _check(checker, tmp_path, data=b"other" * 100, require=require, name="obj2")
    assert calls == ["measure"] and checker._no_verity_devs
    # ... until the next pass: device numbers of unmounted filesystems are reused.
    checker.run(Config("<test>", 300.0, False, "", [], []), 2, False)
    assert not checker._no_verity_devs


@pytest.mark.parametrize("require", [False, True])
def test_filesystem_refusing_at_enable_time(tmp_path, monkeypatch, require):
    # Measuring says "not enabled", enabling says "not here" (e.g. the block size).
    kernel = Kernel(monkeypatch, enable_error=VerityNotSupported("fs-verity is not supported with block size 4096"))
    checker = _checker()
    found = _check(checker, tmp_path, require=require)
    assert [(k, r) for k, r, _m in found] == [("object-verity-missing", not require)]
    assert "its filesystem has none (fs-verity is not supported with block size 4096)" in found[0][2]
    assert kernel.calls == ["measure", "enable"]
    _check(checker, tmp_path, data=b"other" * 100, require=require, name="obj2")
    assert kernel.calls == ["measure", "enable"]
