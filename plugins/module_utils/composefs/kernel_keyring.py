# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The kernel's ``.fs-verity`` keyring: the certificates fs-verity built-in signatures are checked against.

What ``keyctl padd asymmetric '' %keyring:.fs-verity < cert.der`` does,
without keyutils: the keyring is found in ``/proc/keys`` (it is linked to no
session keyring, so a search cannot find it), and each X.509 certificate is
added with the ``add_key`` system call as an ``asymmetric`` key; the kernel
parses it and names it after its subject.  The keyring lives in memory only:
the certificates are loaded at every boot (``composefs-fsverity-keys load``
from ``composefs-fleet-fsverity-keys.service``), before the composefs mounts.
Adding a certificate already there replaces it (asymmetric keys have no
update operation), so loading twice is harmless.

Only root (with CAP_SYS_ADMIN) may write the keyring.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Iterable, List, Optional, Tuple, Union

from .errors import VeritySignatureError
from .fsverity_sig import cert_der, pem_certificates
from .safe_dirs import UnsafePathError, open_regular

__all__ = ["KEYRING", "add_certificate", "certificates_of", "fsverity_keyring_id", "keyring_keys", "load_certificates"]

KEYRING = ".fs-verity"
_PROC_KEYS = "/proc/keys"
_MAX_CERT_FILE = 1 << 20

# System call numbers of add_key and keyctl (glibc has no wrapper; libkeyutils may be missing).
_SYSCALLS = {
    "x86_64": (248, 250),
    "i386": (286, 288), "i486": (286, 288), "i586": (286, 288), "i686": (286, 288),
    "aarch64": (217, 219), "riscv64": (217, 219), "loongarch64": (217, 219),
    "armv7l": (309, 311), "armv6l": (309, 311),
    "ppc64le": (269, 271), "ppc64": (269, 271),
    "s390x": (278, 280),
}
_KEYCTL_DESCRIBE = 6
_KEYCTL_READ = 11

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def _syscall(index: int, *args: Any) -> int:
    import ctypes  # only for the keyring: kept out of every CLI start

    machine = os.uname().machine
    numbers = _SYSCALLS.get(machine)
    if numbers is None:
        raise VeritySignatureError("the kernel keyring calls are not known for this architecture (%s)" % machine)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(numbers[index]), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def fsverity_keyring_id() -> int:
    """The serial number of the ``.fs-verity`` keyring, from ``/proc/keys``.

    Missing: the kernel has no ``CONFIG_FS_VERITY_BUILTIN_SIGNATURES`` (or
    the caller may not view the keyring: it belongs to root).
    """
    try:
        with open(_PROC_KEYS, "rb") as keys:
            lines = keys.read().splitlines()
    except OSError as exc:
        raise VeritySignatureError("cannot read %s (a kernel without CONFIG_KEYS?): %s"
                                   % (_PROC_KEYS, exc.strerror or exc)) from None
    for line in lines:
        # ID FLAGS USAGE TIMEOUT PERM UID GID TYPE DESCRIPTION: SUMMARY
        fields = line.split(None, 8)
        if len(fields) == 9 and fields[7] == b"keyring" and fields[8].split(b":")[0] == KEYRING.encode():
            return int(fields[0], 16)
    raise VeritySignatureError("the kernel has no %s keyring: it is built without CONFIG_FS_VERITY_BUILTIN_SIGNATURES, "
                               "or this user may not see it (it belongs to root)" % KEYRING)


def add_certificate(der: bytes, keyring: Optional[int] = None, what: str = "certificate") -> int:
    """Add one X.509 certificate (DER, or PEM) to the ``.fs-verity`` keyring; its key serial number.

    ``what`` names the certificate in errors (its file).
    """
    import ctypes

    data = cert_der(der)
    ring = fsverity_keyring_id() if keyring is None else keyring
    buf = ctypes.create_string_buffer(data, len(data))
    try:
        return _syscall(0, ctypes.c_char_p(b"asymmetric"), ctypes.c_char_p(b""), buf,
                        ctypes.c_size_t(len(data)), ctypes.c_int32(ring))
    except OSError as exc:
        reasons = {
            errno.EACCES: "not permitted (only root may add to the %s keyring)" % KEYRING,
            errno.EPERM: "not permitted (only root may add to the %s keyring)" % KEYRING,
            errno.EBADMSG: "the kernel cannot parse it as an X.509 certificate",
            errno.EKEYREJECTED: "the kernel rejects it (a key type or algorithm it does not support?)",
            errno.ENOPKG: "the kernel lacks the certificate's public key or hash algorithm",
            errno.EDQUOT: "the keyring quota is exhausted",
        }
        reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
        raise VeritySignatureError("%s: cannot add it to the kernel's %s keyring: %s (errno %s)"
                                   % (what, KEYRING, reason, exc.errno)) from None


