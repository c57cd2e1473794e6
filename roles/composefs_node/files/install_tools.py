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

Before writing anything it asks dpkg which of the destinations a package
owns (``dpkg-query -S``, also under the other name of a merged-/usr
directory: /sbin/x is /usr/sbin/x) and refuses, naming each file and its
package, to overwrite one: a package's file is the package manager's.
What it installed is listed, with each file's sha256, in the manifest
PREFIX/ROLE.manifest.json.  ``--uninstall --role ROLE`` removes exactly
those files, except a file another role's manifest in PREFIX lists too (the
core both roles install), a file whose content changed since (someone
else's now) and a file a package owns by now; it prints {"changed": ...,
"removed": [...], "kept": [{"path", "why"}]}.  ``--check`` says what it
would remove without removing anything.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_PACKAGE = re.compile(r"^%s$" % _IDENTIFIER)
_MODULE = re.compile(r"^%s(\.%s)+$" % (_IDENTIFIER, _IDENTIFIER))
_FILE_NAME = re.compile(r"^%s\.py$" % _IDENTIFIER)
_ROLE = re.compile(r"^[a-z][a-z0-9_]*$")
MARKER = "# Installed by the composefs.fleet.%s role; changes are overwritten."
MANIFEST = "%s.manifest.json"
# dpkg-query -S treats these as glob characters: escaped, a path is matched literally.
_GLOB = re.compile(r"([][*?\\])")


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


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path):
    # Source files, wrappers and the bundle: small enough to read at once.
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def other_names(path):
    """``path`` and the names it also has through a merged /usr: dpkg records a
    file under the name its package shipped it with (/sbin/mount.composefs on
    one release, /usr/sbin/mount.composefs on the next) and matches literally."""
    names = [path]
    directory, base = os.path.split(path)
    real = os.path.join(os.path.realpath(directory), base)
    if real not in names:
        names.append(real)
    for name in list(names):
        parts = name.split("/")
        # /usr/sbin/x is also /sbin/x where /sbin is a link to usr/sbin.
        if len(parts) > 3 and parts[1] == "usr" and os.path.realpath("/" + parts[2]) == "/usr/" + parts[2]:
            alias = "/" + "/".join(parts[2:])
            if alias not in names:
                names.append(alias)
    return names


def dpkg_owners(paths):
    """{path: "package[, package]"} for each of ``paths`` a Debian package owns
    (under any of its names); {} where there is no dpkg."""
    names = {}
    for path in paths:
        for name in other_names(path):
            names.setdefault(name, path)
    if not names:
        return {}
    try:
        proc = subprocess.Popen(["dpkg-query", "--search"] + [_GLOB.sub(r"\\\1", name) for name in sorted(names)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, LC_ALL="C"))
    except OSError:
        # No dpkg-query: no package database, so no package owns anything.
        return {}
    out, err = proc.communicate()
    # 0: every name found, 1: some not found; anything else is dpkg's own failure.
    if proc.returncode not in (0, 1):
        raise ValueError("dpkg-query --search failed (exit %d): %s" % (proc.returncode, err.decode("utf-8", "replace").strip()))
    owners = {}
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("diversion by "):
            continue
        for name, path in names.items():
            if line.endswith(": " + name):
                owners.setdefault(path, line[:-len(": " + name)])
    return owners


def refuse_package_files(paths):
    """Raise, naming every file and its package, if a package owns one of ``paths``."""
    owned = dpkg_owners(paths)
    if owned:
        raise ValueError("refusing to overwrite files that belong to a package (dpkg-query -S), nothing was written: %s"
                         % "; ".join("%s (package %s)" % (path, owned[path]) for path in sorted(owned)))


def manifest_path(prefix, role):
    return os.path.join(prefix, MANIFEST % role)


def read_manifest(path):
    """The files a manifest lists ({path: sha256}); {} when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ValueError("manifest %s is not valid JSON: %s" % (path, exc))
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and k.startswith("/") and isinstance(v, str) for k, v in files.items()):
        raise ValueError("manifest %s has no files object of absolute paths and digests" % path)
    return files


def other_manifests(prefix, role):
    """Every file the other roles' manifests in ``prefix`` list."""
    listed = set()
    try:
        names = sorted(os.listdir(prefix))
    except FileNotFoundError:
        return listed
    for name in names:
        if name.endswith(MANIFEST % "") and name != MANIFEST % role:
            listed.update(read_manifest(os.path.join(prefix, name)))
    return listed


