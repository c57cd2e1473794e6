# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Object store: a content-addressed repository of composefs images.

Layout of ``STORE``::

    meta.json             {"format": 1, "digest": "sha256"}; newer formats are refused
    objects/XX/YYYY...    file contents named by their fs-verity sha256 digest: the
                          ``basedir`` of every mount, the C ``mkcomposefs
                          --digest-store`` directory
    images/<digest>       composefs images, named by the fs-verity digest of the
                          image file (what ``mount -o digest=`` checks)
    images/<digest>.sig   its fs-verity built-in signature (PKCS#7 DER), when it is
                          signed (store_image_sig); given to the kernel with fs-verity
    refs/<name>           "<image digest>\\n"; names may contain "/" (subdirectories)
    signatures/<name>     the signed statement of ref <name>, when it is signed (ref_trust)
    oci/<digest>          the OCI manifest and config an image was imported from (oci_import)
    cache/digests         digest cache of source files (see store_cache)
    damaged/              where ``fsck --repair`` moves damaged objects and images
    lock, gate.lock, gc.lock   flock files (see store_lock)

Symbolic links inside the store are never followed: the root (given by the
user) and the directories above are opened once as directory descriptors
(the directories with ``O_NOFOLLOW``; a link there is refused) and every
read, write, rename and unlink works relative to them.  As with sshd's
StrictModes, the root and those directories must belong to the invoking
user or root and must not be group- or other-writable, unless the caller
allows it (``allow_foreign``).  New stores are mode 0700 (mounts read the
objects; nobody else needs to list them) unless created with the C tools'
0755 layout (``Store.init(mode=SHARED_MODE)``).

Nothing appears half-written: objects and images are written to a temp name
(``.tmp*``) in their directory, fsync-ed, given fs-verity where the
filesystem supports it, renamed into place and the directory fsync-ed.  An
add publishes bottom-up: objects (made durable), then the image, then the
ref, so whatever a crash leaves is either complete and reachable, or
unreferenced garbage for gc, or ``.tmp*`` debris.

Concurrency (the "never loses data" part):

* ``add-image`` holds ``STORE/lock`` shared from before it looks at the first
  object until its ref is durable.  Any number of adds run side by side.
  Two adds of the same content both write temp files and rename them onto
  the same name: identical bytes, stored once, both succeed.
* gc reads and parses every image reachable from refs and mounts *without*
  the lock (the slow part; adds keep running), then takes the lock
  exclusive, which waits until all running adds have finished, re-reads the
  refs and the mounts, parses the few images added meanwhile, lists the
  objects and removes what is unreachable: first images (and fsync), then
  objects, so a crash mid-sweep never leaves an image without its objects.
  While gc holds the lock no add is in flight, so every ``.tmp*`` file of
  ours is crash debris and goes too (``objects/.tmp*`` only after a grace
  period: the C ``mkcomposefs --digest-store`` writes there without our lock).
* A turnstile keeps new adds from starving a waiting gc (store_lock); the
  price: while gc waits for a long add (or a read-only fsck, which also
  holds the lock shared), new adds wait behind it.
* gc refuses to run rather than guess: a damaged ref, an unreadable image
  named by a ref, or an unreadable mounted composefs image stop it.
* Writers that bypass the lock (the C mkcomposefs writing into
  ``objects/``) must not run during a gc; add their image right after
  writing it.

Modules: this one (layout, directories, objects, images), store_refs (refs,
relative to ``refs/``), store_names (digest, object and ref names),
image_needs (the objects an image refers to),
store_add (add-image and the directory pipeline:
``store_add.add_image(store, source, ref)``; it builds on this module, never
the other way round), store_cache (digest cache), store_lock, store_gc,
store_fsck, store_stats; their errors are in errors.

Names are validated (store_names) before any path is built: object and image names must be
64 lowercase hex digits; ref names must be relative, without empty, ``.``,
``..`` or dot-leading components, NUL or newline, and are resolved (store_refs) one
component at a time with ``O_NOFOLLOW`` directory descriptors, so a symlink
planted under ``refs/`` cannot redirect a read or write outside the store.
"""

from __future__ import annotations

import json
import os
import stat
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from . import fsverity_digest, store_refs
from .atomic_file import write_atomic_at
from .errors import ForeignOwnerError, RefNotFound, StoreError, UnsafeStoreError, VeritySignatureError
from .image_needs import ImageObjects, image_fd_objects
from .json_text import MAX_JSON_BYTES, JsonFileError, is_int, load_json_object
from .objects import publish_bytes, same_file
from .safe_dirs import UnsafePathError, check_owner, ensure_dir, open_dir, open_regular
from .store_lock import StoreLock, WaitNotice, stderr_notice
from .store_names import check_digest_hex, is_hex_name, object_relpath
from .tree import DIGEST_SIZE, Node

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

FORMAT_VERSION = 1
DIGEST_ALGORITHM = "sha256"
META_NAME = b"meta.json"
OBJECTS = b"objects"
IMAGES = b"images"
REFS = b"refs"
DAMAGED = b"damaged"
CACHE = b"cache"
SIGNATURES = b"signatures"
OCI_ORIGINS = b"oci"

#: Store directories: opened without following links, owner-checked.
REQUIRED_DIRS = (OBJECTS, IMAGES, REFS)
OPTIONAL_DIRS = (CACHE, DAMAGED, SIGNATURES, OCI_ORIGINS)
#: Mode of a new store and its directories; SHARED_MODE is the C tools' layout.
PRIVATE_MODE = 0o700
SHARED_MODE = 0o755


# -- the store -----------------------------------------------------------------

class CacheFile:
    """A file in the store's ``cache/``, read and replaced through the directory's descriptor."""

    def __init__(self, store: "Store", name: bytes) -> None:
        self.store = store
        self.name = name
        self.path = os.path.join(store.path, CACHE, name)  # for messages

    def read(self, limit: int) -> Optional[bytes]:
        """At most ``limit`` bytes of the file; None if it is missing or not a regular file."""
        try:
            fd = open_regular(self.name, self.store.dir_fd(CACHE), os.fsdecode(self.path))
        except UnsafeStoreError:
            raise  # cache/ itself is unsafe: that is the store's problem, not a stale cache
        except (OSError, UnsafePathError):
            return None
        try:
            chunks = []
            while limit > 0:
                chunk = os.read(fd, min(limit, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                limit -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, data: bytes) -> None:
        """Replace the file atomically (``cache/`` is created if needed)."""
        write_atomic_at(self.store.dir_fd(CACHE, create=True), self.name, data, mode=0o644)


class Store:
    """A store directory (see the module docstring).

    The store's root (a path the user gave: a symlink there is followed) and
    its directories (``objects``, ``images``, ``refs``, ``cache``,
    ``damaged``) are opened once, the directories with ``O_NOFOLLOW``, and
    every operation works relative to those descriptors; a symbolic link
    where a store directory belongs is refused.  Like sshd's StrictModes,
    the root and its directories must belong to the invoking user or root
    and must not be writable by group or others, unless ``allow_foreign``
    says otherwise (:func:`.safe_dirs.check_owner`).  The ``*_dir`` and
    ``*_path`` attributes remain for messages and for tools given paths
    (a mount's ``basedir``).  :meth:`close` (or ``with``) releases the
    descriptors; they are also closed when the object is collected.
    """

    def __init__(self, path: PathLike, notice: Optional[WaitNotice] = stderr_notice,
                 allow_foreign: bool = False) -> None:
        self.path = os.fsencode(path)
        self.objects_dir = os.path.join(self.path, OBJECTS)
        self.images_dir = os.path.join(self.path, IMAGES)
        self.refs_dir = os.path.join(self.path, REFS)
        self.damaged_dir = os.path.join(self.path, DAMAGED)
        self.cache_path = os.path.join(self.path, CACHE, b"digests")
        self.allow_foreign = allow_foreign
        self._fds: Dict[bytes, int] = {}
        self._root_checked = False
        # Through a weak reference: a cycle would keep the descriptors open
        # until the cyclic garbage collector runs, not until the last use.
        this = weakref.ref(self)
        self.lock = StoreLock(self.path, notice, lambda: _root_fd_of(this))

    # ---- directory descriptors
    def root_fd(self) -> int:
        """The store directory (opened on first use; FileNotFoundError if there is none)."""
        fd = self._fds.get(b"")
        if fd is None or not self._root_checked:
            fd = self._open_root()
            self._check_owner(fd, self.path)
            self._root_checked = True
        return fd

    def _open_root(self) -> int:
        fd = self._fds.get(b"")
        if fd is None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except NotADirectoryError:
                raise StoreError("%s is not a directory" % os.fsdecode(self.path)) from None
            self._fds[b""] = fd
        return fd

    def dir_fd(self, name: bytes, create: bool = False) -> int:
        """The store directory ``name`` (OBJECTS, IMAGES, ...), opened without following a link.

        FileNotFoundError if it is missing (unless ``create``: then it is made
        with the mode of the store's root, at most 0755).  A symbolic link, a
        non-directory or a foreign owner is :class:`UnsafeStoreError`.
        """
        fd = self._fds.get(name)
        if fd is None:
            root = self.root_fd()
            full = os.path.join(self.path, name)
            try:
                if create:
                    fd, created = ensure_dir(name, root, PRIVATE_MODE, os.fsdecode(full))
                    if created:
                        os.fchmod(fd, stat.S_IMODE(os.fstat(root).st_mode) & SHARED_MODE | PRIVATE_MODE)
                else:
                    fd = open_dir(name, root, os.fsdecode(full))
            except UnsafePathError as exc:
                raise UnsafeStoreError("%s (a store directory must be a real directory)" % exc) from None
            self._fds[name] = fd
            self._check_owner(fd, full)
        return fd

    def _check_owner(self, fd: int, path: bytes) -> None:
        try:
            check_owner(os.fstat(fd), os.fsdecode(path), self.allow_foreign)
        except UnsafePathError as exc:
            self.close()
            raise ForeignOwnerError("%s: composefs-store --allow-foreign-owner or the module option "
                                    "allow_foreign_owner" % exc) from None

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        self._root_checked = False
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        fds = getattr(self, "_fds", None)
        if fds:
            self.close()

    # ---- creation and opening
    @classmethod
    def init(cls, path: PathLike, notice: Optional[WaitNotice] = stderr_notice, allow_foreign: bool = False,
             mode: int = PRIVATE_MODE) -> Tuple["Store", bool]:
        """Create (or re-open) a store; returns (store, created).

        A new store root (when it is created here) and its directories get
        ``mode``: PRIVATE_MODE (0700) by default, since objects are read
        through mounts and nobody else needs to list them, or SHARED_MODE
        (0755, the layout of the C tools).  An existing store keeps its modes.
        """
        if mode not in (PRIVATE_MODE, SHARED_MODE):
            raise StoreError("store mode %04o: only %04o (private) or %04o (shared layout)"
                             % (mode, PRIVATE_MODE, SHARED_MODE))
        store = cls(path, notice, allow_foreign)
        shown = os.fsdecode(store.path)
        parent = os.path.dirname(os.path.abspath(store.path).rstrip(b"/"))
        try:
            os.makedirs(parent, mode=SHARED_MODE, exist_ok=True)
        except OSError as exc:
            # makedirs says FileExistsError for a parent that is a file.
            why = "%s is not a directory" % os.fsdecode(parent) if isinstance(exc, FileExistsError) \
                else exc.strerror or str(exc)
            raise StoreError("cannot create %s: %s" % (shown, why)) from None
        try:
            os.mkdir(store.path, mode)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError("cannot create %s: %s" % (shown, exc.strerror or exc)) from None
        try:
            root = store._open_root()
        except FileNotFoundError:
            raise StoreError("cannot create %s: it is a dangling symbolic link" % shown) from None
        try:
            os.stat(META_NAME, dir_fd=root, follow_symlinks=False)
            store.check()
            return store, False
        except FileNotFoundError:
            pass
        # The directory becomes a store now (new, or an empty one such as a
        # fresh filesystem's root): it gets the store's mode, whatever the
        # umask or the mode it had, unless it is someone else's.  A directory
        # with other content keeps its mode (and must pass the owner check).
        if (os.fstat(root).st_uid in (0, os.geteuid())
                and all(name == "lost+found" for name in os.listdir(root))):
            os.fchmod(root, mode)
        root = store.root_fd()
        for sub in REQUIRED_DIRS:
            try:
                os.mkdir(sub, mode, dir_fd=root)
                created = True
            except FileExistsError:
                created = False
            fd = store.dir_fd(sub)
            if created:
                os.fchmod(fd, mode)
        body = json.dumps({"format": FORMAT_VERSION, "digest": DIGEST_ALGORITHM}, sort_keys=True) + "\n"
        write_atomic_at(root, META_NAME, body.encode(), mode=0o644)
        return store, True

    @classmethod
    def open(cls, path: PathLike, notice: Optional[WaitNotice] = stderr_notice,
             allow_foreign: bool = False) -> "Store":
        store = cls(path, notice, allow_foreign)
        store.check()
        return store

    def check(self) -> Dict[str, Any]:
        """Validate meta.json and the directories; StoreError saying what is wrong."""
        shown = os.fsdecode(self.path)
        meta_shown = os.fsdecode(os.path.join(self.path, META_NAME))
        not_a_store = StoreError("%s is not a composefs store (no meta.json); create one with "
                                 "'composefs-store --repo %s init'" % (shown, shown))
        try:
            root = self.root_fd()  # a foreign owner is ForeignOwnerError, not damage
        except FileNotFoundError:
            raise not_a_store from None
        try:
            fd = open_regular(META_NAME, root, meta_shown)
            try:
                raw = os.read(fd, MAX_JSON_BYTES + 1)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise not_a_store from None
        except UnsafePathError as exc:
            raise StoreError("%s: the store is damaged" % exc) from None
        except OSError as exc:
            raise StoreError("cannot read %s: %s" % (meta_shown, exc.strerror or exc)) from None
        try:
            meta = load_json_object(raw, "meta.json")
        except JsonFileError as exc:
            raise StoreError("%s: the store is damaged: %s" % (shown, exc)) from None
        check_meta(meta, shown)
        self.check_dirs()
        return meta

    def check_dirs(self) -> None:
        """Open every store directory: StoreError if a required one is missing or any is unsafe."""
        for sub in REQUIRED_DIRS:
            try:
                self.dir_fd(sub)
            except FileNotFoundError:
                raise StoreError("%s is missing: the store is damaged"
                                 % os.fsdecode(os.path.join(self.path, sub))) from None
        for sub in OPTIONAL_DIRS:
            try:
                self.dir_fd(sub)
            except FileNotFoundError:
                pass

    def cache_file(self, name: bytes) -> CacheFile:
        """The file ``cache/<name>`` (the digest cache, the image memo)."""
        return CacheFile(self, name)

    # ---- objects
    def object_path(self, hexdigest: str) -> bytes:
        return os.path.join(self.objects_dir, object_relpath(hexdigest))

    def object_state(self, hexdigest: str, size: Optional[int] = None) -> bool:
        """True if the object is present (and of ``size``); False if missing.

        A present but wrong entry (not a regular file, other size) is damage:
        StoreError, because trusting it would publish a broken image.
        """
        prefix, name = object_relpath(hexdigest).split(b"/")
        try:
            fd = open_dir(prefix, self.dir_fd(OBJECTS))
        except FileNotFoundError:
            return False
        except UnsafePathError:
            raise StoreError("objects/%s (for object %s) is not a directory: run 'fsck --repair'"
                             % (os.fsdecode(prefix), hexdigest)) from None
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError("object %s is not a regular file: run 'fsck --repair'" % hexdigest)
        if size is not None and st.st_size != size:
            raise StoreError("object %s has %d bytes, the image needs %d: it is damaged, run 'fsck --repair'"
                             % (hexdigest, st.st_size, size))
        return True

    def iter_object_dirs(self) -> Iterator[Tuple[bytes, int]]:
        """(prefix, descriptor) of every ``objects/XX`` directory, each open while the caller is at it.

        A symbolic link or non-directory named like one is skipped, never
        entered (fsck reports it).
        """
        try:
            objects = self.dir_fd(OBJECTS)
        except FileNotFoundError:
            return
        for name in sorted(_listdir_fd(objects)):
            if not is_hex_name(name, 2):
                continue
            try:
                fd = open_dir(name, objects)
            except (FileNotFoundError, UnsafePathError):
                continue
            try:
                yield name, fd
            finally:
                os.close(fd)

    def iter_objects(self) -> Iterator[Tuple[str, bytes, os.stat_result]]:
        """(hex, path, lstat) of every entry that looks like an object (names checked)."""
        for prefix, fd in self.iter_object_dirs():
            for name, st in object_entries(fd):
                yield (prefix + name).decode("ascii"), os.path.join(self.objects_dir, prefix, name), st

    # ---- images
    def image_path(self, hexdigest: str) -> bytes:
        return os.path.join(self.images_dir, check_digest_hex(hexdigest).encode("ascii"))

    def list_images(self) -> List[str]:
        try:
            names = _listdir_fd(self.dir_fd(IMAGES))
        except FileNotFoundError:
            return []
        return sorted(n.decode("ascii") for n in names if is_hex_name(n))

    def open_image(self, hexdigest: str) -> int:
        """A read descriptor of ``images/<hexdigest>``: a regular file, never through a link."""
        name = check_digest_hex(hexdigest).encode("ascii")
        try:
            return open_regular(name, self.dir_fd(IMAGES), "images/%s" % hexdigest)
        except UnsafePathError as exc:
            raise StoreError("%s: run 'fsck --repair'" % exc) from None

    def read_image(self, hexdigest: str) -> Node:
        """The tree of an image (the whole image in memory; :meth:`image_objects` is leaner)."""
        from .erofs_reader import read_image_fd

        fd = self.open_image(hexdigest)
        try:
            return read_image_fd(fd)
        finally:
            os.close(fd)

    def image_objects(self, hexdigest: str, progress: Optional[Callable[[], None]] = None) -> ImageObjects:
        """The objects ``images/<hexdigest>`` uses (with its size in ``image_bytes``).

        The one way fsck, gc, stats and the listings learn what an image
        needs: the lean lister, which keeps no tree in memory.
        """
        fd = self.open_image(hexdigest)
        try:
            return image_fd_objects(fd, progress)
        finally:
            os.close(fd)

    def write_image(self, data: bytes, signature: Optional[bytes] = None) -> Tuple[str, bool]:
        """Store image bytes under their fs-verity digest; (hex, written).

        Published like an object (:func:`.objects.publish_bytes`: temp file,
        fsync, fs-verity, rename, all relative to ``images/`` opened without
        following links).  A damaged image under that name is replaced.

        ``signature``: its fs-verity built-in signature (PKCS#7 DER,
        :mod:`.store_image_sig`).  It goes to FS_IOC_ENABLE_VERITY, so the
        kernel checks it against its ``.fs-verity`` keyring before the image
        is renamed into place (a refusal publishes nothing), and is then
        written as ``images/<digest>.sig``.  An image already present with
        fs-verity but without this signature in the kernel is written again
        (the kernel takes a signature only when verity is enabled).
        """
        from .fsverity_sig import check_signature_der
        from .store_image_sig import kernel_signature_missing, write_image_signature

        digest = fsverity_digest.digest_bytes(data)
        hexd = digest.hex()
        name = hexd.encode("ascii")
        shown = "images/%s" % hexd
        if signature is not None:
            signature = bytes(signature)
            check_signature_der(signature, "signature of %s" % shown)
        dir_fd = self.dir_fd(IMAGES)
        try:
            # Images are small: check it rather than publish a damaged one.
            present = same_file(dir_fd, name, len(data), digest, shown)
        except UnsafePathError:
            raise StoreError("%s is not a regular file: run 'fsck --repair'" % shown) from None
        if present and (signature is None or not kernel_signature_missing(self, hexd, signature)):
            if signature is not None:
                write_image_signature(self, hexd, signature)
            return hexd, False
        try:
            publish_bytes(dir_fd, self.images_dir, name, data, digest,
                          "image %s (%d bytes) into %s" % (shown, len(data), os.fsdecode(self.path)), signature)
        except VeritySignatureError as exc:
            # The kernel's answer without the temp file's name (enable_then_check's prefix).
            reason = exc.__cause__ if isinstance(exc.__cause__, VeritySignatureError) else exc
            raise VeritySignatureError("%s of %s: %s; nothing published" % (shown, os.fsdecode(self.path), reason)) from None
        if signature is not None:
            write_image_signature(self, hexd, signature)
        return hexd, True

    # ---- refs (:mod:`.store_refs`, relative to ``refs/``)
    def _refs_fd(self) -> int:
        return self.dir_fd(REFS)

    def read_ref(self, name: Union[str, bytes]) -> str:
        """The image digest ref ``name`` names; RefNotFound naming the store and close matches."""
        try:
            return store_refs.read_ref(self._refs_fd, name)
        except RefNotFound as exc:
            raise RefNotFound("%s in the store %s%s" % (exc, os.fsdecode(self.path), self._close_refs(name))) from None

    def _close_refs(self, name: Union[str, bytes]) -> str:
        """``; did you mean ...`` for a missing ref: a typo or another version is the usual cause."""
        import difflib

        try:
            refs = self.list_refs()
        except (OSError, StoreError):
            return ""
        if not refs:
            return " (it has no refs)"
        close = difflib.get_close_matches(os.fsdecode(name), refs, n=3, cutoff=0.6)
        if close:
            return "; close matches: %s" % ", ".join(close)
        return " (none of its %d refs is close; composefs-store refs lists them)" % len(refs)

    def read_ref_or_none(self, name: Union[str, bytes]) -> Optional[str]:
        """The ref's digest; None if it is missing or damaged (a writer then simply replaces it),
        or if the store does not exist yet (a plan for a store still to be made)."""
        try:
            return self.read_ref(name)
        except StoreError:
            return None
        except FileNotFoundError:
            return None

    def write_ref(self, name: Union[str, bytes], hexdigest: str) -> None:
        store_refs.write_ref(self._refs_fd, name, hexdigest)

    def remove_ref(self, name: Union[str, bytes]) -> str:
        """Delete a ref (and its directories left empty) and its signature; returns the digest it named."""
        try:
            target = store_refs.remove_ref(self._refs_fd, name)
        except RefNotFound as exc:
            # As read_ref: "composefs-store rm-ref app/v3" names the store and app/v1, app/v2.
            raise RefNotFound("%s in the store %s%s" % (exc, os.fsdecode(self.path), self._close_refs(name))) from None
        try:
            store_refs.remove_named(lambda: self.dir_fd(SIGNATURES), name, "signature of ref")
        except (FileNotFoundError, RefNotFound):
            pass
        return target

    def list_refs(self) -> List[str]:
        """Names of all refs (regular files under refs/, temp files and symlinks skipped)."""
        return store_refs.list_refs(self._refs_fd)

    def ref_targets(self) -> Dict[str, str]:
        """{ref: image digest} for every readable ref (damaged ones are left out)."""
        return store_refs.ref_targets(self._refs_fd)


def check_meta(meta: Dict[str, Any], shown: str) -> None:
    """A store's meta.json (of ours or of a remote's, named ``shown``) is one this tool can use."""
    if "format" not in meta or "digest" not in meta:
        raise StoreError("%s: meta.json is damaged (expected {\"format\": N, \"digest\": ...})" % shown)
    version = meta["format"]
    algorithm = meta["digest"]
    if not is_int(version) or version < 1:
        raise StoreError("%s: invalid store format %r in meta.json" % (shown, version))
    if version > FORMAT_VERSION:
        raise StoreError("%s: store format %d is newer than this tool supports (%d); "
                         "use a newer composefs-fleet" % (shown, version, FORMAT_VERSION))
    if algorithm != DIGEST_ALGORITHM:
        raise StoreError("%s: digest algorithm %r is not supported (only %s)"
                         % (shown, algorithm, DIGEST_ALGORITHM))


def _root_fd_of(ref: "weakref.ReferenceType[Store]") -> int:
    store = ref()
    if store is None:
        raise StoreError("the store of this lock was closed")
    return store.root_fd()


def _listdir_fd(fd: int) -> List[bytes]:
    # os.listdir of a descriptor gives str names: back to the bytes they were.
    return [os.fsencode(name) for name in os.listdir(fd)]


def object_entries(dir_fd: int) -> Iterator[Tuple[bytes, os.stat_result]]:
    """(name, lstat) of the entries of an ``objects/XX`` directory named like objects."""
    for name in _listdir_fd(dir_fd):
        if not is_hex_name(name, 2 * DIGEST_SIZE - 2):
            continue
        try:
            yield name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue


__all__ = ["CacheFile", "Store", "check_meta", "object_entries"]
