# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent's desired state: one JSON file, written by the collection's role.

Validation collects every problem before refusing, so one run of
``--check-config`` shows them all; unknown keys are errors (a misspelt
``remount`` must not silently mean "never remount").
"""

from __future__ import annotations

import os
import reprlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

from composefs_fleet.errors import ComposefsError
from composefs_fleet.json_text import MAX_JSON_BYTES, JsonFileError, is_int, load_json_object
from composefs_fleet.ref_trust import TrustPolicy
from composefs_fleet.safe_dirs import READ_FLAGS, UnsafePathError, open_regular
from composefs_fleet.store_names import split_ref_name

DEFAULT_PATH = "/etc/composefs-fleet/agent.json"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = MAX_JSON_BYTES
# As the mount module's (composefs_fleet.mount_state): ``on`` is the old name of ``boot``.
VERITY_MODES = ("require", "boot", "on", "auto", "off")


class ConfigError(Exception):
    def __init__(self, path: str, problems: List[str]) -> None:
        super().__init__("%s: %s" % (path, "; ".join(problems)))
        self.path = path
        self.problems = problems


class MountSpec:
    """A watched mount.  As configured, ``image``/``digest``/``basedirs`` may be
    missing: the mount point's history (what our mount code last mounted there)
    says what it should show, read every pass (:func:`expected`)."""

    __slots__ = ("where", "image", "digest", "basedirs", "verity", "remount", "upperdir", "workdir", "ref",
                 "source", "store_path")

    def __init__(self, where: str, image: Optional[str], digest: Optional[str], basedirs: List[str], verity: str,
                 remount: bool, upperdir: Optional[str], workdir: Optional[str], ref: Optional[str] = None,
                 source: str = "configuration", store_path: Optional[str] = None) -> None:
        self.where = where
        self.image = image
        self.digest = digest
        self.basedirs = basedirs
        self.verity = verity
        self.remount = remount
        self.upperdir = upperdir
        self.workdir = workdir
        # The ref the image was mounted by; its signature is checked every pass (with trusted keys).
        self.ref = ref
        # Where the expected image came from: "configuration" or "mount history".
        self.source = source
        self.store_path = store_path

    @property
    def store(self) -> str:
        """The store of the image (the history's, else ``<store>/images/<digest>`` as validated when ``ref`` is set)."""
        return self.store_path or os.path.dirname(os.path.dirname(self.image or ""))


def expected(spec: MountSpec, history: Optional[Dict[str, Any]]) -> Optional[MountSpec]:
    """What the mount ``spec`` should show now: its mount history (``mount_history.load``) when there is one,
    else the image the configuration names; None when neither says.

    The history follows every switch made through our mount code (the mount module, mount.composefs, a
    boot), so a mount moved to another image is checked against that image without a new configuration.
    Its ref (the one it was last mounted by) is the one whose signature is checked; without one, the
    configured ref.
    """
    if history is None:
        return spec if spec.image and spec.digest else None
    verity = history.get("verity")
    if verity not in VERITY_MODES:
        verity = spec.verity  # a mode this agent does not know: the configured one
    return MountSpec(spec.where, history["image"], history["image_digest"], list(history["basedirs"]), verity,
                     spec.remount, history.get("upperdir"), history.get("workdir"), history.get("ref") or spec.ref,
                     "mount history", history.get("store"))


class Config:
    __slots__ = ("path", "interval", "quarantine", "textfile", "stores", "mounts", "trusted_keys", "revoked_keys")

    def __init__(self, path: str, interval: float, quarantine: bool, textfile: str, stores: List[str],
                 mounts: List[MountSpec], trusted_keys: Optional[List[str]] = None,
                 revoked_keys: Optional[List[str]] = None) -> None:
        self.path = path
        self.interval = interval
        self.quarantine = quarantine
        self.textfile = textfile
        self.stores = stores
        self.mounts = mounts
        # Key files or directories (sign_keys' sources); read again every pass, so a key
        # dropped into a revocation directory counts from the next pass on.
        self.trusted_keys = list(trusted_keys or [])
        self.revoked_keys = list(revoked_keys or [])

    @property
    def signed_mounts(self) -> List[MountSpec]:
        """Mounts whose ref's signature is checked: those with a ref, when trusted keys are configured."""
        return [m for m in self.mounts if m.ref is not None] if self.trusted_keys else []


# Values quoted in problems: short, and shallow (a deeply nested value must
# not make the message itself fail with RecursionError).
_SHOW = reprlib.Repr()
_SHOW.maxlevel = 2
_SHOW.maxstring = 80
_SHOW.maxother = 80


def _show(value: Any) -> str:
    return _SHOW.repr(value)


_TOP = {"version", "interval", "quarantine", "textfile", "stores", "mounts", "trusted_keys", "revoked_keys"}
_STORE = {"path"}
_MOUNT = {"where", "image", "digest", "basedirs", "verity", "remount", "upperdir", "workdir", "ref"}


def _abs_path(value: Any, what: str, problems: List[str], optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        problems.append("%s must be an absolute path, got %s" % (what, _show(value)))
        return None
    return os.path.normpath(value)


def _hex64(value: Any, what: str, problems: List[str]) -> Optional[str]:
    if (not isinstance(value, str) or len(value) != 64
            or any(c not in "0123456789abcdef" for c in value.lower())):
        problems.append("%s must be 64 hex digits (an fs-verity sha256 digest), got %s" % (what, _show(value)))
        return None
    return value.lower()


def _ref(value: Any, what: str, image: Optional[str], digest: Optional[str], problems: List[str]) -> Optional[str]:
    """A ref name; its signature lives in the image's store, so the image must be that store's file."""
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append("%s must be a ref name (like app/v1), got %s" % (what, _show(value)))
        return None
    try:
        split_ref_name(value)
    except ComposefsError as exc:
        problems.append("%s: %s" % (what, exc))
        return None
    if image and digest and (os.path.basename(os.path.dirname(image)) != "images" or os.path.basename(image) != digest):
        problems.append("%s needs the image file in its store, STORE/images/%s (the signature is STORE/signatures/%s),"
                        " got %s" % (what, digest, value, _show(image)))
        return None
    return value


def _key_paths(raw: Any, what: str, problems: List[str]) -> List[str]:
    if not isinstance(raw, list):
        problems.append("%s must be a list of absolute paths (key files or directories)" % what)
        return []
    paths = [_abs_path(p, "%s[%d]" % (what, i), problems) for i, p in enumerate(raw)]
    return [p for p in paths if p]


def _unknown(obj: Dict[str, Any], allowed: set, what: str, problems: List[str]) -> None:
    for key in sorted(set(obj) - allowed):
        problems.append("%s: unknown key %s (known: %s)" % (what, _show(key), ", ".join(sorted(allowed))))


def _objects(raw: Any, name: str, needs: str, allowed: set,
             problems: List[str]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(``name[i]``, item) for each object in the list ``raw``; a problem for anything else."""
    if not isinstance(raw, list):
        problems.append("%s must be a list" % name)
        return
    for i, item in enumerate(raw):
        what = "%s[%d]" % (name, i)
        if not isinstance(item, dict):
            problems.append("%s must be an object%s" % (what, needs))
            continue
        _unknown(item, allowed, what, problems)
        yield what, item


def parse(data: bytes, path: str = "<config>") -> Config:
    """The config in ``data``; raises :class:`ConfigError` listing every problem."""
    problems: List[str] = []
    try:
        doc = load_json_object(data, "the file")
    except JsonFileError as exc:
        if "must hold a JSON object" in str(exc):
            raise ConfigError(path, ["the top level must be a JSON object (%s)" % exc]) from None
        raise ConfigError(path, ["not valid JSON: %s" % exc]) from None
    _unknown(doc, _TOP, "top level", problems)
    version = doc.get("version", FORMAT_VERSION)
    if not is_int(version) or version != FORMAT_VERSION:
        problems.append("version must be %d, got %s" % (FORMAT_VERSION, _show(version)))
    interval = doc.get("interval", 300)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 1 <= interval <= 86400:
        problems.append("interval must be a number of seconds from 1 to 86400, got %s" % _show(interval))
        interval = 300
    quarantine = doc.get("quarantine", False)
    if not isinstance(quarantine, bool):
        problems.append("quarantine must be true or false, got %s" % _show(quarantine))
    textfile = doc.get("textfile") or ""
    if textfile:
        textfile = _abs_path(textfile, "textfile", problems) or ""
        if textfile and not textfile.endswith(".prom"):
            problems.append("textfile must end in .prom (node_exporter reads only those), got %s" % _show(textfile))
    stores: List[str] = []
    for what, item in _objects(doc.get("stores", []), "stores", " with a path", _STORE, problems):
        store = _abs_path(item.get("path"), what + ".path", problems)
        if store:
            stores.append(store)
    mounts = _mounts(doc.get("mounts", []), problems)
    trusted = _key_paths(doc.get("trusted_keys", []), "trusted_keys", problems)
    revoked = _key_paths(doc.get("revoked_keys", []), "revoked_keys", problems)
    if problems:
        raise ConfigError(path, problems)
    return Config(path, float(interval), bool(quarantine), textfile, stores, mounts, trusted, revoked)


def _mounts(raw: Any, problems: List[str]) -> List[MountSpec]:
    mounts: List[MountSpec] = []
    seen = set()
    for what, item in _objects(raw, "mounts", "", _MOUNT, problems):
        n = len(problems)
        where = _abs_path(item.get("where"), what + ".where", problems)
        # image, digest and basedirs: only for a mount point without a mount history (see expected()).
        fallback = [k for k in ("image", "digest", "basedirs") if item.get(k) is not None]
        if fallback and len(fallback) < 3:
            problems.append("%s: image, digest and basedirs go together (what the mount shows when it has no mount "
                            "history), got only %s" % (what, ", ".join(fallback)))
        image = _abs_path(item["image"], what + ".image", problems) if "image" in fallback else None
        digest = _hex64(item["digest"], what + ".digest", problems) if "digest" in fallback else None
        basedirs_raw = item.get("basedirs")
        basedirs: List[str] = []
        if basedirs_raw is not None and (not isinstance(basedirs_raw, list) or not basedirs_raw):
            problems.append("%s.basedirs must be a non-empty list of absolute paths" % what)
        elif basedirs_raw is not None:
            for j, b in enumerate(basedirs_raw):
                path = _abs_path(b, "%s.basedirs[%d]" % (what, j), problems)
                if path:
                    basedirs.append(path)
        verity = item.get("verity", "auto")
        if verity not in VERITY_MODES:
            problems.append("%s.verity must be one of %s, got %s" % (what, ", ".join(VERITY_MODES), _show(verity)))
        remount = item.get("remount", False)
        if not isinstance(remount, bool):
            problems.append("%s.remount must be true or false, got %s" % (what, _show(remount)))
        upperdir = _abs_path(item.get("upperdir"), what + ".upperdir", problems, optional=True)
        workdir = _abs_path(item.get("workdir"), what + ".workdir", problems, optional=True)
        if (upperdir is None) != (workdir is None) and len(problems) == n:
            problems.append("%s: upperdir and workdir go together" % what)
        ref = _ref(item.get("ref"), what + ".ref", image, digest, problems)
        if where in seen:
            problems.append("%s: %s is listed twice" % (what, where))
        seen.add(where)
        if len(problems) == n and where:
            mounts.append(MountSpec(where, image, digest, basedirs, verity, remount, upperdir, workdir, ref))
    return mounts


def load(path: str) -> Config:
    """Read and parse the config file at ``path`` (ConfigError on any problem)."""
    try:
        # The admin's path may be a link, but a FIFO or device must not hang a reload.
        fd = open_regular(path, flags=READ_FLAGS & ~os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except UnsafePathError as exc:
        raise ConfigError(path, ["cannot read it: %s" % exc]) from None
    except OSError as exc:
        raise ConfigError(path, ["cannot read it: %s" % (exc.strerror or exc)]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, ["larger than %d bytes" % MAX_CONFIG_BYTES])
    config = parse(data, path)
    problems = key_problems(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def load_policy(config: Config) -> TrustPolicy:
    """The trust policy of ``config``'s key files (StoreError naming the file that cannot be used)."""
    # An empty trust directory means no check here (the role may not have placed keys yet).
    return TrustPolicy.load(config.trusted_keys, config.revoked_keys, allow_empty=True)


def key_problems(config: Config) -> List[str]:
    """Why the configured keys cannot be used (empty when they can, or when none is configured).

    Checked when the file is loaded, so ``--check-config`` (the role's
    validation) and a reload refuse a key path that is missing or holds
    something that is not an ed25519 public key; every pass reads the keys
    again.  An empty key directory is no problem: no trusted key means no
    signature is asked for (the core's rule), and the config-loaded entry
    says so.
    """
    if not config.trusted_keys and not config.revoked_keys:
        return []
    try:
        load_policy(config)
    except ComposefsError as exc:
        return ["keys: %s" % exc]
    except OSError as exc:  # from a key directory's listing (a dangling link in it, say)
        return ["keys: %s: %s" % (os.fsdecode(exc.filename or "?"), exc.strerror or exc)]
    return []
