# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Garbage collection of the object store.

Roots are the images named by refs and every composefs image mounted right
now, found three ways, and none of them is a guess:

* composefs mounts made by our mount code have a mount record
  (:mod:`.mount_record`) naming the image's fs-verity digest: its
  ``images/<digest>`` is kept by name, whatever has happened to the file at
  the path it was mounted from since.  A mounted image that is not in the
  store is listed from the file the record names only if that file still
  has the recorded digest.
* every loop device (``/sys/block/loop*``; loop devices are global, so
  this also sees mounts of other mount namespaces): an ``images/<digest>``
  of this store is kept by name, anything else is listed through the
  device, which holds the file it was attached to even if that was
  replaced or deleted since.
* erofs mounts in ``/proc/self/mountinfo``: on a block device, listed
  through the device; file-backed, kept by name if the file is an image of
  this store, else listed from the mounted tree itself (its redirect
  xattrs), as the file at the path may have been replaced since.

Images are listed without reading them whole: mapped, and only the inodes,
directories and xattrs that name external files are visited (a loop device
or a partition may be far larger than the image it holds).

A composefs mount that reads objects of this store and whose image cannot
be established this way (no record, the recorded image is neither in the
store nor the file at its path, something unreadable) stops the
collection: guessing could delete what a running system reads.

The locking protocol is in the docstring of :mod:`.store`: parse images
without the lock, then mark again and sweep under the exclusive lock.

The image a live mount showed before its last switch (``previous`` in its
mount record, and in the mount point's history, :mod:`.mount_history`, while
a composefs mount is at that mount point) is kept too, with its objects,
until the mount moves again: rolling back to it must work offline.  Such an
image outside the store keeps its objects only while the file still has the
recorded digest; a previous image that cannot be found is reported, never a
reason to refuse (nothing reads it now).

An image's fs-verity signature (``images/<digest>.sig``,
:mod:`.store_image_sig`) is removed with its image, and when its image is
not kept (gone already).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from .errors import ComposefsError, RefNotFound, StoreError
from .loopdev import bound_devices
from .mount_history import HISTORY_DIR, list_all as history_entries
from .mount_record import mounted_images as recorded_mounts
from .mountinfo import MountInfo, of_type, read_mountinfo, top_mount
from .image_needs import image_data_objects, is_composefs_image
from .store import CACHE, IMAGES, OBJECTS, OCI_ORIGINS, REFS, Store, object_entries
from .store_image_sig import image_of_sig_name
from .store_names import is_hex_name

#: Default age after which ``objects/.tmp*`` files count as crash debris.
DEFAULT_TMP_GRACE = 3600.0

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_REFUSE = "; refusing to collect garbage"


class MountedImage:
    def __init__(self, where: str, source: str) -> None:
        self.where = where  # human-readable: "/dev/loop3 (backing /x/y)", "erofs on /mnt"
        self.source = source  # what tells its objects (device, file or mounted tree)
        self.store_digest: Optional[str] = None  # if it is images/<digest> of this store
        self.objects: Set[str] = set()


def _listed_objects(fd: int) -> Optional[Set[str]]:
    """Objects of the composefs image open at ``fd`` (a file or a block
    device, mapped, never read whole); None if it holds no composefs image."""
    if not is_composefs_image(os.pread(fd, 4, 0)):
        return None
    size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for block devices
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        return set(image_data_objects(mm).objects)


