# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""One model of a composefs mount: what is asked, what is there, how they differ.

The mount module and the node agent both turn a request (image, basedirs,
verity mode, upper/work directories) into mount arguments and compare it with
the live mount; they do it here, so that a verity mode means the same in both:

- ``require``: overlayfs ``verity=require`` always (the ``verity`` option);
  a basedir on a filesystem without fs-verity is a problem the caller refuses.
- ``auto``: ``require`` when the filesystems of all basedirs support
  fs-verity, else off, decided now; the option string carries the decision
  (``verity`` or nothing), so a boot mounts the same way.
- ``boot`` (formerly ``on``, still accepted): decided as ``auto`` now, but
  the option string says ``tryverity``: the mount helper decides again at
  every mount, so at every boot.
- ``off``: no fs-verity checks.

A pinned image digest (``digest=``) implies ``verity`` (as in the C helper).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import mount_record, mountinfo
from .fsverity_ioctl import verity_problem
from .mount_options import format_options

VERITY_MODES = ("require", "boot", "on", "off", "auto")


class VerityChoice:
    """What a verity mode resolves to for a set of basedirs."""

    __slots__ = ("mode", "effective", "option", "problem")

    def __init__(self, mode: str, effective: str, option: str, problem: Optional[str]) -> None:
        self.mode = mode
        self.effective = effective  # the overlay's verity when mounted now: "require" or "off"
        self.option = option  # the mount option carrying the choice: "verity", "tryverity" or ""
        self.problem = problem  # why a basedir cannot have fs-verity (None: all can)

    def __repr__(self) -> str:
        return "VerityChoice(%r, effective=%r, option=%r, problem=%r)" % (self.mode, self.effective, self.option,
                                                                          self.problem)


def resolve_verity(mode: str, basedirs: Sequence[str], pinned: bool = False,
                   problem_of: Optional[Callable[[str], Optional[str]]] = None) -> VerityChoice:
    """The one meaning of ``mode`` (see the module docstring) for ``basedirs``."""
    if mode not in VERITY_MODES:
        raise ValueError("verity mode %r is not one of %s" % (mode, ", ".join(VERITY_MODES)))
    check = problem_of or verity_problem
    problem = None
    if mode != "off":
        for basedir in basedirs:
            why = check(basedir)
            if why:
                problem = "the filesystem of basedir %s has no fs-verity: %s" % (basedir, why)
                break
    if mode == "require":
        effective, option = "require", "verity"
    elif mode == "off":
        effective, option = "off", ""
    else:
        effective = "off" if problem else "require"
        option = "tryverity" if mode in ("boot", "on") else ("" if problem else "verity")
    if pinned:
        effective = "require"
    return VerityChoice(mode, effective, option, problem)


