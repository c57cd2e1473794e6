# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Bundles (tar files named like a store's files): the writer, the packing, the transport as hostile input."""
from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from composefs_fleet.errors import RemoteError, RemoteNotFound
from composefs_fleet.pull import pull
from composefs_fleet.remote_bundle import (BundleTransport, iter_bundles, member_cost, object_member, pack_objects,
                                           source_image)
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check as fsck
from store_fixtures import write_tree

HEX = "ab" * 32


@pytest.fixture
def source(tmp_path: Path):
    store, _ = Store.init(tmp_path / "src", notice=None)
    write_tree(tmp_path / "t1", seed=1, shared_from=7)
    add_image(store, tmp_path / "t1", "app/v1")
    digest, needed = source_image(store, "app/v1")
    return store, digest, needed.objects


def write_bundle(tmp_path: Path, store: Store, digest: str, objects: dict, limit: int = 1 << 30):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    files = list(iter_bundles(store, str(out), digest=digest, ref="app/v1", prefix="image"))
    files += list(iter_bundles(store, str(out), pack_objects(objects, limit), limit=limit, prefix="objects"))
    return files


def make_tar(path: Path, members) -> str:
    """A tar file with ``members``: (name, data) for regular files, or ready TarInfo objects."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for item in members:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
            else:
                name, data = item
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def test_round_trip_pull_from_bundles_is_a_verified_pull(tmp_path, source):
    store, digest, objects = source
    files = write_bundle(tmp_path, store, digest, objects, limit=64 * 1024)
    assert len(files) > 2
    with BundleTransport([f.path for f in files]) as transport:
        assert transport.names() == sorted(["meta.json", "refs/app/v1", "images/" + digest]
                                           + [object_member(h) for h in objects])
        assert transport.get_small("refs/app/v1", 4096) == (digest + "\n").encode()
        with pytest.raises(RemoteNotFound, match="objects/%s/%s: not in the bundle" % (HEX[:2], HEX[2:])):
            transport.get_small(object_member(HEX), 4096)
        with pytest.raises(RemoteError, match="more than the 10 accepted"):
            transport.get_small("images/" + digest, 10)
        node, _ = Store.init(tmp_path / "node", notice=None)
        res = pull(node, transport, "app/v1")
    assert (res.digest, res.objects_fetched, res.image_fetched) == (digest, len(objects), True)
    assert (tmp_path / "node/images" / digest).read_bytes() == (tmp_path / "src/images" / digest).read_bytes()
    assert fsck(node).clean


def test_files_stay_within_the_limit_except_a_single_large_object(tmp_path, source):
    store, digest, objects = source
    limit = 30 * 1024
    files = write_bundle(tmp_path, store, digest, objects, limit=limit)
    for f in files[1:]:
        assert os.path.getsize(f.path) == f.size
        assert f.size <= limit or len(f.members) == 1, (f.path, f.size, f.members)
    assert sorted(m for f in files[1:] for m in f.members) == sorted(object_member(h) for h in objects)


def test_pack_objects_first_fit_decreasing():
    rng = random.Random(5)
    sizes = {"%064x" % i: rng.choice([0, 100, 3000, 9000, 40000, 70000, 300000]) for i in range(400)}
    limit = 256 * 1024
    groups = pack_objects(sizes, limit)
    assert sorted(h for g in groups for h in g) == sorted(sizes)
    costs = [sum(member_cost(sizes[h]) for h in g) for g in groups]
    for group, cost in zip(groups, costs):
        assert cost + 1024 <= limit or len(group) == 1
    # First fit decreasing: at most one file is half full or less.
    assert sum(1 for c in costs if c <= limit // 2) <= 1
    assert len(groups) <= 2 * sum(costs) // limit + 1


def test_corrupt_object_in_a_bundle_is_refused_by_the_pull(tmp_path, source):
    store, digest, objects = source
    victim = max(objects, key=lambda h: (objects[h], h))
    path = tmp_path / "src" / "objects" / victim[:2] / victim[2:]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    files = write_bundle(tmp_path, store, digest, objects)
    node, _ = Store.init(tmp_path / "node", notice=None)
    with BundleTransport([f.path for f in files], url="controller:x") as transport:
        with pytest.raises(RemoteError, match="controller:x/objects/%s/%s: fs-verity digest is" % (victim[:2], victim[2:])):
            pull(node, transport, "app/v1")
    assert node.list_refs() == [] and node.list_images() == []
    assert fsck(node).clean


def test_a_bundle_without_an_object_fails_the_pull(tmp_path, source):
    store, digest, objects = source
    some = dict(sorted(objects.items())[1:])
    files = write_bundle(tmp_path, store, digest, some)
    node, _ = Store.init(tmp_path / "node", notice=None)
    with BundleTransport([f.path for f in files]) as transport:
        with pytest.raises(RemoteError, match="not found: the image needs it"):
            pull(node, transport, "app/v1")
    assert node.list_refs() == []


@pytest.mark.parametrize("name, why", [
    ("/etc/passwd", "an absolute name"),
    ("../outside", "'.' or '..' component"),
    ("objects/../../x", "'.' or '..' component"),
    ("refs//app", "empty"),
    ("./meta.json", "'.' or '..' component"),
    ("refs/app/.hidden", "may not start with '.'"),
    ("images/XYZ", "not the name of a store file"),
    ("objects/ab/" + "c" * 61, "not the name of a store file"),
    ("etc/shadow", "not the name of a store file"),
])
def test_hostile_names_refuse_the_whole_bundle(tmp_path, name, why):
    path = make_tar(tmp_path / "b.tar", [("meta.json", b"{}"), (name, b"x")])
    with pytest.raises(RemoteError) as info:
        BundleTransport([path])
    assert "member %r refused" % name in str(info.value) and why in str(info.value), str(info.value)
    assert path in str(info.value)


@pytest.mark.parametrize("kind, word", [
    (tarfile.SYMTYPE, "a symbolic link (to '/etc/passwd')"),
    (tarfile.LNKTYPE, "a hard link (to '/etc/passwd')"),
    (tarfile.DIRTYPE, "a directory"),
    (tarfile.FIFOTYPE, "a FIFO"),
    (tarfile.CHRTYPE, "a device"),
])
def test_links_and_special_members_are_refused(tmp_path, kind, word):
    path = make_tar(tmp_path / "b.tar", [("meta.json", b"{}"), special(object_member(HEX), kind, "/etc/passwd")])
    with pytest.raises(RemoteError, match="only regular files are accepted") as info:
        BundleTransport([path])
    assert word in str(info.value)


def test_duplicates_are_refused_in_one_file_and_across_files(tmp_path):
    one = make_tar(tmp_path / "one.tar", [(object_member(HEX), b"a"), (object_member(HEX), b"b")])
    with pytest.raises(RemoteError, match="member objects/ab/%s appears twice: refused" % HEX[2:]):
        BundleTransport([one])
    first = make_tar(tmp_path / "first.tar", [("meta.json", b"{}")])
    second = make_tar(tmp_path / "second.tar", [("meta.json", b"{}")])
    with pytest.raises(RemoteError, match="appears twice \\(first in %s\\)" % first):
        BundleTransport([first, second])


def test_truncated_damaged_and_appended_files_are_refused(tmp_path):
    good = Path(make_tar(tmp_path / "good.tar", [("meta.json", b"{}"), (object_member(HEX), os.urandom(20000))]))
    raw = good.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:5000])
    with pytest.raises(RemoteError, match="runs past the end of the file|not a readable tar file"):
        BundleTransport([str(cut)])
    appended = tmp_path / "appended.tar"
    appended.write_bytes(raw + b"trailing data" + bytes(600))
    with pytest.raises(RemoteError, match="unreadable data after offset"):
        BundleTransport([str(appended)])
    damaged = bytearray(raw)
    damaged[512 * 2 + 148] ^= 0x55  # the checksum of the second member's header: tar would stop there silently
    bad = tmp_path / "damaged.tar"
    bad.write_bytes(bytes(damaged))
    with pytest.raises(RemoteError, match="unreadable data after offset|not a readable tar file"):
        BundleTransport([str(bad)])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(RemoteError, match="not a readable tar file"):
        BundleTransport([str(garbage)])


def test_bundle_file_that_is_a_symlink_or_missing_is_refused(tmp_path):
    real = make_tar(tmp_path / "real.tar", [("meta.json", b"{}")])
    (tmp_path / "link.tar").symlink_to(real)
    with pytest.raises(RemoteError, match="symbolic link"):
        BundleTransport([str(tmp_path / "link.tar")])
    with pytest.raises(RemoteError, match="missing"):
        BundleTransport([str(tmp_path / "nothing.tar")])
