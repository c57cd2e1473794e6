# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""trust_options: how the modules tell key paths from key texts, and when a policy is (not) made."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from ansible_collections.composefs.fleet.plugins.module_utils.composefs.errors import StoreError
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.sign_keys import KeyFileError
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.trust_options import (
    is_key_path, key_sources, load_policy, ref_name, signed_time)

OSTREE_KEY = base64.b64encode(bytes(range(32))).decode("ascii")  # one 32-byte key, ostree's format
PEM = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"


@pytest.mark.parametrize("entry, is_path", [
    ("/etc/composefs-fleet/keys/trusted.d", True),
    ("/etc/keys/release.pub\n", True),  # a trailing newline from a template is still a path
    (OSTREE_KEY, False),
    (OSTREE_KEY + "\n" + OSTREE_KEY + "\n", False),
    ("/" + OSTREE_KEY[1:] + "\nsecond line", False),
    (PEM, False),
    ("relative/path.pub", False),
])
def test_paths_and_texts(entry, is_path):
    assert is_key_path(entry) is is_path


def test_an_ostree_key_starting_with_a_slash_is_a_text(tmp_path):
    """1 key in 64 has base64 starting with "/": it names no file, so it is the key's text (a flaky test found it)."""
    raw = b"\xff" + bytes(range(31))
    line = base64.b64encode(raw).decode("ascii")
    assert line.startswith("/")
    assert not is_key_path(line)
    policy = load_policy([line], None, str(tmp_path))
    assert policy is not None and [key.raw for key in policy.trusted.values()] == [raw]
    assert is_key_path("/nonexistent/but-not-a-key.pub")  # so the error names the missing file


def test_texts_become_private_files_paths_and_pem_stay(tmp_path):
    out = key_sources(["/some/dir\n", PEM, OSTREE_KEY], str(tmp_path), "trusted_keys")
    assert out[:2] == ["/some/dir", PEM]  # the core reads PEM text itself; a path loses a trailing newline
    written = out[2]
    assert os.path.dirname(written) == str(tmp_path)
    with open(written) as f:
        assert f.read() == OSTREE_KEY + "\n"
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o600


def test_an_empty_entry_is_named(tmp_path):
    with pytest.raises(KeyFileError, match=r"revoked_keys\[1\]: an empty key"):
        key_sources(["/x", "  "], str(tmp_path), "revoked_keys")


def test_no_trusted_keys_no_policy(tmp_path):
    assert load_policy(None, None, str(tmp_path)) is None
    assert load_policy([], [OSTREE_KEY], str(tmp_path)) is None  # revoked alone: nothing to verify with


def test_trusted_keys_without_a_key_fail(tmp_path):
    empty = tmp_path / "trusted.d"
    empty.mkdir()
    with pytest.raises(KeyFileError, match="no key in it; an empty trust source would turn signature checks off"):
        load_policy([str(empty)], None, str(tmp_path))


def test_ostree_text_is_trusted(tmp_path):
    policy = load_policy([OSTREE_KEY], None, str(tmp_path))
    assert policy is not None and len(policy.trusted) == 1


def test_ref_name_and_signed_time():
    assert ref_name("app/v1") == "app/v1"
    with pytest.raises(StoreError, match="empty component"):
        ref_name("app//v1")
    assert signed_time(None, "app/v1") is None
    assert signed_time(b"not json", "app/v1") is None  # shown only: an unreadable statement shows no time
