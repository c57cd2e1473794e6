# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Issue 7 in the QEMU guest (systemd PID 1, fs-verity): the molecule
scenario ``guest`` converges the roles composefs.fleet.composefs_node and
composefs.fleet.composefs_agent, checks idempotence, then verifies: the agent active
with a clean pass, a reboot after which the mount comes back through its
.mount unit, and the fault drills of tests/guest/agent_drills.py. Its verify
step leaves the observations as JSON on the host; the tests below assert on
them one by one, so a failure names the drill and shows what was seen.

One guest at a time: this module boots its own guest through molecule and
does not use the session's ``guest`` fixture. Its file name sorts before the
other guest tests, and the session guest is only booted by the first test that
asks for it, so in a normal run (``pytest -m guest tests/guest``, or the whole
suite) the two never overlap; if a guest of this project already runs
(another order, another process), the module fails instead of starting a
second one.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import guest_vm
from composefs_fleet_agent.findings import KINDS

pytestmark = [pytest.mark.guest, pytest.mark.timeout(3000)]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WHERE = "/srv/app"
STORE = "/var/lib/composefs"
RESULTS = ("status-converged", "status-boot", "drills")


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Dict[str, object]:
    molecule = VENV_BIN / "molecule"
    if not molecule.is_file():
        reason = "molecule is not installed in %s (scripts/setup installs it with the test extras)" % VENV_BIN
        if _ci():
            pytest.fail("CI=true requires it: " + reason, pytrace=False)
        pytest.skip(reason)
    others = guest_vm.running_guests()
    if others:
        pytest.fail("a guest of this project is already running (QEMU pid %s): this module boots its own "
                    "and must run before the session guest starts (two emulated guests at once starve each "
                    "other)" % ", ".join(map(str, others)), pytrace=False)
    guest_vm.build_image(quiet=True)
    results = tmp_path_factory.mktemp("agent-guest")
    env = dict(os.environ, PATH="%s%s%s" % (VENV_BIN, os.pathsep, os.environ.get("PATH", "")),
               ANSIBLE_NOCOLOR="1", NO_COLOR="1", COMPOSEFS_GUEST_RESULTS=str(results))
    proc = subprocess.run([str(molecule), "test", "-s", "guest"], cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=2700)
    out: Dict[str, object] = {"rc": proc.returncode, "log": proc.stdout}
    for name in RESULTS:
        path = results / ("%s.json" % name)
        out[name] = json.loads(path.read_text()) if path.is_file() else None
    return out


def _get(scenario: Dict[str, object], name: str) -> dict:
    data = scenario[name]
    if data is None:
        pytest.fail("molecule verify left no %s.json (exit %d); molecule output:\n%s"
                    % (name, scenario["rc"], str(scenario["log"])[-12000:]), pytrace=False)
    assert isinstance(data, dict)
    return data


def _show(data: object) -> str:
    return json.dumps(data, indent=1, sort_keys=True)[:12000]


def _composefs_mounts(mounts: List[dict]) -> List[dict]:
    return [m for m in mounts if m["fstype"] == "overlay" and m["source"] == "composefs"]


def _summary_clean(summary: dict) -> None:
    assert summary is not None, "no pass-summary entry came"
    assert summary["COMPOSEFS_FINDING"] == "pass-summary" and summary["SYSLOG_IDENTIFIER"] == "composefs-fleet-agent"
    assert summary["COMPOSEFS_HEALTHY"] == "1" and summary["COMPOSEFS_FINDINGS"] == "0", summary
    assert summary["COMPOSEFS_MOUNTS"] == "1", summary


def _textfile_clean(textfile: dict) -> None:
    assert textfile and "_error" not in textfile, textfile
    assert textfile["composefs_fleet_agent_healthy"] == 1, textfile
    assert textfile["composefs_fleet_agent_config_valid"] == 1, textfile
    findings = {k: v for k, v in textfile.items() if k.startswith("composefs_fleet_agent_findings{")}
    # Every kind is listed, with 0 after a clean pass.
    assert len(findings) >= 10 and set(findings.values()) == {0}, findings


# Entries that are no finding: a reload (the drills' trigger) logs config-loaded.
INFO_KINDS = {"config-loaded", "agent-started"}


def _kinds(rec: dict) -> List[str]:
    """The finding and repair kinds the drill's pass logged."""
    return [k for k in rec["kinds"] if k not in INFO_KINDS]


