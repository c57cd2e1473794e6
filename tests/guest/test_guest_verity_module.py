# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.verity enabling fs-verity for real, in the QEMU guest
(ext4 with the verity feature), run by ansible-playbook over SSH: the module
travels as AnsiballZ with its module_utils, as it would to any node.

One playbook run holds every task (each costs seconds under emulation); the
tests assert on its recorded results and on ``fsverity measure`` afterwards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
from guest_ansible import playbook_exe, run_playbook

from composefs_fleet import fsverity_digest

pytestmark = pytest.mark.guest

WORK = "/var/tmp/cfverity-module"
TMPFS = "/dev/shm/cfverity-module"


def _content(name: str, size: int) -> bytes:
    seed = sum(name.encode())
    return bytes((i * 31 + seed) % 253 for i in range(size))


FILES = {
    "a.bin": 200003,
    "b.bin": 5000,
    "tree/x": 70000,
    "tree/sub/y": 1,
    "tree/sub/empty": 0,
    "outside": 4096,
}
DIGESTS = {name: fsverity_digest.digest_bytes(_content(name, size)).hex() for name, size in FILES.items()}

SETUP = r"""
import json, os, shutil, sys
spec = json.loads(sys.stdin.read())
for top in (spec["work"], spec["tmpfs"]):
    shutil.rmtree(top, ignore_errors=True)
    os.makedirs(top)
for name, size in spec["files"].items():
    path = os.path.join(spec["work"], name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    seed = sum(name.encode())
    with open(path, "wb") as f:
        f.write(bytes((i * 31 + seed) % 253 for i in range(size)))
os.symlink(os.path.join(spec["work"], "outside"), os.path.join(spec["work"], "tree", "link-out"))
with open(os.path.join(spec["tmpfs"], "t.bin"), "wb") as f:
    f.write(b"on tmpfs")
os.sync()
"""


def _register(name: str) -> str:
    return "r_" + "".join(c if c.isalnum() else "_" for c in name)


def _task(name: str, args: Dict[str, object], check: bool = False, ignore_errors: bool = False) -> dict:
    task = {"name": name, "composefs.fleet.verity": args, "check_mode": check, "diff": True,
            "register": _register(name)}
    if ignore_errors:
        task["ignore_errors"] = True
    return task


def _tasks(report: Path) -> List[dict]:
    a = WORK + "/a.bin"
    tree = WORK + "/tree"
    return [
        _task("a: check", {"paths": [a], "expected_digest": DIGESTS["a.bin"]}, check=True),
        _task("a: enable", {"paths": [a], "expected_digest": DIGESTS["a.bin"]}),
        _task("a: again", {"paths": [a], "expected_digest": DIGESTS["a.bin"]}),
        _task("a: again, check", {"paths": [a], "expected_digest": DIGESTS["a.bin"]}, check=True),
        _task("b: wrong digest", {"paths": [WORK + "/b.bin"], "expected_digest": DIGESTS["outside"]},
              ignore_errors=True),
        _task("tree: check", {"paths": [tree], "recurse": True}, check=True),
        _task("tree: enable", {"paths": [tree], "recurse": True}),
        _task("tree: again", {"paths": [tree], "recurse": True}),
        _task("tree: again, check", {"paths": [tree], "recurse": True}, check=True),
        _task("tmpfs: fail", {"paths": [TMPFS + "/t.bin"]}, ignore_errors=True),
        _task("tmpfs: skip", {"paths": [TMPFS + "/t.bin"], "unsupported": "skip"}),
        {"name": "store: ext4", "composefs.fleet.store": {"path": WORK + "/store"},
         "register": _register("store: ext4")},
        {"name": "store: tmpfs", "composefs.fleet.store": {"path": TMPFS + "/store"},
         "register": _register("store: tmpfs")},
        {"name": "measure", "ansible.builtin.command": {"argv": ["fsverity", "measure", a, tree + "/x",
                                                                 tree + "/sub/y", tree + "/sub/empty"]},
         "changed_when": False, "register": _register("measure")},
        {"name": "not enabled", "ansible.builtin.command": {"argv": ["fsverity", "measure", WORK + "/b.bin",
                                                                     WORK + "/outside"]},
         "changed_when": False, "failed_when": False, "register": _register("not enabled")},
    ]


def _report_task(names: List[str], report: Path) -> dict:
    """The recorded results, written on the controller (no JSON callback in ansible-core)."""
    mapping = ", ".join("%s: %s" % (json.dumps(n), _register(n)) for n in names)
    return {"name": "report", "delegate_to": "localhost",
            "ansible.builtin.copy": {"dest": str(report), "content": "{{ {%s} | to_json }}" % mapping,
                                     "mode": "0600"}}


