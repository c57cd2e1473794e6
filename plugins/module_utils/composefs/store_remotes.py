# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Named remotes of a store: ``STORE/remotes.json``.

``{"remotes": {"NAME": {"url": "https://...", "ca_path": "/etc/..."}}}``.
Only where to find a remote and how to check it are kept; credentials are
not (a store's files are no place for secrets): a URL with a password in it
is refused.  The file is read through the store's directory descriptor and
replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional

from .atomic_file import write_atomic_at
from .errors import StoreError
from .json_text import MAX_JSON_BYTES, JsonFileError, load_json_object
from .remote_options import RemoteURL
from .safe_dirs import UnsafePathError, open_regular
from .store import Store

REMOTES_NAME = b"remotes.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Keys a remote may carry besides its URL.
SETTINGS = ("ca_path", "client_cert", "client_key", "username")
#: Settings that are lists of key sources (paths): signatures from this remote are then required.
TRUST_SETTINGS = ("trusted_keys", "revoked_keys")


def check_remote_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError("remote name %r: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit" % (name,))
    return name


def load_remotes(store: Store) -> Dict[str, Dict[str, Any]]:
    """{name: {"url": ..., settings...}}; empty if the store has no remotes."""
    shown = os.fsdecode(os.path.join(store.path, REMOTES_NAME))
    try:
        fd = open_regular(REMOTES_NAME, store.root_fd(), shown)
    except FileNotFoundError:
        return {}
    except UnsafePathError as exc:
        raise StoreError("%s: refused" % exc) from None
    try:
        raw = os.read(fd, MAX_JSON_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = load_json_object(raw, shown)
    except JsonFileError as exc:
        raise StoreError(str(exc)) from None
    remotes = doc.get("remotes", {})
    if not isinstance(remotes, dict):
        raise StoreError("%s: \"remotes\" must be an object" % shown)
    out: Dict[str, Dict[str, Any]] = {}
    for name, entry in remotes.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise StoreError("%s: remote %r needs a \"url\"" % (shown, name))
        unknown = set(entry) - {"url"} - set(SETTINGS) - set(TRUST_SETTINGS)
        if unknown:
            raise StoreError("%s: remote %r has unknown keys: %s" % (shown, name, ", ".join(sorted(unknown))))
        for key, value in entry.items():
            if key in TRUST_SETTINGS:
                if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
                    raise StoreError("%s: remote %r: %s must be a list of key file paths" % (shown, name, key))
            elif not isinstance(value, str):
                raise StoreError("%s: remote %r: %s must be a string" % (shown, name, key))
        out[name] = dict(entry)
    return out


def get_remote(store: Store, name: str) -> Dict[str, Any]:
    """The configuration of the remote ``name`` (a copy)."""
    check_remote_name(name)
    remotes = load_remotes(store)
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise StoreError("no remote named %s in %s (known: %s); a URL needs its scheme (https://...)"
                         % (name, os.fsdecode(store.path), known))
    return dict(remotes[name])


def add_remote(store: Store, name: str, url: str, settings: Optional[Dict[str, Any]] = None,
               replace: bool = False) -> bool:
    """Add (or with ``replace``, change) a remote; False if it was already exactly so.

    ``trusted_keys``/``revoked_keys`` are lists of key file paths (absolute:
    the store is used from any directory); each is read once here so a
    typo fails now rather than at the first pull.
    """
    check_remote_name(name)
    parsed = RemoteURL(url)
    if parsed.password is not None:
        raise StoreError("remote %s: the URL holds a password; credentials are not kept in the store "
                         "(give them to each pull)" % name)
    entry: Dict[str, Any] = {"url": url}
    for key, value in (settings or {}).items():
        if key in TRUST_SETTINGS:
            if value:
                entry[key] = _key_paths(name, key, value)
            continue
        if key not in SETTINGS:
            raise StoreError("remote %s: unknown setting %s" % (name, key))
        if value is not None:
            entry[key] = value
    with store.lock.shared():
        remotes = load_remotes(store)
        if remotes.get(name) == entry:
            return False
        if name in remotes and not replace:
            raise StoreError("remote %s exists (%s); remove it first" % (name, remotes[name]["url"]))
        remotes[name] = entry
        _save(store, remotes)
    return True


def _key_paths(name: str, setting: str, paths: List[str]) -> List[str]:
    from .sign_keys import load_public_keys

    out = []
    for path in paths:
        if not isinstance(path, str) or not os.path.isabs(path):
            raise StoreError("remote %s: %s: %r is not an absolute path of a key file or directory" % (name, setting, path))
        load_public_keys(path)
        out.append(path)
    return out


def remove_remote(store: Store, name: str) -> bool:
    """Remove a remote; False if there was none of that name."""
    check_remote_name(name)
    with store.lock.shared():
        remotes = load_remotes(store)
        if name not in remotes:
            return False
        del remotes[name]
        _save(store, remotes)
    return True


def _save(store: Store, remotes: Dict[str, Dict[str, Any]]) -> None:
    body = json.dumps({"remotes": remotes}, indent=2, sort_keys=True) + "\n"
    write_atomic_at(store.root_fd(), REMOTES_NAME, body.encode("utf-8"), mode=0o644)


__all__ = ["SETTINGS", "TRUST_SETTINGS", "add_remote", "check_remote_name", "get_remote", "load_remotes", "remove_remote"]
