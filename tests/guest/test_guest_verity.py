# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity for real (the host kernel has none): our ioctl wrappers, our
userspace Merkle tree and the guest's fsverity tool must agree, and
mkcomposefs --digest-store must leave every object verity-protected."""
import pytest

pytestmark = pytest.mark.guest


def test_enable_and_measure_agree_with_userspace_digest_and_fsverity_tool(guest):
    cases = guest.check("verity")["cases"]
    assert len(cases) == 9
    for c in cases:
        label = "%(path)s size %(size)d block %(block_size)d salt %(salt)r" % c
        assert c["flag_before"] is False, label
        assert c["measure_before"] == "VerityNotEnabled", label
        assert c["enabled_now"] is True, label
        assert c["enabled_again"] is False, label  # EEXIST: already enabled
        assert c["flag_after"] is True and c["getflags_verity"] is True, label
        assert c["kernel"] == "sha256:" + c["userspace"], label
        assert c["cli"] == c["kernel"], label
        assert c["open_for_write"] == "EPERM", label
    # Different contents really give different digests (no constant answer).
    assert len({c["userspace"] for c in cases}) == len(cases)


def test_verity_helpers_for_real(guest):
    h = guest.check("verity")["helpers"]
    assert h["measure_before"] is None and h["before"] == [h["want"], False], h
    assert h["enable"] is None and h["enable_again"] is None, h  # enabled now, then already enabled
    assert h["measure_after"] == "sha256:" + h["want"] and h["after"] == [h["want"], True], h
    assert h["wrong"][0] == "VerityMismatch" and "helpers" in h["wrong"][1], h
    assert "not supported" in h["tmpfs"][0] and "tmpfs" in h["tmpfs"][0] and h["tmpfs"][1] == h["tmpfs"][0], h
    assert h["tmpfs_devs"] == 1, h


def test_mkcomposefs_digest_store_enables_verity_on_every_object(guest):
    res = guest.check("digest-store")
    assert res["mkcomposefs"]["rc"] == 0, res["mkcomposefs"]
    objects = res["objects"]
    # a.bin and dup.bin share one object; files of <= 64 bytes are inlined.
    assert sorted(o["name_digest"] for o in objects) == res["expected_digests"]
    assert len(objects) == 6
    for o in objects:
        assert o["verity_flag"] is True, o
        assert o["cli"] == "sha256:" + o["name_digest"], o
