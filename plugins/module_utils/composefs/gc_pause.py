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


@contextmanager
def gc_paused_for_command(process_entry: bool) -> Iterator[None]:
    """gc_paused() around a whole command (parse, build, write).

    Between the steps the collector would otherwise wake up to a young
    generation holding the whole tree, and once more at interpreter exit: on a
    64k-entry dump those passes cost about a third of mkcomposefs' run time.
    When the command is the process's entry point (``process_entry``), what it
    leaves behind is frozen, so the exit does not walk it either; the process
    ends right after and the memory goes with it.  Called in-process (tests,
    other tools) the collector is only paused, nothing is frozen.
    """
    with gc_paused():
        try:
            yield
        finally:
            if process_entry:
                gc.freeze()
