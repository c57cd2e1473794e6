# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""pull from a file:// remote: the pull logic without a server (HTTP is in tests/remote)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from composefs_fleet.errors import RemoteError, StoreError
from composefs_fleet.pull import pull
from composefs_fleet.remote_options import RemoteOptions, RemoteURL
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check as fsck
from composefs_fleet.store_remotes import add_remote, load_remotes, remove_remote
from store_fixtures import write_tree


def _objects(store_dir: Path) -> set:
    return {p.parent.name + p.name for p in (store_dir / "objects").glob("??/*") if not p.name.startswith(".")}


@pytest.fixture
def remote(tmp_path: Path):
    """A store with app/v1 and app/v2 (sharing their common files)."""
    src = tmp_path / "remote"
    store, _ = Store.init(src)
    write_tree(tmp_path / "t1", seed=1, shared_from=7)
    write_tree(tmp_path / "t2", seed=2, shared_from=7)
    v1 = add_image(store, tmp_path / "t1", "app/v1")
    v2 = add_image(store, tmp_path / "t2", "app/v2")
    store.close()
    return src, v1.digest, v2.digest


def _fsck_clean(path: Path) -> None:
    with Store.open(path) as store:
        report = fsck(store)
    assert report.clean, report.as_dict()


def test_pull_into_empty_then_partly_filled_store(tmp_path: Path, remote) -> None:
    src, d1, d2 = remote
    local, _ = Store.init(tmp_path / "local")
    r1 = pull(local, "file://" + str(src), "app/v1")
    assert (r1.digest, r1.previous, r1.changed, r1.image_fetched) == (d1, None, True, True)
    assert r1.objects_fetched == r1.objects_missing == r1.objects > 0
    assert (tmp_path / "local/images" / d1).read_bytes() == (src / "images" / d1).read_bytes()
    assert local.read_ref("app/v1") == d1
    # v2 shares objects with v1: only the others travel.
    r2 = pull(local, "file://" + str(src), "app/v2", "app/current")
    needed_v2 = Store.open(src).image_objects(d2).objects
    have_before = set(Store.open(src).image_objects(d1).objects)
    assert r2.objects_fetched == len(set(needed_v2) - have_before) < r2.objects
    assert local.read_ref("app/current") == d2
    assert _objects(tmp_path / "local") == set(Store.open(src).image_objects(d1).objects) | set(needed_v2)
    # A second pull changes nothing and fetches nothing.
    again = pull(local, "file://" + str(src), "app/v2", "app/current")
    assert (again.changed, again.objects_fetched, again.image_fetched) == (False, 0, False)
    _fsck_clean(tmp_path / "local")


