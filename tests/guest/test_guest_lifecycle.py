# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The life cycle of a mount in the QEMU guest (systemd PID 1, fs-verity, Linux 6.12):
switch, reboot, roll back, and the node agent following each move.

Playbook 1: the role composefs.fleet.composefs_node installs our tools (mount.composefs in /sbin, so the unit
the module writes mounts at boot) and builds images v1 and v2 (refs app/v1, app/v2); the mount
module mounts v1 (unit written); the agent starts as a service (a transient unit whose configuration
names the mount point only); a process opens data.bin of v1 and reads half of it; the mount module
switches to v2 while that file is open; the process then reads the rest (v1 bytes to the end) and
opens the path again (v2 bytes).  The guest is then rebooted: v2 must come up from its unit.
Playbook 2 rolls back to v1 by digest, ``mount.previous.image_digest`` as the module returns it
after the reboot (from the mount history).  After each move ``composefs-fleet-agent --once --json``
says what it checked the mount against; agent.json is never rewritten.
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List

import pytest
from guest_ansible import node_play, playbook_exe, run_recorded

import guest_vm

pytestmark = [pytest.mark.guest, pytest.mark.timeout(2400)]

WORK = "/var/tmp/cflifecycle"
STORE = "/var/lib/cflifecycle/store"
WHERE = "/srv/cflifecycle"
UNIT = "srv-cflifecycle.mount"
AGENT_CONFIG = WORK + "/agent.json"
AGENT_UNIT = "cflifecycle-agent.service"
HOLDER_UNIT = "cflifecycle-holder.service"
SIZE = 300000  # data.bin: far above the inline limit, read in two halves by the holder


def _data(version: str) -> bytes:
    seed = 7 if version == "v1" else 91
    return bytes((i * seed + len(version)) % 251 for i in range(SIZE))


SHA = {v: hashlib.sha256(_data(v)).hexdigest() for v in ("v1", "v2")}

SETUP = r"""
import json, os, shutil, sys
spec = json.loads(sys.stdin.read())
for top in (spec["work"], os.path.dirname(spec["store"])):
    shutil.rmtree(top, ignore_errors=True)
for version in ("v1", "v2"):
    tree = os.path.join(spec["work"], "tree-" + version)
    os.makedirs(tree)
    seed = 7 if version == "v1" else 91
    with open(os.path.join(tree, "data.bin"), "wb") as f:
        f.write(bytes((i * seed + len(version)) % 251 for i in range(spec["size"])))
    with open(os.path.join(tree, "version"), "w") as f:
        f.write(version + "\n")
with open(spec["config"], "w") as f:
    json.dump({"version": 1, "interval": 2, "textfile": "", "stores": [{"path": spec["store"]}],
               "mounts": [{"where": spec["where"], "remount": True}]}, f)
os.sync()
"""

