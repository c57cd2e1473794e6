#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Make two sample trees for the demo playbook: v1, and v2 sharing most files.

v2 is v1 with --changed of its files rewritten, one file removed and one
added; every other file is an identical copy (another inode, same bytes),
so the store keeps it once.  Content is derived from --seed: the same
arguments give the same trees, hence the same image digests, everywhere.
The trees are built under a temporary name and renamed into place, so an
interrupted run leaves no half tree behind.
"""

import argparse
import hashlib
import os
import random
import shutil
import sys


def content(seed, name, size):
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d/%s/%d" % (seed, name.encode(), counter)).digest()
        counter += 1
    return bytes(out[:size])


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("root", help="directory to create, holding v1/ and v2/")
    parser.add_argument("--files", type=int, default=2000, help="files per tree (default 2000)")
    parser.add_argument("--changed", type=float, default=0.05, help="share of files v2 changes (default 0.05)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.files < 10:
        parser.error("--files must be at least 10")
    root = os.path.abspath(args.root)
    if os.path.exists(root):
        print("%s exists; nothing to do" % root)
        return 0
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(args.seed)
    names = []
    for i in range(args.files):
        depth = rng.randint(0, 3)
        parts = ["dir%02d" % rng.randint(0, 19) for _level in range(depth)]
        names.append("/".join(parts + ["file%05d.dat" % i]))
    sizes = {name: rng.choice((16, 40, 300, 1000, 4096, 5000, 9000, 20000)) for name in names}
    changed = set(rng.sample(names, max(1, int(len(names) * args.changed))))
    removed = rng.choice(sorted(set(names) - changed))
    for version in ("v1", "v2"):
        base = os.path.join(tmp, version)
        for name in names:
            if version == "v2" and name == removed:
                continue
            salt = args.seed + (1000 if version == "v2" and name in changed else 0)
            write(os.path.join(base, name), content(salt, name, sizes[name]))
        write(os.path.join(base, "etc", "release"), ("composefs-fleet demo tree %s\n" % version).encode())
        write(os.path.join(base, "share", "common.dat"), content(args.seed, "common", 50000))
        os.symlink("../etc/release", os.path.join(base, "dir00", "release-link") if os.path.isdir(
            os.path.join(base, "dir00")) else os.path.join(base, "release-link"))
    write(os.path.join(tmp, "v2", "added", "new.dat"), content(args.seed, "added", 7000))
    os.rename(tmp, root)
    print("made %s: v1 and v2 with %d files each, %d changed in v2" % (root, len(names), len(changed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
