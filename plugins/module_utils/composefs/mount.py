# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Mount a composefs image: EROFS metadata + overlayfs over the object store(s).

Steps (as libcomposefs 1.0.8 ``lcfs_mount_fd``, with the kernel interfaces of
today and no temporary mount where the kernel allows it):

1. check everything that can be checked without mounting (privileges, image
   header and bounds, fs-verity digest, directories), each with a clear
   message; open the mount point without following symbolic links;
2. mount the image as EROFS, detached (``fsmount``): file-backed where the
   kernel can (Linux 6.12+), else through a read-only auto-clearing loop
   device; idmap it when asked (``mount_setattr(MOUNT_ATTR_IDMAP)``);
3. build the overlay: ``lowerdir+`` = the detached EROFS mount passed as a
   file descriptor (Linux 6.15+; older kernels get a private temporary
   directory, detached right after), ``datadir+`` per basedir,
   ``redirect_dir=on``, ``metacopy=on``, ``verity=require`` when asked;
   kernels without those keys get the classic ``lowerdir=a::b`` string with
   ``\\``-escaped separators;
4. attach the overlay onto the mount point's descriptor (``move_mount``), so
   the place mounted is the place checked.  Only the mount point is pinned
   this way: basedirs and upper/work directories are the caller's paths and
   reach overlayfs as paths (resolved, links followed, as C does).

The EROFS mount is never visible anywhere once this returns: the overlay
holds the only reference, so ``umount TARGET`` releases everything, and the
loop device (if any) auto-clears with it.
"""

from __future__ import annotations

import errno
import os
import stat
# typing itself costs ~20 ms of start-up (re, functools...): imported for type checkers only.
TYPE_CHECKING = False

from . import erofs_format as fmt
from . import mount_api as api
from .errors import ComposefsError, VerityError, VerityNotEnabled, VerityNotSupported
from .mount_options import escape, format_options
from .safe_dirs import READ_FLAGS, UnsafePathError, open_regular

if TYPE_CHECKING:  # typing costs import time on every mount; annotations are strings here
    from typing import Any, Dict, List, Optional, Sequence, Union

    PathArg = Union[str, bytes, "os.PathLike[str]"]

# fsverity_digest (hashlib, threading), tempfile and loopdev are imported where needed: a
# plain mount uses none of them, and mount.composefs start-up time is mount time.

CAP_SYS_ADMIN = 21
MOUNT_SOURCE = "composefs"

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class ComposefsMountError(ComposefsError):
    """Mounting failed; the message says why, ``errno`` the kernel's answer if any."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


# -- checks -------------------------------------------------------------------

def _show(path: PathArg) -> str:
    return os.fsdecode(os.fspath(path))


