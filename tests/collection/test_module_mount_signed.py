# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.mount with require_signature: the ref must verify, else nothing is mounted or written.

The refusals need no kernel (the check comes before anything is done), so
they run with state=present (a unit in a temp dir) and state=mounted alike;
the kernel test mounts a verified ref and then sees a refused re-run leave
the mount alone.
"""
from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from composefs_fleet import mountinfo
from composefs_fleet.ref_trust import sign_ref
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_signatures import read_signatures, write_signatures
from composefs_fleet.systemd_unit import unit_name

from signing import make_keys  # type: ignore[import-not-found]


class Node:
    """A store with app/one (signed by "release") and app/two (unsigned), units in a temp dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.keys = make_keys(base / "keys", "release", "other")
        self.store = Store.init(base / "store", notice=None)[0]
        self.digest = {}
        for i, name in enumerate(("one", "two")):
            src = base / ("src-" + name)
            src.mkdir()
            (src / "big").write_bytes(random.Random(i).randbytes(70000))
            (src / "small").write_text("small %s\n" % name)
            self.digest[name] = add_image(self.store, str(src), "app/" + name).digest
        sign_ref(self.store, "app/one", [str(self.keys["release"].private)])
        self.units = base / "units"
        self.target = str(base / "mnt")

    def args(self, state="present", image="app/one", **extra):
        args = dict(path=self.target, store=os.fsdecode(self.store.path), image=image, state=state,
                    unit_dir=str(self.units), require_signature=True,
                    trusted_keys=[str(self.keys["release"].public)])
        args.update(extra)
        return args

    def nothing_done(self):
        return not self.units.exists() and not os.path.lexists(self.target)


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    top = mountinfo.top_mount(n.target) if os.path.isdir(n.target) else None
    if top is not None and top.is_composefs():
        subprocess.run(["umount", n.target], capture_output=True)


def test_present_with_a_verified_ref(module_runner, node):
    results = [module_runner("mount", node.args(), check=check, diff=True) for check in (True, False, False, True)]
    for r in results:
        assert not r.get("failed"), r.get("msg")
        assert r["mount"]["ref"] == "app/one" and r["mount"]["image_digest"] == node.digest["one"]
        assert r["mount"]["signature"]["keys"] == [node.keys["release"].id]
    assert [r["changed"] for r in results] == [True, True, False, False]
    assert (node.units / unit_name(node.target)).is_file()


def test_without_require_signature_the_ref_is_reported_not_checked(module_runner, node):
    r = module_runner("mount", dict(path=node.target, store=os.fsdecode(node.store.path), image="app/two",
                                    state="present", unit_dir=str(node.units)), check=True)
    assert not r.get("failed") and r["mount"]["ref"] == "app/two" and r["mount"]["signature"] is None, r


def _tamper(node):
    data = read_signatures(node.store, "app/one")
    with node.store.lock.shared():
        write_signatures(node.store, "app/one", data.replace(b"ref: app/one", b"ref: app/onE"))


def _move_ref(node):
    with node.store.lock.shared():
        node.store.write_ref("app/one", node.digest["two"])


@pytest.mark.parametrize("state", ["present", "mounted"])
@pytest.mark.parametrize("case, reason, message", [
    ("unsigned", "unsigned", "signatures/app/two is missing"),
    ("untrusted", "untrusted", "none of them a trusted key"),
    ("revoked", "revoked", "signed only by revoked key"),
    ("tampered", "tampered", "does not match the statement: changed after signing"),
    ("moved", "wrong-image", "the statement vouches for image"),
])
def test_refused_ref_mounts_and_writes_nothing(module_runner, node, state, case, reason, message):
    args = node.args(state)
    if case == "unsigned":
        args["image"] = "app/two"
    elif case == "untrusted":
        args["trusted_keys"] = [node.keys["other"].public_text]
    elif case == "revoked":
        args["revoked_keys"] = [str(node.keys["release"].public)]
    elif case == "tampered":
        _tamper(node)
    else:
        _move_ref(node)
    for check in (True, False):
        r = module_runner("mount", args, check=check)
        assert r.get("failed") and r.get("reason") == reason, r
        assert message in r["msg"] and r["msg"].endswith("nothing was mounted or written"), r["msg"]
        assert node.nothing_done()


@pytest.mark.parametrize("image", ["digest", "file"])
def test_require_signature_needs_a_ref(module_runner, node, image):
    value = node.digest["one"] if image == "digest" else os.fsdecode(node.store.image_path(node.digest["one"]))
    r = module_runner("mount", node.args(image=value))
    assert r["failed"] and "has no signed statement; name a ref of the store" in r["msg"], r
    assert node.nothing_done()


def test_option_combinations(module_runner, node):
    args = node.args()
    del args["trusted_keys"]
    r = module_runner("mount", args)
    assert r["failed"] and "require_signature is True but all of the following are missing: trusted_keys" in r["msg"]
    args = node.args(require_signature=False)
    r = module_runner("mount", args)
    assert r["failed"] and "used only with require_signature: true" in r["msg"], r
    assert node.nothing_done()


@pytest.mark.kernel
def test_mounted_signed_ref_then_a_refused_rerun_leaves_the_mount(module_runner, node):
    r = module_runner("mount", node.args("mounted"))
    assert not r.get("failed") and r["changed"] and r["mount"]["mounted"], r
    assert open(os.path.join(node.target, "small")).read() == "small one\n"
    _tamper(node)
    r = module_runner("mount", node.args("mounted"))
    assert r["failed"] and r["reason"] == "tampered", r
    # Refused before acting: the mount made earlier stays as it was (never unmounted by a failed check).
    top = mountinfo.top_mount(node.target)
    assert top is not None and top.is_composefs()
    r = module_runner("mount", node.args("absent", require_signature=False, trusted_keys=None))
    assert not r.get("failed") and r["changed"], r
