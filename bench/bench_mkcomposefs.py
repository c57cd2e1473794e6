#!/usr/bin/env python3
"""Our mkcomposefs against the C mkcomposefs 1.0.8, side by side in one run.

Two workloads, each timed as whole commands (best of --repeat runs):

1. dump -> image: a composefs-dump of a real tree (default /usr, about 100k+
   entries; digests are synthetic so the dump can be made without hashing
   gigabytes) built with ``--from-file``; or each ``--dump PATH`` given (C
   composefs's tests/assets/*.dump.gz, unpacked, are the reference inputs).
   For each dump also ``composefs-info dump`` and ``composefs-info ls`` of the
   image, and the peak memory (max RSS) of dump -> image.  ``--only info``
   builds the image once with C mkcomposefs and times only composefs-info.
2. directory -> image: a generated tree of about --dir-mb MB, same --threads
   for both, with ``--store``: ``empty`` (a fresh empty ``--digest-store`` for
   every run), ``populated`` (a store already holding every object: the
   everyday rebuild of a mostly unchanged tree) or ``none`` (no store); a
   comma-separated list runs several.

Prints wall times and the ratio ours/C (lower is better) and checks that both
tools wrote the same image.  Needs the oracle (scripts/fetch-oracle).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def oracle_argv(tool: str):
    cache = os.environ.get("COMPOSEFS_FLEET_CACHE", os.path.expanduser("~/.cache/composefs-fleet"))
    base = os.path.join(cache, "oracle", "1.0.8")
    meta = os.path.join(base, "oracle.json")
    if not os.path.exists(meta):
        sys.exit("C oracle not found (%s): run scripts/fetch-oracle" % meta)
    with open(meta) as f:
        info = json.load(f)
    return [os.path.join(base, info["ld_so"]), "--library-path", os.path.join(base, info["libdir"]),
            os.path.join(base, info["tools"][tool])]


def ours_argv(tool: str):
    return [os.path.join(REPO, ".venv", "bin", tool)]


def precompile():
    """Byte-compile our package as an installed wheel would be.

    The editable install runs from the source tree; with PYTHONDONTWRITEBYTECODE
    set (as on some CI machines) every run would otherwise compile every module
    again, which measures the environment, not our code.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    os.path.join(REPO, "plugins", "module_utils", "composefs"),
                    os.path.join(REPO, "cli")], check=True, stdout=subprocess.DEVNULL)


def run_measured(argv):
    """(wall seconds, peak RSS in KiB) of one command, output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    # wait4() gives this child's own rusage (RUSAGE_CHILDREN mixes all children).
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return elapsed, usage.ru_maxrss


def timed(argv, before=None, peaks=None):
    if before:
        before()
    # Flush what earlier runs left dirty, so no tool pays for another's
    # writeback inside its own fsync calls.
    os.sync()
    elapsed, peak = run_measured(argv)
    if peaks is not None:
        peaks.append(peak)
    return elapsed


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def compare(c_argv, our_argv, repeat, c_before=None, our_before=None, peaks=None):
    """Run C and ours alternately; (best C, best ours, median of per-pair ratios).

    Disk-heavy runs drift with the machine's writeback state, so each of ours
    is compared with the C run just before it.  *peaks*, a dict, receives the
    median peak RSS (KiB) of each side under "c" and "ours".
    """
    c_times, our_times = [], []
    c_peaks, our_peaks = [], []
    for _ in range(repeat):
        c_times.append(timed(c_argv, c_before, c_peaks))
        our_times.append(timed(our_argv, our_before, our_peaks))
    print("  C    runs: %s s" % " ".join("%.3f" % t for t in c_times), flush=True)
    print("  ours runs: %s s" % " ".join("%.3f" % t for t in our_times), flush=True)
    if peaks is not None:
        peaks["c"], peaks["ours"] = median(c_peaks), median(our_peaks)
    return min(c_times), min(our_times), median([o / c for c, o in zip(c_times, our_times)])


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_dump(source, path):
    """A dump of *source*'s real metadata, with synthetic digests for big files."""
    from composefs_fleet.dump import write_dump
    from composefs_fleet.scan import build_tree_from_directory
    from composefs_fleet.tree import digest_to_path

    tree = build_tree_from_directory(source, compute_digest=False, skip_devices=True)
    count = 0
    for rel, node in tree.walk():
        count += 1
        if node.is_reg() and node.size > 64 and node.content is None:
            node.digest = hashlib.sha256(rel).digest()
            node.payload = digest_to_path(node.digest)
    with open(path, "wb") as out:
        write_dump(tree, out)
    return count


