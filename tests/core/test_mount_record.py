"""Mount records (mount_record): which image is mounted where (mountinfo parsing: test_mountinfo.py).

The parsing and naming tests run anywhere; those marked ``kernel`` mount for
real and unmount in ``finally`` (also on failure).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from composefs_fleet import mount_record as mr
from composefs_fleet import mountinfo
from composefs_fleet.fsverity_digest import digest_file
from composefs_fleet.mount import mount_composefs

# -- record names ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "with space", "comma,name", "colon:name", "eq=name", "new\nline",
                                  "back\\slash", "dash-name", "@at", "ä"])
def test_record_names_are_single_safe_file_names(tmp_path, name):
    where = str(tmp_path / name)
    rec = mr.record_name(where)
    assert "/" not in rec and "\n" not in rec and rec.endswith(".json") and len(rec) <= 255
    assert not rec.startswith(".")
    ns = "".join(c for c in mr.mount_namespace() if c.isdigit())
    assert rec.endswith(".mount@%s.json" % ns) and rec.count("@") == 1


def test_record_names_differ():
    names = {mr.record_name(p) for p in ("/a-b", "/a/b", "/a b", "/a\\x20b", "/a,b", "/a:b")}
    assert len(names) == 6


def test_long_mount_point_gets_a_hashed_name(tmp_path):
    where = "/" + "/".join(["d" * 200] * 3)
    rec = mr.record_name(where)
    assert rec.startswith("@") and len(rec) == 1 + 64 + 5


# -- writing and reading records -----------------------------------------------------

def _fake_record(where, **extra):
    rec = {"format": mr.RECORD_FORMAT, "where": where, "image": "/i", "image_digest": "0" * 64, "basedirs": ["/o"],
           "verity": "off", "verity_requested": "off", "digest": None, "upperdir": None, "workdir": None,
           "readonly": False, "options": "", "how": {}, "mount_id": 1, "dev": "0:1", "mount_id_unique": None,
           "mnt_ns": mr.mount_namespace(), "boot_id": mr.boot_id()}
    rec.update(extra)
    return rec


def test_write_and_load_roundtrip_with_undecodable_path(tmp_path):
    where = os.fsdecode(b"/mnt/caf\xe9 x")  # not UTF-8: a lone surrogate in str
    directory = str(tmp_path / "records")
    # write_record prunes first: this fake is stale (no such mount) but written last.
    path = mr.write_record(_fake_record(where), directory)
    assert os.path.dirname(path) == directory
    assert sorted(os.listdir(directory)) == sorted([".lock", os.path.basename(path)])  # no temp files
    loaded = mr.load_record(path)
    assert loaded["where"] == where and os.fsencode(loaded["where"]) == b"/mnt/caf\xe9 x"
    with open(path, "rb") as f:
        json.loads(f.read().decode("ascii"))  # plain ASCII JSON


def test_load_rejects_non_records(tmp_path):
    bad = tmp_path / "x.json"
    for content in (b"", b"[]", b"{\"format\": 99, \"where\": \"/\"}", b"\xff\xfe", b"{\"format\": 1}"):
        bad.write_bytes(content)
        assert mr.load_record(str(bad)) is None
    assert mr.load_record(str(tmp_path / "missing.json")) is None


def test_load_rejects_hostile_records(tmp_path):
    """Regression: deeply nested JSON raised RecursionError (through gc, the agent, the modules);
    ``true`` passed as format 1 and as a mount ID; a FIFO blocked the reader."""
    bad = tmp_path / "x.json"
    bad.write_bytes(b"[" * 100000 + b"]" * 100000)
    assert mr.load_record(str(bad)) is None
    good = _fake_record("/mnt/x")
    for field, value in (("format", True), ("mount_id", True), ("mount_id", "1"), ("dev", [0, 1]),
                         ("mount_id_unique", True)):
        bad.write_text(json.dumps(dict(good, **{field: value})))
        assert mr.load_record(str(bad)) is None, field
    bad.write_text(json.dumps(good))
    assert mr.load_record(str(bad)) == good
    os.mkfifo(str(tmp_path / "fifo.json"))
    assert mr.load_record(str(tmp_path / "fifo.json")) is None
    (tmp_path / "link.json").symlink_to(bad)
    assert mr.load_record(str(tmp_path / "link.json")) is None


def test_stale_records_are_recognised_and_pruned(tmp_path):
    directory = str(tmp_path / "records")
    os.makedirs(directory)
    gone = _fake_record("/nonexistent/mount/point")
    other_boot = _fake_record("/nonexistent/other", boot_id="not-this-boot")
    # A mount that exists (/) but is not composefs: a record for it is stale too.
    root = _fake_record("/", mount_id=mountinfo.top_mount("/").mount_id, dev=mountinfo.top_mount("/").dev)
    for rec in (gone, other_boot, root):
        assert not mr.is_live(rec)
        with open(os.path.join(directory, mr.record_name(rec["where"])), "w") as f:
            json.dump(rec, f)
    (tmp_path / "records" / "not-a-record.json").write_text("{}")
    removed = mr.prune(directory)
    assert len(removed) == 3
    assert sorted(os.listdir(directory)) == [".lock", "not-a-record.json"]
    assert mr.prune(str(tmp_path / "no-such-dir")) == []


def test_record_mount_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path, error = mr.record_mount("/", str(blocker / "sub"), image="/i", image_digest=None, basedirs=[],
                                  verity="off", verity_requested="off")
    assert path is None and "cannot write the mount record in" in error
    assert mr.record_mount("/", None, image="/i", image_digest=None, basedirs=[], verity="off",
                           verity_requested="off") == (None, "recording disabled")


# -- real mounts ----------------------------------------------------------------------

@pytest.fixture
def image(tmp_path, ours):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(random.Random(3).randbytes(20000))
    (src / "small").write_bytes(b"small\n")
    store = tmp_path / "objects"
    res = ours.run("mkcomposefs", "--digest-store=%s" % store, src, tmp_path / "image.cfs")
    assert res.returncode == 0, res.stderr
    return tmp_path / "image.cfs", store


def _umount_all(*targets):
    for t in targets:
        while mountinfo.top_mount(t) is not None and mountinfo.top_mount(t).is_composefs():
            if subprocess.run(["umount", str(t)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(t)], capture_output=True)
                break


@pytest.mark.kernel
def test_every_mount_is_recorded_and_unmount_forgets(tmp_path, image):
    img, store = image
    target = tmp_path / "mnt, with:odd=name"
    target.mkdir()
    records = str(tmp_path / "records")
    try:
        result = mount_composefs(img, target, [store], record_dir=records)
        assert result.record_error is None
        assert result.record_path == os.path.join(records, mr.record_name(target))
        rec = mr.live_record(target, directory=records)
        assert rec is not None
        assert rec["image"] == str(img) and rec["image_digest"] == digest_file(img).hex()
        assert rec["basedirs"] == [str(store)] and rec["where"] == str(target)
        assert rec["verity"] == "off" and rec["upperdir"] is None
        top = mountinfo.top_mount(target)
        assert (rec["mount_id"], rec["dev"]) == (top.mount_id, top.dev)
        info = mr.describe_mount(top, directory=records)
        assert info["recorded"] and info["image_digest"] == rec["image_digest"]
        assert (target / "small").read_bytes() == b"small\n"
        mr.unmount(target, records)
        assert mountinfo.top_mount(target) is None
        assert not os.path.exists(result.record_path)
    finally:
        _umount_all(target)


@pytest.mark.kernel
def test_replaced_mount_makes_the_old_record_stale(tmp_path, image):
    """The kernel reuses mount IDs and anonymous devices at once: the unique ID tells them apart."""
    img, store = image
    target = tmp_path / "mnt"
    target.mkdir()
    records = str(tmp_path / "records")
    try:
        mount_composefs(img, target, [store], record_dir=records)
        old = mr.live_record(target, directory=records)
        subprocess.run(["umount", str(target)], check=True)
        assert not mr.is_live(old)
        mount_composefs(img, target, [store], record_dir=None)  # no record of its own
        top = mountinfo.top_mount(target)
        if (old["mount_id"], old["dev"]) != (top.mount_id, top.dev):
            pytest.skip("the kernel gave the new mount another ID and device: reuse not exercised this time")
        if old["mount_id_unique"] is None:
            pytest.skip("no statx STATX_MNT_ID_UNIQUE (Linux 6.8+): a replaced mount with a reused ID and "
                        "device cannot be told apart")
        assert not mr.is_live(old)
        assert mr.live_record(target, directory=records) is None
    finally:
        _umount_all(target)


@pytest.mark.kernel
def test_unwritable_record_dir_does_not_fail_the_mount(tmp_path, image):
    img, store = image
    target = tmp_path / "mnt"
    target.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    try:
        result = mount_composefs(img, target, [store], record_dir=str(blocker / "records"))
        assert result.record_path is None and "cannot write the mount record" in result.record_error
        assert (target / "small").read_bytes() == b"small\n"
    finally:
        _umount_all(target)


@pytest.mark.kernel
def test_unmount_refuses_foreign_and_busy(tmp_path, image):
    img, store = image
    target = tmp_path / "mnt"
    target.mkdir()
    with pytest.raises(mr.UnmountError, match="nothing is mounted"):
        mr.unmount(target, None)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    try:
        with pytest.raises(mr.UnmountError, match="not a composefs image"):
            mr.unmount(target, None)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    try:
        mount_composefs(img, target, [store], record_dir=None)
        with open(target / "small", "rb"):
            with pytest.raises(mr.UnmountError, match="in use"):
                mr.unmount(target, None)
        mr.unmount(target, None)
    finally:
        _umount_all(target)


@pytest.mark.kernel
def test_cli_verbose_says_where_it_recorded(tmp_path, image, ours):
    img, store = image
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        res = ours.run("mount.composefs", "-v", "-o", "basedir=%s" % store, img, target)
        assert res.returncode == 0, res.stderr
        err = res.stderr.decode()
        path = mr.record_path(target)
        if "not recorded" in err:
            assert "mount.composefs: mounted, but not recorded: cannot write the mount record" in err
        else:
            assert "mount.composefs: recorded in %s\n" % path in err
            assert mr.live_record(target)["image_digest"] == digest_file(img).hex()
    finally:
        _umount_all(target)
    mr.prune()
    assert not os.path.exists(mr.record_path(target))


@pytest.mark.kernel
def test_other_namespace_record_lives_with_its_namespace(tmp_path, image, ours):
    """mount.composefs -N: recorded under that namespace; pruned only once the namespace is gone."""
    import shutil
    import time

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not on PATH: needed to create a mount namespace")
    img, store = image
    target = tmp_path / "mnt"
    target.mkdir()
    own = mr.mount_namespace()
    child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while mr.mount_namespace(str(child.pid)) in (own, None):
            assert time.monotonic() < deadline and child.poll() is None, "unshare --mount did not start"
            time.sleep(0.01)
        res = ours.run("mount.composefs", "-v", "-N", str(child.pid), "-o", "basedir=%s" % store, img, target)
        assert res.returncode == 0, res.stderr
        ns = mr.mount_namespace(str(child.pid))
        path = os.path.join(mr.RECORD_DIR, "%s@%s.json" % (mr.record_name(target).split("@")[0],
                                                          "".join(c for c in ns if c.isdigit())))
        if b"not recorded" in res.stderr:
            pytest.skip("no record written: %s" % res.stderr.decode().strip())
        assert ("recorded in %s" % path) in res.stderr.decode()
        assert mountinfo.top_mount(target) is None  # not in our namespace
        rec = mr.load_record(path)
        assert rec["mnt_ns"] == ns and not mr.is_live(rec)  # not ours to see...
        mr.prune()
        assert os.path.exists(path)  # ...but its namespace lives: kept
    finally:
        child.kill()
        child.wait()
    mr.prune()
    assert not os.path.exists(path)


@pytest.mark.kernel
def test_mounted_images_for_gc(tmp_path, image):
    """gc roots: recorded mounts give their image; unrecorded composefs mounts are reported as unknown."""
    img, store = image
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    records = str(tmp_path / "records")
    try:
        mount_composefs(img, a, [store], record_dir=records)
        mount_composefs(img, b, [store], record_dir=None)
        found, unknown = mr.mounted_images(records)
        assert [(r["where"], r["image"], r["image_digest"]) for r in found] == [
            (str(a), str(img), digest_file(img).hex())]
        assert str(b) in [e.where for e in unknown] and str(a) not in [e.where for e in unknown]
    finally:
        _umount_all(a, b)
    found, unknown = mr.mounted_images(records)
    assert found == [] and not [e for e in unknown if e.where.startswith(str(tmp_path))]