class MountRequest:
    """A composefs mount as asked for, resolved: paths normalized, verity decided."""

    def __init__(self, where: str, image_file: Optional[str], image_digest: Optional[str], basedirs: Sequence[str],
                 verity: VerityChoice, pin: Optional[str] = None, upperdir: Optional[str] = None,
                 workdir: Optional[str] = None) -> None:
        self.where = where
        self.image_file = image_file
        self.image_digest = image_digest
        self.basedirs = [os.path.normpath(d) for d in basedirs]
        self.verity = verity
        self.pin = pin
        self.upperdir = None if upperdir is None else os.path.normpath(upperdir)
        self.workdir = None if workdir is None else os.path.normpath(workdir)

    def mount_args(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`.mount.mount_composefs` (after image, target, basedirs)."""
        return {"digest": self.pin, "verity": self.verity.option == "verity",
                "tryverity": self.verity.option == "tryverity", "upperdir": self.upperdir, "workdir": self.workdir}

    def options(self) -> str:
        """The ``-o`` string mount.composefs mounts this request with (a unit's ``Options=``)."""
        args = self.mount_args()
        return format_options(self.basedirs, self.pin, args["verity"], args["tryverity"], None, self.upperdir,
                              self.workdir, False)

    def needs(self) -> List[str]:
        """Paths the mount needs mounted first (a unit's ``RequiresMountsFor=``)."""
        return list(self.basedirs) + [p for p in (self.upperdir, self.workdir) if p]

    def state(self) -> Dict[str, Any]:
        return {"mounted": True, "image_digest": self.image_digest, "basedirs": list(self.basedirs),
                "verity": self.verity.effective, "upperdir": self.upperdir, "workdir": self.workdir}


NOT_MOUNTED: Dict[str, Any] = {"mounted": False, "image_digest": None, "basedirs": [], "verity": None,
                               "upperdir": None, "workdir": None}


class LiveMount:
    """The mounts at a mount point now (mountinfo) and the record of the composefs one on top."""

    def __init__(self, where: str, entries: Sequence[mountinfo.MountInfo],
                 record: Optional[Dict[str, Any]] = None) -> None:
        self.where = where
        self.entries = entries
        self.stack = mountinfo.mounts_at(where, entries)
        self.top = self.stack[-1] if self.stack else None
        self.layers = 0  # composefs mounts stacked on top
        for entry in reversed(self.stack):
            if not entry.is_composefs():
                break
            self.layers += 1
        self.layout: Optional[Dict[str, Any]] = self.top.layout() if self.layers and self.top is not None else None
        self.record = record if self.layers else None

    @property
    def mounted(self) -> bool:
        return self.layers > 0

    def foreign(self) -> Optional[str]:
        """Something that is not composefs on top (never touched)."""
        if self.top is not None and not self.top.is_composefs():
            return "%s (%s %s)" % (self.top.where, self.top.fstype, self.top.source)
        return None

    def state(self) -> Dict[str, Any]:
        if not self.mounted or self.layout is None:
            return dict(NOT_MOUNTED)
        return {"mounted": True, "image_digest": self.record.get("image_digest") if self.record else None,
                "basedirs": self.layout["basedirs"], "verity": self.layout["verity"],
                "upperdir": self.layout["upperdir"], "workdir": self.layout["workdir"]}


def live_mount(where: str, entries: Optional[Sequence[mountinfo.MountInfo]] = None,
               record_dir: str = mount_record.RECORD_DIR) -> LiveMount:
    """The live state at ``where``, with the record of this namespace's mount on top."""
    if entries is None:
        entries = mountinfo.read_mountinfo()
    return LiveMount(where, entries, mount_record.live_record(where, entries, record_dir))


class Difference:
    """One way the live mount differs from the request."""

    __slots__ = ("what", "mounted", "wanted", "text")

    def __init__(self, what: str, mounted: object, wanted: object, text: str) -> None:
        self.what = what  # image, digest, basedirs, verity, upperdir, workdir or stacked
        self.mounted = mounted
        self.wanted = wanted
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return "Difference(%r)" % self.text


# The differences that are about how the overlay is made (not which image it shows).
LAYOUT = ("basedirs", "verity", "upperdir", "workdir")


def _norm(path: Optional[str]) -> Optional[str]:
    return os.path.normpath(path) if path else None


def differences(live: LiveMount, request: MountRequest) -> List[Difference]:
    """How the composefs mount at the request's place differs from it (empty: nothing mounted, or alike)."""
    if not live.mounted or live.layout is None:
        return []
    out: List[Difference] = []
    rec = live.record
    if request.image_digest is not None:
        if rec is None:
            out.append(Difference("image", None, request.image_digest,
                                  "image: the mount has no valid mount record (made by another tool, or before the "
                                  "last remount by another tool), so which image it shows is unknown"))
        elif rec.get("image_digest") != request.image_digest:
            out.append(Difference("image", rec.get("image_digest"), request.image_digest,
                                  "image: %s is mounted (%s), %s is wanted (%s)"
                                  % (rec.get("image_digest"), rec.get("image"), request.image_digest,
                                     request.image_file)))
    if rec is not None and request.pin and rec.get("digest") != request.pin:
        had = "pinned to %s" % rec["digest"] if rec.get("digest") else "without a pinned digest"
        out.append(Difference("digest", rec.get("digest"), request.pin,
                              "digest: the mount was made %s, the request pins %s" % (had, request.pin)))
    lay = live.layout
    if [os.path.normpath(d) for d in lay["basedirs"]] != request.basedirs:
        out.append(Difference("basedirs", lay["basedirs"], request.basedirs,
                              "basedirs: %s mounted, %s wanted" % (lay["basedirs"], request.basedirs)))
    if lay["verity"] != request.verity.effective:
        out.append(Difference("verity", lay["verity"], request.verity.effective,
                              "verity: %s mounted, %s wanted" % (lay["verity"], request.verity.effective)))
    for what in ("upperdir", "workdir"):
        have = lay[what]
        if _norm(have) != getattr(request, what):
            out.append(Difference(what, have, getattr(request, what),
                                  "%s: %s mounted, %s wanted" % (what, have, getattr(request, what))))
    if live.layers > 1:
        out.append(Difference("stacked", live.layers, 1, "stacked: %d composefs mounts are stacked at %s"
                              % (live.layers, request.where)))
    return out
