# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Pause the cyclic garbage collector while building or reading large trees.

A tree of 100,000 entries allocates several hundred thousand objects, and the
collector's repeated full passes over them measured about 40% of the time of
parsing a dump and writing its image.  Nothing freed during such a build is
cyclic garbage worth collecting early, so collection waits until the end.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
