#!/usr/bin/env python3
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""One agent pass over a store of 100,000 objects with fs-verity, in the QEMU guest.

Issue 7's targets: at most 3 s per 100,000 objects when the kernel measures
the digests, at most 100 MB max RSS. fs-verity exists only in the guest
(tests/guest/guest_vm.py boots it; never run this while another guest of the
project runs), and the guest is emulated (TCG): everything in it, Python and
the kernel alike, runs 15-25x slower than natively. So beside the agent the
same run times a floor - a minimal loop that opens each object, has the kernel
measure it (FS_IOC_MEASURE_VERITY), compares the digest with the name and
closes it - and reports the ratio agent/floor, which emulation does not
inflate. A calibration (the same pure-Python loop on the host and in the
guest) gives the emulation factor, for an estimate of the native time.

Steps: on the host, --objects files of 65-320 distinct bytes are made and
added to a store with `composefs-store add-image` (objects named by digest, one
image); the store goes to the guest as a tar stream over SSH; one Python
process there enables fs-verity on every object and on the image; the image is
mounted with our mount.composefs (verity required, digest pinned); the agent
config names the store and the mount. Then, alternating, --repeat times each:
`composefs-fleet-agent --once` and the floor, each a new process, wall time and
max RSS (wait4) measured by a small runner in the guest. The first round runs
after dropping the guest's caches (cold); the figures are the medians of the
later (warm) rounds. Last, the daemon's steady state: three passes in one
process (the service does a pass every few minutes and lists an image's
objects only once per process), timed by the agent's own clock.

    .venv/bin/python bench/bench_agent.py [--objects 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "guest"))
import guest_vm  # noqa: E402

GUEST_STORE = "/var/lib/bench-store"
GUEST_MOUNT = "/srv/bench"
GUEST_CONFIG = "/var/lib/bench-agent.json"
LIB = guest_vm.GUEST_ROOT + "/lib"

CALIBRATE = r"""
import time
t = time.perf_counter()
acc = 0
for i in range(3000000):
    acc += i * i % 7
print(time.perf_counter() - t)
"""

# In the guest: fs-verity on every object and on the image, mount, config.
PREPARE = r"""
import json, os, subprocess, sys, time
sys.path.insert(0, LIB)
from composefs_fleet import fsverity_ioctl
store, where, config = sys.argv[1:4]
t = time.monotonic()
objects = os.path.join(store, "objects")
subs = sorted(x for x in os.listdir(objects) if os.path.isdir(os.path.join(objects, x)))
# Enabling is slow under emulation (about 10 ms a file): one worker per vCPU.
workers = []
for w in range(os.cpu_count() or 1):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for sub in subs[w::os.cpu_count() or 1]:
                d = os.path.join(objects, sub)
                for name in os.listdir(d):
                    fd = os.open(os.path.join(d, name), os.O_RDONLY)
                    try:
                        fsverity_ioctl.enable_verity(fd)
                    finally:
                        os.close(fd)
            code = 0
        finally:
            os._exit(code)
    workers.append(pid)
for pid in workers:
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        sys.exit("enabling fs-verity failed in a worker")
n = sum(len(os.listdir(os.path.join(objects, sub))) for sub in subs)
images = os.path.join(store, "images")
(image,) = [os.path.join(images, x) for x in os.listdir(images)]
fd = os.open(image, os.O_RDONLY)
try:
    fsverity_ioctl.enable_verity(fd)
    digest = fsverity_ioctl.measure_verity(fd)[1].hex()
finally:
    os.close(fd)
os.sync()
enable_seconds = time.monotonic() - t
os.makedirs(where, exist_ok=True)
res = subprocess.run(["mount.composefs", "-o", "basedir=%s,verity,digest=%s" % (objects, digest), image, where],
                     capture_output=True, text=True)
if res.returncode != 0:
    sys.exit("mount.composefs failed: " + res.stderr)
with open(config, "w") as f:
    json.dump({"version": 1, "interval": 300, "quarantine": False, "textfile": "",
               "stores": [{"path": store}],
               "mounts": [{"where": where, "image": image, "digest": digest, "basedirs": [objects],
                           "verity": "require", "remount": False, "upperdir": None, "workdir": None}]}, f)
print(json.dumps({"objects": n, "image": image, "digest": digest, "enable_seconds": enable_seconds}))
""".replace("LIB", repr(LIB))

# The daemon's steady state: passes in one process. The first lists the
# image's objects (parsing the image); later passes reuse that list.
DAEMON = r"""
import json, sys
sys.path.insert(0, LIB)
from composefs_fleet_agent.main import Agent, parse_args
from composefs_fleet_agent.journal_log import Journal
agent = Agent(parse_args(["--once", "--config", sys.argv[1]]), Journal(use_journal=True))
if not agent.load_config():
    sys.exit(2)
durations = []
for _ in range(int(sys.argv[2])):
    result = agent.run_pass()
    durations.append(result.duration)
print(json.dumps({"durations": durations, "healthy": result.healthy, "objects": result.objects}))
sys.exit(0 if result.healthy else 1)
""".replace("LIB", repr(LIB))

