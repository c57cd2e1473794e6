# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Garbage collection of the object store.

Roots are the images named by refs and every composefs image mounted right
now.  Mounted images are found through every loop device's backing file
(``/sys/block/loop*/loop/backing_file``: loop devices are global, so this
also sees mounts of other mount namespaces) and the sources of erofs mounts
in ``/proc/self/mountinfo`` (file-backed erofs, block devices).  An image
inside ``images/`` is kept by name; any other composefs image (a copy
elsewhere, a deleted file still attached to a loop device) is read through
its device or file and the objects it uses are kept.  A mounted composefs
source that cannot be read stops the collection: guessing could delete what
a running system reads.

The locking protocol is in the docstring of :mod:`.store`: parse images
without the lock, then mark again and sweep under the exclusive lock.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from .atomic_file import fsync_dir
from .errors import ComposefsError
from .store import RefNotFound, Store, StoreError, image_data_objects, image_objects, is_composefs_image, is_hex_name
from .tree import Node

#: Default age after which ``objects/.tmp*`` files count as crash debris.
DEFAULT_TMP_GRACE = 3600.0

_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


class MountedImage:
    def __init__(self, where: str, source: str) -> None:
        self.where = where  # human-readable: "/dev/loop3 (backing /x/y)", "erofs on /mnt"
        self.source = source  # path read (file or device)
        self.store_digest: Optional[str] = None  # if it is images/<digest> of this store
        self.objects: Set[str] = set()


def _unescape_mountinfo(field: bytes) -> bytes:
    return _MOUNTINFO_ESCAPE.sub(lambda m: bytes((int(m.group(1), 8),)), field)


