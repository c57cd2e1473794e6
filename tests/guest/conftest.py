# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The session-scoped `guest` fixture: one boot of the QEMU guest per session.

Availability (qemu with TCG, ssh, a built or buildable image) is checked in
tests/conftest.py before any guest test starts; here the image is built if
needed, booted, the project copied in, and the guest always powered off.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict, Iterator, Optional

import pytest

import guest_vm

GUEST_CHECKS = guest_vm.GUEST_ROOT + "/tests/guest_checks.py"

_booted: Dict[str, object] = {}
# The running guest and the last guest test: the guest is powered off right
# after that test instead of idling under emulation until the session ends.
_session: Dict[str, object] = {"vm": None, "last": None}


class GuestSession:
    """The booted guest, with a helper to run one in-guest check (one SSH call)."""

    def __init__(self, vm: guest_vm.Guest) -> None:
        self.vm = vm
        self.system_state = vm.system_state
        self.failed_units = vm.failed_units
        self._results: Dict[str, dict] = {}

    def run(self, command, **kwargs):
        return self.vm.run(command, **kwargs)

    def check(self, name: str, timeout: float = 600) -> dict:
        """Result of guest_checks.py NAME, run once per session and shared by
        the tests that assert on parts of it."""
        if name not in self._results:
            self._results[name] = self._check(name, timeout)
        return self._results[name]

    def _check(self, name: str, timeout: float) -> dict:
        return self.run_check(name, timeout=timeout)

    def run_check(self, name: str, spec: Optional[dict] = None, timeout: float = 600) -> dict:
        """guest_checks.py NAME [SPEC as JSON], run now (not shared: each spec is its own run)."""
        workdir = "/var/tmp/cfguest/%s" % name
        cmd = ["env", "PYTHONPATH=%s/lib" % guest_vm.GUEST_ROOT, "python3", GUEST_CHECKS, name, workdir]
        if spec is not None:
            cmd.append(json.dumps(spec))
        result = self.vm.run_json(cmd, timeout=timeout)
        assert isinstance(result, dict)
        return result


@pytest.fixture(scope="session")
def guest() -> Iterator[GuestSession]:
    try:
        guest_vm.build_image(quiet=True)
    except guest_vm.GuestError as exc:
        pytest.fail("building the guest image failed: %s" % exc, pytrace=False)
    vm = guest_vm.Guest()
    _session["vm"] = vm
    try:
        vm.start()
        vm.copy_project()
        _booted.update(boot_seconds=vm.boot_seconds, ready_seconds=vm.ready_seconds,
                       system_state=vm.system_state, failed_units=vm.failed_units)
        yield GuestSession(vm)
    finally:
        vm.stop()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    # test_guest_agent.py boots its own guest (molecule): first, before the
    # session guest exists, so that two emulated guests never run at once.
    items.sort(key=lambda i: 0 if i.get_closest_marker("guest") is not None
               and i.fspath.basename == "test_guest_agent.py" else 1)
    guest_items = [item for item in items if item.get_closest_marker("guest") is not None]
    _session["last"] = guest_items[-1].nodeid if guest_items else None


def pytest_runtest_teardown(item, nextitem) -> None:
    vm = _session["vm"]
    if vm is not None and item.nodeid == _session["last"]:
        vm.stop()  # idempotent: the fixture's own finalizer then has nothing to do


def pytest_terminal_summary(terminalreporter, exitstatus: int, config) -> None:
    if _booted:
        failed = _booted.get("failed_units") or []
        terminalreporter.write_line(
            "guest: SSH after %.1f s, system '%s' after %.1f s%s" % (
                _booted["boot_seconds"], _booted["system_state"], _booted["ready_seconds"],
                " (failed units: %s)" % ", ".join(failed) if failed else ""))


@pytest.fixture(scope="session")
def guest_mount_helper() -> None:
    """Our mount.composefs must exist on the host side to be copied in."""
    module = "composefs_fleet_cli.mount_composefs"
    if importlib.util.find_spec(module) is None:
        reason = "our mount.composefs is missing: module %s not importable" % module
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true requires it: " + reason, pytrace=False)
        pytest.skip(reason)
