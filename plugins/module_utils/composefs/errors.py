# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Exceptions raised by the composefs core.

Every error that bad input can cause is one of these, so callers (CLIs, Ansible
modules, the agent) can turn it into a clear message instead of a traceback.
"""

from __future__ import annotations


class ComposefsError(Exception):
    """Base class for all errors of the composefs core."""


class FormatError(ComposefsError):
    """The tree cannot be represented, or input (dump, tree) is invalid."""


class DumpParseError(FormatError):
    """A composefs-dump(5) line could not be parsed."""

    def __init__(self, message: str, lineno: int = 0) -> None:
        self.lineno = lineno
        super().__init__("line %d: %s" % (lineno, message) if lineno else message)


class ImageError(ComposefsError):
    """An image is malformed, truncated, hostile or not a composefs image."""


class VerityError(ComposefsError):
    """An fs-verity operation failed."""


class VerityNotSupported(VerityError):
    """The kernel or the filesystem holding the file has no fs-verity."""


class VerityNotEnabled(VerityError):
    """The file has no fs-verity enabled (ENODATA on measure)."""


class VerityMismatch(VerityError):
    """The kernel measures another fs-verity digest than the one expected."""

    def __init__(self, message: str, algorithm: str, measured: bytes) -> None:
        super().__init__(message)
        self.algorithm = algorithm
        self.measured = measured


class VeritySignatureError(VerityError):
    """A built-in fs-verity signature (PKCS#7) cannot be made or read, or the kernel refuses it."""


class UnmountError(ComposefsError):
    """A composefs mount could not be unmounted (nothing there, not ours, busy); ``errno`` says why."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class UnsafePathError(ComposefsError):
    """A symbolic link, a non-directory or a foreign-owned entry where the tree needs its own."""


class StoreError(ComposefsError):
    """The store is missing, of an unknown format, damaged, or an operation is refused."""


class RefNotFound(StoreError):
    pass


class UnsafeStoreError(StoreError, UnsafePathError):
    """A symbolic link or a foreign-owned (or group/other-writable) directory in the store."""


class ForeignOwnerError(UnsafeStoreError):
    """The store or a directory of it belongs to someone else or is group/other-writable (see allow_foreign)."""


class RemoteError(StoreError):
    """A remote store could not be read, or served something that fails verification.

    The message starts with the URL of what failed (credentials removed).
    """

    def __init__(self, url: str, message: str) -> None:
        super().__init__("%s: %s" % (url, message))
        self.url = url


class RemoteNotFound(RemoteError):
    """The remote has no such file (HTTP 404/410, or no such file under a file:// remote)."""


class SignatureError(StoreError):
    """A ref's signed statement is missing, malformed, not by a trusted key, or does not vouch for the image.

    ``reason`` is one of :data:`SIGNATURE_REASONS` (the agent and the
    modules tell them apart); the message starts with "signature of ref NAME",
    or with ``where`` (a remote's URL) before it.
    """

    def __init__(self, ref: str, reason: str, message: str, where: str = "") -> None:
        super().__init__("%ssignature of ref %s: %s" % (where + ": " if where else "", ref, message))
        self.ref = ref
        self.reason = reason
        self.detail = message


#: Why a signature was refused.
SIGNATURE_REASONS = ("unsigned", "malformed", "untrusted", "revoked", "tampered", "wrong-ref", "wrong-image",
                     "expired", "rollback", "future")
