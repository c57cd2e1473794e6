# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-info: inspect composefs images (drop-in for the C tool, 1.0.8).

    composefs-info [--basedir=PATH] [--filter=NAME]... COMMAND IMAGE...

Commands: ``ls``, ``dump``, ``objects``, ``missing-objects`` and
``measure-file FILE...``.  Output bytes, messages and exit codes follow
tools/composefs-info.c, including its GNU getopt handling (options may follow
the command, ``--basedir`` may be abbreviated, ``--`` ends the options).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import BinaryIO, Iterable, Iterator, List, Optional, Set, Tuple

from composefs_fleet.errors import ComposefsError, ImageError
from composefs_fleet.erofs_reader import open_image, read_image_fd
from composefs_fleet.gc_pause import gc_paused_for_command
from composefs_fleet.tree import Node

from .getopt_long import OptionError, parse
from .sigpipe import die_of_sigpipe

PROG = "composefs-info"
_S_IFMT = 0o170000
# Long options and whether each takes a value.
_LONG_OPTIONS = {"basedir": True, "filter": True, "help": False}


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _err(message: str) -> bytes:
    return ("%s: %s\n" % (PROG, message)).encode("utf-8", "surrogateescape")


# -- escaping (print_escaped in composefs-info.c, C locale) -----------------
def _make_table(noescape_space: bool) -> Tuple[List[bytes], bytes]:
    low = 0x20 if noescape_space else 0x21
    table = []
    safe = bytearray()
    for c in range(256):
        if c == 0x5C:
            table.append(b"\\\\")
        elif c == 0x0A:
            table.append(b"\\n")
        elif c == 0x0D:
            table.append(b"\\r")
        elif c == 0x09:
            table.append(b"\\t")
        elif low <= c <= 0x7E:
            table.append(bytes((c,)))
            safe.append(c)
        else:
            table.append(b"\\x%02x" % c)
    return table, bytes(safe)


_PATH_TABLE, _PATH_SAFE = _make_table(noescape_space=True)
_STD_TABLE, _STD_SAFE = _make_table(noescape_space=False)


def _escape(data: bytes, table: List[bytes], safe: bytes) -> bytes:
    if not data.translate(None, safe):
        return data
    return b"".join([table[c] for c in data])


# -- commands ----------------------------------------------------------------
def _children(node: Node) -> List[Tuple[bytes, Node]]:
    if node.link_to is not None or not node.is_dir():
        return []
    return node.sorted_children()


def _escaped_children(node: Node) -> List[Tuple[bytes, Node]]:
    """A directory's (name escaped for ls, child) in bytewise order; escaping
    is per byte, so a path is its parent's escaped path, "/" and this name."""
    items = node.sorted_children()
    if b"".join(node.children).translate(None, _PATH_SAFE):
        return [(_escape(name, _PATH_TABLE, _PATH_SAFE), child) for name, child in items]
    return items


def _ls(root: Node, out: BinaryIO) -> None:
    # Runs once per entry: a directory's children are taken by one loop
    # (left with break to descend), type tests and the no-escape test inlined.
    lines: List[bytes] = []
    std_table, std_safe = _STD_TABLE, _STD_SAFE
    stack: List[Tuple[bytes, Iterator[Tuple[bytes, Node]]]] = []
    if _children(root):
        stack.append((b"/", iter(_escaped_children(root))))
    while stack:
        prefix, pending = stack[-1]
        for name, node in pending:
            path = prefix + name
            descend = False
            # A hard-link alias has no mode of its own in the C tree: no suffix.
            if node.link_to is not None:
                line = path + b"\n"
            else:
                ftype = node.mode & _S_IFMT
                if ftype == stat.S_IFDIR:
                    line = path + b"/\t\n"
                    descend = bool(node.children)
                elif ftype == stat.S_IFLNK:
                    line = path + b"\t-> " + _escape(node.payload or b"", std_table, std_safe) + b"\n"
                elif ftype == stat.S_IFREG and node.payload is not None:
                    payload = node.payload
                    if payload.translate(None, std_safe):
                        payload = _escape(payload, std_table, std_safe)
                    line = path + b"\t@ " + payload + b"\n"
                else:
                    line = path + b"\n"
            lines.append(line)
            if len(lines) >= 4096:
                out.write(b"".join(lines))
                lines = []
            if descend:
                stack.append((path + b"/", iter(_escaped_children(node))))
                break
        else:
            stack.pop()
    out.write(b"".join(lines))


def _payloads(root: Node) -> Iterable[bytes]:
    stack = [root]
    while stack:
        node = stack.pop()
        if node.link_to is None and node.is_reg() and node.payload is not None:
            yield node.payload
        stack.extend(child for _name, child in _children(node))


def _is_missing(payload: bytes, dir_fd: int) -> bool:
    # fstatat(dir_fd, path without leading '/', AT_EMPTY_PATH), following symlinks.
    rel = payload.lstrip(b"/")
    try:
        if rel:
            os.stat(rel, dir_fd=dir_fd)
        else:
            os.fstat(dir_fd)
    except (OSError, ValueError):
        return True
    return False


def _usage(prog: str) -> bytes:
    return (
        "usage: %s [--basedir=path] [ls|objects|dump|missing-objects|measure-file] IMAGES...\n" % prog
    ).encode("utf-8", "surrogateescape")


