# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Mount a missing composefs mount again, the way it was meant to be mounted.

Under systemd the agent runs sandboxed in a mount namespace of its own: a
mount made there would be invisible to the rest of the node.  So when
systemd is PID 1 and knows the mount's unit (the collection's mount module
writes one), systemd is asked to start it; the mount then happens in the
host's namespace, through mount.composefs, exactly as at boot.  Without
systemd the core mounts directly, with the arguments the mount module would
use for the same request (:mod:`composefs_fleet.mount_state`).
"""

from __future__ import annotations

from composefs_fleet.errors import ComposefsError
from composefs_fleet.mount import mount_composefs
from composefs_fleet.mount_state import MountRequest, resolve_verity
from composefs_fleet.systemd_unit import SystemctlError, UnitError, start_unit, systemd_running, unit_loaded, unit_name

from .config import MountSpec


class RemountError(ComposefsError):
    pass


def request_for(spec: MountSpec, pin: bool = False) -> MountRequest:
    """The mount request ``spec`` makes.  ``pin``: the image file has fs-verity, so
    its digest can be pinned (the kernel measures it at mount time) where the
    mount requires fs-verity anyway; ``verity: off`` is never turned into a
    verity mount by a pin."""
    verity = resolve_verity(spec.verity, spec.basedirs)
    pinned = spec.digest if pin and verity.effective == "require" else None
    return MountRequest(spec.where, spec.image, spec.digest, spec.basedirs, verity, pinned, spec.upperdir,
                        spec.workdir)


def remount(spec: MountSpec, pin: bool, history_dir: str = "") -> str:
    """Mount ``spec`` again; returns how.  A direct mount notes itself in the mount history in
    ``history_dir`` ("": the default), as every mount through the core does."""
    if systemd_running():
        try:
            unit = unit_name(spec.where)
        except UnitError:
            unit = ""
        if unit and unit_loaded(unit):
            try:
                start_unit(unit)
            except SystemctlError as exc:
                raise RemountError(str(exc)) from None
            return "systemctl start %s" % unit
    req = request_for(spec, pin)
    mount_composefs(req.image_file, req.where, req.basedirs, ref=spec.ref, store=spec.store_path,
                    history_dir=history_dir, **req.mount_args())
    return "mounted by the agent"
