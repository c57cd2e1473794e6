# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.mount in the QEMU guest, where systemd is PID 1 and the
store's ext4 has fs-verity: what this host (no systemd, no fs-verity) cannot
show. The role composefs.fleet.composefs_node makes the store, the image and the first
mount (modules store, image and mount, shipped as AnsiballZ over SSH) and
installs our tools (mount.composefs in /sbin, so that the unit the module
writes can mount at boot; the test starts and stops it with systemctl); plain
mount tasks then walk the states.

One ansible-playbook run holds everything (each task costs seconds under
emulation). Task results are recorded by a small callback plugin written next
to the playbook (a role's looped tasks cannot be registered from the play);
after each state a probe task (one Python run in the guest) reports what
systemd, mountinfo, fs-verity and reads through the mount say.

Tamper check: an object of the store is replaced (rename over it) by a copy
with the same bytes but no fs-verity; reading its file through the
verity=require mount must then fail with EIO. The same bytes make sure the
failure comes from the missing fs-verity, not from a content mismatch.
Opening the verity-protected object for writing is asserted to fail too.
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List

import pytest
from guest_ansible import node_play, playbook_exe, run_recorded

from composefs_fleet import fsverity_digest

pytestmark = pytest.mark.guest

WORK = "/var/tmp/cfmount-module"
TREE = WORK + "/tree"
STORE = "/var/lib/cfmount-module/store"
# A space and a dash: the unit name must escape both as systemd-escape does.
WHERE = "/srv/cf-fleet app"
UNIT = "srv-cf\\x2dfleet\\x20app.mount"
UNIT_FILE = "/etc/systemd/system/" + UNIT
WANTS_LINK = "/etc/systemd/system/local-fs.target.wants/" + UNIT
REF = "app/current"


def _content(name: str, size: int) -> bytes:
    seed = sum(name.encode())
    return bytes((i * 37 + seed) % 251 for i in range(size))


# Both files are larger than composefs inlines, so each becomes an object.
FILES = {"a.txt": 50000, "sub/b.bin": 70001}
DIGESTS = {name: fsverity_digest.digest_bytes(_content(name, size)).hex() for name, size in FILES.items()}
SHA256 = {name: hashlib.sha256(_content(name, size)).hexdigest() for name, size in FILES.items()}
OBJECTS = {name: "%s/objects/%s/%s" % (STORE, d[:2], d[2:]) for name, d in DIGESTS.items()}

SETUP = r"""
import json, os, shutil, sys
spec = json.loads(sys.stdin.read())
for top in (spec["work"], os.path.dirname(spec["store"])):
    shutil.rmtree(top, ignore_errors=True)
os.makedirs(spec["tree"])
for name, size in spec["files"].items():
    path = os.path.join(spec["tree"], name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    seed = sum(name.encode())
    with open(path, "wb") as f:
        f.write(bytes((i * 37 + seed) % 251 for i in range(size)))
os.sync()
"""

# Runs in the guest after each state: argv = [phase, spec as JSON]; prints JSON.
PROBE = r"""
import errno, glob, hashlib, json, os, re, subprocess, sys
phase, spec = sys.argv[1], json.loads(sys.argv[2])
where, unit = spec["where"], spec["unit"]

def run(*argv):
    p = subprocess.run(list(argv), capture_output=True, text=True)
    return dict(rc=p.returncode, out=p.stdout.strip(), err=p.stderr.strip())

def unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)

def mounts():
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            fields = left.split(" ")
            fstype, source, sopts = right.split(" ", 2)
            if unescape(fields[4]) == where:
                found.append(dict(fstype=fstype, source=unescape(source), options=fields[5].split(","),
                                  super=sopts.split(",")))
    return found

def show():
    res = run("systemctl", "show", unit, "-p", "LoadState", "-p", "ActiveState", "-p", "FragmentPath",
              "-p", "UnitFileState")
    return dict(line.split("=", 1) for line in res["out"].splitlines() if "=" in line)

def read(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return dict(errno=errno.errorcode.get(exc.errno, str(exc.errno)))
    return dict(sha256=hashlib.sha256(data).hexdigest(), size=len(data))

def record():
    for path in glob.glob("/run/composefs-fleet/mounts/*.json"):
        with open(path) as f:
            data = json.load(f)
        if data.get("where") == where:
            return data
    return None

out = dict(phase=phase)
out["escape"] = run("systemd-escape", "--path", "--suffix=mount", where)["out"]
out["unit_file"] = os.path.isfile(spec["unit_file"])
out["wants_link"] = os.readlink(spec["wants_link"]) if os.path.islink(spec["wants_link"]) else None
out["is_enabled"] = run("systemctl", "is-enabled", unit)
out["is_active"] = run("systemctl", "is-active", unit)
out["show"] = show()
out["mounts"] = mounts()
out["where_exists"] = os.path.isdir(where)
if phase in ("mounted", "remounted"):
    out["read_a"] = read(os.path.join(where, "a.txt"))
    out["record"] = record()
    out["measure"] = run("fsverity", "measure", spec["object_a"], spec["object_b"])
if phase == "unmounted":
    # What happens at boot: systemd mounts with the unit, through mount(8) and
    # the mount.composefs helper the role installed in /sbin.
    out["start"] = run("systemctl", "start", unit)
    if out["start"]["rc"] != 0:
        out["start_journal"] = run("journalctl", "--no-pager", "-n", "30", "-u", unit)["out"]
    out["started"] = dict(is_active=run("systemctl", "is-active", unit)["out"], mounts=mounts(),
                          read_a=read(os.path.join(where, "a.txt")), record=record())
    out["stop"] = run("systemctl", "stop", unit)
    out["stopped"] = dict(is_active=run("systemctl", "is-active", unit)["out"], mounts=mounts())
if phase == "remounted":
    obj = spec["object_b"]
    try:
        os.close(os.open(obj, os.O_WRONLY))
        out["write_open"] = "opened"
    except OSError as exc:
        out["write_open"] = errno.errorcode.get(exc.errno, str(exc.errno))
    with open(obj, "rb") as f:
        data = f.read()
    tmp = obj + ".tamper"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, obj)
    out["tampered_measure"] = run("fsverity", "measure", obj)
    out["read_b"] = read(os.path.join(where, "sub", "b.bin"))
    out["dmesg"] = [l for l in run("dmesg")["out"].splitlines() if "overlayfs" in l][-5:]
if phase == "absent":
    out["daemon_reload"] = run("systemctl", "daemon-reload")
    out["is_enabled_after_reload"] = run("systemctl", "is-enabled", unit)
    out["list_units"] = run("systemctl", "list-units", "--all", "--no-legend", "--plain", "--full", unit)
    out["show_after_reload"] = show()
print(json.dumps(out))
"""

MOUNT = {"path": WHERE, "store": STORE, "image": REF, "verity": "auto", "pin_digest": True, "state": "mounted"}
PROBE_SPEC = {"where": WHERE, "unit": UNIT, "unit_file": UNIT_FILE, "wants_link": WANTS_LINK,
              "object_a": OBJECTS["a.txt"], "object_b": OBJECTS["sub/b.bin"]}


def _mount_task(name: str, state: str, check: bool = False) -> dict:
    return {"name": name, "composefs.fleet.mount": dict(MOUNT, state=state), "check_mode": check, "diff": True}


def _probe(phase: str) -> dict:
    return {"name": "probe: " + phase, "changed_when": False,
            "ansible.builtin.command": {"argv": ["python3", "-c", PROBE, phase, json.dumps(PROBE_SPEC)]}}


def _play() -> List[dict]:
    return node_play(WORK, STORE, [{"store": STORE, "ref": REF, "src": TREE}], mounts=[
        {k: v for k, v in MOUNT.items() if k != "state"}], tasks=[
            _mount_task("mounted: again", "mounted"),
            _mount_task("mounted: again, check", "mounted", check=True),
            _probe("mounted"),
            _mount_task("unmounted", "unmounted"),
            _probe("unmounted"),
            _mount_task("mounted: once more", "mounted"),
            _probe("remounted"),
            _mount_task("absent", "absent"),
            _probe("absent"),
        ])


@pytest.fixture(scope="module")
def results(guest, tmp_path_factory) -> Dict[str, dict]:
    playbook_exe()
    # The probe travels in a task argument: Ansible would template these.
    assert "{{" not in PROBE and "{%" not in PROBE and "{#" not in PROBE
    guest.run(["python3", "-c", SETUP],
              input=json.dumps({"work": WORK, "tree": TREE, "store": STORE, "files": FILES}).encode())
    return run_recorded(guest, tmp_path_factory.mktemp("mount-module"), _play())


def _result(results: Dict[str, dict], name: str) -> dict:
    if name not in results:
        pytest.fail("task %r did not run (the playbook stopped earlier, exit %d):\n%s"
                    % (name, results["_playbook"]["rc"], results["_playbook"]["stdout"]), pytrace=False)
    res = results[name]
    assert res["_status"] == "ok", res
    return res


def _item(results: Dict[str, dict], name: str) -> dict:
    """The only loop item of a role task."""
    items = _result(results, name)["results"]
    assert len(items) == 1, items
    return items[0]


def _probe_result(results: Dict[str, dict], phase: str) -> dict:
    return json.loads(_result(results, "probe: " + phase)["stdout"])


def _mount_lines(probe: dict) -> List[dict]:
    return [m for m in probe["mounts"] if m["fstype"] == "overlay" and m["source"] == "composefs"]


def test_playbook_ran_through(results):
    assert results["_playbook"]["rc"] == 0, results["_playbook"]


def test_store_on_ext4_supports_fs_verity(results):
    res = _item(results, "Object stores")
    assert res["changed"] is True, res
    assert res["store"]["verity_supported"] is True and res["store"]["verity_problem"] is None, res


def test_image_objects_carry_fs_verity(results):
    res = _item(results, "Images")
    assert res["changed"] is True, res
    assert res["image"]["ref"] == REF and res["image"]["objects"] == 2 and res["image"]["objects_written"] == 2, res
    probe = _probe_result(results, "mounted")
    # The kernel measures each object: fs-verity is on, with the digest it is named by.
    assert probe["measure"]["rc"] == 0, probe["measure"]
    assert probe["measure"]["out"].splitlines() == [
        "sha256:%s %s" % (DIGESTS[n], OBJECTS[n]) for n in ("a.txt", "sub/b.bin")]


def test_role_mounts_with_verity_and_a_systemd_unit(results):
    res = _item(results, "Mounts")
    image_digest = _item(results, "Images")["digest"]
    assert res["changed"] is True, res
    assert res["actions"] == ["mounted", "wrote unit", "enabled unit"], res
    info = res["mount"]
    assert info["where"] == WHERE and info["unit_name"] == UNIT and info["unit_file"] == UNIT_FILE, info
    assert info["mounted"] is True and info["verity"] == "require" and info["image_digest"] == image_digest, info
    assert info["image_file"] == "%s/images/%s" % (STORE, image_digest), info
    probe = _probe_result(results, "mounted")
    assert probe["escape"] == UNIT, "systemd-escape names the unit %r, the module %r" % (probe["escape"], UNIT)
    assert probe["unit_file"] is True and probe["wants_link"] == UNIT_FILE, probe
    assert probe["is_enabled"]["out"] == "enabled", probe["is_enabled"]
    assert probe["is_active"]["out"] == "active", probe["is_active"]
    assert probe["show"]["LoadState"] == "loaded" and probe["show"]["FragmentPath"] == UNIT_FILE, probe["show"]
    lines = _mount_lines(probe)
    assert len(lines) == 1 and "verity=require" in lines[0]["super"], probe["mounts"]
    assert probe["read_a"] == {"sha256": SHA256["a.txt"], "size": FILES["a.txt"]}, probe["read_a"]
    # pin_digest: the mount checked the image file's kernel-measured digest.
    assert probe["record"] is not None and probe["record"]["digest"] == image_digest, probe["record"]
    assert probe["record"]["verity"] == "require", probe["record"]


def test_mounted_again_is_not_changed_also_in_check_mode(results):
    for name in ("mounted: again", "mounted: again, check"):
        res = _result(results, name)
        assert res["changed"] is False and res["actions"] == [] and res["differences"] == [], (name, res)
        assert res["mount"]["mounted"] is True and res["mount"]["verity"] == "require", (name, res)
        assert res["diff"]["before"] == res["diff"]["after"], (name, res["diff"])


def test_unmounted_keeps_the_unit(results):
    res = _result(results, "unmounted")
    assert res["changed"] is True and res["actions"] == ["unmounted"], res
    assert res["mount"]["mounted"] is False, res
    probe = _probe_result(results, "unmounted")
    assert _mount_lines(probe) == [] and probe["mounts"] == [], probe["mounts"]
    assert probe["unit_file"] is True and probe["wants_link"] == UNIT_FILE, probe
    assert probe["is_enabled"]["out"] == "enabled", probe["is_enabled"]
    assert probe["is_active"]["out"] == "inactive", probe["is_active"]


def test_the_unit_mounts_under_systemd(results):
    """What the unit does at boot: systemctl start mounts through mount(8) and
    the role's mount.composefs, with fs-verity required and the image pinned."""
    probe = _probe_result(results, "unmounted")
    image_digest = _item(results, "Images")["digest"]
    assert probe["start"]["rc"] == 0, (probe["start"], probe.get("start_journal"))
    started = probe["started"]
    assert started["is_active"] == "active", started
    lines = _mount_lines(started)
    assert len(lines) == 1 and "verity=require" in lines[0]["super"], started["mounts"]
    assert started["read_a"] == {"sha256": SHA256["a.txt"], "size": FILES["a.txt"]}, started["read_a"]
    # The helper recorded the mount as the module does.
    assert started["record"] is not None and started["record"]["image_digest"] == image_digest, started["record"]
    assert started["record"]["digest"] == image_digest and started["record"]["verity"] == "require", started
    assert probe["stop"]["rc"] == 0, probe["stop"]
    assert probe["stopped"] == {"is_active": "inactive", "mounts": []}, probe["stopped"]


def test_mounted_once_more_mounts_again(results):
    res = _result(results, "mounted: once more")
    assert res["changed"] is True and res["actions"] == ["mounted"], res
    probe = _probe_result(results, "remounted")
    lines = _mount_lines(probe)
    assert len(lines) == 1 and "verity=require" in lines[0]["super"], probe["mounts"]
    assert probe["is_active"]["out"] == "active", probe["is_active"]
    assert probe["read_a"] == {"sha256": SHA256["a.txt"], "size": FILES["a.txt"]}, probe["read_a"]


def test_verity_protected_object_cannot_be_opened_for_writing(results):
    probe = _probe_result(results, "remounted")
    # fs-verity files are read-only to the kernel: fsverity_file_open() refuses write opens.
    assert probe["write_open"] in ("EPERM", "ETXTBSY"), probe["write_open"]


def test_object_without_fs_verity_is_refused_through_the_mount(results):
    probe = _probe_result(results, "remounted")
    assert probe["tampered_measure"]["rc"] != 0, "the replacement copy should have no fs-verity: %s" % (
        probe["tampered_measure"],)
    # Same bytes, no fs-verity: overlayfs with verity=require must refuse them.
    assert probe["read_b"] == {"errno": "EIO"}, (probe["read_b"], probe["dmesg"])
    assert any("has no fs-verity digest" in line for line in probe["dmesg"]), probe["dmesg"]


def test_absent_unmounts_and_removes_the_unit(results):
    res = _result(results, "absent")
    assert res["changed"] is True, res
    # The mount point is no longer managed: its mount history goes too.
    assert res["actions"] == ["unmounted", "disabled unit", "removed unit", "forgot history"], res
    assert res["diff"]["after"]["unit"] is None and res["diff"]["after"]["enabled"] is False, res["diff"]
    probe = _probe_result(results, "absent")
    assert probe["mounts"] == [], probe["mounts"]
    assert probe["unit_file"] is False and probe["wants_link"] is None, probe
    assert probe["where_exists"] is False, "the empty mount point should be removed with the mount"
    assert probe["is_enabled"]["rc"] != 0 and probe["is_enabled_after_reload"]["rc"] != 0, probe
    assert probe["daemon_reload"]["rc"] == 0, probe["daemon_reload"]
    listed = probe["list_units"]["out"]
    assert listed == "" or ("not-found" in listed and "inactive" in listed), listed
    assert probe["show_after_reload"].get("LoadState") == "not-found", probe["show_after_reload"]
