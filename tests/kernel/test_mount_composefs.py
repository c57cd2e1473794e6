"""mount.composefs on this machine's kernel: real EROFS + overlayfs mounts.

Every test here checks, through the ``no_leaks`` fixture, that nothing is left
behind once it is done: no mount, no bound loop device, no temporary
directory -- on the success paths (after ``umount``) and the failure paths.
"""

from __future__ import annotations

import errno
import glob
import io
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings

from composefs_fleet import mount_api as api
from composefs_fleet.dump import parse_dump
from composefs_fleet.erofs_reader import read_image_file
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.fsverity_digest import digest_bytes
from composefs_fleet.fsverity_ioctl import _kernel_has_fsverity
from composefs_fleet.loopdev import bound_devices
from composefs_fleet.mount import (
    ComposefsMountError,
    MountResult,
    _mount_erofs,
    _overlay_new_api,
    _OverlayPlan,
    mount_composefs,
    verity_problem,
)
from composefs_fleet.mount_options import format_options
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.tree import Node, digest_to_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "core"))
from dump_strategies import dump_texts  # type: ignore[import-not-found]  # noqa: E402  (tests/core/)

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]

OVERFLOW_ID = 65534
KERNEL = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())  # type: ignore[union-attr]
# What each way of mounting needs from the kernel (mainline versions).
FEATURES = {
    "dataonly": ((6, 5), "data-only overlay lower layers (lowerdir=a::b); without them the object "
                         "directories would show in the mount"),
    "file": ((6, 12), "file-backed EROFS mounts"),
    "tmpdir": ((6, 7), "overlayfs lowerdir+/datadir+ fsconfig keys"),
    "fd": ((6, 15), "overlayfs layers given as detached mount fds"),
    "legacy": ((6, 5), "data-only overlay lower layers (lowerdir=a::b)"),
    "verity": ((6, 6), "overlayfs verity= option"),
}


def need(*features: str) -> None:
    for feature in features:
        version, what = FEATURES.get(feature, ((0, 0), ""))
        if KERNEL < version:
            pytest.skip("kernel %s lacks %s (Linux %d.%d+)" % (os.uname().release, what, *version))


dataonly = pytest.mark.skipif(KERNEL < FEATURES["dataonly"][0],
                              reason="kernel %s lacks data-only overlay lower layers (Linux 6.5+)"
                              % os.uname().release)


def _unoctal(field: str) -> bytes:
    """Undo the kernel's octal escapes (space, tab, newline, backslash) in mountinfo."""
    raw = field.encode()
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1:i + 4].isdigit() and len(raw[i + 1:i + 4]) == 3:
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def mounts_at(target) -> List[tuple]:
    """(fstype, source) of each mount whose mount point is ``target``."""
    want = os.fsencode(os.path.realpath(target))
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            sep = fields.index("-")
            if _unoctal(fields[4]) == want:
                found.append((fields[sep + 1], fields[sep + 2]))
    return found


def mount_flags(target) -> List[str]:
    want = os.fsencode(os.path.realpath(target))
    for line in open("/proc/self/mountinfo"):
        fields = line.rstrip("\n").split(" ")
        if _unoctal(fields[4]) == want:
            return fields[5].split(",")
    return []


# -- fixtures: leak checks, cleanup, /sbin install, user namespaces --------------------
# (Here rather than in tests/kernel/conftest.py: a second module named
# "conftest" would shadow tests/conftest.py for `from conftest import ...`.)

def mountinfo(prefixes: Tuple[bytes, ...]) -> List[str]:
    """Mounts (point, type, source) under ``prefixes``.

    Only those: other processes on this machine mount things meanwhile.
    """
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            sep = fields.index("-")
            if _unoctal(fields[4]).startswith(prefixes):
                result.append("%s %s %s" % (fields[4], fields[sep + 1], fields[sep + 2]))
    return sorted(result)


def _mounted(target: str) -> bool:
    want = os.fsencode(os.path.realpath(target))
    with open("/proc/self/mountinfo") as f:
        return any(_unoctal(line.split(" ")[4]) == want for line in f)


def temp_dirs() -> List[str]:
    return sorted(glob.glob("/run/.composefs.*") + glob.glob(os.path.join(tempfile.gettempdir(), ".composefs.*")))


class State:
    def __init__(self, base: str) -> None:
        self.base = base
        prefixes = (os.fsencode(base), b"/run/.composefs.", os.fsencode(os.path.join(tempfile.gettempdir(), ".composefs.")))
        self.mounts = mountinfo(prefixes)
        self.loops = {dev: f for dev, f in bound_devices().items() if f.startswith(base)}
        self.tmpdirs = temp_dirs()

    def diff(self, other: "State") -> Dict[str, object]:
        out: Dict[str, object] = {}
        if self.mounts != other.mounts:
            out["mounts"] = sorted(set(other.mounts) ^ set(self.mounts))
        if self.loops != other.loops:
            out["loops"] = {k: v for k, v in other.loops.items() if self.loops.get(k) != v}
        if self.tmpdirs != other.tmpdirs:
            out["tmpdirs"] = sorted(set(other.tmpdirs) ^ set(self.tmpdirs))
        return out


def settled_diff(before: State, wait: float = 10.0) -> Dict[str, object]:
    """Differences to ``before``; waits a little, as loop autoclear may run deferred."""
    deadline = time.monotonic() + wait
    while True:
        diff = before.diff(State(before.base))
        if not diff or time.monotonic() > deadline:
            return diff
        time.sleep(0.05)


class Mounts:
    """Targets mounted by a test: unmounted at teardown, whatever happened."""

    def __init__(self) -> None:
        self.targets: List[str] = []

    def add(self, target: "os.PathLike[str] | str") -> None:
        self.targets.append(os.fspath(target))

    def umount(self, target: "os.PathLike[str] | str") -> None:
        subprocess.run(["umount", os.fspath(target)], check=True, capture_output=True)
        if os.fspath(target) in self.targets:
            self.targets.remove(os.fspath(target))

    def cleanup(self) -> None:
        for target in reversed(self.targets):
            while _mounted(target):
                res = subprocess.run(["umount", target], capture_output=True)
                if res.returncode != 0:
                    subprocess.run(["umount", "-l", target], capture_output=True)
                    break
        self.targets.clear()


