# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""One verification pass over a node's stores, mounts, images and objects.

Repair, never bless: fs-verity is enabled only on an object whose content,
hashed here, matches its name; anything else that is wrong is reported and
left alone (or moved aside with quarantine).  Each check is isolated, so an
unreadable store or a mount vanishing mid-pass costs that check only.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from composefs_fleet import fsverity_digest, fsverity_ioctl, mount_history, mount_record, mountinfo
from composefs_fleet.errors import ComposefsError, SignatureError, VerityError, VerityMismatch
from composefs_fleet.image_needs import image_file_objects
from composefs_fleet.mount_state import LAYOUT, LiveMount, differences
from composefs_fleet.ref_trust import TrustPolicy, verify_ref
from composefs_fleet.store import DAMAGED, META_NAME, Store

from .config import Config, MountSpec, expected, load_policy
from . import object_cache
from .findings import Finding
from .remount import remount, request_for

O_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK


class StopPass(Exception):
    """The agent is asked to stop: the pass ends where it is."""


class PassResult:
    def __init__(self, number: int) -> None:
        self.number = number
        self.findings: List[Finding] = []
        self.objects = 0
        self.mounts = 0
        self.signatures = 0  # signed statements of mounted refs checked
        # What each mount was checked against this pass: where, image, image_digest, ref, source.
        self.expected: List[Dict[str, object]] = []
        # (mount, ref, expiry in Unix time) of each statement that verified and has an expiry.
        self.expiries: List[Tuple[str, str, int]] = []
        self.started = time.monotonic()
        self.duration = 0.0

    def counts(self) -> Tuple[Dict[str, int], Dict[str, int]]:
        from .findings import KINDS

        problems: Dict[str, int] = {}
        repairs: Dict[str, int] = {}
        for f in self.findings:
            bucket = repairs if KINDS[f.kind].repair else problems
            bucket[f.kind] = bucket.get(f.kind, 0) + 1
        return problems, repairs

    @property
    def unresolved(self) -> List[Finding]:
        from .findings import KINDS

        return [f for f in self.findings if not KINDS[f.kind].repair and not f.resolved]

    @property
    def healthy(self) -> bool:
        return not self.unresolved


class DigestCache:
    """Userspace fs-verity digests of files without verity, reused while the
    inode, size, mtime and ctime are unchanged (any write changes ctime, which
    no one can set back).  Packed: a node may hold 100,000 objects without
    fs-verity, and the agent should stay small."""

    _STAMP = struct.Struct("<Qqq")

    CHUNK = 1 << 20

    def __init__(self, tick: Callable[[], None] = lambda: None) -> None:
        self.entries: Dict[int, bytes] = {}
        self.tick = tick

    @staticmethod
    def _key(st: os.stat_result) -> int:
        return (st.st_dev << 64) | st.st_ino

    def digest(self, fd: int, st: os.stat_result) -> str:
        key = self._key(st)
        stamp = self._STAMP.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self.entries.get(key)
        if known is not None and known[:self._STAMP.size] == stamp:
            return known[self._STAMP.size:].hex()
        digest = self._hash(fd)
        after = os.fstat(fd)
        if self._STAMP.pack(after.st_size, after.st_mtime_ns, after.st_ctime_ns) == stamp:
            self.entries[key] = stamp + digest
        return digest.hex()

    def _hash(self, fd: int) -> bytes:
        # In chunks, ticking between them: a multi-gigabyte object must not
        # starve systemd's watchdog (or delay a stop request) while it is hashed.
        hasher = fsverity_digest.FsVerityHasher()
        offset = 0
        while True:
            chunk = os.pread(fd, self.CHUNK, offset)
            if not chunk:
                return hasher.digest()
            hasher.update(chunk)
            offset += len(chunk)
            if offset % (64 * self.CHUNK) == 0:
                self.tick()

    def forget(self, st: os.stat_result) -> None:
        self.entries.pop(self._key(st), None)


