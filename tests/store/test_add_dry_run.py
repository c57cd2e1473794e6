# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""``add_image(dry_run=True)`` plans exactly the real add and writes nothing; ``expected_digest`` publishes
nothing on a mismatch."""
from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest

from composefs_fleet.dump import write_dump
from composefs_fleet.erofs_reader import read_image_file
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.errors import StoreError
from composefs_fleet.store import Store
from composefs_fleet.store_add import DigestMismatch, add_image
from composefs_fleet.store_fsck import check

from store_fixtures import make_tree, store  # noqa: F401  (fixtures)

PLANNED = ("digest", "ref", "previous", "source_kind", "image_written", "objects", "objects_written",
           "bytes_written", "files_hashed", "bytes_hashed", "cache_hits")


def snapshot(top: Path):
    """Every entry under ``top`` with what a write would change (not atime: reading is allowed)."""
    out = {}
    top_b = os.fsencode(top)
    for dirpath, dirnames, filenames in os.walk(top_b):
        for name in dirnames + filenames + [b""]:
            full = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(full)
            entry = (st.st_mode, st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                     st.st_ctime_ns)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    entry += (f.read(),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(full),)
            out[os.path.relpath(full, top_b)] = entry
    return out


def planned(result):
    return {k: getattr(result, k) for k in PLANNED}


def quiet(path: Path) -> None:
    """Let ``path``'s files age past the digest cache's racy window, so the cache records them."""
    time.sleep(1.1)


def dry_then_real(store: Store, source, ref: str, **options):
    """Dry run (asserting it writes nothing), then the real add; both results."""
    top = Path(os.fsdecode(store.path))
    before = snapshot(top)
    dry = add_image(store, source, ref, dry_run=True, **options)
    assert snapshot(top) == before, "the dry run wrote into the store"
    real = add_image(store, source, ref, **options)
    return dry, real


def test_directory_dry_run_on_a_fresh_store_predicts_the_add(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 21)
    top = Path(os.fsdecode(store.path))
    assert not (top / "lock").exists()  # nothing has taken the lock yet: the dry run must not create it
    dry, real = dry_then_real(store, src, "app")
    assert dry.objects_written > 0 and dry.image_written and dry.previous is None
    assert planned(dry) == planned(real)
    assert real.digest == build_tree_digest(src)
    assert check(store).clean


def build_tree_digest(src: Path) -> str:
    from composefs_fleet import fsverity_digest

    return fsverity_digest.digest_bytes(build_image(build_tree_from_directory(str(src)))).hex()


def test_directory_dry_run_uses_the_cache_and_sees_one_change(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 22)
    quiet(src)
    first = add_image(store, src, "app")
    cache = Path(os.fsdecode(store.cache_path))
    assert cache.is_file()  # a cache, lock files, objects, an image and a ref exist now
    dry, real = dry_then_real(store, src, "app")
    assert dry.files_hashed == 0 and dry.cache_hits == first.files_hashed > 0
    assert not dry.image_written and dry.objects_written == 0 and dry.previous == dry.digest == first.digest
    assert planned(dry) == planned(real)
    # One file changes: the dry run hashes only it, predicts one new object and the ref moving.
    victim = next(p for p in sorted(src.rglob("f*")) if p.is_file() and p.stat().st_size > 64)
    victim.write_bytes(victim.read_bytes() + b"!")
    dry, real = dry_then_real(store, src, "app")
    assert dry.files_hashed == 1 and dry.objects_written == 1 and dry.bytes_written == victim.stat().st_size
    assert dry.image_written and dry.previous == first.digest != dry.digest
    assert planned(dry) == planned(real)
    assert store.read_ref("app") == real.digest


def test_dump_and_image_sources_dry_run(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 23)
    first = add_image(store, src, "dir")
    out = io.BytesIO()
    write_dump(read_image_file(os.fsdecode(store.image_path(first.digest))), out)
    dump = tmp_path / "tree.dump"
    dump.write_bytes(out.getvalue())
    dry, real = dry_then_real(store, dump, "dump")
    assert dry.source_kind == "dump" and dry.digest == first.digest and not dry.image_written
    assert planned(dry) == planned(real)
    image = tmp_path / "copy.cfs"
    image.write_bytes(Path(os.fsdecode(store.image_path(first.digest))).read_bytes())
    dry, real = dry_then_real(store, image, "image")
    assert dry.source_kind == "image" and dry.digest == first.digest and dry.previous is None
    assert planned(dry) == planned(real)
    # Version 1 of the same tree is another image: new, no new objects.
    dry, real = dry_then_real(store, dump, "dump", min_version=1)
    assert dry.image_written and dry.digest != first.digest and dry.objects_written == 0
    assert planned(dry) == planned(real)


def test_image_with_objects_from_dry_run_counts_the_imports(tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 24)
    digest_store = tmp_path / "ds"
    image = tmp_path / "img.cfs"
    image.write_bytes(build_image(build_tree_from_directory(str(src), digest_store=str(digest_store))))
    store, _ = Store.init(tmp_path / "s", notice=None)
    top = Path(os.fsdecode(store.path))
    before = snapshot(top)
    with pytest.raises(StoreError, match="not in the store"):
        add_image(store, image, "x", dry_run=True)
    assert snapshot(top) == before
    dry, real = dry_then_real(store, image, "x", objects_from=digest_store)
    assert dry.objects_written == dry.objects > 0 and dry.bytes_written > 0
    assert planned(dry) == planned(real)
    assert check(store).clean


def test_dry_run_of_a_store_that_does_not_exist_yet(tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 25)
    where = tmp_path / "not-yet"
    dry = add_image(Store(where, notice=None), src, "app", dry_run=True)
    assert not where.exists()
    store, _ = Store.init(where, notice=None)
    real = add_image(store, src, "app")
    assert planned(dry) == planned(real)


def test_expected_digest_mismatch_publishes_nothing(store, tmp_path, make_tree):
    other = tmp_path / "other"
    make_tree(other, 26)
    add_image(store, other, "other")  # lock files and a cache exist: the snapshot sees any write
    src = tmp_path / "src"
    make_tree(src, 27)
    right = build_tree_digest(src)
    wrong = "ab" * 32
    top = Path(os.fsdecode(store.path))
    before = snapshot(top)
    for dry_run in (True, False):
        with pytest.raises(DigestMismatch, match="nothing was stored") as info:
            add_image(store, src, "app", expected_digest=wrong, dry_run=dry_run)
        assert info.value.actual == right and info.value.expected == wrong
        assert snapshot(top) == before
    with pytest.raises(StoreError, match="invalid digest"):
        add_image(store, src, "app", expected_digest="xyz")
    # The right digest (any case) goes through, with the objects copied after the check.
    result = add_image(store, src, "app", expected_digest=right.upper())
    assert result.digest == right and result.objects_written > 0
    assert store.read_ref("app") == right
    assert check(store).clean


def test_expected_digest_matches_the_pipelined_add(tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 28)
    a, _ = Store.init(tmp_path / "a", notice=None)
    b, _ = Store.init(tmp_path / "b", notice=None)
    plain = add_image(a, src, "x", use_cache=False)
    checked = add_image(b, src, "x", use_cache=False, expected_digest=plain.digest)
    assert planned(plain) == planned(checked)
    assert sorted(h for h, _p, _s in a.iter_objects()) == sorted(h for h, _p, _s in b.iter_objects())
    assert check(b).clean


def test_unchanged_ref_is_not_rewritten(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 29)
    add_image(store, src, "app")
    ref = Path(os.fsdecode(store.refs_dir)) / "app"
    st = ref.stat()
    again = add_image(store, src, "app")
    assert again.previous == again.digest
    assert ref.stat().st_ino == st.st_ino and ref.stat().st_mtime_ns == st.st_mtime_ns


def test_no_change_add_writes_nothing(store, tmp_path, make_tree):
    src = tmp_path / "src"
    make_tree(src, 30)
    quiet(src)
    first = add_image(store, src, "app")
    top = Path(os.fsdecode(store.path))
    before = snapshot(top)
    again = add_image(store, src, "app")
    assert again.digest == first.digest and again.files_hashed == 0
    assert snapshot(top) == before  # no object, image, ref or cache rewritten


def test_dry_run_waits_for_a_running_gc(tmp_path, make_tree):
    """The plan holds the store lock shared (read-only), so a sweep cannot remove what it counts as present."""
    import threading

    src = tmp_path / "src"
    make_tree(src, 31)
    waiting = threading.Event()
    store, _ = Store.init(tmp_path / "s", notice=lambda message: waiting.set())
    add_image(store, src, "app")  # creates the lock files
    results = []
    with store.lock.exclusive():
        worker = threading.Thread(target=lambda: results.append(add_image(store, src, "app", dry_run=True)))
        worker.start()
        assert waiting.wait(30), "the dry run did not wait for the exclusive lock"
        assert worker.is_alive() and results == []
    worker.join(60)
    assert not worker.is_alive() and results[0].previous == results[0].digest
