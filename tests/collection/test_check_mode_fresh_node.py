"""Check mode on a fresh node: every module, before the tasks ahead of it have made anything.

In ``ansible-playbook --check`` the store task creates no store and the task
that would put the source tree in place makes nothing, so each later module
meets paths that do not exist yet.  Each must then succeed, create nothing and
say what it would do (image_send and mount are covered in their own files).
"""

from __future__ import annotations

import os

import pytest

SRC_MISSING = "src-to-be-copied"


def _cases(base):
    store = str(base / "store")
    return {
        "store": (dict(path=store), True),
        "image": (dict(store=store, ref="app/v1", src=str(base / SRC_MISSING)), True),
        "verity": (dict(paths=[os.path.join(store, "objects")], recurse=True), True),
        "info": (dict(stores=[store]), False),
        "gc": (dict(path=store), False),
        "fsck": (dict(path=store), False),
    }


@pytest.mark.parametrize("name", ["store", "image", "verity", "info", "gc", "fsck"])
def test_module_in_check_mode_on_a_fresh_node(module_runner, tmp_path, name):
    base = tmp_path / "node"
    base.mkdir()
    args, changes = _cases(base)[name]
    res = module_runner(name, args, check=True, diff=True)
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] is changes
    assert os.listdir(base) == []  # nothing was created
    if name == "image":
        assert res["digest"] is None and res["image"]["previous_digest"] is None
        assert res["diff"] == {"before": {"ref": "app/v1", "digest": None}, "after": {"ref": "app/v1", "digest": None}}
    if name == "verity":
        assert res["missing"] == [os.path.join(str(base), "store", "objects")] and res["files"] == []
    if name == "info":
        assert res["stores"][0]["exists"] is False and res["stores"][0]["images"] == []
    # Outside check mode the modules that need what is missing say what it is.
    if name in ("image", "verity", "info"):
        real = module_runner(name, args)
        assert real["failed"] and str(base) in real["msg"]
