"""mountinfo parsing (the one parser): escapes, entries, stacks, overlay path options.

The parsing tests run anywhere; those marked ``kernel`` mount for real and
unmount in ``finally``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from composefs_fleet import mountinfo
from composefs_fleet.mount import mount_composefs
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image

LINE = (b"45 27 0:40 / /tmp/x/m\\0402,x:y=z\\012nl rw,relatime shared:12 master:3 - overlay composefs "
        b"ro,lowerdir+=/,datadir+=/srv/ob\\040j\\054s:1,datadir+=/srv/two,redirect_dir=on,verity=require,metacopy=on")

#: What Linux 6.18 shows for upperdir/workdir ``/u/a\b,c=d e:f`` given as fsconfig strings
#: (overlayfs keeps them escaped as given, ``\\`` for a backslash) and datadir+ ``/d/a\b``.
UPPER_LINE = (b"49 27 0:41 / /mnt rw,relatime - overlay composefs rw,lowerdir+=/,datadir+=/d/a\\134b,"
              b"upperdir=/u/a\\134\\134b\\054c=d\\040e:f,workdir=/w/a\\134\\134b\\054c=d\\040e:f,"
              b"redirect_dir=on,uuid=on,metacopy=on")
#: The same through mount(2)'s one option string: ``,`` and ``:`` escaped for overlayfs too.
LEGACY_LINE = (b"49 27 0:41 / /mnt rw,relatime - overlay composefs rw,lowerdir=/run/.composefs.q::/d/a\\134\\134b,"
               b"upperdir=/u/a\\134\\134b\\134\\054c=d\\040e\\134:f,workdir=/w/a\\134\\134b\\134\\054c=d\\040e\\134:f,"
               b"redirect_dir=on,uuid=on,metacopy=on")


def test_unescape():
    assert mountinfo.unescape(b"a\\040b\\011c\\012d\\134e\\054f") == b"a b\tc\nd\\e,f"
    assert mountinfo.unescape(b"no escapes") == b"no escapes"
    # Not an escape: fewer than three octal digits, or 8/9.
    assert mountinfo.unescape(b"x\\04") == b"x\\04"
    assert mountinfo.unescape(b"x\\089") == b"x\\089"
    assert mountinfo.unescape(b"\\") == b"\\"


def test_mountinfo_line():
    e = mountinfo.MountInfo(LINE)
    assert (e.mount_id, e.parent_id, e.dev) == (45, 27, "0:40")
    assert e.where == "/tmp/x/m 2,x:y=z\nnl"
    assert e.mount_options == ["rw", "relatime"]
    assert e.is_composefs()
    layout = e.layout()
    assert layout["basedirs"] == ["/srv/ob j,s:1", "/srv/two"]
    assert layout["verity"] == "require"
    assert layout["readonly"] is True
    assert layout["upperdir"] is None and layout["workdir"] is None


def test_mountinfo_legacy_and_upper():
    line = (b"50 27 0:41 / /mnt rw - overlay composefs rw,lowerdir=/run/.composefs.x::/srv/a\\:b::/srv/c,"
            b"upperdir=/u,workdir=/w,redirect_dir=on,metacopy=on")
    layout = mountinfo.MountInfo(line).layout()
    assert layout["basedirs"] == ["/srv/a:b", "/srv/c"]
    assert (layout["upperdir"], layout["workdir"], layout["verity"]) == ("/u", "/w", "off")
    assert layout["readonly"] is False
    assert not mountinfo.MountInfo(b"1 0 8:1 / / rw - ext4 /dev/sda1 rw").is_composefs()
    # Before Linux 6.5 (no data-only layers) the objects are plain lower layers.
    old = mountinfo.MountInfo(b"50 27 0:41 / /mnt rw - overlay composefs rw,lowerdir=/run/.composefs.x:/srv/a\\:b:/c")
    assert old.layout()["basedirs"] == ["/srv/a:b", "/c"]


@pytest.mark.parametrize("line", [UPPER_LINE, LEGACY_LINE], ids=["fsconfig", "legacy"])
def test_overlay_escapes_in_path_options_are_undone(line):
    """Regression: a backslash in upperdir/workdir came out doubled (mount-options-differ on every agent pass)."""
    e = mountinfo.MountInfo(line)
    layout = e.layout()
    assert layout["upperdir"] == "/u/a\\b,c=d e:f"
    assert layout["workdir"] == "/w/a\\b,c=d e:f"
    assert layout["basedirs"] == ["/d/a\\b"]
    assert e.path_readings("workdir")[0] == "/w/a\\b,c=d e:f"
    assert dict(e.layers())["upperdir"] == "/u/a\\b,c=d e:f"
    assert ("datadir+" if line is UPPER_LINE else "lowerdir", "/d/a\\b") in e.layers()


def test_path_readings_and_layers():
    # Linux 6.13+: upperdir/workdir given as fds are shown as resolved, unescaped: both readings are offered.
    e = mountinfo.MountInfo(b"1 0 0:9 / /m rw - overlay composefs rw,lowerdir+=/,upperdir=/u\\134x,workdir=/w")
    assert e.path_readings("upperdir") == ["/ux", "/u\\x"]
    assert e.path_readings("workdir") == ["/w"]
    assert e.path_readings("verity") == []
    legacy = mountinfo.MountInfo(b"1 0 0:9 / /m rw - overlay overlay rw,lowerdir=/l1:/l\\:2::/d,upperdir=/u,workdir=/w")
    assert legacy.layers() == [("lowerdir", "/l1"), ("lowerdir", "/l:2"), ("lowerdir", "/d"),
                               ("upperdir", "/u"), ("workdir", "/w")]
    # Not an overlay: nothing is unescaped twice, no layers.
    other = mountinfo.MountInfo(b"1 0 0:9 / /m rw - fuse.x src rw,workdir=/a\\134\\134b")
    assert other.path_option("workdir") == "/a\\\\b" and other.layers() == []


def test_malformed_lines_are_skipped(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_bytes(b"garbage\n" + LINE + b"\n\n1 0 8:1 / / rw - ext4\n")
    entries = mountinfo.read_mountinfo(str(path))
    assert [e.mount_id for e in entries] == [45]


def test_erofs_sources_unescaped(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_bytes(b"36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - erofs /srv/img\\040x.cfs ro\n"
                     b"37 35 98:0 / /mnt/c rw - ext4 /dev/vda rw\n")
    assert [(e.source, e.where) for e in mountinfo.of_type("erofs", mountinfo.read_mountinfo(str(info)))] == [
        ("/srv/img x.cfs", "/mnt/a b")]


def _entry(mid, parent, where, fstype="overlay", source="composefs"):
    return mountinfo.MountInfo(("%d %d 0:%d / %s rw - %s %s rw" % (mid, parent, mid, where, fstype, source)).encode())


def test_stacked_mounts_bottom_first():
    entries = [_entry(30, 27, "/mnt/x", "tmpfs", "tmpfs"), _entry(10, 30, "/mnt/x"), _entry(5, 10, "/mnt/x"),
               _entry(7, 27, "/mnt/y")]
    assert [e.mount_id for e in mountinfo.mounts_at("/mnt/x", entries)] == [30, 10, 5]
    assert mountinfo.top_mount("/mnt/x", entries).mount_id == 5
    assert mountinfo.top_mount("/mnt/z", entries) is None
    assert [e.mount_id for e in mountinfo.composefs_mounts(entries)] == [10, 5, 7]
    assert [e.mount_id for e in mountinfo.of_type("tmpfs", entries)] == [30]


# -- real mounts ----------------------------------------------------------------------

def _umount(target):
    for _ in range(4):
        top = mountinfo.top_mount(target)
        if top is None or not top.is_composefs():
            return
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.kernel
@pytest.mark.parametrize("lower", ["auto", "legacy"])
def test_backslash_workdir_is_no_difference(tmp_path, lower):
    """Regression: an upper/workdir holding a backslash (and , = space :) read back as itself, so the
    agent does not report mount-options-differ for it."""
    store, _ = Store.init(tmp_path / "store", notice=None)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(random.Random(5).randbytes(20000))
    digest = add_image(store, tree, "app").digest
    image = os.fsdecode(store.image_path(digest))
    odd = "a\\b,c=d e:f"
    upper, work, target = tmp_path / ("up" + odd), tmp_path / ("wk" + odd), tmp_path / "mnt"
    for d in (upper, work, target):
        d.mkdir()
    objects = str(tmp_path / "store" / "objects")
    try:
        mount_composefs(image, target, [objects], upperdir=upper, workdir=work, lower=lower, record_dir="")
        top = mountinfo.top_mount(target)
        assert top.is_composefs()
        layout = top.layout()
        assert (layout["upperdir"], layout["workdir"]) == (str(upper), str(work))
        assert str(work) in top.path_readings("workdir") and ("workdir", str(work)) in top.layers()
        config = tmp_path / "agent.json"
        config.write_text(json.dumps({
            "version": 1, "interval": 3600, "textfile": str(tmp_path / "agent.prom"),
            "stores": [{"path": str(tmp_path / "store")}],
            "mounts": [{"where": str(target), "image": image, "digest": digest, "basedirs": [objects],
                        "verity": "auto", "upperdir": str(upper), "workdir": str(work)}]}))
        res = subprocess.run([sys.executable, "-m", "composefs_fleet_agent", "--once", "--no-journal", "--config",
                              str(config)], capture_output=True, text=True, timeout=300)
        assert "mount-missing" not in res.stderr and "check-failed" not in res.stderr, res.stderr
        assert "mount-options-differ" not in res.stderr, res.stderr
    finally:
        _umount(target)


@pytest.mark.kernel
def test_fd_given_workdir_with_backslash(tmp_path):
    """Linux 6.13+ takes upperdir/workdir as file descriptors and then shows them unescaped:
    the existing directory's reading is the one given."""
    from composefs_fleet import mount_api as api

    odd = "a\\b\\\\c"
    dirs = {k: tmp_path / (k + odd) for k in ("lower", "upper", "work")}
    for d in dirs.values():
        d.mkdir()
    target = tmp_path / "mnt"
    target.mkdir()
    with api.FsContext("overlay") as ctx:
        ctx.set_string("source", "composefs")
        ctx.set_string("lowerdir+", str(dirs["lower"]))
        try:
            for key in ("upper", "work"):
                fd = os.open(dirs[key], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    ctx.set_fd(key + "dir", fd)
                finally:
                    os.close(fd)
        except api.MountError as exc:
            pytest.skip("this kernel takes no upperdir/workdir file descriptors (Linux 6.13+): %s" % exc)
        ctx.create()
        mnt_fd = ctx.mount()
    try:
        api.move_mount(mnt_fd, target)
    finally:
        os.close(mnt_fd)
    try:
        top = mountinfo.top_mount(target)
        assert top.option("workdir") == str(dirs["work"])  # shown as is: one reading is the escaped one
        assert top.layout()["upperdir"] == str(dirs["upper"]) and top.layout()["workdir"] == str(dirs["work"])
        assert str(dirs["work"]) in top.path_readings("workdir")
    finally:
        api.umount(target)
