# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Store administration: what is at a store path, a summary of a store, who
uses it, and removing a whole store safely.

Used by the ``composefs.fleet.store`` module; nothing here is Ansible-specific.

Removal refuses while the store is in use: an image of the store attached to a
loop device or mounted as erofs (store_gc.mounted_images), a mounted composefs
image using objects of the store, an overlay whose layers (``datadir+=``,
``lowerdir=`` ...) lie inside the store, or any mount point inside it (which
a recursive delete would descend into).  The store is first renamed to a
hidden temporary name next to it, so no half-deleted store is ever visible
under its name; a store that is itself a mount point cannot be renamed: its
``meta.json`` goes first (it stops being a store at once), then the rest,
and the empty directory stays.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import Any, Dict, List, Optional, Union

from .atomic_file import fsync_dir
from .errors import ForeignOwnerError, StoreError
from .fsverity_ioctl import verity_problem
from .mountinfo import MOUNTINFO, read_mountinfo
from .store import DIGEST_ALGORITHM, FORMAT_VERSION, META_NAME, Store

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: What is at a store path (see :func:`path_state`).
MISSING = "missing"
EMPTY = "empty"
STORE = "store"
NOT_A_STORE = "not-a-store"
NOT_A_DIRECTORY = "not-a-directory"

# A freshly made filesystem mounted as the store directory has only this.
_IGNORED_ENTRIES = frozenset([b"lost+found"])


def path_state(path: PathLike) -> str:
    """MISSING, EMPTY (no entries but ``lost+found``), STORE (has meta.json:
    valid or damaged, :meth:`Store.check` tells), NOT_A_STORE (a directory
    with other content) or NOT_A_DIRECTORY.  A symlink to a directory counts
    as that directory."""
    raw = os.fsencode(path)
    try:
        st = os.stat(raw)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(raw):
            return NOT_A_DIRECTORY  # a dangling symlink: never replaced by a store
        return MISSING  # (a parent that is a file: creating it fails, saying so)
    if not stat.S_ISDIR(st.st_mode):
        return NOT_A_DIRECTORY
    if os.path.lexists(os.path.join(raw, META_NAME)):
        return STORE
    if all(name in _IGNORED_ENTRIES for name in os.listdir(raw)):
        return EMPTY
    return NOT_A_STORE


def count_objects(store: Store) -> int:
    return sum(1 for _hexd, _path, st in store.iter_objects() if stat.S_ISREG(st.st_mode))


