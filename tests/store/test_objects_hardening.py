# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Objects and images are written, read and moved only where they belong (issue 13, "Harden").

* a symbolic link where ``objects/XX`` belongs never sends a write outside
  (add-image, ``mkcomposefs --digest-store``);
* a FIFO or a device planted as an object never hangs fsck or
  ``add-image --objects-from``: it is damage (moved by ``--repair``) or refused;
* ``fsck --repair`` never moves anything outside (a symlinked ``damaged/``);
* a wrong size in a dump blames the dump, not a good object; a full disk
  names what was being written where, and leaves no temp file;
* one worker-pool policy: a worker that dies never aborts fsck.
"""
from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from composefs_fleet.dump import parse_dump, write_dump
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.errors import ComposefsError, StoreError
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.image_needs import image_objects
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check

from store_fixtures import store, store_argv, write_tree  # noqa: F401  (fixtures)

try:
    from composefs_fleet.fsverity_digest import digest_bytes
except ImportError:  # 1f1a0a7, where these tests are shown to fail
    from composefs_fleet.fsverity import digest_bytes  # type: ignore[no-redef]

HANG_LIMIT = 60  # seconds: far beyond what these tiny stores need, short of "forever"


def needed_objects(src: Path) -> dict:
    """{hex: size} of the objects the image of ``src`` refers to."""
    return image_objects(build_tree_from_directory(str(src))).objects


def cli(repo: Path, *args: object) -> "subprocess.CompletedProcess[str]":
    """composefs-store in a subprocess that may not hang (the old code hashed /dev/zero forever)."""
    return subprocess.run(store_argv() + ["--repo", str(repo)] + [str(a) for a in args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=HANG_LIMIT)


def plant(path: Path, kind: str) -> None:
    """A FIFO or /dev/zero's device number where a regular file belongs."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(str(path), 0o644)
    else:
        os.mknod(str(path), stat.S_IFCHR | 0o644, os.makedev(1, 5))


def files_below(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- B: a symlinked objects/XX is refused, never written through -----------------

def test_add_image_refuses_a_symlinked_object_dir(store, tmp_path):
    src = tmp_path / "src"
    write_tree(src, seed=1)
    prefix = sorted(needed_objects(src))[0][:2]
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), os.path.join(store.objects_dir, prefix.encode()))
    with pytest.raises(ComposefsError, match="objects/%s is a symbolic link where a directory belongs" % prefix):
        add_image(store, src, "app")
    assert files_below(outside) == []
    assert not [n for n in os.listdir(store.objects_dir) if n.startswith(b".tmp")]


def test_digest_store_refuses_a_symlinked_object_dir(tmp_path):
    src = tmp_path / "src"
    write_tree(src, seed=2)
    prefix = sorted(needed_objects(src))[0][:2]
    digest_store = tmp_path / "ds"
    digest_store.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (digest_store / prefix).symlink_to(outside)
    with pytest.raises(ComposefsError, match="%s is a symbolic link where a directory belongs: refused"
                       % (digest_store / prefix)):
        build_tree_from_directory(str(src), digest_store=str(digest_store))
    assert files_below(outside) == []
    # The store directory itself is the user's and may be a symbolic link.
    (digest_store / prefix).unlink()
    link = tmp_path / "ds-link"
    link.symlink_to(digest_store)
    build_tree_from_directory(str(src), digest_store=str(link))
    assert sorted(p.name for p in digest_store.iterdir()) == sorted({h[:2] for h in needed_objects(src)})


def test_new_object_dirs_take_the_store_mode(store, tmp_path, monkeypatch):
    """--digest-store makes 0755 directories like C; a store's new XX get the mode of its objects/."""
    old = os.umask(0o022)
    try:
        os.chmod(store.objects_dir, 0o700)
        src = tmp_path / "src"
        write_tree(src, seed=3)
        add_image(store, src, "app")
        modes = {stat.S_IMODE(os.lstat(os.path.join(store.objects_dir, n)).st_mode)
                 for n in os.listdir(store.objects_dir)}
        assert modes == {0o700}
        build_tree_from_directory(str(src), digest_store=str(tmp_path / "ds"))
        modes = {stat.S_IMODE(p.lstat().st_mode) for p in (tmp_path / "ds").iterdir()}
        assert modes == {0o755}
    finally:
        os.umask(old)


# -- C: FIFOs and devices planted as objects never hang anything -------------------

