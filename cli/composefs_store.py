# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-store: manage a content-addressed store of composefs images.

Exit status: 0 success, 1 failure (or damage found by fsck), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence

from . import store_pull, store_sign

PROG = "composefs-store"

DESCRIPTION = """\
Keep composefs images and the file contents they use in one store, so a file
shared by many images is stored (and cached) once.

Layout of the store (--repo DIR):
  DIR/objects/XX/YYYY...  file contents named by their fs-verity digest; use it as
                          the basedir of composefs mounts and as the C
                          mkcomposefs --digest-store directory
  DIR/images/DIGEST       images, named by the fs-verity digest of the image file
  DIR/refs/NAME           names of images (NAME may contain '/')
  DIR/signatures/NAME     the signed statement of ref NAME (see sign, verify)
  DIR/meta.json           store format version and digest algorithm

The store and its directories must belong to you or root and must not be
writable by group or others (as sshd's StrictModes); symbolic links inside
the store are refused, never followed.  New stores are private (mode 0700:
mounts read the objects, nobody needs to list them); see init --shared-layout.

Everything is written to a temporary file, fsync-ed and renamed: a crash
leaves complete files or debris that gc removes, never a broken object.
Adds may run while gc runs: a lock keeps gc from removing anything an add
in progress uses.
"""

EPILOG = """\
examples:
  composefs-store --repo /var/lib/cfs init
  composefs-store --repo /var/lib/cfs add-image ./rootfs --ref app/v1
  composefs-store --repo /var/lib/cfs add-image image.cfs --ref app/v2 --objects-from ./objects
  composefs-store --repo /var/lib/cfs add-image oci-archive:app.tar:latest --ref app/v3
  composefs-store --repo /var/lib/cfs rm-ref app/v1
  composefs-store --repo /var/lib/cfs gc --dry-run
  composefs-store --repo /var/lib/cfs fsck --repair
  composefs-store --repo /var/lib/cfs pull https://images.example.com/cfs app/v2
  composefs-store --repo /srv/cfs sign app/v2 --key fleet.key --expires 90d
  composefs-store --repo /var/lib/cfs pull https://images.example.com/cfs app/v2 --trusted-key fleet.pub

exit status: 0 success, 1 failure or damage found, 2 usage error
"""


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024
    return "%d B" % n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", metavar="DIR", default=os.environ.get("COMPOSEFS_STORE"),
                        help="the store directory (default: $COMPOSEFS_STORE)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--allow-foreign-owner", action="store_true",
                        help="accept a store (or a directory of it) that belongs to another user or is writable by "
                             "group or others; by default it is refused, since whoever can write there can swap "
                             "its contents under you")
    # --repo, --json and --allow-foreign-owner are also accepted after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo", metavar="DIR", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--allow-foreign-owner", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create the store (no-op if it exists)",
                          description="Create DIR with meta.json, objects/, images/ and refs/, mode 0700 "
                                      "(an empty existing DIR gets that mode too).  An existing store is left "
                                      "as it is, modes included.")
    init.add_argument("--shared-layout", action="store_true",
                      help="create the directories mode 0755, the layout of the C composefs tools (anyone may "
                           "list the objects and read the images) instead of 0700")

    add = sub.add_parser("add-image", parents=[common],
                         help="add an image from a directory, a dump file, an image or an OCI container image",
                         description="Build an image from SOURCE and store it with its objects, then point "
                                     "the ref at it.  SOURCE is a directory (scanned like mkcomposefs does; "
                                     "the image is byte-identical to `mkcomposefs --digest-store`), a "
                                     "composefs-dump(5) file ('-' for stdin), or an existing composefs image "
                                     "(stored as it is), or an OCI container image: oci:DIR[:TAG] (an image "
                                     "layout), oci-archive:FILE[:TAG] or docker-archive:FILE[:TAG] (as skopeo "
                                     "names them).  An OCI image's layers are streamed, never unpacked to disk: "
                                     "files go straight into the store, whiteouts are applied as the image spec "
                                     "says, every blob and layer is checked against its digest and the "
                                     "config's diff_ids, and nothing is published unless all match.  Dumps and "
                                     "images carry no file contents: their "
                                     "objects must be in the store or in --objects-from.  Unchanged files of a "
                                     "directory are not hashed again (digest cache, see --no-cache).")
    add.add_argument("source", metavar="SOURCE")
    add.add_argument("--ref", required=True, metavar="NAME", help="ref to create or move (e.g. app/v1)")
    add.add_argument("--objects-from", metavar="DIR",
                     help="a digest store (XX/YYYY... files) to copy missing objects from; each is verified")
    add.add_argument("--use-epoch", action="store_true", help="make all mtimes zero")
    add.add_argument("--skip-devices", action="store_true", help="don't store device nodes")
    add.add_argument("--skip-xattrs", action="store_true", help="don't store xattrs")
    add.add_argument("--user-xattrs", action="store_true", help="only store user.* xattrs")
    add.add_argument("--hardlinks", action="store_true", help="keep hard links of a directory source")
    add.add_argument("--threads", type=int, metavar="N", help="copy threads (default: CPUs)")
    add.add_argument("--no-cache", action="store_true", help="hash every file; don't use the digest cache")
    add.add_argument("--min-version", type=int, default=0, choices=(0, 1), help="minimum image format version")
    add.add_argument("--max-version", type=int, default=1, choices=(0, 1), help="maximum image format version")
    add.add_argument("--expected-digest", metavar="HEX",
                     help="fail, and publish nothing, unless the image's fs-verity digest is HEX")
    add.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                     help="for a multi-platform OCI image: which one (default: this machine's, e.g. linux/amd64)")
    add.add_argument("--dry-run", action="store_true",
                     help="say what the add would do (digest, new objects); write nothing in the store")

    sub.add_parser("ls", parents=[common], help="list images with their refs and sizes")
    sub.add_parser("refs", parents=[common], help="list refs and the images they name")

    rm = sub.add_parser("rm-ref", parents=[common], help="remove refs (gc then frees what only they used)")
    rm.add_argument("names", nargs="+", metavar="NAME")

    fsck = sub.add_parser("fsck", parents=[common], help="verify every object, image and ref",
                          description="Check that every object's fs-verity digest equals its name (measured "
                                      "by the kernel where fs-verity is on, computed otherwise), that every "
                                      "image is intact and has all its objects, and that every ref names an "
                                      "image.  Exit status 1 if anything is damaged.")
    fsck.add_argument("--repair", action="store_true",
                      help="move damaged objects and images into DIR/damaged/ (re-add their sources afterwards)")
    fsck.add_argument("--threads", type=int, metavar="N", help="hashing processes (default: CPUs)")

    gc = sub.add_parser("gc", parents=[common], help="remove images and objects no ref and no mount uses",
                        description="Remove images not named by a ref and not mounted, and objects no kept "
                                    "image uses.  Mounted images are found through loop devices and erofs "
                                    "mounts.  Adds may run meanwhile.")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    gc.add_argument("--tmp-grace", type=float, default=3600.0, metavar="SECONDS",
                    help="remove objects/.tmp* files only when older than this (default 3600: a C mkcomposefs "
                         "--digest-store may still be writing them)")
    gc.add_argument("--verbose", "-v", action="store_true", help="list every removed name")
    gc.add_argument("--history-dir", metavar="DIR", default=None,
                    help="where the mount points' histories are, whose previous images gc keeps for a rollback "
                         "(default: /var/lib/composefs-fleet/mounts)")

    sub.add_parser("stats", parents=[common], help="objects, bytes, sharing between images, bytes saved")
    store_pull.add_parsers(sub, common)
    store_sign.add_parsers(sub, common)
    return parser


