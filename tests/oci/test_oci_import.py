# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""OCI images into the store: the same tree as umoci unpack + mkcomposefs, whatever the source format.

Images are built here with Debian's umoci (layers from real tree changes,
whiteouts written by umoci itself, and hand-made tars for what umoci never
writes) and converted with skopeo (oci-archive, zstd, docker-archive).
"""
from __future__ import annotations

import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oci_fixtures import (Layout, Member, directory, require_tools, run, store_cli, store_dump,  # noqa: E402
                          two_step_dump, without_root)

T_NS = "1700000000.123456789"


def _rich_layers(layout: Layout) -> None:
    """Three umoci layers and one hand-made one, covering what the issue lists."""
    def first(root: Path) -> None:
        for d in ("etc", "usr/bin", "usr/lib/gone", "var/lib/opaque", "opt/dir_to_file/sub", "dev", "srv/same"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "etc/hostname").write_text("node\n")
        os.setxattr(root / "etc/hostname", "user.origin", b"layer-1")
        (root / "usr/bin/tool").write_bytes(os.urandom(200_000))
        os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
        os.symlink("tool", root / "usr/bin/link")
        os.symlink("/etc/hostname", root / "usr/bin/abs-link")
        (root / "usr/lib/gone/file").write_bytes(b"x" * 5000)
        (root / "var/lib/opaque/lower").write_text("lower\n")
        (root / "opt/file_to_dir").write_text("file\n")
        (root / "opt/dir_to_file/sub/f").write_text("f\n")
        (root / ("n" * 200)).write_text("long name\n")
        (root / "usr/bin/setuid").write_bytes(b"#!/bin/sh\n" + b"#" * 100)
        os.chown(root / "usr/bin/setuid", 1234, 5678)
        os.chmod(root / "usr/bin/setuid", 0o4755)  # after chown, which clears set-user-ID
        os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "dev/loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.mkfifo(root / "srv/fifo")
        (root / "srv/same/a").write_bytes(b"shared content " * 1000)
        (root / "srv/same/b").write_bytes(b"shared content " * 1000)
        (root / "empty").write_bytes(b"")
        run("touch", "-h", "-d", "@" + T_NS, root / "etc/hostname")

    def second(root: Path) -> None:
        import shutil

        (root / "usr/bin/link").unlink()
        shutil.rmtree(root / "usr/lib/gone")
        (root / "opt/file_to_dir").unlink()
        (root / "opt/file_to_dir").mkdir()
        (root / "opt/file_to_dir/inside").write_text("now a dir\n")
        shutil.rmtree(root / "opt/dir_to_file")
        (root / "opt/dir_to_file").write_text("now a file\n")
        (root / "etc/hostname").write_text("node-2\n")
        os.chown(root / "etc", 42, 43)

    layout.layer(first)
    layout.layer(second)
    # What umoci does not write: an opaque marker after a sibling of the same layer, a whiteout
    # after the same layer's entry, a whiteout of a directory recreated in the same layer, PAX
    # xattrs and nanosecond times.  Parents are given explicitly (see test_implicit_parents).
    layout.raw_layer([
        directory("var/lib/opaque", 1700000001),
        Member("var/lib/opaque/upper", b"upper\n"),
        Member("var/lib/opaque/.wh..wh..opq", b""),
        directory("usr/bin", 1700000002),
        Member("usr/bin/tool", b"replaced in layer 3: " + b"y" * 100),
        Member("usr/bin/.wh.tool", b""),
        directory("srv", 1700000003),
        Member("srv/.wh.same", b""),
        directory("srv/same", 1700000004.25),
        Member("srv/same/c", b"c\n", pax={"SCHILY.xattr.user.note": "hello", "mtime": "1700000005.000000007"}),
    ])


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    require_tools()
    base = tmp_path_factory.mktemp("oci")
    layout = Layout(base / "layout")
    _rich_layers(layout)
    return layout


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    store_cli("--repo", path, "init")
    return path


def test_layered_image_equals_umoci_unpack_then_mkcomposefs(rich, store, tmp_path):
    res = store_cli("--repo", store, "--json", "add-image", "oci:" + rich.ref, "--ref", "app/v1")
    ours = store_dump(store, "app/v1")
    assert without_root(ours) == without_root(two_step_dump(rich.ref, tmp_path))
    # The features really are in there (a wrong importer and a wrong umoci would not agree on all).
    assert "/usr/bin/tool " in ours and "replaced in layer 3" not in ours  # > 64 bytes: an object
    assert "/usr/lib/gone" not in ours and "/usr/bin/link " not in ours and ".wh." not in ours
    assert "/var/lib/opaque/upper " in ours and "/var/lib/opaque/lower" not in ours
    assert "/srv/same/c " in ours and "/srv/same/a" not in ours
    lines = {line.split(" ")[0]: line for line in ours.splitlines()}
    assert lines["/srv/same/c"].endswith(" user.note=hello")
    assert " 1700000005.7 " in lines["/srv/same/c"]  # 7 ns (C's dump format), from a PAX mtime
    assert "/opt/file_to_dir/inside" in lines and "/opt/dir_to_file/sub" not in ours
    assert lines["/opt/dir_to_file"].split(" ")[2] == "100644"
    assert lines["/dev/null"].split(" ")[2] == "20644" and lines["/dev/null"].split(" ")[6] == str(os.makedev(1, 3))
    assert lines["/dev/loop0"].split(" ")[2] == "60640" and lines["/srv/fifo"].split(" ")[2] == "10644"
    assert lines["/usr/bin/setuid"].split(" ")[2:6] == ["104755", "1", "1234", "5678"]
    assert lines["/etc"].split(" ")[4:6] == ["42", "43"]
    assert lines["/usr/bin/tool-hardlink"].split(" ")[1] == "200000"
    assert any(len(name) == 201 for name in lines)
    import json

    result = json.loads(res.stdout)
    assert result["source_kind"] == "oci" and result["oci_layers"] == 3
    origin = json.loads((store / "oci" / result["digest"]).read_text())
    assert origin["manifest"] == rich.index()["manifests"][0]["digest"]
    assert origin["config"] == rich.manifest()["config"]["digest"]


def test_a_second_import_writes_nothing_new(rich, store):
    first = store_cli("--repo", store, "--json", "add-image", "oci:" + rich.ref, "--ref", "app/v1").stdout
    second = store_cli("--repo", store, "--json", "add-image", "oci:" + rich.ref, "--ref", "app/v1").stdout
    import json

    a, b = json.loads(first), json.loads(second)
    assert a["objects_written"] > 0 and b["objects_written"] == 0 and not b["image_written"]
    assert a["digest"] == b["digest"]
    assert store_cli("--repo", store, "fsck").returncode == 0


@pytest.mark.parametrize("form", ["oci-archive", "zstd", "docker-archive"])
def test_every_source_form_gives_the_same_image(rich, store, tmp_path, form):
    base = store_cli("--repo", store, "--json", "add-image", "oci:" + rich.ref, "--ref", "base").stdout
    if form == "oci-archive":
        run("skopeo", "copy", "--quiet", "oci:" + rich.ref, "oci-archive:%s:t" % (tmp_path / "a.tar"))
        source = "oci-archive:%s:t" % (tmp_path / "a.tar")
    elif form == "zstd":
        run("skopeo", "copy", "--quiet", "--dest-compress-format", "zstd", "oci:" + rich.ref, "oci:%s:t" % (tmp_path / "z"))
        manifest = Layout.existing(tmp_path / "z")
        assert all(layer["mediaType"].endswith("+zstd") for layer in manifest.manifest()["layers"])
        source = "oci:%s:t" % (tmp_path / "z")
    else:
        run("skopeo", "copy", "--quiet", "oci:" + rich.ref, "docker-archive:%s:example/app:t" % (tmp_path / "d.tar"))
        source = "docker-archive:%s:t" % (tmp_path / "d.tar")
    other = store_cli("--repo", store, "--json", "add-image", source, "--ref", form).stdout
    import json

    assert json.loads(other)["digest"] == json.loads(base)["digest"]


def test_implicit_parents_are_0755_root_time_zero(store, tmp_path):
    require_tools()
    layout = Layout(tmp_path / "l")
    layout.raw_layer([Member("a/b/c", b"deep\n")])
    store_cli("--repo", store, "add-image", "oci:" + layout.ref, "--ref", "r")
    dump = store_dump(store, "r")
    lines = {line.split(" ")[0]: line for line in dump.splitlines()}
    # No "./" entry in any layer: the root is 0755, root-owned, time 0 (the documented rule).
    assert lines["/"].split(" ")[2:8] == ["40755", "3", "0", "0", "0", "0.0"], lines["/"]
    for parent in ("/a", "/a/b"):
        fields = lines[parent].split(" ")
        assert fields[2] == "40755" and fields[4:6] == ["0", "0"] and fields[7] == "0.0", lines[parent]


@pytest.mark.parametrize("members, message", [
    ([Member("../escape", b"x")], "contains '..'"),
    ([Member("/etc/passwd", b"x")], "absolute path"),
    ([Member("ln", kind=tarfile.SYMTYPE, link="/etc"), Member("ln/passwd", b"x")], "is not a directory"),
    ([Member("h", kind=tarfile.LNKTYPE, link="nowhere")], "not in the tree"),
    ([Member("d/.wh.", b"")], "bare whiteout"),
    ([Member("d/.wh..wh..plnk", b"")], "not a whiteout this tool knows"),
])
def test_hostile_layers_are_refused_and_nothing_is_published(store, tmp_path, members, message):
    require_tools()
    from oci_fixtures import store_files

    layout = Layout(tmp_path / "bad")
    layout.raw_layer([Member("ok-before", b"z" * 1000)] + members)
    before = store_files(store)
    res = store_cli("--repo", store, "add-image", "oci:" + layout.ref, "--ref", "bad", check=False)
    assert res.returncode == 1, res.stderr
    assert message in res.stderr and "layer 1" in res.stderr, res.stderr
    assert store_files(store) == before


def test_damaged_blobs_are_refused_by_name(rich, store, tmp_path):

    from oci_fixtures import store_files

    copy = tmp_path / "copy"
    layout = rich.copy(copy)
    layer = layout.manifest()["layers"][0]
    blob = layout.blob(layer["digest"])
    data = bytearray(blob.read_bytes())
    before = store_files(store)
    # corrupted
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    res = store_cli("--repo", store, "add-image", "oci:%s:t" % copy, "--ref", "x", check=False)
    assert res.returncode == 1 and layer["digest"] in res.stderr, res.stderr
    assert "corrupted or replaced" in res.stderr or "cannot decompress" in res.stderr or "not a valid tar" in res.stderr
    # truncated
    blob.write_bytes(bytes(data[: len(data) // 3]))
    res = store_cli("--repo", store, "add-image", "oci:%s:t" % copy, "--ref", "x", check=False)
    assert res.returncode == 1 and layer["digest"] in res.stderr, res.stderr
    # missing
    blob.unlink()
    res = store_cli("--repo", store, "add-image", "oci:%s:t" % copy, "--ref", "x", check=False)
    assert res.returncode == 1 and "is missing" in res.stderr, res.stderr
    assert store_files(store) == before


def test_a_layer_that_is_not_its_diff_id_is_refused(rich, store, tmp_path):
    import json

    copy = tmp_path / "copy"
    layout = rich.copy(copy)
    manifest = layout.manifest()
    config = layout.config()
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    digest, size = layout.put_blob(json.dumps(config).encode())
    manifest["config"] = dict(manifest["config"], digest=digest, size=size)
    layout.set_manifest(manifest)
    res = store_cli("--repo", store, "add-image", "oci:%s:t" % copy, "--ref", "x", check=False)
    assert res.returncode == 1 and "is not the config's diff_id sha256:" + "0" * 64 in res.stderr, res.stderr
    assert "layer 2" in res.stderr
    assert not (store / "refs" / "x").exists() and not os.listdir(store / "images")


def test_decompression_bombs_are_refused(store, tmp_path, monkeypatch):
    require_tools()
    from composefs_fleet import oci_layer
    from composefs_fleet.errors import StoreError
    from composefs_fleet.store import Store
    from composefs_fleet.store_add import add_image

    layout = Layout(tmp_path / "bomb")
    layout.raw_layer([Member("zeros", bytes(8 << 20))])  # 8 MiB of zeros: gzip makes ~8 KiB of it
    monkeypatch.setattr(oci_layer, "RATIO_ALLOWANCE", 1 << 20)
    with pytest.raises(StoreError, match="decompression bomb"):
        add_image(Store.open(str(store)), "oci:" + layout.ref, "bomb")
    assert not os.listdir(store / "images")


def test_tags_platforms_and_nested_indexes(rich, store, tmp_path):
    import json

    copy = tmp_path / "multi"
    layout = rich.copy(copy)
    manifest_desc = layout.index()["manifests"][0]
    amd = dict(manifest_desc, platform={"os": "linux", "architecture": "amd64"})
    amd.pop("annotations", None)
    arm_manifest = layout.manifest()
    arm_manifest["layers"] = arm_manifest["layers"][:1]
    config = layout.config()
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:1]
    cdigest, csize = layout.put_blob(json.dumps(config).encode())
    arm_manifest["config"] = dict(arm_manifest["config"], digest=cdigest, size=csize)
    mdigest, msize = layout.put_blob(json.dumps(arm_manifest).encode())
    arm = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": msize,
           "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
    inner = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [amd, arm]}
    idigest, isize = layout.put_blob(json.dumps(inner).encode())
    (copy / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": idigest, "size": isize,
         "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    from composefs_fleet.store import Store
    from composefs_fleet.store_add import add_image

    st = Store.open(str(store))
    native = add_image(st, "oci:%s:multi" % copy, "native", platform="linux/amd64")
    assert native.oci_layers == 3
    other = add_image(st, "oci:%s:multi" % copy, "arm", platform="linux/arm64/v8")
    assert other.oci_layers == 1 and other.digest != native.digest
    from composefs_fleet.errors import StoreError

    with pytest.raises(StoreError, match="no image tagged 'multi' for linux/s390x"):
        add_image(st, "oci:%s:multi" % copy, "none", platform="linux/s390x")
    with pytest.raises(StoreError, match=r"no image tagged 'nope'.*tags: multi"):
        add_image(st, "oci:%s:nope" % copy, "none")
    # Indexes nested deeper than any real image: refused, not followed for ever.
    digest, size = idigest, isize
    for _depth in range(10):
        digest, size = layout.put_blob(json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": size}]}).encode())
    (copy / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": size,
         "annotations": {"org.opencontainers.image.ref.name": "deep"}}]}))
    with pytest.raises(StoreError, match="nested more than"):
        add_image(st, "oci:%s:deep" % copy, "none")


def test_bad_source_names_are_explained(store):
    res = store_cli("--repo", store, "add-image", "oci:/nonexistent/layout:t", "--ref", "x", check=False)
    assert res.returncode == 1 and "oci:/nonexistent/layout" in res.stderr and "No such file" in res.stderr


@pytest.mark.kernel
def test_imported_image_mounts_as_the_unpacked_tree(rich, store, tmp_path, kernel_mount):
    from oci_fixtures import tree_facts

    store_cli("--repo", store, "add-image", "oci:" + rich.ref, "--ref", "m")
    digest = (store / "refs" / "m").read_text().strip()
    mounted = kernel_mount.mount_composefs(store / "images" / digest, tmp_path / "mnt", store / "objects")
    run("umoci", "unpack", "--image", rich.ref, tmp_path / "unpacked")
    ours, theirs = tree_facts(mounted), tree_facts(tmp_path / "unpacked" / "rootfs")
    ours.pop("."), theirs.pop(".")
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}


def test_dry_run_and_expected_digest_publish_nothing(rich, store):
    import json

    from oci_fixtures import store_files

    before = store_files(store)
    dry = json.loads(store_cli("--repo", store, "--json", "add-image", "--dry-run", "oci:" + rich.ref,
                               "--ref", "d").stdout)
    assert store_files(store) == before
    assert dry["objects_written"] > 0 and dry["image_written"]
    res = store_cli("--repo", store, "add-image", "--expected-digest", "0" * 64, "oci:" + rich.ref, "--ref", "d",
                    check=False)
    assert res.returncode == 1 and "not the expected" in res.stderr, res.stderr
    assert store_files(store) == before
    real = json.loads(store_cli("--repo", store, "--json", "add-image", "--expected-digest", dry["digest"],
                                "oci:" + rich.ref, "--ref", "d").stdout)
    assert real["digest"] == dry["digest"] and real["objects_written"] == dry["objects_written"]
    assert real["bytes_written"] == dry["bytes_written"]


def test_platform_needs_an_oci_source(store, tmp_path):
    (tmp_path / "tree").mkdir()
    res = store_cli("--repo", store, "add-image", "--platform", "linux/amd64", tmp_path / "tree", "--ref", "x", check=False)
    assert res.returncode == 2 and "--platform applies to OCI sources" in res.stderr


def test_zstd_without_a_library_names_the_package(rich, store, tmp_path, monkeypatch):
    from composefs_fleet.errors import StoreError
    from composefs_fleet.store import Store
    from composefs_fleet.store_add import add_image

    run("skopeo", "copy", "--quiet", "--dest-compress-format", "zstd", "oci:" + rich.ref, "oci:%s:t" % (tmp_path / "z"))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "compression", None)
    with pytest.raises(StoreError, match="python3-zstandard"):
        add_image(Store.open(str(store)), "oci:%s:t" % (tmp_path / "z"), "z")
    assert not os.listdir(store / "images")


def test_gc_removes_the_origin_record_with_its_image(rich, store):
    import json

    digest = json.loads(store_cli("--repo", store, "--json", "add-image", "oci:" + rich.ref, "--ref", "g").stdout)["digest"]
    assert (store / "oci" / digest).is_file()
    store_cli("--repo", store, "gc")
    assert (store / "oci" / digest).is_file()  # its image is kept by the ref
    store_cli("--repo", store, "rm-ref", "g")
    res = json.loads(store_cli("--repo", store, "--json", "gc").stdout)
    assert res["removed_origins"] == [digest] and not (store / "oci" / digest).exists()
    assert store_cli("--repo", store, "fsck").returncode == 0


def test_deep_trees_long_paths_and_deep_json_are_handled(store, tmp_path):
    """1,500 nested directories (hidden by an opaque marker above them) import; a path longer than
    PATH_MAX and an index.json nested beyond what the parser recurses are refused by name."""
    import json

    from oci_fixtures import store_files

    require_tools()
    deep = "/".join(["d"] * 1500)
    layout = Layout(tmp_path / "deep")
    layout.raw_layer([Member(deep + "/f", b"deep\n"), Member("keep", b"k")])
    layout.raw_layer([directory("d"), Member("d/.wh..wh..opq", b""), Member("d/new", b"n")])
    res = json.loads(store_cli("--repo", store, "--json", "add-image", "oci:" + layout.ref, "--ref", "deep").stdout)
    dump = store_dump(store, "deep")
    assert res["oci_layers"] == 2 and "/d/new " in dump and "/d/d" not in dump and "/keep " in dump
    before = store_files(store)
    long = Layout(tmp_path / "long")
    long.raw_layer([Member("x/" * 2100 + "f", b"x")])
    res = store_cli("--repo", store, "add-image", "oci:" + long.ref, "--ref", "long", check=False)
    assert res.returncode == 1 and "longer than a path may be" in res.stderr, res.stderr
    (long.path / "index.json").write_text("[" * 100000 + "]" * 100000)
    res = store_cli("--repo", store, "add-image", "oci:" + long.ref, "--ref", "long", check=False)
    assert res.returncode == 1 and "nested too deeply" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert store_files(store) == before


def test_a_docker_manifest_of_the_wrong_shape_is_refused(store, tmp_path):
    import io
    import tarfile

    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as tar:
        data = b'["not an object"]'
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    res = store_cli("--repo", store, "add-image", "docker-archive:%s" % archive, "--ref", "d", check=False)
    assert res.returncode == 1 and "manifest.json entries must be objects" in res.stderr, res.stderr
