# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Digest store (``mkcomposefs --digest-store``): naming, atomicity, reuse, C parity."""

from __future__ import annotations

import errno
import os
import shutil
import random
import stat
import subprocess
import threading
import time

import pytest

from composefs_fleet import file_copy, fsverity_digest, fsverity_ioctl, objects
from composefs_fleet.errors import FormatError, VerityError, VerityNotSupported
from composefs_fleet.objects import object_path, store_object
from composefs_fleet.safe_dirs import UnsafePathError
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.tree import digest_to_path


def _data(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(size))


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def store_files(store) -> dict:
    """Relative path -> (mode, bytes) of every non-directory below ``store``."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames:
            assert stat.S_IMODE(os.lstat(os.path.join(dirpath, name)).st_mode) == 0o755
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, store)] = (stat.S_IMODE(os.lstat(path).st_mode), f.read())
    return found


def make_src(root) -> None:
    os.makedirs(os.path.join(root, "a/b"))
    sizes = (0, 1, 64, 65, 4096, 4097, 100000, 300000)
    for i, size in enumerate(sizes):
        _write(os.path.join(root, "f%d" % size), _data(size, i))
    _write(os.path.join(root, "a/same-as-f65"), _data(65, 3))
    _write(os.path.join(root, "a/b/other"), _data(7000, 99))
    os.symlink("f65", os.path.join(root, "link"))
    os.link(os.path.join(root, "f4096"), os.path.join(root, "a/hard"))


@pytest.fixture(autouse=True)
def fresh_verity_cache(monkeypatch):
    # The real kernel's "not supported" answers are cached per filesystem.
    monkeypatch.setattr(fsverity_ioctl, "unsupported_devs", {})


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.oracle
def test_store_equals_c_digest_store(oracle, tmp_path, umask022):
    src = tmp_path / "src"
    make_src(str(src))
    c_store = tmp_path / "c" / "store"  # parents are created too, as in C
    proc = subprocess.run(oracle.argv("mkcomposefs") + ["--digest-store=%s" % c_store, str(src),
                                                        str(tmp_path / "c.img")], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    ours = tmp_path / "o" / "store"
    tree = build_tree_from_directory(src, digest_store=ours, threads=3)
    expected = store_files(c_store)
    got = store_files(ours)
    assert got == expected
    assert len(got) == 6  # >64 bytes, deduplicated; inline and empty files are not stored
    for rel, (mode, content) in got.items():
        assert mode == 0o644
        assert rel == digest_to_path(fsverity_digest.digest_bytes(content)).decode()
    payloads = {n.payload.decode() for _p, n in tree.walk() if n.is_reg() and n.payload}
    assert payloads == set(got)
    assert stat.S_IMODE(os.stat(tmp_path / "o").st_mode) == 0o755


def test_existing_objects_are_reused(tmp_path):
    src = tmp_path / "src"
    make_src(str(src))
    store = tmp_path / "store"
    build_tree_from_directory(src, digest_store=store)
    before = {p: os.lstat(store / p) for p in store_files(store)}
    build_tree_from_directory(src, digest_store=store, threads=2)
    after = {p: os.lstat(store / p) for p in store_files(store)}
    assert before.keys() == after.keys()
    for path, st in before.items():
        assert (st.st_ino, st.st_mtime_ns) == (after[path].st_ino, after[path].st_mtime_ns)
    assert not [n for n in os.listdir(store) if n.startswith(".tmp")]


def test_store_object_from_path_and_fd(tmp_path):
    data = _data(10000, 5)
    src = tmp_path / "f"
    _write(src, data)
    digest = fsverity_digest.digest_bytes(data)
    store = tmp_path / "store"
    assert store_object(src, digest, store) is True
    target = object_path(store, digest)
    assert target == os.path.join(os.fsencode(store), digest_to_path(digest))
    with open(target, "rb") as f:
        assert f.read() == data
    assert store_object(src, digest, store) is False
    os.unlink(target)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.lseek(fd, 1234, os.SEEK_SET)
        assert store_object(fd, digest, str(store), size=len(data)) is True
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1234  # positional I/O only
    finally:
        os.close(fd)
    with open(target, "rb") as f:
        assert f.read() == data
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o644


def test_bad_digest_and_size(tmp_path):
    src = tmp_path / "f"
    _write(src, b"x" * 100)
    store = tmp_path / "store"
    with pytest.raises(FormatError):
        store_object(src, b"\0" * 31, store)
    digest = fsverity_digest.digest_bytes(b"x" * 100)
    with pytest.raises(FormatError, match="expected 99"):
        store_object(src, digest, store, size=99)
    assert not os.path.exists(object_path(store, digest))
    # No temp file left; XX directories are made only when an object is published.
    assert os.listdir(store) == []


def test_store_subdir_that_is_a_file(tmp_path):
    data = b"y" * 100
    digest = fsverity_digest.digest_bytes(data)
    store = tmp_path / "store"
    store.mkdir()
    _write(store / digest.hex()[:2], b"not a dir")
    _write(tmp_path / "f", data)
    with pytest.raises(UnsafePathError, match="%s is not a directory" % (store / digest.hex()[:2])):
        store_object(tmp_path / "f", digest, store)
    assert os.listdir(store) == [digest.hex()[:2]]  # no temp file left


def test_failure_mid_copy_leaves_nothing(tmp_path, monkeypatch):
    data = _data(50000, 8)
    _write(tmp_path / "f", data)
    digest = fsverity_digest.digest_bytes(data)
    store = tmp_path / "store"

    def half_then_fail(src, dst, size=None):
        os.pwrite(dst, data[:20000], 0)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_copy, "copy_data", half_then_fail)
    with pytest.raises(OSError) as info:
        store_object(tmp_path / "f", digest, store)
    assert info.value.errno == errno.ENOSPC
    # The message names the object and the store it was written into.
    assert "object %s/%s" % (digest.hex()[:2], digest.hex()[2:]) in str(info.value)
    assert str(store) in str(info.value)
    assert os.listdir(store) == []

    # The same through the scanner: the error names the source file.
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "big", data)
    with pytest.raises(OSError) as info:
        build_tree_from_directory(src, digest_store=store)
    assert info.value.errno == errno.ENOSPC and "big" in str(info.value)
    assert not any(files for _d, _s, files in os.walk(store))


def test_interrupt_during_fsync_removes_temp(tmp_path, monkeypatch):
    _write(tmp_path / "f", b"q" * 100)
    digest = fsverity_digest.digest_bytes(b"q" * 100)

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        store_object(tmp_path / "f", digest, tmp_path / "store")
    monkeypatch.undo()
    assert not any(files for _d, _s, files in os.walk(tmp_path / "store"))


@pytest.mark.parametrize("path", ["ficlone", "copy_file_range", "read_write", "cfr_returns_zero"])
def test_copy_strategies(tmp_path, monkeypatch, path):
    data = _data(3 * 1024 * 1024 + 17, 11)
    _write(tmp_path / "f", data)
    digest = fsverity_digest.digest_bytes(data)
    used = []
    real_ioctl = file_copy.fcntl.ioctl
    real_cfr = os.copy_file_range

    def ioctl(fd, request, arg, *rest):
        if request == file_copy.FICLONE:
            used.append("ficlone")
            if path == "ficlone":
                # Pretend the filesystem reflinks: do the copy ourselves.
                os.pwrite(fd, data, 0)
                return 0
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_ioctl(fd, request, arg, *rest)

    def cfr(src, dst, count, offset_src=None, offset_dst=None):
        used.append("cfr")
        if path == "read_write":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if path == "cfr_returns_zero":
            return 0
        return real_cfr(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(file_copy.fcntl, "ioctl", ioctl)
    monkeypatch.setattr(os, "copy_file_range", cfr)
    monkeypatch.setattr(file_copy, "use_copy_file_range", True)
    assert store_object(tmp_path / "f", digest, tmp_path / "store", size=len(data))
    with open(object_path(tmp_path / "store", digest), "rb") as f:
        assert f.read() == data
    assert used[0] == "ficlone"
    if path == "ficlone":
        assert used == ["ficlone"]
    if path == "read_write":
        assert file_copy.use_copy_file_range is False  # EXDEV: not tried again this run


def test_verity_not_supported_is_ignored(tmp_path, monkeypatch):
    calls = []

    def enable(fd, *a, **kw):
        calls.append(fd)
        raise VerityNotSupported("no fs-verity here")

    monkeypatch.setattr(fsverity_ioctl, "enable_verity", enable)
    _write(tmp_path / "f", b"v" * 100)
    assert store_object(tmp_path / "f", fsverity_digest.digest_bytes(b"v" * 100), tmp_path / "s")
    assert len(calls) == 1
    # Asked once per filesystem, not once per object.
    _write(tmp_path / "g", b"w" * 100)
    assert store_object(tmp_path / "g", fsverity_digest.digest_bytes(b"w" * 100), tmp_path / "s")
    assert len(calls) == 1


def test_verity_other_error_is_raised(tmp_path, monkeypatch):
    # Was a RuntimeWarning and an object published without the fs-verity a
    # verity=require mount needs; now the error the store and verity module give.
    def enable(fd, *a, **kw):
        raise VerityError("FS_IOC_ENABLE_VERITY failed: no space")

    monkeypatch.setattr(fsverity_ioctl, "enable_verity", enable)
    _write(tmp_path / "f", b"v" * 100)
    digest = fsverity_digest.digest_bytes(b"v" * 100)
    with pytest.raises(VerityError, match="no space") as raised:
        store_object(tmp_path / "f", digest, tmp_path / "s")
    assert "/.tmp" in str(raised.value)  # names the file
    assert not os.path.exists(object_path(tmp_path / "s", digest))
    assert not any(files for _d, _s, files in os.walk(tmp_path / "s"))


def test_verity_enabled_with_wrong_digest_is_refused(tmp_path, monkeypatch):
    def enable(fd, *a, **kw):
        # Read-only fd and no writer left: what FS_IOC_ENABLE_VERITY needs.
        assert os.fstat(fd).st_mode & 0o777 == 0o644
        return True

    monkeypatch.setattr(fsverity_ioctl, "enable_verity", enable)
    monkeypatch.setattr(fsverity_ioctl, "measure_verity", lambda fd: ("sha256", b"\1" * 32))
    _write(tmp_path / "f", b"v" * 100)
    digest = fsverity_digest.digest_bytes(b"v" * 100)
    with pytest.raises(VerityError, match="does not match"):
        store_object(tmp_path / "f", digest, tmp_path / "s")
    assert not any(files for _d, _s, files in os.walk(tmp_path / "s"))
    monkeypatch.setattr(fsverity_ioctl, "measure_verity", lambda fd: ("sha256", digest))
    assert store_object(tmp_path / "f", digest, tmp_path / "s")


def test_concurrent_writers_of_one_object(tmp_path, monkeypatch):
    data = _data(200000, 4)
    _write(tmp_path / "f", data)
    digest = fsverity_digest.digest_bytes(data)
    store = tmp_path / "store"
    # Make every writer pass the existence check before any renames.
    barrier = threading.Barrier(8)
    real_copy = file_copy.copy_data

    def slow_copy(src, dst, size=None):
        barrier.wait(timeout=30)
        real_copy(src, dst, size)

    monkeypatch.setattr(file_copy, "copy_data", slow_copy)
    results, errors = [], []

    def writer():
        try:
            results.append(store_object(tmp_path / "f", digest, store))
        except BaseException as exc:  # noqa: B902 - collected for the assert
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [True] * 8
    assert store_files(store) == {digest_to_path(digest).decode(): (0o644, data)}


def test_directories_are_synced(tmp_path, monkeypatch):
    synced = []
    real = objects._fsync_dir
    monkeypatch.setattr(objects, "_fsync_dir", lambda fd, p: (synced.append(p), real(fd, p)))
    _write(tmp_path / "f", b"s" * 100)
    digest = fsverity_digest.digest_bytes(b"s" * 100)
    store = os.fsencode(tmp_path / "store")
    store_object(tmp_path / "f", digest, store)
    # The object's directory, then the store (its new XX entry was made
    # durable by safe_dirs.ensure_dir already).
    assert synced == [os.path.join(store, digest.hex()[:2].encode()), store]
    # The scanner syncs once at the end instead of per object: each directory
    # when there are few, one syncfs() of the store's filesystem for many.
    src = tmp_path / "src"
    src.mkdir()
    synced_fs = []
    real_syncfs = objects._syncfs
    monkeypatch.setattr(objects, "_syncfs", lambda fd: (synced_fs.append(store), real_syncfs(fd))[1])
    for count in (3, 30):
        shutil.rmtree(src)
        src.mkdir()
        contents = [_data(100 + count, i) for i in range(count)]
        for i, data in enumerate(contents):
            _write(src / ("f%d" % i), data)
        synced.clear()
        synced_fs.clear()
        build_tree_from_directory(src, digest_store=store, threads=2)
        prefixes = {fsverity_digest.digest_bytes(d).hex()[:2].encode() for d in contents}
        # The first syncfs() makes the staged data durable before any rename.
        if len(prefixes) > objects._SYNCFS_THRESHOLD:
            assert synced_fs == [store, store] and synced == []
        else:
            assert synced_fs == [store]
            assert sorted(synced) == sorted([os.path.join(store, p) for p in prefixes] + [store])


def _temps(store) -> list:
    return sorted(n for n in os.listdir(store) if n.startswith(".tmp"))


def test_batch_stages_then_publishes(tmp_path):
    store = tmp_path / "store"
    contents = [_data(5000 + i, i) for i in range(5)]
    digests = [fsverity_digest.digest_bytes(d) for d in contents]
    for i, data in enumerate(contents):
        _write(tmp_path / ("f%d" % i), data)
    # One object is in the store already: the batch must not stage it again.
    store_object(tmp_path / "f0", digests[0], store)
    batch = objects.ObjectBatch(store)
    added = []
    for i in range(5):
        fd = os.open(tmp_path / ("f%d" % i), os.O_RDONLY)
        try:
            added.append(batch.add(fd, digests[i], size=len(contents[i])))
            # The same content twice in one batch is staged once.
            added.append(batch.add(fd, digests[i], size=len(contents[i])))
        finally:
            os.close(fd)
    assert added == [False, False, True, False, True, False, True, False, True, False]
    # Staged objects are invisible until commit: only temp files exist.
    assert len(_temps(store)) == 4
    for d in digests[1:]:
        assert not os.path.exists(object_path(store, d))
    batch.commit()
    assert _temps(store) == []
    assert sorted(batch.written) == sorted(digests[1:])
    assert store_files(store) == {digest_to_path(d).decode(): (0o644, c) for d, c in zip(digests, contents)}


def test_batch_abort_and_failed_commit_leave_no_temps(tmp_path, monkeypatch):
    store = tmp_path / "store"
    contents = [_data(3000 + i, 40 + i) for i in range(4)]
    digests = [fsverity_digest.digest_bytes(d) for d in contents]
    paths = []
    for i, data in enumerate(contents):
        paths.append(tmp_path / ("f%d" % i))
        _write(paths[-1], data)

    def stage(batch):
        for path, digest in zip(paths, digests):
            fd = os.open(path, os.O_RDONLY)
            try:
                batch.add(fd, digest)
            finally:
                os.close(fd)

    batch = objects.ObjectBatch(store)
    stage(batch)
    assert len(_temps(store)) == 4
    batch.abort()
    assert _temps(store) == [] and store_files(store) == {}

    # A rename that fails mid-commit: the error is raised, the objects
    # published before it stay (complete), the rest leave no temp file.
    batch = objects.ObjectBatch(store)
    stage(batch)
    real = objects._publish
    calls = []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(objects, "_publish", flaky)
    with pytest.raises(OSError, match="Input/output"):
        batch.commit()
    assert _temps(store) == []
    files = store_files(store)
    assert len(files) == 2
    for rel, (mode, data) in files.items():
        assert fsverity_digest.digest_bytes(data).hex() == rel.replace("/", "")


def test_batch_without_syncfs_fsyncs_each_file(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setattr(objects, "_syncfs", lambda path: False)
    fsynced = []
    real = objects._fsync_temp
    monkeypatch.setattr(objects, "_fsync_temp", lambda fd, name: (fsynced.append(name), real(fd, name))[1])
    batch = objects.ObjectBatch(store)
    for i in range(3):
        data = _data(2000, 60 + i)
        _write(tmp_path / "f", data)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            batch.add(fd, fsverity_digest.digest_bytes(data))
        finally:
            os.close(fd)
    staged = [n.encode() for n in _temps(store)]
    batch.commit()
    assert sorted(fsynced) == sorted(staged) and len(fsynced) == 3


def test_scan_error_discards_the_batch(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        _write(src / ("f%d" % i), _data(1000, 80 + i))
    store = tmp_path / "store"
    real_add = objects.ObjectBatch.add
    count = []

    def failing_add(self, fd, digest, size=None):
        count.append(1)
        if len(count) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, fd, digest, size)

    monkeypatch.setattr(objects.ObjectBatch, "add", failing_add)
    with pytest.raises(OSError, match="No space left"):
        build_tree_from_directory(src, digest_store=store, threads=2)
    # Nothing was committed, and no staged temp file survives the error.
    assert store_files(store) == {}


def test_killed_mkcomposefs_leaves_only_correct_objects(ours, tmp_path):
    """SIGKILL at random points: every object name that exists matches its content."""
    src = tmp_path / "src"
    for d in range(8):
        (src / ("d%d" % d)).mkdir(parents=True)
        for i in range(25):
            _write(src / ("d%d" % d) / ("f%d" % i), os.urandom(20000 + 997 * i))
    store = tmp_path / "store"
    rng = random.Random(1234)
    # An uninterrupted run: the reference, and how long to spread the kills over.
    reference = tmp_path / "reference"
    start = time.monotonic()
    subprocess.run(ours.argv("mkcomposefs") + ["--digest-store=%s" % reference, str(src),
                                               str(tmp_path / "ref.img")], check=True)
    duration = time.monotonic() - start
    for run in range(12):
        shutil.rmtree(store, ignore_errors=True)
        proc = subprocess.Popen(ours.argv("mkcomposefs") + ["--digest-store=%s" % store, str(src),
                                                            str(tmp_path / "k.img")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, duration))
        proc.kill()
        proc.wait()
        if not os.path.isdir(store):
            continue
        for rel, (_mode, data) in store_files(store).items():
            if os.path.basename(rel).startswith(".tmp"):
                continue
            assert fsverity_digest.digest_bytes(data).hex() == rel.replace("/", ""), rel
    # A run after the kills completes the store and yields the same image.
    subprocess.run(ours.argv("mkcomposefs") + ["--digest-store=%s" % store, str(src), str(tmp_path / "k.img")],
                   check=True)
    assert (tmp_path / "k.img").read_bytes() == (tmp_path / "ref.img").read_bytes()
    assert {r for r in store_files(store) if not os.path.basename(r).startswith(".tmp")} == \
        set(store_files(reference))


def test_object_dir_removed_after_it_was_opened_is_made_again(tmp_path):
    """A gc of empty XX directories between opening XX and the rename: the object still lands."""
    data = _data(3000, 70)
    _write(tmp_path / "f", data)
    digest = fsverity_digest.digest_bytes(data)
    store = tmp_path / "store"
    prefix = digest.hex()[:2].encode()
    with objects.ObjectDir(store) as objdir:
        assert objdir.subdir(prefix, create=True) is not None
        os.rmdir(os.path.join(os.fsencode(store), prefix))
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            tmp, dev = objdir.stage(fd, digest, len(data), durable=True)
        finally:
            os.close(fd)
        objdir.publish(tmp, digest, dev)
    assert store_files(store) == {digest_to_path(digest).decode(): (0o644, data)}


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_store_object_reads_only_regular_files(tmp_path, kind):
    """A FIFO source would block the open forever; a symlink is not followed."""
    src = tmp_path / "src"
    if kind == "fifo":
        os.mkfifo(src)
    else:
        _write(tmp_path / "real", b"r" * 100)
        src.symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePathError, match="%s is (not a regular file|a symbolic link)" % src):
        store_object(src, fsverity_digest.digest_bytes(b"r" * 100), tmp_path / "store")
    assert store_files(tmp_path / "store") == {}
