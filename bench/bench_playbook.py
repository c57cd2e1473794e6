#!/usr/bin/env python3
"""A no-change run of the demo playbook against the same playbook with stat tasks.

The demo playbook (playbooks/demo.yml: tools, a store, two images, two
mounts, store figures, reads through the mounts) is run once on two trees of
--files files each (generated, not timed), so everything is in place.  Then,
--rounds times, alternately:

* the demo playbook again: nothing changes (checked in the recap), but the
  image module scans both trees (an lstat per file, digests from the store's
  cache, the image from the store's image memo), and the mount module compares
  the live mounts;
* the stat variant: the same playbook where every task of ours (store,
  image, mount) is replaced by an ``ansible.builtin.stat`` of the same path;
  the tools' install and the post tasks stay as they are.

Prints each run and the median of the per-round ratios (goal: at most
--max-ratio, 1.5).  Needs root and the kernel's erofs + overlay.  Tools,
units and trees all go below a temporary directory in --workdir, not into
/usr/local, /sbin or /etc/systemd/system.

Run from the repository root after scripts/setup: .venv/bin/python bench/bench_playbook.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV_BIN = os.path.join(REPO, ".venv", "bin")


def stat_variant(demo: list) -> list:
    """demo.yml with the node role's store/image/mount tasks replaced by stat tasks."""
    plays = json.loads(json.dumps(demo))
    for play in plays:
        if play.get("roles") != [{"role": "composefs.fleet.composefs_node"}]:
            raise SystemExit("bench: playbooks/demo.yml no longer has the node role as its only role; "
                             "update stat_variant()")
        del play["roles"]
        play["tasks"] = [
            {"name": "Tools (as in the node role)",
             "ansible.builtin.include_role": {"name": "composefs.fleet.composefs_node", "tasks_from": "tools_ours",
                                              "public": True}},
            {"name": "Stat in place of composefs.fleet.store",
             "ansible.builtin.stat": {"path": "{{ item.path }}"},
             "loop": "{{ composefs_node_stores }}"},
            {"name": "Stat in place of composefs.fleet.image",
             "ansible.builtin.stat": {"path": "{{ item.src }}"},
             "loop": "{{ composefs_node_images }}"},
            {"name": "Stat in place of composefs.fleet.mount",
             "ansible.builtin.stat": {"path": "{{ item.path }}"},
             "loop": "{{ composefs_node_mounts }}"},
        ]
    return plays


def run_playbook(playbook: str, extra: dict, env: dict) -> tuple:
    argv = [os.path.join(VENV_BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
            "-e", json.dumps(extra), playbook]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit("bench: %s failed (exit %d)" % (playbook, proc.returncode))
    recap = re.search(r"ok=(\d+)\s+changed=(\d+)", proc.stdout)
    return elapsed, int(recap.group(2)) if recap else -1


def unmount_below(directory: str) -> None:
    """Last resort after a failed cleanup: unmount whatever is still mounted below ``directory``."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    prefix = directory.rstrip("/") + "/"
    for where in reversed(points):
        where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), where)
        if where.startswith(prefix):
            subprocess.run(["umount", where], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10000, help="files per tree (default 10000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--max-ratio", type=float, default=1.5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (mounts)")

    work = tempfile.mkdtemp(prefix="bench-playbook-", dir=args.workdir)
    # The collection measured is this checkout (ansible.cfg's path goes through .venv, which may be
    # another checkout's when the venv is shared).
    collections = os.path.join(work, "collections")
    os.makedirs(os.path.join(collections, "ansible_collections", "composefs"))
    os.symlink(REPO, os.path.join(collections, "ansible_collections", "composefs", "fleet"))
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_COLLECTIONS_PATH=collections, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    print("collection: %s" % REPO)
    # The tools and units go below the work directory, not into /usr/local,
    # /sbin and /etc/systemd/system.
    # demo_agent=false: the agent's pass at the end of the demo is not part of this comparison.
    extra = {"demo_root": os.path.join(work, "demo"), "demo_files": args.files, "demo_agent": False,
             "composefs_node_unit_dir": os.path.join(work, "units"), "composefs_node_prefix": os.path.join(work, "lib"),
             "composefs_node_bin_dir": os.path.join(work, "bin"), "composefs_node_sbin_dir": os.path.join(work, "sbin")}
    for key in ("composefs_node_unit_dir", "composefs_node_bin_dir", "composefs_node_sbin_dir"):
        os.makedirs(extra[key])
    demo_path = os.path.join(REPO, "playbooks", "demo.yml")
    with open(demo_path) as f:
        demo = yaml.safe_load(f)
    # The variant lives outside the repository (linters and builds must not
    # see it) beside a link to the demo's files/ (make_demo_trees.py).
    variant_dir = os.path.join(work, "playbooks")
    os.makedirs(variant_dir)
    os.symlink(os.path.join(REPO, "playbooks", "files"), os.path.join(variant_dir, "files"))
    variant_path = os.path.join(variant_dir, "demo-stat.yml")
    with open(variant_path, "w") as f:
        yaml.safe_dump(stat_variant(demo), f, sort_keys=False)
    try:
        first, changed = run_playbook(demo_path, extra, env)
        print("first run (trees of %d files generated, images built, mounted): %.2f s, changed=%d"
              % (args.files, first, changed))
        ratios = []
        for n in range(1, args.rounds + 1):
            ours, changed = run_playbook(demo_path, extra, env)
            if changed != 0:
                raise SystemExit("bench: the second run of the demo changed %d tasks; it must change none"
                                 % changed)
            stat, _ = run_playbook(variant_path, extra, env)
            ratios.append(ours / stat)
            print("round %d: demo (no change) %.2f s, stat variant %.2f s, ratio %.2f"
                  % (n, ours, stat, ours / stat))
        median = statistics.median(ratios)
        verdict = "OK" if median <= args.max_ratio else "ABOVE the goal"
        print("no-change demo / stat variant, %d files per image: median ratio %.2f (goal <= %.2f): %s"
              % (args.files, median, args.max_ratio, verdict))
        return 0 if median <= args.max_ratio else 1
    finally:
        cleanup = [{"name": "Bench cleanup", "hosts": "all", "gather_facts": False, "tasks": [
            {"name": "Unmount", "composefs.fleet.mount": {"path": "{{ item.path }}", "state": "absent",
                                                          "unit_dir": "{{ composefs_node_unit_dir }}"},
             "loop": "{{ composefs_node_mounts }}"}]}]
        cleanup[0]["vars"] = {k: v for k, v in demo[0]["vars"].items() if k.startswith(("demo_", "composefs_node_"))}
        cleanup_path = os.path.join(work, "cleanup.yml")
        with open(cleanup_path, "w") as f:
            yaml.safe_dump(cleanup, f, sort_keys=False)
        try:
            run_playbook(cleanup_path, extra, env)
        except SystemExit as exc:
            print(exc)
        unmount_below(work)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