@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_fsck_reports_and_repair_moves_a_planted_fifo_or_device(store, tmp_path, kind):
    src = tmp_path / "src"
    write_tree(src, seed=4)
    add_image(store, src, "app")
    victim = sorted(needed_objects(src))[0]
    path = Path(os.fsdecode(store.object_path(victim)))
    plant(path, kind)
    proc = cli(tmp_path / "store", "fsck")
    assert proc.returncode == 1, proc.stderr
    shown = "objects/%s/%s" % (victim[:2], victim[2:])
    assert "%s: not a regular file (%s" % (shown, "FIFO" if kind == "fifo" else "character device") in proc.stdout
    proc = cli(tmp_path / "store", "fsck", "--repair")
    assert not path.exists() and not path.is_symlink()
    moved = os.listdir(os.fsdecode(store.damaged_dir))
    assert len(moved) == 1 and moved[0].startswith("objects_%s_%s." % (victim[:2], victim[2:]))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_objects_from_refuses_a_planted_fifo_or_device(store, tmp_path, kind):
    src = tmp_path / "src"
    write_tree(src, seed=5)
    digest_store = tmp_path / "ds"
    image = tmp_path / "img.cfs"
    image.write_bytes(build_image(build_tree_from_directory(str(src), digest_store=str(digest_store))))
    victim = sorted(needed_objects(src))[0]
    plant(digest_store / victim[:2] / victim[2:], kind)
    proc = cli(tmp_path / "store", "add-image", image, "--ref", "app", "--objects-from", digest_store)
    assert proc.returncode == 1
    assert "%s is not a regular file" % (digest_store / victim[:2] / victim[2:]) in proc.stderr, proc.stderr
    assert store.list_refs() == []


# -- D: fsck --repair moves nothing outside the store ------------------------------

def _damage_one_object(store: Store, tmp_path: Path) -> str:
    src = tmp_path / "src"
    write_tree(src, seed=6)
    add_image(store, src, "app")
    victim = sorted(needed_objects(src))[0]
    path = store.object_path(victim)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"garbage")
    return victim


def test_repair_refuses_a_symlinked_damaged_dir(store, tmp_path):
    victim = _damage_one_object(store, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), store.damaged_dir)
    # Refused, whether the store's own check says so or the move does.
    try:
        errors = check(store, repair=True).errors
    except ComposefsError as exc:
        errors = [str(exc)]
    assert any("damaged is a symbolic link where a directory belongs: refused" in e for e in errors), errors
    assert files_below(outside) == []
    assert os.path.exists(store.object_path(victim))


def test_repair_makes_damaged_0700_and_moves_a_symlinked_object_dir_itself(store, tmp_path):
    victim = _damage_one_object(store, tmp_path)
    outside = tmp_path / "outside" / "ff"
    outside.mkdir(parents=True)
    (outside / ("0" * 62)).write_bytes(b"not ours")
    os.symlink(str(outside), os.path.join(store.objects_dir, b"ff"))
    result = check(store, repair=True)
    assert any("objects/ff: not an object directory XX (symbolic link)" in e for e in result.errors), result.errors
    assert stat.S_IMODE(os.lstat(store.damaged_dir).st_mode) == 0o700
    moved = sorted(os.listdir(os.fsdecode(store.damaged_dir)))
    assert len(moved) == 2 and any(n.startswith("objects_ff.") for n in moved)
    assert any(n.startswith("objects_%s_%s." % (victim[:2], victim[2:])) for n in moved)
    # The link was moved, not what it pointed at.
    assert files_below(tmp_path / "outside") == ["ff", "ff/" + "0" * 62]
    link = [n for n in moved if n.startswith("objects_ff.")][0]
    assert os.path.islink(os.path.join(os.fsdecode(store.damaged_dir), link))


# -- E: messages that say who is wrong and where ----------------------------------------

def test_dump_with_a_wrong_size_blames_the_dump_not_a_good_object(store, tmp_path):
    src = tmp_path / "src"
    write_tree(src, seed=7)
    add_image(store, src, "app")
    root = build_tree_from_directory(str(src))
    victim_path, victim = next((p, n) for p, n in root.walk() if n.is_reg() and n.digest is not None)
    good_size = victim.size
    victim.size += 1
    out = io.BytesIO()
    write_dump(root, out)
    with pytest.raises(StoreError) as info:
        add_image(store, "-", "bad", stdin=io.BytesIO(out.getvalue()))
    message = str(info.value)
    hexd = victim.digest.hex()
    assert "the dump gives object %s a size of %d bytes" % (hexd, good_size + 1) in message
    assert "the stored object has %d bytes" % good_size in message
    assert "the object is fine" in message and "fsck" not in message
    assert check(store).clean
    # A really damaged object is still called damaged.
    path = store.object_path(hexd)
    os.chmod(path, 0o644)
    with open(path, "ab") as f:
        f.write(b"xy")  # neither the stored nor the dump's size
    parse_dump(io.BytesIO(out.getvalue()))  # the dump itself is fine
    with pytest.raises(StoreError, match="does not match its digest: it is damaged, run 'fsck --repair'"):
        add_image(store, "-", "bad", stdin=io.BytesIO(out.getvalue()))


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.kernel
def test_disk_full_names_what_was_written_where_and_leaves_no_temp(small_tmpfs, tmp_path):
    store, _created = Store.init(small_tmpfs / "store", notice=None)
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3 << 20)
    (src / "big").write_bytes(big)
    hexd = digest_bytes(big).hex()
    with pytest.raises(OSError) as info:
        add_image(store, src, "app")
    assert info.value.errno in (errno.ENOSPC, errno.EDQUOT)
    message = str(info.value)
    assert "object %s/%s (%d bytes)" % (hexd[:2], hexd[2:], len(big)) in message, message
    assert os.fsdecode(store.objects_dir) in message
    assert [n for n in os.listdir(store.objects_dir) if n.startswith(b".tmp")] == []
    # An image too large for the disk: named, and no temp file left.
    image = os.urandom(2 << 20)
    with pytest.raises(OSError) as info:
        store.write_image(image)
    assert "image images/%s" % digest_bytes(image).hex() in str(info.value)
    assert os.fsdecode(store.path) in str(info.value)
    assert os.listdir(store.images_dir) == []
    # mkcomposefs --digest-store says the same.
    with pytest.raises(OSError) as info:
        build_tree_from_directory(str(src), digest_store=str(small_tmpfs / "ds"))
    assert "object %s/%s" % (hexd[:2], hexd[2:]) in str(info.value)
    assert str(small_tmpfs / "ds") in str(info.value) and "big" in str(info.value)
    assert [n for n in os.listdir(str(small_tmpfs / "ds")) if n.startswith(".tmp")] == []