# The process holding a file of v1 open across the switch: reads half, says so, waits for the go,
# reads the rest from the same descriptor, then opens the path again.  Writes what it read as JSON.
HOLDER = r"""
import hashlib, json, os, sys, time
where, work = sys.argv[1], sys.argv[2]
path = os.path.join(where, "data.bin")
with open(path, "rb") as f:
    first = f.read(%d)
    open(os.path.join(work, "holder-ready"), "w").close()
    while not os.path.exists(os.path.join(work, "holder-go")):
        time.sleep(0.1)
    rest = f.read()
with open(path, "rb") as g:
    again = g.read()
out = {"held": hashlib.sha256(first + rest).hexdigest(), "held_size": len(first + rest),
       "reopened": hashlib.sha256(again).hexdigest()}
with open(os.path.join(work, "holder.json.tmp"), "w") as f:
    json.dump(out, f)
os.rename(os.path.join(work, "holder.json.tmp"), os.path.join(work, "holder.json"))
""" % (SIZE // 2)

# Runs in the guest: argv = [phase, spec as JSON]; prints JSON: the unit, the mount, the record,
# what the mount shows, the agent's --once pass, and (phase "switched") the agent service's journal.
PROBE = r"""
import hashlib, json, os, subprocess, sys
phase, spec = sys.argv[1], json.loads(sys.argv[2])
where = spec["where"]

def run(*argv):
    p = subprocess.run(list(argv), capture_output=True, text=True)
    return dict(rc=p.returncode, out=p.stdout.strip(), err=p.stderr.strip()[-3000:])

def read(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        return "error: %s" % exc

def record():
    d = "/run/composefs-fleet/mounts"
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        try:
            with open(os.path.join(d, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if data.get("where") == where:
            return data
    return None

out = dict(phase=phase)
out["is_active"] = run("systemctl", "is-active", spec["unit"])["out"]
out["composefs_mounts"] = sum(1 for line in open("/proc/self/mountinfo")
                              if line.split(" ")[4] == where and " - overlay composefs " in line)
out["data"] = read(os.path.join(where, "data.bin"))
out["record"] = record()
agent = run("env", "PYTHONPATH=" + spec["lib"], "python3", "-m", "composefs_fleet_agent", "--once", "--json",
            "--no-journal", "--config", spec["config"])
out["agent_rc"] = agent["rc"]
out["agent_err"] = agent["err"]
try:
    out["agent"] = json.loads(agent["out"])
except ValueError:
    out["agent"] = None
if phase == "switched":
    holder = os.path.join(spec["work"], "holder.json")
    out["holder"] = json.load(open(holder)) if os.path.exists(holder) else None
    entries = []
    res = run("journalctl", "--no-pager", "-o", "json", "-u", spec["agent_unit"])
    for line in res["out"].splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("COMPOSEFS_FINDING"):
            entries.append({k: e.get(k) for k in ("COMPOSEFS_FINDING", "COMPOSEFS_HEALTHY", "COMPOSEFS_PASS",
                                                    "MESSAGE", "__REALTIME_TIMESTAMP")})
    out["journal"] = entries
    out["switched_at"] = open(os.path.join(spec["work"], "switched-at")).read().strip()
    out["agent_active"] = run("systemctl", "is-active", spec["agent_unit"])["out"]
print(json.dumps(out))
"""

MOUNT = {"path": WHERE, "store": STORE, "verity": "auto", "state": "mounted"}
PROBE_SPEC = {"where": WHERE, "unit": UNIT, "config": AGENT_CONFIG, "lib": guest_vm.GUEST_ROOT + "/lib",
              "work": WORK, "agent_unit": AGENT_UNIT}


def _cmd(name: str, argv: List[str]) -> dict:
    return {"name": name, "changed_when": False, "ansible.builtin.command": {"argv": argv}}


def _probe(phase: str) -> dict:
    return _cmd("probe: " + phase, ["python3", "-c", PROBE, phase, json.dumps(PROBE_SPEC)])


def _play_switch() -> List[dict]:
    lib = guest_vm.GUEST_ROOT + "/lib"
    images = [{"store": STORE, "ref": "app/v1", "src": WORK + "/tree-v1"},
              {"store": STORE, "ref": "app/v2", "src": WORK + "/tree-v2"}]
    return node_play(WORK, STORE, images, tasks=[
            {"name": "mount v1", "composefs.fleet.mount": dict(MOUNT, image="app/v1")},
            _cmd("start the agent", ["systemd-run", "--unit", AGENT_UNIT, "--property=Type=notify",
                                     "--property=NotifyAccess=main", "--setenv=PYTHONPATH=" + lib,
                                     "python3", "-m", "composefs_fleet_agent", "--config", AGENT_CONFIG]),
            _cmd("start the holder", ["systemd-run", "--unit", HOLDER_UNIT, "python3", "-c", HOLDER, WHERE, WORK]),
            {"name": "holder has read half of v1", "ansible.builtin.wait_for": {"path": WORK + "/holder-ready",
                                                                                 "timeout": 120}},
            _probe("v1"),
            {"name": "switch to v2", "composefs.fleet.mount": dict(MOUNT, image="app/v2"), "diff": True},
            _cmd("note the time of the switch", ["sh", "-c", "date +%%s%%6N > %s/switched-at && touch %s/holder-go"
                                                 % (WORK, WORK)]),
            {"name": "holder has read to the end", "ansible.builtin.wait_for": {"path": WORK + "/holder.json",
                                                                                 "timeout": 120}},
            # Two passes of the service (interval 2 s) after the switch.
            {"name": "let the agent service pass", "ansible.builtin.pause": {"seconds": 6}},
            _probe("switched"),
            _cmd("stop the agent", ["systemctl", "stop", AGENT_UNIT]),
        ])


def _play_rollback() -> List[dict]:
    return [{
        "hosts": "guest",
        "gather_facts": False,
        "tasks": [
            {"name": "v2 after the reboot", "composefs.fleet.mount": dict(MOUNT, image="app/v2"),
             "register": "current"},
            {"name": "roll back", "composefs.fleet.mount": dict(
                MOUNT, image="{{ current.mount.previous.image_digest }}"), "diff": True},
            _probe("rolled-back"),
        ],
    }]


def _run(guest, tmp_path_factory, name: str, plays: List[dict]) -> Dict[str, dict]:
    return run_recorded(guest, tmp_path_factory.mktemp(name), plays)


@pytest.fixture(scope="module")
def results(guest, tmp_path_factory) -> Dict[str, dict]:
    playbook_exe()
    for text in (PROBE, HOLDER):
        # They travel in task arguments: Ansible would template these.
        assert "{{" not in text and "{%" not in text and "{#" not in text
    guest.run(["python3", "-c", SETUP], input=json.dumps({"work": WORK, "store": STORE, "where": WHERE,
                                                          "size": SIZE, "config": AGENT_CONFIG}).encode())
    try:
        out = {"switch": _run(guest, tmp_path_factory, "lifecycle-switch", _play_switch())}
        if out["switch"]["_playbook"]["rc"] != 0:
            return out
        guest.vm.reboot()
        out["boot"] = guest.vm.run_json(["python3", "-c", PROBE, "boot", json.dumps(PROBE_SPEC)], timeout=600)
        out["rollback"] = _run(guest, tmp_path_factory, "lifecycle-rollback", _play_rollback())
        return out
    finally:
        guest.run("systemctl stop %s %s; systemctl reset-failed %s %s; umount -l '%s'; rm -f /etc/systemd/system/%s "
                  "/etc/systemd/system/*.wants/%s; systemctl daemon-reload"
                  % (AGENT_UNIT, HOLDER_UNIT, AGENT_UNIT, HOLDER_UNIT, WHERE, UNIT, UNIT), check=False)


def _result(results: Dict[str, dict], play: str, name: str) -> dict:
    if play not in results:
        pytest.fail("the %s playbook did not run: the one before failed:\n%s"
                    % (play, results["switch"]["_playbook"]["stdout"]), pytrace=False)
    done = results[play]
    if name not in done:
        pytest.fail("task %r did not run (playbook %s stopped earlier, exit %d):\n%s"
                    % (name, play, done["_playbook"]["rc"], done["_playbook"]["stdout"]), pytrace=False)
    res = done[name]
    assert res["_status"] == "ok", res
    return res


def _probe_result(results: Dict[str, dict], play: str, phase: str) -> dict:
    return json.loads(_result(results, play, "probe: " + phase)["stdout"])


def _digests(results: Dict[str, dict]) -> Dict[str, str]:
    items = _result(results, "switch", "Images")["results"]
    return {item["image"]["ref"]: item["digest"] for item in items}


def _checked(probe: dict) -> dict:
    """The agent's --once pass of a probe: healthy, one mount, checked against what."""
    agent = probe["agent"]
    assert agent is not None and probe["agent_rc"] == 0, (probe["agent_rc"], probe["agent_err"])
    assert agent["healthy"] is True and [f for f in agent["findings"] if not f["resolved"]] == [], agent
    assert len(agent["expected"]) == 1 and agent["expected"][0]["source"] == "mount history", agent["expected"]
    return agent["expected"][0]


def test_playbooks_ran_through(results):
    assert results["switch"]["_playbook"]["rc"] == 0, results["switch"]["_playbook"]
    assert results["rollback"]["_playbook"]["rc"] == 0, results["rollback"]["_playbook"]


def test_v1_mounted_with_its_unit_and_the_agent_checks_it(results):
    digests = _digests(results)
    res = _result(results, "switch", "mount v1")
    assert res["changed"] is True and "wrote unit" in res["actions"], res
    assert res["mount"]["image_digest"] == digests["app/v1"] and res["mount"]["previous"] is None, res["mount"]
    probe = _probe_result(results, "switch", "v1")
    assert probe["is_active"] == "active" and probe["data"] == SHA["v1"], probe
    assert _checked(probe)["image_digest"] == digests["app/v1"]


def test_switch_while_a_file_is_open(results):
    digests = _digests(results)
    res = _result(results, "switch", "switch to v2")
    assert res["changed"] is True, res
    assert res["mount"]["image_digest"] == digests["app/v2"], res["mount"]
    assert res["mount"]["previous"]["image_digest"] == digests["app/v1"], res["mount"]
    assert res["mount"]["previous"]["ref"] == "app/v1", res["mount"]
    probe = _probe_result(results, "switch", "switched")
    # The holder read v1 to the end from its descriptor; the path shows v2.
    assert probe["holder"] == {"held": SHA["v1"], "held_size": SIZE, "reopened": SHA["v2"]}, probe["holder"]
    assert probe["data"] == SHA["v2"] and probe["composefs_mounts"] == 1, probe
    assert probe["record"]["image_digest"] == digests["app/v2"], probe["record"]


def test_the_running_agent_follows_the_switch(results):
    digests = _digests(results)
    probe = _probe_result(results, "switch", "switched")
    assert _checked(probe) == {"where": WHERE, "image": "%s/images/%s" % (STORE, digests["app/v2"]),
                               "image_digest": digests["app/v2"], "ref": "app/v2", "source": "mount history"}
    assert probe["agent_active"] == "active", probe
    journal = probe["journal"]
    # Passes that started after the switch (the first summary after it may end a pass begun before).
    ended_after = [int(e["COMPOSEFS_PASS"]) for e in journal if e["COMPOSEFS_FINDING"] == "pass-summary"
                   and int(e["__REALTIME_TIMESTAMP"]) > int(probe["switched_at"])]
    later = ended_after[1:]
    assert later, journal
    assert all(e["COMPOSEFS_HEALTHY"] == "1" for e in journal
               if e["COMPOSEFS_FINDING"] == "pass-summary" and int(e["COMPOSEFS_PASS"]) in later), journal
    assert [e for e in journal if e["COMPOSEFS_PASS"] is not None and int(e["COMPOSEFS_PASS"]) in later
            and e["COMPOSEFS_FINDING"] != "pass-summary"] == [], journal
    # Before the switch, too, the service found the mount healthy (against v1).
    assert any(e["COMPOSEFS_FINDING"] == "pass-summary" and e["COMPOSEFS_HEALTHY"] == "1"
               and int(e["__REALTIME_TIMESTAMP"]) < int(probe["switched_at"]) for e in journal), journal


def test_v2_comes_up_from_its_unit_after_the_reboot(results):
    digests = _digests(results)
    if "boot" not in results:
        pytest.fail("no reboot: the first playbook failed", pytrace=False)
    probe = results["boot"]
    assert probe["is_active"] == "active" and probe["composefs_mounts"] == 1, probe
    assert probe["data"] == SHA["v2"], probe
    assert probe["record"]["image_digest"] == digests["app/v2"], probe["record"]
    # The mount history survived the reboot: v1 is still the previous image.
    assert probe["record"]["previous"]["image_digest"] == digests["app/v1"], probe["record"]
    assert _checked(probe)["image_digest"] == digests["app/v2"]


def test_rollback_by_the_previous_digest_and_the_agent_follows(results):
    digests = _digests(results)
    current = _result(results, "rollback", "v2 after the reboot")
    assert current["changed"] is False, current
    assert current["mount"]["previous"]["image_digest"] == digests["app/v1"], current["mount"]
    res = _result(results, "rollback", "roll back")
    assert res["changed"] is True and res["mount"]["image_digest"] == digests["app/v1"], res
    assert res["mount"]["previous"]["image_digest"] == digests["app/v2"], res["mount"]
    probe = _probe_result(results, "rollback", "rolled-back")
    assert probe["data"] == SHA["v1"] and probe["is_active"] == "active", probe
    assert _checked(probe)["image_digest"] == digests["app/v1"]
