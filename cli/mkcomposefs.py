# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""mkcomposefs: build a composefs image from a directory or a dump file.

A drop-in for composefs 1.0.8's ``mkcomposefs``: same options, same image
bytes, same stdout, exit status 1 on every error.  Differences, all deliberate:
the image is written atomically (never a half-written file), ``--help`` prints
help and succeeds, ``--hardlinks`` keeps hard links of a directory source, and
the source filters also apply to ``--from-file`` input.
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO, List, Optional, Sequence

from composefs_fleet.atomic_file import write_atomic
from composefs_fleet.erofs_format import COMPOSEFS_MAGIC
from composefs_fleet.erofs_writer import build_image_buffer
from composefs_fleet.errors import ComposefsError, DumpParseError
from composefs_fleet.gc_pause import gc_paused_for_command
from composefs_fleet.tree import apply_source_options

from .getopt_long import OptionError, parse, parse_long
from .sigpipe import die_of_sigpipe

PROG = "mkcomposefs"

LONGOPTS = {
    "skip-xattrs": False,
    "user-xattrs": False,
    "skip-devices": False,
    "use-epoch": False,
    "digest-store": True,
    "print-digest": False,
    "print-digest-only": False,
    "from-file": False,
    "max-version": True,
    "min-version": True,
    "threads": True,
    "hardlinks": False,
    "help": False,
}


def usage_text(prog: str) -> str:
    from composefs_fleet.scan import cpu_count  # only for the help text

    return (
        "Usage: %s [OPTIONS] SOURCE IMAGE\n"
        "Options:\n"
        "  --digest-store=PATH   Store content files in this directory\n"
        "  --use-epoch           Make all mtimes zero\n"
        "  --skip-devices        Don't store device nodes\n"
        "  --skip-xattrs         Don't store file xattrs\n"
        "  --user-xattrs         Only store user.* xattrs\n"
        "  --print-digest        Print the digest of the image\n"
        "  --print-digest-only   Print the digest of the image, don't write image\n"
        "  --from-file           The source is a dump file, not a directory\n"
        "  --min-version=N       Use this minimal format version (default=0)\n"
        "  --max-version=N       Use this maxium format version (default=1)\n"
        "  --threads=N           Use this to override the default number of threads used to "
        "calculate digest and copy files (default=%d)\n" % (prog, cpu_count())
    )


HELP_EXTRA = """
Build a composefs image: an EROFS file holding the metadata of SOURCE (a
directory, or with --from-file a composefs-dump(5) file, "-" for stdin).
Regular files larger than 64 bytes are referenced by their fs-verity digest
(objects XX/YYYY... in the --digest-store directory); smaller ones are inlined.
IMAGE may be "-" for stdout (never a terminal).  The image is byte-identical to
what composefs 1.0.8's mkcomposefs writes for the same input and options.

Extensions over the C tool:
  --hardlinks           Keep hard links of a directory source as hard links
                        (the C tool stores each link as a separate inode)
  --help                Show this help
  The image is written to a temporary file and renamed into place, so an error
  never leaves a partial image.  --use-epoch, --skip-devices, --skip-xattrs and
  --user-xattrs also apply to --from-file input (the C tool ignores them there).
  CFS_PARSE_STRICT set in the environment enables strict dump parsing.
  A dump line longer than 1 MiB is refused (the C tool buffers it whole,
  however long: endless junk without newlines exhausts its memory).
"""


def _fail(message: str) -> int:
    sys.stderr.write("%s: %s\n" % (PROG, message))
    return 1


def _usage_fail(message: Optional[str], prog: str) -> int:
    if message:
        sys.stderr.write(message + "\n")
    sys.stderr.write(usage_text(prog))
    return 1


def _progress_printer(enabled: bool):
    if not enabled:
        return None

    def show(done: int, total: int) -> None:
        sys.stderr.write("\r%s: %d/%d files" % (PROG, done, total))
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def _read_dump(src: str, stdin: BinaryIO):
    # Imported here so a directory source does not pay for the parser's start-up.
    from composefs_fleet.dump import parse_dump

    # The C tool enables strict parsing when the variable is set at all.
    strict = "CFS_PARSE_STRICT" in os.environ
    if src == "-":
        return parse_dump(stdin, strict=strict)
    with open(src, "rb") as stream:
        return parse_dump(stream, strict=strict)


