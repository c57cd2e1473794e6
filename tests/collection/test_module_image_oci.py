# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.image with an OCI src: check, real, idempotent, idempotent check; the image is the
one composefs-store add-image makes of the same source (tests/oci compares that with umoci unpack)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from composefs_fleet.store import Store
from composefs_fleet.store_fsck import check as fsck

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "oci"))
from oci_fixtures import Layout, Member, require_tools, run, store_cli  # noqa: E402


@pytest.fixture
def layout(tmp_path):
    require_tools()
    layout = Layout(tmp_path / "layout")

    def files(root: Path) -> None:
        (root / "etc").mkdir()
        (root / "etc/os-release").write_text("ID=test\n")
        (root / "payload").write_bytes(os.urandom(100_000))

    layout.layer(files)
    layout.raw_layer([Member(".wh.payload", b""), Member("new", b"n" * 500)])
    return layout


def test_oci_src_four_steps_and_the_same_image_as_the_cli(module_runner, tmp_path, layout):
    store = Store.init(tmp_path / "store", notice=None)[0]
    args = dict(store=os.fsdecode(store.path), ref="app/oci", src="oci:" + layout.ref)
    results = [module_runner("image", args, check=True, diff=True), module_runner("image", args, diff=True),
               module_runner("image", args, diff=True), module_runner("image", args, check=True, diff=True)]
    for r in results:
        assert not r.get("failed"), r.get("msg")
    assert [r["changed"] for r in results] == [True, True, False, False]
    check, real = results[0], results[1]
    assert check["digest"] == real["digest"] and check["image"]["objects_written"] == real["image"]["objects_written"] == 1  # the deleted payload is not kept
    assert real["image"]["source_kind"] == "oci"
    assert fsck(store).clean
    # The payload a later layer deleted was staged while its layer streamed, but never published.
    objects = [name for _d, _s, names in os.walk(os.fsdecode(store.objects_dir)) for name in names]
    assert len(objects) == 1, objects
    other = tmp_path / "other"
    store_cli("--repo", other, "init")
    store_cli("--repo", other, "add-image", "oci:" + layout.ref, "--ref", "x")
    assert (other / "refs" / "x").read_text().strip() == real["digest"]


def test_oci_src_archive_and_platform(module_runner, tmp_path, layout):
    store = Store.init(tmp_path / "store", notice=None)[0]
    run("skopeo", "copy", "--quiet", "oci:" + layout.ref, "oci-archive:%s:t" % (tmp_path / "a.tar"))
    r = module_runner("image", dict(store=os.fsdecode(store.path), ref="a", src="oci-archive:%s:t" % (tmp_path / "a.tar"),
                                    platform="linux/s390x"))
    assert r.get("failed") and "the image tagged 't' is for linux/amd64, not linux/s390x" in r["msg"], r
    assert not os.listdir(os.fsdecode(store.images_dir))
    r = module_runner("image", dict(store=os.fsdecode(store.path), ref="a", src=str(tmp_path), platform="linux/amd64"))
    assert r.get("failed") and "platform applies to an OCI src" in r["msg"], r
