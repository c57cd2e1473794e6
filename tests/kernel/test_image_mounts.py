"""Images we write pass fsck.erofs and mount on this machine's kernel.

This is the smoke test of the core issue, done with the plain kernel steps
(mount(8) for the EROFS loop mount and the overlay); the full mount helper is
tested separately.  Reads go through the real overlayfs, redirect and metacopy
included, and must give back the source tree.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory

pytestmark = pytest.mark.kernel


def make_source(base):
    src = base / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").write_bytes(b"")
    (src / "small").write_bytes(b"tiny file\n")
    (src / "exactly64").write_bytes(b"6" * 64)
    (src / "big").write_bytes(os.urandom(200_000))
    (src / "sub" / "same-as-big").write_bytes((src / "big").read_bytes())
    (src / "sub" / "deeper" / "page").write_bytes(b"p" * 4096)
    (src / "sub" / "mode600").write_bytes(b"secret" * 30)
    os.chmod(src / "sub" / "mode600", 0o600)
    os.symlink("sub/deeper/page", src / "link")
    os.symlink("x" * 3000, src / "longlink")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "small", "user.comment", b"hello xattr")
    os.setxattr(src / "sub", "trusted.overlay.opaque", b"y")  # must come back escaped-as-given
    os.utime(src / "small", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return src


def snapshot(top):
    """Everything a reader of the tree can see, per relative path."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, top)
            st = os.lstat(path)
            entry = {
                "mode": st.st_mode,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
            }
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry["data"] = f.read()
                entry["size"] = st.st_size
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            entry["user_xattrs"] = {
                k: os.getxattr(path, k, follow_symlinks=False)
                for k in os.listxattr(path, follow_symlinks=False) if k.startswith("user.")
            }
            result[rel] = entry
    return result


def test_fsck_erofs_accepts_our_images(tmp_path):
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs not installed (Debian package erofs-utils)")
    src = make_source(tmp_path)
    for min_version in (0, 1):
        image = tmp_path / ("v%d.img" % min_version)
        image.write_bytes(build_image(build_tree_from_directory(str(src)), min_version=min_version))
        proc = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_our_image_mounts_and_reads_back(tmp_path, kernel_mount):
    src = make_source(tmp_path)
    store = tmp_path / "objects"
    store.mkdir()
    tree = build_tree_from_directory(str(src), digest_store=str(store))
    image = tmp_path / "image.cfs"
    image.write_bytes(build_image(tree))
    merged = kernel_mount.mount_composefs(image, tmp_path / "merged", store)

    expected = snapshot(src)
    seen = snapshot(merged)
    assert sorted(seen) == sorted(expected)
    for rel, entry in expected.items():
        got = seen[rel]
        if stat.S_ISDIR(entry["mode"]):
            # Directory sizes and nlink are filesystem-specific; the rest must match.
            for key in ("mode", "uid", "gid", "mtime_ns", "user_xattrs"):
                assert got[key] == entry[key], (rel, key)
        else:
            assert got == entry, rel
    # Identical files share one object in the store.
    objects = [p for p in store.rglob("*") if p.is_file()]
    big_sizes = [p.stat().st_size for p in objects if p.stat().st_size == 200_000]
    assert len(big_sizes) == 1