def _dump_error(src: str, exc: DumpParseError) -> str:
    # A composefs image given as the dump file fails at line 1: say what it is.
    if exc.lineno <= 1 and src != "-":
        try:
            with open(src, "rb") as f:
                head = f.read(4)
        except OSError:
            head = b""
        if len(head) == 4 and int.from_bytes(head, "little") == COMPOSEFS_MAGIC:
            return "this is a composefs image, not a composefs-dump file (%s)" % exc
    return str(exc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        with gc_paused_for_command(process_entry=argv is None):
            return _main(argv)
    except BrokenPipeError:
        return die_of_sigpipe()


def _main(argv: Optional[Sequence[str]]) -> int:
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) if argv is None and sys.argv[0] else PROG
    try:
        options, operands = parse(args, LONGOPTS)
    except OptionError as exc:
        if exc.kind == "missing":
            sys.stderr.write("option needs a value\n")
            return 1
        return _usage_fail(None, prog)

    flags = {name for name, _value in options}
    if "help" in flags:
        sys.stdout.write(usage_text(prog) + HELP_EXTRA)
        return 0
    values = dict(options)
    version_set = "min-version" in values or "max-version" in values
    min_version, max_version = (0, 0) if version_set else (0, 1)
    # None: the scanner's default, the CPUs this process may run on.
    threads: Optional[int] = None
    for name, value in options:
        try:
            if name == "min-version":
                min_version = parse_long(value)
            elif name == "max-version":
                max_version = parse_long(value)
            elif name == "threads":
                threads = parse_long(value)
        except ValueError:
            label = {"min-version": "min version", "max-version": "max version",
                     "threads": "threads count"}[name]
            sys.stderr.write("Invalid %s %s\n" % (label, value))
            return 1
    if threads is not None and threads <= 0:
        sys.stderr.write("Invalid threads count %d\n" % threads)
        return 1

    print_digest_only = "print-digest-only" in flags
    print_digest = print_digest_only or "print-digest" in flags
    from_file = "from-file" in flags
    if not operands:
        return _usage_fail("No source path specified", prog)
    src = operands[0]
    if src == "":
        return _fail("Empty source path specified")
    if len(operands) > 2:
        return _usage_fail("Too many arguments", prog)
    out: Optional[str] = None
    if len(operands) == 1:
        if not print_digest_only:
            return _usage_fail("No destination path specified", prog)
    elif print_digest_only:
        return _usage_fail("Cannot specify destination path with --print-digest-only", prog)
    else:
        out = operands[1]
    if out == "-" and os.isatty(1):
        return _fail("stdout is a tty.  Refusing to use it")
    if not (0 <= min_version <= 1 and 0 <= max_version <= 1):
        # The C tool gets this far, then fails in lcfs_write_to() with EINVAL.
        return _fail("cannot write file: Invalid argument (supported format versions: 0 and 1)")
    skip_xattrs = "skip-xattrs" in flags
    user_xattrs = "user-xattrs" in flags
    if skip_xattrs and user_xattrs:
        return _fail("error accessing %s: Invalid argument "
                     "(--skip-xattrs and --user-xattrs exclude each other)" % src)
    digest_store = values.get("digest-store")

    try:
        if from_file:
            try:
                root = _read_dump(src, sys.stdin.buffer)
            except OSError as exc:
                return _fail("open `%s`: %s" % (src, exc.strerror or exc))
            except DumpParseError as exc:
                return _fail("%s: %s" % ("standard input" if src == "-" else src, _dump_error(src, exc)))
            if digest_store is not None:
                sys.stderr.write("%s: warning: --digest-store is ignored with --from-file: "
                                 "a dump file carries no file content\n" % PROG)
            if "hardlinks" in flags:
                sys.stderr.write("%s: note: --hardlinks has no effect with --from-file: "
                                 "dump files keep their hard links anyway\n" % PROG)
            apply_source_options(root, use_epoch="use-epoch" in flags,
                                 skip_devices="skip-devices" in flags,
                                 skip_xattrs=skip_xattrs, user_xattrs=user_xattrs)
        else:
            from composefs_fleet.scan import build_tree_from_directory

            try:
                root = build_tree_from_directory(
                    src,
                    use_epoch="use-epoch" in flags,
                    skip_devices="skip-devices" in flags,
                    skip_xattrs=skip_xattrs,
                    user_xattrs=user_xattrs,
                    hardlinks="hardlinks" in flags,
                    threads=threads,
                    digest_store=digest_store,
                    progress=_progress_printer(sys.stderr.isatty()),
                )
            except OSError as exc:
                where = exc.filename if exc.filename is not None else src
                return _fail("error accessing %s: %s" % (where, exc.strerror or exc))
        # The tree is not used again: the writer may lay the image out on it.
        image = build_image_buffer(root, min_version=min_version, max_version=max_version, consume=True)
    except ComposefsError as exc:
        return _fail(str(exc))
    except MemoryError:
        return _fail("out of memory")

    try:
        if out == "-":
            sys.stdout.buffer.write(image)
            sys.stdout.buffer.flush()
        elif out is not None:
            write_atomic(out, image)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and out == "-":
            raise  # the reader went away: main() ends as the C tool would
        return _fail("failed to write output file %s: %s" % (out, exc.strerror or exc))
    if print_digest:
        # Imported here: most runs print no digest and need not load the hasher.
        from composefs_fleet import fsverity_digest

        sys.stdout.write(fsverity_digest.digest_bytes(image).hex() + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
