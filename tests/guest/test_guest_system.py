# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The guest is a real node: systemd as PID 1, journald, the Python modules
the collection needs, an ext4 root with the verity feature."""

import pytest

pytestmark = pytest.mark.guest


def test_systemd_is_pid1_and_the_system_came_up(guest):
    info = guest.check("system")
    assert info["pid1"] == "systemd"
    # "degraded" means a unit failed: still a usable node, but say which.
    assert info["state"] in ("running", "degraded"), info["state"]
    assert guest.system_state == "running", "degraded after boot, failed units: %s" % guest.failed_units
    assert info["journald"] == "active"


def test_guest_has_the_node_python_modules_and_kernel_features(guest):
    info = guest.check("system")
    assert info["imports"] == {"xattr": "ok", "systemd.journal": "ok", "cryptography": "ok"}
    assert info["python"].startswith("3.")
    features = [line for line in info["root_features"].splitlines() if line.startswith("Filesystem features:")]
    assert features and "verity" in features[0].split()
    assert "4096" in [line.split()[-1] for line in info["root_features"].splitlines()
                      if line.startswith("Block size:")]
    for fs in ("erofs", "overlay", "ext4"):
        assert fs in info["filesystems"], "%s not in the guest's /proc/filesystems" % fs


def test_structured_journal_entry_round_trips(guest):
    res = guest.check("journal")
    entries = res["entries"]
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["COMPOSEFS_FLEET_CHECK"] == res["token"]
    assert entry["COMPOSEFS_FLEET_NUMBER"] == "42"
    assert entry["MESSAGE"] == "composefs-fleet guest journal check"
    assert entry["SYSLOG_IDENTIFIER"] == "composefs-fleet-test"
    assert entry["PRIORITY"] == "6"
    # Trusted fields are added by journald itself, not by the sender.
    assert entry["_TRANSPORT"] == "journal"
    assert entry["_COMM"].startswith("python3")


def test_commands_run_as_root_with_exit_status_and_stdin(guest):
    res = guest.run(["sh", "-c", "id -u; cat; exit 3"], input=b"from the host\n", check=False)
    assert res.returncode == 3
    assert res.stdout == "0\nfrom the host\n"
    # Arguments with spaces, quotes and newlines reach the guest unchanged.
    odd = "a b'c\"d\ne$HOME;`x`"
    res = guest.run(["printf", "%s", odd])
    assert res.stdout == odd
