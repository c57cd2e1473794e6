# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""mount.composefs with fs-verity in the guest: digest= pins the image,
verity (verity=require on overlay) pins every object."""
import pytest

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("guest_mount_helper")]

ALL_FILES = {"tiny", "edge64", "edge65", "a.bin", "b.bin", "sub/c.bin", "sub/deeper/d.bin", "sub/e.bin",
             "empty", "dup.bin"}


def test_mount_with_the_real_image_digest(guest):
    res = guest.check("mount")
    assert res["print_digest"] == res["kernel_digest"]
    assert res["right"]["rc"] == 0 and res["right"]["mounted"], res["right"]
    assert res["right_read"] == {name: "ok" for name in ALL_FILES}
    assert res["right_symlink"] == "sub/c.bin"


def test_mount_with_a_wrong_digest_is_refused(guest):
    res = guest.check("mount")
    assert res["wrong"]["rc"] != 0 and not res["wrong"]["mounted"], res["wrong"]
    assert res["wrong"]["err"].strip(), "refused without saying why"


def test_image_without_verity_is_refused_when_a_digest_is_given(guest):
    res = guest.check("mount")
    assert res["no_verity_image"]["rc"] != 0 and not res["no_verity_image"]["mounted"], res["no_verity_image"]
    assert res["no_verity_image"]["err"].strip()
    # Control: the same bytes mount without digest=, so the refusal is about verity.
    assert res["no_digest_plain"]["rc"] == 0 and res["no_digest_plain"]["mounted"], res["no_digest_plain"]
    assert res["no_digest_plain_read"] == {name: "ok" for name in ALL_FILES}


def test_tampered_objects_fail_to_read_and_nothing_else_does(guest):
    res = guest.check("tamper")
    assert res["before"]["rc"] == 0 and res["before"]["mounted"], res["before"]
    assert res["before_read"] == {name: "ok" for name in ALL_FILES}
    assert res["flipped_has_verity"] is False
    assert res["replaced_has_verity"] is True
    assert res["after"]["rc"] == 0 and res["after"]["mounted"], res["after"]
    read = res["after_read"]
    tampered = res["tampered"]
    assert read[tampered["flipped"]] == "EIO", read
    assert read[tampered["replaced"]] == "EIO", read
    assert read[tampered["deleted"]] in ("EIO", "ENOENT"), read
    untouched = ALL_FILES - set(tampered.values())
    assert {name: read[name] for name in untouched} == {name: "ok" for name in untouched}
    # The directory tree itself comes from the image, not the store.
    assert "sub" in res["after_listing"] and "link" in res["after_listing"]
    # The kernel says why: the flipped copy lost verity, the replacement has another digest.
    kernel_log = "\n".join(res["dmesg"])
    assert "has no fs-verity digest" in kernel_log, kernel_log
    assert "has the wrong fs-verity digest" in kernel_log, kernel_log
