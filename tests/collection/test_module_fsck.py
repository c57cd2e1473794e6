"""composefs.fleet.fsck: findings as a list, failed unless fail_on_findings is false, repair moves damaged
files aside (changed), check mode moves nothing, a fresh node in check mode has nothing to check."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image

from test_module_info import tree_snapshot


@pytest.fixture
def store(tmp_path):
    s, _ = Store.init(tmp_path / "store", notice=None)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / ("f%d" % i)).write_bytes(random.Random(i + 60).randbytes(9000 + i))
    add_image(s, src, "app")
    return s


def _damage_one_object(store):
    hexd, path, _st = next(iter(store.iter_objects()))
    path = Path(os.fsdecode(path))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    try:
        path.write_bytes(bytes(data))
    except OSError as exc:  # an object with fs-verity cannot be written
        pytest.skip("cannot damage an object here: %s" % exc)
    return hexd, path


def test_clean_store(module_runner, store, tmp_path):
    res = module_runner("fsck", {"path": str(tmp_path / "store"), "threads": 1})
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] is False and res["clean"] is True
    assert res["findings"] == [] and res["remaining"] == [] and res["damaged"] == [] and res["moved"] == []
    assert res["counts"] == {"objects": 3, "object_bytes": 27003, "verity_measured": res["counts"]["verity_measured"],
                             "images": 1, "refs": 1}


def test_damaged_object_is_a_finding_and_repair_moves_it(module_runner, store, tmp_path):
    hexd, path = _damage_one_object(store)
    args = {"path": str(tmp_path / "store")}
    res = module_runner("fsck", args)
    assert res.get("failed") and res["clean"] is False and res["changed"] is False
    assert any(hexd[2:] in f and "damaged" in f for f in res["findings"]), res["findings"]
    assert res["damaged"] == [str(path)] and res["remaining"] == res["findings"]
    assert "store %s: " % args["path"] in res["msg"] and "problem" in res["msg"]

    res = module_runner("fsck", dict(args, fail_on_findings=False))
    assert not res.get("failed") and res["clean"] is False and res["findings"]

    # Check mode with repair: says it would move the file, moves nothing.
    before = tree_snapshot(str(tmp_path / "store"))
    res = module_runner("fsck", dict(args, repair=True, fail_on_findings=False), check=True, diff=True)
    assert not res.get("failed") and res["changed"] is True and res["moved"] == []
    assert res["diff"] == {"before": {"damaged": [str(path)]}, "after": {"damaged": []}}
    assert tree_snapshot(str(tmp_path / "store")) == before and path.exists()

    # The repair moves it aside; the image now misses that object: a problem left, so the task fails.
    res = module_runner("fsck", dict(args, repair=True), diff=True)
    assert res.get("failed") and res["changed"] is True
    assert len(res["moved"]) == 1 and res["moved"][0].startswith(str(path) + " -> ")
    assert not path.exists() and len(os.listdir(store.damaged_dir)) == 1
    assert res["remaining"] and not any(r.startswith("objects/") for r in res["remaining"]), res["remaining"]
    assert any("missing" in r for r in res["remaining"]) and "after the repair" in res["msg"]
    assert res["diff"]["after"] == {"damaged": []}

    # Nothing left to move: not changed.
    res = module_runner("fsck", dict(args, repair=True, fail_on_findings=False))
    assert not res.get("failed") and res["changed"] is False and res["moved"] == [] and res["remaining"]


def test_fresh_node_check_mode_has_nothing_to_check(module_runner, tmp_path):
    missing = tmp_path / "new" / "store"
    res = module_runner("fsck", {"path": str(missing), "repair": True}, check=True, diff=True)
    assert not res.get("failed") and res["changed"] is False and res["clean"] is True
    assert "does not exist yet" in res["msg"] and not (tmp_path / "new").exists()
    res = module_runner("fsck", {"path": str(missing)})
    assert res.get("failed") and str(missing) in res["msg"] and "not a composefs store" in res["msg"]


def test_bad_threads_is_refused(module_runner, store, tmp_path):
    res = module_runner("fsck", {"path": str(tmp_path / "store"), "threads": 0})
    assert res.get("failed") and "threads" in res["msg"]
