# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""``images/<digest>.sig``: the fs-verity built-in signature (PKCS#7 DER) of a store image.

The file is what ``fsverity sign`` writes for ``images/<digest>``
(:func:`.fsverity_sig.pkcs7_sign`).  It sits next to its image so that a
served store serves it; a node passes it to ``FS_IOC_ENABLE_VERITY`` when it
writes the image (:meth:`.store.Store.write_image`), where the kernel checks it
against its ``.fs-verity`` keyring.  gc removes it with its image; fsck checks
its structure and that it is the signature the kernel holds for the image.
Read and written through ``images/`` opened without following links.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from . import fsverity_digest, fsverity_ioctl
from .atomic_file import write_atomic_at
from .errors import StoreError, VerityNotEnabled, VerityNotSupported, VeritySignatureError
from .fsverity_sig import MAX_SIGNATURE_SIZE, check_signature_der
from .safe_dirs import UnsafePathError, open_regular
from .store import IMAGES, Store
from .store_names import check_digest_hex, is_hex_name

__all__ = [
    "SIG_SUFFIX",
    "ensure_image_signature",
    "image_of_sig_name",
    "kernel_signature_missing",
    "read_image_signature",
    "sig_name",
    "write_image_signature",
]

SIG_SUFFIX = b".sig"


def sig_name(hexdigest: str) -> bytes:
    """``<digest>.sig``, the name in ``images/`` of the signature of ``images/<digest>``."""
    return check_digest_hex(hexdigest).encode("ascii") + SIG_SUFFIX


def image_of_sig_name(name: Union[str, bytes]) -> Optional[str]:
    """The image digest a name in ``images/`` is the signature of, None if it is no signature's name."""
    raw = os.fsencode(name)
    if not raw.endswith(SIG_SUFFIX) or not is_hex_name(raw[:-len(SIG_SUFFIX)]):
        return None
    return raw[:-len(SIG_SUFFIX)].decode("ascii")


def write_image_signature(store: Store, hexdigest: str, der: bytes) -> bool:
    """Write ``images/<hexdigest>.sig`` atomically (temp file, fsync, rename); False when it held these bytes already.

    Refused (:class:`.errors.VeritySignatureError`): anything that is not a
    PKCS#7 SignedData of at most the kernel's size limit.  The image itself
    need not be in this store (a signing host may sign before it adds).
    """
    der = bytes(der)
    shown = "images/%s" % os.fsdecode(sig_name(hexdigest))
    check_signature_der(der, shown)
    if read_image_signature(store, hexdigest) == der:
        return False
    write_atomic_at(store.dir_fd(IMAGES), sig_name(hexdigest), der, mode=0o644)
    return True


def read_image_signature(store: Store, hexdigest: str) -> Optional[bytes]:
    """The bytes of ``images/<hexdigest>.sig``, None when there is none.

    Anything but a regular file there, or a file larger than a signature can
    be, is a :class:`.errors.StoreError` (fsck --repair moves it away).
    """
    name = sig_name(hexdigest)
    shown = "images/%s" % os.fsdecode(name)
    try:
        fd = open_regular(name, store.dir_fd(IMAGES), shown)
    except FileNotFoundError:
        return None
    except UnsafePathError as exc:
        raise StoreError("%s: run 'fsck --repair'" % exc) from None
    data = b""
    try:
        while len(data) <= MAX_SIGNATURE_SIZE:
            more = os.read(fd, MAX_SIGNATURE_SIZE + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) > MAX_SIGNATURE_SIZE:
        raise VeritySignatureError("%s: larger than the kernel's limit for fs-verity signatures (%d bytes)"
                                   % (shown, MAX_SIGNATURE_SIZE))
    return data


def kernel_signature_missing(store: Store, hexdigest: str, signature: bytes) -> bool:
    """Does ``images/<hexdigest>`` have fs-verity without ``signature`` in the kernel (none, or another)?

    False where the kernel cannot say (no fs-verity on the file or its
    filesystem, a kernel before 5.12): there is no signature to give it then.
    """
    fd = store.open_image(hexdigest)
    try:
        if fsverity_ioctl.measure_or_none(fd) is None:
            return False
        try:
            return fsverity_ioctl.read_signature(fd) != bytes(signature)
        except (VerityNotEnabled, VerityNotSupported):
            return False
    finally:
        os.close(fd)


def ensure_image_signature(store: Store, hexdigest: str, der: bytes) -> bool:
    """Give the image ``images/<hexdigest>`` already in the store its signature ``der``; True when anything was written.

    For a pull that finds the image present: where its fs-verity lacks this
    signature in the kernel, the image is read and written again with it
    (:meth:`.store.Store.write_image`, the kernel checks it before the
    rename; a refusal changes nothing), and ``images/<hexdigest>.sig`` is
    written.  A damaged image is an error, never re-published under its name.
    """
    der = bytes(der)
    check_signature_der(der, "images/%s" % os.fsdecode(sig_name(hexdigest)))
    if not kernel_signature_missing(store, hexdigest, der):
        return write_image_signature(store, hexdigest, der)
    fd = store.open_image(hexdigest)
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if fsverity_digest.digest_bytes(data).hex() != hexdigest:
        raise StoreError("images/%s is damaged (its content has another digest): run 'fsck --repair'" % hexdigest)
    store.write_image(data, signature=der)
    return True