@pytest.fixture
def no_leaks(tmp_path_factory):
    """Fail the test if it leaves a mount, a bound loop device or a temp dir behind.

    Looked at: mounts under the pytest temp base and our temp dir names, loop
    devices backed by files there (the tests keep every image there)."""
    before = State(str(tmp_path_factory.getbasetemp()))
    yield before
    diff = settled_diff(before)
    assert not diff, "left behind: %r" % diff


@pytest.fixture
def mounts():
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


SBIN_HELPER = Path("/sbin/mount.composefs")


@pytest.fixture
def sbin_helper(tmp_path_factory):
    """Our helper installed as /sbin/mount.composefs; what was there comes back after."""
    import sys

    script = Path(sys.executable).parent / "mount.composefs"
    if not script.is_file():
        pytest.skip("our mount.composefs console script is not installed in %s (pip install -e .)" % script.parent)
    backup: Optional[Path] = None
    if os.path.lexists(SBIN_HELPER):
        backup = tmp_path_factory.mktemp("sbin-backup") / "mount.composefs"
        shutil.move(str(SBIN_HELPER), str(backup))
    try:
        shutil.copy2(str(script), str(SBIN_HELPER))
        os.chmod(str(SBIN_HELPER), 0o755)
        yield SBIN_HELPER
    finally:
        if os.path.lexists(SBIN_HELPER):
            os.unlink(str(SBIN_HELPER))
        if backup is not None:
            shutil.move(str(backup), str(SBIN_HELPER))


class UserNamespace:
    """A sleeping child in a new user namespace mapping inner 0.. to outer ``base``.."""

    def __init__(self, base: int, count: int) -> None:
        if shutil.which("unshare") is None:
            pytest.skip("unshare (util-linux) not on PATH: needed to create a user namespace")
        self.proc = subprocess.Popen(["unshare", "--user", "--", "sleep", "600"])
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while os.readlink("/proc/%d/ns/user" % self.proc.pid) == own:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                pytest.skip("could not create a user namespace with unshare --user")
            time.sleep(0.01)
        for name in ("uid_map", "gid_map"):
            with open("/proc/%d/%s" % (self.proc.pid, name), "w") as f:
                f.write("0 %d %d\n" % (base, count))
        self.path = "/proc/%d/ns/user" % self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def userns():
    ns = UserNamespace(100000, 65536)
    try:
        yield ns
    finally:
        ns.close()


# -- trees and snapshots ------------------------------------------------------------

