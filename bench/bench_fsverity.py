#!/usr/bin/env python3
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Our fs-verity digest against ``fsverity digest`` (fsverity-utils), one run.

Writes a --size file (default 1 GiB) under $TMPDIR or /var/tmp, reads it once
so both sides hash from the page cache, then times the C tool (as a command)
and ``composefs_fleet.fsverity_digest.digest_file`` (in process), --repeat
pairs, alternating.  Prints the best MB/s of both, the CPU time (user+sys,
children included) of each side's median run, and the time ratio ours/C as
the median of the per-pair ratios (lower is better; issue 18's goal is <= 1.0).
Exits non-zero only if the digests differ, the tool is missing, or the
throughput ratio (best C time / best ours time) is below --min-ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

try:
    from composefs_fleet import fsverity_digest
except ImportError:  # pragma: no cover - run outside the venv
    sys.exit("composefs_fleet is not importable: run with .venv/bin/python")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_file(directory: str, size: int) -> str:
    fd, path = tempfile.mkstemp(prefix="bench-fsverity-", dir=directory)
    chunk = os.urandom(1 << 20)
    with os.fdopen(fd, "wb") as f:
        written = 0
        while written < size:
            # Rotate the chunk so that no two MiB are identical.
            shift = (written >> 20) % len(chunk)
            piece = (chunk[shift:] + chunk[:shift])[: size - written]
            f.write(piece)
            written += len(piece)
    return path


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (forked hashers, the C tool)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="file size, e.g. 1G, 256M (default 1G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side, best counts (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="digest_file threads (default: its own)")
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--hash-alg", default="sha256", choices=sorted(fsverity_digest.ALGORITHMS))
    parser.add_argument("--dir", default=os.environ.get("TMPDIR") or "/var/tmp")
    parser.add_argument("--min-ratio", type=float, default=None, help="fail below this ours/C ratio")
    args = parser.parse_args()

    tool = shutil.which("fsverity")
    if tool is None:
        print("the 'fsverity' program (Debian package fsverity) is not in PATH", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    path = make_file(args.dir, size)
    try:
        warm(path)
        argv = [tool, "digest", path, "--hash-alg=" + args.hash_alg, "--block-size=%d" % args.block_size]
        c_times, ours_times, c_cpu, ours_cpu = [], [], [], []
        c_digest = ours_digest = ""
        for _ in range(args.repeat):
            cpu, start = cpu_seconds(), time.perf_counter()
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            c_times.append(time.perf_counter() - start)
            c_cpu.append(cpu_seconds() - cpu)
            c_digest = out.split()[0].partition(":")[2]

            cpu, start = cpu_seconds(), time.perf_counter()
            digest = fsverity_digest.digest_file(path, args.hash_alg, args.block_size, threads=args.threads)
            ours_times.append(time.perf_counter() - start)
            ours_cpu.append(cpu_seconds() - cpu)
            ours_digest = digest.hex()
    finally:
        os.unlink(path)
    c_best, ours_best = min(c_times), min(ours_times)
    time_ratio = median([o / c for c, o in zip(c_times, ours_times)])

    c_rate = size / c_best / 1e6
    ours_rate = size / ours_best / 1e6
    ratio = ours_rate / c_rate
    threads = args.threads if args.threads is not None else fsverity_digest._default_threads()
    print("file: %d bytes (%.2f GiB), %s, block size %d, %d pairs"
          % (size, size / (1 << 30), args.hash_alg, args.block_size, args.repeat))
    print("C    runs: %s s" % " ".join("%.3f" % t for t in c_times))
    print("ours runs: %s s" % " ".join("%.3f" % t for t in ours_times))
    print("fsverity digest (C):  %8.3f s  %8.1f MB/s  CPU %.3f s" % (c_best, c_rate, median(c_cpu)))
    print("digest_file (ours):   %8.3f s  %8.1f MB/s  CPU %.3f s  (threads=%d)"
          % (ours_best, ours_rate, median(ours_cpu), threads))
    print("throughput ratio ours/C (best runs): %.2f" % ratio)
    print("time ratio ours/C (median of %d pairs): %.2fx" % (args.repeat, time_ratio))
    print("load: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
    if c_digest != ours_digest:
        print("DIGEST MISMATCH: C %s, ours %s" % (c_digest, ours_digest), file=sys.stderr)
        return 1
    print("digests match: %s" % ours_digest)
    if args.min_ratio is not None and ratio < args.min_ratio:
        print("ratio %.2f is below --min-ratio %.2f" % (ratio, args.min_ratio), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
