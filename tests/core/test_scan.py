# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Directory source of mkcomposefs: our scan against C mkcomposefs 1.0.8.

The oracle tests build the same directory with the C tool and with
``build_tree_from_directory`` + our writer and require the same image bytes;
on a mismatch they first compare the C ``composefs-info dump`` of both images
so the failure shows which entry differs.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
import random
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from composefs_fleet import fsverity_digest, scan
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.errors import FormatError
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.tree import digest_to_path

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mknod, chown, trusted.* xattrs)")

OPTIONS = {
    "--use-epoch": {"use_epoch": True},
    "--skip-devices": {"skip_devices": True},
    "--skip-xattrs": {"skip_xattrs": True},
    "--user-xattrs": {"user_xattrs": True},
}
REG_SIZES = (0, 1, 63, 64, 65, 4095, 4096, 4097, 100000)
NS = 1000000000


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size) if hasattr(random.Random, "randbytes") \
        else bytes(random.Random(seed).getrandbits(8) for _ in range(size))


def _write(path, data: bytes, mtime_ns=None):
    with open(path, "wb") as f:
        f.write(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def make_all_types(root, monkeypatch) -> None:
    """Every file type, xattr namespace and metadata corner mkcomposefs records."""
    os.mkdir(root)
    base = 1700000000 * NS
    for i, size in enumerate(REG_SIZES):
        _write(os.path.join(root, "reg%d" % size), _data(size, size), base + i * 7919 + 123456789)
    os.makedirs(os.path.join(root, "dir/sub/deeper"))
    os.mkdir(os.path.join(root, "emptydir"))
    _write(os.path.join(root, "dir/sub/inner"), _data(5000, 1))
    _write(os.path.join(root, "dir/dup1"), _data(300, 2))
    _write(os.path.join(root, "dir/dup2"), _data(300, 2))  # same content, same object
    os.symlink("reg1", os.path.join(root, "link"))
    os.symlink("/nonexistent/target", os.path.join(root, "dangling"))
    os.symlink("t" * 1000, os.path.join(root, "longlink"))
    os.symlink("dir", os.path.join(root, "dirlink"))
    os.mkfifo(os.path.join(root, "fifo"))
    monkeypatch.chdir(root)  # a relative bind keeps clear of sun_path's 108 bytes
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    sock.close()
    monkeypatch.undo()
    _write(os.path.join(root, "n" * 255), b"long name")
    os.mkdir(os.path.join(root, "d" * 255))
    _write(os.path.join(root, "d" * 255, "x" * 255), _data(70, 3))
    _write(os.path.join(root, "spaces and\nnewline=\\"), b"odd name")
    _write(os.path.join(root, "modes"), b"m")
    os.chmod(os.path.join(root, "modes"), 0o4751)
    os.chmod(os.path.join(root, "emptydir"), 0o1777)
    _write(os.path.join(root, "old"), b"before 1970", mtime_ns=-1 * NS - 5)
    _write(os.path.join(root, "nsec"), b"nsec", mtime_ns=base + 999999999)

    f = os.path.join(root, "reg1")
    os.setxattr(f, "user.comment", b"hello world")
    os.setxattr(f, "user.binary", bytes(range(256)))
    os.setxattr(f, "user.empty", b"")
    d = os.path.join(root, "dir")
    os.setxattr(d, "user.dir", b"yes")
    if IS_ROOT:
        os.mknod(os.path.join(root, "chr"), 0o620 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(os.path.join(root, "blk"), 0o660 | stat.S_IFBLK, os.makedev(7, 1))
        os.mknod(os.path.join(root, "bigdev"), 0o600 | stat.S_IFCHR, os.makedev(300, 70000))
        os.mknod(os.path.join(root, "dir/whiteout"), 0o644 | stat.S_IFCHR, os.makedev(0, 0))
        os.setxattr(f, "trusted.plain", b"t")
        os.setxattr(f, "security.test", b"s")
        os.setxattr(d, "trusted.overlay.opaque", b"y")
        os.setxattr(f, "trusted.overlay.redirect", b"/elsewhere")
        os.setxattr(os.path.join(root, "reg100000"), "trusted.overlay.metacopy", b"")
        os.setxattr(os.path.join(root, "link"), "trusted.onlink", b"l", follow_symlinks=False)
        os.lchown(os.path.join(root, "reg65"), 1234, 5678)
        os.lchown(os.path.join(root, "link"), 70000, 80000)
        os.lchown(os.path.join(root, "emptydir"), 42, 0)
    # Directory mtimes last: creating entries above changed them.
    for i, name in enumerate(("dir", "emptydir", "d" * 255, "")):
        os.utime(os.path.join(root, name), ns=(base + i, base + i))


def c_image(oracle, src, out, *args) -> bytes:
    proc = subprocess.run(oracle.argv("mkcomposefs") + list(args) + [str(src), str(out)],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with open(out, "rb") as f:
        return f.read()


def c_dump(oracle, image) -> str:
    proc = subprocess.run(oracle.argv("composefs-info") + ["dump", str(image)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode("ascii")


def assert_same_as_c(oracle, tmp_path, src, args=(), **kw) -> bytes:
    for arg in args:
        for key, value in OPTIONS[arg].items():
            kw.setdefault(key, value)
    expected = c_image(oracle, src, tmp_path / "c.img", *args)
    ours = build_image(build_tree_from_directory(src, **kw))
    if ours != expected:
        (tmp_path / "ours.img").write_bytes(ours)
        assert c_dump(oracle, tmp_path / "ours.img") == c_dump(oracle, tmp_path / "c.img")
    assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(expected).hexdigest()
    return expected


# -- against the C tool ---------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("args", [(), ("--use-epoch",), ("--skip-devices",), ("--skip-xattrs",),
                                  ("--user-xattrs",), ("--use-epoch", "--skip-devices", "--user-xattrs")],
                         ids=lambda a: "+".join(a) or "default")
def test_all_file_types_match_c(oracle, tmp_path, monkeypatch, args):
    src = tmp_path / "src"
    make_all_types(str(src), monkeypatch)
    assert_same_as_c(oracle, tmp_path, src, args)


@pytest.mark.oracle
def test_dump_of_c_image_shows_what_we_recorded(oracle, tmp_path, monkeypatch):
    """Field check of our tree against the C reader's view of the C image."""
    src = tmp_path / "src"
    make_all_types(str(src), monkeypatch)
    c_image(oracle, src, tmp_path / "c.img")
    lines = {line.split(" ", 1)[0]: line.split(" ") for line in
             c_dump(oracle, tmp_path / "c.img").splitlines()}
    tree = dict(build_tree_from_directory(src).walk())
    for path, node in tree.items():
        if node.is_dir():
            continue
        fields = lines[_escape(path)]
        mtime = "%d.%d" % (node.mtime_sec, node.mtime_nsec)
        assert fields[1:8] == [str(node.size), "%o" % node.mode, "1", str(node.uid), str(node.gid),
                               str(node.rdev), mtime], path
        if node.is_reg() and node.size > 64:
            assert fields[8] == node.payload.decode() and fields[10] == node.digest.hex(), path
            assert node.content is None
        elif node.is_reg() and node.size:
            assert fields[8] == "-" and fields[9] != "-" and node.payload is None, path
            with open(os.path.join(os.fsencode(src), path[1:]), "rb") as f:
                assert node.content == f.read(), path
    assert tree[b"/reg0"].content is None and tree[b"/reg0"].payload is None


def _escape(path: bytes) -> str:
    out = []
    for byte in path:
        if byte == 0x5C:
            out.append("\\\\")
        elif byte in (0x0A, 0x0D, 0x09):
            out.append({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}[byte])
        elif 0x21 <= byte <= 0x7E:
            out.append(chr(byte))
        else:
            out.append("\\x%02x" % byte)
    return "".join(out)


@pytest.mark.oracle
def test_hardlinks_are_broken_like_c(oracle, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    _write(src / "a/file", _data(1000, 9))
    os.link(src / "a/file", src / "link1")
    os.link(src / "a/file", src / "zlink")
    _write(src / "small", b"tiny")
    os.link(src / "small", src / "a/small2")
    os.link(src / "a/file", tmp_path / "outside")  # st_nlink counts links outside the tree
    assert_same_as_c(oracle, tmp_path, src)
    tree = dict(build_tree_from_directory(src).walk())
    assert tree[b"/link1"] is not tree[b"/a/file"]
    assert {tree[p].nlink for p in (b"/a/file", b"/link1", b"/zlink")} == {1}
    assert tree[b"/zlink"].link_to is None


@pytest.mark.oracle
def test_hardlinks_option_keeps_links(oracle, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    _write(src / "a/file", _data(1000, 9))
    os.link(src / "a/file", src / "link1")
    os.link(src / "a/file", src / "zlink")
    os.link(src / "a/file", tmp_path / "outside")
    _write(src / "small", b"tiny")
    os.link(src / "small", src / "a/small2")
    os.symlink("x", src / "sym")
    os.link(src / "sym", src / "sym2", follow_symlinks=False)
    tree = build_tree_from_directory(src, hardlinks=True)
    nodes = dict(tree.walk())
    target = nodes[b"/a/file"]  # first in sorted depth-first order
    assert target.link_to is None and target.nlink == 3 and target.digest is not None
    for alias in (b"/link1", b"/zlink"):
        assert nodes[alias].link_to is target and nodes[alias].mode == target.mode
    assert nodes[b"/small"].link_to is nodes[b"/a/small2"]
    assert nodes[b"/a/small2"].nlink == 2 and nodes[b"/a/small2"].content == b"tiny"
    assert nodes[b"/sym2"].link_to is nodes[b"/sym"]
    # The C reader sees one inode with nlink 3 behind three names.
    (tmp_path / "ours.img").write_bytes(build_image(tree))
    dump = {line.split(" ", 1)[0]: line.split(" ") for line in
            c_dump(oracle, tmp_path / "ours.img").splitlines()}
    assert dump["/a/file"][3] == "3" and dump["/a/file"][2] == "100644"
    assert dump["/link1"][2] == "@100644" and dump["/link1"][8] == "/a/file"
    assert dump["/zlink"][8] == "/a/file"


@pytest.mark.oracle
def test_huge_directory_matches_c(oracle, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5000):
        name = ("entry-%05d-" % i) + "x" * (i % 200)
        _write(src / name, b"%d" % i if i % 3 else b"")
    assert_same_as_c(oracle, tmp_path, src)


@pytest.mark.oracle
def test_many_objects_parallel_matches_c(oracle, tmp_path):
    src = tmp_path / "src"
    for d in range(8):
        (src / ("d%d" % d)).mkdir(parents=True)
        for i in range(40):
            _write(src / ("d%d" % d) / ("f%d" % i), _data(65 + 997 * i, d * 100 + i))
    expected = assert_same_as_c(oracle, tmp_path, src, threads=4)
    assert build_image(build_tree_from_directory(src, threads=1)) == expected


@pytest.mark.oracle
def test_conflicting_xattr_options(oracle, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    proc = subprocess.run(oracle.argv("mkcomposefs") + ["--skip-xattrs", "--user-xattrs", str(src),
                                                        str(tmp_path / "i")], capture_output=True)
    assert proc.returncode == 1 and b"Invalid argument" in proc.stderr
    with pytest.raises(FormatError, match="conflict"):
        build_tree_from_directory(src, skip_xattrs=True, user_xattrs=True)


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["file", "symlink-to-dir", "missing"])
def test_source_must_be_a_directory(oracle, tmp_path, kind):
    (tmp_path / "dir").mkdir()
    src = tmp_path / "src"
    if kind == "file":
        src.write_bytes(b"x")
    elif kind == "symlink-to-dir":
        src.symlink_to("dir")
    proc = subprocess.run(oracle.argv("mkcomposefs") + [str(src), str(tmp_path / "i")],
                          capture_output=True)
    assert proc.returncode == 1
    expected = FileNotFoundError if kind == "missing" else NotADirectoryError
    with pytest.raises(expected) as info:
        build_tree_from_directory(src)
    assert str(src) in str(info.value)


@pytest.mark.oracle
def test_xattrs_over_the_composefs_budget(oracle, tmp_path):
    """C refuses more than 32767 bytes of xattrs per inode; ext4 cannot hold that, tmpfs can."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("/dev/shm (tmpfs, large xattrs) not available")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        src = os.path.join(shm, "src")
        os.mkdir(src)
        f = os.path.join(src, "f")
        _write(f, b"")
        try:
            for i in range(3):
                os.setxattr(f, "trusted.big%d" % i, b"v" * 12000)
        except OSError as exc:
            pytest.skip("cannot set 36 KB of trusted.* xattrs on /dev/shm: %s" % exc)
        proc = subprocess.run(oracle.argv("mkcomposefs") + [src, os.path.join(shm, "i")],
                              capture_output=True)
        assert proc.returncode == 1 and b"Numerical result out of range" in proc.stderr
        with pytest.raises(FormatError, match="exceed"):
            build_tree_from_directory(src)
        os.removexattr(f, "trusted.big2")
        os.setxattr(f, "trusted.big2", b"v" * 8000)  # 3*(7+11)+32000+12 = 32066: fits
        assert_same_as_c(oracle, _Path(shm), src)


class _Path(str):
    def __truediv__(self, other):
        return os.path.join(self, other)


@pytest.mark.oracle
@needs_root
def test_unreadable_entries_as_unprivileged_user(oracle, tmp_path):
    """C opens no empty file, fails on unreadable data and unreadable dirs; so do we."""
    top = tempfile.mkdtemp(dir="/tmp", prefix="cfs-scan-")
    try:
        os.chmod(top, 0o755)
        src = os.path.join(top, "src")
        os.mkdir(src)
        for name, size in (("empty", 0), ("small", 10), ("big", 1000)):
            _write(os.path.join(src, name), b"z" * size)
            os.chmod(os.path.join(src, name), 0)
        os.mkdir(os.path.join(src, "closed"))
        _write(os.path.join(src, "closed/x"), b"")

        # The cached oracle sits under root's 0700 home: nobody needs a copy.
        c_tools = oracle.copy_to(Path(top) / "oracle")

        def run_c(path):
            return subprocess.run(c_tools.argv("mkcomposefs") + [path, "/dev/null"],
                                  capture_output=True, preexec_fn=_drop_privileges)

        def run_ours():
            return _in_child(lambda: build_tree_from_directory(src, threads=1))

        os.chmod(os.path.join(src, "closed"), 0)
        proc = run_c(src)
        assert proc.returncode == 1 and b"error accessing" in proc.stderr
        assert b"closed: Permission denied" in proc.stderr
        err = run_ours()
        assert "PermissionError" in err and "closed" in err

        os.chmod(os.path.join(src, "closed"), 0o755)
        proc = run_c(src)
        assert proc.returncode == 1 and b"Permission denied" in proc.stderr
        err = run_ours()
        assert "PermissionError" in err and ("/small" in err or "/big" in err)

        for name in ("small", "big"):
            os.unlink(os.path.join(src, name))
        assert run_c(src).returncode == 0
        assert run_ours() == "ok"
    finally:
        subprocess.run(["rm", "-rf", top], check=False)


def _drop_privileges():
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def _in_child(func) -> str:
    """Run ``func`` as nobody in a forked child; 'ok' or the exception text."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            _drop_privileges()
            func()
            msg = "ok"
        except BaseException as exc:  # noqa: B902 - reported to the parent
            msg = "%s: %s" % (type(exc).__name__, exc)
        os.write(wfd, msg.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        msg = f.read().decode()
    os.waitpid(pid, 0)
    return msg


# -- our own semantics ----------------------------------------------------------------------


def test_records_metadata_without_following(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "f65", _data(65, 65), mtime_ns=1600000000 * NS + 42)
    _write(src / "f64", _data(64, 64))
    _write(src / "f0", b"")
    os.symlink("f65", src / "l")
    os.mkfifo(src / "p")
    root = build_tree_from_directory(src)
    nodes = dict(root.walk())
    st = os.lstat(src)
    assert root.mode == st.st_mode and (root.mtime_sec, root.mtime_nsec) == divmod(st.st_mtime_ns, NS)
    f65 = nodes[b"/f65"]
    assert (f65.mtime_sec, f65.mtime_nsec) == (1600000000, 42)
    assert f65.digest == fsverity_digest.digest_bytes(_data(65, 65))
    assert f65.payload == digest_to_path(f65.digest) and f65.content is None
    assert nodes[b"/f64"].content == _data(64, 64) and nodes[b"/f64"].digest is None
    assert nodes[b"/f0"].content is None and nodes[b"/f0"].payload is None
    link = nodes[b"/l"]
    assert link.is_symlink() and link.payload == b"f65" and link.size == 3
    assert stat.S_ISFIFO(nodes[b"/p"].mode)
    assert list(root.children) == sorted(root.children)


def test_inline_max_and_compute_digest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "a", _data(100, 1))
    _write(src / "b", _data(10, 2))
    nodes = dict(build_tree_from_directory(src, inline_max=100).walk())
    assert nodes[b"/a"].content == _data(100, 1) and nodes[b"/a"].payload is None
    nodes = dict(build_tree_from_directory(src, inline_max=0).walk())
    assert nodes[b"/b"].content is None and nodes[b"/b"].digest == fsverity_digest.digest_bytes(_data(10, 2))
    nodes = dict(build_tree_from_directory(src, compute_digest=False).walk())
    assert nodes[b"/a"].digest is None and nodes[b"/a"].payload is None
    assert nodes[b"/b"].content == _data(10, 2)
    with pytest.raises(FormatError):
        build_tree_from_directory(src, inline_max=5001)
    with pytest.raises(FormatError):
        build_tree_from_directory(src, compute_digest=False, digest_store=tmp_path / "s")
    with pytest.raises(FormatError):
        build_tree_from_directory(src, threads=0)


def test_user_xattrs_and_skip_xattrs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "f", b"x")
    os.setxattr(src / "f", "user.keep", b"1")
    if IS_ROOT:
        os.setxattr(src / "f", "trusted.drop", b"2")
        os.setxattr(src / "f", "trusted.overlay.opaque", b"y")
    f = dict(build_tree_from_directory(src).walk())[b"/f"]
    assert f.xattrs[b"user.keep"] == b"1"
    if IS_ROOT:
        # Kept as found; escaping to trusted.overlay.overlay.* is the writer's job.
        assert f.xattrs[b"trusted.overlay.opaque"] == b"y" and b"trusted.drop" in f.xattrs
    f = dict(build_tree_from_directory(src, user_xattrs=True).walk())[b"/f"]
    assert f.xattrs == {b"user.keep": b"1"}
    f = dict(build_tree_from_directory(src, skip_xattrs=True).walk())[b"/f"]
    assert f.xattrs == {}


@needs_root
def test_skip_devices_drops_whiteouts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "wh", 0o644 | stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(src / "blk", 0o644 | stat.S_IFBLK, os.makedev(8, 0))
    os.mkfifo(src / "fifo")
    assert sorted(build_tree_from_directory(src).children) == [b"blk", b"fifo", b"wh"]
    assert sorted(build_tree_from_directory(src, skip_devices=True).children) == [b"fifo"]
    assert dict(build_tree_from_directory(src).walk())[b"/wh"].is_whiteout()


def test_listxattr_not_supported_means_no_xattrs(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()

    def no_xattrs(path, follow_symlinks=True):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported", path)

    monkeypatch.setattr(os, "listxattr", no_xattrs)
    assert build_tree_from_directory(src).xattrs == {}

    def broken(path, follow_symlinks=True):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(os, "listxattr", broken)
    with pytest.raises(OSError, match="xattr") as info:
        build_tree_from_directory(src)
    assert info.value.errno == errno.EIO and str(src) in str(info.value)


def test_deep_tree_needs_no_recursion(tmp_path):
    src = tmp_path / "src"
    depth = sys.getrecursionlimit() + 200
    path = str(src)
    os.mkdir(path)
    for _ in range(depth):
        path = os.path.join(path, "d")
        os.mkdir(path)
    _write(os.path.join(path, "leaf"), _data(100, 7))
    try:
        root = build_tree_from_directory(src)
    finally:
        # pytest's own tmp_path cleanup recurses and would hit the limit.
        subprocess.run(["rm", "-rf", str(src)], check=True)
    node, levels = root, 0
    while node.children:
        node = next(iter(node.children.values()))
        levels += 1
    assert levels == depth + 1 and node.digest == fsverity_digest.digest_bytes(_data(100, 7))


def test_file_changed_during_scan(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "grows", _data(1000, 1))
    _write(src / "small", b"abc")

    def grow(done, total):
        if done == 0:
            with open(src / "grows", "ab") as f:
                f.write(b"more")

    with pytest.raises(FormatError, match="grows changed during the scan"):
        build_tree_from_directory(src, progress=grow, threads=1)

    def shrink(done, total):
        if done == 0:
            _write(src / "small", b"a")

    with pytest.raises(FormatError, match="small changed"):
        build_tree_from_directory(src, progress=shrink, threads=2)


def test_progress_counts_files_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        _write(src / ("f%d" % i), _data(i * 10, i))  # f0 is empty: nothing to read
    calls = []
    build_tree_from_directory(src, threads=3, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 19) and calls[-1] == (19, 19)
    assert [d for d, _ in calls] == list(range(20))


def test_worker_error_stops_the_run(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        _write(src / ("f%02d" % i), _data(200, i))
    real = scan._digest_fd
    seen = []

    def failing(fd):
        seen.append(fd)
        if len(seen) == 5:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(scan, "_digest_fd", failing)
    with pytest.raises(OSError) as info:
        build_tree_from_directory(src, threads=4)
    assert info.value.errno == errno.EIO and str(src) in info.value.filename
    assert len(seen) < 50


def test_threads_give_the_same_tree(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_all_types(str(src), monkeypatch)
    images = {build_image(build_tree_from_directory(src, threads=n)) for n in (1, 2, 7)}
    assert len(images) == 1


def test_digests_in_worker_processes_equal_in_process(tmp_path, monkeypatch):
    """threads > 1 hashes in processes, with or without a store; the tree must not change."""
    import composefs_fleet.scan as scan_module
    from composefs_fleet.erofs_writer import build_image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / ("f%02d" % i)).write_bytes(os.urandom(100 + i * 5000))
    (src / "tiny").write_bytes(b"t")
    reference = build_image(build_tree_from_directory(str(src), threads=1))
    computed = []
    real = scan_module._hash_ahead

    def spy(jobs, threads):
        result = real(jobs, threads)
        computed.append(None if result is None else len(result[0]))
        return result

    from composefs_fleet import hash_pool

    monkeypatch.setattr(hash_pool, "PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(scan_module, "_hash_ahead", spy)
    parallel = build_image(build_tree_from_directory(str(src), threads=2))
    assert parallel == reference
    # All twelve external files were hashed by the worker processes.
    assert computed == [12]
    # With a digest store too (the store's objects are then copied from the files the workers hashed) ...
    store = tmp_path / "objects"
    stored = build_image(build_tree_from_directory(str(src), threads=2, digest_store=str(store)))
    assert stored == reference and computed == [12, 12]
    objects = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    assert len(objects) == 12
    for path in store.rglob("*"):
        if path.is_file():
            assert fsverity_digest.digest_file(str(path)).hex() == path.parent.name + path.name
    # ... and a populated store gets no new object, also from workers.
    before = {str(p): p.stat().st_ino for p in store.rglob("*") if p.is_file()}
    assert build_image(build_tree_from_directory(str(src), threads=2, digest_store=str(store))) == reference
    assert {str(p): p.stat().st_ino for p in store.rglob("*") if p.is_file()} == before
