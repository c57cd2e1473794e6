# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-fsverity-keys: load X.509 certificates into the kernel's ``.fs-verity`` keyring.

Run at boot by ``composefs-fleet-fsverity-keys.service`` before the composefs
mounts, so that images signed for fs-verity (``images/<digest>.sig``) can be
enabled and opened: the keyring is in memory only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence

PROG = "composefs-fsverity-keys"

DESCRIPTION = """\
load: add every certificate of PATH (a DER or PEM file; a directory: its
regular files not starting with '.') to the kernel's .fs-verity keyring,
which fs-verity built-in signatures (FS_IOC_ENABLE_VERITY) are checked
against.  All files are parsed before anything is added.  Loading a
certificate again replaces it.  Needs root and a kernel with
CONFIG_FS_VERITY_BUILTIN_SIGNATURES.

list: the keys in the .fs-verity keyring (serial and description).

fs.verity.require_signatures is never set here: it would refuse every
fs-verity file without a signature, including every object of the store.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    load = sub.add_parser("load", help="add certificates to the .fs-verity keyring")
    load.add_argument("paths", nargs="+", metavar="PATH", help="certificate file (DER or PEM) or directory of them")
    load.add_argument("--json", action="store_true", help="print the result as JSON")
    show = sub.add_parser("list", help="list the keys of the .fs-verity keyring")
    show.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from composefs_fleet import kernel_keyring
    from composefs_fleet.errors import ComposefsError

    try:
        if args.command == "load":
            serials = kernel_keyring.load_certificates(args.paths)
            if args.json:
                print(json.dumps({"keyring": kernel_keyring.KEYRING, "loaded": serials}))
            else:
                print("%d certificate(s) loaded into the %s keyring" % (len(serials), kernel_keyring.KEYRING))
            return 0
        keys = kernel_keyring.keyring_keys()
        if args.json:
            print(json.dumps({"keyring": kernel_keyring.KEYRING, "keys": [{"serial": s, "description": d} for s, d in keys]}))
        else:
            lines: List[str] = ["%d %s" % key for key in keys]
            if lines:
                print("\n".join(lines))
        return 0
    except ComposefsError as exc:
        sys.stderr.write("%s: %s: %s\n" % (PROG, args.command, exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
