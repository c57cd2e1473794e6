# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity in the kernel: the ioctls, what their errors mean, and the one way
the project measures and enables fs-verity on a file.

The raw calls (:func:`enable_verity`, which also takes a built-in signature,
:func:`measure_verity`, :func:`read_signature`, :func:`verity_enabled`) raise :class:`VerityNotEnabled` / :class:`VerityNotSupported`
with a reason (kernel config, filesystem type, errno).  On top of them, every
caller (store, objects, verity_files, fsck, the agent) uses the same three
helpers, so that they agree on what "no fs-verity" means and on what a
mismatch is:

- :func:`measure_or_none`: the kernel's digest, or None when the file has no
  fs-verity or its filesystem cannot have it;
- :func:`enable_then_check`: enable, then check the kernel measures the
  expected digest (an unsupported filesystem is returned as a reason, asked
  once per filesystem);
- :func:`digest_measured_or_computed`: the kernel's digest where there is one,
  else the userspace one from the same descriptor.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import stat
import struct
from typing import Callable, Dict, List, Optional, Tuple, Union

from .errors import VerityError, VerityMismatch, VerityNotEnabled, VerityNotSupported, VeritySignatureError
from .fsverity_digest import ALGORITHMS, MAX_DIGEST_SIZE, check_params, digest_fd

