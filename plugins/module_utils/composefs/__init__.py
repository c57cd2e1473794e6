# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Pure-Python composefs core: format, fs-verity, object store, mount.

This package lives in the Ansible collection's ``plugins/module_utils`` so that
AnsiballZ ships it to targets; the CLIs and the agent import this very package
(installed editable as ``composefs_fleet``).  Keep imports relative and limited
to the standard library.
"""
