# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-fleet's Debian package through its life in the QEMU guest (trixie, systemd PID 1).

On the host: ``bash scripts/build-packages --build 1`` and ``--build 2`` (the same
source, a higher Debian revision) write two .debs.  In the guest, through the roles:

1. install: composefs.fleet.composefs_node with ``composefs_node_tools: package`` and
   ``composefs_node_package_file`` (copied, installed with apt), a store, an image built
   on the node and a mount with its .mount unit; composefs.fleet.composefs_agent with
   the packaged agent (only the configuration written, the package's unit enabled);
2. reboot: the mount comes back from its unit through the packaged
   /usr/sbin/mount.composefs (the only mount.composefs in /sbin: dpkg says the
   package owns it; the mount record it writes carries this boot's id), the
   packaged agent runs;
3. upgrade: the same play with the newer file: the version changes, the mount
   still shows the image, the agent still runs;
4. remove, first in check mode (with diff: apt and the agent's service say they would act, nothing
   changes), then for real: ``composefs_node_tools_state: absent`` and ``composefs_agent_state: absent``:
   every file ``dpkg -L`` listed is gone (the package's conffiles excepted), dpkg
   shows the package as ``rc`` (configuration only) or not at all, the agent's
   configuration is kept.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
from guest_ansible import playbook_exe, run_recorded

pytestmark = [pytest.mark.guest, pytest.mark.timeout(3000)]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "composefs-fleet"
WORK = "/var/tmp/cfpkg"
STORE = "/var/lib/cfpkg/store"
WHERE = "/srv/cfpkg"
UNIT = "srv-cfpkg.mount"
AGENT_UNIT = "composefs-fleet-agent.service"
AGENT_CONFIG = "/etc/composefs-fleet/agent.json"
SIZE = 200000

SETUP = r"""
import os, shutil, sys
work, store = sys.argv[1], sys.argv[2]
for top in (work, os.path.dirname(store)):
    shutil.rmtree(top, ignore_errors=True)
os.makedirs(os.path.join(work, "tree"))
with open(os.path.join(work, "tree", "data.bin"), "wb") as f:
    f.write(bytes((i * 13 + 5) % 251 for i in range(int(sys.argv[3]))))
with open(os.path.join(work, "tree", "version"), "w") as f:
    f.write("v1\n")
os.sync()
"""

# Runs in the guest: argv = [phase, spec as JSON]; prints what the phase's tests look at, as JSON.
PROBE = r"""
import glob, hashlib, json, os, subprocess, sys
phase, spec = sys.argv[1], json.loads(sys.argv[2])

def run(*argv):
    p = subprocess.run(list(argv), capture_output=True, text=True)
    return {"rc": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()[-2000:]}

out = {"phase": phase}
with open("/proc/sys/kernel/random/boot_id") as f:
    out["boot_id"] = f.read().strip()
status = run("dpkg-query", "-W", "-f", "${db:Status-Abbrev}|${Version}", spec["package"])
out["status"] = status["out"].split("|")[0].strip() if status["rc"] == 0 else "absent"
out["version"] = status["out"].split("|")[1] if status["rc"] == 0 else None
helper = "/sbin/mount.composefs"
out["helper_real"] = os.path.realpath(helper) if os.path.lexists(helper) else None
out["helper_owner"] = run("dpkg-query", "-S", out["helper_real"] or helper)["out"].split(":")[0] or None
if out["helper_real"] and os.path.isfile(out["helper_real"]):
    with open(out["helper_real"], errors="replace") as f:
        out["helper_loose"] = "composefs.fleet.composefs_node role" in f.read()
out["unit_active"] = run("systemctl", "is-active", spec["unit"])["out"]
out["mounts"] = sum(1 for line in open("/proc/self/mountinfo")
                    if line.split(" ")[4] == spec["where"] and " - overlay composefs " in line)
try:
    with open(os.path.join(spec["where"], "data.bin"), "rb") as f:
        out["data"] = hashlib.sha256(f.read()).hexdigest()
except OSError as exc:
    out["data"] = "error: %s" % exc
out["record"] = None
for path in sorted(glob.glob("/run/composefs-fleet/mounts/*")):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        continue
    if isinstance(data, dict) and data.get("where") == spec["where"]:
        out["record"] = data
out["unit_journal"] = run("journalctl", "--no-pager", "-b", "-o", "cat", "-u", spec["unit"])["out"].splitlines()[-10:]
out["agent_active"] = run("systemctl", "is-active", spec["agent_unit"])["out"]
out["agent_enabled"] = run("systemctl", "is-enabled", spec["agent_unit"])["out"]
if os.path.exists("/usr/sbin/composefs-fleet-agent"):
    agent = run("/usr/sbin/composefs-fleet-agent", "--once", "--json", "--no-journal", "--config", spec["agent_config"])
    out["agent_rc"], out["agent_err"] = agent["rc"], agent["err"]
    try:
        out["agent"] = json.loads(agent["out"])
    except ValueError:
        out["agent"] = None
out["config_kept"] = os.path.isfile(spec["agent_config"])
if out["status"] == "ii":
    out["listed"] = run("dpkg", "-L", spec["package"])["out"].splitlines()
    out["conffiles"] = [line.split()[0] for line in
                        run("dpkg-query", "-W", "-f", "${Conffiles}\n", spec["package"])["out"].splitlines() if line.strip()]
out["left"] = [p for p in spec.get("listed", []) if os.path.lexists(p) and not os.path.isdir(p)
               and p not in spec.get("conffiles", [])]
out["python_left"] = sorted(glob.glob("/usr/lib/python3/dist-packages/composefs_fleet*"))
out["package_copy"] = sorted(glob.glob("/var/cache/composefs-fleet/*.deb"))
out["agent_cache"] = os.path.lexists("/var/cache/composefs-fleet/agent")
print(json.dumps(out))
"""


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> Dict[str, Path]:
    """Two builds of the package by scripts/build-packages: build 1, and build 2 (a higher version) to upgrade to."""
    script = REPO / "scripts" / "build-packages"
    if not script.is_file():
        pytest.skip("scripts/build-packages is missing: the packaging of issue 19 is not in this checkout")
    tools = subprocess.run(["bash", str(script), "--check-tools"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if tools.returncode == 3:
        pytest.skip("the Debian build tools are missing: %s" % (tools.stdout + tools.stderr).strip())
    assert tools.returncode == 0, tools.stdout + tools.stderr
    tmp = tmp_path_factory.mktemp("debs")
    out = {}
    for name, build in (("old", 1), ("new", 2)):
        # lintian is tests/packaging's business; here only the package matters.
        res = subprocess.run(["bash", str(script), "--build", str(build), "--out", str(tmp / name), "--no-lintian"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1200)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        built = sorted((tmp / name).glob("%s_*.deb" % PACKAGE))
        assert len(built) == 1, (built, res.stdout[-2000:])
        out[name] = built[0]
    old, new = _field(out["old"], "Version"), _field(out["new"], "Version")
    assert subprocess.run(["dpkg", "--compare-versions", new, "gt", old]).returncode == 0, (old, new)
    return out


def _play(deb: "Path | None", state: str, check: bool = False) -> List[dict]:
    node_vars = {
        "composefs_node_tools": "package",
        "composefs_node_tools_state": state,
        "composefs_node_package_file": str(deb) if deb else "",
        "composefs_node_stores": [{"path": STORE}],
        "composefs_node_images": [{"store": STORE, "ref": "app/v1", "src": WORK + "/tree"}],
        "composefs_node_mounts": [{"path": WHERE, "store": STORE, "image": "app/v1", "verity": "auto"}],
    }
    agent_vars = {"composefs_agent_state": state, "composefs_agent_textfile": "", "composefs_agent_interval": 30,
                  "composefs_agent_packages": []}
    return [{"hosts": "guest", "gather_facts": False, "vars": node_vars, "check_mode": check, "diff": check,
             "roles": ["composefs.fleet.composefs_node", {"role": "composefs.fleet.composefs_agent", "vars": agent_vars}]}]


@pytest.fixture(scope="module")
def results(guest, debs, tmp_path_factory) -> Dict[str, dict]:
    playbook_exe()
    spec = {"package": PACKAGE, "where": WHERE, "unit": UNIT, "agent_unit": AGENT_UNIT, "agent_config": AGENT_CONFIG}

    def probe(phase: str, extra: "Dict[str, object] | None" = None) -> dict:
        out = guest.vm.run_json(["python3", "-c", PROBE, phase, json.dumps(dict(spec, **(extra or {})))], timeout=600)
        assert isinstance(out, dict)
        return out

    def play(name: str, deb: "Path | None", state: str, check: bool = False) -> dict:
        return run_recorded(guest, tmp_path_factory.mktemp(name), _play(deb, state, check))

    for text in (PROBE, SETUP):
        assert "{{" not in text and "{%" not in text and "{#" not in text
    guest.run(["python3", "-c", SETUP, WORK, STORE, str(SIZE)])
    # A loose /sbin/mount.composefs another guest test's role run left would be refused by dpkg's package: none here.
    guest.run("f=/usr/sbin/mount.composefs; if [ -e $f ] && ! dpkg-query -S $f >/dev/null 2>&1; then rm -f $f; fi")
    out: Dict[str, dict] = {"version_old": {"v": _field(debs["old"], "Version")}, "version_new": {"v": _field(debs["new"], "Version")}}
    try:
        out["install"] = play("pkg-install", debs["old"], "present")
        if out["install"]["_playbook"]["rc"] != 0:
            return out
        out["installed"] = probe("installed")
        out["again"] = play("pkg-again", debs["old"], "present")
        guest.vm.reboot()
        out["boot"] = probe("boot")
        out["upgrade"] = play("pkg-upgrade", debs["new"], "present")
        if out["upgrade"]["_playbook"]["rc"] != 0:
            return out
        out["upgraded"] = probe("upgraded")
        out["remove_check"] = play("pkg-remove-check", None, "absent", check=True)
        out["remove_checked"] = probe("remove-checked")
        out["remove"] = play("pkg-remove", None, "absent")
        out["removed"] = probe("removed", {"listed": out["upgraded"].get("listed", []),
                                           "conffiles": out["upgraded"].get("conffiles", [])})
        return out
    finally:
        guest.run("systemctl stop %s; umount -l %s; rm -f /etc/systemd/system/%s /etc/systemd/system/*.wants/%s; "
                  "apt-get -y -q purge %s; systemctl daemon-reload" % (AGENT_UNIT, WHERE, UNIT, UNIT, PACKAGE), check=False)


def _step(results: Dict[str, dict], step: str) -> dict:
    if step not in results:
        ran = [k for k in ("install", "upgrade") if k in results and results[k]["_playbook"]["rc"] != 0]
        pytest.fail("step %s did not run: %s" % (step, results[ran[0]]["_playbook"] if ran else "an earlier step failed"),
                    pytrace=False)
    return results[step]


def _ok(results: Dict[str, dict], play: str) -> dict:
    done = _step(results, play)
    assert done["_playbook"]["rc"] == 0, done["_playbook"]
    return done


def _task(done: dict, name: str) -> dict:
    """The result of the task whose name starts with ``name`` (the role's task names end in a template)."""
    found = [key for key in done if key.startswith(name)]
    assert len(found) == 1, (name, sorted(done))
    return done[found[0]]


def _healthy_mount(probe: dict) -> None:
    assert probe["unit_active"] == "active" and probe["mounts"] == 1, probe
    assert probe["data"] == _sha(), probe
    assert probe["record"] is not None and probe["record"]["boot_id"] == probe["boot_id"], probe["record"]


def _sha() -> str:
    import hashlib

    return hashlib.sha256(bytes((i * 13 + 5) % 251 for i in range(SIZE))).hexdigest()


def _agent_ok(probe: dict) -> None:
    assert probe["agent_active"] == "active" and probe["agent_enabled"] == "enabled", probe
    assert probe["agent_rc"] == 0 and probe["agent"]["healthy"] is True, (probe["agent_rc"], probe.get("agent_err"), probe["agent"])


def test_installed_from_the_file_through_apt(results):
    done = _ok(results, "install")
    assert _task(done, "Package installed with apt from the file, ")["changed"] is True
    probe = _step(results, "installed")
    assert probe["status"] == "ii" and probe["version"] == results["version_old"]["v"], probe
    assert probe["helper_real"] == "/usr/sbin/mount.composefs" and probe["helper_owner"] == PACKAGE, probe
    assert probe["helper_loose"] is False
    assert probe["package_copy"] == ["/var/cache/composefs-fleet/composefs-fleet.deb"], probe
    _healthy_mount(probe)
    _agent_ok(probe)


def test_second_run_changes_nothing(results):
    done = _ok(results, "again")
    changed = [name for name, res in done.items() if not name.startswith("_") and res.get("changed")]
    assert changed == [], changed


def test_mount_comes_back_after_reboot_through_the_packaged_helper(results):
    probe = _step(results, "boot")
    assert probe["boot_id"] != _step(results, "installed")["boot_id"]
    # The unit mounted it at boot with /sbin/mount.composefs, which is the package's file (merged /usr: /usr/sbin),
    # and that helper is ours (C mount.composefs writes no mount record): the record has this boot's id.
    assert probe["helper_real"] == "/usr/sbin/mount.composefs" and probe["helper_owner"] == PACKAGE, probe
    _healthy_mount(probe)
    assert not [line for line in probe["unit_journal"] if "fail" in line.lower()], probe["unit_journal"]
    _agent_ok(probe)


def test_upgrade_to_a_newer_build(results):
    done = _ok(results, "upgrade")
    assert _task(done, "Package installed with apt from the file, ")["changed"] is True
    probe = _step(results, "upgraded")
    assert probe["status"] == "ii" and probe["version"] == results["version_new"]["v"] != results["version_old"]["v"], probe
    assert probe["helper_owner"] == PACKAGE
    assert probe["mounts"] == 1 and probe["data"] == _sha(), probe
    _agent_ok(probe)


def test_removal_in_check_mode_predicts_and_changes_nothing(results):
    done = _ok(results, "remove_check")
    assert _task(done, "Package removed with apt, ")["changed"] is True
    assert _task(done, "Service stopped and disabled")["changed"] is True
    probe = _step(results, "remove_checked")
    assert probe["status"] == "ii" and probe["version"] == results["version_new"]["v"], probe
    assert probe["package_copy"] == ["/var/cache/composefs-fleet/composefs-fleet.deb"], probe
    _healthy_mount(probe)
    _agent_ok(probe)


def test_removed_nothing_left_but_configuration(results):
    done = _ok(results, "remove")
    assert _task(done, "Package removed with apt, ")["changed"] is True
    probe = _step(results, "removed")
    listed = _step(results, "upgraded")["listed"]
    assert any(p.endswith("/mount.composefs") for p in listed), listed
    assert probe["status"] in ("rc", "un", "absent"), probe["status"]
    assert probe["left"] == [], probe["left"]
    assert probe["python_left"] == [], probe["python_left"]
    assert probe["helper_real"] is None or not os.path.exists(probe["helper_real"]), probe
    assert probe["package_copy"] == [] and probe["agent_active"] != "active", probe
    assert probe["agent_cache"] is False, probe  # the agent's object-list cache went with the package (postrm)
    assert probe["config_kept"] is True