# The floor: open, kernel-measured digest, compare with the name, close.
FLOOR = r"""
import fcntl, os, struct, sys
FS_IOC_MEASURE_VERITY = 0xC0046686
objects = sys.argv[1]
bad = n = 0
for sub in os.listdir(objects):
    d = os.path.join(objects, sub)
    for name in os.listdir(d):
        fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            buf = bytearray(struct.pack("=HH", 0, 64) + bytes(64))
            fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
        finally:
            os.close(fd)
        n += 1
        if buf[4:36].hex() != sub + name:
            bad += 1
print(n, bad)
sys.exit(1 if bad else 0)
"""

# Runs one command, measures wall time and max RSS of that process alone.
RUNNER = r"""
import json, os, subprocess, sys, time
argv = json.loads(sys.argv[1])
if sys.argv[2] == "cold":
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
with open("/tmp/bench-out", "wb") as out:
    t = time.monotonic()
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
with open("/tmp/bench-out", "rb") as f:
    text = f.read().decode("utf-8", "replace")
print(json.dumps({"wall": wall, "maxrss_kb": ru.ru_maxrss, "user": ru.ru_utime, "sys": ru.ru_stime,
                  "exit": os.waitstatus_to_exitcode(status), "out": text[-3000:]}))
"""


def make_tree(root: Path, count: int) -> int:
    """``count`` files of 65-320 bytes, all different, 500 to a directory."""
    total = 0
    for i in range(count):
        d = root / ("d%04d" % (i // 500))
        if i % 500 == 0:
            d.mkdir(parents=True)
        size = 65 + (i * 7919) % 256
        head = b"bench object %d\n" % i
        data = (head * (size // len(head) + 1))[:size]
        (d / ("f%06d" % i)).write_bytes(data)
        total += size
    return total


def host_calibration() -> float:
    out = subprocess.run([sys.executable, "-c", CALIBRATE], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of agent and floor (the first is cold)")
    parser.add_argument("--workdir", default=None, help="host scratch directory (default: a temp dir)")
    args = parser.parse_args()

    reason = guest_vm.missing_requirements()
    if reason:
        print("bench_agent: " + reason, file=sys.stderr)
        return 2
    if guest_vm.running_guests():
        print("bench_agent: a guest of this project already runs (pid %s): one at a time"
              % guest_vm.running_guests(), file=sys.stderr)
        return 2
    store_tool = Path(sys.executable).parent / "composefs-store"
    work = Path(tempfile.mkdtemp(prefix="bench-agent-", dir=args.workdir))
    report = {"objects_requested": args.objects}
    try:
        t = time.monotonic()
        report["bytes"] = make_tree(work / "tree", args.objects)
        store = work / "store"
        subprocess.run([str(store_tool), "--repo", str(store), "init"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([str(store_tool), "--repo", str(store), "add-image", str(work / "tree"), "--ref", "bench/v1",
                        "--no-cache"], check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(str(work / "tree"))
        report["host_build_seconds"] = round(time.monotonic() - t, 1)
        report["host_calibration_seconds"] = host_calibration()
        print("bench_agent: host store built in %.1f s" % report["host_build_seconds"], file=sys.stderr)

        guest_vm.build_image(quiet=True)
        with guest_vm.Guest(memory_mb=2048) as guest:
            guest.start()
            guest.copy_project()
            t = time.monotonic()
            tar = subprocess.Popen(["tar", "-c", "-C", str(work), "store"], stdout=subprocess.PIPE)
            untar = "rm -rf {s} && mkdir -p {s} && tar -x -C {s} --strip-components=1".format(s=GUEST_STORE)
            ship = subprocess.run(guest.ssh_argv() + ["--", untar], stdin=tar.stdout, capture_output=True)
            tar.stdout.close()
            if tar.wait() != 0 or ship.returncode != 0:
                raise SystemExit("shipping the store failed: %s" % ship.stderr.decode(errors="replace"))
            report["ship_seconds"] = round(time.monotonic() - t, 1)
            prep = guest.run_json(["python3", "-c", PREPARE, GUEST_STORE, GUEST_MOUNT, GUEST_CONFIG], timeout=3600)
            report["guest_prepare"] = prep
            print("bench_agent: shipped in %.1f s, fs-verity on %d objects in %.1f s" % (
                report["ship_seconds"], prep["objects"], prep["enable_seconds"]), file=sys.stderr)
            report["guest_calibration_seconds"] = float(guest.run(["python3", "-c", CALIBRATE]).stdout)

            agent = ["python3", "-c", "import sys; sys.path.insert(0, %r); sys.argv[0] = 'composefs-fleet-agent'; "
                     "from composefs_fleet_agent.main import main; sys.exit(main())" % LIB,
                     "--once", "--json", "--config", GUEST_CONFIG]
            floor = ["python3", "-c", FLOOR, GUEST_STORE + "/objects"]
            rounds = []
            for i in range(args.repeat):
                mode = "cold" if i == 0 else "warm"
                row = {"mode": mode}
                for name, argv in (("agent", agent), ("floor", floor)):
                    row[name] = guest.run_json(["python3", "-c", RUNNER, json.dumps(argv), mode], timeout=3600)
                    if row[name]["exit"] != 0:
                        raise SystemExit("%s exited %d in round %d:\n%s" % (name, row[name]["exit"], i,
                                                                            row[name]["out"]))
                try:
                    row["agent"]["pass_duration"] = json.loads(row["agent"]["out"])["duration"]
                except (ValueError, KeyError):
                    row["agent"]["pass_duration"] = None
                rounds.append(row)
                print("bench_agent: round %d (%s): agent %.2f s %.1f MB, floor %.2f s" % (
                    i + 1, mode, row["agent"]["wall"], row["agent"]["maxrss_kb"] / 1024, row["floor"]["wall"]),
                    file=sys.stderr)
            report["rounds"] = rounds
            daemon = guest.run_json(["python3", "-c", RUNNER, json.dumps(["python3", "-c", DAEMON, GUEST_CONFIG, "3"]),
                                     "warm"], timeout=3600)
            if daemon["exit"] != 0:
                raise SystemExit("the in-process passes exited %d:\n%s" % (daemon["exit"], daemon["out"]))
            daemon.update(json.loads(daemon["out"].strip().splitlines()[-1]))
            report["daemon"] = daemon
            print("bench_agent: one process, 3 passes: %s s, %.1f MB" % (
                ", ".join("%.2f" % d for d in daemon["durations"]), daemon["maxrss_kb"] / 1024), file=sys.stderr)
            report["journal_summary"] = guest.run(
                "journalctl -o json -q --no-pager COMPOSEFS_FINDING=pass-summary | tail -n 1").stdout.strip()
    finally:
        shutil.rmtree(str(work), ignore_errors=True)

    warm = report["rounds"][1:] or report["rounds"]
    agent_s = statistics.median(r["agent"]["wall"] for r in warm)
    floor_s = statistics.median(r["floor"]["wall"] for r in warm)
    rss_mb = max(r["agent"]["maxrss_kb"] for r in report["rounds"]) / 1024
    factor = report["guest_calibration_seconds"] / report["host_calibration_seconds"]
    n = report["guest_prepare"]["objects"]
    per100k = agent_s * 100000 / n
    durations = [r["agent"]["pass_duration"] for r in warm if r["agent"]["pass_duration"] is not None]
    report["agent_pass_duration"] = statistics.median(durations) if durations else None
    report.update(agent_seconds=agent_s, floor_seconds=floor_s, ratio=agent_s / floor_s, max_rss_mb=rss_mb,
                  emulation_factor=factor, agent_seconds_per_100k=per100k,
                  native_estimate_seconds_per_100k=per100k / factor)
    print(json.dumps(report, indent=1))
    print("objects: %d (fs-verity on, kernel-measured)" % n)
    print("agent pass (--once, new process, warm median): %.2f s in the guest = %.2f s per 100k objects" % (
        agent_s, per100k))
    if report["agent_pass_duration"] is not None:
        print("  of which the pass itself (its own clock, without interpreter start and imports): %.2f s"
              % report["agent_pass_duration"])
    later = report["daemon"]["durations"][1:]
    report["daemon_later_pass_seconds"] = statistics.median(later)
    print("daemon steady state (passes 2.. in one process, image objects listed once): %.2f s = %.2f s per 100k; "
          "ratio to the floor %.2f; first pass %.2f s; max RSS %.1f MB" % (
              report["daemon_later_pass_seconds"], report["daemon_later_pass_seconds"] * 100000 / n,
              report["daemon_later_pass_seconds"] / floor_s, report["daemon"]["durations"][0],
              report["daemon"]["maxrss_kb"] / 1024))
    print("floor (open + FS_IOC_MEASURE_VERITY + close, new process): %.2f s; ratio agent/floor %.2f" % (
        floor_s, agent_s / floor_s))
    print("cold round: agent %.2f s, floor %.2f s" % (report["rounds"][0]["agent"]["wall"],
                                                      report["rounds"][0]["floor"]["wall"]))
    print("max RSS of the agent: %.1f MB (target <= 100 MB)" % rss_mb)
    print("emulation factor (pure-Python loop guest/host): %.1fx; native estimates per 100k objects (target <= 3 s): "
          "--once %.2f s, daemon steady state %.2f s, floor %.2f s" % (
              factor, per100k / factor, report["daemon_later_pass_seconds"] * 100000 / n / factor,
              floor_s * 100000 / n / factor))
    return 0


if __name__ == "__main__":
    sys.exit(main())
