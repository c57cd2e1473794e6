"""Switching a live composefs mount to another image, on this machine's kernel.

The switch must be atomic for new opens and must never fail because the old
mount is busy: a process holding a file of the old image reads the old bytes
to the end, a new open sees the new image, and the old mount is gone from the
mount table at once (detached, alive only through what still holds it).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess

import pytest

from composefs_fleet import mount_api, mount_history, mount_record, mountinfo
from composefs_fleet.mount import ComposefsMountError, mount_composefs
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image

pytestmark = pytest.mark.kernel


class Images:
    def __init__(self, base):
        self.base = base
        self.store, _ = Store.init(base / "store", notice=None)
        self.files = {}
        self.digest = {}
        for seed, name in enumerate(("v1", "v2", "v3")):
            src = base / ("src-" + name)
            (src / "sub").mkdir(parents=True)
            rng = random.Random(seed)
            files = {"big": rng.randbytes(3 << 20), "sub/small": b"%s\n" % name.encode(), name: b"only in " + name.encode()}
            for rel, data in files.items():
                (src / rel).write_bytes(data)
            add_image(self.store, src, "app/" + name)
            self.files[name] = files
            self.digest[name] = self.store.read_ref("app/" + name)
        self.objects = os.fsdecode(os.path.join(os.fsencode(str(base / "store")), b"objects"))
        self.history = str(base / "history")
        self.target = base / "mnt"
        self.target.mkdir()

    def image(self, name):
        return os.fsdecode(self.store.image_path(self.digest[name]))

    def mount(self, name, replace=False, **kw):
        return mount_composefs(self.image(name), str(self.target), [self.objects], replace=replace,
                               history_dir=self.history, ref="app/" + name, store=str(self.base / "store"), **kw)

    def stack(self):
        return mountinfo.mounts_at(str(self.target))


@pytest.fixture
def images(tmp_path, kernel_mount):
    imgs = Images(tmp_path)
    yield imgs
    for _ in range(8):
        if not imgs.stack():
            break
        subprocess.run(["umount", "-l", str(imgs.target)], check=False)


def test_switch_keeps_open_files_on_the_old_image(images):
    images.mount("v1")
    held = open(images.target / "big", "rb")
    cwd_holder = subprocess.Popen(["sleep", "60"], cwd=str(images.target / "sub"))
    try:
        first = held.read(1 << 20)
        result = images.mount("v2", replace=True)
        assert result.method == "beneath"
        # New opens see v2 at once ...
        assert (images.target / "big").read_bytes() == images.files["v2"]["big"]
        assert (images.target / "v2").exists() and not (images.target / "v1").exists()
        # ... while the open file reads v1's bytes to the end.
        assert first + held.read() == images.files["v1"]["big"]
        # A process whose working directory is in the old mount still sees the old tree.
        assert os.listdir("/proc/%d/cwd" % cwd_holder.pid) == ["small"]
        with open("/proc/%d/cwd/small" % cwd_holder.pid, "rb") as f:
            assert f.read() == b"v1\n"
    finally:
        held.close()
        cwd_holder.kill()
        cwd_holder.wait()
    stack = images.stack()
    assert len(stack) == 1 and stack[0].is_composefs(), "the old mount must be detached, not stacked"
    record = mount_record.live_record(str(images.target))
    assert record["image_digest"] == images.digest["v2"]
    assert record["previous"]["image_digest"] == images.digest["v1"]
    assert record["ref"] == "app/v2" and record["how"]["method"] == "beneath"
    assert result.replaced["image_digest"] == images.digest["v1"]
    assert result.previous["image_digest"] == images.digest["v1"]


def test_switch_records_history_and_rollback(images):
    first = images.mount("v1")
    assert first.method == "attach" and first.replaced is None and first.previous is None
    images.mount("v2", replace=True)
    entry = mount_history.load(str(images.target), images.history)
    assert entry["image_digest"] == images.digest["v2"] and entry["ref"] == "app/v2"
    assert entry["previous"] == {"image": images.image("v1"), "image_digest": images.digest["v1"], "ref": "app/v1"}
    changed = entry["changed"]
    # The same image again (a reboot, an agent remount) moves nothing.
    again = images.mount("v2", replace=True)
    assert again.previous["image_digest"] == images.digest["v1"]
    assert mount_history.load(str(images.target), images.history)["changed"] == changed
    # Rolling back makes v2 the previous image.
    back = images.mount("v1", replace=True)
    assert back.previous["image_digest"] == images.digest["v2"]
    assert (images.target / "v1").exists()
    assert len(images.stack()) == 1
    assert mount_history.forget(str(images.target), images.history)
    assert mount_history.load(str(images.target), images.history) is None


def test_replace_with_nothing_mounted_just_mounts(images):
    result = images.mount("v3", replace=True)
    assert result.method == "attach" and result.replaced is None
    assert (images.target / "v3").exists()


def test_replace_never_touches_a_foreign_mount(images):
    subprocess.run(["mount", "-t", "tmpfs", "notours", str(images.target)], check=True)
    (images.target / "keep").write_bytes(b"x")
    with pytest.raises(ComposefsMountError) as exc:
        images.mount("v1", replace=True)
    assert "tmpfs" in str(exc.value) and "not replacing" in str(exc.value)
    stack = images.stack()
    assert len(stack) == 1 and stack[0].fstype == "tmpfs"
    assert (images.target / "keep").read_bytes() == b"x"


def test_fallback_without_move_mount_beneath(images, monkeypatch):
    """A kernel before 6.5 refuses the flag with EINVAL: detach, then attach."""
    images.mount("v1")
    real = mount_api.move_mount_fd

    def no_beneath(mnt_fd, target_fd, shown, beneath=False):
        if beneath:
            raise mount_api.MountError("move_mount failed: Invalid argument", errno.EINVAL, "move_mount")
        return real(mnt_fd, target_fd, shown)

    monkeypatch.setattr(mount_api, "move_mount_fd", no_beneath)
    held = open(images.target / "big", "rb")
    try:
        result = images.mount("v2", replace=True)
        assert result.method == "detach-attach"
        assert held.read() == images.files["v1"]["big"]
    finally:
        held.close()
    assert (images.target / "big").read_bytes() == images.files["v2"]["big"]
    assert len(images.stack()) == 1


def test_history_survives_without_records_and_rejects_garbage(images):
    images.mount("v1")
    images.mount("v2", replace=True)
    # Records vanish at reboot; the history is what a boot mount finds again.
    path = mount_history.history_path(os.path.realpath(str(images.target)), images.history)
    data = json.loads(open(path).read())
    assert data["previous"]["image_digest"] == images.digest["v1"]
    with open(path, "w") as f:
        f.write(json.dumps(dict(data, image_digest="not hex")))
    assert mount_history.load(str(images.target), images.history) is None
    # A history we cannot believe is replaced by the mount's own knowledge.
    result = images.mount("v3", replace=True)
    assert result.previous["image_digest"] == images.digest["v2"]
    assert mount_history.load(str(images.target), images.history)["image_digest"] == images.digest["v3"]


def test_writable_mount_is_switched_only_when_unused(images, tmp_path):
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    images.mount("v1", upperdir=str(upper), workdir=str(work))
    (images.target / "written").write_bytes(b"upper data")
    held = open(images.target / "big", "rb")
    try:
        with pytest.raises(ComposefsMountError) as exc:
            images.mount("v2", replace=True, upperdir=str(upper), workdir=str(work))
        assert "in use" in str(exc.value) and "nothing was changed" in str(exc.value)
        assert (images.target / "v1").exists() and len(images.stack()) == 1
    finally:
        held.close()
    result = images.mount("v2", replace=True, upperdir=str(upper), workdir=str(work))
    assert result.method == "unmount-attach"
    assert (images.target / "v2").exists() and (images.target / "written").read_bytes() == b"upper data"
    assert len(images.stack()) == 1


def test_planted_links_in_the_history_dir_are_not_followed(images, tmp_path):
    """A link planted as the lock or as a history file: the mount is made, nothing outside is touched."""
    os.makedirs(images.history)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(str(victim), os.path.join(images.history, ".lock"))
    result = images.mount("v1")
    assert (images.target / "v1").exists()
    assert result.record_error and "mount history" in result.record_error
    assert victim.read_bytes() == b"keep"
    os.unlink(os.path.join(images.history, ".lock"))
    entry = mount_history.history_path(os.path.realpath(str(images.target)), images.history)
    os.symlink(str(victim), entry)
    assert mount_history.load(str(images.target), images.history) is None  # a link is never believed
    images.mount("v2", replace=True)
    assert victim.read_bytes() == b"keep" and not os.path.islink(entry)  # replaced by a file, not written through


def test_remount_of_an_unchanged_image_reuses_the_noted_digest(images, monkeypatch):
    """A boot or a repair mounts the image the history names: hashing it again would tell the same,
    unless the file changed since (any write moves its ctime)."""
    from composefs_fleet import fsverity_digest

    hashed = []
    real = fsverity_digest.digest_fd

    def counting(fd, *args, **kwargs):
        hashed.append(fd)
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(fsverity_digest, "digest_fd", counting)
    where = str(images.target)
    images.mount("v1")
    assert len(hashed) == 1
    mount_record.unmount(where)
    result = images.mount("v1")
    assert len(hashed) == 1, "the unchanged image was hashed again"
    assert mount_record.live_record(where)["image_digest"] == images.digest["v1"] and result.record_error is None
    mount_record.unmount(where)
    path = images.image("v1")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data)  # same bytes: only its ctime (and mtime) says it was written
    images.mount("v1")
    assert len(hashed) == 2
    mount_record.unmount(where)
    # Another image file at the same place is hashed, not taken for the noted one.
    images.mount("v2")
    assert len(hashed) == 3 and mount_record.live_record(where)["image_digest"] == images.digest["v2"]
    mount_record.unmount(where)
    # A stamp that is not ours makes the whole history unbelievable, as any other garbage.
    hist = mount_history.history_path(os.path.realpath(where), images.history)
    with open(hist) as f:
        data = json.load(f)
    for bad in ("x", [1, 2, 3], [1, 2, 3, 4, True]):
        with open(hist, "w") as f:
            json.dump(dict(data, image_stamp=bad), f)
        assert mount_history.load(where, images.history) is None