def test_dry_run_writes_nothing(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    local, _ = Store.init(tmp_path / "local")
    before = sorted(p.name for p in (tmp_path / "local").rglob("*"))
    res = pull(local, "file://" + str(src), "app/v1", dry_run=True)
    assert res.changed and res.objects_missing == res.objects and res.bytes_missing > 0
    assert res.objects_fetched == 0
    assert sorted(p.name for p in (tmp_path / "local").rglob("*")) == before
    assert res.digest == d1


def test_corrupt_object_is_refused_the_rest_kept_and_resumed(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    needed = Store.open(src).image_objects(d1).objects
    victim = sorted(needed)[0]
    path = src / "objects" / victim[:2] / victim[2:]
    good = path.read_bytes()
    path.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(RemoteError, match="fs-verity digest is .* not its name") as info:
        pull(local, "file://" + str(src), "app/v1", jobs=1)
    assert victim[2:] in str(info.value) and str(src) in str(info.value)
    assert local.list_refs() == [] and local.list_images() == []
    assert victim not in _objects(tmp_path / "local")
    _fsck_clean(tmp_path / "local")
    kept = _objects(tmp_path / "local")
    path.write_bytes(good)
    res = pull(local, "file://" + str(src), "app/v1")
    # Everything verified before the failure was kept: only the rest is fetched.
    assert res.objects_fetched == len(needed) - len(kept)
    _fsck_clean(tmp_path / "local")


def test_truncated_object_and_image_of_another_digest_are_refused(tmp_path: Path, remote) -> None:
    src, d1, d2 = remote
    local, _ = Store.init(tmp_path / "local")
    victim = max(Store.open(src).image_objects(d1).objects.items(), key=lambda kv: kv[1])[0]
    path = src / "objects" / victim[:2] / victim[2:]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(RemoteError, match="its image says"):
        pull(local, "file://" + str(src), "app/v1")
    path.write_bytes(good)
    # The ref names v1, the served "v1" image is v2's bytes: refused before it is parsed.
    (src / "images" / d1).write_bytes((src / "images" / d2).read_bytes())
    with pytest.raises(RemoteError, match="image digest is %s, not the %s" % (d2, d1)):
        pull(local, "file://" + str(src), "app/v1")
    assert local.list_refs() == [] and local.list_images() == []
    _fsck_clean(tmp_path / "local")


def test_unknown_ref_and_not_a_store(tmp_path: Path, remote) -> None:
    src, _d1, _d2 = remote
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(RemoteError, match="no ref app/none there"):
        pull(local, "file://" + str(src), "app/none")
    with pytest.raises(RemoteError, match="not a composefs store"):
        pull(local, "file://" + str(tmp_path), "app/v1")


def test_symlink_in_remote_is_refused(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    (tmp_path / "elsewhere").write_text("x")
    victim = sorted(Store.open(src).image_objects(d1).objects)[0]
    path = src / "objects" / victim[:2] / victim[2:]
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(RemoteError, match="symbolic link"):
        pull(local, "file://" + str(src), "app/v1")
    assert local.list_refs() == []


def test_named_remotes(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    local, _ = Store.init(tmp_path / "local")
    assert add_remote(local, "origin", "file://" + str(src))
    assert not add_remote(local, "origin", "file://" + str(src))
    with pytest.raises(StoreError, match="exists"):
        add_remote(local, "origin", "file:///elsewhere")
    with pytest.raises(StoreError, match="password"):
        add_remote(local, "secret", "https://user:hunter2@example.com/cfs")
    with pytest.raises(StoreError, match="remote name"):
        add_remote(local, "../x", "file:///x")
    assert load_remotes(local) == {"origin": {"url": "file://" + str(src)}}
    assert pull(local, "origin", "app/v1").digest == d1
    assert remove_remote(local, "origin") and not remove_remote(local, "origin")
    with pytest.raises(StoreError, match="no remote named origin"):
        pull(local, "origin", "app/v1")


@pytest.mark.parametrize("url, message", [
    ("ftp://host/x", "scheme"),
    ("http:///x", "no host"),
    ("https://h/x?y=1", "query"),
    ("http://h:99999/x", "port"),
    ("file://host/x", "local path"),
    ("file:relative", "absolute"),
    ("http://h/a b", "spaces"),
    ("http://h/a\nb", "control"),
])
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        RemoteURL(url)


def test_credentials_never_in_the_shown_url() -> None:
    parsed = RemoteURL("https://alice:s3cret@example.com:8443/cfs/")
    assert parsed.shown == "https://example.com:8443/cfs/"
    assert (parsed.username, parsed.password) == ("alice", "s3cret")
    with pytest.raises(StoreError) as info:
        RemoteURL("https://alice:s3cret@example.com/a b")
    assert "s3cret" not in str(info.value)


def test_header_injection_is_refused_without_showing_the_value() -> None:
    with pytest.raises(StoreError) as info:
        RemoteOptions(headers={"Authorization": "Bearer tok\r\nX-Evil: 1"})
    assert "tok" not in str(info.value)
    with pytest.raises(StoreError, match="header name"):
        RemoteOptions(headers={"Bad Name": "x"})


def test_cli_pull_file_remote(tmp_path: Path, remote) -> None:
    import subprocess
    import sys

    src, d1, _d2 = remote
    Store.init(tmp_path / "local")
    cmd = [sys.executable, "-m", "composefs_fleet_cli.composefs_store", "--repo", str(tmp_path / "local")]
    out = subprocess.run(cmd + ["pull", "file://" + str(src), "app/v1", "--ref", "mine"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert d1 in out.stdout and "fetched" in out.stdout
    bad = subprocess.run(cmd + ["pull", "file://" + str(src), "app/none"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("composefs-store: pull: file://%s: no ref app/none" % src), bad.stderr
    usage = subprocess.run(cmd + ["pull", "--jobs", "0", "file://" + str(src), "app/v1"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--jobs" in usage.stderr
    assert os.path.exists(tmp_path / "local/refs/mine")


def test_damaged_local_object_is_fetched_again(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    local, _ = Store.init(tmp_path / "local")
    pull(local, "file://" + str(src), "app/v1")
    victim = sorted(Store.open(src).image_objects(d1).objects)[0]
    path = tmp_path / "local/objects" / victim[:2] / victim[2:]
    good = path.read_bytes()
    path.write_bytes(good + b"junk")
    local.remove_ref("app/v1")
    res = pull(local, "file://" + str(src), "app/v1")
    assert res.objects_fetched == 1 and path.read_bytes() == good
    _fsck_clean(tmp_path / "local")


def test_symlinked_object_dir_in_the_node_store_is_refused_nothing_written_outside(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    local, _ = Store.init(tmp_path / "local")
    victim = sorted(Store.open(src).image_objects(d1).objects)[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "local/objects" / victim[:2]).symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        pull(local, "file://" + str(src), "app/v1")
    assert list(outside.iterdir()) == []
    assert local.list_refs() == [] and local.list_images() == []


def test_fifo_in_the_remote_is_refused_without_blocking(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    victim = sorted(Store.open(src).image_objects(d1).objects)[0]
    path = src / "objects" / victim[:2] / victim[2:]
    path.unlink()
    os.mkfifo(path)  # opening it for reading would block forever
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(RemoteError, match="not a regular file"):
        pull(local, "file://" + str(src), "app/v1")
    assert local.list_refs() == []
    assert not (tmp_path / "local/objects" / victim[:2] / victim[2:]).exists()


def test_an_image_over_the_limit_is_refused_before_it_is_read_whole(tmp_path: Path, remote) -> None:
    src, d1, _d2 = remote
    size = (src / "images" / d1).stat().st_size
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(RemoteError, match="more than the %d" % (size - 1)):
        pull(local, "file://" + str(src), "app/v1", max_image_bytes=size - 1)
    assert local.list_refs() == [] and local.list_images() == []