def _open_image(path: bytes) -> int:
    """``path`` opened for listing: regular files and block devices only, never blocking on a FIFO."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(errno.EINVAL, "not a regular file or block device")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _device_objects(device: bytes, where: str) -> Optional[Set[str]]:
    """Objects of the composefs image a loop or block device holds (None: not one, or detached meanwhile)."""
    try:
        fd = _open_image(device)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None  # detached meanwhile
        raise StoreError("cannot read mounted image %s: %s%s" % (where, exc.strerror or exc, _REFUSE)) from None
    try:
        return _listed_objects(fd)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None  # a loop device with nothing attached (any more)
        raise StoreError("cannot read mounted image %s: %s%s" % (where, exc.strerror or exc, _REFUSE)) from None
    except (ComposefsError, ValueError) as exc:
        raise StoreError("cannot parse mounted composefs image %s: %s%s" % (where, exc, _REFUSE)) from None
    finally:
        os.close(fd)


def _file_objects_if(path: str, digest: str, where: str, cache: Dict[str, Set[str]]) -> Set[str]:
    """Objects of the image file at ``path`` if it (still) has fs-verity digest ``digest``, else StoreError.

    ``cache`` (digest -> objects) spares listing the same image twice; the digest is checked every time."""
    from .fsverity_digest import digest_fd

    try:
        fd = _open_image(os.fsencode(path))
    except OSError as exc:
        gone = " (deleted or moved after mounting?)" if exc.errno == errno.ENOENT else ""
        raise StoreError("%s: its image %s is not in the store and %s cannot be read: %s%s, so its objects "
                         "are unknown%s" % (where, digest, path, exc.strerror or exc, gone, _REFUSE)) from None
    try:
        actual = digest_fd(fd).hex()
        if actual != digest:
            raise StoreError("%s: its image %s is not in the store and %s now has digest %s (replaced after "
                             "mounting?), so its objects are unknown%s" % (where, digest, path, actual, _REFUSE))
        objects = cache[digest] if digest in cache else _listed_objects(fd)
    except OSError as exc:
        raise StoreError("%s: cannot read its image %s: %s%s" % (where, path, exc.strerror or exc, _REFUSE)) from None
    except (ComposefsError, ValueError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError("%s: cannot parse its image %s: %s%s" % (where, path, exc, _REFUSE)) from None
    finally:
        os.close(fd)
    if objects is None:
        raise StoreError("%s: its image %s is not a composefs image%s" % (where, path, _REFUSE))
    cache[digest] = objects
    return objects


def objects_from_mounted_tree(mountpoint: bytes) -> Set[str]:
    """Objects used by a mounted composefs EROFS, from its overlay redirect xattrs.

    Only for the EROFS mount of the image itself: an overlay hides these
    xattrs.  Needs the right to read ``trusted.*`` xattrs (CAP_SYS_ADMIN),
    as gc does anyway.
    """
    from .store_names import object_hex_from_payload

    found: Set[str] = set()

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, _dirnames, filenames in os.walk(mountpoint, onerror=fail, followlinks=False):
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


def _uses_store(store: Store, dirs: Sequence[str]) -> bool:
    """Is one of ``dirs`` the store's objects directory or inside it (also through a bind mount)?"""
    objects = os.path.realpath(store.objects_dir)
    try:
        objects_st: Optional[os.stat_result] = os.stat(objects)
    except OSError:
        objects_st = None
    for d in dirs:
        real = os.path.realpath(os.fsencode(d))
        if real == objects or real.startswith(objects + b"/"):
            return True
        try:
            if objects_st is not None and os.path.samestat(os.stat(real), objects_st):
                return True
        except OSError:
            continue
    return False


def _store_image_name(store: Store, path: bytes, present: Set[str]) -> Optional[str]:
    """The digest if ``path`` names ``images/<digest>`` of this store.

    Store images are content-addressed: whatever file is there now (or was
    when it was mounted) holds that very image."""
    name = os.path.basename(path)
    if not is_hex_name(name) or name.decode("ascii") not in present:
        return None
    if os.path.realpath(os.path.dirname(path)) != os.path.realpath(store.images_dir):
        return None
    return name.decode("ascii")


