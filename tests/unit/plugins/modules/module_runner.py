# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Run a module's main() with arguments, as AnsiballZ would, and return its JSON result."""
from __future__ import annotations

import json

import pytest

from ansible.module_utils.testing import patch_module_args


def run_module(module, capsys, args, check=False, diff=False):
    full = dict(args)
    full["_ansible_check_mode"] = check
    full["_ansible_diff"] = diff
    with patch_module_args(full):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out)