def make_tree(top, megabytes, seed=1):
    rng = random.Random(seed)
    total = 0
    n = 0
    block = os.urandom(1 << 20)
    while total < megabytes << 20:
        d = os.path.join(top, "d%02d" % (n % 37), "e%d" % (n % 5))
        os.makedirs(d, exist_ok=True)
        size = rng.choice([10, 100, 3000, 20_000, 100_000, 300_000, 2_000_000])
        offset = rng.randrange(len(block))
        data = (block * ((size >> 20) + 2))[offset:offset + size]
        with open(os.path.join(d, "f%05d" % n), "wb") as f:
            # A unique prefix keeps every file a distinct object.
            f.write(n.to_bytes(8, "little")[:size] + data[8:])
        total += size
        n += 1
    return n, total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="/usr", help="tree whose metadata makes the dump (default /usr)")
    parser.add_argument("--dump", action="append", metavar="PATH",
                        help="an existing composefs-dump file to build instead (may repeat; .gz is unpacked)")
    parser.add_argument("--dir-mb", type=int, default=200, help="size of the generated directory")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=("dump", "dir", "info"),
                        help="run one workload (info: only composefs-info dump and ls of the dump's image)")
    parser.add_argument("--store", default="empty",
                        help="dir workload: empty, populated or none (digest store), or a comma-separated list")
    args = parser.parse_args()
    c_mk = oracle_argv("mkcomposefs")
    our_mk = ours_argv("mkcomposefs")
    c_info = oracle_argv("composefs-info")
    our_info = ours_argv("composefs-info")
    precompile()
    # Ours is the console script of the venv; PYTHONPATH (a worktree's .shim)
    # decides which code it runs, so say which.
    where = subprocess.run([os.path.join(REPO, ".venv", "bin", "python"), "-c",
                            "import composefs_fleet, composefs_fleet_cli; print(composefs_fleet.__file__)"],
                           check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    print("ours: composefs_fleet from %s" % where, flush=True)
    work = tempfile.mkdtemp(prefix="bench-mkcfs-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    try:
        c_img, our_img = os.path.join(work, "c.img"), os.path.join(work, "ours.img")
        rows = []
        if args.only != "dir":
            dumps = args.dump or [None]
            for dump in dumps:
                rows.extend(bench_dump(args, work, dump, (c_mk, our_mk), (c_info, our_info), c_img, our_img))
        if args.only not in ("dump", "info"):
            rows.extend(bench_dir(args, work, c_mk, our_mk, c_img, our_img))
        if rows:
            print("\n| work | ours/C (median of %d pairs) |\n| --- | --- |" % args.repeat)
            for label, ratio in rows:
                print("| %s | %.2fx |" % (label, ratio))
            print("\nload: %s" % " ".join("%.2f" % x for x in os.getloadavg()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def unpacked_dump(path, work):
    if not path.endswith(".gz"):
        return path
    plain = os.path.join(work, os.path.basename(path)[:-3])
    with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return plain


def bench_dump(args, work, dump, mk, info, c_img, our_img):
    """dump -> image, then composefs-info dump and ls of that image; [(label, ratio)]."""
    (c_mk, our_mk), (c_info, our_info) = mk, info
    if dump is None:
        dump = os.path.join(work, "tree.dump")
        entries = make_dump(args.source, dump)
        name = args.source
    else:
        name = os.path.basename(dump)
        dump = unpacked_dump(dump, work)
        with open(dump, "rb") as f:
            entries = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    rows = []
    if args.only == "info":
        subprocess.run(c_mk + ["--from-file", dump, c_img], check=True)
        print("image of %s (%d entries) built with C mkcomposefs" % (name, entries), flush=True)
    else:
        peaks = {}
        t_c, t_ours, ratio = compare(c_mk + ["--from-file", dump, c_img],
                                     our_mk + ["--from-file", dump, our_img], args.repeat, peaks=peaks)
        same = sha256_file(c_img) == sha256_file(our_img)
        print("dump -> image: %d entries from %s: best C %.3f s, best ours %.3f s, "
              "median ratio ours/C %.2fx, identical=%s" % (entries, name, t_c, t_ours, ratio, same), flush=True)
        mem = peaks["ours"] / peaks["c"]
        print("  peak memory: C %d KiB, ours %d KiB, ours/C %.2fx" % (peaks["c"], peaks["ours"], mem), flush=True)
        rows += [("mkcomposefs --from-file, %s (%d entries)" % (name, entries), ratio),
                 ("peak memory, dump -> image, %s" % name, mem)]
    for command in ("dump", "ls"):
        outputs = {}
        for side, argv in (("c", c_info), ("ours", our_info)):
            outputs[side] = subprocess.run(argv + [command, c_img], check=True, stdout=subprocess.PIPE).stdout
        t_c, t_ours, ratio = compare(c_info + [command, c_img], our_info + [command, c_img], args.repeat)
        print("composefs-info %s of that image: best C %.3f s, best ours %.3f s, median ratio ours/C %.2fx, "
              "identical=%s" % (command, t_c, t_ours, ratio, outputs["c"] == outputs["ours"]), flush=True)
        rows.append(("composefs-info %s, %s image" % (command, name), ratio))
    return rows


def bench_dir(args, work, c_mk, our_mk, c_img, our_img):
    """directory -> image for each --store mode; [(label, ratio)]."""
    tree = os.path.join(work, "tree")
    files, size = make_tree(tree, args.dir_mb)
    threads = "--threads=%d" % args.threads
    rows = []
    for mode in args.store.split(","):
        stores = {"c": os.path.join(work, "store-c"), "ours": os.path.join(work, "store-ours")}

        def reset(name, fill=False):
            def run():
                shutil.rmtree(stores[name], ignore_errors=True)
                os.mkdir(stores[name])
                if fill:
                    # Populated by the same tool, untimed: every object is there already.
                    subprocess.run((c_mk if name == "c" else our_mk) + [threads, "--digest-store=" + stores[name],
                                   tree, os.path.join(work, "fill.img")], check=True)
            return run

        if mode == "none":
            c_argv, our_argv, before = c_mk + [threads, tree, c_img], our_mk + [threads, tree, our_img], (None, None)
        elif mode in ("empty", "populated"):
            c_argv = c_mk + [threads, "--digest-store=" + stores["c"], tree, c_img]
            our_argv = our_mk + [threads, "--digest-store=" + stores["ours"], tree, our_img]
            if mode == "populated":
                reset("c", True)()
                reset("ours", True)()
                before = (None, None)
            else:
                before = (reset("c"), reset("ours"))
        else:
            raise SystemExit("--store: unknown mode %r (empty, populated, none)" % mode)
        t_c, t_ours, ratio = compare(c_argv, our_argv, args.repeat, *before)
        same = sha256_file(c_img) == sha256_file(our_img)
        print("dir -> image, %s store: %d files, %.0f MB, threads=%d: best C %.3f s, "
              "best ours %.3f s, median ratio ours/C %.2fx, identical=%s"
              % (mode, files, size / 1e6, args.threads, t_c, t_ours, ratio, same), flush=True)
        rows.append(("directory (%.0f MB, %d files), %s digest store, --threads=%d"
                     % (size / 1e6, files, mode, args.threads), ratio))
    return rows


if __name__ == "__main__":
    sys.exit(main())
