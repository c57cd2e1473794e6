# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity in the kernel: the ioctls and what their errors mean (the
userspace digest is :mod:`.fsverity_digest`).

:func:`enable_verity`, :func:`measure_verity` and :func:`verity_enabled`
raise :class:`VerityNotEnabled` / :class:`VerityNotSupported` with a reason
(kernel config, filesystem type, errno).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import stat
import struct
from typing import List, Optional, Tuple

from .errors import VerityError, VerityNotEnabled, VerityNotSupported
from .fsverity_digest import ALGORITHMS, MAX_DIGEST_SIZE, check_params

__all__ = [
    "FS_IOC_ENABLE_VERITY",
    "FS_IOC_GETFLAGS",
    "FS_IOC_MEASURE_VERITY",
    "enable_verity",
    "measure_verity",
    "verity_enabled",
]

_ALGORITHM_NAMES = {alg_id: name for name, (alg_id, _size, _block) in ALGORITHMS.items()}


def _ioc_layout() -> Tuple[int, int, int, int]:
    """(size bits, _IOC_NONE, _IOC_READ, _IOC_WRITE) of this architecture."""
    machine = os.uname().machine.lower()
    # These use 13 size bits and 3 direction bits (arch/*/include/uapi/asm/ioctl.h);
    # everything else uses asm-generic/ioctl.h.
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return 13, 1, 2, 4
    return 14, 0, 2, 1


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    size_bits = _ioc_layout()[0]
    # nr: bits 0-7, type: 8-15, size: 16 up, direction above the size.
    return (direction << (16 + size_bits)) | (size << 16) | (ord(kind) << 8) | nr


def _iow(kind: str, nr: int, size: int) -> int:
    return _ioc(_ioc_layout()[3], kind, nr, size)


def _ior(kind: str, nr: int, size: int) -> int:
    return _ioc(_ioc_layout()[2], kind, nr, size)


def _iowr(kind: str, nr: int, size: int) -> int:
    layout = _ioc_layout()
    return _ioc(layout[2] | layout[3], kind, nr, size)


# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size,
# salt_ptr, sig_size, reserved, sig_ptr, reserved[11] (all native order).
_ENABLE_ARG = struct.Struct("=IIIIQIIQ88x")
if _ENABLE_ARG.size != 128:
    raise AssertionError("_ENABLE_ARG.size == 128")
# struct fsverity_digest: digest_algorithm u16, digest_size u16, digest[].
_DIGEST_HEADER = struct.Struct("=HH")

FS_IOC_ENABLE_VERITY = _iow("f", 133, _ENABLE_ARG.size)  # 0x40806685 on x86
FS_IOC_MEASURE_VERITY = _iowr("f", 134, _DIGEST_HEADER.size)  # 0xc0046686 on x86
# Declared with sizeof(long) although the kernel reads and writes an int.
FS_IOC_GETFLAGS = _ior("f", 1, struct.calcsize("l"))  # 0x80086601 on x86_64
FS_VERITY_FL = 0x00100000


def _errno_text(err: int) -> str:
    # errorcode maps 95 to the alias ENOTSUP; the ioctl docs say EOPNOTSUPP.
    name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, "?")
    return "errno %d, %s" % (err, name)


_kernel_config_cache: List[Optional[bool]] = []


def _kernel_has_fsverity() -> Optional[bool]:
    """CONFIG_FS_VERITY of the running kernel, None when the config is not readable."""
    if _kernel_config_cache:
        return _kernel_config_cache[0]
    result: Optional[bool] = None
    candidates = [("/proc/config.gz", True), ("/boot/config-" + os.uname().release, False)]
    for path, compressed in candidates:
        try:
            import gzip  # rarely needed; kept out of every CLI start

            opener = gzip.open if compressed else open
            with opener(path, "rt", errors="replace") as config:  # type: ignore[operator]
                for line in config:
                    if line.startswith("CONFIG_FS_VERITY="):
                        result = True
                        break
                    if line.startswith("# CONFIG_FS_VERITY is not set"):
                        result = False
                        break
        except OSError:
            continue
        if result is not None:
            break
    _kernel_config_cache.append(result)
    return result


def _fs_type(fd: int) -> Optional[str]:
    """Filesystem type holding ``fd`` (from /proc/self/mountinfo), if found."""
    try:
        st = os.fstat(fd)
        wanted = "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and "-" in fields:
                    rest = fields[fields.index("-") + 1 :]
                    if rest:
                        return rest[0]
    except OSError:
        pass
    return None