def _entries(rec: dict, kind: str) -> List[dict]:
    return [e for e in rec["entries"] if e.get("COMPOSEFS_FINDING") == kind]


def _metric(rec: dict, family: str, kind: str) -> float:
    return rec["textfile"]['composefs_fleet_agent_%s{kind="%s"}' % (family, kind)]


# ------------------------------------------------------------ scenario --

def test_molecule_guest_scenario_passes(scenario):
    log = re.sub(r"\x1b\[[0-9;]*m", "", str(scenario["log"]))
    assert scenario["rc"] == 0, "molecule test -s guest failed (exit %d):\n%s" % (scenario["rc"], log[-15000:])
    # The whole sequence ran: converge, a second converge without changes, verify.
    for step in ("converge", "idempotence", "verify"):
        assert re.search(r"\[guest > %s\] Executed: Successful" % step, log), (step, log[-5000:])


def test_agent_active_with_a_clean_pass(scenario):
    st = _get(scenario, "status-converged")
    svc = st["service"]
    assert svc["ActiveState"] == "active" and svc["SubState"] == "running", svc
    assert svc["StatusText"], "the agent sent no STATUS= line: %s" % svc
    # trixie's systemd (257) has Type=notify-reload: a reload returns once the agent said READY=1 again.
    assert svc["Type"] == "notify-reload", svc
    _summary_clean(st["summary"])
    # Every object of the mounted image was checked.
    assert int(st["summary"]["COMPOSEFS_OBJECTS"]) >= len(st["objects"]) >= 4, (st["summary"], st["objects"])
    _textfile_clean(st["textfile"])
    # The objects carry fs-verity with the digests they are named by.
    assert st["measure_objects"] == {d: "sha256:" + d for d in st["objects"].values()}, st["measure_objects"]
    lines = _composefs_mounts(st["mount"])
    assert len(lines) == 1 and "verity=require" in lines[0]["super"], st["mount"]
    cfg = st["config"]
    assert cfg["mounts"][0]["where"] == WHERE and cfg["mounts"][0]["remount"] is True, cfg
    # By ref, without a digest: the agent reads the image from the mount history the mount module wrote.
    assert cfg["mounts"][0]["ref"] == "app/current" and "digest" not in cfg["mounts"][0], cfg
    history = st["history"]
    assert history["image"] == "%s/images/%s" % (STORE, history["image_digest"]) and history["ref"] == "app/current"


def test_systemd_analyze_security_exposure(scenario, capsys, record_property):
    sec = _get(scenario, "status-converged")["security"]
    assert sec["rc"] == 0 and sec["exposure"] is not None, sec
    # Reported in the test output (issue 7 asks for the figure).
    record_property("systemd_analyze_exposure", sec["exposure"])
    with capsys.disabled():
        print("\nguest: systemd-analyze security composefs-fleet-agent.service: exposure %.1f %s (%d settings flagged)"
              % (sec["exposure"], sec["rating"], len(sec["flagged"])))
    # The unit's sandbox is the point of this figure: "OK" (below 4.0) or better.
    assert sec["exposure"] < 4.0, sec


def test_mount_and_agent_come_back_after_a_reboot(scenario):
    st = _get(scenario, "status-boot")
    assert st["boots"] >= 2, "no second boot in the journal: %s" % st["boots"]
    # The .mount unit mounted it at boot (through mount(8) and mount.composefs),
    # not the agent.
    assert st["mount_unit"] == "active", st["mount_unit"]
    messages = [e.get("MESSAGE", "") for e in st["mount_unit_journal"]]
    assert any(m.startswith("Mounted ") for m in messages), messages
    lines = _composefs_mounts(st["mount"])
    assert len(lines) == 1 and "verity=require" in lines[0]["super"], st["mount"]
    assert st["read"]["through_mount"] == st["read"]["source"], st["read"]
    assert not [e for e in st["agent_this_boot"] if e.get("COMPOSEFS_FINDING") == "mount-remounted"], \
        st["agent_this_boot"]
    assert st["service"]["ActiveState"] == "active", st["service"]
    _summary_clean(st["summary"])
    _textfile_clean(st["textfile"])


# -------------------------------------------------------------- drills --

@pytest.fixture(scope="module")
def drills(scenario) -> dict:
    return _get(scenario, "drills")