def certificates_of(data: bytes, what: str) -> List[bytes]:
    """The DER certificates in a file's bytes: one DER certificate, or every PEM CERTIFICATE block."""
    try:
        found = pem_certificates(data) if b"-----BEGIN" in data else [cert_der(data)]
    except VeritySignatureError as exc:
        raise VeritySignatureError("%s: not a DER or PEM X.509 certificate (%s)" % (what, exc)) from None
    if not found:
        raise VeritySignatureError("%s: PEM without a '-----BEGIN CERTIFICATE-----' block" % what)
    return found


def _read_file(path: PathArg, shown: str) -> bytes:
    try:
        fd = open_regular(path, None, shown)
    except UnsafePathError as exc:
        raise VeritySignatureError(str(exc)) from None
    try:
        data = os.read(fd, _MAX_CERT_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_CERT_FILE:
        raise VeritySignatureError("%s: larger than %d bytes, not a certificate file" % (shown, _MAX_CERT_FILE))
    return data


def _certificate_files(paths: Iterable[PathArg]) -> List[Tuple[str, bytes]]:
    """(file name, bytes) of every certificate file: a path given, or every regular non-dot file of a directory."""
    files: List[Tuple[str, bytes]] = []
    for path in paths:
        shown = os.fsdecode(path)
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                for name in sorted(os.listdir(path)):
                    full = os.path.join(os.fsdecode(path), os.fsdecode(name))
                    if name.startswith(".") or not stat.S_ISREG(os.lstat(full).st_mode):
                        continue
                    files.append((full, _read_file(full, full)))
            else:
                files.append((shown, _read_file(path, shown)))
        except OSError as exc:
            raise VeritySignatureError("%s: %s" % (getattr(exc, "filename", None) or shown, exc.strerror or exc)) from None
    return files


def load_certificates(paths: Iterable[PathArg]) -> List[int]:
    """Load the certificates of ``paths`` (files: DER or PEM; directories: their regular
    non-dot files) into the ``.fs-verity`` keyring; the key serial numbers.

    Every file is read and parsed first, so a bad one stops the load before
    anything is added; then the kernel checks each certificate itself.
    """
    certs: List[Tuple[str, bytes]] = []
    for shown, data in _certificate_files(paths):
        certs.extend((shown, der) for der in certificates_of(data, shown))
    if not certs:
        return []
    ring = fsverity_keyring_id()
    return [add_certificate(der, ring, shown) for shown, der in certs]


def keyring_keys(keyring: Optional[int] = None) -> List[Tuple[int, str]]:
    """(serial, description) of each key in the ``.fs-verity`` keyring (``keyctl show``)."""
    import ctypes
    import struct

    ring = fsverity_keyring_id() if keyring is None else keyring
    buf = ctypes.create_string_buffer(4096)
    try:
        size = _syscall(1, ctypes.c_int(_KEYCTL_READ), ctypes.c_int32(ring), buf, ctypes.c_size_t(len(buf)))
    except OSError as exc:
        raise VeritySignatureError("cannot list the kernel's %s keyring: %s" % (KEYRING, exc.strerror or exc)) from None
    serials = struct.unpack_from("=%di" % (min(size, len(buf)) // 4), buf.raw)
    keys = []
    for serial in serials:
        desc = ctypes.create_string_buffer(1024)
        try:
            got = _syscall(1, ctypes.c_int(_KEYCTL_DESCRIBE), ctypes.c_int32(serial), desc, ctypes.c_size_t(len(desc)))
        except OSError:
            continue  # gone meanwhile, or not viewable
        # "type;uid;gid;perm;description"
        text = desc.raw[:max(got - 1, 0)].decode("utf-8", "replace")
        keys.append((serial, text.split(";", 4)[-1]))
    return keys
