# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.deprecated_names: one deprecation per old name, with version and collection."""

from __future__ import annotations

import json

from ansible_collections.composefs.fleet.plugins.modules import deprecated_names
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module


def test_each_old_name_is_deprecated_with_version_and_collection(capsys):
    result = run_module(deprecated_names, capsys, {
        "role": "composefs.fleet.composefs_node", "old_role": "composefs.fleet.node",
        "variables": {"node_stores": "composefs_node_stores", "node_images": "composefs_node_images"}}, check=True)
    assert result["changed"] is False
    assert result["deprecated"] == [
        "the role name composefs.fleet.node is deprecated, use composefs.fleet.composefs_node instead",
        "composefs.fleet.composefs_node: the variable node_images is deprecated, set composefs_node_images instead",
        "composefs.fleet.composefs_node: the variable node_stores is deprecated, set composefs_node_stores instead",
    ]
    # Ansible's deprecations (their layout differs between ansible-core versions): each message, with the
    # version that removes it and this collection.
    shown = json.dumps(result["deprecations"])
    assert '"1.0.0"' in shown and '"composefs.fleet"' in shown
    for text in result["deprecated"]:
        assert json.dumps(text) in shown


def test_nothing_old_nothing_deprecated(capsys):
    result = run_module(deprecated_names, capsys, {"role": "composefs.fleet.composefs_agent"})
    assert result["changed"] is False and result["deprecated"] == []
