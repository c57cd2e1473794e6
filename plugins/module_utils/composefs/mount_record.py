# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""What is mounted where: live composefs mounts and the records we keep of them.

The kernel tells which overlays are mounted (``/proc/self/mountinfo``: fstype
``overlay``, source ``composefs``, the ``datadir+``, ``upperdir``,
``workdir`` and ``verity`` options), but not which image: an overlay whose
EROFS layer was passed as a detached mount fd shows ``lowerdir+=/``.  So our
mount code writes a record per mount at mount time (a JSON file under
:data:`RECORD_DIR`, atomically): image path, the image's fs-verity digest
computed in userspace (a store image's name), basedirs, verity, upper/work
directories, and the identity of the mount itself: its mountinfo ID and
device, the boot-unique mount ID (statx ``STATX_MNT_ID_UNIQUE``, Linux 6.8+),
the mount namespace and the boot.  Mount IDs and anonymous devices are
reused by the kernel right after an unmount, hence the unique ID where the
kernel has one: a record whose mount is gone or was replaced by another one
at the same place is recognised as stale and never believed.

Recording is best effort: a mount never fails because its record could not
be written (``/run`` read-only, full...); the caller gets the reason.
Reading mountinfo itself is :mod:`.mountinfo`'s job.
"""

from __future__ import annotations

import errno
import os

from .errors import ComposefsError, UnmountError
from .mountinfo import MountInfo, canonical, composefs_mounts, mounts_at, read_mountinfo, top_mount

# typing itself costs start-up time on every mount: imported for type checkers only.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

    PathArg = Union[str, bytes, "os.PathLike[str]"]

RECORD_DIR = "/run/composefs-fleet/mounts"
RECORD_FORMAT = 1
_LOCK_NAME = ".lock"
_SUFFIX = ".json"
_NAME_MAX = 255

STATX_MNT_ID = 0x1000
STATX_MNT_ID_UNIQUE = 0x4000
_STATX_SIZE = 256
_STATX_MNT_ID_OFFSET = 144  # struct statx: stx_mnt_id follows stx_dev_minor
_LIBC: Dict[str, Any] = {}  # libc's statx(), looked up once


# -- mount identity -----------------------------------------------------------------

def unique_mount_id(where: PathArg) -> Optional[int]:
    """The boot-unique ID of the mount on top at ``where`` (None: kernel/libc cannot tell)."""
    import ctypes

    if "statx" not in _LIBC:
        try:
            _LIBC["statx"] = ctypes.CDLL(None, use_errno=True).statx
        except (OSError, AttributeError):
            _LIBC["statx"] = None  # libc without statx (glibc < 2.28, some musl)
    statx = _LIBC["statx"]
    if statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    # AT_FDCWD, no flags: follow symlinks like stat(); we ask about the mount root.
    if statx(ctypes.c_int(-100), os.fsencode(os.fspath(where)), ctypes.c_int(0),
             ctypes.c_uint(STATX_MNT_ID_UNIQUE), buf) != 0:
        return None
    mask = int.from_bytes(buf.raw[0:4], "little" if _little() else "big")
    if not mask & STATX_MNT_ID_UNIQUE:
        return None
    return int.from_bytes(buf.raw[_STATX_MNT_ID_OFFSET:_STATX_MNT_ID_OFFSET + 8], "little" if _little() else "big")


def _little() -> bool:
    import sys

    return sys.byteorder == "little"


def _read_small(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> Optional[str]:
    # Read once per process (a boot's ID never changes under it): pruning asks for it per record.
    if "boot_id" not in _BOOT:
        _BOOT["boot_id"] = _read_small("/proc/sys/kernel/random/boot_id")
    return _BOOT["boot_id"]


_BOOT: Dict[str, Optional[str]] = {}


def mount_namespace(pid: str = "self") -> Optional[str]:
    try:
        return os.readlink("/proc/%s/ns/mnt" % pid)
    except OSError:
        return None


# -- record names -------------------------------------------------------------------

def record_name(where: PathArg) -> str:
    """File name of the record of the mount at ``where``: its systemd unit name
    and ``@`` + the inode of the mount namespace (the same path may be mounted
    in several namespaces, and PID 1's namespace cannot always be read to
    tell the host's apart), e.g. ``srv-app.mount@4026531832.json``.

    Names too long for a file name become ``@`` + sha256 of path and
    namespace.  Escaped unit names never contain ``@``, so the forms cannot
    collide.
    """
    from .systemd_unit import UnitError, path_escape

    target = canonical(where)
    ns = "@" + "".join(c for c in (mount_namespace() or "") if c.isdigit())
    try:
        name = path_escape(target) + ".mount" + ns + _SUFFIX
    except UnitError:
        name = ""
    if not name or len(name) > _NAME_MAX:
        import hashlib

        name = "@" + hashlib.sha256(os.fsencode(target) + ns.encode()).hexdigest() + _SUFFIX
    return name


def record_path(where: PathArg, directory: str = RECORD_DIR) -> str:
    return os.path.join(directory, record_name(where))


class DirLock:
    """flock on a directory's ``.lock`` file (records here, mount histories): writers, removers and
    pruners of its files never interleave.  A link planted as the lock file is not followed."""

    def __init__(self, directory: str) -> None:
        import fcntl

        self.fd = os.open(os.path.join(directory, _LOCK_NAME),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __enter__(self) -> "DirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the flock


# -- records ------------------------------------------------------------------------

def _str(path: Optional[PathArg]) -> Optional[str]:
    return None if path is None else os.fsdecode(os.path.abspath(os.fsencode(os.fspath(path))))


def make_record(where: PathArg, image: PathArg, image_digest: Optional[str], basedirs: Sequence[PathArg],
                verity: str, verity_requested: str, digest: Optional[str] = None,
                upperdir: Optional[PathArg] = None, workdir: Optional[PathArg] = None,
                readonly: bool = False, options: str = "", how: Optional[Dict[str, str]] = None,
                entries: Optional[Sequence[MountInfo]] = None, ref: Optional[str] = None,
                previous: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The record of the mount now on top at ``where`` (reads mountinfo for its identity)."""
    top = top_mount(where, entries)
    if top is None:
        raise OSError(errno.ENOENT, "nothing is mounted at %s" % canonical(where))
    return {
        "format": RECORD_FORMAT,
        "where": top.where,
        "image": _str(image),
        "image_digest": image_digest,
        "basedirs": [_str(d) for d in basedirs],
        "verity": verity,
        "verity_requested": verity_requested,
        "digest": digest,
        "upperdir": _str(upperdir),
        "workdir": _str(workdir),
        "readonly": bool(readonly),
        "options": options,
        "how": dict(how or {}),
        # The ref the image was mounted by and the image shown before (mount_history), when known.
        "ref": ref,
        "previous": dict(previous) if previous else None,
        "mount_id": top.mount_id,
        "dev": top.dev,
        "mount_id_unique": unique_mount_id(top.where),
        "mnt_ns": mount_namespace(),
        "boot_id": boot_id(),
    }


def _dump(record: Dict[str, Any]) -> bytes:
    from .json_text import json_dumps

    # ensure_ascii: undecodable path bytes (lone surrogates) survive as \\udcXX.
    return (json_dumps(record) + "\n").encode("ascii")


def write_record(record: Dict[str, Any], directory: str = RECORD_DIR) -> str:
    """Write ``record`` atomically (pruning stale records first); returns its path."""
    from .atomic_file import write_atomic

    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, record_name(record["where"]))
    with DirLock(directory):
        _prune_locked(directory, keep=os.path.basename(path))
        write_atomic(path, _dump(record), mode=0o644)
    return path


def record_mount(where: PathArg, directory: Optional[str] = RECORD_DIR, **fields: Any) -> Tuple[Optional[str], Optional[str]]:
    """Best effort: (record path, None) or (None, why it was not written). Never raises."""
    if directory is None:
        return None, "recording disabled"
    try:
        return write_record(make_record(where, **fields), directory), None
    except Exception as exc:  # pylint: disable=broad-except  # the mount is made: never fail it now
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        filename = getattr(exc, "filename", None)
        return None, "cannot write the mount record in %s: %s%s" % (
            directory, why, " (%s)" % os.fsdecode(filename) if filename else "")


def load_record(path: str) -> Optional[Dict[str, Any]]:
    """A record file's content (None if missing, unreadable or not a record)."""
    from .json_text import is_int, load_json_file_or_none

    data = load_json_file_or_none(path, "mount record")
    if data is None:
        return None
    # Fields compared with what the kernel says: a "true" is no mount ID, a list no device.
    if (not is_int(data.get("format")) or data["format"] != RECORD_FORMAT or not isinstance(data.get("where"), str)
            or not is_int(data.get("mount_id")) or not isinstance(data.get("dev"), str)
            or not (data.get("mount_id_unique") is None or is_int(data.get("mount_id_unique")))):
        return None
    return data


def is_live(record: Dict[str, Any], entries: Optional[Sequence[MountInfo]] = None) -> bool:
    """Does the mount the record describes still exist (in this namespace, this boot)?"""
    if record.get("boot_id") != boot_id() or record.get("mnt_ns") != mount_namespace():
        return False
    stack = mounts_at(record["where"], entries)
    for i, e in enumerate(stack):
        if e.mount_id == record.get("mount_id") and e.dev == record.get("dev") and e.is_composefs():
            unique = record.get("mount_id_unique")
            if unique is not None and i == len(stack) - 1:
                return unique_mount_id(record["where"]) == unique
            return True
    return False


def live_record(where: PathArg, entries: Optional[Sequence[MountInfo]] = None,
                directory: str = RECORD_DIR) -> Optional[Dict[str, Any]]:
    """The record of the mount on top at ``where``, if there is one and it is not stale."""
    if entries is None:
        entries = read_mountinfo()
    top = top_mount(where, entries)
    if top is None:
        return None
    record = load_record(record_path(where, directory))
    if record is None or record.get("where") != top.where:
        return None
    if record.get("mount_id") != top.mount_id or not is_live(record, entries):
        return None
    return record


def record_for(entry: MountInfo, entries: Optional[Sequence[MountInfo]] = None,
               directory: str = RECORD_DIR) -> Optional[Dict[str, Any]]:
    """The record of the composefs mount ``entry``, also when it was made in
    another mount namespace.

    A process in a namespace of its own (a sandboxed service: systemd gives it
    a copy of the host's mounts) sees the host's mounts under other mount IDs,
    and cannot read the host namespace's identity.  What is shared is the
    overlay's device number: a record of another namespace is believed when
    its place, device and boot match.  The kernel reuses device numbers, so a
    caller that watches mounts over time should also notice the mount ID in
    its own namespace changing under an unchanged record.
    """
    if not entry.is_composefs():
        return None
    record = live_record(entry.where, entries, directory)
    if record is not None:
        return record
    own, boot = mount_namespace(), boot_id()
    for record in list_records(directory):
        if (record.get("where") == entry.where and record.get("dev") == entry.dev
                and record.get("boot_id") == boot and record.get("mnt_ns") != own):
            return record
    return None


def remove_record(where: PathArg, directory: str = RECORD_DIR, only_stale: bool = True) -> bool:
    """Remove the record for ``where`` (by default only once its mount is gone)."""
    path = record_path(where, directory)
    if not os.path.exists(path):
        return False
    with DirLock(directory):
        record = load_record(path)
        if only_stale and record is not None and is_live(record):
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
    return True


def _namespace_alive(ns: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit() and mount_namespace(pid) == ns:
            return True
    return False


def _prune_locked(directory: str, keep: str = "") -> List[str]:
    removed: List[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    entries: Optional[List[MountInfo]] = None
    own_ns, boot = mount_namespace(), boot_id()
    for name in sorted(names):
        if not name.endswith(_SUFFIX) or name.startswith(".") or name == keep:
            continue
        path = os.path.join(directory, name)
        record = load_record(path)
        if record is None:
            continue  # not ours to judge (or being written by someone without our lock)
        if record.get("boot_id") == boot:
            if record.get("mnt_ns") != own_ns:
                # Another namespace's mount: only judged gone with its namespace.
                if record.get("mnt_ns") and _namespace_alive(record["mnt_ns"]):
                    continue
            else:
                if entries is None:
                    entries = read_mountinfo()
                if is_live(record, entries):
                    continue
        try:
            os.unlink(path)
            removed.append(name)
        except OSError:
            pass
    return removed


def prune(directory: str = RECORD_DIR) -> List[str]:
    """Remove records whose mounts are gone; returns their file names."""
    if not os.path.isdir(directory):
        return []
    with DirLock(directory):
        return _prune_locked(directory)


def list_records(directory: str = RECORD_DIR) -> List[Dict[str, Any]]:
    from .json_text import json_files_in

    out = []
    for path in json_files_in(directory, _SUFFIX):
        record = load_record(path)
        if record is not None:
            out.append(record)
    return out


def mounted_images(directory: str = RECORD_DIR) -> Tuple[List[Dict[str, Any]], List[MountInfo]]:
    """What garbage collection must keep: (records, unidentified mounts).

    Records of mounts that exist now: in this mount namespace checked against
    mountinfo; of another namespace (``mount.composefs -N``), kept while that
    namespace lives.  Unidentified: composefs mounts of this namespace that
    no live record describes (made by another tool), whose image is unknown.
    """
    entries = read_mountinfo()
    own, boot = mount_namespace(), boot_id()
    found: List[Dict[str, Any]] = []
    described = set()
    for record in list_records(directory):
        if record.get("boot_id") != boot:
            continue
        if record.get("mnt_ns") == own:
            if is_live(record, entries):
                found.append(record)
                described.add((record.get("mount_id"), record.get("dev")))
        elif record.get("mnt_ns") and _namespace_alive(record["mnt_ns"]):
            found.append(record)
    unknown = [e for e in composefs_mounts(entries) if (e.mount_id, e.dev) not in described]
    return found, unknown


def describe_mount(entry: MountInfo, entries: Optional[Sequence[MountInfo]] = None,
                   directory: str = RECORD_DIR) -> Dict[str, Any]:
    """A composefs mount as the kernel shows it, plus what its record (if live) adds."""
    layout = entry.layout()
    info = {
        "where": entry.where,
        "fstype": entry.fstype,
        "source": entry.source,
        "options": entry.as_dict()["options"],
        "mount_options": list(entry.mount_options),
        "mount_id": entry.mount_id,
        "basedirs": layout["basedirs"],
        "upperdir": layout["upperdir"],
        "workdir": layout["workdir"],
        "verity": layout["verity"],
        "readonly": layout["readonly"],
        "image_file": None,
        "image_digest": None,
        "recorded": False,
        "ref": None,
        "previous_image_file": None,
        "previous_image_digest": None,
    }
    top = top_mount(entry.where, entries)
    if top is not None and top.mount_id == entry.mount_id:
        record = live_record(entry.where, entries, directory)
        if record is not None:
            info["image_file"] = record.get("image")
            info["image_digest"] = record.get("image_digest")
            info["recorded"] = True
            info["ref"] = record.get("ref") if isinstance(record.get("ref"), str) else None
            previous = record.get("previous")
            if isinstance(previous, dict):
                info["previous_image_file"] = previous.get("image")
                info["previous_image_digest"] = previous.get("image_digest")
    return info


# -- unmounting ---------------------------------------------------------------------

def unmount(where: PathArg, directory: Optional[str] = RECORD_DIR) -> MountInfo:
    """Unmount the composefs mount on top at ``where`` and drop its record.

    Refuses anything that is not a composefs overlay; a busy mount is not
    detached lazily (it would linger invisibly) but reported.
    """
    from . import mount_api as api

    top = top_mount(where)
    if top is None:
        raise UnmountError("nothing is mounted at %s" % canonical(where), errno.EINVAL)
    if not top.is_composefs():
        raise UnmountError("%s is mounted at %s (%s %s), not a composefs image: not unmounting it"
                           % (top.fstype, top.where, top.fstype, top.source), errno.EINVAL)
    try:
        api.umount(top.where)
    except ComposefsError as exc:
        err = getattr(exc, "errno", 0)
        hint = " (in use: close files and leave directories under it first)" if err == errno.EBUSY else ""
        raise UnmountError("cannot unmount %s: %s%s" % (top.where, exc, hint), err) from None
    if directory is not None:
        try:
            remove_record(top.where, directory)
        except OSError:
            pass  # a stale record is recognised as such later
    return top