def _recorded(store: Store, present: Set[str], cache: Dict[str, Set[str]]) -> List[MountedImage]:
    """Images of composefs mounts our mount code recorded; StoreError for one of
    this store's whose image cannot be established, or an unrecorded one."""
    found: List[MountedImage] = []
    records, unknown = recorded_mounts()
    for entry in unknown:
        if _uses_store(store, [path for _key, path in entry.layers()]):
            raise StoreError("the composefs mount on %s reads objects of this store but has no mount record, "
                             "so its image is unknown%s (remount it with composefs-fleet's mount.composefs "
                             "or the composefs.fleet.mount module)" % (entry.where, _REFUSE))
    for rec in records:
        where = "the composefs mount on %s" % rec.get("where")
        digest = rec.get("image_digest")
        image = MountedImage("composefs image %s on %s" % (rec.get("image"), rec.get("where")), str(rec.get("image")))
        if isinstance(digest, str) and digest in present:
            image.store_digest = digest
            found.append(image)
            continue
        basedirs = rec.get("basedirs")
        if not isinstance(basedirs, list) or not _uses_store(store, [d for d in basedirs if isinstance(d, str)]):
            continue  # reads no object of this store
        if not isinstance(digest, str) or not is_hex_name(digest):
            raise StoreError("%s: its mount record names no image digest, so its objects are unknown%s"
                             % (where, _REFUSE))
        if not isinstance(rec.get("image"), str):
            raise StoreError("%s: its mount record names no image file%s" % (where, _REFUSE))
        image.objects = _file_objects_if(rec["image"], digest, where, cache)
        found.append(image)
    return found


def _erofs_mounted(store: Store, present: Set[str]) -> List[MountedImage]:
    """erofs mounts not on a loop device (those are read through /sys/block)."""
    found: List[MountedImage] = []
    entries = read_mountinfo()
    for entry in of_type("erofs", entries):
        source = os.fsencode(entry.source)
        where = "erofs %s on %s" % (entry.source, entry.where)
        if source.startswith(b"/dev/loop"):
            continue
        image = MountedImage(where, entry.source)
        if source.startswith(b"/dev/"):
            objects = _device_objects(source, where)
            if objects is not None:
                image.objects = objects
                found.append(image)
            continue
        image.store_digest = _store_image_name(store, source, present)
        if image.store_digest is not None:
            found.append(image)
            continue
        # The file at the path may not be the one mounted any more: read the mounted tree itself.
        top = top_mount(entry.where, entries)
        if top is None or top.mount_id != entry.mount_id:
            if not _may_be_composefs(source):
                continue  # the file there is no composefs image: this mount is most likely none either
            raise StoreError("%s: the file may have changed since it was mounted and the mount is covered "
                             "by another one, so its objects cannot be read%s" % (where, _REFUSE))
        root = os.fsencode(entry.where)
        try:
            os.getxattr(root, b"trusted.overlay.opaque", follow_symlinks=False)
            image.objects = objects_from_mounted_tree(root)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                continue  # not a composefs image (its root is always opaque)
            if not _still_mounted(entry):
                continue  # unmounted meanwhile (e.g. the short-lived EROFS of a mount being made)
            raise StoreError("cannot read the mounted tree of %s: %s%s" % (where, exc.strerror or exc, _REFUSE)) from None
        image.source = entry.where
        found.append(image)
    return found


def _may_be_composefs(path: bytes) -> bool:
    try:
        fd = _open_image(path)
    except OSError:
        return True  # cannot tell
    try:
        return is_composefs_image(os.pread(fd, 4, 0))
    except OSError:
        return True
    finally:
        os.close(fd)


def _still_mounted(entry: MountInfo) -> bool:
    return any(e.mount_id == entry.mount_id and e.dev == entry.dev for e in read_mountinfo())


def mounted_images(store: Store, cache: Dict[str, Set[str]]) -> List[MountedImage]:
    """Every composefs image mounted now (see the module docstring).

    Images of this store are recognised by name (their objects come from
    ``cache``/the store); others are listed.  StoreError if the objects of a
    mount using this store cannot be established.
    """
    present = set(store.list_images())
    found = _recorded(store, present, cache)
    for device, shown in sorted(bound_devices().items()):
        backing = os.fsencode(shown)
        where = "%s (backing file %s)" % (device, os.fsdecode(backing))
        image = MountedImage(where, device)
        if not backing.endswith(b" (deleted)"):
            image.store_digest = _store_image_name(store, backing, present)
        if image.store_digest is None:
            objects = _device_objects(device.encode(), where)
            if objects is None:
                continue  # not a composefs image: not ours to protect
            image.objects = objects
        found.append(image)
    found.extend(_erofs_mounted(store, present))
    return found


