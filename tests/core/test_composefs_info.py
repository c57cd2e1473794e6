# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Our composefs-info against the C composefs-info 1.0.8, byte for byte.

Images are written by the C mkcomposefs (from dump texts and from real
directories), then both readers print them with every subcommand.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
from dump_strategies import DIGEST, PAYLOAD, SAMPLE, dump_texts
from hypothesis import HealthCheck, given, settings

from composefs_fleet_cli.composefs_info import main

pytestmark = pytest.mark.oracle

DIGEST2 = "a" * 64
PAYLOAD2 = "aa/" + "a" * 62
ROOT = "/ 0 40755 2 0 0 0 1000.0 - - -\n"


def run_ours(*args: object) -> Tuple[int, bytes, bytes]:
    """Our main() in-process; (exit code, stdout, stderr)."""
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.TextIOWrapper(out), io.TextIOWrapper(err)
    try:
        code = main([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            stream.detach()
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def run_c(oracle, *args: object) -> Tuple[int, bytes, bytes]:
    proc = oracle.run("composefs-info", *args)
    return proc.returncode, proc.stdout, proc.stderr


def mkcomposefs(oracle, src, dest: Path, *args: object) -> Path:
    proc = oracle.run("mkcomposefs", *args, src, dest)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return dest


def image_from_dump(oracle, tmp_path: Path, text, name: str = "img", *args: object) -> Path:
    if isinstance(text, str):
        text = text.encode()
    src = tmp_path / (name + ".dump")
    src.write_bytes(text)
    return mkcomposefs(oracle, src, tmp_path / (name + ".cfs"), "--from-file", *args)


def assert_same_output(oracle, *args: object) -> bytes:
    expected = run_c(oracle, *args)
    got = run_ours(*args)
    assert expected[0] == 0, expected[2].decode(errors="replace")
    assert got == expected
    return got[1]


def compare_all(oracle, images: List[Path], basedir: Path, filters=()) -> None:
    for command in ("ls", "dump", "objects"):
        assert_same_output(oracle, command, *images)
        for flt in filters:
            assert_same_output(oracle, *["--filter=%s" % f for f in flt], command, *images)
    assert_same_output(oracle, "--basedir=%s" % basedir, "missing-objects", *images)


def store_with(tmp_path: Path, *payloads: str) -> Path:
    basedir = tmp_path / "objects"
    for payload in payloads:
        path = basedir / payload
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    basedir.mkdir(exist_ok=True)
    return basedir


# -- images from dump texts ----------------------------------------------------

# The reader tests' SAMPLE and more: escapes, a lone dash, external files
# without digest, hard links to a symlink and to a device.
SPECIAL = SAMPLE + (
    "/d/hl2 0 @100644 0 0 0 0 0.0 /d/sym - -\n"
    "/with\\x20space\\ttab\\xff 1 100644 1 0 0 0 1000.5 - \\x2d - user.k\\x3dv=a\\x3db\\x00c\\n\n"
    "/dash 1 120777 1 0 0 0 1000.5 \\x2d - -\n"
    "/ext2 7 100644 1 0 0 0 123456789.999999999 {p2} - {d2}\n"
    "/ext3 1099511627776 100644 1 0 0 0 1000.5 {p2} - {d2} user.big=%s\n"
    "/nodigest 50 100644 1 0 0 0 1000.5 {p} - -\n"
    "/hlwh 0 @20000 0 0 0 0 0.0 /dev - -\n"
).format(p=PAYLOAD, p2=PAYLOAD2, d2=DIGEST2) % ("v" * 3000)

REDIRECTS = ROOT + "".join(
    "/r%d 100 100644 1 0 0 0 1000.0 %s - - %s\n" % (i, payload, xattrs)
    for i, (payload, xattrs) in enumerate([
        ("abc", ""), ("abcd", "user.z=1"), ("/abs", ""), ("efgh", ""), ("efgh", ""), ("x", ""),
        ("abcdefgh", "user.a=1 user.b=2"), ("ab/cd", ""), ("//y", ""), ("1234567", ""),
    ]))

HARDLINKS = ROOT + (
    "/a 0 40755 2 0 0 0 1000.0 - - -\n"
    "/a/f 10 100644 4 0 0 0 1000.0 - 0123456789 - user.x=1\n"
    "/a/l1 0 @100644 0 0 0 0 0.0 /a/f - -\n"
    "/b 0 40755 2 0 0 0 1000.0 - - -\n"
    "/b/l2 0 @100644 0 0 0 0 0.0 /a/l1 - -\n"
    "/b/l3 0 @100644 0 0 0 0 0.0 /a/f - -\n"
    "/b/s 3 120777 2 0 0 0 1000.0 tgt - -\n"
    "/b/sl 0 @120777 0 0 0 0 0.0 /b/s - -\n"
    "/c 100 100644 2 0 0 0 1000.0 %s - %s\n"
    "/z 0 @100644 0 0 0 0 0.0 /c - -\n"
) % (PAYLOAD, DIGEST)

MTIMES = ROOT.replace("1000.0", "5.5") + "".join(
    "/m%d 0 100644 1 %d %d 0 %s - - -\n" % (i, uid, gid, mtime)
    for i, (uid, gid, mtime) in enumerate([
        (0, 0, "5.5"), (65535, 65535, "5.5"), (65536, 1, "5.5"), (1, 4294967295, "0.0"),
        (0, 0, "-1.0"), (0, 0, "9223372036854775807.999999999"), (0, 0, "-9223372036854775808.1"),
        (0, 0, "1700000000.123456789"),
    ]))

BIGFILES = ROOT + "".join(
    "/s%d %d 100644 1 0 0 0 1000.0 %s - %s\n" % (i, size, PAYLOAD, DIGEST)
    for i, size in enumerate([1, 4095, 4096, 4097, 100000, 1 << 32, (1 << 40) + 7, (1 << 43) + 1, 1 << 52]))

SHARED = ROOT.replace(" - - -\n", " - - - security.selinux=system_u:object_r:root_t:s0\n") + "".join(
    "/f%02d 100 100644 1 0 0 0 1000.0 %s - %s user.common=same trusted.shared=%d user.u%d=%d"
    " security.selinux=ctx%d\n" % (i, PAYLOAD if i % 2 else PAYLOAD2, DIGEST if i % 2 else DIGEST2,
                                    i % 3, i, i, i % 2)
    for i in range(40))

V1_WHITEOUTS = ROOT + (
    "/d 0 40755 2 0 0 0 1000.0 - - - user.overlay.opaque=y\n"
    "/d/w 0 20000 1 0 0 0 1000.0 - - - user.k=v\n"
    "/d/e 0 40755 2 0 0 0 1000.0 - - -\n"
    "/d/e/w2 0 20777 1 5 5 0 1000.0 - - - trusted.overlay.whiteout=\n"
    "/ff 0 20000 1 0 0 0 1000.0 - - -\n"
)


def bigdir_text(count: int) -> str:
    lines = [ROOT, "/big 0 40755 2 0 0 0 1000.0 - - -\n"]
    for i in range(count):
        name = ("%d" % i).rjust(1 + i % 200, "n")
        kind = i % 4
        if kind == 0:
            lines.append("/big/%s 0 100644 1 0 0 0 1000.0 - - -\n" % name)
        elif kind == 1:
            lines.append("/big/%s 3 120777 1 0 0 0 1000.0 t%d - -\n" % (name, i))
        elif kind == 2:
            lines.append("/big/%s 0 40755 2 0 0 0 1000.0 - - -\n" % name)
        else:
            lines.append("/big/%s 9 100644 1 0 0 0 1000.0 %s - -\n" % (name, "%02x/%062x" % (i % 256, i)))
    return "".join(lines)


def deep_text(depth: int) -> str:
    lines = [ROOT]
    path = ""
    for i in range(depth):
        path += "/d%d" % (i % 10)
        lines.append("%s 0 40755 2 0 0 0 1000.0 - - -\n" % path)
        lines.append("%s/f 100 100644 1 0 0 0 1000.0 %02x/%062x - -\n" % (path, i % 256, i))
    return "".join(lines)


LONG = ROOT + (
    "/%s 0 100644 1 0 0 0 1000.0 - - -\n" % ("n" * 255)
    + "/l 4095 120777 1 0 0 0 1000.0 %s - -\n" % ("t" * 4095)
    + "/c 5000 100644 1 0 0 0 1000.0 - %s -\n" % ("x" * 5000)
    + "/c2 2049 100644 1 0 0 0 1000.0 - %s -\n" % ("y" * 2049)
    + "/x 0 100644 1 0 0 0 1000.0 - - - user.%s=%s\n" % ("k" * 249, "v" * 30000)
)

CASES = {
    "special": (SPECIAL, [["d", "hl"], ["file"], ["nope"], ["hl2"]]),
    "redirects": (REDIRECTS, [["r0", "r5"]]),
    "hardlinks": (HARDLINKS, [["b"], ["b", "z"], ["a", "c", "z"]]),
    "mtimes": (MTIMES, [["m3"]]),
    "bigfiles": (BIGFILES, [["s4"]]),
    "shared": (SHARED, [["f01", "f02"]]),
    "v1-whiteouts": (V1_WHITEOUTS, [["d"], ["ff"]]),
    "bigdir": (bigdir_text(1500), [["big"]]),
    "deep": (deep_text(300), [["d0"]]),
    "long": (LONG, [["l", "c"]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dump_cases_match_c(oracle, tmp_path, case):
    text, filters = CASES[case]
    image = image_from_dump(oracle, tmp_path, text)
    basedir = store_with(tmp_path, PAYLOAD, "00/" + "0" * 62)
    compare_all(oracle, [image], basedir, filters)


def test_min_version_and_several_images(oracle, tmp_path):
    a = image_from_dump(oracle, tmp_path, SPECIAL, "a", "--min-version=1")
    b = image_from_dump(oracle, tmp_path, SHARED, "b", "--max-version=0")
    c = image_from_dump(oracle, tmp_path, V1_WHITEOUTS, "c", "--max-version=0")
    compare_all(oracle, [a, b, c, a], store_with(tmp_path, PAYLOAD2), [["f01", "d"]])


def test_missing_objects_without_basedir_uses_fd_0_like_c(oracle, tmp_path):
    # The C tool's basedir fd defaults to 0: with stdin not a directory,
    # every object counts as missing.
    image = image_from_dump(oracle, tmp_path, SPECIAL)
    expected = run_c(oracle, "missing-objects", image)
    assert expected[0] == 0 and expected[1] == run_c(oracle, "objects", image)[1]
    assert run_ours("missing-objects", image) == expected


# -- images from directories ---------------------------------------------------

def populate(root: Path) -> None:
    root.mkdir()
    (root / "empty").write_bytes(b"")
    for size in (1, 63, 64, 65, 4096, 4097, 100003):
        (root / ("file-%d" % size)).write_bytes(bytes((i * 31 + size) % 251 for i in range(size)))
    (root / "same-a").write_bytes(b"same content, more than sixty-four bytes long " * 3)
    (root / "same-b").write_bytes(b"same content, more than sixty-four bytes long " * 3)
    os.symlink("file-1", root / "link")
    os.symlink("/" + "long/" * 800 + "target", root / "longlink")
    os.symlink("dangling target with spaces\t", root / "weird link")
    (root / ("n" * 255)).write_bytes(b"long name")
    (root / "caf\xe9 \u2603".encode("utf-8").decode("utf-8", "surrogateescape")).write_bytes(b"x")
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
    finally:
        sock.close()
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "disk", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.mknod(root / "whiteout", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(root / "02", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    os.link(root / "file-65", root / "hardlink-65")
    xf = root / "xattrs"
    xf.write_bytes(b"with xattrs")
    for key, value in [(b"user.plain", b"v"), (b"user.bin", b"\x00\xff=\n"), (b"trusted.overlay.foo", b"bar"),
                       (b"trusted.overlay.overlay.nested", b"n"), (b"trusted.other", b"o"),
                       (b"security.test", b"s"), (b"user.overlay.opaque", b"y")]:
        os.setxattr(xf, key, value)
    os.setxattr(root, b"user.rootattr", b"r")
    many = root / "many"
    many.mkdir()
    for i in range(1100):
        (many / ("entry-%04d-%s" % (i, "x" * (i % 40)))).write_bytes(b"%d" % i)
    deep = root
    for i in range(60):
        deep = deep / ("level%d" % i)
        deep.mkdir()
    (deep / "bottom").write_bytes(b"b" * 70)
    os.chmod(root / "file-1", 0o4755)
    os.chown(root / "file-63", 1234, 5678)
    os.utime(root / "file-64", ns=(0, 1234567890123456789))
    os.utime(root / "link", ns=(0, 5), follow_symlinks=False)


def test_directory_images_match_c(oracle, tmp_path):
    src = tmp_path / "src"
    try:
        populate(src)
    except (PermissionError, OSError) as exc:
        pytest.skip("cannot build the source tree here (needs root and xattrs on %s): %s" % (tmp_path, exc))
    store = tmp_path / "store"
    plain = mkcomposefs(oracle, src, tmp_path / "plain.cfs")
    epoch = mkcomposefs(oracle, src, tmp_path / "epoch.cfs", "--use-epoch", "--digest-store=%s" % store)
    user = mkcomposefs(oracle, src, tmp_path / "user.cfs", "--user-xattrs", "--skip-devices")
    # Remove a few objects so missing-objects has something to report.
    removed = 0
    for obj in sorted(store.rglob("*")):
        if obj.is_file() and removed < 3:
            obj.unlink()
            removed += 1
    assert removed == 3
    for image in (plain, epoch, user):
        compare_all(oracle, [image], store, [["many"], ["level0", "xattrs", "02"]])
    assert_same_output(oracle, "--basedir", store, "missing-objects", plain, epoch, user)
    listing = run_ours("ls", plain)[1]
    assert b"/many/entry-1099-" in listing and b"/longlink\t-> /long/" in listing


# -- command line behaviour ----------------------------------------------------

def normalized(result: Tuple[int, bytes, bytes], argv0: str) -> Tuple[int, bytes, bytes]:
    code, out, err = result
    return code, out.replace(argv0.encode(), b"PROG"), err.replace(argv0.encode(), b"PROG")


def test_error_cases_match_c(oracle, ours, tmp_path):
    good = image_from_dump(oracle, tmp_path, SPECIAL)
    cases = [
        [], ["foo"], ["ls"], ["dump"], ["ls", "/nonexistent/x.cfs"], ["--bogus", "ls", good],
        ["--bogus=1", "ls"], ["--basedir"], ["ls", good, "--filter"], ["-x", "ls", good],
        ["--filter=a/b", "ls", good], ["--basedir=/nonexistent", "ls", good], ["measure-file"],
        ["measure-file", "/nonexistent"], ["ls", good, "/nonexistent"], ["objects", good, "/nonexistent"],
        ["--base=%s" % tmp_path, "--fil=d", "ls", good], ["ls", "--filter", "d", good, "--", good],
        ["--basedir=%s" % good, "ls", good],
    ]
    c_argv0 = oracle.argv("composefs-info")[-1]
    our_argv0 = ours.argv("composefs-info")[0]
    if not our_argv0.endswith("composefs-info"):
        our_argv0 = "composefs-info"
    for args in cases:
        expected = normalized(run_c(oracle, *args), c_argv0)
        got = normalized(
            (lambda p: (p.returncode, p.stdout, p.stderr))(ours.run("composefs-info", *args)), our_argv0)
        assert got == expected, args


def test_bad_images_fail_like_c(oracle, tmp_path):
    good = image_from_dump(oracle, tmp_path, SPECIAL).read_bytes()
    bad = {
        "empty": b"",
        "short": good[:4000],
        "truncated": good[:5000],
        "zeros": bytes(8192),
        "badmagic": b"\x00" + good[1:],
    }
    for name, data in bad.items():
        path = tmp_path / name
        path.write_bytes(data)
        expected = run_c(oracle, "ls", path)
        got = run_ours("ls", path)
        assert expected[0] == got[0] == 1, name
        assert got[1] == expected[1] == b""
        prefix = b"composefs-info: Failed to load '%s': " % bytes(path)
        assert expected[2].startswith(prefix) and got[2].startswith(prefix), got[2]
        assert b"Traceback" not in got[2]
    # A directory: C says "No such device" (mmap's errno); we say what it is.
    assert run_c(oracle, "ls", tmp_path)[2].endswith(b": No such device\n")
    assert run_ours("ls", tmp_path) == (
        1, b"", b"composefs-info: Failed to load '%s': is a directory, not a composefs image\n" % bytes(tmp_path))


def test_entry_point_and_module(ours, tmp_path, oracle):
    image = image_from_dump(oracle, tmp_path, HARDLINKS)
    expected = run_c(oracle, "dump", image)
    proc = ours.run("composefs-info", "dump", image)
    assert (proc.returncode, proc.stdout, proc.stderr) == expected
    proc = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.composefs_info", "dump", str(image)],
                          capture_output=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == expected


def test_help():
    code, out, err = run_ours("--help")
    assert code == 0 and out.startswith(b"usage: composefs-info [--basedir=path]") and err == b""


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 1 << 20 | 3])
def test_measure_file_matches_c(oracle, tmp_path, size):
    path = tmp_path / "f"
    path.write_bytes(bytes((i * 13) % 256 for i in range(size)))
    assert_same_output(oracle, "measure-file", path, path)


def test_measure_empty_file_uses_the_fixed_digest(oracle, tmp_path):
    # composefs 1.0.8 hashes an empty file wrongly (cfc33910...); upstream
    # fixed it in a66faad (#442) to the kernel's value, which we print.
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert run_c(oracle, "measure-file", path)[1] == (
        b"cfc3391077edfd51859f6e5e16e03f82b1da3ee1a35d418b0d0b3b57740b4405\n")
    assert run_ours("measure-file", path) == (
        0, b"3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95\n", b"")


# -- generated trees -----------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=dump_texts())
def test_generated_dumps_match_c(oracle, tmp_path_factory, text):
    tmp_path = tmp_path_factory.mktemp("gen")
    image = image_from_dump(oracle, tmp_path, text)
    for command in ("dump", "ls", "objects"):
        assert run_ours(command, image) == run_c(oracle, command, image), command