def has_cap_sys_admin() -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool((int(line.split()[1], 16) >> CAP_SYS_ADMIN) & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def _check_dir(path: PathArg, what: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ComposefsMountError("%s %s does not exist" % (what, _show(path)), exc.errno) from exc
        raise ComposefsMountError("%s %s: %s" % (what, _show(path), exc.strerror), exc.errno or 0) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ComposefsMountError("%s %s is not a directory" % (what, _show(path)), errno.ENOTDIR)


def open_mount_point(target: PathArg, follow_symlinks: bool = False) -> int:
    """An ``O_PATH`` descriptor of the directory ``target``, for mounting onto.

    Unless ``follow_symlinks``, the path is resolved one component at a time
    with ``O_NOFOLLOW`` and a symbolic link anywhere in it is refused: a link
    planted in a parent directory (by anyone who can write there) must not
    move a root mount elsewhere.  The mount is then made on this descriptor,
    so the place mounted is exactly the place checked.
    """
    name = _show(target)
    path_flags = os.O_PATH | os.O_CLOEXEC
    if follow_symlinks:
        try:
            fd = os.open(target, path_flags)
        except OSError as exc:
            raise _mount_point_error(name, exc) from exc
    else:
        raw = os.fsencode(os.fspath(target))
        try:
            fd = os.open(b"/" if raw.startswith(b"/") else b".", path_flags | os.O_DIRECTORY)
        except OSError as exc:
            raise _mount_point_error(name, exc) from exc
        walked = b"" if raw.startswith(b"/") else b"."
        for part in [p for p in raw.split(b"/") if p not in (b"", b".")]:
            walked += b"/" + part
            try:
                nxt = os.open(part, path_flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                raise _mount_point_error(name, exc) from exc
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)
                raise ComposefsMountError("mount point %s: %s is a symbolic link: refused (a link in the path "
                                          "could send the mount elsewhere; give the path with links resolved)"
                                          % (name, os.fsdecode(walked)), errno.ELOOP)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise ComposefsMountError("mount point %s is not a directory" % name, errno.ENOTDIR)
    return fd


def _mount_point_error(name: str, exc: OSError) -> ComposefsMountError:
    if exc.errno == errno.ENOENT:
        return ComposefsMountError("mount point %s does not exist" % name, exc.errno)
    if exc.errno == errno.ENOTDIR:
        return ComposefsMountError("mount point %s is not a directory (nor is a component of it)" % name, exc.errno)
    return ComposefsMountError("mount point %s: %s" % (name, exc.strerror), exc.errno or 0)


def read_image_header(fd: int, path: PathArg) -> int:
    """Check the composefs header and EROFS superblock; return the header flags."""
    head = os.pread(fd, fmt.EROFS_SUPER_OFFSET + fmt.EROFS_SUPER.size, 0)
    name = _show(path)
    if len(head) < fmt.COMPOSEFS_HEADER.size:
        raise ComposefsMountError("%s is not a composefs image: only %d bytes long" % (name, len(head)),
                                  errno.EINVAL)
    magic, version, flags, _unused = fmt.COMPOSEFS_HEADER.unpack_from(head, 0)
    if magic != fmt.COMPOSEFS_MAGIC:
        raise ComposefsMountError("%s is not a composefs image: bad magic 0x%08x (want 0x%08x)"
                                  % (name, magic, fmt.COMPOSEFS_MAGIC), errno.EINVAL)
    if version != fmt.COMPOSEFS_HEADER_VERSION:
        raise ComposefsMountError("%s: unsupported composefs header version %d" % (name, version), errno.EINVAL)
    if len(head) < fmt.EROFS_SUPER_OFFSET + fmt.EROFS_SUPER.size:
        raise ComposefsMountError("%s is not an EROFS image: truncated before the superblock" % name,
                                  errno.EINVAL)
    sb = fmt.EROFS_SUPER.unpack_from(head, fmt.EROFS_SUPER_OFFSET)
    if sb[0] != fmt.EROFS_SUPER_MAGIC:
        raise ComposefsMountError("%s is not an EROFS image: bad superblock magic 0x%08x" % (name, sb[0]),
                                  errno.EINVAL)
    _check_bounds(name, os.fstat(fd).st_size, blkszbits=sb[3], root_nid=sb[5], blocks=sb[9], meta_blkaddr=sb[10],
                  xattr_blkaddr=sb[11])
    return int(flags)


def _check_bounds(name: str, size: int, blkszbits: int, root_nid: int, blocks: int, meta_blkaddr: int,
                  xattr_blkaddr: int) -> None:
    """Refuse an image whose superblock points past the end of the file.

    The kernel mounts a truncated image and then fails every read beyond its
    end with EIO; what the superblock declares is checked here instead (a
    few comparisons, no parse).  An impossible block size is left to the
    kernel, which refuses the superblock with its own message.
    """
    if not 9 <= blkszbits <= 16:
        return
    block = 1 << blkszbits
    problem = None
    if blocks * block > size:
        problem = "its superblock declares %d blocks of %d bytes (%d bytes)" % (blocks, block, blocks * block)
    elif meta_blkaddr * block + ((root_nid + 1) << fmt.SLOT_BITS) > size:
        problem = "its root inode (nid %d, metadata at block %d) lies past the end" % (root_nid, meta_blkaddr)
    elif xattr_blkaddr * block > size:
        problem = "its shared xattr area (block %d) starts past the end" % xattr_blkaddr
    if problem:
        raise ComposefsMountError("image %s is truncated or damaged: %s, but the file has %d bytes"
                                  % (name, problem, size), errno.EINVAL)


def check_digest(fd: int, path: PathArg, digest: str) -> None:
    """Refuse the image unless its fs-verity digest is ``digest`` (hex)."""
    if not digest or len(digest) % 2 or len(digest) > 128 or not set(digest) <= _HEX_DIGITS:
        raise ComposefsMountError("invalid digest %r: expected hex, e.g. 64 digits for sha256" % digest,
                                  errno.EINVAL)
    from .fsverity_ioctl import measure_verity

    name = _show(path)
    try:
        algorithm, found = measure_verity(fd)
    except VerityNotEnabled as exc:
        raise ComposefsMountError("Image has no fs-verity: %s has no fs-verity enabled, so digest= cannot be "
                                  "checked (enable it, e.g. fsverity enable)" % name, errno.ENODATA) from exc
    except VerityNotSupported as exc:
        raise ComposefsMountError("digest= needs fs-verity on the image %s: %s" % (name, exc),
                                  errno.EOPNOTSUPP) from exc
    except VerityError as exc:
        raise ComposefsMountError("cannot measure fs-verity of %s: %s" % (name, exc), errno.EIO) from exc
    if found.hex() != digest.lower():
        raise ComposefsMountError("Image has wrong fs-verity: %s has %s digest %s, expected %s"
                                  % (name, algorithm, found.hex(), digest.lower()), errno.EILSEQ)


def verity_problem(basedir: PathArg) -> Optional[str]:
    """Why objects under ``basedir`` can not have fs-verity (None: they can); see fsverity_ioctl.verity_problem.

    It lives there, so that callers that only ask (the store and mount modules) need not load this module;
    imported when called, as mount.composefs's start-up does not need fsverity_ioctl."""
    from .fsverity_ioctl import verity_problem as problem

    return problem(basedir)


# -- mounting -----------------------------------------------------------------

class MountResult:
    """How the mount was made (for -v output and tests)."""

    def __init__(self) -> None:
        self.erofs_source = ""  # "file" or "loop:/dev/loopN"
        self.lower = ""  # "fd", "tmpdir" or "legacy"
        self.verity = False  # verity=require is on
        self.target = ""
        self.record_path: Optional[str] = None  # the mount record written (mount_record)
        self.record_error: Optional[str] = None  # why none was written (or the history)
        self.replaced: Optional[Dict[str, Any]] = None  # the record of the mount replaced (replace=True)
        # "attach", "beneath" (atomic switch), "detach-attach" (its fallback) or "unmount-attach" (writable mounts)
        self.method = "attach"
        self.previous: Optional[Dict[str, Any]] = None  # {image, image_digest, ref} shown before, if known

    def __repr__(self) -> str:
        return "MountResult(%r)" % (self.__dict__,)


def _mount_erofs(image_fd: int, image: PathArg, has_acl: bool, idmap_fd: Optional[int],
                 source_mode: str, result: MountResult) -> int:
    """Detached EROFS mount of the image; returns the mount fd."""

    def attempt(source: str) -> int:
        with api.FsContext("erofs") as ctx:
            ctx.set_string("source", source)
            ctx.set_flag("ro")
            if not has_acl:
                ctx.set_flag("noacl")
            ctx.create()
            return ctx.mount(api.MOUNT_ATTR_RDONLY)

    mnt_fd = -1
    if source_mode in ("auto", "file"):
        try:
            mnt_fd = attempt("/proc/self/fd/%d" % image_fd)
            result.erofs_source = "file"
        except api.MountError as exc:
            # ENOTBLK: this kernel has no file-backed EROFS (before 6.12).
            if exc.errno != errno.ENOTBLK or source_mode == "file":
                raise _explain_erofs(exc, image)
    if mnt_fd < 0:
        from . import loopdev  # kernels before 6.12 only: not imported by every mount

        try:
            loop_fd, device = loopdev.attach_readonly(image_fd, _show(image))
        except loopdev.LoopError as exc:
            raise ComposefsMountError("cannot set up a loop device for %s: %s" % (_show(image), exc),
                                      exc.errno) from exc
        try:
            mnt_fd = attempt(device)
        except api.MountError as exc:
            raise _explain_erofs(exc, image)
        finally:
            os.close(loop_fd)  # autoclear: the erofs superblock now holds it
        result.erofs_source = "loop:" + device
    if idmap_fd is not None:
        try:
            api.set_idmap(mnt_fd, idmap_fd)
        except api.MountError as exc:
            os.close(mnt_fd)
            raise ComposefsMountError("idmap: cannot make an idmapped mount with that user namespace: %s "
                                      "(it must be a user namespace, e.g. /proc/PID/ns/user, and the kernel "
                                      "must support idmapped erofs mounts)" % exc, exc.errno) from exc
    return mnt_fd


def _explain_erofs(exc: api.MountError, image: PathArg) -> ComposefsMountError:
    return ComposefsMountError("cannot mount %s as EROFS: %s" % (_show(image), exc), exc.errno)


class _OverlayPlan:
    def __init__(self, basedirs: Sequence[str], upperdir: Optional[str], workdir: Optional[str],
                 verity: str, attr_flags: int) -> None:
        self.basedirs = list(basedirs)
        self.upperdir = upperdir
        self.workdir = workdir
        self.verity = verity  # "", "require" or "try"
        self.attr_flags = attr_flags


def _overlay_new_api(plan: _OverlayPlan, lower_fd: Optional[int], lower_path: Optional[str],
                     result: MountResult) -> int:
    with api.FsContext("overlay") as ctx:
        # A kernel that only forwards a legacy option string accepts any key:
        # then the keys below would be silently misread (as libcomposefs checks).
        try:
            ctx.set_string("unsupported", "unsupported")
        except api.MountError:
            pass
        else:
            raise api.MountError("overlayfs does not validate fsconfig keys", errno.ENOSYS, "fsconfig")
        ctx.set_string("source", MOUNT_SOURCE)
        ctx.set_string("metacopy", "on")
        ctx.set_string("redirect_dir", "on")
        if plan.verity:
            try:
                ctx.set_string("verity", "require")
                result.verity = True
            except api.MountError as exc:
                if plan.verity == "require":
                    raise ComposefsMountError(
                        "verity requested, but the kernel's overlayfs has no verity=require option "
                        "(needs Linux 6.6+): %s" % exc, exc.errno) from exc
        if lower_fd is not None:
            ctx.set_fd("lowerdir+", lower_fd)
        else:
            if lower_path is None:
                raise AssertionError("lower_path is not None")
            ctx.set_string("lowerdir+", lower_path)
        for basedir in plan.basedirs:
            ctx.set_string("datadir+", basedir)
        if plan.upperdir is not None:
            _set_dir(ctx, "upperdir", plan.upperdir)
            _set_dir(ctx, "workdir", plan.workdir or "")
        ctx.create()
        return ctx.mount(plan.attr_flags)


def _set_dir(ctx: api.FsContext, key: str, path: str) -> None:
    """upperdir/workdir: as an fd where the kernel takes one (Linux 6.13+).

    As strings, overlayfs unescapes these two (unlike lowerdir+/datadir+), so
    a backslash in the path must then be doubled.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise api.MountError("cannot open %s %s: %s" % (key, path, exc.strerror), exc.errno or 0) from exc
    try:
        try:
            ctx.set_fd(key + "+", fd)
            return
        except api.MountError as exc:
            if exc.errno != errno.EINVAL:
                raise
    finally:
        os.close(fd)
    ctx.set_string(key, escape(path, "\\"))


_MS_FLAGS = {
    api.MOUNT_ATTR_RDONLY: 1,  # MS_RDONLY
    api.MOUNT_ATTR_NOSUID: 2,
    api.MOUNT_ATTR_NODEV: 4,
    api.MOUNT_ATTR_NOEXEC: 8,
    api.MOUNT_ATTR_NOATIME: 1024,
    api.MOUNT_ATTR_NODIRATIME: 2048,
    api.MOUNT_ATTR_STRICTATIME: 1 << 24,
    api.MOUNT_ATTR_NOSYMFOLLOW: 256,  # MS_NOSYMFOLLOW
}


def _overlay_legacy(plan: _OverlayPlan, lower_path: str, target: _Target, result: MountResult) -> None:
    """mount(2) with one option string: every path escaped for overlayfs.

    mount(2) takes no descriptor: the target is named through /proc/self/fd,
    which resolves to the directory open at the target's descriptor and
    nothing else.  mount(2) cannot mount beneath: a mount being replaced is
    detached first (the fallback of :class:`_Target`).
    """
    def esc(path: str) -> str:
        if "\n" in path:
            raise ComposefsMountError("path %r holds a newline, which the legacy overlayfs option string "
                                      "cannot carry (needs Linux 6.7+ for lowerdir+/datadir+)" % path,
                                      errno.EINVAL)
        return escape(path, ",:\\")

    flags = 0
    for attr, ms in _MS_FLAGS.items():
        if plan.attr_flags & attr:
            flags |= ms
    base = "metacopy=on,redirect_dir=on"
    tail = ""
    if plan.upperdir is not None:
        tail += ",upperdir=%s,workdir=%s" % (esc(plan.upperdir), esc(plan.workdir or ""))
    if plan.verity == "require":
        tail += ",verity=require"
    last_exc: Optional[api.MountError] = None
    # Data-only lower layers ("::", Linux 6.5+) first, then plain lower layers.
    for sep in ("::", ":"):
        lower = esc(lower_path) + "".join(sep + esc(d) for d in plan.basedirs)
        data = "%s,lowerdir=%s%s" % (base, lower, tail)
        try:
            api.legacy_mount(MOUNT_SOURCE, "/proc/self/fd/%d" % target.legacy_fd(result), "overlay", flags,
                             os.fsencode(data),
                             result.target)
            result.lower = "legacy" + ("" if sep == "::" else "-nodataonly")
            result.verity = plan.verity == "require"
            return
        except api.MountError as exc:
            last_exc = exc
            if exc.errno != errno.EINVAL:
                break
    if last_exc is None:
        raise AssertionError("last_exc is not None")
    raise last_exc


class _Target:
    """The mount point, open as an ``O_PATH`` descriptor, and how the new mount gets there.

    Replacing a live mount (``replace=True``), the new overlay goes beneath
    it (``MOVE_MOUNT_BENEATH``, Linux 6.5+) and then the old one is detached
    lazily: every new open sees one image or the other, never the empty
    directory, and processes holding files or directories of the old mount
    keep reading it until they let go.  A kernel that refuses the flag gets
    the fallback: the old mount detached, then the new one attached (new
    opens in between see the mount point's own directory).

    Writable mounts (an upper directory, old or new) are the exception: two
    overlays must not share an upper or work directory (overlayfs warns of
    undefined behaviour), so the old one is unmounted, not detached, before
    the new one is attached, and a busy one is refused (``exclusive``).
    """

    def __init__(self, path: PathArg, follow_symlinks: bool, shown: str, replacing: bool) -> None:
        self.path = path
        self.follow = follow_symlinks
        self.shown = shown
        self.fd = open_mount_point(path, follow_symlinks)
        self.replacing = replacing
        self.exclusive = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def attach(self, ovl_fd: int, result: MountResult) -> None:
        try:
            if self.replacing and not self.exclusive:
                try:
                    api.move_mount_fd(ovl_fd, self.fd, self.shown, beneath=True)
                except api.MountError as exc:
                    # EINVAL: no MOVE_MOUNT_BENEATH (before 6.5), or a place it does not serve.
                    if exc.errno != errno.EINVAL:
                        raise
                else:
                    result.method = "beneath"
                    self.replacing = False
                    self._detach_old("the new mount is beneath it")
                    return
            if self.replacing:
                self.detach_old_first(result)
            api.move_mount_fd(ovl_fd, self.fd, self.shown)
        finally:
            os.close(ovl_fd)

    def legacy_fd(self, result: MountResult) -> int:
        """The descriptor to mount(2) onto: the old mount detached first when replacing."""
        if self.replacing:
            self.detach_old_first(result)
        return self.fd

    def detach_old_first(self, result: MountResult) -> None:
        if self.exclusive:
            # Our own descriptor holds the mount too (it would make it busy): let go of
            # it, make sure the top mount is still the one replaced, unmount by path.
            from .mountinfo import top_mount

            old_id = os.stat("/proc/self/fd/%d" % self.fd).st_dev
            self.close()
            top = top_mount(self.path)
            try:
                if top is None or not top.is_composefs() or os.stat(self.path).st_dev != old_id:
                    raise api.MountError("the mount changed meanwhile", errno.EAGAIN, "umount2")
                api.umount(self.path, api.UMOUNT_NOFOLLOW)
            except api.MountError as exc:
                hint = (" (in use: a writable composefs mount is switched only when no process uses it, since two "
                        "overlays must not share its upper directory)") if exc.errno == errno.EBUSY else ""
                raise ComposefsMountError("cannot unmount the mount being replaced at %s: %s%s; nothing was "
                                          "changed" % (self.shown, exc, hint), exc.errno) from exc
            result.method = "unmount-attach"
        else:
            self._detach_old("nothing was mounted")
            result.method = "detach-attach"
        self.replacing = False
        self.close()
        self.fd = open_mount_point(self.path, self.follow)

    def _detach_old(self, state: str) -> None:
        # Through the descriptor, which names the old mount's root: exactly
        # that mount is detached, whatever is stacked at the path meanwhile.
        try:
            api.umount("/proc/self/fd/%d" % self.fd, api.MNT_DETACH)
        except api.MountError as exc:
            raise ComposefsMountError("cannot detach the mount being replaced at %s (%s): %s"
                                      % (self.shown, state, exc), exc.errno) from exc


def _replaced_record(target: PathArg) -> Optional[Dict[str, Any]]:
    """What a replacing mount replaces at ``target``: the composefs mount on
    top (its record, or a record-like dict without an image when it has none);
    None when nothing is mounted there.  Anything else on top is refused."""
    from . import mount_record
    from .mountinfo import canonical, read_mountinfo, top_mount

    entries = read_mountinfo()
    top = top_mount(target, entries)
    if top is None:
        return None
    if not top.is_composefs():
        raise ComposefsMountError("%s is mounted at %s (%s %s), not a composefs image: not replacing it"
                                  % (top.fstype, canonical(target), top.fstype, top.source), errno.EBUSY)
    record = mount_record.live_record(target, entries)
    if record is not None:
        return record
    return {"where": top.where, "image": None, "image_digest": None, "upperdir": top.layout()["upperdir"]}


def _private_tmpdir() -> str:
    import tempfile

    parent = "/run" if os.path.isdir("/run") and os.access("/run", os.W_OK) else tempfile.gettempdir()
    return tempfile.mkdtemp(prefix=".composefs.", dir=parent)


def mount_composefs(image: PathArg, target: PathArg, basedirs: Sequence[PathArg],
                    digest: Optional[str] = None, verity: bool = False, tryverity: bool = False,
                    idmap: Optional[PathArg] = None, upperdir: Optional[PathArg] = None,
                    workdir: Optional[PathArg] = None, readonly: bool = False,
                    attr_set: int = 0, dry_run: bool = False,
                    erofs_source: str = "auto", lower: str = "auto",
                    record_dir: Optional[str] = "", follow_symlinks: bool = False, replace: bool = False,
                    ref: Optional[str] = None, store: Optional[PathArg] = None,
                    history_dir: Optional[str] = "") -> MountResult:
    """Mount the composefs ``image`` at ``target`` with objects from ``basedirs``.

    ``digest`` (hex) is the required fs-verity digest of the image and implies
    ``verity``; ``verity`` makes overlayfs require fs-verity digests on every
    file (``tryverity``: where the kernel and the basedir filesystem can).
    ``idmap`` is a user namespace file (e.g. ``/proc/PID/ns/user``).
    ``upperdir``/``workdir`` make the mount writable unless ``readonly``.
    ``dry_run`` checks everything and mounts nothing (``mount -f``).
    ``erofs_source`` ("auto", "file", "loop") and ``lower`` ("auto", "fd",
    "tmpdir", "legacy") force a way of mounting; "auto" picks the best the
    kernel has.  Raises :class:`ComposefsMountError` with a clear message.
    A record of the mount is written into ``record_dir`` ("": the default
    :data:`.mount_record.RECORD_DIR`, None: none); failing to write it never
    fails the mount (``result.record_error`` says why).  A symbolic link in
    ``target`` is refused unless ``follow_symlinks`` (see :func:`open_mount_point`).

    ``replace`` switches a composefs mount at ``target`` to this one without
    unmounting it first (see :class:`_Target`); ``result.replaced`` is its
    record.  The mount point's history (:mod:`.mount_history`, in
    ``history_dir``: "" the default, None none) notes the image, with ``ref``
    and ``store`` when the caller knows them; ``result.previous`` is what the
    mount point showed before the last move.
    """
    if erofs_source not in ("auto", "file", "loop") or lower not in ("auto", "fd", "tmpdir", "legacy"):
        raise ValueError("bad erofs_source/lower")
    result = MountResult()
    result.target = _show(target)
    if not has_cap_sys_admin():
        if os.geteuid() != 0:
            raise ComposefsMountError("must be run as root (euid is %d): mounting needs CAP_SYS_ADMIN"
                                      % os.geteuid(), errno.EPERM)
        raise ComposefsMountError("euid is 0 but CAP_SYS_ADMIN is missing: mounting needs it", errno.EPERM)
    dirs = [_show(d) for d in basedirs]
    if not dirs:
        raise ComposefsMountError("No object dirs specified: basedir= is required", errno.EINVAL)
    if (upperdir is None) != (workdir is None):
        raise ComposefsMountError("Both workdir and upperdir must be specified if used", errno.EINVAL)
    if digest is not None:
        verity = True

    image_fd = _open_image(image)
    idmap_fd: Optional[int] = None
    mount_point: Optional[_Target] = None
    try:
        flags = read_image_header(image_fd, image)
        mount_point = _Target(target, follow_symlinks, result.target, False)
        if replace:
            result.replaced = _replaced_record(target)
            mount_point.replacing = result.replaced is not None
            mount_point.exclusive = upperdir is not None or bool(result.replaced and result.replaced.get("upperdir"))
        for d in dirs:
            _check_dir(d, "basedir")
        if upperdir is not None:
            _check_dir(upperdir, "upperdir")
            _check_dir(workdir, "workdir")  # type: ignore[arg-type]
        if digest is not None:
            check_digest(image_fd, image, digest)
        verity_mode = ""
        if verity:
            for d in dirs:
                problem = verity_problem(d)
                if problem:
                    raise ComposefsMountError(
                        "verity requested but impossible for basedir %s: %s" % (d, problem), errno.EOPNOTSUPP)
            verity_mode = "require"
        elif tryverity:
            verity_mode = "try" if all(verity_problem(d) is None for d in dirs) else ""
        if idmap is not None:
            try:
                idmap_fd = os.open(idmap, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)  # never wait on a FIFO
            except OSError as exc:
                raise ComposefsMountError("Failed to open userns %s: %s" % (_show(idmap), exc.strerror),
                                          exc.errno or 0) from exc
        if dry_run:
            return result
        attr_flags = attr_set | (api.MOUNT_ATTR_RDONLY if readonly else 0)
        plan = _OverlayPlan(dirs, None if upperdir is None else _show(upperdir),
                            None if workdir is None else _show(workdir), verity_mode, attr_flags)
        try:
            _mount(image_fd, image, bool(flags & fmt.COMPOSEFS_FLAGS_HAS_ACL), idmap_fd, plan, mount_point,
                   erofs_source, lower, result)
        except api.MountError as exc:
            raise ComposefsMountError("Failed to mount composefs %s: %s" % (_show(image), exc),
                                      exc.errno) from exc
        if record_dir is not None or history_dir is not None:
            _record(image_fd, image, target, dirs, digest, verity_mode, plan, readonly, result, record_dir,
                    history_dir, ref, None if store is None else _show(os.path.abspath(store)))
        return result
    finally:
        os.close(image_fd)
        if idmap_fd is not None:
            os.close(idmap_fd)
        if mount_point is not None:
            mount_point.close()


def _open_image(image: PathArg) -> int:
    """Open the image: a regular file, never blocking (a FIFO or a device given as
    the image is refused, not waited on).  A symbolic link is followed, as by C."""
    try:
        fd = open_regular(image, shown="image %s" % _show(image), flags=READ_FLAGS & ~os.O_NOFOLLOW)
    except UnsafePathError as exc:
        raise ComposefsMountError(str(exc), errno.EINVAL) from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise ComposefsMountError("image %s does not exist" % _show(image), exc.errno) from exc
        raise ComposefsMountError("Failed to open %s: %s" % (_show(image), exc.strerror), exc.errno or 0) from exc
    os.set_blocking(fd, True)  # a regular file: O_NONBLOCK only guarded the open
    return fd


def _record(image_fd: int, image: PathArg, target: PathArg, dirs: List[str], digest: Optional[str],
            verity_mode: str, plan: _OverlayPlan, readonly: bool, result: MountResult, record_dir: Optional[str],
            history_dir: Optional[str], ref: Optional[str], store: Optional[str]) -> None:
    """Note which image is mounted (mountinfo cannot tell) in the mount record
    and the mount point's history: never fails the mount."""
    from . import mount_history, mount_record
    from .mountinfo import canonical

    image_path = _show(os.path.abspath(image))
    where = canonical(target)
    try:
        stamp = mount_history.image_stamp(os.fstat(image_fd))
        if digest is not None:
            image_digest = digest.lower()  # checked by the kernel's fs-verity above
        else:
            # The same unchanged image file again (a boot, a remount): hashing it would tell the same.
            known = None if history_dir is None else mount_history.known_digest(
                where, image_path, stamp, history_dir or mount_history.HISTORY_DIR)
            if known is not None:
                image_digest = known
            else:
                from .fsverity_digest import digest_fd

                image_digest = digest_fd(image_fd).hex()
    except (OSError, ComposefsError) as exc:
        result.record_error = "cannot compute the image digest: %s" % exc
        return
    if history_dir is not None:
        try:
            entry = mount_history.note_mount(
                where, image_path, image_digest, dirs, _REQUESTED_VERITY[verity_mode], digest=digest,
                upperdir=plan.upperdir, workdir=plan.workdir, ref=ref, store=store, replaced=result.replaced,
                directory=history_dir or mount_history.HISTORY_DIR, stamp=stamp)
            result.previous = entry.get("previous")
            ref = entry.get("ref")
        except (OSError, ComposefsError) as exc:
            result.record_error = "cannot write the mount history in %s: %s" % (
                history_dir or mount_history.HISTORY_DIR, getattr(exc, "strerror", None) or exc)
            result.previous = mount_history.previous_of(result.replaced)
    else:
        result.previous = mount_history.previous_of(result.replaced)
    if record_dir is None:
        return
    path, error = mount_record.record_mount(
        target, record_dir or mount_record.RECORD_DIR, image=image, image_digest=image_digest, basedirs=dirs,
        verity="require" if result.verity else "off", verity_requested=verity_mode or "off", digest=digest,
        upperdir=plan.upperdir, workdir=plan.workdir, readonly=readonly,
        options=format_options(dirs, digest, verity_mode == "require", verity_mode == "try", None,
                               plan.upperdir, plan.workdir, readonly),
        how={"erofs": result.erofs_source, "lower": result.lower, "method": result.method},
        ref=ref, previous=result.previous)
    result.record_path = path
    result.record_error = error or result.record_error


# The history keeps the verity mode as the mount module and the agent name it.
_REQUESTED_VERITY = {"require": "require", "try": "boot", "": "off"}


def _mount(image_fd: int, image: PathArg, has_acl: bool, idmap_fd: Optional[int], plan: _OverlayPlan,
           target: _Target, erofs_source: str, lower: str, result: MountResult) -> None:
    erofs_fd = _mount_erofs(image_fd, image, has_acl, idmap_fd, erofs_source, result)
    first: Optional[api.MountError] = None
    try:
        if lower in ("auto", "fd"):
            try:
                ovl_fd = _overlay_new_api(plan, erofs_fd, None, result)
            except api.MountError as exc:
                # EINVAL: lowerdir+ takes no fd here (before 6.13) or no
                # detached mount (before 6.15); EBADF: the same refusal as
                # measured on Debian trixie's 6.12; ENOSYS: no usable new API.
                if lower == "fd" or exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOSYS):
                    raise
                first = exc
            else:
                result.lower = "fd"
                target.attach(ovl_fd, result)
                return
        try:
            _with_tmpdir(erofs_fd, plan, target, lower, result)
        except api.MountError as exc:
            # The same refusal by an older interface: the first answer came
            # from the newest one, with the kernel's own explanation.
            if first is not None and exc.errno == first.errno:
                raise first from None
            raise
    finally:
        os.close(erofs_fd)


def _with_tmpdir(erofs_fd: int, plan: _OverlayPlan, target: _Target, lower: str, result: MountResult) -> None:
    """Older kernels: the EROFS mount must have a path while the overlay is made."""
    tmpdir = _private_tmpdir()
    attached = False
    try:
        api.move_mount(erofs_fd, tmpdir)
        attached = True
        if lower in ("auto", "tmpdir"):
            try:
                ovl_fd = _overlay_new_api(plan, None, tmpdir, result)
            except api.MountError as exc:
                if lower == "tmpdir" or exc.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                lower = "legacy"
            else:
                result.lower = "tmpdir"
                target.attach(ovl_fd, result)
                return
        _overlay_legacy(plan, tmpdir, target, result)
    finally:
        if attached:
            try:
                api.umount(tmpdir, api.MNT_DETACH)
            except api.MountError:
                pass
        try:
            os.rmdir(tmpdir)
        except OSError:
            pass