def _drill(drills: dict, name: str) -> dict:
    """One drill's record; its pass must have ended with a summary entry."""
    rec = drills[name]
    assert rec.get("summary") is not None, "drill %s: no pass-summary entry came: %s" % (name, _show(rec))
    return rec


def test_drill_baseline_and_final_passes_are_clean(drills):
    for name in ("baseline", "final"):
        rec = _drill(drills, name)
        assert rec["reload"]["rc"] == 0, (name, rec["reload"])
        _summary_clean(rec["summary"])
        assert _kinds(rec) == [], (name, rec["entries"])
        assert "config-loaded" in rec["kinds"], "the reload did not reload: %s" % rec["entries"]
        _textfile_clean(rec["textfile"])
        assert rec["service"]["StatusText"], rec["service"]


def test_drill_object_copied_without_verity_gets_it_enabled(drills):
    rec = _drill(drills, "verity_missing")
    obj = rec["object"]
    enabled = _entries(rec, "object-verity-enabled")
    assert [e["COMPOSEFS_OBJECT"] for e in enabled] == [obj], _show(rec["entries"])
    assert enabled[0]["MESSAGE_ID"] and enabled[0]["COMPOSEFS_PATH"].endswith(obj[2:]), enabled
    assert set(_kinds(rec)) <= {"object-verity-missing", "object-verity-enabled"}, rec["kinds"]
    # The kernel now measures it, with its name as digest.
    assert rec["measure_after"] == "sha256:" + obj, rec["measure_after"]
    # A repair resolves its finding: the pass is healthy, the repair counted.
    assert rec["summary"]["COMPOSEFS_HEALTHY"] == "1" and int(rec["summary"]["COMPOSEFS_REPAIRS"]) == 1, rec["summary"]
    assert _metric(rec, "repairs", "object-verity-enabled") == 1, rec["textfile"]
    assert rec["textfile"]["composefs_fleet_agent_healthy"] == 1, rec["textfile"]


def test_drill_object_content_changed_is_reported_never_enabled(drills):
    rec = _drill(drills, "content_changed")
    obj = rec["object"]
    found = _entries(rec, "object-digest-mismatch")
    assert [e["COMPOSEFS_OBJECT"] for e in found] == [obj], _show(rec["entries"])
    entry = found[0]
    assert int(entry["PRIORITY"]) <= 3, entry  # err or worse
    if "COMPOSEFS_ACTUAL" in entry:
        assert entry["COMPOSEFS_ACTUAL"].endswith(rec["tampered_digest"]), (entry, rec["tampered_digest"])
    assert not _entries(rec, "object-verity-enabled"), rec["entries"]
    assert rec["measure_after"].startswith("error"), "fs-verity was enabled on a bad object: %s" % rec["measure_after"]
    assert rec["content_kept"] is True  # no quarantine configured: left where it is
    # The overlay (verity=require) refuses the bad object.
    assert rec["read"] == {"errno": "EIO"}, (rec["read"], rec["dmesg"])
    assert rec["summary"]["COMPOSEFS_HEALTHY"] == "0" and int(rec["summary"]["COMPOSEFS_FINDINGS"]) >= 1
    assert _metric(rec, "findings", "object-digest-mismatch") == 1, rec["textfile"]
    assert rec["textfile"]["composefs_fleet_agent_healthy"] == 0, rec["textfile"]
    # Restored (verity on, right bytes): reads work again.
    assert "sha256" in rec["read_restored"], rec["read_restored"]


def test_drill_object_deleted_is_reported(drills):
    rec = _drill(drills, "object_deleted")
    found = _entries(rec, "object-missing")
    assert [e["COMPOSEFS_OBJECT"] for e in found] == [rec["object"]], _show(rec["entries"])
    assert _kinds(rec) == ["object-missing"], rec["kinds"]
    assert rec["summary"]["COMPOSEFS_HEALTHY"] == "0", rec["summary"]
    assert _metric(rec, "findings", "object-missing") == 1, rec["textfile"]
    assert rec["exists_after"] is False


