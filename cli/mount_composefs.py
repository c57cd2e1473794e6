# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""mount.composefs: mount a composefs image (drop-in for the C helper, 1.0.8).

    mount.composefs [-t composefs] [-o OPTS] IMAGE TARGET

Also the form mount(8) uses for helpers,
``mount.composefs IMAGE TARGET [-sfnv] [-N NS] [-o OPTS] [-t TYPE]``.
Exit status 0 on success, 1 on any error (as the C helper).
"""

from __future__ import annotations

import os
import sys
# typing itself costs ~20 ms of start-up (re, functools...): imported for type checkers only.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import List, Optional, Tuple

PROG = "mount.composefs"

USAGE = """\
usage: {prog} [-t type] [-o opt[,opts..]] IMAGE MOUNTPOINT
Example:
  {prog} -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage
or, as a mount helper:
  mount -t composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage

Supported options:
  basedir=PATH[:PATH]    Specify location of basedir(s) (\\: is a colon inside a path)
  digest=DIGEST          Specify required image digest (fs-verity, hex)
  idmap=PATH             Specify path to a user namespace whose ID mapping should be used
  verity                 Require all files to have specified and valid fs-verity digests
  tryverity              If supported by kernel and basedir filesystem, require fs-verity
  ro                     Read only
  rw                     Read/write
  upperdir=PATH          Overlayfs upperdir
  workdir=PATH           Overlayfs workdir
  nosuid, nodev, noexec, noatime, relatime, strictatime, nodiratime, nosymfollow
                         (and their opposites)
                         Applied to the mount
  defaults, auto, noauto, nofail, _netdev, user, nouser, users, owner, group, x-*, comment=*
                         Accepted and ignored (fstab and systemd pass them)
  A backslash escapes the next character, e.g. \\, for a comma inside a path.

mount(8) helper flags:
  -s                     Sloppy: ignore unknown options
  -f                     Fake: check everything, mount nothing
  -n                     No mtab (ignored)
  -v                     Verbose: say how the mount was made
  -N NS                  Mount in the mount namespace NS (a path or a PID)
  -t TYPE                Must be composefs

systemd:
  --print-systemd-unit   Print a .mount unit for this mount instead of mounting
  --write-systemd-unit=DIR
                         Write that unit into DIR (e.g. /etc/systemd/system) instead of
                         mounting; enable it with: systemctl enable --now UNIT
  -h, --help             Show this help