def _parse_args(args: List[str], prog: str, out: BinaryIO, err: BinaryIO) -> Tuple[dict, List[str]]:
    """GNU getopt_long with an empty short-option string, permuting."""
    opts = {"basedir": None, "filter": [], "help": False}

    def fail(message: str) -> None:
        err.write(("%s: %s\n" % (prog, message)).encode("utf-8", "surrogateescape"))
        out.write(b"Def\n")
        err.write(_usage(prog))
        raise _Exit(1)

    try:
        options, positional = parse(args, _LONG_OPTIONS)
    except OptionError as exc:
        if exc.kind == "missing":
            fail("option '%s' requires an argument" % exc.option)
        elif exc.kind == "unexpected":
            fail("option '%s' doesn't allow an argument" % exc.option)
        elif exc.kind == "invalid":
            fail("invalid option -- '%s'" % exc.option[1])
        fail("unrecognized option '%s'" % exc.option)
    for option, value in options:
        if option == "help":
            opts["help"] = True
        elif option == "basedir":
            opts["basedir"] = value
        else:
            if "/" in value:
                err.write(_err("Filter must be a single name: %s: Success" % value))
                raise _Exit(1)
            opts["filter"].append(value)
    return opts, positional


def _measure_files(files: List[str], prog: str, out: BinaryIO, err: BinaryIO) -> int:
    from composefs_fleet import fsverity_digest, fsverity_ioctl

    if not files:
        err.write(b"No files specified\n")
        err.write(_usage(prog))
        return 1
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            err.write(_err("Failed to open '%s': %s" % (path, os.strerror(e.errno or errno.EIO))))
            return 1
        try:
            found = fsverity_ioctl.measure_or_none(fd)
            if found is None:
                # As lcfs_fd_get_fsverity(): compute it from the same fd.
                digest = fsverity_digest.digest_fd(fd)
            elif len(found[1]) != 32:
                raise ComposefsError("fs-verity digest is not sha256")
            else:
                digest = found[1]
        except OSError as e:
            message = os.strerror(e.errno) if e.errno else str(e)
            err.write(("failed to measure '%s': %s" % (path, message)).encode("utf-8", "surrogateescape"))
            return 1
        except ComposefsError as e:
            err.write(("failed to measure '%s': %s" % (path, e)).encode("utf-8", "surrogateescape"))
            return 1
        finally:
            os.close(fd)
        out.write(digest.hex().encode("ascii") + b"\n")
    return 0


def _run(args: List[str], prog: str, out: BinaryIO, err: BinaryIO) -> int:
    opts, positional = _parse_args(args, prog, out, err)
    if opts["help"]:
        out.write(_usage(prog))
        out.write(
            b"\nCommands:\n"
            b"  ls               list the files of the images\n"
            b"  dump             print the images in composefs-dump(5) format\n"
            b"  objects          list the backing objects the images reference\n"
            b"  missing-objects  list the referenced objects absent from --basedir\n"
            b"  measure-file     print the fs-verity digest of files\n"
            b"Options:\n"
            b"  --basedir=PATH   object store for missing-objects\n"
            b"  --filter=NAME    load only this top-level entry (repeatable)\n"
        )
        return 0
    if not positional:
        err.write(b"No command specified\n")
        err.write(_usage(prog))
        return 1
    command, images = positional[0], positional[1:]
    if command == "measure-file":
        return _measure_files(images, prog, out, err)
    if command not in ("ls", "dump", "objects", "missing-objects"):
        err.write(_err("Unknown command '%s'\n" % command))
        return 1

    basedir_fd = 0  # the C tool's default (its global fd is zero-initialised)
    if opts["basedir"] is not None:
        try:
            basedir_fd = os.open(
                opts["basedir"], os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | getattr(os, "O_PATH", 0)
            )
        except OSError as e:
            err.write(_err("Can't open basedir `%s`\n: %s" % (opts["basedir"], os.strerror(e.errno or errno.EIO))))
            return 1
    try:
        if not images:
            err.write(b"No image path specified\n")
            err.write(_usage(prog))
            return 1
        return _run_images(command, images, opts["filter"], basedir_fd, out, err)
    finally:
        if opts["basedir"] is not None:
            os.close(basedir_fd)


def _run_images(command: str, images: List[str], filters: List[str], basedir_fd: int, out: BinaryIO, err: BinaryIO) -> int:
    toplevel = [os.fsencode(name) for name in filters] if filters else None
    objects: Set[bytes] = set()

    def handler(root: Node) -> None:
        if command == "ls":
            _ls(root, out)
        elif command == "dump":
            from composefs_fleet.dump import write_dump

            write_dump(root, out)
        elif command == "objects":
            objects.update(_payloads(root))
        else:
            objects.update(p for p in _payloads(root) if _is_missing(p, basedir_fd))

    for image in images:
        try:
            fd = open_image(image)
        except OSError as e:
            err.write(_err("Failed to open '%s': %s" % (image, os.strerror(e.errno or errno.EIO))))
            return 1
        try:
            root = read_image_fd(fd, toplevel)
        except ImageError as e:
            err.write(_err("Failed to load '%s': %s" % (image, e)))
            return 1
        except OSError as e:
            err.write(_err("Failed to load '%s': %s" % (image, os.strerror(e.errno) if e.errno else e)))
            return 1
        finally:
            os.close(fd)
        handler(root)
    if command in ("objects", "missing-objects"):
        out.write(b"".join(p + b"\n" for p in sorted(objects)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    process_entry = argv is None
    if argv is None:
        argv = sys.argv[1:]
        prog = sys.argv[0] if os.path.basename(sys.argv[0]) == PROG else PROG
    else:
        prog = PROG
    out = sys.stdout.buffer
    err = sys.stderr.buffer
    sys.stdout.flush()
    try:
        try:
            with gc_paused_for_command(process_entry=process_entry):
                code = _run(list(argv), prog, out, err)
        except _Exit as e:
            code = e.code
        out.flush()
    except BrokenPipeError:
        return die_of_sigpipe()
    err.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
