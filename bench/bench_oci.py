#!/usr/bin/env python3
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Importing an OCI image into a store against the two-step way: umoci unpack + C mkcomposefs --digest-store.

The image: the test guest's Debian trixie root filesystem (about 350 MB,
12,000 entries) as a 3-layer gzip OCI layout built once with umoci
(tests/oci/oci_fixtures.py: debian_layout) and kept under --workdir.

Each round, alternately, from a warm page cache and after ``sync``:

* ours: ``composefs-store --repo FRESH add-image oci:LAYOUT:t --ref r``
  (decompresses and parses every layer as it streams, writes each file
  once, into the store as an object, checks every digest, writes the
  image and the ref);
* two-step: ``umoci unpack --image LAYOUT:t BUNDLE`` followed by C
  ``mkcomposefs --digest-store=FRESH/objects BUNDLE/rootfs image.cfs``
  (the rootfs written to disk, then read again and copied into the store).

Reported: the median per-round wall-time ratio ours/two-step (goal: at most
1.0), each side's CPU time and peak resident memory (ours: the
composefs-store process; two-step: the larger of umoci's and mkcomposefs').
Both sides end with their objects fsync-ed: ours durably (syncfs), the C tool
fsyncs each object; umoci's unpacked rootfs is not synced (as users run it).

Run from the repository root as root: .venv/bin/python bench/bench_oci.py [--rounds 5]
Exit status 1 if the goal is missed, 2 if umoci, the oracle or the guest image is missing.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "oci"))

from bench_mkcomposefs import oracle_argv, ours_argv, precompile  # noqa: E402


def layout_in(workdir: Path) -> Path:
    import oci_fixtures  # type: ignore[import-not-found]

    stamp = workdir / "debian.done"
    layout = workdir / "debian"
    if not stamp.exists():
        if workdir.exists():
            shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
        print("building the 3-layer Debian image under %s (once) ..." % workdir, flush=True)
        oci_fixtures.debian_layout(workdir)
        stamp.write_text("ok\n")
    return layout


def run_timed(argv, cwd=None):
    """(wall s, cpu s, peak RSS KiB) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit("%s failed: %s" % (" ".join(map(str, argv)), res.stderr.decode(errors="replace")[-2000:]))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss  # ru_maxrss of children: the largest so far


def peak_of(argv):
    """Peak RSS (KiB) of one command alone, through GNU time (RUSAGE_CHILDREN keeps the maximum ever)."""
    res = subprocess.run(["/usr/bin/time", "-f", "%M"] + [str(a) for a in argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         check=False)
    return int(res.stderr.decode().strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/var/tmp/bench-oci")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_oci: needs root (umoci unpack keeps owners; the image is built through a loop mount)")
        return 2
    for tool in ("umoci", "/usr/bin/time"):
        if shutil.which(tool) is None:
            print("bench_oci: %s is missing (scripts/setup)" % tool)
            return 2
    workdir = Path(args.workdir)
    layout = layout_in(workdir)
    precompile()
    c_mk = oracle_argv("mkcomposefs")
    store_cli = ours_argv("composefs-store")
    ref = "%s:t" % layout
    # Warm the page cache with the blobs, for both sides alike.
    for blob in (layout / "blobs" / "sha256").iterdir():
        with open(blob, "rb") as f:
            while f.read(1 << 20):
                pass
    run_dir = workdir / "run"
    ours, theirs, ratios = [], [], []
    for number in range(args.rounds):
        for side in ("two-step", "ours") if number % 2 == 0 else ("ours", "two-step"):
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir()
            os.sync()
            if side == "ours":
                subprocess.run(store_cli + ["--repo", str(run_dir / "store"), "init"], check=True, stdout=subprocess.DEVNULL)
                os.sync()
                wall, cpu, _ = run_timed(store_cli + ["--repo", str(run_dir / "store"), "add-image", "oci:" + ref, "--ref", "r"])
                ours.append((wall, cpu))
            else:
                w1, c1, _ = run_timed(["umoci", "unpack", "--image", ref, str(run_dir / "bundle")])
                w2, c2, _ = run_timed(c_mk + ["--digest-store=%s" % (run_dir / "objects"), str(run_dir / "bundle" / "rootfs"),
                                              str(run_dir / "image.cfs")])
                theirs.append((w1 + w2, c1 + c2))
        ratios.append(ours[-1][0] / theirs[-1][0])
        print("round %d: ours %.2f s (cpu %.2f), two-step %.2f s (cpu %.2f), ratio %.2f"
              % (number + 1, ours[-1][0], ours[-1][1], theirs[-1][0], theirs[-1][1], ratios[-1]), flush=True)
    # Peak memory, measured once each, alone.
    shutil.rmtree(run_dir)
    run_dir.mkdir()
    subprocess.run(store_cli + ["--repo", str(run_dir / "store"), "init"], check=True, stdout=subprocess.DEVNULL)
    our_peak = peak_of(store_cli + ["--repo", str(run_dir / "store"), "add-image", "oci:" + ref, "--ref", "r"])
    umoci_peak = peak_of(["umoci", "unpack", "--image", ref, str(run_dir / "bundle")])
    mk_peak = peak_of(c_mk + ["--digest-store=%s" % (run_dir / "objects"), str(run_dir / "bundle" / "rootfs"),
                              str(run_dir / "image.cfs")])
    shutil.rmtree(run_dir)
    ratio = statistics.median(ratios)
    print()
    print("| work | ours | umoci unpack + C mkcomposefs --digest-store | ratio (median of %d) | goal |" % args.rounds)
    print("| --- | --- | --- | --- | --- |")
    print("| import 3-layer gzip Debian image (%d MB of blobs) | %.2f s | %.2f s | %.2fx | <= 1.0x |" % (
        sum(b.stat().st_size for b in (layout / "blobs" / "sha256").iterdir()) // 1000000,
        statistics.median(w for w, _ in ours), statistics.median(w for w, _ in theirs), ratio))
    print("| CPU time | %.2f s | %.2f s | | |" % (statistics.median(c for _, c in ours), statistics.median(c for _, c in theirs)))
    print("| peak memory | %d MiB | umoci %d MiB, mkcomposefs %d MiB | | |" % (our_peak // 1024, umoci_peak // 1024, mk_peak // 1024))
    print("load average: %s" % " ".join("%.2f" % v for v in os.getloadavg()))
    return 0 if ratio <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