def nearest_existing_dir(path: PathLike) -> bytes:
    """``path`` or its closest existing ancestor (where a new store would live)."""
    current = os.path.abspath(os.fsencode(path))
    while not os.path.isdir(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def verity_problem_at(path: PathLike) -> Optional[str]:
    """Why files created at ``path`` (or where it would be created) cannot
    have fs-verity; None when they can."""
    return verity_problem(nearest_existing_dir(path))


def summary(store: Store, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Format, digest algorithm, object/image/ref counts and fs-verity support."""
    if meta is None:
        meta = store.check()
    problem = verity_problem_at(store.objects_dir)
    return {
        "location": os.fsdecode(store.path),
        "exists": True,
        "format": meta.get("format"),
        "digest_algorithm": meta.get("digest"),
        "verity_supported": problem is None,
        "verity_problem": problem,
        "objects": count_objects(store),
        "images": len(store.list_images()),
        "refs": len(store.list_refs()),
    }


def new_store_summary(path: PathLike) -> Dict[str, Any]:
    """What :func:`summary` will say of a store about to be created at ``path``."""
    problem = verity_problem_at(path)
    return {
        "location": os.fsdecode(os.fsencode(path)),
        "exists": True,
        "format": FORMAT_VERSION,
        "digest_algorithm": DIGEST_ALGORITHM,
        "verity_supported": problem is None,
        "verity_problem": problem,
        "objects": 0,
        "images": 0,
        "refs": 0,
    }


# -- who uses a store ------------------------------------------------------------

def _inside(candidate: str, top: str) -> bool:
    return candidate == top or candidate.startswith(top.rstrip("/") + "/")


def _mountinfo_users(top: str, path: str) -> List[str]:
    """Mount points inside ``top`` and overlays with a layer inside it."""
    users: List[str] = []
    try:
        entries = read_mountinfo(path)
    except OSError:
        return users
    for entry in entries:
        if _inside(entry.where, top) and entry.where != top:
            users.append("%s is a mount point inside the store" % entry.where)
            continue
        for _key, layer in entry.layers():
            if _inside(layer, top):
                users.append("the overlay on %s uses %s" % (entry.where, layer))
                break
    return users


def store_users(store: Store, mountinfo: str = MOUNTINFO) -> List[str]:
    """Readable reasons why the store is in use right now (empty: it is not)."""
    from .store_gc import mounted_images

    top = os.path.realpath(os.fsdecode(store.path))
    users = _mountinfo_users(top, mountinfo)
    try:
        mounted = mounted_images(store, {})
    except StoreError as exc:
        raise StoreError("cannot tell whether images of %s are mounted: %s" % (top, exc)) from None
    foreign = []
    for image in mounted:
        if image.store_digest is not None:
            users.append("image %s of the store is mounted: %s" % (image.store_digest, image.where))
        elif image.objects:
            foreign.append(image)
    if foreign:
        present = {hexd for hexd, _path, _st in store.iter_objects()}
        for image in foreign:
            shared = len(image.objects & present)
            if shared:
                users.append("the mounted composefs image %s uses %d object(s) of the store"
                             % (image.where, shared))
    return users


# -- removal -------------------------------------------------------------------

class RemovePlan:
    """What removing a store involves (computed without changing anything)."""

    def __init__(self) -> None:
        self.refs: List[str] = []
        self.users: List[str] = []
        self.damage: Optional[str] = None  # why Store.check failed, if it did


def plan_removal(store: Store) -> RemovePlan:
    plan = RemovePlan()
    try:
        store.check()
    except ForeignOwnerError:
        raise  # not damage that force may override: only allow_foreign does
    except StoreError as exc:
        plan.damage = str(exc)
    plan.refs = store.list_refs()
    plan.users = store_users(store)
    return plan


def refusal(plan: RemovePlan, force: bool) -> Optional[str]:
    """Why the store must not be removed (None: it may)."""
    if plan.users:
        return "the store is in use: %s" % "; ".join(plan.users)
    if force:
        return None
    if plan.damage is not None:
        return "%s; remove it with force anyway" % plan.damage
    if plan.refs:
        return ("the store still has %d ref(s) (%s); remove them first or use force"
                % (len(plan.refs), ", ".join(plan.refs[:5]) + (", ..." if len(plan.refs) > 5 else "")))
    return None


def remove_store(store: Store, force: bool = False) -> None:
    """Delete the whole store directory (see the module docstring).

    Takes the store lock exclusive first (running adds finish, new ones
    wait), then checks again: refs and users may have appeared meanwhile.
    """
    if os.path.islink(store.path.rstrip(b"/")):
        raise StoreError("refusing to remove %s: it is a symbolic link; name the store's real directory"
                         % os.fsdecode(store.path))
    with store.lock.collector(), store.lock.exclusive():
        why = refusal(plan_removal(store), force)
        if why is not None:
            raise StoreError("refusing to remove %s: %s" % (os.fsdecode(store.path), why))
        store.close()  # its open directories would keep a store that is a mount point busy
        _delete_tree(store.path)


def _delete_tree(path: bytes) -> None:
    shown = os.fsdecode(path)
    parent, name = os.path.split(os.path.abspath(path).rstrip(b"/"))
    doomed = os.path.join(parent, b"." + name + b".removing-" + os.urandom(4).hex().encode())
    try:
        os.rename(path, doomed)
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.EXDEV):
            raise StoreError("cannot remove %s: %s" % (shown, exc.strerror or exc)) from None
        # A mount point: it stays, empty, but stops being a store first.
        try:
            os.unlink(os.path.join(path, META_NAME))
            fsync_dir(path)
            for entry in os.listdir(path):
                full = os.path.join(path, entry)
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full)
                else:
                    os.unlink(full)
        except OSError as exc2:
            raise StoreError("removing %s failed half-way (%s): it is no store any more; delete the rest "
                             "by hand" % (shown, exc2.strerror or exc2)) from None
        return
    fsync_dir(parent)
    try:
        shutil.rmtree(doomed)
    except OSError as exc:
        raise StoreError("%s is gone, but deleting its content (moved to %s) failed: %s"
                         % (shown, os.fsdecode(doomed), exc.strerror or exc)) from None


__all__ = [
    "EMPTY", "MISSING", "NOT_A_DIRECTORY", "NOT_A_STORE", "STORE", "RemovePlan", "count_objects",
    "nearest_existing_dir", "new_store_summary", "path_state", "plan_removal", "refusal", "remove_store",
    "store_users", "summary", "verity_problem_at",
]