def make_source(base: Path, name: str = "src") -> Path:
    """A tree with every kind of inode and metadata composefs carries."""
    src = base / name
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "name with space, comma: colon=eq").mkdir()
    (src / "empty").write_bytes(b"")
    (src / "small").write_bytes(b"tiny file\n")
    (src / "big").write_bytes(random.Random(1).randbytes(200_000))
    (src / "sub" / "same-as-big").write_bytes((src / "big").read_bytes())
    (src / "sub" / "deeper" / "page").write_bytes(b"p" * 4096)
    (src / "name with space, comma: colon=eq" / "new\nline").write_bytes(b"x" * 100)
    (src / "setuid").write_bytes(b"#!/bin/sh\n" * 20)
    os.chmod(src / "setuid", 0o4755)
    (src / "sub" / "mode600").write_bytes(b"secret" * 30)
    os.chmod(src / "sub" / "mode600", 0o600)
    os.chown(src / "sub" / "mode600", 1000, 1001)
    os.chown(src / "sub", 4242, 4343)
    os.symlink("sub/deeper/page", src / "link")
    os.symlink("x" * 3000, src / "longlink")
    os.link(src / "big", src / "hardlink-to-big")
    os.link(src / "small", src / "sub" / "hardlink-to-small")
    os.mkfifo(src / "fifo")
    os.mknod(src / "chardev", 0o620 | stat.S_IFCHR, os.makedev(4, 64))
    os.mknod(src / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.setxattr(src / "small", "user.comment", b"hello xattr")
    os.setxattr(src / "sub", "user.dir", b"\x00\xff binary")
    os.setxattr(src / "big", "trusted.private", b"t")
    os.utime(src / "small", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(src / "sub" / "deeper", ns=(0, 86_400_000_000_007))
    return src


def snapshot(top: Path, xattr_prefixes=("user.", "trusted.")) -> Dict[str, dict]:
    """What a reader of the tree sees, per relative path, plus hard link groups."""
    result: Dict[str, dict] = {}
    inodes: Dict[tuple, List[str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            st = os.lstat(path)
            entry = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry["data"] = f.read()
                entry["size"] = st.st_size
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = st.st_rdev
            # The VFS answers ENODATA for user.* on anything but files and directories.
            prefixes = xattr_prefixes if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) else tuple(
                p for p in xattr_prefixes if p != "user.")
            entry["xattrs"] = {
                k: os.getxattr(path, k, follow_symlinks=False)
                for k in os.listxattr(path, follow_symlinks=False) if k.startswith(prefixes)
            }
            result[rel] = entry
    result["<hardlinks>"] = {"groups": sorted(sorted(g) for g in inodes.values() if len(g) > 1)}
    return result


def source_view(src: Path) -> Dict[str, dict]:
    """What a mount of an image of ``src`` must show.

    mkcomposefs 1.0.8 (C, and ours byte for byte) stores hard-linked files of
    a source directory as separate inodes with the same content, so the mount
    has no hard links there; images from dumps keep them (tested below).
    """
    view = snapshot(src)
    view["<hardlinks>"] = {"groups": []}
    return view


def assert_same_tree(expected: Dict[str, dict], seen: Dict[str, dict]) -> None:
    assert sorted(seen) == sorted(expected)
    for rel, entry in expected.items():
        got = seen[rel]
        if "mode" in entry and stat.S_ISDIR(entry["mode"]):
            # Directory sizes and nlink are filesystem-specific; the rest must match.
            assert {k: got[k] for k in entry} == entry, rel
        else:
            assert got == entry, rel


# -- helpers ---------------------------------------------------------------------------

def build_ours(ours, src: Path, image: Path, store: Path) -> None:
    store.mkdir(exist_ok=True)
    res = ours.run("mkcomposefs", "--digest-store=%s" % store, src, image)
    assert res.returncode == 0, res.stderr


def helper(ours, *args, **kwargs):
    return ours.run("mount.composefs", *args, **kwargs)


def mount_cli(ours, mounts, image, target, options: str, tool=None):
    res = (tool or helper)(ours, "-o", options, image, target)
    assert res.returncode == 0, res.stderr.decode()
    mounts.add(target)
    assert [fs for fs, _ in mounts_at(target)] == ["overlay"]
    return res


@pytest.fixture
def tree(tmp_path, ours):
    """(source dir, our image of it, its object store, an empty mount point)."""
    src = make_source(tmp_path)
    image = tmp_path / "image.cfs"
    store = tmp_path / "objects"
    build_ours(ours, src, image, store)
    target = tmp_path / "mnt"
    target.mkdir()
    return src, image, store, target


# -- the mounted tree equals the source ------------------------------------------------

@dataonly
def test_cli_mount_gives_back_the_source(tree, ours, mounts):
    src, image, store, target = tree
    mount_cli(ours, mounts, image, target, "basedir=%s" % store)
    assert mounts_at(target) == [("overlay", "composefs")]
    assert_same_tree(source_view(src), snapshot(target))
    mounts.umount(target)
    assert not mounts_at(target)


@dataonly
@pytest.mark.parametrize("erofs_source", ["file", "loop"])
@pytest.mark.parametrize("lower", ["fd", "tmpdir", "legacy"])
def test_every_mount_path(tree, mounts, erofs_source, lower):
    """Each kernel interface (also the fallbacks for older kernels) gives the same tree."""
    need(erofs_source, lower)
    src, image, store, target = tree
    result = mount_composefs(image, target, [store], erofs_source=erofs_source, lower=lower)
    mounts.add(target)
    assert result.lower == lower and result.erofs_source.startswith(erofs_source)
    if erofs_source == "loop":
        device = result.erofs_source.split(":", 1)[1]
        assert bound_devices()[device] == str(image)
    assert_same_tree(source_view(src), snapshot(target))
    mounts.umount(target)
    # no_leaks checks that the loop device auto-cleared and the temp dir is gone.


@dataonly
def test_auto_uses_no_temporary_mount(tree, mounts):
    """On this kernel (6.15+) the EROFS layer is passed by fd: never attached anywhere."""
    src, image, store, target = tree
    before = Path("/proc/self/mountinfo").read_text().count("\n")
    result = mount_composefs(image, target, [store])
    mounts.add(target)
    if KERNEL >= (6, 15):
        assert (result.erofs_source, result.lower) == ("file", "fd")
        assert Path("/proc/self/mountinfo").read_text().count("\n") == before + 1
        assert "erofs" not in [fs for fs, _ in mounts_at(target)]


WHITEOUT_DIR_MARKERS = ("trusted.overlay.whiteouts", "user.overlay.whiteouts",
                        "trusted.overlay.opaque", "user.overlay.opaque")


def node_expectations(root: Node) -> Dict[str, dict]:
    """What the mount must show for a tree read back from an image.

    Whiteouts (0/0 character devices) are stored escaped, so the composefs
    mount itself shows them as empty regular files carrying the whiteout
    xattrs (an overlay stacked on top then sees whiteouts).  The VFS only
    lets user.* xattrs be read on regular files and directories.
    """
    result: Dict[str, dict] = {}
    groups: Dict[int, List[str]] = {}
    aliased = {id(n.resolve()) for _, n in root.walk() if n.link_to is not None}
    for path, node in root.walk():
        if path == b"/":
            continue
        rel = os.fsdecode(path[1:])
        real = node.resolve()
        mode = real.mode
        extra: Dict[str, bytes] = {}
        if real.is_whiteout():
            mode = stat.S_IFREG | (real.mode & 0o7777)
            extra = {"trusted.overlay.whiteout": b"", "user.overlay.whiteout": b""}
        entry = {
            "mode": mode,
            "uid": OVERFLOW_ID if real.uid == 0xFFFFFFFF else real.uid,
            "gid": OVERFLOW_ID if real.gid == 0xFFFFFFFF else real.gid,
            "mtime_ns": real.mtime_sec * 10**9 + real.mtime_nsec,
        }
        if stat.S_ISREG(mode):
            entry["size"] = real.size
            entry["data"] = real.content if real.content is not None else CONTENTS.get(real.digest or b"", b"")
            groups.setdefault(id(real), []).append(rel)
        elif real.is_symlink():
            entry["target"] = os.fsdecode(real.payload or b"")
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            entry["rdev"] = real.rdev
        readable = (b"user.", b"trusted.") if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else (b"trusted.",)
        xattrs = {os.fsdecode(k): v for k, v in real.xattrs.items() if k.startswith(readable)}
        xattrs.update(extra)
        entry["xattrs"] = xattrs
        # The writer marks the directory of a whiteout's first dump entry; for a
        # hard-linked whiteout that may not be the entry the reader calls first.
        if real.is_dir():
            whiteouts = [c for c in real.children.values() if c.resolve().is_whiteout()]
            if any(c.link_to is None and id(c) not in aliased for c in whiteouts):
                entry["has_whiteouts"] = "surely"
            elif whiteouts:
                entry["has_whiteouts"] = "maybe"
        result[rel] = entry
    result["<hardlinks>"] = {"groups": sorted(sorted(g) for g in groups.values() if len(g) > 1)}
    return result


def drop_whiteout_markers(expected: Dict[str, dict], seen: Dict[str, dict]) -> None:
    """Directories holding whiteouts carry marker xattrs; check and drop them."""
    for rel, entry in expected.items():
        marked = entry.pop("has_whiteouts", "")
        if marked == "surely":
            assert seen[rel]["xattrs"].get("trusted.overlay.whiteouts") == b"", rel
        if marked:
            for key in WHITEOUT_DIR_MARKERS:
                entry["xattrs"].pop(key, None)
                seen[rel]["xattrs"].pop(key, None)


CONTENTS: Dict[bytes, bytes] = {}


def drop_kernel_interpreted_xattrs(root: Node) -> None:
    """Remove xattrs whose effect in a mount is the kernel's, not data.

    ``trusted.overlay.*``/``user.overlay.*`` are stored escaped, but the
    inverse (reader) view is ambiguous for them (a user-set escaped whiteout
    reads back as a whiteout); ``system.posix_acl_*`` with random bytes make
    every access EINVAL; a bare ``user.``/``trusted.`` name cannot be read
    back (EINVAL).  Their writing is checked against C mkcomposefs in
    tests/core; here the mount is.  Owner 4294967295 is (uid_t)-1, which the
    kernel shows as the overflow id and for which even root loses its
    DAC override (a 000 directory with it cannot be listed): it becomes
    4294967294 here and is checked separately.
    """
    for _, node in root.walk():
        if node.link_to is None:
            node.uid = 0xFFFFFFFE if node.uid == 0xFFFFFFFF else node.uid
            node.gid = 0xFFFFFFFE if node.gid == 0xFFFFFFFF else node.gid
            # Also a bare "user." or "trusted.": listed, but getxattr() refuses the empty name.
            for key in [k for k in node.xattrs if k.startswith((b"trusted.overlay.", b"user.overlay.", b"system."))
                        or k in (b"user.", b"trusted.")]:
                del node.xattrs[key]


def externalize(root: Node, store: Path, rng: random.Random) -> None:
    """Give every regular file without inline content a real object in ``store``."""
    for _, node in root.walk():
        if node.link_to is not None or not node.is_reg() or node.content is not None:
            continue
        if node.size == 0:
            node.payload = node.digest = None
            continue
        size = min(node.size, rng.choice([1, 100, 4096, 5000, 70000]))
        data = rng.randbytes(size)
        node.size = size
        node.digest = digest_bytes(data)
        node.payload = digest_to_path(node.digest)
        CONTENTS[node.digest] = data
        obj = store / os.fsdecode(node.payload)
        obj.parent.mkdir(exist_ok=True)
        obj.write_bytes(data)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@dataonly
@given(text=dump_texts(max_entries=20))
def test_generated_dump_images_mount_and_read_back(tmp_path_factory, text):
    base = tmp_path_factory.mktemp("gen")
    store = base / "objects"
    store.mkdir()
    root = parse_dump(io.BytesIO(text))
    drop_kernel_interpreted_xattrs(root)
    externalize(root, store, random.Random(len(text)))
    image = base / "image.cfs"
    image.write_bytes(build_image(root))
    expected = node_expectations(read_image_file(str(image)))
    target = base / "mnt"
    target.mkdir()
    mount_composefs(image, target, [store])
    try:
        seen = snapshot(target)
    finally:
        api.umount(target)
    drop_whiteout_markers(expected, seen)
    assert_same_tree(expected, seen)


# -- cross checks with the C tools -------------------------------------------------------

@dataonly
@pytest.mark.oracle
def test_ours_mounts_c_images(tmp_path, oracle, ours, mounts):
    src = make_source(tmp_path)
    store = tmp_path / "objects"
    store.mkdir()
    image = tmp_path / "c.cfs"
    res = oracle.run("mkcomposefs", "--digest-store=%s" % store, src, image)
    assert res.returncode == 0, res.stderr
    target = tmp_path / "mnt"
    target.mkdir()
    mount_cli(ours, mounts, image, target, "basedir=%s" % store)
    assert_same_tree(source_view(src), snapshot(target))


@dataonly
@pytest.mark.oracle
def test_c_helper_mounts_our_images(tree, oracle, ours, mounts):
    src, image, store, target = tree
    mount_cli(ours, mounts, image, target, "basedir=%s" % store,
              tool=lambda _ours, *args: oracle.run("mount.composefs", *args))
    assert_same_tree(source_view(src), snapshot(target))
    mounts.umount(target)


@dataonly
@pytest.mark.oracle
def test_same_mount_options_as_c(tree, oracle, ours, mounts):
    """Both helpers make the same overlay: same visible tree and superblock flags."""
    src, image, store, target = tree
    upper, work = target.parent / "upper", target.parent / "work"
    seen = []
    for run in (lambda _o, *a: oracle.run("mount.composefs", *a), None):
        for d in (upper, work):
            d.mkdir()
        mount_cli(ours, mounts, image, target, "basedir=%s,upperdir=%s,workdir=%s" % (store, upper, work),
                  tool=run)
        opts = [line.split(" - ")[1].split()[2] for line in open("/proc/self/mountinfo")
                if line.split()[4] == str(target)]
        seen.append((snapshot(target), sorted(o for o in opts[0].split(",")
                                              if o.split("=")[0] in ("redirect_dir", "metacopy", "rw", "ro"))))
        (target / "new").write_bytes(b"written")
        assert (upper / "new").read_bytes() == b"written"
        mounts.umount(target)
        for d in (upper, work):
            subprocess.run(["rm", "-rf", str(d)], check=True)
    assert seen[0] == seen[1]


# -- options: multiple basedirs, upper/work, ro/rw, idmap ---------------------------------

def split_store(store: Path, first: Path, second: Path) -> None:
    """Move the objects of ``store`` into two basedirs, alternating."""
    for i, obj in enumerate(sorted(p for p in store.rglob("*") if p.is_file())):
        dest = (first if i % 2 == 0 else second) / obj.parent.name / obj.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(obj, dest)


@dataonly
def test_multiple_basedirs(tree, ours, mounts, tmp_path):
    src, image, store, target = tree
    one, two = tmp_path / "one", tmp_path / "two"
    split_store(store, one, two)
    assert any(one.rglob("*")) and any(p.is_file() for p in two.rglob("*"))
    mount_cli(ours, mounts, image, target, "basedir=%s:%s" % (one, two))
    assert_same_tree(source_view(src), snapshot(target))
    mounts.umount(target)
    # With one basedir missing, the objects there cannot be read.
    mount_cli(ours, mounts, image, target, "basedir=%s" % one)
    with pytest.raises(OSError):
        for p in target.rglob("*"):
            if p.is_file() and not p.is_symlink():
                p.read_bytes()


@dataonly
def test_readonly_without_upperdir(tree, ours, mounts):
    src, image, store, target = tree
    for opt in ("ro", "rw"):
        mount_cli(ours, mounts, image, target, "basedir=%s,%s" % (store, opt))
        with pytest.raises(OSError) as info:
            (target / "new").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        mounts.umount(target)


@dataonly
def test_upperdir_workdir_rw_and_ro(tree, ours, mounts, tmp_path):
    src, image, store, target = tree
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    mount_cli(ours, mounts, image, target, "basedir=%s,upperdir=%s,workdir=%s" % (store, upper, work))
    (target / "new").write_bytes(b"written")
    (target / "small").write_bytes(b"changed")  # copy-up of an inline file
    with open(target / "big", "r+b") as f:  # copy-up of an external (metacopy) file
        f.seek(10)
        f.write(b"Z")
    os.unlink(target / "sub" / "mode600")
    assert (upper / "new").read_bytes() == b"written"
    assert (upper / "small").read_bytes() == b"changed"
    big = (src / "big").read_bytes()
    assert (upper / "big").read_bytes() == big[:10] + b"Z" + big[11:]
    assert stat.S_ISCHR((upper / "sub" / "mode600").lstat().st_mode)  # whiteout
    mounts.umount(target)
    # The image itself and the objects are untouched.
    mount_cli(ours, mounts, image, target, "basedir=%s" % store)
    assert_same_tree(source_view(src), snapshot(target))
    mounts.umount(target)
    # ro with an upperdir: the changes are visible, nothing can be written.
    mount_cli(ours, mounts, image, target, "basedir=%s,upperdir=%s,workdir=%s,ro" % (store, upper, work))
    assert (target / "new").read_bytes() == b"written"
    assert not (target / "sub" / "mode600").exists()
    with pytest.raises(OSError) as info:
        (target / "other").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    assert "ro" in [line.split()[5].split(",")[0] for line in open("/proc/self/mountinfo")
                    if line.split()[4] == str(target)]


@dataonly
def test_idmap(tree, ours, mounts, userns):
    src, image, store, target = tree
    mount_cli(ours, mounts, image, target, "basedir=%s,idmap=%s" % (store, userns.path))
    expected = source_view(src)
    for rel, entry in expected.items():
        if "uid" in entry:
            entry["uid"] += 100000
            entry["gid"] += 100000
    assert (target / "sub" / "mode600").stat().st_uid == 101000
    assert_same_tree(expected, snapshot(target))


@dataonly
def test_vfs_flags_reach_the_mount(tree, ours, mounts):
    src, image, store, target = tree
    mount_cli(ours, mounts, image, target, "basedir=%s,nosuid,nodev,noexec,noatime,nofail,x-systemd.foo" % store)
    line = [l for l in open("/proc/self/mountinfo") if l.split()[4] == str(target)][0]
    flags = line.split()[5].split(",")
    for flag in ("nosuid", "nodev", "noexec", "noatime"):
        assert flag in flags
    with pytest.raises(PermissionError):
        subprocess.run([str(target / "setuid")], check=True)


# -- verity -----------------------------------------------------------------------------

def test_verity_require_without_fsverity_objects(tree, ours, mounts):
    """verity on objects without fs-verity: refused up front where the kernel or the
    basedir's filesystem cannot have fs-verity (saying which), else reads fail with EIO."""
    src, image, store, target = tree
    problem = verity_problem(str(store))
    if problem is None:
        # fs-verity is possible here (e.g. the QEMU guest): the mount works, reads fail.
        need("verity")
        mount_cli(ours, mounts, image, target, "basedir=%s,verity" % store)
    else:
        res = helper(ours, "-o", "basedir=%s,verity" % store, image, target)
        assert res.returncode == 1
        err = res.stderr.decode()
        assert "verity requested but impossible for basedir %s: %s" % (store, problem) in err
        if _kernel_has_fsverity() is False:
            assert "the running kernel is built without CONFIG_FS_VERITY" in err
        else:
            assert "the filesystem" in problem
        assert not mounts_at(target)
        # tryverity: where it cannot be had, the mount is made without verity.
        mount_cli(ours, mounts, image, target, "basedir=%s,tryverity" % store)
        assert (target / "big").read_bytes() == (src / "big").read_bytes()
        mounts.umount(target)
        # What overlayfs itself does with verity=require on such objects (made with
        # our mount API calls, without the pre-check): inline files read, external ones fail.
        need("verity", "fd", "file")
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        result = MountResult()
        erofs_fd = _mount_erofs(fd, image, False, None, "file", result)
        try:
            ovl_fd = _overlay_new_api(_OverlayPlan([str(store)], None, None, "require", 0), erofs_fd, None,
                                      result)
            api.move_mount(ovl_fd, target)
            os.close(ovl_fd)
            mounts.add(target)
        finally:
            os.close(erofs_fd)
            os.close(fd)
        assert result.verity
    assert (target / "small").read_bytes() == b"tiny file\n"
    with pytest.raises(OSError) as info:
        (target / "big").read_bytes()
    assert info.value.errno == errno.EIO


def test_digest_on_image_without_verity(tree, ours):
    src, image, store, target = tree
    res = helper(ours, "-o", "basedir=%s,digest=%s" % (store, "ab" * 32), image, target)
    assert res.returncode == 1
    err = res.stderr.decode()
    if _kernel_has_fsverity() is False:
        assert "digest= needs fs-verity on the image %s" % image in err
        assert "kernel is built without CONFIG_FS_VERITY" in err
    else:
        # ENODATA where the filesystem has fs-verity, else the filesystem is named.
        assert "Image has no fs-verity" in err or "digest= needs fs-verity on the image %s" % image in err
    assert not mounts_at(target)


def test_bad_digest_syntax(tree, ours):
    src, image, store, target = tree
    res = helper(ours, "-o", "basedir=%s,digest=xyz" % store, image, target)
    assert res.returncode == 1 and b"invalid digest 'xyz'" in res.stderr


# -- awkward paths ------------------------------------------------------------------------

AWKWARD = ["sp ace", "com,ma", "co:lon", "e=q", "new\nline", "back\\slash", "all ,:=\\\n"]


def awkward_tree(tmp_path, ours, name):
    """(source, image, store, mount point), each named with ``name`` in a directory named so."""
    src = make_source(tmp_path)
    base = tmp_path / name
    base.mkdir()
    image, store, target = base / ("img" + name), base / ("objects" + name), base / ("mnt" + name)
    build_ours(ours, src, image, store)
    target.mkdir()
    return src, image, store, target


@dataonly
@pytest.mark.parametrize("name", AWKWARD)
@pytest.mark.parametrize("lower", ["auto", "tmpdir", "legacy"])
def test_awkward_paths_api(tmp_path, ours, mounts, name, lower):
    need(lower)
    src, image, store, target = awkward_tree(tmp_path, ours, name)
    try:
        mount_composefs(image, target, [store], lower=lower)
    except ComposefsMountError as exc:
        # Only the classic option string may refuse, and only for a newline.
        assert lower == "legacy" and "\n" in name and "newline" in str(exc)
        return
    mounts.add(target)
    assert [fs for fs, _ in mounts_at(target)] == ["overlay"]
    assert_same_tree(source_view(src), snapshot(target))
    mounts.umount(target)


@dataonly
@pytest.mark.parametrize("name", AWKWARD)
@pytest.mark.parametrize("lower", ["auto", "tmpdir", "legacy"])
def test_awkward_upperdir_and_workdir(tree, tmp_path, mounts, name, lower):
    """overlayfs unescapes upperdir/workdir strings (not lowerdir+/datadir+): still the dirs asked for."""
    need(lower)
    src, image, store, target = tree
    upper, work = tmp_path / ("up" + name), tmp_path / ("wo" + name)
    upper.mkdir()
    work.mkdir()
    try:
        mount_composefs(image, target, [store], upperdir=upper, workdir=work, lower=lower)
    except ComposefsMountError as exc:
        assert lower == "legacy" and "\n" in name and "newline" in str(exc)
        return
    mounts.add(target)
    (target / "written").write_bytes(b"w")
    assert (upper / "written").read_bytes() == b"w"
    assert sorted(os.listdir(work)) == ["work"]
    mounts.umount(target)


@dataonly
@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_paths_cli(tmp_path, ours, mounts, name):
    src, image, store, target = awkward_tree(tmp_path, ours, name)
    mount_cli(ours, mounts, image, target, format_options([str(store)]))
    assert_same_tree(source_view(src), snapshot(target))


@dataonly
def test_basedir_colon_is_a_separator_like_c(tmp_path, ours, mounts):
    """basedir=/x/a:b means two directories (C syntax); never one named 'a:b'."""
    src = make_source(tmp_path)
    store = tmp_path / "a:b"
    build_ours(ours, src, tmp_path / "img", store)
    target = tmp_path / "mnt"
    target.mkdir()
    res = helper(ours, "-o", "basedir=%s" % store, tmp_path / "img", target)
    assert res.returncode == 1
    assert ("basedir %s does not exist" % (tmp_path / "a")).encode() in res.stderr
    mount_cli(ours, mounts, tmp_path / "img", target, "basedir=%s" % str(store).replace(":", "\\:"))
    assert_same_tree(source_view(src), snapshot(target))


# -- the mount point: no symbolic link in its path ---------------------------------------

@dataonly
@pytest.mark.parametrize("lower", ["auto", "tmpdir", "legacy"])
def test_symlinked_parent_of_the_mount_point_is_refused(tree, tmp_path, mounts, lower):
    """A link planted in a parent directory must not move a root mount elsewhere (agent, module)."""
    need(lower)
    src, image, store, target = tree
    real = tmp_path / "elsewhere"
    (real / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    mounts.add(real / "mnt")  # undone at teardown, should the mount happen after all
    with pytest.raises(ComposefsMountError) as info:
        mount_composefs(image, tmp_path / "link" / "mnt", [store], lower=lower)
    assert "mount point %s/link/mnt: %s/link is a symbolic link: refused" % (tmp_path, tmp_path) in str(info.value)
    assert not mounts_at(real / "mnt")
    # The mount point itself a link: refused as well.
    (tmp_path / "mntlink").symlink_to(target)
    with pytest.raises(ComposefsMountError, match="mntlink is a symbolic link: refused"):
        mount_composefs(image, tmp_path / "mntlink", [store], lower=lower)
    assert not mounts_at(target)
    # Named without links, the same place mounts (on the descriptor that was checked).
    mount_composefs(image, real / "mnt", [store], lower=lower)
    assert_same_tree(source_view(src), snapshot(real / "mnt"))
    mounts.umount(real / "mnt")


@dataonly
def test_helper_follows_links_like_c(tree, tmp_path, ours, mounts):
    """mount.composefs follows links in the target as the C helper does (mount(8) resolves them first)."""
    src, image, store, target = tree
    (tmp_path / "link").symlink_to(tmp_path)
    mount_cli(ours, mounts, image, tmp_path / "link" / "mnt", "basedir=%s" % store)
    assert_same_tree(source_view(src), snapshot(target))


# -- images that must not be mounted, or waited on -----------------------------------------

@pytest.mark.parametrize("how", ["api", "cli"])
def test_truncated_image_is_refused_before_mounting(tree, ours, mounts, how):
    """The kernel mounts a truncated image and then fails every read with EIO: refused up front."""
    src, image, store, target = tree
    data = image.read_bytes()
    short = image.with_name("short.cfs")
    short.write_bytes(data[:len(data) - 4096])
    mounts.add(target)  # undone at teardown, should the mount happen after all
    want = "image %s is truncated or damaged: its superblock declares %d blocks of 4096 bytes" % (short, len(data) // 4096)
    if how == "api":
        with pytest.raises(ComposefsMountError) as info:
            mount_composefs(short, target, [store])
        assert want in str(info.value)
    else:
        res = helper(ours, "-o", "basedir=%s" % store, short, target)
        assert res.returncode == 1 and want in res.stderr.decode(), res.stderr
    assert not mounts_at(target)


def test_image_whose_root_inode_is_past_its_end_is_refused(tree, mounts):
    src, image, store, target = tree
    data = bytearray(image.read_bytes())
    struct.pack_into("<I", data, 1024 + 36, 0)  # blocks: 0, so only the root inode's place tells
    short = image.with_name("short.cfs")
    short.write_bytes(bytes(data[:1024 + 128]))
    mounts.add(target)
    with pytest.raises(ComposefsMountError, match="image %s is truncated or damaged: its root inode" % short):
        mount_composefs(short, target, [store])
    assert not mounts_at(target)


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_fifo_or_device_as_image_is_refused_without_waiting(tree, tmp_path, ours, kind):
    """Opening a FIFO for reading waits for a writer: the helper must refuse it at once."""
    src, image, store, target = tree
    if kind == "FIFO":
        bad = tmp_path / "fifo.cfs"
        os.mkfifo(str(bad))
    else:
        bad = Path("/dev/zero")
    try:
        res = helper(ours, "-o", "basedir=%s" % store, bad, target, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("mount.composefs waited on a %s given as the image" % kind)
    assert res.returncode == 1
    assert "mount.composefs: image %s is not a regular file (%s)" % (bad, kind) in res.stderr.decode(), res.stderr
    assert not mounts_at(target)


def test_fifo_as_idmap_is_refused_without_waiting(tree, tmp_path, ours):
    src, image, store, target = tree
    fifo = tmp_path / "userns"
    os.mkfifo(str(fifo))
    try:
        res = helper(ours, "-o", "basedir=%s,idmap=%s" % (store, fifo), image, target, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("mount.composefs waited on a FIFO given as idmap")
    assert res.returncode == 1
    assert "mount.composefs: idmap: cannot make an idmapped mount with that user namespace" in res.stderr.decode()
    assert not mounts_at(target)


# -- mount(8) ------------------------------------------------------------------------------

@dataonly
def test_mount_t_composefs(tree, sbin_helper, mounts):
    src, image, store, target = tree
    res = subprocess.run(["mount", "-t", "composefs", "-o",
                          "basedir=%s,ro,nofail,_netdev,noauto,x-systemd.requires=foo" % store,
                          str(image), str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    mounts.add(target)
    assert mounts_at(target) == [("overlay", "composefs")]
    assert_same_tree(source_view(src), snapshot(target))
    res = subprocess.run(["umount", str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not mounts_at(target)


def test_mount_t_composefs_failure_and_fake(tree, sbin_helper):
    src, image, store, target = tree
    res = subprocess.run(["mount", "-t", "composefs", "-o", "basedir=%s/missing" % store, str(image),
                          str(target)], capture_output=True, text=True)
    assert res.returncode != 0
    assert "basedir %s/missing does not exist" % store in res.stderr
    # mount -f runs the helper with -f: everything checked, nothing mounted.
    res = subprocess.run(["mount", "-f", "-v", "-t", "composefs", "-o", "basedir=%s" % store, str(image),
                          str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not mounts_at(target)


@dataonly
def test_mount_namespace_option(tree, ours, mounts):
    """-N: the mount appears in the given mount namespace only."""
    src, image, store, target = tree
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip("%s (util-linux) not on PATH" % tool)
    child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sleep", "600"])
    try:
        own = os.readlink("/proc/self/ns/mnt")
        for _ in range(1000):
            if os.readlink("/proc/%d/ns/mnt" % child.pid) != own:
                break
            subprocess.run(["sleep", "0.01"])
        res = helper(ours, "-N", str(child.pid), "-o", "basedir=%s" % store, image, target)
        assert res.returncode == 0, res.stderr
        assert not mounts_at(target)
        inside = subprocess.run(["nsenter", "-t", str(child.pid), "-m", "--", "cat", str(target / "small")],
                                capture_output=True)
        assert inside.stdout == b"tiny file\n"
    finally:
        child.kill()
        child.wait()


# -- clear errors, nothing left behind ------------------------------------------------------

def _run_as(ours, setup: str, *args):
    """Our helper in a child that drops privileges after importing (the venv may sit
    under a 0700 home that an unprivileged user cannot read)."""
    code = ("import os, sys\nimport composefs_fleet.mount, composefs_fleet.errors\n"
            "from composefs_fleet_cli.mount_composefs import main\n%s\n"
            "sys.argv[0] = 'mount.composefs'\nsys.exit(main(sys.argv[1:]))" % setup)
    return subprocess.run([sys.executable, "-c", code] + [str(a) for a in args], capture_output=True)


def test_error_not_root(tree, ours):
    src, image, store, target = tree
    res = _run_as(ours, "os.setgroups([]); os.setgid(65534); os.setuid(65534)",
                  "-o", "basedir=%s" % store, image, target)
    assert res.returncode == 1, res.stderr
    assert b"mount.composefs: must be run as root (euid is 65534): mounting needs CAP_SYS_ADMIN" in res.stderr


def test_error_root_without_cap_sys_admin(tree, ours):
    src, image, store, target = tree
    # Drop CAP_SYS_ADMIN (21) from the bounding, effective and permitted sets with prctl/capset via setpriv.
    if subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) not available to drop CAP_SYS_ADMIN")
    code = ("import sys\nfrom composefs_fleet_cli.mount_composefs import main\n"
            "sys.argv[0] = 'mount.composefs'\nsys.exit(main(sys.argv[1:]))")
    res = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--",
                          sys.executable, "-c", code, "-o", "basedir=%s" % store, str(image), str(target)],
                         capture_output=True)
    assert res.returncode == 1, res.stderr
    assert b"mount.composefs: euid is 0 but CAP_SYS_ADMIN is missing: mounting needs it" in res.stderr


@pytest.mark.parametrize("case,message", [
    ("missing image", "image {image}.missing does not exist"),
    ("not composefs", "{image}.bad is not a composefs image: bad magic 0x6c6c6568"),
    ("not erofs", "{image}.noerofs is not an EROFS image: bad superblock magic 0x00000000"),
    ("short", "{image}.short is not a composefs image: only 3 bytes long"),
    ("directory image", "image {store} is not a regular file"),
    ("missing basedir", "basedir {store}.missing does not exist"),
    ("basedir not dir", "basedir {image} is not a directory"),
    ("missing target", "mount point {target}.missing does not exist"),
    ("target not dir", "mount point {image} is not a directory"),
    ("upper without work", "Both workdir and upperdir must be specified if used"),
    ("missing upperdir", "upperdir {target}.u does not exist"),
    ("bad idmap path", "Failed to open userns {target}.ns: No such file or directory"),
    ("idmap not userns", "idmap: cannot make an idmapped mount with that user namespace"),
    ("unknown option", "Unsupported option bogus"),
])
def test_errors(tree, ours, case, message):
    src, image, store, target = tree
    Path(str(image) + ".bad").write_bytes(b"hello world" * 200)
    good = image.read_bytes()
    Path(str(image) + ".noerofs").write_bytes(good[:1024] + bytes(200))
    Path(str(image) + ".short").write_bytes(b"abc")
    args = {
        "missing image": (str(image) + ".missing", "basedir=%s" % store, target),
        "not composefs": (str(image) + ".bad", "basedir=%s" % store, target),
        "not erofs": (str(image) + ".noerofs", "basedir=%s" % store, target),
        "short": (str(image) + ".short", "basedir=%s" % store, target),
        "directory image": (store, "basedir=%s" % store, target),
        "missing basedir": (image, "basedir=%s:%s.missing" % (store, store), target),
        "basedir not dir": (image, "basedir=%s" % image, target),
        "missing target": (image, "basedir=%s" % store, str(target) + ".missing"),
        "target not dir": (image, "basedir=%s" % store, image),
        "upper without work": (image, "basedir=%s,upperdir=/tmp" % store, target),
        "missing upperdir": (image, "basedir=%s,upperdir=%s.u,workdir=/tmp" % (store, target), target),
        "bad idmap path": (image, "basedir=%s,idmap=%s.ns" % (store, target), target),
        "idmap not userns": (image, "basedir=%s,idmap=/proc/self/ns/mnt" % store, target),
        "unknown option": (image, "basedir=%s,bogus" % store, target),
    }[case]
    res = helper(ours, "-o", args[1], args[0], args[2])
    assert res.returncode == 1
    want = "mount.composefs: " + message.format(image=image, store=store, target=target)
    assert want in res.stderr.decode(), res.stderr
    assert not mounts_at(target)


@pytest.mark.parametrize("erofs_source", ["file", "loop"])
@pytest.mark.parametrize("lower", ["fd", "tmpdir", "legacy"])
def test_overlay_failure_leaves_nothing(tree, tmp_path, erofs_source, lower):
    """A failure after the EROFS mount (and loop device) exist undoes them."""
    need(erofs_source, lower)
    src, image, store, target = tree
    upper = tmp_path / "upper"
    upper.mkdir()
    # workdir on another filesystem than upperdir: overlayfs refuses.
    other = Path("/dev/shm") if os.path.isdir("/dev/shm") else None
    if other is None or os.stat(other).st_dev == os.stat(upper).st_dev:
        pytest.skip("need /dev/shm on another filesystem than %s for a cross-device workdir" % tmp_path)
    work = Path(os.path.join(str(other), "composefs-test-work-%d" % os.getpid()))
    work.mkdir(exist_ok=True)
    try:
        with pytest.raises(ComposefsMountError) as info:
            mount_composefs(image, target, [store], upperdir=upper, workdir=work, erofs_source=erofs_source,
                            lower=lower)
        assert "Failed to mount composefs %s" % image in str(info.value)
        assert not mounts_at(target)
    finally:
        work.rmdir()


def test_erofs_failure_leaves_no_loop(tmp_path):
    """An image the kernel refuses (corrupt root inode) fails cleanly through the loop path too."""
    src = make_source(tmp_path)
    data = bytearray(build_image(build_tree_from_directory(str(src))))
    data[1024 + 12] = 30  # blkszbits: an impossible block size
    image = tmp_path / "corrupt.cfs"
    image.write_bytes(bytes(data))
    target = tmp_path / "mnt"
    target.mkdir()
    for source in ("file", "loop") if KERNEL >= FEATURES["file"][0] else ("loop",):
        with pytest.raises(ComposefsMountError) as info:
            mount_composefs(image, target, [tmp_path], erofs_source=source)
        assert "cannot mount %s as EROFS" % image in str(info.value)


@dataonly
def test_dump_hard_links_and_devices_mount(tmp_path, mounts):
    """Hard links (from a dump), devices, fifos and whiteouts as the mount shows them."""
    data = b"external content\n" * 300
    digest = digest_bytes(data)
    store = tmp_path / "objects"
    (store / digest.hex()[:2]).mkdir(parents=True)
    (store / os.fsdecode(digest_to_path(digest))).write_bytes(data)
    dump = (b"/ 0 40755 2 0 0 0 1000.0 - - -\n"
            b"/ext %d 100644 2 7 8 0 1000.5 %s - %s user.k=v\n"
            b"/link 0 @100644 0 0 0 0 0.0 /ext - -\n"
            b"/inl 5 100600 2 0 0 0 2000.0 - hello -\n"
            b"/d 0 40700 2 1 2 0 3000.0 - - -\n"
            b"/d/inl2 0 @100600 0 0 0 0 0.0 /inl - -\n"
            b"/d/wh 0 20000 1 0 0 0 0.0 - - -\n"
            b"/tty 0 20620 1 0 5 1025 0.0 - - -\n"
            b"/sda 0 60660 1 0 6 2049 0.0 - - -\n"
            b"/pipe 0 10644 1 0 0 0 0.0 - - -\n"
            b"/minus1 0 100644 1 4294967295 4294967295 0 0.0 - - -\n"
            % (len(data), digest_to_path(digest), digest.hex().encode()))
    image = tmp_path / "img.cfs"
    image.write_bytes(build_image(parse_dump(io.BytesIO(dump))))
    target = tmp_path / "mnt"
    target.mkdir()
    mount_composefs(image, target, [store])
    mounts.add(target)
    ext, link = os.stat(target / "ext"), os.stat(target / "link")
    assert (ext.st_ino, ext.st_dev) == (link.st_ino, link.st_dev) and ext.st_nlink == 2
    assert (target / "link").read_bytes() == data
    assert (ext.st_uid, ext.st_gid, ext.st_mtime_ns) == (7, 8, 1000 * 10**9 + 5)
    assert os.getxattr(target / "link", "user.k") == b"v"
    assert os.stat(target / "inl").st_ino == os.stat(target / "d" / "inl2").st_ino
    assert (target / "d" / "inl2").read_bytes() == b"hello"
    tty, sda = os.lstat(target / "tty"), os.lstat(target / "sda")
    assert stat.S_ISCHR(tty.st_mode) and tty.st_rdev == 1025 and (os.major(tty.st_rdev), os.minor(tty.st_rdev)) == (4, 1)
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 1)
    assert stat.S_ISFIFO(os.lstat(target / "pipe").st_mode)
    minus1 = os.lstat(target / "minus1")
    assert (minus1.st_uid, minus1.st_gid) == (OVERFLOW_ID, OVERFLOW_ID)
    wh = os.lstat(target / "d" / "wh")
    assert stat.S_ISREG(wh.st_mode) and wh.st_size == 0
    assert os.getxattr(target / "d" / "wh", "trusted.overlay.whiteout") == b""


@pytest.mark.parametrize("use_configure", [True, False], ids=["LOOP_CONFIGURE", "LOOP_SET_FD+STATUS64"])
def test_loop_device_is_readonly_and_autoclears(tmp_path, use_configure):
    from composefs_fleet.loopdev import attach_readonly

    backing = tmp_path / "backing"
    backing.write_bytes(b"\x5a" * 65536)
    fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    try:
        loop_fd, device = attach_readonly(fd, str(backing), use_configure=use_configure)
    finally:
        os.close(fd)
    name = os.path.basename(device)
    try:
        assert bound_devices()[device] == str(backing)
        assert Path("/sys/block/%s/ro" % name).read_text().strip() == "1"
        assert Path("/sys/block/%s/loop/autoclear" % name).read_text().strip() == "1"
        assert os.pread(loop_fd, 4, 4096) == b"\x5a" * 4
        # Writes are refused by the read-only device (opening it for writing may succeed).
        with pytest.raises(OSError) as info:
            w = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(w, b"x" * 4096, 0)
                os.fsync(w)
            finally:
                os.close(w)
        assert info.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES, errno.EIO)
        assert backing.read_bytes() == b"\x5a" * 65536
    finally:
        os.close(loop_fd)
    # no_leaks: closing the last descriptor detached the device.