class GcResult:
    def __init__(self) -> None:
        self.dry_run = False
        self.kept_images: List[str] = []
        self.removed_images: List[str] = []
        self.removed_image_bytes = 0
        #: Digests of the images whose images/<digest>.sig went (with the image, or left without one).
        self.removed_signatures: List[str] = []
        #: Digests of the images whose oci/<digest> record (OCI origin) went with them.
        self.removed_origins: List[str] = []
        self.removed_objects: List[str] = []
        self.removed_object_bytes = 0
        self.removed_temp_files: List[str] = []
        self.mounted: List[str] = []
        self.kept_objects = 0
        #: Previous images of live mounts kept for a rollback: {where, image_digest, image_file, in_store}.
        self.kept_previous: List[Dict[str, Any]] = []
        #: Previous images of live mounts that could not be kept: {where, image_digest, image_file, reason}.
        self.missing_previous: List[Dict[str, Any]] = []

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _image_objects_cached(store: Store, hexd: str, cache: Dict[str, Set[str]]) -> Set[str]:
    objs = cache.get(hexd)
    if objs is None:
        objs = set(store.image_objects(hexd).objects)
        cache[hexd] = objs
    return objs


def _previous_candidates(history_dir: Optional[str]) -> List[Tuple[str, Dict[str, Any], List[str]]]:
    """(mount point, previous image, basedirs) of every live mount: from its
    record, and from the history of each mount point a composefs mount is on."""
    found: List[Tuple[str, Dict[str, Any], List[str]]] = []
    records, _unknown = recorded_mounts()
    for rec in records:
        if isinstance(rec.get("previous"), dict) and isinstance(rec.get("where"), str):
            found.append((rec["where"], rec["previous"], [d for d in rec.get("basedirs") or [] if isinstance(d, str)]))
    if history_dir is None:
        return found
    entries = read_mountinfo()
    for entry in history_entries(history_dir):
        top = top_mount(entry["where"], entries)
        if entry.get("previous") and top is not None and top.is_composefs():
            found.append((entry["where"], entry["previous"], entry["basedirs"]))
    return found


def _keep_previous(store: Store, present: Set[str], cache: Dict[str, Set[str]], history_dir: Optional[str],
                   result: GcResult) -> Tuple[Set[str], Set[str]]:
    """(images, objects) kept because a live mount showed them before its last switch."""
    images: Set[str] = set()
    objects: Set[str] = set()
    seen: Set[Tuple[str, str]] = set()
    for where, previous, basedirs in _previous_candidates(history_dir):
        digest, image = previous.get("image_digest"), previous.get("image")
        if not isinstance(digest, str) or not is_hex_name(digest) or (where, digest) in seen:
            continue
        seen.add((where, digest))
        shown = {"where": where, "image_digest": digest, "image_file": image if isinstance(image, str) else None}
        if digest in present:
            images.add(digest)
            result.kept_previous.append(dict(shown, in_store=True))
            continue
        if not _uses_store(store, basedirs):
            continue  # its objects are not in this store
        if not isinstance(image, str):
            result.missing_previous.append(dict(shown, reason="not in the store and no image file recorded"))
            continue
        try:
            objects |= _file_objects_if(image, digest, "previous image of %s" % where, cache)
        except StoreError as exc:
            # Nothing reads it now: only a rollback would, so say so instead of refusing.
            result.missing_previous.append(dict(shown, reason=str(exc).replace(_REFUSE, "")))
            continue
        result.kept_previous.append(dict(shown, in_store=False))
    return images, objects


def _mark(store: Store, cache: Dict[str, Set[str]], result: GcResult,
          history_dir: Optional[str] = HISTORY_DIR) -> Tuple[Set[str], Set[str]]:
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
    previous_images, previous_objects = _keep_previous(store, present, cache, history_dir, result)
    keep_images |= previous_images
    keep_objects |= previous_objects
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