def remove_files(files, keep, check):
    """Remove the files of ``files`` ({path: sha256}) that are still ours.

    A file in ``keep`` (another role's), changed since it was written, or owned
    by a package by now is kept. Returns (removed, kept)."""
    removed, kept = [], []
    present = [path for path in sorted(files) if os.path.lexists(path)]
    owned = dpkg_owners([path for path in present if path not in keep])
    for path in present:
        if path in keep:
            kept.append({"path": path, "why": "another role's manifest lists it"})
        elif path in owned:
            kept.append({"path": path, "why": "it belongs to the package %s now" % owned[path]})
        elif os.path.islink(path) or not os.path.isfile(path) or sha256_file(path) != files[path]:
            kept.append({"path": path, "why": "it changed since it was installed"})
        else:
            if not check:
                os.unlink(path)
            removed.append(path)
    return removed, kept


def uninstall(prefix, role, check):
    manifest = manifest_path(prefix, role)
    files = read_manifest(manifest)
    removed, kept = remove_files(files, other_manifests(prefix, role), check)
    if check:
        return removed + ([manifest] if files else []), kept
    directories = set(os.path.dirname(path) for path in removed if os.path.dirname(path) != prefix
                      and os.path.dirname(os.path.dirname(path)) == prefix)
    for directory in sorted(directories):
        # A package directory whose sources are gone: its byte code and itself.
        if not any(name.endswith(".py") for name in os.listdir(directory)):
            shutil.rmtree(os.path.join(directory, "__pycache__"), ignore_errors=True)
            if not os.listdir(directory):
                os.rmdir(directory)
    if files:
        os.unlink(manifest)
        removed.append(manifest)
    if os.path.isdir(prefix) and not os.listdir(prefix):
        os.rmdir(prefix)
        removed.append(prefix)
    return removed, kept


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


def install(bundle, prefix, python, bundle_path):
    role, packages, commands = check_bundle(bundle)
    planned = {}
    for package, files in sorted(packages.items()):
        for name, text in sorted(files.items()):
            planned[os.path.join(prefix, package, name)] = (text, 0o644)
    for path, module in sorted(commands.items()):
        planned[path] = (wrapper(python, prefix, module, role), 0o755)
    refuse_package_files(sorted(planned) + [manifest_path(prefix, role)])
    manifest = manifest_path(prefix, role)
    old = read_manifest(manifest)
    written, removed = [], []
    for package, files in sorted(packages.items()):
        directory = os.path.join(prefix, package)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        for name in sorted(files):
            path = os.path.join(directory, name)
            if write_if_different(path, *planned[path]):
                written.append(path)
        gone = [name for name in sorted(os.listdir(directory)) if name.endswith(".py") and name not in files]
        for name in gone:
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        if gone:
            shutil.rmtree(os.path.join(directory, "__pycache__"), ignore_errors=True)
    for path in sorted(commands):
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if write_if_different(path, *planned[path]):
            written.append(path)
    # Commands an earlier bundle had and this one has not (a path changed): removed while still ours.
    stale = dict((path, digest) for path, digest in old.items() if path not in planned and path != bundle_path)
    removed.extend(remove_files(stale, other_manifests(prefix, role), False)[0])
    listed = dict((path, sha256_text(text)) for path, (text, _mode) in planned.items())
    if os.path.isfile(bundle_path):
        # The bundle the role copied: gone with the rest at uninstall.
        listed[bundle_path] = sha256_file(bundle_path)
    if write_if_different(manifest, json.dumps({"role": role, "files": listed}, indent=1, sort_keys=True) + "\n", 0o644):
        written.append(manifest)
    return written, removed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--bundle", help="install from this bundle")
    parser.add_argument("--uninstall", action="store_true", help="remove what the manifest of --role lists")
    parser.add_argument("--role", help="with --uninstall: whose files")
    parser.add_argument("--check", action="store_true", help="with --uninstall: only say what would be removed")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--python")
    args = parser.parse_args()
    if args.uninstall == bool(args.bundle):
        parser.error("give either --bundle (install) or --uninstall")
    if args.uninstall and not (args.role and _ROLE.match(args.role)):
        parser.error("--uninstall needs --role ROLE (a role name), got %r" % (args.role,))
    if args.bundle and not args.python:
        parser.error("--bundle needs --python")
    for name in ("prefix", "python"):
        value = getattr(args, name)
        if value is not None and (not os.path.isabs(value) or "\n" in value):
            parser.error("--%s must be an absolute path without newlines, got %r" % (name, value))
    try:
        if args.uninstall:
            removed, kept = uninstall(args.prefix, args.role, args.check)
            print(json.dumps({"changed": bool(removed), "removed": removed, "kept": kept}))
            return 0
        with open(args.bundle, encoding="utf-8") as f:
            bundle = json.load(f)
        written, removed = install(bundle, args.prefix, args.python, os.path.abspath(args.bundle))
    except (OSError, ValueError) as exc:
        print(json.dumps({"changed": False, "failed": True, "msg": str(exc)}))
        return 1
    print(json.dumps({"changed": bool(written or removed), "written": written, "removed": removed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
