#!/usr/bin/env python3
"""mount + umount of a composefs image: our mount.composefs against the C one (1.0.8).

For each image (a small tree and a larger generated one), every round runs
the helper as a command (``mount.composefs -o basedir=STORE IMAGE TARGET``),
then unmounts the target, alternating C and ours so that both see the same
machine state.  Also timed: our library call ``mount_composefs()`` in this
process, which is the mount work without the interpreter start.

Prints the median wall time per mount+umount and the median of the per-round
ratios ours/C (lower is better).  Needs root, the kernel's erofs + overlay, and the oracle
(scripts/fetch-oracle).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_mkcomposefs import oracle_argv, ours_argv, precompile  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)


def umount(target: str) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "umount %s: %s" % (target, os.strerror(err)))


def make_tree(base: str, files: int, seed: int) -> str:
    rng = random.Random(seed)
    src = os.path.join(base, "src-%d" % files)
    for i in range(files):
        d = os.path.join(src, "d%02d" % (i % 50), "e%d" % (i % 7))
        os.makedirs(d, exist_ok=True)
        size = rng.choice([0, 10, 100, 3000, 20000])
        with open(os.path.join(d, "f%d" % i), "wb") as f:
            f.write(rng.randbytes(size))
    return src


def build(src: str, image: str, store: str) -> None:
    subprocess.run(ours_argv("mkcomposefs") + ["--digest-store=" + store, src, image], check=True)


def time_cli(argv, image: str, store: str, target: str, cpu: list) -> float:
    """Wall time of mount + umount; the helper's own CPU time (user + sys, from wait4) goes to ``cpu``:
    a loaded machine stretches the wall clock of a short process far more than its CPU time."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv + ["-o", "basedir=" + store, image, target], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.stderr.close()
    if status != 0:
        raise SystemExit("%s failed: %s" % (argv[-1], err.decode(errors="replace")))
    umount(target)
    cpu.append(usage.ru_utime + usage.ru_stime)
    return time.perf_counter() - start


def installed_like_argv(base: str):
    """Our helper without site: the interpreter and our own imports only.

    At every start ``site`` runs the editable install's import hook (pathlib,
    urllib, ... tens of ms) and whatever .pth files the machine's Python
    carries; none of it is our code.  Here the two packages are plain
    directories on sys.path and ``-S`` skips site (a packaged install, e.g.
    /usr/sbin/mount.composefs with python3 -S or a zipapp, can do the same)."""
    pkgs = os.path.join(base, "site")
    os.mkdir(pkgs)
    os.symlink(os.path.join(REPO, "plugins", "module_utils", "composefs"), os.path.join(pkgs, "composefs_fleet"))
    os.symlink(os.path.join(REPO, "cli"), os.path.join(pkgs, "composefs_fleet_cli"))
    code = ("import sys; sys.path.insert(0, %r); sys.argv[0] = 'mount.composefs'; "
            "from composefs_fleet_cli.mount_composefs import main; sys.exit(main())" % pkgs)
    return [sys.executable, "-S", "-c", code]


def time_floor(cpu: list) -> float:
    """Wall time of what any Python mount helper pays before its own code runs: the interpreter
    without site and ctypes (the only standard-library way to the mount system calls); its CPU
    time (user + sys) goes to ``cpu``.  Nothing is mounted: this is the floor, not a helper."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", "import ctypes"])
    _pid, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit("python -S -c 'import ctypes' failed")
    cpu.append(usage.ru_utime + usage.ru_stime)
    return time.perf_counter() - start


def time_api(image: str, store: str, target: str) -> float:
    from composefs_fleet.mount import mount_composefs

    start = time.perf_counter()
    mount_composefs(image, target, [store])
    umount(target)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="mount+umount cycles per tool and image")
    parser.add_argument("--files", type=int, nargs="*", default=[10, 20000], help="files per generated image")
    parser.add_argument("--bin", help="directory of our console scripts (default: the repository's .venv/bin; "
                                      "PYTHONPATH, if set, decides whose code they run)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (mounts)")
    precompile()
    c_argv = oracle_argv("mount.composefs")
    our_argv = [os.path.join(args.bin, "mount.composefs")] if args.bin else ours_argv("mount.composefs")
    print("ours: %s (PYTHONPATH=%s)" % (our_argv[0], os.environ.get("PYTHONPATH", "")))
    if not os.path.exists(our_argv[0]):
        raise SystemExit("%s missing: pip install -e . (console script mount.composefs)" % our_argv[0])
    base = tempfile.mkdtemp(prefix="bench-mount-")
    try:
        store = os.path.join(base, "objects")
        target = os.path.join(base, "mnt")
        os.mkdir(target)
        plain_argv = installed_like_argv(base)
        print("%-22s %10s %12s %9s %14s %9s %11s %12s %18s" % (
            "image", "C median", "ours median", "ratio", "ours no-site", "ratio", "API median", "CPU ours/C",
            "floor ratio (CPU)"))
        ratios = []
        plain_ratios = []
        floor_ratios = []
        for files in args.files:
            src = make_tree(base, files, files)
            image = os.path.join(base, "image-%d.cfs" % files)
            build(src, image, store)
            c_times, our_times, plain_times, api_times, floor_times = [], [], [], [], []
            c_cpu, our_cpu, floor_cpu = [], [], []
            for _ in range(args.rounds):
                c_times.append(time_cli(c_argv, image, store, target, c_cpu))
                our_times.append(time_cli(our_argv, image, store, target, our_cpu))
                plain_times.append(time_cli(plain_argv, image, store, target, []))
                api_times.append(time_api(image, store, target))
                floor_times.append(time_floor(floor_cpu))
            c_med = statistics.median(c_times)
            our_med, plain_med = statistics.median(our_times), statistics.median(plain_times)
            # Median of the per-round ratios: each pair ran back to back, under the same load.
            ratios.append(statistics.median(o / c for o, c in zip(our_times, c_times)))
            plain_ratios.append(statistics.median(p / c for p, c in zip(plain_times, c_times)))
            floor_ratios.append(statistics.median(f / c for f, c in zip(floor_times, c_times)))
            label = "%d files, %d KiB" % (files, os.path.getsize(image) // 1024)
            print("%-22s %8.2fms %10.2fms %8.2fx %12.2fms %8.2fx %9.2fms %12s %18s" % (
                label, c_med * 1e3, our_med * 1e3, ratios[-1], plain_med * 1e3, plain_ratios[-1],
                statistics.median(api_times) * 1e3,
                "%.1f/%.1fms" % (statistics.median(our_cpu) * 1e3, statistics.median(c_cpu) * 1e3),
                "%.2fx (%.1fms)" % (floor_ratios[-1], statistics.median(floor_cpu) * 1e3)))
        print("ratio ours/C, median of per-round ratios of mount+umount (lower is better): console script %s; "
              "without site (-S) %s; the library call alone is the API column"
              % (", ".join("%.2fx" % r for r in ratios), ", ".join("%.2fx" % r for r in plain_ratios)))
        print("floor: python -S -c 'import ctypes' (no mount) against C's mount+umount: %s; no Python helper "
              "starts below it" % ", ".join("%.2fx" % r for r in floor_ratios))
    finally:
        while True:  # never leave a mount behind
            try:
                umount(os.path.join(base, "mnt"))
            except OSError:
                break
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
