#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Install composefs-fleet's tools from a bundle written by the node role.

The bundle (JSON) holds the collection's core package and the command-line
front ends as text, so the role ships them in one file transfer instead of
one per source file.  This script, run on the node, writes each package
file that differs under PREFIX (temp file, fsync, rename), removes package
files that are no longer in the bundle, and writes the wrappers
(mkcomposefs, composefs-info, composefs-store in BIN_DIR, mount.composefs
in SBIN_DIR).  It prints {"changed": ..., "written": [...], "removed": [...]}
as JSON.  Standard library only: it runs on the node's own Python.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

PACKAGES = ("composefs_fleet", "composefs_fleet_cli")
COMMANDS = (("mkcomposefs", "mkcomposefs", "bin"), ("composefs-info", "composefs_info", "bin"),
            ("composefs-store", "composefs_store", "bin"), ("mount.composefs", "mount_composefs", "sbin"))
_FILE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.py$")
MARKER = "# Installed by the composefs.fleet.node role; changes are overwritten."


def wrapper(python, prefix, module):
    return "\n".join([
        "#!%s -I" % python,
        MARKER,
        "import sys",
        "",
        "sys.path.insert(0, %s)" % json.dumps(prefix),
        "from composefs_fleet_cli.%s import main  # noqa: E402" % module,
        "",
        "sys.exit(main())",
        "",
    ])


def write_if_different(path, text, mode):
    """Atomically (re)write ``path``; True if it changed."""
    data = text.encode("utf-8")
    try:
        with open(path, "rb") as f:
            same = f.read() == data
        if same and (os.stat(path).st_mode & 0o7777) == mode:
            return False
        if same:
            os.chmod(path, mode)
            return True
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def install(bundle, prefix, bin_dir, sbin_dir, python):
    written, removed = [], []
    for directory in (bin_dir, sbin_dir):
        os.makedirs(directory, mode=0o755, exist_ok=True)
    for package in PACKAGES:
        files = bundle.get(package)
        if not isinstance(files, dict) or "__init__.py" not in files:
            raise ValueError("bundle has no package %s" % package)
        directory = os.path.join(prefix, package)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        for name, text in sorted(files.items()):
            if not _FILE_NAME.match(name) or not isinstance(text, str):
                raise ValueError("bundle entry %s/%r is not a Python source file" % (package, name))
            path = os.path.join(directory, name)
            if write_if_different(path, text, 0o644):
                written.append(path)
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py") and name not in files:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
        if removed:
            shutil.rmtree(os.path.join(directory, "__pycache__"), ignore_errors=True)
    for command, module, where in COMMANDS:
        path = os.path.join(bin_dir if where == "bin" else sbin_dir, command)
        if write_if_different(path, wrapper(python, prefix, module), 0o755):
            written.append(path)
    return written, removed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--sbin-dir", required=True)
    parser.add_argument("--python", required=True)
    args = parser.parse_args()
    for name in ("prefix", "bin_dir", "sbin_dir", "python"):
        value = getattr(args, name)
        if not os.path.isabs(value) or "\n" in value:
            parser.error("--%s must be an absolute path without newlines, got %r" % (name.replace("_", "-"), value))
    try:
        with open(args.bundle, encoding="utf-8") as f:
            bundle = json.load(f)
        written, removed = install(bundle, args.prefix, args.bin_dir, args.sbin_dir, args.python)
    except (OSError, ValueError) as exc:
        print(json.dumps({"changed": False, "failed": True, "msg": str(exc)}))
        return 1
    print(json.dumps({"changed": bool(written or removed), "written": written, "removed": removed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
