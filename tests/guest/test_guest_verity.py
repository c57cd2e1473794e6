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