__all__ = [
    "FS_IOC_ENABLE_VERITY",
    "FS_IOC_GETFLAGS",
    "FS_IOC_MEASURE_VERITY",
    "FS_IOC_READ_VERITY_METADATA",
    "digest_measured_or_computed",
    "enable_then_check",
    "enable_then_check_path",
    "enable_verity",
    "measure_or_none",
    "measure_verity",
    "read_signature",
    "unsupported_devs",
    "verity_enabled",
    "verity_problem",
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
# struct fsverity_read_metadata_arg: metadata_type, offset, length, buf_ptr, reserved (u64 each).
_READ_METADATA_ARG = struct.Struct("=QQQQQ")
FS_IOC_READ_VERITY_METADATA = _iowr("f", 135, _READ_METADATA_ARG.size)  # 0xc0286687 on x86
FS_VERITY_METADATA_TYPE_SIGNATURE = 3
# FS_VERITY_MAX_SIGNATURE_SIZE: the kernel keeps no larger built-in signature.
_MAX_SIGNATURE_SIZE = 16128
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
    """Filesystem type holding ``fd`` (from mountinfo), if found."""
    from .mountinfo import read_mountinfo

    try:
        st = os.fstat(fd)
        entries = read_mountinfo()
    except (OSError, ValueError):
        return None
    wanted = "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
    for entry in entries:
        if entry.dev == wanted:
            return entry.fstype
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


def verity_problem(basedir: Union[str, bytes, "os.PathLike[str]"]) -> Optional[str]:
    """Why objects under ``basedir`` can not have fs-verity (None: they can)."""
    try:
        fd = os.open(basedir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return "cannot open %s: %s" % (os.fsdecode(os.fspath(basedir)), exc.strerror)
    try:
        measure_verity(fd)
    except VerityNotEnabled:
        return None  # the filesystem answers fs-verity questions: it has it
    except VerityNotSupported as exc:
        return str(exc)
    except VerityError:
        return None
    finally:
        os.close(fd)
    return None


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

# What the kernel answers for a built-in signature it does not accept (fs/verity/signature.c).
_SIGNATURE_ERRORS = {
    errno.ENOKEY: "the signing certificate is not in the kernel's .fs-verity keyring, or the keyring is empty "
                  "(load it: composefs-fsverity-keys load CERT)",
    errno.EKEYREJECTED: "the signature does not verify against the certificate in the .fs-verity keyring "
                        "(signed for another digest or with another key)",
    errno.EBADMSG: "the signature is not a valid PKCS#7 message",
}


def enable_verity(fd: int, algorithm: str = "sha256", block_size: int = 4096, salt: bytes = b"",
                  signature: Optional[bytes] = None) -> bool:
    """Enable fs-verity on a regular file opened read-only.

    Returns True when verity was enabled now and False when the file already
    had it (EEXIST) -- callers storing content-addressed objects treat both as
    success, but the existing parameters are not compared here; use
    :func:`measure_verity` for that.

    ``signature``: a built-in signature (PKCS#7 DER, :mod:`.fsverity_sig`)
    the kernel checks now against its ``.fs-verity`` keyring, and again
    whenever it loads the file's verity data; a refusal raises
    :class:`VeritySignatureError`.  A file that already had verity
    (EEXIST) keeps what it had: :func:`read_signature` tells.
    """
    salt = bytes(salt)
    sig = bytes(signature or b"")
    check_params(algorithm, block_size, salt)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise VerityError("fs-verity can only be enabled on regular files")
    # The kernel reads the salt through a user pointer: array.buffer_info()
    # gives the address of a buffer we keep alive across the call.
    salt_buf = array.array("B", salt or b"\0")
    sig_buf = array.array("B", sig or b"\0")
    arg = _ENABLE_ARG.pack(
        1,
        ALGORITHMS[algorithm][0],
        block_size,
        len(salt),
        salt_buf.buffer_info()[0] if salt else 0,
        len(sig),
        0,
        sig_buf.buffer_info()[0] if sig else 0,
    )
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as exc:
        err = exc.errno or 0
        if err == errno.EEXIST:
            return False
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise _not_supported(fd, err, "enable") from exc
        if sig and err in _SIGNATURE_ERRORS:
            raise VeritySignatureError("the kernel refuses the fs-verity signature: %s (%s)"
                                       % (_SIGNATURE_ERRORS[err], _errno_text(err))) from exc
        if sig and err == errno.EMSGSIZE:
            raise VeritySignatureError("the fs-verity signature is %d bytes, the kernel takes at most %d (%s)"
                                       % (len(sig), _MAX_SIGNATURE_SIZE, _errno_text(err))) from exc
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


def read_signature(fd: int) -> Optional[bytes]:
    """The built-in signature the kernel holds for a verity file (FS_IOC_READ_VERITY_METADATA,
    Linux 5.12), None when the file was enabled without one.

    :class:`VerityNotEnabled` when the file has no fs-verity,
    :class:`VerityNotSupported` where the kernel or filesystem cannot answer.
    """
    buf = array.array("B", bytes(_MAX_SIGNATURE_SIZE))
    arg = bytearray(_READ_METADATA_ARG.pack(FS_VERITY_METADATA_TYPE_SIGNATURE, 0, len(buf), buf.buffer_info()[0], 0))
    try:
        # With a mutable argument, ioctl() returns the call's result: the byte count.
        size = fcntl.ioctl(fd, FS_IOC_READ_VERITY_METADATA, arg, True)
    except OSError as exc:
        err = exc.errno or 0
        if err == errno.ENODATA:
            if not verity_enabled(fd):
                raise VerityNotEnabled("fs-verity is not enabled on this file (%s)" % _errno_text(err)) from exc
            return None
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise _not_supported(fd, err, "read signature") from exc
        raise VerityError("FS_IOC_READ_VERITY_METADATA failed: %s (%s)" % (exc.strerror, _errno_text(err))) from exc
    return buf.tobytes()[:size]


# --- the helpers every caller uses -------------------------------------------

# st_dev -> why that filesystem has no fs-verity.  Asking again for every
# object of a store would only repeat the answer.  Long-running callers pass
# their own dict and empty it now and then: an unmounted filesystem's device
# number is given to the next one mounted.
unsupported_devs: Dict[int, str] = {}

PathArg = Union[str, bytes]


def measure_or_none(fd: int, st: Optional[os.stat_result] = None,
                    unsupported: Optional[Dict[int, str]] = None) -> Optional[Tuple[str, bytes]]:
    """The kernel's (algorithm, digest) of the open file ``fd``; None when it
    has no fs-verity or its filesystem cannot have it (remembered per
    filesystem in ``unsupported``).  Other failures raise :class:`VerityError`.

    ``st`` is ``fd``'s fstat when the caller has it already.
    """
    devs = unsupported_devs if unsupported is None else unsupported
    if st is None:
        st = os.fstat(fd)
    if st.st_dev in devs:
        return None
    try:
        return measure_verity(fd)
    except VerityNotEnabled:
        return None
    except VerityNotSupported as exc:
        # A device node or FIFO answers for its driver, not for the filesystem.
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            devs[st.st_dev] = str(exc)
        return None


def enable_then_check(fd: int, digest: bytes, name: str, st: Optional[os.stat_result] = None,
                      unsupported: Optional[Dict[int, str]] = None, signature: Optional[bytes] = None) -> Optional[str]:
    """Enable fs-verity (sha256, 4096-byte blocks, no salt) on ``fd`` and check
    that the kernel then measures ``digest``.

    ``fd`` must be a regular file opened read-only with no writer left (the
    kernel refuses otherwise).  Returns None when the file has fs-verity with
    ``digest`` -- enabled now or already before.  Returns the reason when its
    filesystem cannot have fs-verity (not an error: the content is still what
    was asked for; remembered per filesystem in ``unsupported``, so a store's
    objects ask once).  Raises :class:`VerityMismatch` naming ``name`` when the
    kernel measures anything else (fs-verity is then on, for that content), and
    :class:`VerityError` naming ``name`` when enabling fails otherwise.

    ``signature`` goes to FS_IOC_ENABLE_VERITY (:func:`enable_verity`); a
    refusal is :class:`VeritySignatureError` naming ``name``.
    """
    devs = unsupported_devs if unsupported is None else unsupported
    if st is None:
        st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise VerityError("%s: fs-verity can only be enabled on regular files" % name)
    problem = devs.get(st.st_dev)
    if problem is not None:
        return problem
    try:
        enable_verity(fd, signature=signature)
        algorithm, measured = measure_verity(fd)
    except VerityNotSupported as exc:
        devs[st.st_dev] = str(exc)
        return str(exc)
    except VeritySignatureError as exc:
        raise VeritySignatureError("%s: %s" % (name, exc)) from exc
    except VerityError as exc:
        raise VerityError("%s: %s" % (name, exc)) from exc
    if algorithm != "sha256" or measured != digest:
        raise VerityMismatch("%s: fs-verity %s digest %s (measured by the kernel) does not match %s"
                             % (name, algorithm, measured.hex(), digest.hex()), algorithm, measured)
    return None


def enable_then_check_path(path: PathArg, digest: bytes, dir_fd: Optional[int] = None,
                           unsupported: Optional[Dict[int, str]] = None) -> Optional[str]:
    """:func:`enable_then_check` of the file at ``path`` (relative to ``dir_fd``),
    opened read-only without following a symlink or blocking."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    fd = os.open(path, flags) if dir_fd is None else os.open(path, flags, dir_fd=dir_fd)
    try:
        return enable_then_check(fd, digest, os.fsdecode(path), unsupported=unsupported)
    finally:
        os.close(fd)


def digest_measured_or_computed(fd: int, st: Optional[os.stat_result] = None,
                                unsupported: Optional[Dict[int, str]] = None,
                                compute: Optional[Callable[[int], bytes]] = None) -> Tuple[bytes, bool]:
    """(sha256 fs-verity digest, measured by the kernel) of an open regular file.

    The kernel's digest when the file has sha256 fs-verity, else the one
    computed in userspace from the same ``fd`` by ``compute`` (default
    :func:`.fsverity_digest.digest_fd`).  Errors other than "no fs-verity
    here" raise, as in :func:`measure_or_none`.
    """
    found = measure_or_none(fd, st, unsupported)
    if found is not None and found[0] == "sha256":
        return found[1], True
    return (digest_fd(fd) if compute is None else compute(fd)), False
