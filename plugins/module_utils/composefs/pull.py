# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Pull an image from a remote store: fetch only the objects this store lacks, verify everything.

A remote is a store directory served as plain files (any static web
server, a bucket, a CDN, ``file://``); no index, no server-side code.  The
order, and why:

1. ``meta.json``: the remote is a store of a format and digest we know.
2. ``refs/<ref>``: the image digest.
3. ``images/<digest>`` (unless this store has it), at most
   ``max_image_bytes``, its fs-verity digest compared to the ref *before*
   it is parsed: a server cannot feed the parser an image nobody named.
   Then it is parsed as hostile input to list its objects.
4. The objects this store lacks, ``jobs`` at a time over keep-alive
   connections, each streamed into a staged temp file while its fs-verity
   digest is computed, then compared with its name and its size with what
   the image says (as composefs-rs's ``cfsctl fetch`` does; ostree checks
   its checksums the same way).  Nothing unverified gets a name.
5. The fetched objects are made durable and published every few hundred
   MiB (so an interrupted pull keeps what it got: the next one fetches only
   what is still missing, ostree's per-object resume), then the image, and
   the ref last: a ref never names an image whose objects are missing.

The store's lock is held shared for the whole pull, as add-image does: gc
never sweeps what a pull has staged or fetched, pulls and adds run side by
side (two pulls of one ref both end with the ref right), and nothing here
blocks the readers of mounted images.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

from . import fsverity_digest
from .errors import ComposefsError, RemoteError, RemoteNotFound, SignatureError, StoreError
from .image_needs import ImageObjects, image_data_objects
from .json_text import JsonFileError, load_json_object
from .objects import ObjectBatch
from .ref_statement import MAX_SIGNATURES_BYTES, Statement, format_time
from .remote_options import RemoteOptions, is_url, open_transport
from .safe_dirs import UnsafePathError
from .store import OBJECTS, Store, check_meta
from .store_lock import flock_wait
from .store_names import check_digest_hex, is_hex_name, split_ref_name
from .store_signatures import read_signatures, write_signatures

#: Files a remote serves that are read whole: their size limits.
MAX_META_BYTES = 64 * 1024
MAX_REF_BYTES = 4096
#: The image is held in memory until its digest is checked: a lying server must not make that huge.
#: (An image of 100,000 files is about 30 MB.)
MAX_IMAGE_BYTES = 256 << 20
#: Fetched objects are published after this many bytes or seconds (what a crash can cost).
COMMIT_BYTES = 64 << 20
COMMIT_SECONDS = 5.0
DEFAULT_JOBS = 8
#: Transfer processes at most (one per CPU), and the least a pull must fetch to use more than one.
MAX_PROCESSES = 8
PROCESS_MIN_BYTES = 16 << 20

#: progress(objects_done, objects_total, bytes_done, bytes_total)
Progress = Callable[[int, int, int, int], None]


class PullResult:
    """What a pull found and did."""

    def __init__(self, url: str, remote_ref: str, ref: str) -> None:
        self.url = url
        self.remote_ref = remote_ref
        self.ref = ref
        self.digest = ""
        self.previous: Optional[str] = None
        self.changed = False
        self.objects = 0
        self.objects_missing = 0
        self.bytes_missing = 0
        self.objects_fetched = 0
        self.bytes_fetched = 0
        self.image_fetched = False
        #: What the verified statement says (None: not asked for), and the seconds its check took.
        self.signature: Optional[Dict[str, Any]] = None
        self.verify_seconds = 0.0
        #: The remote has images/<digest>.sig (fs-verity built-in signature); it was written here
        #: (image_signed: with the image, or given to the kernel for an image already here).
        self.image_signature = False
        self.image_signed = False

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def pull(store: Store, remote: Union[str, Any], remote_ref: str, ref: Optional[str] = None, *,
         options: Optional[RemoteOptions] = None, jobs: int = DEFAULT_JOBS, dry_run: bool = False,
         progress: Optional[Progress] = None, max_image_bytes: int = MAX_IMAGE_BYTES,
         trust: Optional[Any] = None) -> PullResult:
    """Make ``ref`` (default ``remote_ref``) name the image ``remote_ref`` names in ``remote``.

    ``remote`` is a URL, the name of a remote configured in the store
    (:mod:`.store_remotes`), or a transport object (``url``, ``get_small``,
    ``stream``, ``close``; see :mod:`.remote_http`).  ``dry_run`` reads the
    ref and the image (small) to say what a pull would fetch, and writes
    nothing.  Errors are :class:`.errors.RemoteError` naming the URL of
    what failed, or the store's errors; nothing unverified is published.

    ``trust`` (a :class:`.ref_trust.TrustPolicy`; for a named remote also
    its configured ``trusted_keys``/``revoked_keys``): when it has trusted
    keys, ``signatures/<ref>`` is fetched and verified before anything is
    written, and stored before the ref (:mod:`.ref_trust`); a signed ref
    keeps its name here.
    """
    split_ref_name(remote_ref)
    local_ref = remote_ref if ref is None else ref
    split_ref_name(local_ref)
    if jobs < 1:
        raise StoreError("jobs must be at least 1 (got %d)" % jobs)
    transport, owned, trust = _transport(store, remote, options, jobs, trust)
    result = PullResult(transport.url, remote_ref, local_ref)
    try:
        if trust is not None and local_ref != remote_ref:
            raise StoreError("a signed ref keeps its name: the signature of %s does not vouch for %s "
                             "(pull without --ref, or without trusted keys)" % (remote_ref, local_ref))
        with (store.lock.shared_read_only() if dry_run else store.lock.shared()):
            _check_remote_meta(transport)
            result.digest = _remote_ref(transport, remote_ref)
            result.previous = store.read_ref_or_none(local_ref)
            if trust is not None:
                signatures: Optional[bytes] = _verified_signatures(store, transport, remote_ref, result, trust)
            else:
                signatures = None
                _check_unsigned_move(store, local_ref, result.previous, result)
            data, needed = _image(store, transport, result.digest, max_image_bytes)
            image_sig = _image_signature(transport, result.digest)
            batch = ObjectBatch(store.objects_dir, mode=None, follow=False, opener=lambda: store.dir_fd(OBJECTS))
            try:
                missing = _missing(store, batch, needed)
                result.objects = len(needed.objects)
                result.objects_missing = len(missing)
                result.bytes_missing = sum(item[1] for item in missing)
                if dry_run:
                    result.changed = result.previous != result.digest or bool(missing) or data is not None
                    return result
                _fetch(batch, transport, missing, jobs, progress, result)
                _check_fetched(store, batch, missing)
            finally:
                batch.abort()  # after the commits: only closes the directories
            result.image_signature = image_sig is not None
            if data is not None:
                _hex, result.image_fetched = store.write_image(data, signature=image_sig)
                result.image_signed = image_sig is not None
            elif image_sig is not None:
                from .store_image_sig import ensure_image_signature

                result.image_signed = ensure_image_signature(store, result.digest, image_sig)
            with _ref_update(store):
                # Decided again under the lock: a pull that ran meanwhile may have stored a newer statement
                # (ours would then be a rollback) or a first one (an unsigned pull must then not move the ref).
                current = store.read_ref_or_none(local_ref)
                if signatures is not None:
                    _verify_statement(store, transport, remote_ref, result, trust, signatures)
                else:
                    _check_unsigned_move(store, local_ref, current, result)
                signatures_changed = signatures is not None and signatures != read_signatures(store, local_ref)
                if signatures_changed:
                    write_signatures(store, local_ref, signatures)
                if current != result.digest:
                    store.write_ref(local_ref, result.digest)
            result.changed = (result.previous != result.digest or result.objects_fetched > 0 or result.image_fetched
                              or signatures_changed or result.image_signed)
            return result
    finally:
        if owned:
            transport.close()


def _transport(store: Store, remote: Union[str, Any], options: Optional[RemoteOptions], jobs: int,
               trust: Optional[Any]) -> Tuple[Any, bool, Optional[Any]]:
    """(transport, whether we opened it, the trust policy that applies: None when it has no trusted key)."""
    owned = False
    if isinstance(remote, str):
        options = options or RemoteOptions()
        if not is_url(remote):
            from .store_remotes import TRUST_SETTINGS, get_remote

            config = get_remote(store, remote)
            remote = config.pop("url")
            keys = {name: config.pop(name, []) for name in TRUST_SETTINGS}
            if any(keys.values()):
                from .ref_trust import TrustPolicy

                configured = TrustPolicy.load(keys["trusted_keys"], keys["revoked_keys"])
                trust = configured if trust is None or trust.empty else trust.merged(
                    TrustPolicy([], configured.revoked.values()))
            options = options.with_defaults(config)
        remote = open_transport(remote, options, jobs)
        owned = True
    return remote, owned, (None if trust is None or trust.empty else trust)


@contextmanager
def _ref_update(store: Store) -> Iterator[None]:
    """One pull at a time re-checks a statement and moves a ref (a check then a write, atomic together).

    flock(2) on a new open file description of the store directory itself: no
    new file in the store, and threads of one process exclude each other too.
    """
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=store.root_fd())
    try:
        flock_wait(fd, fcntl.LOCK_EX, "another pull is moving a ref", store.lock.notice)
        yield
    finally:
        os.close(fd)


def _check_unsigned_move(store: Store, ref: str, previous: Optional[str], result: PullResult) -> None:
    """A ref this store holds a signature for is never moved by a pull that checks none."""
    if previous is not None and previous != result.digest and read_signatures(store, ref) is not None:
        raise SignatureError(ref, "unsigned", "this store holds a signed statement for the ref (signatures/%s): a pull "
                             "without trusted keys would replace a verified image with an unverified one; give "
                             "the trusted keys (--trusted-key, or trusted_keys for the remote)" % ref, where=result.url)


def _verified_signatures(store: Store, transport: Any, ref: str, result: PullResult, trust: Any) -> bytes:
    """The remote's ``signatures/<ref>`` once it vouches for the digest the remote ref names (:mod:`.ref_trust`)."""
    start = time.monotonic()
    try:
        data: Optional[bytes] = transport.get_small("signatures/" + ref, MAX_SIGNATURES_BYTES)
    except RemoteNotFound:
        data = None
    statement = _verify_statement(store, transport, ref, result, trust, data)
    result.signature = {"keys": statement.keys, "signed": format_time(statement.signed),
                        "expires": None if statement.expires is None else format_time(statement.expires)}
    result.verify_seconds = time.monotonic() - start
    return data if data is not None else b""  # never empty here: a missing file is refused above


def _verify_statement(store: Store, transport: Any, ref: str, result: PullResult, trust: Any,
                      data: Optional[bytes]) -> Statement:
    """:func:`.ref_trust.verify_signature_bytes` against the statement this store holds now; errors name the remote."""
    from .ref_trust import verify_signature_bytes

    try:
        return verify_signature_bytes(data, ref, trust, digest=result.digest, held=read_signatures(store, ref),
                                      shown=transport.url + "/signatures/" + ref)
    except SignatureError as exc:
        raise SignatureError(exc.ref, exc.reason, exc.detail, where=transport.url) from None


def _check_remote_meta(transport: Any) -> None:
    try:
        raw = transport.get_small("meta.json", MAX_META_BYTES)
    except RemoteNotFound:
        raise RemoteError(transport.url, "not a composefs store: it has no meta.json "
                                         "(the URL must name the store's directory)") from None
    try:
        check_meta(load_json_object(raw, "meta.json"), transport.url)
    except (JsonFileError, StoreError) as exc:
        raise RemoteError(transport.url, "not a usable composefs store: %s" % exc) from None


def _remote_ref(transport: Any, name: str) -> str:
    path = "refs/" + name
    try:
        raw = transport.get_small(path, MAX_REF_BYTES)
    except RemoteNotFound:
        raise RemoteError(transport.url, "no ref %s there" % name) from None
    text = raw.strip()
    if not is_hex_name(text):
        raise RemoteError(transport.url + "/" + path, "not a ref: %r is not an image digest" % raw[:80])
    return text.decode("ascii")


def _image(store: Store, transport: Any, digest: str, limit: int) -> Tuple[Optional[bytes], ImageObjects]:
    """(bytes fetched, or None if this store has the image; the objects it uses)."""
    if _have_image(store, digest):
        return None, store.image_objects(digest)
    path = "images/" + digest
    shown = transport.url + "/" + path
    try:
        data = transport.get_small(path, limit)
    except RemoteNotFound:
        raise RemoteError(shown, "the image the ref names is not there (the remote store is damaged)") from None
    actual = fsverity_digest.digest_bytes(data).hex()
    if actual != digest:
        raise RemoteError(shown, "image digest is %s, not the %s its ref names: refused (changed or corrupted "
                                 "on the server or in transit)" % (actual, digest))
    try:
        needed = image_data_objects(data)
    except ComposefsError as exc:
        raise RemoteError(shown, "not a usable composefs image: %s" % exc) from None
    if needed.problems:
        raise RemoteError(shown, "cannot be stored: %s%s" % (
            needed.problems[0], " (and %d more problems)" % (len(needed.problems) - 1) if len(needed.problems) > 1 else ""))
    return data, needed


def _image_signature(transport: Any, digest: str) -> Optional[bytes]:
    """The remote's ``images/<digest>.sig`` (fs-verity built-in signature), None if it has none.

    Only its form is checked here; the kernel checks the signature itself
    when the image gets fs-verity (a refusal publishes nothing).
    """
    from .fsverity_sig import MAX_SIGNATURE_SIZE, check_signature_der

    path = "images/%s.sig" % digest
    try:
        data = transport.get_small(path, MAX_SIGNATURE_SIZE)
    except RemoteNotFound:
        return None
    try:
        check_signature_der(data, "the signature")
    except ComposefsError as exc:
        raise RemoteError(transport.url + "/" + path, "not a usable fs-verity signature: %s" % exc) from None
    return data


def _have_image(store: Store, digest: str) -> bool:
    """This store has ``images/<digest>`` and it is intact (images are small: checked, not trusted)."""
    try:
        fd = store.open_image(check_digest_hex(digest))
    except FileNotFoundError:
        return False
    except StoreError:
        return False  # not a regular file: write_image will say so
    try:
        return fsverity_digest.digest_fd(fd).hex() == digest
    finally:
        os.close(fd)


def _missing(store: Store, batch: ObjectBatch, needed: ImageObjects) -> List[Tuple[str, int, bool]]:
    """(hex, size, damaged) of the objects not in the store, or there with the wrong size (damaged).

    Largest first, so that the last transfers are short ones.
    """
    out = []
    for hexd, size in needed.objects.items():
        try:
            st = batch.dir.lstat(bytes.fromhex(hexd))
        except UnsafePathError as exc:
            raise StoreError("%s: run 'composefs-store fsck --repair'" % exc) from None
        if st is None:
            out.append((hexd, size, False))
        elif not stat.S_ISREG(st.st_mode):
            raise StoreError("%s is not a regular file: run 'composefs-store fsck --repair'" % store.object_path(hexd).decode())
        elif st.st_size != size:
            out.append((hexd, size, True))
    out.sort(key=lambda item: (-item[1], item[0]))
    return out


def _check_fetched(store: Store, batch: ObjectBatch, missing: List[Tuple[str, int, bool]]) -> None:
    """Every object that was missing is now in the store, at its size: the ref may name the image.

    What was present before is still there (the shared lock keeps gc and
    fsck --repair out); what was fetched is checked again here, whatever
    the transfers reported, so that no path (a transfer process stopped
    from outside, a bug) can publish a ref to an image with holes.
    """
    for hexd, size, _damaged in missing:
        st = batch.dir.lstat(bytes.fromhex(hexd))
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise StoreError("%s: still missing after the pull; nothing was published for this image"
                             % store.object_path(hexd).decode("utf-8", "replace"))


class _Cancelled(Exception):
    """The pull stopped (another transfer failed, or an interrupt): drop this transfer."""


class TransferCounter:
    """Bytes and objects done so far, for the progress line and the commit schedule."""

    def __init__(self, objects: int, total: int, progress: Optional[Progress]) -> None:
        self.objects_total = objects
        self.bytes_total = total
        self.objects_done = 0
        self.bytes_done = 0
        self.stop = threading.Event()
        self._progress = progress
        self._lock = threading.Lock()
        self._last = 0.0

    def add(self, nbytes: int, objects: int = 0) -> None:
        with self._lock:
            self.bytes_done += nbytes
            self.objects_done += objects

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._progress is not None and (force or now - self._last >= 0.25):
            self._last = now
            self._progress(self.objects_done, self.objects_total, self.bytes_done, self.bytes_total)


class _VerifyingSink:
    """Writes a download into the staged file while computing its fs-verity digest."""

    def __init__(self, fd: int, size: int, counter: TransferCounter, url: str) -> None:
        self.fd = fd
        self.size = size
        self.counter = counter
        self.url = url
        self.got = 0
        self.hasher = fsverity_digest.FsVerityHasher(hold_gil=True)

    def write(self, view: memoryview) -> None:
        if self.counter.stop.is_set():
            raise _Cancelled()
        if self.got + len(view) > self.size:
            raise RemoteError(self.url, "is larger than the %d bytes its image says: refused" % self.size)
        pos = 0
        while pos < len(view):
            pos += os.write(self.fd, view[pos:])
        self.hasher.update(view)
        self.got += len(view)
        self.counter.add(len(view))

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.counter.add(-self.got)
        self.got = 0
        self.hasher = fsverity_digest.FsVerityHasher(hold_gil=True)

    def check(self, hexd: str) -> None:
        if self.got != self.size:
            raise RemoteError(self.url, "has %d bytes, its image says %d: refused (truncated or changed)" % (self.got, self.size))
        actual = self.hasher.hexdigest()
        if actual != hexd:
            raise RemoteError(self.url, "fs-verity digest is %s, not its name: refused (corrupted on the server "
                                        "or in transit)" % actual)


def _fetch(batch: ObjectBatch, transport: Any, missing: List[Tuple[str, int, bool]], jobs: int,
           progress: Optional[Progress], result: PullResult) -> None:
    """Fetch, verify and publish ``missing``; published in batches, the verified ones kept on an error."""
    if not missing:
        return
    counter = TransferCounter(len(missing), sum(item[1] for item in missing), progress)
    schedule = {"at": time.monotonic(), "bytes": 0}

    def tick() -> None:
        """Progress, and publish what is staged every so often (what a crash can cost)."""
        counter.report()
        now = time.monotonic()
        if counter.bytes_done - schedule["bytes"] >= COMMIT_BYTES or now - schedule["at"] >= COMMIT_SECONDS:
            batch.commit(close=False)
            schedule["at"], schedule["bytes"] = now, counter.bytes_done

    processes = _process_count(transport, missing, jobs)
    if processes > 1:
        from .pull_workers import fetch_in_processes

        fetched, error = fetch_in_processes(batch, transport, missing, jobs, processes, counter, tick)
    else:
        fetched, error = fetch_in_threads(batch, transport, missing, jobs, counter, tick)
    counter.report(force=True)
    if error is not None:
        # Every staged object was verified: keep them for the next attempt.
        try:
            batch.commit(close=False)
        except (OSError, ComposefsError):
            pass
        _account(result, fetched, batch)
        raise _explain(error, transport.url)
    batch.commit(close=False)
    _account(result, fetched, batch)


def _process_count(transport: Any, missing: List[Tuple[str, int, bool]], jobs: int) -> int:
    """How many processes share the transfers: one per CPU for a large pull, where the transport can fork.

    Hashing and the per-request work are Python code, which one process
    runs on one CPU at a time (the GIL); a pull of many objects is CPU-bound
    on a fast link, so it spreads over the CPUs, as ``hash_pool`` does for
    hashing files.
    """
    if not hasattr(transport, "after_fork") or not hasattr(os, "fork"):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    count = min(cpus, jobs, MAX_PROCESSES)
    if len(missing) < 4 * count or sum(item[1] for item in missing) < PROCESS_MIN_BYTES:
        return 1
    return count


def fetch_in_threads(batch: ObjectBatch, transport: Any, missing: List[Tuple[str, int, bool]], jobs: int,
                     counter: "TransferCounter", tick: Callable[[], None]) -> Tuple[List[Tuple[str, int]], Optional[BaseException]]:
    """Stage ``missing`` into ``batch`` with ``jobs`` threads: (objects staged, the error that stopped it).

    ``tick`` runs in the calling thread every quarter second; nothing is
    committed here.  On an error the other transfers stop (their temp files
    are removed); what was staged stays staged.
    """
    fetched: List[Tuple[str, int]] = []
    if not missing:
        return fetched, None
    fetched_lock = threading.Lock()

    def fetch_one(hexd: str, size: int, damaged: bool) -> None:
        if counter.stop.is_set():
            raise _Cancelled()
        path = "objects/%s/%s" % (hexd[:2], hexd[2:])
        url = transport.url + "/" + path

        def fill(fd: int) -> None:
            sink = _VerifyingSink(fd, size, counter, url)
            transport.stream(path, sink)
            sink.check(hexd)

        try:
            added = batch.add(fill, bytes.fromhex(hexd), size, replace=damaged)
        except RemoteNotFound:
            raise RemoteError(url, "not found: the image needs it (the remote store is incomplete)") from None
        counter.add(0, 1)
        if added:
            with fetched_lock:
                fetched.append((hexd, size))

    error: Optional[BaseException] = None
    pool = ThreadPoolExecutor(max_workers=min(jobs, len(missing)), thread_name_prefix="pull")
    futures: Set["Future[None]"] = set()
    try:
        futures = {pool.submit(fetch_one, *item) for item in missing}
        pending = futures
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
            error = _first_error(done)
            if error is not None or counter.stop.is_set():
                break
            tick()
    except BaseException as exc:  # an interrupt, or a commit that failed
        error = exc
    finally:
        counter.stop.set()
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)
    if error is None:
        error = _first_error(futures)
    return fetched, error


def _first_error(futures: Any) -> Optional[BaseException]:
    """The error that stopped the pull (not the cancellations it caused)."""
    found = None
    for future in futures:
        if future.cancelled():
            continue
        exc = future.exception()
        if exc is None or isinstance(exc, _Cancelled):
            continue
        if found is None or isinstance(found, RemoteError) and not isinstance(exc, RemoteError):
            found = exc
    return found


def _account(result: PullResult, fetched: List[Tuple[str, int]], batch: ObjectBatch) -> None:
    written = set(batch.written)
    for hexd, size in fetched:
        if bytes.fromhex(hexd) in written:
            result.objects_fetched += 1
            result.bytes_fetched += size


def _explain(error: BaseException, url: str) -> BaseException:
    """The error as the caller should see it: naming the remote where the message does not."""
    if isinstance(error, (ComposefsError, KeyboardInterrupt)):
        return error
    if isinstance(error, OSError):
        # A full disk or a failing store: the message says what was written where.
        return StoreError("pull from %s failed: %s" % (url, error.strerror or error))
    return error


__all__ = ["DEFAULT_JOBS", "PullResult", "pull"]