@pytest.fixture(scope="module")
def results(guest, tmp_path_factory) -> Dict[str, dict]:
    playbook_exe()
    guest.run(["python3", "-c", SETUP],
              input=json.dumps({"work": WORK, "tmpfs": TMPFS, "files": FILES}).encode())
    tmp = tmp_path_factory.mktemp("verity-module")
    report = tmp / "results.json"
    tasks = _tasks(report)
    tasks.append(_report_task([t["name"] for t in tasks], report))
    res = run_playbook(guest, tmp, [{"hosts": "guest", "gather_facts": False, "tasks": tasks}])
    try:
        out = json.loads(report.read_text())
    except (OSError, ValueError):
        pytest.fail("the playbook recorded no results (exit %d):\n%s\n%s"
                    % (res.returncode, res.stdout[-4000:], res.stderr[-3000:]), pytrace=False)
    shutil.rmtree(str(tmp), ignore_errors=True)
    return out


def test_four_steps_enable_verity_on_one_file(results):
    a = WORK + "/a.bin"
    check, apply, again, again_check = (results[n] for n in ("a: check", "a: enable", "a: again",
                                                             "a: again, check"))
    for res in (check, apply):
        assert not res.get("failed"), res
        assert res["changed"] is True and res["enabled"] == 1 and res["verity_supported"] is True
        assert res["files"] == [{"file": a, "digest": DIGESTS["a.bin"], "verity_before": False,
                                 "verity_after": True, "verity_supported": True}]
        assert res["diff"] == {"before": {"fsverity_enabled": []}, "after": {"fsverity_enabled": [a]}}
    for res in (again, again_check):
        assert not res.get("failed"), res
        assert res["changed"] is False and res["enabled"] == 0
        assert res["files"][0]["verity_before"] is True and res["files"][0]["digest"] == DIGESTS["a.bin"]
        assert res["diff"] == {"before": {"fsverity_enabled": [a]}, "after": {"fsverity_enabled": [a]}}


def test_kernel_measures_what_the_module_reported(results):
    out = results["measure"]["stdout"].splitlines()
    assert out == ["sha256:%s %s" % (DIGESTS[name], WORK + "/" + name)
                   for name in ("a.bin", "tree/x", "tree/sub/y", "tree/sub/empty")]


def test_wrong_expected_digest_enables_nothing(results):
    res = results["b: wrong digest"]
    assert res["failed"] is True and res.get("changed") is not True
    assert DIGESTS["b.bin"] in res["msg"] and DIGESTS["outside"] in res["msg"] and "not enabled" in res["msg"]
    measured = results["not enabled"]
    assert measured["rc"] != 0
    # fsverity measure fails on both: b.bin (mismatch) and the symlink target outside the tree.
    assert measured["stdout"].strip() == "", measured
    assert "b.bin" in measured["stderr"]


def test_recurse_enables_the_tree_without_following_symlinks(results):
    tree = WORK + "/tree"
    names = [tree + "/sub/empty", tree + "/sub/y", tree + "/x"]
    for n in ("tree: check", "tree: enable"):
        res = results[n]
        assert res["changed"] is True and res["enabled"] == 3, res
        assert [f["file"] for f in res["files"]] == names
        assert [f["digest"] for f in res["files"]] == [DIGESTS[p[len(WORK) + 1:]] for p in names]
        assert res["diff"]["before"] == {"fsverity_enabled": []}
        assert res["diff"]["after"] == {"fsverity_enabled": names}
    for n in ("tree: again", "tree: again, check"):
        res = results[n]
        assert res["changed"] is False and res["enabled"] == 0, res
        assert all(f["verity_before"] for f in res["files"])


def test_unsupported_filesystem_in_a_kernel_with_fs_verity(results):
    res = results["tmpfs: fail"]
    assert res["failed"] is True and "tmpfs" in res["msg"] and "nothing was enabled" in res["msg"], res
    res = results["tmpfs: skip"]
    assert not res.get("failed") and res["changed"] is False and res["verity_supported"] is False, res
    assert res["files"][0]["digest"] == fsverity_digest.digest_bytes(b"on tmpfs").hex()


def test_store_reports_fs_verity_support(results):
    res = results["store: ext4"]
    assert res["changed"] is True and res["store"]["verity_supported"] is True, res
    assert res["store"]["verity_problem"] is None
    res = results["store: tmpfs"]
    assert res["changed"] is True and res["store"]["verity_supported"] is False, res
    assert "tmpfs" in res["store"]["verity_problem"]
