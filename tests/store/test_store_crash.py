# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Crash safety: SIGKILL add-image and gc at random points, then the store must be sound.

After every kill: fsck is clean (every object's digest equals its name, every
image has its objects, every ref names a complete image), and adding the
source again converges to the image digest it always had.  The kill points
are drawn (seeded: STORE_CRASH_SEED) uniformly over the measured duration of
the command, so they land in start-up, scanning, object writes, the image
write, the ref update and gc's sweep alike.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

from composefs_fleet import fsverity_digest
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.errors import RefNotFound
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check
from composefs_fleet.store_gc import collect

from store_fixtures import make_tree, store_cmd  # noqa: F401  (fixtures)

RUNS = int(os.environ.get("STORE_CRASH_RUNS", "120"))
SEED = int(os.environ.get("STORE_CRASH_SEED", "20261123"))


def _timed(argv):
    start = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return time.monotonic() - start


def _run_killed(argv, delay):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def test_sigkill_at_random_points(tmp_path, make_tree, store_cmd):
    rng = random.Random(SEED)
    sources = []
    for i in range(3):
        src = tmp_path / ("src%d" % i)
        make_tree(src, 100 + i, files=30, shared_from=0, big=400000)
        sources.append(src)
    expected = {str(s): fsverity_digest.digest_bytes(build_image(build_tree_from_directory(str(s)))).hex()
                for s in sources}
    repo = tmp_path / "store"
    store, _ = Store.init(repo, notice=None)
    base = store_cmd + ["--repo", str(repo)]

    def add_argv(i):
        return base + ["add-image", str(sources[i]), "--ref", "src/%d" % i]

    # Durations to spread the kill points over: a cold add and a gc with work to do.
    add_time = _timed(add_argv(0))
    store.remove_ref("src/0")
    gc_time = _timed(base + ["gc", "--tmp-grace", "0"])
    assert store.list_images() == []

    kills = {"add": 0, "gc": 0}
    finished = 0
    debris = 0  # runs after which a kill had left temp files or an unreferenced image
    # At least RUNS runs; more (up to 3x) while too few kills landed inside a
    # command -- on a loaded machine a command can take longer than timed above.
    def enough() -> bool:
        return kills["add"] >= RUNS // 4 and kills["gc"] >= RUNS // 8

    run = -1
    while True:
        run += 1
        if run >= RUNS and (enough() or run >= 3 * RUNS):
            break
        what = "seed %d run %d" % (SEED, run)
        i = rng.randrange(len(sources))
        if rng.random() < 0.6:
            op = "add"
            if rng.random() < 0.5:
                # Start from a store without this image, so the add has objects to write.
                try:
                    store.remove_ref("src/%d" % i)
                except RefNotFound:
                    pass
                collect(store, tmp_grace=0)
            argv = add_argv(i)
            delay = rng.uniform(0, add_time * 1.1)
        else:
            op = "gc"
            for j in rng.sample(range(len(sources)), 2):
                try:
                    store.remove_ref("src/%d" % j)
                except RefNotFound:
                    pass
            argv = base + ["gc", "--tmp-grace", "0"]
            delay = rng.uniform(0, gc_time * 1.1)
        code = _run_killed(argv, delay)
        if code == -signal.SIGKILL:
            kills[op] += 1
        else:
            finished += 1
            assert code == 0, "%s: %s exited %d" % (what, op, code)

        report = check(store)
        assert report.clean, "%s after killing %s at %.3fs: %s" % (what, op, delay, report.errors)
        if report.notes or set(store.list_images()) - set(store.ref_targets().values()):
            debris += 1
        listed = sum(1 for _ in store.iter_objects())
        assert report.objects == listed, what  # every object was verified against its name
        for ref, target in store.ref_targets().items():
            assert target == expected[str(sources[int(ref.split("/")[1])])], what

        again = add_image(store, sources[i], "src/%d" % i)
        assert again.digest == expected[str(sources[i])], what
        assert store.read_ref("src/%d" % i) == again.digest
    assert check(store).clean
    # The kills must really have interrupted both commands, many times.
    assert enough(), (kills, finished, run)
    print("runs: %d, kills: %s, finished before the kill: %d, left debris: %d" % (run, kills, finished, debris))