"""


class _Usage(Exception):
    pass


def _say(message: str) -> None:
    sys.stderr.write("%s: %s\n" % (PROG, message))
    sys.stderr.flush()


def parse_args(argv: List[str]) -> Tuple[dict, List[str]]:
    """getopt("hsfnvt:o:N:") with GNU permutation, plus our long options."""
    opts = {"o": None, "t": None, "N": None, "s": False, "f": False, "n": False, "v": False,
            "h": False, "print_unit": False, "write_unit": None}
    operands: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            operands.extend(argv[i:])
            break
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            if name == "help" and not has_value:
                opts["h"] = True
            elif name == "print-systemd-unit" and not has_value:
                opts["print_unit"] = True
            elif name == "write-systemd-unit":
                if not has_value:
                    if i >= len(argv):
                        raise _Usage("option '--write-systemd-unit' requires an argument")
                    value = argv[i]
                    i += 1
                opts["write_unit"] = value
            else:
                raise _Usage("unrecognized option '%s'" % arg)
            continue
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c in "otN":
                value = arg[j:]
                if not value:
                    if i >= len(argv):
                        raise _Usage("option requires an argument -- '%s'" % c)
                    value = argv[i]
                    i += 1
                opts[c] = value
                break
            if c in "hsfnv":
                opts[c] = True
            else:
                raise _Usage("invalid option -- '%s'" % c)
    return opts, operands


def _enter_namespace(ns: str) -> None:
    from composefs_fleet import mount_api

    path = "/proc/%s/ns/mnt" % ns if ns.isdigit() else ns
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mount_api.setns(fd, mount_api.CLONE_NEWNS)
    finally:
        os.close(fd)


def _unit_options(options) -> str:
    """The -o string a unit passes back to us: the parsed options, normalized."""
    from composefs_fleet.mount_options import ATTR_OPTIONS, format_options

    def absolute(path: Optional[str]) -> Optional[str]:
        # systemd runs mount(8) from /: relative paths would change meaning.
        return None if path is None else os.path.abspath(path)

    extra = list(options.ignored) + _attr_names(options, ATTR_OPTIONS)
    return format_options([os.path.abspath(d) for d in options.basedirs], options.digest, options.verity,
                          options.tryverity, absolute(options.idmap), absolute(options.upperdir),
                          absolute(options.workdir), options.readonly, extra)


def _attr_names(options, table) -> List[str]:
    names = []
    for name, (set_bits, clr_bits) in table.items():
        if set_bits and options.attr_set & set_bits == set_bits:
            names.append(name)
    return names


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts, operands = parse_args(args)
    except _Usage as exc:
        _say(str(exc))
        sys.stderr.write(USAGE.format(prog=PROG))
        return 1
    if opts["h"]:
        sys.stdout.write(USAGE.format(prog=PROG))
        return 0
    if opts["t"] is not None and opts["t"] != "composefs":
        _say("Unsupported fs type '%s'" % opts["t"])
        return 1
    if len(operands) < 1:
        sys.stderr.write("No source path specified\n" + USAGE.format(prog=PROG))
        return 1
    if len(operands) < 2:
        sys.stderr.write("No mount path specified\n" + USAGE.format(prog=PROG))
        return 1
    if len(operands) > 2:
        _say("too many arguments: %s" % " ".join(operands[2:]))
        return 1
    image, target = operands[0], operands[1]

    from composefs_fleet.errors import ComposefsError
    from composefs_fleet.mount import mount_composefs
    from composefs_fleet.mount_options import parse_options

    try:
        options = parse_options(opts["o"], sloppy=bool(opts["s"]))
        if not options.basedirs:
            sys.stderr.write("No object dirs specified\n" + USAGE.format(prog=PROG))
            return 1
        if (options.upperdir is None) != (options.workdir is None):
            _say("Both workdir and upperdir must be specified if used")
            return 1
        if opts["print_unit"] or opts["write_unit"] is not None:
            from composefs_fleet.systemd_unit import unit_text, write_unit

            unit_args = (os.path.abspath(image), os.path.abspath(target), _unit_options(options))
            needs = [os.path.abspath(d) for d in options.basedirs]
            if opts["write_unit"] is not None:
                sys.stdout.write(write_unit(opts["write_unit"], *unit_args, requires_mounts_for=needs) + "\n")
            else:
                sys.stdout.write(unit_text(*unit_args, requires_mounts_for=needs))
            return 0
        if opts["N"] is not None:
            try:
                _enter_namespace(opts["N"])
            except OSError as exc:
                _say("cannot enter mount namespace %s: %s" % (opts["N"], exc.strerror))
                return 1
        result = mount_composefs(image, target, options.basedirs, digest=options.digest,
                                 verity=options.verity, tryverity=options.tryverity, idmap=options.idmap,
                                 upperdir=options.upperdir, workdir=options.workdir,
                                 readonly=options.readonly, attr_set=options.attr_set,
                                 dry_run=bool(opts["f"]), follow_symlinks=True)
    except ComposefsError as exc:
        _say(str(exc))
        return 1
    if opts["v"]:
        if options.ignored:
            _say("ignored options: %s" % ",".join(options.ignored))
        if opts["f"]:
            _say("checked %s for %s (-f: nothing mounted)" % (image, target))
        else:
            _say("mounted %s on %s (erofs: %s, lower layer: %s, verity: %s)"
                 % (image, target, result.erofs_source, result.lower, "require" if result.verity else "off"))
            if result.record_path:
                _say("recorded in %s" % result.record_path)
            else:
                _say("mounted, but not recorded: %s" % result.record_error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
