# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Mount a missing composefs mount again, the way it was meant to be mounted.

Under systemd the agent runs sandboxed in a mount namespace of its own: a
mount made there would be invisible to the rest of the node.  So when
systemd is PID 1 and knows the mount's unit (the collection's mount module
writes one), systemd is asked to start it; the mount then happens in the
host's namespace, through mount.composefs, exactly as at boot.  Without
systemd the core mounts directly.
"""

from __future__ import annotations

import os
import subprocess
from typing import List

from composefs_fleet.errors import ComposefsError
from composefs_fleet.mount import mount_composefs
from composefs_fleet.systemd_unit import UnitError, unit_name

from .config import MountSpec

SYSTEMCTL_TIMEOUT = 120


class RemountError(ComposefsError):
    pass


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def _systemctl(args: List[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(["systemctl"] + args, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=SYSTEMCTL_TIMEOUT, check=False)


def unit_loaded(unit: str) -> bool:
    res = _systemctl(["show", "--property=LoadState", "--value", "--", unit])
    return res.returncode == 0 and res.stdout.strip() == "loaded"


def remount(spec: MountSpec, pin: bool) -> str:
    """Mount ``spec`` again; returns how.  ``pin``: the image file has fs-verity, so
    its digest can be pinned (the kernel measures it at mount time)."""
    if systemd_running():
        try:
            unit = unit_name(spec.where)
        except UnitError:
            unit = ""
        if unit and unit_loaded(unit):
            res = _systemctl(["start", "--", unit])
            if res.returncode != 0:
                raise RemountError("systemctl start %s failed: %s" % (unit, (res.stderr or res.stdout).strip()))
            return "systemctl start %s" % unit
    mount_composefs(spec.image, spec.where, spec.basedirs, digest=spec.digest if pin else None,
                    verity=spec.verity == "require", tryverity=spec.verity in ("on", "auto"),
                    upperdir=spec.upperdir, workdir=spec.workdir)
    return "mounted by the agent"
