# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""A real Debian root filesystem (the test guest's), as a 3-layer image: imported, it is the same
tree as umoci unpack + mkcomposefs.  kernel: the guest's disk image is read through a loop mount."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oci_fixtures import debian_layout, require_tools, store_cli, store_dump, two_step_dump, without_root  # noqa: E402

pytestmark = pytest.mark.kernel


def test_debian_root_in_three_layers_equals_the_two_step_way(tmp_path):
    require_tools()
    layout = debian_layout(tmp_path)
    store = tmp_path / "store"
    store_cli("--repo", store, "init")
    res = json.loads(store_cli("--repo", store, "--json", "add-image", "oci:" + layout.ref, "--ref", "debian").stdout)
    assert res["oci_layers"] == 3 and res["objects"] > 1000
    ours = store_dump(store, "debian")
    assert "/usr/share/locale/" not in ours and "/usr/bin/bash " in ours and "imported" in ours
    assert without_root(ours) == without_root(two_step_dump(layout.ref, tmp_path))
    assert store_cli("--repo", store, "fsck").returncode == 0
