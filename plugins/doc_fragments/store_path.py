# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment(object):
    # path and allow_foreign_owner: the store the maintenance modules (gc, fsck) work on.
    DOCUMENTATION = r"""
options:
  path:
    description: The store directory.
    type: path
    required: true
  allow_foreign_owner:
    description:
      - Accept a store whose directory or store subdirectories belong to another user (not the one running the
        module, not root) or are writable by group or others. By default such a store is refused.
    type: bool
    default: false
"""
