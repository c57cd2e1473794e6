# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The composefs-fleet node agent (imports the collection's core as ``composefs_fleet``)."""