def _read_text(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def loop_backing_files(sys_block: str = "/sys/block") -> List[Tuple[str, bytes]]:
    """(device, backing file) of every attached loop device."""
    out = []
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        raw = _read_text(os.path.join(sys_block, name, "loop", "backing_file"))
        if raw:
            out.append(("/dev/" + name, raw.rstrip(b"\n")))
    return out


def erofs_mount_sources(mountinfo: str = "/proc/self/mountinfo") -> List[Tuple[bytes, bytes]]:
    """(source, mount point) of every erofs mount."""
    raw = _read_text(mountinfo) or b""
    out = []
    for line in raw.splitlines():
        left, sep, right = line.partition(b" - ")
        if not sep:
            continue
        fields = right.split(b" ")
        lfields = left.split(b" ")
        if len(fields) >= 2 and fields[0] == b"erofs" and len(lfields) >= 5:
            out.append((_unescape_mountinfo(fields[1]), _unescape_mountinfo(lfields[4])))
    return out


def _read_whole(path: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            if len(chunks) == 1 and not is_composefs_image(chunk[:4]):
                return chunk[:4]
        return b"".join(chunks)
    finally:
        os.close(fd)


def _same_file(a: bytes, b: bytes) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def objects_from_mounted_tree(mountpoint: bytes) -> Set[str]:
    """Objects used by a mounted composefs erofs, from its overlay redirect xattrs.

    For a mount whose image file is no longer reachable; needs the right to
    read ``trusted.*`` xattrs (CAP_SYS_ADMIN), as gc does anyway.
    """
    from .store import object_hex_from_payload

    found: Set[str] = set()
    for dirpath, _dirnames, filenames in os.walk(mountpoint, followlinks=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                value = os.getxattr(path, b"trusted.overlay.redirect", follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                    continue
                raise
            hexd = object_hex_from_payload(value.lstrip(b"/"))
            if hexd is not None:
                found.add(hexd)
    return found


def mounted_images(store: Store, cache: Dict[str, Set[str]]) -> List[MountedImage]:
    """Every composefs image attached to a loop device or mounted as erofs.

    Images of this store are recognised by name (their objects come from
    ``cache``/the store); others are parsed.  StoreError if one cannot be read.
    """
    found: List[MountedImage] = []
    seen: Set[bytes] = set()
    candidates: List[Tuple[str, bytes, Optional[bytes]]] = []
    for device, backing in loop_backing_files():
        deleted = backing.endswith(b" (deleted)")
        candidates.append(("%s (backing file %s)" % (device, os.fsdecode(backing)), device.encode(),
                           None if deleted else backing))
    mountpoints: Dict[bytes, bytes] = {}
    for source, target in erofs_mount_sources():
        mountpoints.setdefault(source, target)
        if source.startswith(b"/dev/loop"):
            continue  # seen through /sys/block
        candidates.append(("erofs %s on %s" % (os.fsdecode(source), os.fsdecode(target)), source,
                           source if not source.startswith(b"/dev/") else None))
    # Overlays given their EROFS layer as a detached mount fd show neither a
    # loop device nor an erofs mount: their mount records say which image
    # they show.  One that has no record but reads objects from this store
    # cannot be identified: refuse rather than guess.
    from .mount_record import mounted_images as recorded_mounts

    records, unknown = recorded_mounts()
    for rec in records:
        image_file = os.fsencode(rec["image"])
        mountpoints.setdefault(image_file, os.fsencode(rec["where"]))
        candidates.append(("composefs image %s on %s" % (rec["image"], rec["where"]), image_file, image_file))
    objects = os.path.realpath(store.objects_dir)
    for entry in unknown:
        for basedir in entry.layout()["basedirs"]:
            real = os.path.realpath(os.fsencode(basedir))
            if real == objects or real.startswith(objects + b"/"):
                raise StoreError("the composefs mount on %s reads objects of this store but has no mount record, "
                                 "so its image is unknown; refusing to collect garbage (remount it with "
                                 "composefs-fleet's mount.composefs or the composefs.fleet.mount module)"
                                 % entry.where)
    images = store.images_dir
    for where, readable, backing in candidates:
        key = readable
        if key in seen:
            continue
        seen.add(key)
        image = MountedImage(where, os.fsdecode(readable))
        if backing is not None:
            name = os.path.basename(backing)
            if is_hex_name(name) and _same_file(backing, os.path.join(images, name)):
                image.store_digest = name.decode("ascii")
                found.append(image)
                continue
        try:
            data = _read_whole(readable)
        except OSError as exc:
            if backing is None and readable.startswith(b"/dev/loop") and not os.path.exists(readable):
                continue  # detached meanwhile
            mountpoint = mountpoints.get(readable)
            if mountpoint is not None:
                # The source is gone (an image replaced after mounting): read
                # the mounted tree itself instead.
                try:
                    image.objects = objects_from_mounted_tree(mountpoint)
                    found.append(image)
                    continue
                except OSError:
                    pass
            raise StoreError("cannot read mounted image %s: %s; refusing to collect garbage"
                             % (where, exc.strerror or exc)) from None
        if not is_composefs_image(data[:4]):
            continue  # some other erofs or loop image: not ours to protect
        try:
            # Foreign images may be large: list their objects without building their trees.
            image.objects = set(image_data_objects(data).objects)
        except ComposefsError as exc:
            raise StoreError("cannot parse mounted composefs image %s: %s; refusing to collect garbage"
                             % (where, exc)) from None
        found.append(image)
    return found


class GcResult:
    def __init__(self) -> None:
        self.dry_run = False
        self.kept_images: List[str] = []
        self.removed_images: List[str] = []
        self.removed_image_bytes = 0
        self.removed_objects: List[str] = []
        self.removed_object_bytes = 0
        self.removed_temp_files: List[str] = []
        self.mounted: List[str] = []
        self.kept_objects = 0

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _image_objects_cached(store: Store, hexd: str, cache: Dict[str, Set[str]]) -> Set[str]:
    objs = cache.get(hexd)
    if objs is None:
        root: Node = store.read_image(hexd)
        objs = set(image_objects(root).objects)
        cache[hexd] = objs
    return objs


def _mark(store: Store, cache: Dict[str, Set[str]], result: GcResult) -> Tuple[Set[str], Set[str]]:
    """(images to keep, objects to keep)."""
    keep_images: Set[str] = set()
    keep_objects: Set[str] = set()
    for name in store.list_refs():
        try:
            keep_images.add(store.read_ref(name))
        except RefNotFound:
            continue  # removed meanwhile (only possible in the unlocked pre-pass)
        except StoreError as exc:
            # What a damaged ref named is unknown: collecting could lose it.
            raise StoreError("%s; fix or remove the ref (rm-ref) before collecting garbage" % exc) from None
    mounted = mounted_images(store, cache)
    result.mounted = [m.where for m in mounted]
    for m in mounted:
        if m.store_digest is not None:
            keep_images.add(m.store_digest)
        keep_objects |= m.objects
    present = set(store.list_images())
    for hexd in sorted(keep_images):
        if hexd not in present:
            continue  # a dangling ref: fsck reports it
        try:
            keep_objects |= _image_objects_cached(store, hexd, cache)
        except (OSError, ComposefsError) as exc:
            # Cannot know what a kept image needs: deleting anything could lose data.
            raise StoreError("cannot read image %s: %s; run fsck, refusing to collect garbage"
                             % (hexd, exc)) from None
    return keep_images, keep_objects


def collect(store: Store, *, dry_run: bool = False, tmp_grace: float = DEFAULT_TMP_GRACE) -> GcResult:
    """Remove images and objects unreachable from refs and mounts (see module docstring)."""
    result = GcResult()
    result.dry_run = dry_run
    cache: Dict[str, Set[str]] = {}
    with store.lock.collector():
        # Unlocked preparation: parse what refs name now (images never change).
        try:
            _mark(store, cache, GcResult())
        except StoreError:
            pass  # decided under the lock below
        with store.lock.exclusive():
            keep_images, keep_objects = _mark(store, cache, result)
            result.kept_images = sorted(keep_images)
            _sweep(store, keep_images, keep_objects, dry_run, tmp_grace, result)
    return result


def _sweep(store: Store, keep_images: Set[str], keep_objects: Set[str], dry_run: bool, tmp_grace: float,
           result: GcResult) -> None:
    now = time.time()
    # Images first, made durable, then objects: never an image without its objects.
    for hexd in store.list_images():
        if hexd in keep_images:
            continue
        path = store.image_path(hexd)
        try:
            size = os.lstat(path).st_size
            if not dry_run:
                os.unlink(path)
        except FileNotFoundError:
            continue
        result.removed_images.append(hexd)
        result.removed_image_bytes += size
    if result.removed_images and not dry_run:
        fsync_dir(store.images_dir)
    touched: Set[bytes] = set()
    for hexd, path, st in store.iter_objects():
        if hexd in keep_objects:
            result.kept_objects += 1
            continue
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            touched.add(os.path.dirname(path))
        result.removed_objects.append(hexd)
        result.removed_object_bytes += st.st_size
    for directory in sorted(touched):
        fsync_dir(directory)
    # Temp files: no add of ours runs now, so ours are all debris; objects/
    # may also hold the C mkcomposefs' temp files, hence the grace period.
    debris: List[bytes] = []
    for directory, grace in ((store.objects_dir, tmp_grace), (store.images_dir, 0.0),
                             (os.path.dirname(store.cache_path), 0.0)):
        for name in _listdir(directory):
            if not name.startswith(b"."):
                continue
            full = os.path.join(directory, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= grace:
                debris.append(full)
    for dirpath, dirnames, filenames in os.walk(store.refs_dir, followlinks=False):
        for name in filenames:
            if name.startswith(b".tmp-ref-"):
                debris.append(os.path.join(dirpath, name))
    for full in debris:
        if not dry_run:
            try:
                os.unlink(full)
            except FileNotFoundError:
                continue
        result.removed_temp_files.append(os.fsdecode(full))


def _listdir(path: bytes) -> List[bytes]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
