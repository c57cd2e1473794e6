#!/usr/bin/env python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Install Python packages and their commands from a bundle a role wrote.

The bundle (JSON) holds Python packages as text and the commands to make
for them, so a role ships them in one file transfer instead of one per
source file.  The node role bundles the collection's core package and the
command-line front ends, the agent role the core and the agent:

    {"role": "node",
     "packages": {"composefs_fleet": {"__init__.py": "...", ...}, ...},
     "commands": {"/usr/local/bin/mkcomposefs": "composefs_fleet_cli.mkcomposefs", ...}}

This script, run on the node, writes each package file that differs under
PREFIX (temp file, fsync, rename), removes the .py files of a bundled
package that the bundle no longer has, and writes a wrapper for every
command (``#!PYTHON -I``, PREFIX first on sys.path, then the module's
main()).  It prints {"changed": ..., "written": [...], "removed": [...]}
as JSON.  Standard library only: it runs on the node's own Python.
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_PACKAGE = re.compile(r"^%s$" % _IDENTIFIER)
_MODULE = re.compile(r"^%s(\.%s)+$" % (_IDENTIFIER, _IDENTIFIER))
_FILE_NAME = re.compile(r"^%s\.py$" % _IDENTIFIER)
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")
MARKER = "# Installed by the composefs.fleet.%s role; changes are overwritten."


def wrapper(python, prefix, module, role):
    # mount.composefs needs only the standard library and its start-up is the mount's cost:
    # no site either (-S: no site-packages, no .pth files). -IS is one argument, as a #! line allows.
    flags = "-IS" if module == "composefs_fleet_cli.mount_composefs" else "-I"
    return "\n".join([
        "#!%s %s" % (python, flags),
        MARKER % role,
        "import sys",
        "",
        "sys.path.insert(0, %s)" % json.dumps(prefix),
        "from %s import main  # noqa: E402" % module,
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


def check_bundle(bundle):
    """Refuse a malformed bundle before anything is written."""
    if not isinstance(bundle, dict):
        raise ValueError("the bundle is not a JSON object")
    role, packages, commands = bundle.get("role"), bundle.get("packages"), bundle.get("commands")
    if not isinstance(role, str) or not _ROLE.match(role):
        raise ValueError("bundle role %r is not a role name" % (role,))
    if not isinstance(packages, dict) or not packages:
        raise ValueError("the bundle has no packages")
    for package, files in packages.items():
        if not _PACKAGE.match(package):
            raise ValueError("bundle package %r is not a Python package name" % package)
        if not isinstance(files, dict) or "__init__.py" not in files:
            raise ValueError("bundle package %s has no __init__.py" % package)
        for name, text in files.items():
            if not _FILE_NAME.match(name) or not isinstance(text, str):
                raise ValueError("bundle entry %s/%r is not a Python source file" % (package, name))
    if not isinstance(commands, dict):
        raise ValueError("the bundle has no commands")
    for path, module in commands.items():
        if not path.startswith("/") or "\n" in path or path.endswith("/"):
            raise ValueError("command path %r is not an absolute file name" % path)
        if not isinstance(module, str) or not _MODULE.match(module) or module.split(".")[0] not in packages:
            raise ValueError("command %s: %r is not a module of a bundled package" % (path, module))
    return role, packages, commands


def install(bundle, prefix, python):
    role, packages, commands = check_bundle(bundle)
    written, removed = [], []
    for package, files in sorted(packages.items()):
        directory = os.path.join(prefix, package)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        for name, text in sorted(files.items()):
            path = os.path.join(directory, name)
            if write_if_different(path, text, 0o644):
                written.append(path)
        gone = [name for name in sorted(os.listdir(directory)) if name.endswith(".py") and name not in files]
        for name in gone:
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        if gone:
            shutil.rmtree(os.path.join(directory, "__pycache__"), ignore_errors=True)
    for path, module in sorted(commands.items()):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if write_if_different(path, wrapper(python, prefix, module, role), 0o755):
            written.append(path)
    return written, removed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--python", required=True)
    args = parser.parse_args()
    for name in ("prefix", "python"):
        value = getattr(args, name)
        if not os.path.isabs(value) or "\n" in value:
            parser.error("--%s must be an absolute path without newlines, got %r" % (name, value))
    try:
        with open(args.bundle, encoding="utf-8") as f:
            bundle = json.load(f)
        written, removed = install(bundle, args.prefix, args.python)
    except (OSError, ValueError) as exc:
        print(json.dumps({"changed": False, "failed": True, "msg": str(exc)}))
        return 1
    print(json.dumps({"changed": bool(written or removed), "written": written, "removed": removed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