def test_drill_journalctl_x_explains_the_finding_from_the_catalog(drills):
    # The role installed agent/catalog/ and ran journalctl --update-catalog: journalctl -x shows the entry's
    # explanation under it, with the entry's own fields filled in.
    rec = _drill(drills, "object_deleted")
    entry = _entries(rec, "object-missing")[0]
    assert entry["MESSAGE_ID"] == KINDS["object-missing"].message_id, entry
    explained = rec["explained"]
    assert explained["rc"] == 0, explained
    # Catalog lines are prefixed with "-- ", or "\u2591\u2591 " in a UTF-8 locale (systemd 246 and later).
    lines = [re.sub("^(--|\u2591\u2591) ?", "", line) for line in explained["out"].splitlines()]
    text = explained["out"]
    assert "Subject: object %s is missing" % rec["object"] in lines, text
    assert "Defined-By: composefs-fleet" in lines and any(line.startswith("What to do:") for line in lines), text
    assert "@COMPOSEFS_" not in text and entry["COMPOSEFS_PATH"] in text, text


def test_drill_mount_unmounted_by_hand_is_remounted(drills):
    rec = _drill(drills, "unmounted")
    for kind in ("mount-missing", "mount-remounted"):
        assert [e["COMPOSEFS_MOUNT"] for e in _entries(rec, kind)] == [WHERE], (kind, _show(rec["entries"]))
    lines = _composefs_mounts(rec["mount"])
    assert len(lines) == 1 and "verity=require" in lines[0]["super"], rec["mount"]
    # Through systemd (the agent's sandbox has its own mount namespace).
    assert rec["mount_unit"] == "active", rec["mount_unit"]
    assert rec["read"] == rec["source"], rec["read"]
    assert rec["summary"]["COMPOSEFS_HEALTHY"] == "1", rec["summary"]
    assert _metric(rec, "repairs", "mount-remounted") == 1, rec["textfile"]


def test_drill_image_replaced_is_reported_and_not_remounted(drills):
    rec = _drill(drills, "image_replaced")
    assert rec["other_images"], "no second image in the store to swap in"
    found = _entries(rec, "image-digest-mismatch")
    assert [e["COMPOSEFS_MOUNT"] for e in found] == [WHERE], _show(rec["entries"])
    # Expected: the configured digest; actual: what the kernel measures on the swapped-in file.
    assert found[0]["COMPOSEFS_EXPECTED"] == drills["image_digest"], found[0]
    assert "sha256:" + found[0]["COMPOSEFS_ACTUAL"] == rec["image_file_digest"] != "sha256:" + drills["image_digest"], \
        (found[0], rec["image_file_digest"])
    assert found[0]["COMPOSEFS_PATH"] == drills["image"], found[0]
    assert not _entries(rec, "mount-remounted"), rec["entries"]
    assert rec["mount"] == [] and rec["mount_unit"] != "active", (rec["mount"], rec["mount_unit"])
    assert rec["summary"]["COMPOSEFS_HEALTHY"] == "0", rec["summary"]
    assert _metric(rec, "findings", "image-digest-mismatch") >= 1, rec["textfile"]
    # Put back, the unit mounts it again.
    assert rec["restore_start"]["rc"] == 0 and len(_composefs_mounts(rec["restored_mount"])) == 1, rec


def test_drill_agent_killed_is_restarted_by_systemd(drills):
    rec = _drill(drills, "sigkill")
    before, after = rec["before"], rec["after"]
    assert after["ActiveState"] == "active" and after["MainPID"] not in ("0", before["MainPID"]), (before, after)
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    messages = [e.get("MESSAGE", "") for e in rec["unit_entries"]]
    assert any("status=9/KILL" in m for m in messages), messages
    # The new process passes at once (its first pass).
    assert rec["summary"]["_PID"] == after["MainPID"] and rec["summary"]["COMPOSEFS_PASS"] == "1", rec["summary"]
    assert rec["summary"]["COMPOSEFS_HEALTHY"] == "1", rec["summary"]


def test_drill_watchdog_stall_is_killed_and_restarted(drills):
    rec = _drill(drills, "watchdog")
    before, after = rec["before"], rec["after"]
    assert after["ActiveState"] == "active" and after["MainPID"] not in ("0", before["MainPID"]), (before, after)
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    messages = [e.get("MESSAGE", "") for e in rec["unit_entries"]]
    assert any("Watchdog timeout" in m for m in messages), messages
    assert any("result 'watchdog'" in m for m in messages), messages
    assert rec["summary"]["_PID"] == after["MainPID"] and rec["summary"]["COMPOSEFS_HEALTHY"] == "1", rec["summary"]