# -- A: one worker-pool policy: a dead worker never aborts anything ---------------------

def _die_in_worker(job):
    """Module-level (picklable) job function that kills the worker process running it."""
    if os.getpid() != _PARENT[0]:
        os._exit(3)
    return _REAL[0](job)


def _die_in_worker_at_f20(job):
    """store_add's job function, killing the worker that gets file f20 (after others have been hashed)."""
    if os.getpid() != _PARENT[0] and job[0].endswith(b"/f20"):
        os._exit(3)
    return _REAL[0](job)


_PARENT = [0]
_REAL: list = []


def _kill_workers(monkeypatch, module, name: str, killer, old_threshold: str) -> None:
    """Replace ``module.name`` (a hash_pool job function) by ``killer``, and always use worker processes."""
    _PARENT[0] = os.getpid()
    _REAL[:] = [getattr(module, name)]
    # Pickled by name: the workers look module.name up and find the killer.
    monkeypatch.setattr(killer, "__module__", module.__name__)
    monkeypatch.setattr(killer, "__qualname__", name)
    monkeypatch.setattr(module, name, killer)
    try:
        from composefs_fleet import hash_pool

        monkeypatch.setattr(hash_pool, "PROCESS_MIN_BYTES", 0)
    except ImportError:  # 1f1a0a7: one threshold per module
        monkeypatch.setattr(module, old_threshold, 0)


def test_fsck_survives_a_dying_worker(store, tmp_path, monkeypatch):
    """Like add-image and mkcomposefs, fsck hashes in-process when a worker dies (it used to abort)."""
    from composefs_fleet import store_fsck

    src = tmp_path / "src"
    write_tree(src, seed=8, files=30)
    add_image(store, src, "app")
    _kill_workers(monkeypatch, store_fsck, "_digest_job", _die_in_worker, "_PARALLEL_MIN_BYTES")
    result = check(store, threads=2)
    assert result.clean, result.errors
    assert result.objects == len(needed_objects(src))


def test_add_image_survives_a_worker_dying_midway(store, tmp_path, monkeypatch):
    """The digests hashed in-process after a worker died line up with their files (they used to restart at 0)."""
    from composefs_fleet import store_add

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / ("f%02d" % i)).write_bytes(os.urandom(20000 + i))
    _kill_workers(monkeypatch, store_add, "_hash_one", _die_in_worker_at_f20, "_PROCESS_MIN_BYTES")
    result = add_image(store, src, "app", threads=2, use_cache=False)
    assert result.digest == digest_bytes(build_image(build_tree_from_directory(str(src)))).hex()
    assert result.files_hashed == 40 and check(store).clean


def test_agent_quarantine_refuses_a_symlinked_damaged_dir(store, tmp_path):
    from composefs_fleet_agent.checks import quarantine

    victim = _damage_one_object(store, tmp_path)
    path = os.fsdecode(store.object_path(victim))
    st = os.lstat(path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), store.damaged_dir)
    with pytest.raises(ComposefsError, match="damaged is a symbolic link where a directory belongs: refused"):
        quarantine(path, os.fsdecode(store.objects_dir), victim, st)
    assert files_below(outside) == [] and os.path.exists(path)
    # With a real damaged/ (made 0700) the object goes there.
    os.unlink(store.damaged_dir)
    dest = quarantine(path, os.fsdecode(store.objects_dir), victim, st)
    assert dest is not None and os.path.dirname(dest) == os.fsdecode(store.damaged_dir)
    assert os.path.isfile(dest) and not os.path.exists(path)
    assert stat.S_IMODE(os.lstat(store.damaged_dir).st_mode) == 0o700