def _not_supported(fd: int, err: int, operation: str) -> VerityNotSupported:
    fstype = _fs_type(fd) or "unknown"
    if _kernel_has_fsverity() is False:
        reason = "the running kernel is built without CONFIG_FS_VERITY"
    elif err == errno.ENOTTY:
        reason = "the filesystem (%s) does not implement fs-verity, or the kernel lacks it" % fstype
    else:
        reason = (
            "the filesystem (%s) has no fs-verity support enabled (ext4/f2fs need the "
            "'verity' feature, e.g. tune2fs -O verity), or the kernel lacks it" % fstype
        )
    return VerityNotSupported(
        "fs-verity is not supported: %s on %s: %s (%s)" % (operation, fstype, reason, _errno_text(err))
    )


def verity_enabled(fd: int) -> bool:
    """Whether the file has fs-verity; False wherever the question cannot be asked."""
    buf = bytearray(struct.calcsize("l"))
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    except OSError:
        # No FS_IOC_GETFLAGS on this filesystem: it cannot have verity files.
        return False
    return bool(struct.unpack_from("=I", buf)[0] & FS_VERITY_FL)


def measure_verity(fd: int) -> Tuple[str, bytes]:
    """Kernel-reported (algorithm name, digest) of a verity file."""
    buf = bytearray(_DIGEST_HEADER.pack(0, MAX_DIGEST_SIZE) + bytes(MAX_DIGEST_SIZE))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as exc:
        err = exc.errno or 0
        if err == errno.ENODATA:
            raise VerityNotEnabled(
                "fs-verity is not enabled on this file (%s)" % _errno_text(err)
            ) from exc
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise _not_supported(fd, err, "measure") from exc
        raise VerityError("FS_IOC_MEASURE_VERITY failed: %s (%s)" % (exc.strerror, _errno_text(err))) from exc
    alg_id, size = _DIGEST_HEADER.unpack_from(buf)
    name = _ALGORITHM_NAMES.get(alg_id, "unknown-%d" % alg_id)
    return name, bytes(buf[_DIGEST_HEADER.size : _DIGEST_HEADER.size + size])


_ENABLE_ERRORS = {
    errno.ETXTBSY: "file is open for writing (close all writable descriptors first)",
    errno.EPERM: "not permitted (append-only or immutable file, or missing capability)",
    errno.EACCES: "no write permission on the file",
    errno.EROFS: "read-only filesystem",
    errno.EFBIG: "file too large for fs-verity on this filesystem",
    errno.ENOSPC: "no space left for the Merkle tree",
    errno.EMSGSIZE: "salt or signature too large",
    errno.EINTR: "interrupted",
}


def enable_verity(fd: int, algorithm: str = "sha256", block_size: int = 4096, salt: bytes = b"") -> bool:
    """Enable fs-verity on a regular file opened read-only.

    Returns True when verity was enabled now and False when the file already
    had it (EEXIST) -- callers storing content-addressed objects treat both as
    success, but the existing parameters are not compared here; use
    :func:`measure_verity` for that.
    """
    salt = bytes(salt)
    check_params(algorithm, block_size, salt)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise VerityError("fs-verity can only be enabled on regular files")
    # The kernel reads the salt through a user pointer: array.buffer_info()
    # gives the address of a buffer we keep alive across the call.
    salt_buf = array.array("B", salt or b"\0")
    arg = _ENABLE_ARG.pack(
        1,
        ALGORITHMS[algorithm][0],
        block_size,
        len(salt),
        salt_buf.buffer_info()[0] if salt else 0,
        0,
        0,
        0,
    )
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as exc:
        err = exc.errno or 0
        if err == errno.EEXIST:
            return False
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise _not_supported(fd, err, "enable") from exc
        if err == errno.EINVAL:
            # Parameters were validated above, so the filesystem refuses them
            # (ext4 before Linux 6.3: block size must equal the page size).
            raise VerityNotSupported(
                "fs-verity is not supported with block size %d and %s on this filesystem (%s) (%s)"
                % (block_size, algorithm, _fs_type(fd) or "unknown", _errno_text(err))
            ) from exc
        reason = _ENABLE_ERRORS.get(err, exc.strerror or "failed")
        raise VerityError("FS_IOC_ENABLE_VERITY failed: %s (%s)" % (reason, _errno_text(err))) from exc
    return True

