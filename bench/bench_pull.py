#!/usr/bin/env python3
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-store pull from nginx on loopback against ``wget -i`` of the same object URLs.

A source store of --objects objects (--total-mb MB together, sizes
log-normal between 4 KiB and 4 MiB, seeded) is built once with
``composefs-store add-image`` of a generated tree and kept under --workdir,
so later runs reuse it (generation is never timed).  Debian's nginx serves
it on 127.0.0.1 (tests/remote/nginx_server.py: own config, pid and logs in
a temp dir, one worker, keep-alive on, its access log on for both sides).
The served files are read once before the rounds, so both sides fetch from
a warm page cache.

Two scenarios, each --rounds times, ours and wget alternately, a fresh
destination every round, ``sync`` before every timed run (so no side pays
for the other's writeback), wall clock of the whole command:

(a) full pull into an empty store: ``composefs-store --repo D pull --jobs N
    URL REF`` (fetches every object over N keep-alive connections, computes
    each one's fs-verity digest while it streams, compares it with the name,
    publishes durably: syncfs, rename, syncfs) against ``wget -q -i urls.txt
    -P D`` (one keep-alive connection, every object URL, no verification,
    no fsync).  Reported: MB/s of both and the throughput ratio ours/wget
    (goal: at least 1.0).
(b) 90% present: the destination store already holds 90% of the objects
    (copied in before the clock starts); ours pulls the ref (the image and the
    missing 10%), wget fetches only the missing 10% URLs.  Reported: the time
    ratio ours/wget (goal: at most 1.2).

Each ratio is the median of the per-round ratios (each of ours against the
wget run next to it).  Also printed, as context: the CPU time (user+sys)
of each command, which a busy machine disturbs less than the wall clock,
and the ``sync`` after each wget run (what it would take to make wget's
files durable, as ours are).

--signed: the ref is signed (an ed25519 key made by openssl, ``composefs-store
sign``) and ours pulls with ``--trusted-key``: each of our runs also reports
the seconds the pull spent fetching and verifying the signed statement
(``verify_seconds`` of its JSON result) next to its total.

Run from the repository root: .venv/bin/python bench/bench_pull.py
Options: --objects, --total-mb, --rounds, --jobs, --workdir, --json,
--present, --seed, --only a|b, --signed, --profile (instead of the rounds: one
in-process pull, into an empty store or with --only b into a 90% filled one,
with the wall and thread CPU time of each phase; --cprofile adds a cProfile
of the transfer threads, whose times include waiting for the GIL).
Exit status 1 if a goal is missed, 2 if nginx or wget is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

from bench_mkcomposefs import precompile  # noqa: E402  (bench/ is on sys.path: this script's directory)

try:
    from composefs_fleet.store import Store
except ImportError:  # pragma: no cover - run outside the venv
    sys.exit("composefs_fleet is not importable: run with .venv/bin/python")

MIN_SIZE = 4096
MAX_SIZE = 4 << 20
REF = "bench/pull"
STORE_CLI = [sys.executable, "-m", "composefs_fleet_cli.composefs_store"]


# ---- the source store (built once, cached in --workdir)

def object_sizes(count: int, total: int, rng: random.Random) -> List[int]:
    """``count`` log-normal sizes in [MIN_SIZE, MAX_SIZE] adding up to about ``total``."""
    raw = [rng.lognormvariate(math.log(64 << 10), 1.5) for _ in range(count)]
    scale = 1.0
    for _ in range(50):  # clipping moves the sum: rescale until it settles
        sizes = [min(MAX_SIZE, max(MIN_SIZE, int(r * scale))) for r in raw]
        got = sum(sizes)
        if abs(got - total) < total * 0.001:
            break
        scale *= total / got
    return sizes


def make_tree(root: str, sizes: List[int]) -> None:
    for i, size in enumerate(sizes):
        d = os.path.join(root, "d%02d" % (i % 61), "e%d" % (i % 7))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%05d" % i), "wb") as f:
            f.write(os.urandom(size))


def source_store(workdir: str, objects: int, total_mb: float, seed: int) -> Tuple[str, str, Dict[str, int]]:
    """(store directory name under workdir, image digest, {object hex: size}); built on first use."""
    name = "pull-src-%d-%g-%d" % (objects, total_mb, seed)
    path = os.path.join(workdir, name)
    done = path + ".json"
    if os.path.exists(done):
        with open(done) as f:
            info = json.load(f)
        return name, info["digest"], info["objects"]
    shutil.rmtree(path, ignore_errors=True)
    tree = path + ".tree"
    shutil.rmtree(tree, ignore_errors=True)
    sizes = object_sizes(objects, int(total_mb * 1e6), random.Random(seed))
    print("generating %d files, %.0f MB in %s (once; reused by later runs)" % (len(sizes), sum(sizes) / 1e6, tree),
          flush=True)
    make_tree(tree, sizes)
    subprocess.run(STORE_CLI + ["--repo", path, "init"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(STORE_CLI + ["--repo", path, "add-image", "--ref", REF, tree], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    store = Store.open(path, notice=None)
    digest = store.read_ref(REF)
    needed = dict(store.image_objects(digest).objects)
    with open(done + ".tmp", "w") as f:
        json.dump({"digest": digest, "objects": needed}, f)
    os.rename(done + ".tmp", done)
    return name, digest, needed


def object_rel(hexd: str) -> str:
    return "objects/%s/%s" % (hexd[:2], hexd[2:])


def warm(store: str, objects: Dict[str, int]) -> None:
    for hexd in objects:
        with open(os.path.join(store, object_rel(hexd)), "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass


# ---- nginx on 127.0.0.1: tests/remote/nginx_server.py (the tests' fixture, usable outside pytest)

sys.path.insert(0, os.path.join(REPO, "tests", "remote"))
from nginx_server import NginxServer, nginx_missing  # noqa: E402


def start_nginx(root: str, tmp: str) -> NginxServer:
    # One worker; keep-alive for the whole run (nginx's default closes a connection after 1000 requests).
    return NginxServer(root, tmp, keepalive_timeout="120s", keepalive_requests=1000000).start()


# ---- the two sides

def reset_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: List[str]) -> Tuple[float, float, str]:
    """(wall time, CPU time user+sys, stdout) of a command."""
    # Flush what earlier runs left dirty: ours ends with syncfs, which would
    # otherwise also wait for wget's (or the preparation's) writeback.
    os.sync()
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    elapsed = time.perf_counter() - start
    cpu = children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit("bench: %s failed (exit %d): %s" % (" ".join(argv), proc.returncode, proc.stderr[-2000:]))
    return elapsed, cpu, proc.stdout


def run_ours(dest: str, url: str, jobs: int, expect: int, trusted: List[str]) -> Tuple[float, float, float]:
    """(wall time, CPU time, the pull's own verify_seconds: 0 unless ``trusted`` keys make it verify)."""
    trust = [arg for key in trusted for arg in ("--trusted-key", key)]
    elapsed, cpu, out = timed(STORE_CLI + ["--repo", dest, "pull", "--json", "--jobs", str(jobs)] + trust + [url, REF])
    res = json.loads(out)
    if res["objects_fetched"] != expect:
        raise SystemExit("bench: pull fetched %d objects, expected %d: %s" % (res["objects_fetched"], expect, out))
    if trusted and not res.get("signature"):
        raise SystemExit("bench: a pull with --trusted-key reported no verified signature: %s" % out)
    return elapsed, cpu, float(res.get("verify_seconds") or 0.0)


def sign_source(src: str, keydir: str) -> str:
    """Sign the source store's ref now with a fresh ed25519 key (openssl); the public key's path."""
    os.makedirs(keydir, exist_ok=True)
    private, public = os.path.join(keydir, "bench.key"), os.path.join(keydir, "bench.pub")
    for argv in (["openssl", "genpkey", "-algorithm", "ed25519", "-out", private],
                 ["openssl", "pkey", "-in", private, "-pubout", "-out", public],
                 STORE_CLI + ["--repo", src, "sign", REF, "--key", private]):
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        if proc.returncode != 0:
            raise SystemExit("bench: %s failed (exit %d): %s" % (" ".join(argv), proc.returncode, proc.stderr[-2000:]))
    return public


def run_wget(dest: str, urls: str, expect_bytes: int) -> Tuple[float, float, float]:
    """(wget's wall time, its CPU time, the time of the sync after it)."""
    elapsed, cpu, _ = timed(["wget", "-q", "--no-proxy", "-i", urls, "-P", dest])
    got = 0
    for entry in os.scandir(dest):
        got += entry.stat().st_size
    if got != expect_bytes:
        raise SystemExit("bench: wget wrote %d bytes, expected %d" % (got, expect_bytes))
    start = time.perf_counter()
    os.sync()
    return elapsed, cpu, time.perf_counter() - start


def prefill(dest: str, src: str, present: List[str]) -> None:
    """A store holding ``present`` (copied from the source store; not timed)."""
    Store.init(dest, notice=None)
    for hexd in present:
        rel = object_rel(hexd)
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), mode=0o700, exist_ok=True)
        shutil.copyfile(os.path.join(src, rel), os.path.join(dest, rel))


def write_urls(path: str, base: str, hexes: List[str]) -> None:
    with open(path, "w") as f:
        for hexd in hexes:
            f.write("%s/%s\n" % (base, object_rel(hexd)))


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def scenario(name: str, rounds: int, ours_run, wget_run, prepare_ours, prepare_wget, nbytes: int,
             signed: bool = False) -> dict:
    rows = []
    for n in range(1, rounds + 1):
        before = load()
        prepare_wget()
        t_wget, cpu_wget, t_sync = wget_run()
        prepare_ours()
        t_ours, cpu_ours, t_verify = ours_run()
        row = {"round": n, "wget": t_wget, "wget_cpu": cpu_wget, "wget_sync": t_sync, "ours": t_ours,
               "ours_cpu": cpu_ours, "ours_verify": t_verify, "load_before": before}
        rows.append(row)
        print("  round %d: wget %.3f s (%.1f MB/s, CPU %.2f s; sync after it %.3f s), ours %.3f s (%.1f MB/s, "
              "CPU %.2f s%s), ours/wget time %.2f  [load %s]"
              % (n, t_wget, nbytes / t_wget / 1e6, cpu_wget, t_sync, t_ours, nbytes / t_ours / 1e6, cpu_ours,
                 "; signature fetched and verified in %.4f s" % t_verify if signed else "", t_ours / t_wget, before),
              flush=True)
    time_ratio = statistics.median(r["ours"] / r["wget"] for r in rows)
    cpu_wget = statistics.median(r["wget_cpu"] for r in rows)
    cpu_ours = statistics.median(r["ours_cpu"] for r in rows)
    print("  CPU time (user+sys, median): wget %.2f s, ours %.2f s (ours/wget %.2f)"
          % (cpu_wget, cpu_ours, cpu_ours / max(cpu_wget, 1e-6)), flush=True)
    verify = statistics.median(r["ours_verify"] for r in rows)
    if signed:
        total = statistics.median(r["ours"] for r in rows)
        print("  signed pull (median): verify_seconds %.4f s of %.3f s total (%.2f%%)"
              % (verify, total, 100 * verify / total), flush=True)
    return {"scenario": name, "rounds": rows, "bytes": nbytes, "signed": signed, "median_verify_s": verify,
            "median_wget_s": statistics.median(r["wget"] for r in rows),
            "median_ours_s": statistics.median(r["ours"] for r in rows),
            "median_wget_cpu_s": cpu_wget, "median_ours_cpu_s": cpu_ours,
            "median_time_ratio": time_ratio, "throughput_ratio": 1 / time_ratio, "load_after": load()}


# ---- --profile: one pull in process, time per phase

class PhaseTimes:
    """Wall time and thread CPU time summed over all threads, per phase.

    Wall well above CPU means waiting: for the disk, the network, a lock,
    or (2 cores, 8 threads) for a core or the GIL.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}

    def add(self, phase: str, seconds: float, cpu: float) -> None:
        with self.lock:
            self.wall[phase] = self.wall.get(phase, 0.0) + seconds
            self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu
            self.calls[phase] = self.calls.get(phase, 0) + 1

    def wrap(self, owner, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        def timed_call(*args, **kwargs):
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start, time.thread_time() - cpu)

        setattr(owner, attr, timed_call)


def profile(url: str, dest: str, jobs: int, cprofile: bool, prepare, trusted: List[str]) -> None:
    import http.client

    from composefs_fleet import file_copy, fsverity_digest, objects, pull, remote_http

    phases = PhaseTimes()
    phases.wrap(remote_http.HttpTransport, "_request", "http request up to the response headers")
    phases.wrap(http.client.HTTPResponse, "readinto1", "http readinto1 (socket -> buffer)")
    phases.wrap(fsverity_digest.FsVerityHasher, "update", "fs-verity hashing (update)")
    phases.wrap(fsverity_digest.FsVerityHasher, "hexdigest", "fs-verity hashing (final)")
    phases.wrap(pull._VerifyingSink, "write", "sink.write (os.write + hashing)")
    phases.wrap(objects.ObjectDir, "stage", "stage: temp file + the whole transfer")
    phases.wrap(objects.ObjectDir, "syncfs", "syncfs")
    phases.wrap(objects.ObjectDir, "publish", "publish (fs-verity enable + rename)")
    phases.wrap(objects.ObjectDir, "sync", "sync of the names")
    phases.wrap(objects.ObjectBatch, "commit", "batch.commit (all of the above three)")
    phases.wrap(os, "write", "os.write (into the staged file)")
    phases.wrap(objects, "make_temp", "make_temp (open the staged file)")
    phases.wrap(file_copy, "start_writeback", "start_writeback (sync_file_range)")
    for step in ("_check_remote_meta", "_remote_ref", "_local_ref", "_image", "_missing", "_fetch"):
        phases.wrap(pull, step, "pull.%s" % step)
    phases.wrap(Store, "write_image", "store.write_image")
    phases.wrap(Store, "write_ref", "store.write_ref")
    prepare()
    store = Store.open(dest, notice=None)
    os.sync()
    profs: list = []
    if cprofile:
        import cProfile

        def start_thread_profile(*_args):
            # Called once in each new thread: replace itself with a profiler of that thread.
            prof = cProfile.Profile()
            profs.append(prof)
            prof.enable()

        threading.setprofile(start_thread_profile)
    t0 = os.times()
    start = time.perf_counter()
    if trusted:
        from composefs_fleet.ref_trust import TrustPolicy

        res = pull.pull(store, url, REF, jobs=jobs, trust=TrustPolicy.load(trusted))
    else:
        res = pull.pull(store, url, REF, jobs=jobs)
    wall = time.perf_counter() - start
    t1 = os.times()
    threading.setprofile(None)
    print("profile: one pull, jobs=%d: %d objects, %.0f MB in %.3f s (%.1f MB/s); process CPU user %.2f s, "
          "sys %.2f s (%.0f%% of one core)  [load %s]"
          % (jobs, res.objects_fetched, res.bytes_fetched / 1e6, wall, res.bytes_fetched / wall / 1e6,
             t1.user - t0.user, t1.system - t0.system, 100 * (t1.user - t0.user + t1.system - t0.system) / wall, load()))
    if trusted:
        print("  signed: the statement was fetched and verified in %.4f s (verify_seconds) of the %.3f s"
              % (res.verify_seconds, wall))
    print("  %-42s %10s %10s %8s   (summed over the %d threads; nested phases overlap)"
          % ("phase", "wall", "thread CPU", "calls", jobs))
    for phase, seconds in sorted(phases.wall.items(), key=lambda kv: -kv[1]):
        print("  %-42s %8.3f s %8.3f s %8d" % (phase, seconds, phases.cpu[phase], phases.calls[phase]))
    if profs:
        import pstats

        for prof in profs:
            prof.disable()  # from another thread: harmless, the pool threads have ended
        print("  cProfile of the %d transfer threads together (tottime):" % len(profs))
        pstats.Stats(*profs).sort_stats("tottime").print_stats(25)


# ---- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--total-mb", type=float, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=8, help="our concurrent transfers (default 8, the pull's default)")
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/var/tmp"), "bench-pull"),
                        help="keeps the generated source store between runs (default $TMPDIR or /var/tmp/bench-pull)")
    parser.add_argument("--present", type=float, default=0.90, help="share of the objects present in (b)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=("a", "b"))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    parser.add_argument("--profile", action="store_true", help="time the phases of one in-process pull instead")
    parser.add_argument("--signed", action="store_true",
                        help="sign the ref (ed25519, openssl key) and pull with --trusted-key; report verify_seconds")
    parser.add_argument("--cprofile", action="store_true", help="with --profile: also cProfile the transfer threads")
    parser.add_argument("--min-ratio", type=float, default=1.0, help="(a) goal: throughput ours/wget at least this")
    parser.add_argument("--max-ratio", type=float, default=1.2, help="(b) goal: time ours/wget at most this")
    args = parser.parse_args()

    if shutil.which("wget") is None:
        print("bench: wget is not installed (Debian package wget)", file=sys.stderr)
        return 2
    if nginx_missing():
        print("bench: %s" % nginx_missing(), file=sys.stderr)
        return 2
    precompile()  # as an installed package would be (PYTHONDONTWRITEBYTECODE would recompile every run)
    os.makedirs(args.workdir, exist_ok=True)
    workdir = os.path.abspath(args.workdir)
    name, _digest, objects = source_store(workdir, args.objects, args.total_mb, args.seed)
    src = os.path.join(workdir, name)
    total = sum(objects.values())
    warm(src, objects)
    run = tempfile.mkdtemp(prefix="bench-pull-run-", dir=workdir)
    trusted: List[str] = []
    if args.signed:
        if shutil.which("openssl") is None:
            print("bench: --signed needs openssl (Debian package openssl)", file=sys.stderr)
            return 2
        trusted = [sign_source(src, os.path.join(run, "keys"))]
    nginx = start_nginx(src, os.path.join(run, "nginx"))
    url = nginx.url
    report = {"objects": len(objects), "bytes": total, "jobs": args.jobs, "workdir": workdir, "signed": args.signed,
              "load_start": load(), "scenarios": []}
    print("source: %d objects, %.0f MB (%s), served by nginx at %s; jobs=%d; load %s"
          % (len(objects), total / 1e6, src, url, args.jobs, report["load_start"]), flush=True)
    ok = True
    try:
        # Ordered by size first: the same --seed gives the same missing sizes, whatever the random contents.
        hexes = sorted(objects, key=lambda h: (objects[h], h))
        ours_dest, wget_dest = os.path.join(run, "ours"), os.path.join(run, "wget")
        rng = random.Random(args.seed + 1)
        missing = sorted(rng.sample(hexes, len(hexes) - int(round(len(hexes) * args.present))))
        present = sorted(set(hexes) - set(missing))
        if args.profile:
            if args.only == "b":
                profile(url, ours_dest, args.jobs, args.cprofile, lambda: prefill(ours_dest, src, present), trusted)
            else:
                profile(url, ours_dest, args.jobs, args.cprofile, lambda: Store.init(ours_dest, notice=None), trusted)
            return 0
        if args.only != "b":
            urls = os.path.join(run, "all.txt")
            write_urls(urls, url, hexes)
            print("(a) full pull into an empty store, %d objects, %.0f MB:" % (len(hexes), total / 1e6), flush=True)
            res = scenario("full", args.rounds,
                           lambda: run_ours(ours_dest, url, args.jobs, len(hexes), trusted),
                           lambda: run_wget(wget_dest, urls, total),
                           lambda: (shutil.rmtree(ours_dest, ignore_errors=True), Store.init(ours_dest, notice=None)),
                           lambda: reset_dir(wget_dest), total, signed=args.signed)
            res["ours_mb_s"] = total / res["median_ours_s"] / 1e6
            res["wget_mb_s"] = total / res["median_wget_s"] / 1e6
            report["scenarios"].append(res)
            good = res["throughput_ratio"] >= args.min_ratio
            ok = ok and good
            print("(a) median: wget %.1f MB/s, ours %.1f MB/s: throughput ratio ours/wget %.2f (goal >= %.2f): %s"
                  % (res["wget_mb_s"], res["ours_mb_s"], res["throughput_ratio"], args.min_ratio,
                     "OK" if good else "BELOW the goal"), flush=True)
        if args.only != "a":
            missing_bytes = sum(objects[h] for h in missing)
            urls = os.path.join(run, "missing.txt")
            write_urls(urls, url, missing)
            print("(b) %.0f%% present: %d objects (%.0f MB) missing of %d:"
                  % (100 * args.present, len(missing), missing_bytes / 1e6, len(hexes)), flush=True)
            res = scenario("partial", args.rounds,
                           lambda: run_ours(ours_dest, url, args.jobs, len(missing), trusted),
                           lambda: run_wget(wget_dest, urls, missing_bytes),
                           lambda: (shutil.rmtree(ours_dest, ignore_errors=True), prefill(ours_dest, src, present)),
                           lambda: reset_dir(wget_dest), missing_bytes, signed=args.signed)
            res["missing_objects"] = len(missing)
            report["scenarios"].append(res)
            good = res["median_time_ratio"] <= args.max_ratio
            ok = ok and good
            print("(b) median: wget %.3f s, ours %.3f s: time ratio ours/wget %.2f (goal <= %.2f): %s"
                  % (res["median_wget_s"], res["median_ours_s"], res["median_time_ratio"], args.max_ratio,
                     "OK" if good else "ABOVE the goal"), flush=True)
    finally:
        nginx.stop()
        shutil.rmtree(run, ignore_errors=True)
    report["load_end"] = load()
    if args.json:
        print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
