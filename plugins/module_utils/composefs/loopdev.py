# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Read-only, auto-clearing loop devices, for kernels without file-backed EROFS.

Autoclear makes the kernel detach the device as soon as its last user goes
(the erofs superblock, or our own descriptor if the mount fails), so nothing
is left behind whatever happens after set-up.  ``LOOP_CONFIGURE`` (Linux 5.8)
does it atomically; the ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` fallback has
a short window without autoclear, closed by ``LOOP_CLR_FD`` on any error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
# typing itself costs ~20 ms of start-up (re, functools...): imported for type checkers only.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Tuple

from .errors import ComposefsError

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64

# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64),
# number, encrypt_type, encrypt_key_size, flags (u32), file_name[64],
# crypt_name[64], encrypt_key[32], init[2] (u64).
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s16x")
if _LOOP_INFO64.size != 232:
    raise AssertionError("_LOOP_INFO64.size == 232")
# struct loop_config: fd, block_size (u32), info, reserved[8] (u64).
_LOOP_CONFIG = struct.Struct("=II232s64x")
if _LOOP_CONFIG.size != 304:
    raise AssertionError("_LOOP_CONFIG.size == 304")

# Same block size as the EROFS images composefs writes.
BLOCK_SIZE = 4096
_ATTEMPTS = 16


class LoopError(ComposefsError):
    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


def _info(flags: int, name: bytes) -> bytes:
    return _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, name[: LO_NAME_SIZE - 1], b"", b"")


def _free_device() -> str:
    try:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise LoopError("cannot open /dev/loop-control: %s" % exc.strerror, exc.errno or 0) from exc
    try:
        number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    except OSError as exc:
        raise LoopError("no free loop device (LOOP_CTL_GET_FREE): %s" % exc.strerror, exc.errno or 0) from exc
    finally:
        os.close(ctl)
    return "/dev/loop%d" % number


def _configure(loop_fd: int, backing_fd: int, flags: int, name: bytes) -> None:
    config = bytearray(_LOOP_CONFIG.pack(backing_fd, BLOCK_SIZE, _info(flags, name)))
    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)


def _set_fd_and_status(loop_fd: int, backing_fd: int, flags: int, name: bytes) -> None:
    # A backing fd opened read-only makes the device read-only by itself.
    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing_fd)
    try:
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, bytearray(_info(flags & ~LO_FLAGS_READ_ONLY, name)))
    except OSError:
        try:
            fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
        except OSError:
            pass
        raise


def attach_readonly(backing_fd: int, name: str = "", direct_io: bool = True,
                    use_configure: bool = True) -> Tuple[int, str]:
    """Bind ``backing_fd`` to a free loop device: (open loop fd, device path).

    The device is read-only and auto-clears when the returned fd and every
    mount of it are gone.  ``use_configure=False`` forces the old two-step
    ioctls (tests use it; it is also taken when LOOP_CONFIGURE is missing).
    """
    flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    raw_name = os.fsencode(name)
    last = 0
    for _attempt in range(_ATTEMPTS):
        path = _free_device()
        try:
            loop_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the device node is created asynchronously
                last = exc.errno
                continue
            raise LoopError("cannot open %s: %s" % (path, exc.strerror), exc.errno or 0) from exc
        try:
            if use_configure:
                try:
                    _configure(loop_fd, backing_fd, flags, raw_name)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise
                    use_configure = False  # Linux < 5.8
                    _set_fd_and_status(loop_fd, backing_fd, flags, raw_name)
            else:
                _set_fd_and_status(loop_fd, backing_fd, flags, raw_name)
        except OSError as exc:
            os.close(loop_fd)
            if exc.errno == errno.EBUSY:  # another process took the device first
                last = exc.errno
                continue
            raise LoopError("cannot set up loop device %s: %s" % (path, exc.strerror), exc.errno or 0) from exc
        return loop_fd, path
    raise LoopError("no loop device could be set up after %d attempts (%s)"
                    % (_ATTEMPTS, os.strerror(last) if last else "busy"), last)


def bound_devices() -> dict:
    """{"/dev/loopN": backing file} of every bound loop device (for checks and tests)."""
    result = {}
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return result
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open("/sys/block/%s/loop/backing_file" % name, "rb") as f:
                result["/dev/" + name] = os.fsdecode(f.read().rstrip(b"\n"))
        except OSError:
            continue
    return result
