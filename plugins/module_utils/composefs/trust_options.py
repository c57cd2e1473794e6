# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The trust options of the Ansible modules (``trusted_keys``, ``revoked_keys``) as a :class:`.ref_trust.TrustPolicy`.

A module gets keys as paths on the node (a key file or a directory of
them) or as the key's text: PEM, as :func:`.sign_keys.load_public_keys`
reads it, or the text of an ostree ed25519 key file (base64 lines), which
the core reads only from a file.  Such a text is written into a private
file in the module's temporary directory first, so that a role can pass
the same texts it installs on the node, also in check mode before they are
installed.  A text is told from a path by its content: a path is absolute
and one line; a key text has a newline or is not absolute, or is one line of
base64 that is an ostree key (base64 may start with "/") and names nothing
on the node.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any, Dict, Iterable, List, Optional

from .errors import StoreError
from .ref_statement import Statement, StatementError, decode_signatures_file, format_time, parse_statement
from .ref_trust import TrustPolicy
from .sign_keys import RAW_KEY_BYTES, KeyFileError
from .store_names import split_ref_name

_PEM_MARK = "-----BEGIN "


def is_key_path(entry: str) -> bool:
    """True if ``entry`` names a file or directory on the node rather than holding a key's text.

    Base64 may start with "/": one line that is an ostree key (32 bytes in
    base64) and names nothing on the node is that key's text.
    """
    line = entry.rstrip("\n")
    if not line.startswith("/") or "\n" in line or _PEM_MARK in entry:
        return False
    return os.path.lexists(line) or not _is_ostree_key(line)


def _is_ostree_key(line: str) -> bool:
    try:
        return len(base64.b64decode(line.strip(), validate=True)) == RAW_KEY_BYTES
    except (binascii.Error, ValueError):
        return False


def key_sources(entries: Iterable[str], tmpdir: str, option: str) -> List[str]:
    """What :meth:`.TrustPolicy.load` takes: paths and PEM texts as they are, other key texts as private files."""
    out = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry.strip():
            raise KeyFileError("%s[%d]: an empty key (give a path on the node or the key's text)" % (option, index))
        if is_key_path(entry):
            out.append(entry.rstrip("\n"))  # a template's trailing newline is no part of the name
            continue
        if _PEM_MARK in entry:
            out.append(entry)
            continue
        path = os.path.join(tmpdir, "%s-%d.pub" % (option, index))
        # Created new, readable by this user only: the text came from the task.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii", errors="replace") as out_file:
            out_file.write(entry if entry.endswith("\n") else entry + "\n")
        out.append(path)
    return out


def load_policy(trusted: Optional[List[str]], revoked: Optional[List[str]], tmpdir: str) -> Optional[TrustPolicy]:
    """The policy of the options; None when ``trusted`` is not given (signatures are not asked for).

    ``trusted`` given but holding no key (an empty directory, say) is an
    error: a task that names trusted keys must never run unchecked.
    """
    if not trusted:
        return None
    policy = TrustPolicy.load(key_sources(trusted, tmpdir, "trusted_keys"), key_sources(revoked or [], tmpdir, "revoked_keys"))
    if policy.empty:
        raise KeyFileError("trusted_keys holds no key (an empty directory?): refusing to go on without signature checks")
    return policy


def ref_name(ref: str) -> str:
    """The ref's name as signatures and their messages spell it (components joined by one "/")."""
    return b"/".join(split_ref_name(ref)).decode("utf-8", "surrogateescape")


def signed_time(data: Optional[bytes], ref: str) -> Optional[str]:
    """The signing time of a signatures file the store holds (for a diff); None if none or unreadable.

    Only shown, never trusted: the statement was verified when it was stored.
    """
    if data is None:
        return None
    try:
        statement, _entries = decode_signatures_file(data, "signatures/" + ref)
        return format_time(parse_statement(statement).signed)
    except (StatementError, StoreError):
        return None


def statement_info(statement: Statement) -> Dict[str, Any]:
    """What a task reports of a verified statement (as a pull reports it): keys that verified, signing and expiry time."""
    return {"keys": list(statement.keys), "signed": format_time(statement.signed),
            "expires": None if statement.expires is None else format_time(statement.expires)}


__all__ = ["is_key_path", "key_sources", "load_policy", "ref_name", "signed_time", "statement_info"]