class _Fail(Exception):
    pass


def _emit(args: argparse.Namespace, data: Any, lines: List[str]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        for line in lines:
            sys.stdout.write(line + "\n")


def _open(args: argparse.Namespace) -> Any:
    from composefs_fleet.store import Store

    return Store.open(args.repo, allow_foreign=args.allow_foreign_owner)


def _cmd_init(args: argparse.Namespace) -> int:
    from composefs_fleet.store import PRIVATE_MODE, SHARED_MODE, Store

    store, created = Store.init(args.repo, allow_foreign=args.allow_foreign_owner,
                                mode=SHARED_MODE if args.shared_layout else PRIVATE_MODE)
    where = os.fsdecode(store.path)
    _emit(args, {"path": where, "created": created},
          ["initialized composefs store in %s" % where if created else "%s is already a composefs store" % where])
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from composefs_fleet.store_add import add_image

    if args.skip_xattrs and args.user_xattrs:
        raise _Fail("--skip-xattrs and --user-xattrs exclude each other")
    if args.threads is not None and args.threads < 1:
        raise _Fail("--threads must be at least 1")
    if args.min_version > args.max_version:
        raise _Fail("--min-version is larger than --max-version")
    if args.platform is not None:
        from composefs_fleet.oci_source import is_oci_source

        if not is_oci_source(args.source):
            raise _Fail("--platform applies to OCI sources (oci:, oci-archive:, docker-archive:)")
    store = _open(args)
    result = add_image(store, args.source, args.ref, use_epoch=args.use_epoch, skip_devices=args.skip_devices,
                       skip_xattrs=args.skip_xattrs, user_xattrs=args.user_xattrs,
                       hardlinks=args.hardlinks, threads=args.threads, use_cache=not args.no_cache,
                       objects_from=args.objects_from, min_version=args.min_version,
                       max_version=args.max_version, expected_digest=args.expected_digest,
                       dry_run=args.dry_run, platform=args.platform)
    moved = "" if result.previous in (None, result.digest) else " (was %s)" % result.previous
    lines = [
        "%s%s %s%s" % ("would add " if args.dry_run else "", result.digest, result.ref, moved),
        "  %s image from %s; %d objects: %d new (%s), %d files hashed (%s), %d from the digest cache"
        % ("new" if result.image_written else "existing", result.source_kind, result.objects,
           result.objects_written, _human(result.bytes_written), result.files_hashed,
           _human(result.bytes_hashed), result.cache_hits),
    ]
    _emit(args, result.as_dict(), lines)
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    from composefs_fleet.errors import ComposefsError

    store = _open(args)
    by_image: Dict[str, List[str]] = {}
    for ref, target in store.ref_targets().items():
        by_image.setdefault(target, []).append(ref)
    rows = []
    for hexd in store.list_images():
        row: Dict[str, Any] = {"digest": hexd, "refs": sorted(by_image.get(hexd, []))}
        try:
            needed = store.image_objects(hexd)
            row["size"] = needed.image_bytes
            row["objects"] = len(needed.objects)
            row["file_bytes"] = needed.logical_bytes
        except (OSError, ComposefsError) as exc:
            row["error"] = str(exc)
        rows.append(row)
    lines = []
    for row in rows:
        if "error" in row:
            lines.append("%s  UNREADABLE: %s" % (row["digest"], row["error"]))
            continue
        lines.append("%s  %8s  %6d objects  %10s  %s" % (row["digest"], _human(row["size"]), row["objects"],
                                                         _human(row["file_bytes"]),
                                                         ", ".join(row["refs"]) or "(no ref: gc removes it)"))
    _emit(args, rows, lines)
    return 0


def _cmd_refs(args: argparse.Namespace) -> int:
    from composefs_fleet.errors import StoreError

    store = _open(args)
    rows = []
    for name in store.list_refs():
        try:
            rows.append({"ref": name, "digest": store.read_ref(name)})
        except StoreError as exc:
            rows.append({"ref": name, "error": str(exc)})
    _emit(args, rows, ["%s %s" % (r.get("digest", "DAMAGED"), r["ref"]) for r in rows])
    return 0


def _cmd_rm_ref(args: argparse.Namespace) -> int:
    from composefs_fleet.errors import StoreError

    store = _open(args)
    removed = []
    failed = []
    with store.lock.shared():
        for name in args.names:
            try:
                removed.append({"ref": name, "digest": store.remove_ref(name)})
            except StoreError as exc:
                failed.append(str(exc))
    _emit(args, {"removed": removed, "errors": failed},
          ["removed ref %s (was %s)" % (r["ref"], r["digest"]) for r in removed])
    for message in failed:
        sys.stderr.write("%s: %s\n" % (PROG, message))
    return 1 if failed else 0


def _cmd_fsck(args: argparse.Namespace) -> int:
    from composefs_fleet.store_fsck import check

    store = _open(args)
    result = check(store, repair=args.repair, threads=args.threads)
    lines = ["error: " + e for e in result.errors] + ["note: " + n for n in result.notes]
    lines += ["moved aside: " + m for m in result.moved]
    lines.append("%s: %d objects (%s, %d measured by fs-verity), %d images, %d refs"
                 % ("clean" if result.clean else "DAMAGED (%d problems)" % len(result.errors), result.objects,
                    _human(result.object_bytes), result.verity_measured, result.images, result.refs))
    _emit(args, result.as_dict(), lines)
    return 0 if result.clean else 1


def _cmd_gc(args: argparse.Namespace) -> int:
    from composefs_fleet.store_gc import collect

    if args.tmp_grace < 0:
        raise _Fail("--tmp-grace cannot be negative")
    store = _open(args)
    history = {} if args.history_dir is None else {"history_dir": args.history_dir}
    result = collect(store, dry_run=args.dry_run, tmp_grace=args.tmp_grace, **history)
    verb = "would remove" if args.dry_run else "removed"
    lines = ["%s %d images (%s), %d objects (%s), %d temporary files; kept %d images, %d objects"
             % (verb, len(result.removed_images), _human(result.removed_image_bytes), len(result.removed_objects),
                _human(result.removed_object_bytes), len(result.removed_temp_files), len(result.kept_images),
                result.kept_objects)]
    if result.mounted:
        lines.append("mounted images taken into account: %s" % "; ".join(result.mounted))
    for kept in result.kept_previous:
        lines.append("kept previous image %s of %s for a rollback%s" % (
            kept["image_digest"], kept["where"], "" if kept["in_store"] else " (its objects; the image is %s)"
            % kept["image_file"]))
    for missing in result.missing_previous:
        lines.append("warning: previous image %s of %s cannot be kept: %s"
                     % (missing["image_digest"], missing["where"], missing["reason"]))
    if args.verbose:
        lines += ["%s image %s" % (verb, h) for h in result.removed_images]
        lines += ["%s object %s" % (verb, h) for h in result.removed_objects]
        lines += ["%s %s" % (verb, p) for p in result.removed_temp_files]
    _emit(args, result.as_dict(), lines)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from composefs_fleet.store_stats import stats

    data = stats(_open(args))
    lines = [
        "objects:          %d (%s; %s on disk)"
        % (data["objects"], _human(data["object_bytes"]), _human(data["object_disk_bytes"])),
        "images:           %d (%s), refs: %d" % (data["images"], _human(data["image_bytes"]), data["refs"]),
        "shared objects:   %d used by 2+ images (%s); most shared: %d images"
        % (data["shared_objects"], _human(data["shared_object_bytes"]), data["max_sharing"]),
        "file bytes:       %s in all images together" % _human(data["logical_bytes"]),
        "saved by sharing: %s" % _human(data["saved_bytes"]),
        "unreferenced:     %d objects (%s): gc removes them"
        % (data["unreferenced_objects"], _human(data["unreferenced_bytes"])),
    ]
    if data["unreadable_images"]:
        lines.append("unreadable images: %s (run fsck)" % ", ".join(data["unreadable_images"]))
    _emit(args, data, lines)
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    return store_pull.cmd_pull(args, _open(args), lambda data, lines: _emit(args, data, lines), _human, _Fail)


def _cmd_remote(args: argparse.Namespace) -> int:
    return store_pull.cmd_remote(args, _open(args), lambda data, lines: _emit(args, data, lines), _Fail)


def _cmd_sign(args: argparse.Namespace) -> int:
    return store_sign.cmd_sign(args, _open(args), lambda data, lines: _emit(args, data, lines), _Fail)


def _cmd_verify(args: argparse.Namespace) -> int:
    return store_sign.cmd_verify(args, _open(args), lambda data, lines: _emit(args, data, lines), _Fail)


COMMANDS = {
    "init": _cmd_init, "add-image": _cmd_add, "ls": _cmd_ls, "refs": _cmd_refs, "rm-ref": _cmd_rm_ref,
    "fsck": _cmd_fsck, "gc": _cmd_gc, "stats": _cmd_stats, "pull": _cmd_pull, "remote": _cmd_remote,
    "sign": _cmd_sign, "verify": _cmd_verify,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.command:
        parser.print_usage(sys.stderr)
        sys.stderr.write("%s: error: a COMMAND is required (see --help)\n" % PROG)
        return 2
    if not args.repo:
        parser.print_usage(sys.stderr)
        sys.stderr.write("%s: error: --repo DIR is required (or set COMPOSEFS_STORE)\n" % PROG)
        return 2
    from composefs_fleet.errors import ComposefsError

    # A network command says which one failed: "composefs-store: pull: URL: what failed".
    prog = "%s: %s" % (PROG, args.command) if args.command in ("pull", "remote", "sign", "verify") else PROG
    # systemd and Ansible stop a run with SIGTERM: unwind as for ^C, so that
    # staged temp files are removed and verified objects kept.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except _Fail as exc:
        sys.stderr.write("%s: %s\n" % (prog, exc))
        return 2
    except ComposefsError as exc:
        sys.stderr.write("%s: %s\n" % (prog, exc))
        return 1
    except OSError as exc:
        where = " %s:" % os.fsdecode(exc.filename) if exc.filename is not None else ""
        sys.stderr.write("%s:%s %s\n" % (prog, where, exc.strerror or exc))
        return 1
    except _Terminated:
        sys.stderr.write("%s: terminated\n" % prog)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        sys.stderr.write("%s: interrupted\n" % prog)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like an interrupt (a KeyboardInterrupt, so that every cleanup for ^C runs)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