def collect(store: Store, *, dry_run: bool = False, tmp_grace: float = DEFAULT_TMP_GRACE,
            history_dir: Optional[str] = HISTORY_DIR) -> GcResult:
    """Remove images and objects unreachable from refs and mounts (see module docstring).

    ``history_dir`` holds the mount points' histories (None: only mount records tell previous images).

    Deletes only through the store's directory descriptors (unlinkat, never
    following a link), and refuses to start when a store directory is a
    symbolic link or not safely owned.
    """
    result = GcResult()
    result.dry_run = dry_run
    cache: Dict[str, Set[str]] = {}
    store.check_dirs()
    with store.lock.collector():
        # Unlocked preparation: parse what refs name now (images never change).
        try:
            _mark(store, cache, GcResult(), history_dir)
        except StoreError:
            pass  # decided under the lock below
        with store.lock.exclusive():
            keep_images, keep_objects = _mark(store, cache, result, history_dir)
            result.kept_images = sorted(keep_images)
            _sweep(store, keep_images, keep_objects, dry_run, tmp_grace, result)
    return result


def _sweep(store: Store, keep_images: Set[str], keep_objects: Set[str], dry_run: bool, tmp_grace: float,
           result: GcResult) -> None:
    now = time.time()
    # Images first, made durable, then objects: never an image without its objects.
    images = store.dir_fd(IMAGES)
    for hexd in store.list_images():
        if hexd in keep_images:
            continue
        size = _remove_at(images, hexd.encode("ascii"), dry_run)
        if size is None:
            continue
        result.removed_images.append(hexd)
        result.removed_image_bytes += size
    # A signature goes with its image; one whose image is gone vouches for nothing here.
    for name in sorted(os.listdir(images)):
        signed = image_of_sig_name(name)
        if signed is not None and signed not in keep_images and _remove_at(images, os.fsencode(name), dry_run) is not None:
            result.removed_signatures.append(signed)
    if (result.removed_images or result.removed_signatures) and not dry_run:
        os.fsync(images)
    _sweep_origins(store, keep_images, dry_run, result)
    for prefix, dir_fd in store.iter_object_dirs():
        removed = False
        for name, st in object_entries(dir_fd):
            hexd = (prefix + name).decode("ascii")
            if hexd in keep_objects:
                result.kept_objects += 1
                continue
            if not dry_run:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    continue
                removed = True
            result.removed_objects.append(hexd)
            result.removed_object_bytes += st.st_size
        if removed:
            os.fsync(dir_fd)
    # Temp files: no add of ours runs now, so ours are all debris; objects/
    # may also hold the C mkcomposefs' temp files, hence the grace period.
    for sub, grace in ((OBJECTS, tmp_grace), (IMAGES, 0.0), (CACHE, 0.0)):
        try:
            dir_fd = store.dir_fd(sub)
        except FileNotFoundError:
            continue
        for name in os.listdir(dir_fd):
            if not name.startswith("."):
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= grace:
                if _remove_at(dir_fd, os.fsencode(name), dry_run) is not None:
                    result.removed_temp_files.append(os.fsdecode(os.path.join(store.path, sub, os.fsencode(name))))
    for dirpath, _dirnames, filenames, dir_fd in os.fwalk(b".", dir_fd=store.dir_fd(REFS)):
        for name in filenames:
            if name.startswith(b".tmp-ref-") and _remove_at(dir_fd, name, dry_run) is not None:
                result.removed_temp_files.append(os.fsdecode(os.path.normpath(os.path.join(store.refs_dir, dirpath,
                                                                                           name))))


def _sweep_origins(store: Store, keep_images: Set[str], dry_run: bool, result: GcResult) -> None:
    """``oci/<digest>`` (where an image came from) goes with its image."""
    try:
        origins = store.dir_fd(OCI_ORIGINS)
    except FileNotFoundError:
        return
    removed = False
    for name in sorted(os.listdir(origins)):
        if is_hex_name(name) and name not in keep_images and _remove_at(origins, os.fsencode(name), dry_run) is not None:
            result.removed_origins.append(name)
            removed = True
    if removed and not dry_run:
        os.fsync(origins)


def _remove_at(dir_fd: int, name: bytes, dry_run: bool) -> Optional[int]:
    """Unlink ``name`` in ``dir_fd`` (a link is removed, never followed); its size, None if it was gone."""
    try:
        size = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size
        if not dry_run:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return size