class Checker:
    """Holds what passes share: caches and the mounts seen last time."""

    def __init__(self, log: Callable[[Finding], None], tick: Callable[[], None],
                 record_dir: str = mount_record.RECORD_DIR, history_dir: str = mount_history.HISTORY_DIR,
                 cache_dir: Optional[str] = None) -> None:
        self.log = log
        self.tick = tick  # called between objects: watchdog pings, stop requests (raises StopPass)
        self.record_dir = record_dir
        self.history_dir = history_dir
        self.digests = DigestCache(tick)
        # image digest -> {object hex: size}; images are content-addressed, so this never goes stale.
        self.image_objects: Dict[str, List[bytes]] = {}
        # The same kept on disk (object_cache), so that a run with --once lists an image only once too; None: not kept.
        self.cache_dir = cache_dir
        self._stores: Dict[str, Optional[str]] = {}  # basedir -> the store it belongs to
        # where -> (record identity, mount ID in our namespace) of the last pass.
        self.seen_mounts: Dict[str, Tuple[Tuple[object, ...], int]] = {}
        # st_dev -> why that filesystem has no fs-verity, for fsverity_ioctl's helpers.  Emptied every
        # pass: the device number of a filesystem unmounted meanwhile may now be another's.
        self._no_verity_devs: Dict[int, str] = {}

    # -- the pass -----------------------------------------------------------------
    def run(self, config: Config, number: int, quarantine: bool) -> PassResult:
        result = PassResult(number)
        self.result = result
        self._no_verity_devs.clear()
        self.quarantine = quarantine
        for store in config.stores:
            self._guard(lambda: self._check_store(store), store=store)
        try:
            entries = mountinfo.read_mountinfo()
        except OSError as exc:
            entries = []
            self._add("check-failed", "cannot read mountinfo: %s" % exc.strerror, {})
        checked: Dict[str, Set[bytes]] = {}  # basedir -> objects checked this pass
        used_images: Set[str] = set()
        policy, policy_error = self._policy(config)
        for configured in config.mounts:
            result.mounts += 1
            spec = self._expected(configured)
            if spec is None:
                continue
            result.expected.append({"where": spec.where, "image": spec.image, "image_digest": spec.digest,
                                    "ref": spec.ref, "source": spec.source})
            unvouched = False
            if configured.ref is not None and (policy_error is not None or (policy is not None and not policy.empty)):
                # Fail closed: unless the check ends with a valid statement, the mount is not made again.
                outcome: List[bool] = []
                self._guard(lambda: outcome.append(self._check_signature(spec, policy, policy_error)),
                            mount=spec.where, ref=spec.ref)
                unvouched = outcome != [True]
            self._guard(lambda: self._check_mount(spec, entries, checked, used_images, unvouched), mount=spec.where)
        for digest in list(self.image_objects):
            if digest not in used_images:
                del self.image_objects[digest]  # no longer mounted: let the memory go
        if self.cache_dir is not None:
            object_cache.prune(self.cache_dir, used_images)
        result.duration = time.monotonic() - result.started
        return result

    def _expected(self, spec: MountSpec) -> Optional[MountSpec]:
        """What the mount should show this pass: read again every pass, so a switch is followed at once."""
        try:
            history = mount_history.load(spec.where, self.history_dir)
        except OSError as exc:  # canonical() resolving the mount point's parents
            self._add("check-failed", "cannot read the mount history of %s: %s" % (spec.where, _why(exc)),
                      {"mount": spec.where})
            return None
        found = expected(spec, history)
        if found is None:
            self._add("mount-history-missing", "%s has no mount history in %s and the configuration names no image: "
                      "nothing says what it should show (mount it through composefs-fleet once, or give image, "
                      "digest and basedirs)" % (spec.where, self.history_dir), {"mount": spec.where})
        return found

    def _guard(self, check: Callable[[], None], **fields: object) -> None:
        try:
            check()
        except StopPass:
            raise
        except Exception as exc:  # pylint: disable=broad-except  # one check must not end the pass
            self._add("check-failed", "%s: %s" % (type(exc).__name__, exc), dict(fields))

    def _add(self, kind: str, message: str, fields: Dict[str, object]) -> Finding:
        finding = Finding(kind, message, dict(fields, **{"pass": self.result.number}))
        self.result.findings.append(finding)
        self.log(finding)
        return finding

    # -- stores -------------------------------------------------------------------
    def _check_store(self, store: str) -> None:
        try:
            os.stat(os.path.join(store, os.fsdecode(META_NAME)))
            with os.scandir(os.path.join(store, "objects")) as it:
                next(it, None)
        except OSError as exc:
            self._add("store-unreadable", "store %s cannot be read: %s" % (store, _why(exc)),
                      {"store": store, "path": os.fsdecode(exc.filename or store)})

    # -- signed refs --------------------------------------------------------------
    def _policy(self, config: Config) -> Tuple[Optional[TrustPolicy], Optional[str]]:
        """(the pass's trust policy, why it cannot be loaded): read every pass, so a key added to a
        revocation directory counts from the next pass; (None, None) when no mount is checked."""
        if not config.signed_mounts:
            return None, None
        try:
            return load_policy(config), None
        except ComposefsError as exc:
            return None, str(exc)
        except OSError as exc:  # from a key directory's listing: name the entry
            return None, "%s: %s" % (os.fsdecode(exc.filename or "?"), _why(exc))

    def _check_signature(self, spec: MountSpec, policy: Optional[TrustPolicy], policy_error: Optional[str]) -> bool:
        """Whether the ref's signed statement vouches for the mount's image now (else a finding says why)."""
        ref = str(spec.ref)
        self.result.signatures += 1
        fields: Dict[str, object] = {"mount": spec.where, "image_digest": spec.digest, "ref": ref,
                                     "store": spec.store, "path": os.path.join(spec.store, "signatures", ref)}
        if policy is None:
            self._add("signature-invalid", "signature of ref %s (mounted at %s) cannot be checked: the keys cannot be "
                      "read: %s" % (ref, spec.where, policy_error), dict(fields, reason="keys"))
            return False
        try:
            with Store.open(spec.store, notice=None) as store:
                statement = verify_ref(store, ref, policy, digest=spec.digest)
        except SignatureError as exc:
            kind = "signature-expired" if exc.reason == "expired" else "signature-invalid"
            self._add(kind, "%s (mounted at %s)" % (exc, spec.where), dict(fields, reason=exc.reason))
            return False
        except (ComposefsError, OSError) as exc:
            # Not an answer about the signature (store unreadable, cryptography missing), yet
            # nothing vouches for the image: still a finding of this kind.
            self._add("signature-invalid", "signature of ref %s (mounted at %s) cannot be checked: %s"
                      % (ref, spec.where, _why(exc)), dict(fields, reason="error"))
            return False
        if statement.expires is not None:
            self.result.expiries.append((spec.where, ref, statement.expires))
        return True

    # -- mounts -------------------------------------------------------------------
    def _check_mount(self, spec: MountSpec, entries: List[mountinfo.MountInfo],
                     checked: Dict[str, Set[bytes]], used_images: Set[str], unvouched: bool = False) -> None:
        fields = {"mount": spec.where, "image_digest": spec.digest}
        image_ok, image_verity = self._check_image(spec, fields)
        top = mountinfo.top_mount(spec.where, entries)
        if top is None or not top.is_composefs():
            missing = self._add("mount-missing", "%s is not mounted (expected image %s)" % (spec.where, spec.digest),
                                fields)
            if not spec.remount:
                return
            if not image_ok:
                self._add("mount-remount-failed", "not mounting %s again: its image file is not the expected one"
                          % spec.where, fields)
                return
            if unvouched:
                # Repair, never bless: no signature vouches for the image now.
                self._add("mount-remount-failed", "not mounting %s again: the signature of ref %s does not vouch "
                          "for image %s" % (spec.where, spec.ref, spec.digest), dict(fields, ref=spec.ref))
                return
            try:
                how = remount(spec, pin=image_verity, history_dir=self.history_dir)
            except (ComposefsError, OSError) as exc:
                self._add("mount-remount-failed", "mounting %s again failed: %s" % (spec.where, exc), fields)
                return
            entries = mountinfo.read_mountinfo()
            top = mountinfo.top_mount(spec.where, entries)
            if top is None or not top.is_composefs():
                self._add("mount-remount-failed", "%s: %s reported success but nothing is mounted"
                          % (spec.where, how), fields)
                return
            missing.resolved = True
            self._add("mount-remounted", "%s mounted again (%s)" % (spec.where, how), dict(fields, action=how))
        mounted_digest = self._check_live(spec, top, entries, fields)
        if mounted_digest is None:
            # Unknown image: check the objects of the expected one if its file is right.
            mounted_digest = spec.digest if image_ok else None
        if mounted_digest is None:
            return
        objects = self._objects_of(mounted_digest, spec, image_ok, fields)
        if objects is None:
            return
        used_images.add(mounted_digest)
        self._check_objects(spec, mounted_digest, objects, checked)

    def _check_image(self, spec: MountSpec, fields: Dict[str, object]) -> Tuple[bool, bool]:
        """(the image file has the expected digest, it was measured by the kernel)."""
        fields = dict(fields, path=spec.image)
        try:
            fd = os.open(spec.image, O_FLAGS)
        except FileNotFoundError:
            self._add("image-missing", "image file %s of %s is missing" % (spec.image, spec.where), fields)
            return False, False
        except OSError as exc:
            self._add("image-unreadable", "image file %s cannot be opened: %s" % (spec.image, _why(exc)), fields)
            return False, False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._add("image-unreadable", "image %s is not a regular file" % spec.image, fields)
                return False, False
            digest, measured = self._file_digest(fd, st)
        except (OSError, VerityError) as exc:
            self._add("image-unreadable", "image %s cannot be read: %s" % (spec.image, _why(exc)), fields)
            return False, False
        finally:
            os.close(fd)
        if digest != spec.digest:
            self._add("image-digest-mismatch", "image file %s has digest %s, expected %s (%s)"
                      % (spec.image, digest, spec.digest, "measured by the kernel" if measured else "computed"),
                      dict(fields, expected=spec.digest, actual=digest))
            return False, measured
        return True, measured

    def _check_live(self, spec: MountSpec, top: mountinfo.MountInfo, entries: List[mountinfo.MountInfo],
                    fields: Dict[str, object]) -> Optional[str]:
        """Compare the live mount with the spec; the digest of the image it shows (None: unknown)."""
        record = mount_record.record_for(top, entries, self.record_dir)
        if record is not None:
            ident = (record.get("mnt_ns"), record.get("mount_id"), record.get("mount_id_unique"))
            last = self.seen_mounts.get(spec.where)
            if last is not None and last[0] == ident and last[1] != top.mount_id:
                record = None  # the mount changed under an unchanged record: it describes another mount
            else:
                self.seen_mounts[spec.where] = (ident, top.mount_id)
        live = LiveMount(spec.where, entries, record)
        differ = ["%s=%s (expected %s)" % (d.what, _shown(d.mounted), _shown(d.wanted))
                  for d in differences(live, request_for(spec)) if d.what in LAYOUT]
        if differ:
            self._add("mount-options-differ", "%s: %s" % (spec.where, "; ".join(differ)),
                      dict(fields, actual="; ".join(differ)))
        if record is None:
            self._add("mount-image-unknown", "%s is a composefs mount without a record: which image it shows "
                      "cannot be told (mounted by another tool?)" % spec.where, fields)
            return None
        mounted = record.get("image_digest")
        if mounted != spec.digest:
            self._add("mount-wrong-image", "%s shows image %s, expected %s (from its %s)"
                      % (spec.where, mounted, spec.digest, spec.source),
                      dict(fields, expected=spec.digest, actual=mounted))
            if not isinstance(mounted, str) or len(mounted) != 64:
                return None
        return mounted

    def _objects_of(self, digest: str, spec: MountSpec, image_ok: bool,
                    fields: Dict[str, object]) -> Optional[List[bytes]]:
        known = self.image_objects.get(digest)
        if known is not None:
            return known
        # Only an image file whose digest was just verified may tell which objects belong to ``digest``.
        if digest != spec.digest or not image_ok:
            return None
        if self.cache_dir is not None:
            known = object_cache.load(self.cache_dir, digest)
            if known is not None:
                self.image_objects[digest] = known
                return known
        try:
            listed = image_file_objects(spec.image, progress=self.tick)
        except (OSError, ComposefsError) as exc:
            self._add("image-unreadable", "image %s cannot be read: %s" % (spec.image, _why(exc)),
                      dict(fields, path=spec.image))
            return None
        for problem in listed.problems[:10]:
            self._add("image-unreadable", "image %s: %s" % (spec.image, problem), dict(fields, path=spec.image))
        # Raw digests: a third of the memory of hex strings, for images of 100,000 files.
        objects = [bytes.fromhex(h) for h in listed.objects]
        # An image with problems is listed again next time, so that they are reported again.
        if self.cache_dir is not None and not listed.problems:
            object_cache.store(self.cache_dir, digest, objects)
        del listed
        self.image_objects[digest] = objects
        return objects

    # -- objects ------------------------------------------------------------------
    def _check_objects(self, spec: MountSpec, image_digest: str, objects: List[bytes],
                       checked: Dict[str, Set[bytes]]) -> None:
        """The hot loop (100,000 objects per image are common): the healthy case costs
        open, fstat, one ioctl and close per object; anything else takes the slow path."""
        want_verity = spec.verity != "off"
        require = spec.verity == "require"
        no_verity = self._no_verity_devs
        measure = fsverity_ioctl.measure_or_none
        done_sets = [checked.setdefault(b, set()) for b in spec.basedirs]
        result = self.result
        for i, raw in enumerate(objects):
            if not i & 255:
                self.tick()
            hexd = raw.hex()
            rel = hexd[:2] + "/" + hexd[2:]
            fd = -1
            where = -1
            for j, basedir in enumerate(spec.basedirs):
                if raw in done_sets[j]:
                    where = -2  # checked already this pass, for another mount
                    break
                try:
                    fd = os.open(basedir + "/" + rel, O_FLAGS)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    where = -2
                    result.objects += 1
                    done_sets[j].add(raw)
                    self._add("object-unreadable", "object %s/%s cannot be opened: %s" % (basedir, rel, _why(exc)),
                              self._object_fields(spec, image_digest, basedir, hexd, rel))
                    break
                where = j
                break
            if where == -2:
                continue
            result.objects += 1
            if fd < 0:
                self._add("object-missing", "object %s of %s is in no basedir (%s)"
                          % (hexd, spec.where, ", ".join(spec.basedirs)),
                          self._object_fields(spec, image_digest, spec.basedirs[0], hexd, rel))
                continue
            done_sets[where].add(raw)
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    try:
                        if measure(fd, st, no_verity) == ("sha256", raw):
                            continue  # healthy: sealed by the kernel with the right digest
                    except (VerityError, OSError):
                        pass  # the slow path tells why
                basedir = spec.basedirs[where]
                self._check_object(fd, st, basedir + "/" + rel, basedir, hexd, want_verity, require,
                                   self._object_fields(spec, image_digest, basedir, hexd, rel))
            finally:
                os.close(fd)

    def _object_fields(self, spec: MountSpec, image_digest: str, basedir: str, hexd: str,
                       rel: str) -> Dict[str, object]:
        store = self._stores.get(basedir, "")
        if store == "":
            store = self._stores[basedir] = _store_of(basedir)
        return {"mount": spec.where, "image_digest": image_digest, "object": hexd, "store": store,
                "path": basedir + "/" + rel}

    def _check_object(self, fd: int, st: os.stat_result, path: str, basedir: str, hexd: str, want_verity: bool,
                      require: bool, fields: Dict[str, object]) -> None:
        if not stat.S_ISREG(st.st_mode):
            self._add("object-unreadable", "object %s is not a regular file" % path, fields)
            return
        try:
            digest, measured = self._file_digest(fd, st)
        except (OSError, VerityError) as exc:
            self._add("object-unreadable", "object %s cannot be read: %s" % (path, _why(exc)), fields)
            return
        if digest != hexd:
            self._mismatch(path, basedir, hexd, digest, measured, st, fields)
            return
        if measured or not want_verity or st.st_dev in self._no_verity_devs:
            if require and not measured:
                self._add("object-verity-missing", "object %s has no fs-verity and its filesystem cannot "
                          "enable it (the mount requires it)" % path, fields)
            return
        self._enable(fd, path, require, fields, st)

    def _enable(self, fd: int, path: str, require: bool, fields: Dict[str, object], st: os.stat_result) -> None:
        problem = self._add("object-verity-missing", "object %s has no fs-verity" % path, fields)
        try:
            # The content was just hashed from this very descriptor: the file
            # cannot change between check and enable without a writer, and
            # FS_IOC_ENABLE_VERITY refuses files open for writing (ETXTBSY).
            unsupported = fsverity_ioctl.enable_then_check(fd, bytes.fromhex(str(fields["object"])), path, st,
                                                           self._no_verity_devs)
        except VerityMismatch as exc:
            # Changed between hash and enable: now sealed with other content.
            self._add("object-digest-mismatch", "object %s changed while being sealed: measured %s"
                      % (path, exc.measured.hex()), dict(fields, actual=exc.measured.hex()))
            return
        except (OSError, VerityError) as exc:
            problem.message += "; enabling it failed: %s" % _why(exc)
            return
        if unsupported is not None:
            problem.message += " and its filesystem has none (%s)" % unsupported
            problem.resolved = not require
            return
        self.digests.forget(st)
        problem.resolved = True
        self._add("object-verity-enabled", "fs-verity enabled on %s (sha256 digest matches its name)" % path,
                  dict(fields, action="verity-enabled"))

    def _mismatch(self, path: str, basedir: str, hexd: str, digest: str, measured: bool, st: os.stat_result,
                  fields: Dict[str, object]) -> None:
        self._add("object-digest-mismatch", "object %s has digest %s (%s), not its name %s"
                  % (path, digest, "measured by the kernel" if measured else "computed", hexd),
                  dict(fields, expected=hexd, actual=digest))
        if not self.quarantine:
            return
        try:
            dest = quarantine(path, basedir, hexd, st)
        except (OSError, ComposefsError) as exc:
            self._add("check-failed", "cannot move %s aside: %s" % (path, _why(exc)), fields)
            return
        if dest:
            self._add("object-quarantined", "moved %s to %s" % (path, dest),
                      dict(fields, action="quarantined", path=dest))

    def _file_digest(self, fd: int, st: os.stat_result) -> Tuple[str, bool]:
        """(hex digest, measured by the kernel) of an open regular file."""
        digest, measured = fsverity_ioctl.digest_measured_or_computed(
            fd, st, self._no_verity_devs, lambda f: bytes.fromhex(self.digests.digest(f, st)))
        return digest.hex(), measured


