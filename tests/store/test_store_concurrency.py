# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Stress: adds, ref removals and gcs in parallel processes, then every ref must be whole.

Three adder processes add five overlapping trees under five refs, one process
removes random refs (so gc has garbage that shares objects with adds in
flight) and one runs gc in a loop, for STORE_STRESS_SECONDS (default 20).
Afterwards every ref's image has all its objects (composefs-info
missing-objects is empty, fsck is clean) and mounts with the content of its
source tree.  STORE_STRESS_NO_LOCK=1 makes the adders skip the lock: the
test then fails (missing objects), which shows it can catch the race.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from composefs_fleet import fsverity_digest
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check

from store_fixtures import make_tree, store_cmd  # noqa: F401  (fixtures)

SECONDS = float(os.environ.get("STORE_STRESS_SECONDS", "20"))
SOURCES = 5

WORKER = r"""
import json, os, random, sys, time
from composefs_fleet.errors import RefNotFound
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_gc import collect

role, repo, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
sources = json.loads(sys.argv[5])
store = Store.open(repo, notice=None)
if os.environ.get("STORE_STRESS_NO_LOCK") and role == "add":
    # Self-check of this test: without the lock it must fail.
    import contextlib
    store.lock.shared = contextlib.nullcontext
rng = random.Random(seed)
deadline = time.monotonic() + seconds
done = 0
while time.monotonic() < deadline:
    if role == "add":
        i = rng.randrange(len(sources))
        add_image(store, sources[i], "r/%d" % i, use_cache=rng.random() < 0.5)
    elif role == "rm":
        try:
            store.remove_ref("r/%d" % rng.randrange(len(sources)))
        except RefNotFound:
            pass
        time.sleep(rng.uniform(0, 0.05))
    else:
        collect(store, tmp_grace=0)
    done += 1
print(json.dumps({"role": role, "done": done}))
"""


@pytest.fixture(scope="module")
def stressed(tmp_path_factory, make_tree):
    base = tmp_path_factory.mktemp("stress")
    sources = []
    for i in range(SOURCES):
        src = base / ("src%d" % i)
        make_tree(src, 500 + i, files=25, shared_from=i % 2, big=300000)
        sources.append(str(src))
    expected = {fsverity_digest.digest_bytes(build_image(build_tree_from_directory(s))).hex(): s for s in sources}
    repo = base / "store"
    Store.init(repo, notice=None)
    roles = ["add", "add", "add", "rm", "gc"]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, role, str(repo), str(SECONDS), str(n),
                               json.dumps(sources)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, role in enumerate(roles)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=SECONDS + 300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    # Make sure there is at least one ref to check, whatever the last remover did.
    store = Store.open(repo, notice=None)
    if not store.list_refs():
        add_image(store, sources[0], "r/0")
    return store, expected, results


def test_stress_every_ref_complete(stressed, ours):
    store, expected, results = stressed
    counts = {}
    for r in results:
        counts[r["role"]] = counts.get(r["role"], 0) + r["done"]
    # The workers really interleaved: many adds and many gcs.
    assert counts["add"] >= 10 and counts["gc"] >= 5, counts
    refs = store.ref_targets()
    assert refs
    for ref, digest in refs.items():
        assert digest in expected, ref
        res = ours.run("composefs-info", "--basedir=" + os.fsdecode(store.objects_dir), "missing-objects",
                       os.fsdecode(store.image_path(digest)))
        assert res.returncode == 0 and res.stdout == b"", (ref, res.stdout[:300], res.stderr)
    report = check(store)
    assert report.clean, report.errors
    print("stress: %s; refs at the end: %d" % (counts, len(refs)))


@pytest.mark.kernel
def test_stress_every_ref_mounts(stressed, kernel_mount, tmp_path):
    store, expected, _results = stressed
    for n, (ref, digest) in enumerate(sorted(store.ref_targets().items())):
        target = kernel_mount.mount_composefs(Path(os.fsdecode(store.image_path(digest))), tmp_path / ("m%d" % n),
                                              Path(os.fsdecode(store.objects_dir)))
        src = Path(expected[digest])
        files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file() and not p.is_symlink())
        assert files
        for rel in files:
            assert (target / rel).read_bytes() == (src / rel).read_bytes(), (ref, rel)
        assert os.readlink(target / "link") == os.readlink(src / "link")


def test_two_adds_of_the_same_content_at_once(tmp_path, make_tree, store_cmd):
    src = tmp_path / "src"
    make_tree(src, 77, files=40, big=500000)
    repo = tmp_path / "store"
    store, _ = Store.init(repo, notice=None)
    procs = [subprocess.Popen(store_cmd + ["--repo", str(repo), "add-image", str(src), "--ref", ref],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for ref in ("one", "two", "three")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _out, err in outs]
    digests = {out.split()[0] for out, _err in outs}
    assert len(digests) == 1 and store.list_images() == sorted(digests)
    expected = fsverity_digest.digest_bytes(build_image(build_tree_from_directory(str(src)))).hex()
    assert digests == {expected}
    from composefs_fleet.image_needs import image_objects

    needed = image_objects(store.read_image(expected))
    assert sorted(h for h, _p, _st in store.iter_objects()) == sorted(needed.objects)
    report = check(store)
    assert report.clean and not report.notes, (report.errors, report.notes)  # stored once, no debris
