# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The mount-state model: a request resolved to mount options, compared with a live mount (no mounts here)."""

from __future__ import annotations

import pytest

from composefs_fleet.mountinfo import MountInfo
from composefs_fleet.mount_state import LiveMount, MountRequest, differences, resolve_verity

DIGEST = "ab" * 32


def _no_verity(basedir):
    return "no fs-verity on %s" % basedir


@pytest.mark.parametrize("mode,has_verity,effective,option", [
    ("require", True, "require", "verity"),
    ("require", False, "require", "verity"),
    ("auto", True, "require", "verity"),
    ("auto", False, "off", ""),
    ("on", True, "require", "tryverity"),
    ("on", False, "off", "tryverity"),
    ("off", True, "off", ""),
    ("off", False, "off", ""),
])
def test_verity_modes(mode, has_verity, effective, option):
    choice = resolve_verity(mode, ["/a", "/b"], problem_of=(lambda d: None) if has_verity else _no_verity)
    assert (choice.effective, choice.option) == (effective, option)
    assert (choice.problem is None) == (has_verity or mode == "off")
    # A pinned digest implies verity=require, whatever the mode.
    assert resolve_verity(mode, ["/a"], pinned=True, problem_of=_no_verity).effective == "require"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="verity mode 'always'"):
        resolve_verity("always", ["/a"])


def _live(verity="require", basedirs=("/store/objects",), record=None):
    opts = ",".join(["rw", "lowerdir+=/tmp/x"] + ["datadir+=%s" % d for d in basedirs]
                    + ["redirect_dir=on", "metacopy=on"] + (["verity=%s" % verity] if verity != "off" else []))
    entries = [MountInfo(b"1 0 8:1 / / rw - ext4 /dev/sda1 rw"),
               MountInfo(("36 1 0:33 / /srv/app rw,relatime - overlay composefs %s" % opts).encode())]
    return LiveMount("/srv/app", entries, record)


def _request(verity="auto", basedirs=("/store/objects",), problem_of=lambda d: None):
    return MountRequest("/srv/app", "/store/images/" + DIGEST, DIGEST, list(basedirs),
                        resolve_verity(verity, basedirs, problem_of=problem_of))


def test_a_matching_mount_has_no_differences():
    live = _live(record={"image_digest": DIGEST, "image": "/store/images/" + DIGEST})
    assert live.mounted and differences(live, _request()) == []
    assert _request().options() == "basedir=/store/objects,verity,rw"
    assert _request(problem_of=_no_verity).options() == "basedir=/store/objects,rw"


def test_differences_name_what_differs():
    live = _live(verity="off", basedirs=("/other",), record={"image_digest": "cd" * 32, "image": "/x"})
    found = differences(live, _request())
    assert [d.what for d in found] == ["image", "basedirs", "verity"]
    assert str(found[2]) == "verity: off mounted, require wanted"
    # No record: the image is unknown, which is a difference of its own.
    assert [d.what for d in differences(_live(), _request())] == ["image"]


def test_nothing_mounted_differs_in_nothing():
    live = LiveMount("/srv/app", [MountInfo(b"1 0 8:1 / / rw - ext4 /dev/sda1 rw")])
    assert not live.mounted and live.foreign() is None and differences(live, _request()) == []