def quarantine(path: str, basedir: str, hexd: str, st: os.stat_result) -> Optional[str]:
    """Move the object at ``path`` aside (a store's ``damaged/``, else ``.quarantine/`` in its basedir),
    unless it was replaced meanwhile; returns where it went.  Never through a symbolic link."""
    from composefs_fleet.objects import quarantine_object

    store = _store_of(basedir)
    dest = quarantine_object(basedir, hexd, (st.st_dev, st.st_ino), store or basedir,
                             DAMAGED if store else b".quarantine")
    return None if dest is None else os.fsdecode(dest)


def _store_of(basedir: str) -> Optional[str]:
    """The store whose ``objects/`` ``basedir`` is (None for a plain object directory)."""
    parent = os.path.dirname(os.path.normpath(basedir))
    if os.path.basename(os.path.normpath(basedir)) == "objects" and os.path.exists(os.path.join(parent, os.fsdecode(META_NAME))):
        return parent
    return None


def _shown(value: object) -> str:
    """A difference's side as the agent words it: directory lists colon-separated."""
    if isinstance(value, list):
        return ":".join(str(v) for v in value)
    return str(value)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return "%s (%s)" % (exc.strerror, errno.errorcode.get(exc.errno or 0, exc.errno))
    return str(exc) or type(exc).__name__
