# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Output into a closed pipe (``composefs-info dump IMG | head -1``).

Python ignores SIGPIPE and raises BrokenPipeError instead; the C tools die
of the signal, silently, and the shell sees status 141.  The drop-ins do
the same rather than print "Broken pipe" or a traceback.
"""

from __future__ import annotations

import os
import signal
import sys


def die_of_sigpipe() -> int:
    """Terminate by SIGPIPE as a C tool would; returns only if the signal cannot be raised."""
    try:
        sys.stderr.flush()
    except OSError:
        pass
    try:
        # The interpreter flushes stdout once more on exit: let that succeed.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE
