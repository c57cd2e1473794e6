# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Bundles: a store's files in plain tar files, for nodes that reach no server.

A bundle is one or more uncompressed tar files whose members are named
exactly like the files of a store: ``meta.json``, ``refs/<ref>``,
``images/<digest>``, ``objects/XX/<62 hex>``, and when the sending store
has them, the ref's signed statement ``signatures/<ref>`` and the image's
fs-verity signature ``images/<digest>.sig``.  The controller writes them
(:func:`iter_bundles`, reading its store through the store's descriptors,
never through paths); the node reads them with :class:`BundleTransport`,
which is a transport for :func:`.pull.pull`: the pull verifies the image,
every object and (with trusted keys) the signed statement exactly as it
does over HTTP.  So a bundle is trusted for nothing: it only supplies bytes.

The reader still treats a bundle as hostile input, because it names files:
only regular-file members named like store files are accepted; links,
directories, devices, absolute names, ``..``, duplicates, data past the
end of the file or anything after the end-of-archive marker make the whole
bundle refused with a message naming the file and the member.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import fsverity_digest
from .errors import RemoteError, RemoteNotFound, StoreError
from .image_needs import ImageObjects
from .objects import ObjectDir
from .safe_dirs import UnsafePathError, open_regular
from .store import DIGEST_ALGORITHM, FORMAT_VERSION, OBJECTS, Store
from .store_image_sig import image_of_sig_name, read_image_signature, sig_name
from .store_names import check_digest_hex, is_hex_name, split_ref_name
from .store_signatures import read_signatures

#: Default size of one bundle file (one transfer); a larger single object gets a file of its own.
DEFAULT_BUNDLE_BYTES = 256 << 20
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_CHUNK = 256 * 1024
#: What may follow the last member: the end-of-archive blocks and the padding to a record.
_MAX_TRAILER = 2 * _BLOCK + _RECORD


def meta_json() -> bytes:
    """The ``meta.json`` of a bundle: the store format its files are in."""
    return (json.dumps({"format": FORMAT_VERSION, "digest": DIGEST_ALGORITHM}, sort_keys=True) + "\n").encode()


def object_member(hexd: str) -> str:
    return "objects/%s/%s" % (hexd[:2], hexd[2:])


def source_image(store: Store, ref: str) -> Tuple[str, ImageObjects]:
    """(digest, objects) of the image ``ref`` names in the sending store; the image's digest is checked.

    A damaged image would be refused by the node anyway; saying so here
    names the store that is damaged.
    """
    digest = store.read_ref(ref)
    fd = store.open_image(digest)
    try:
        actual = fsverity_digest.digest_fd(fd).hex()
    finally:
        os.close(fd)
    if actual != digest:
        raise StoreError("%s: images/%s has the fs-verity digest %s: the image is damaged (run 'composefs-store "
                         "fsck' on it)" % (os.fsdecode(store.path), digest, actual))
    return digest, store.image_objects(digest)


class BundleFile:
    """A finished bundle file: its path, the names of its members, its size in bytes."""

    def __init__(self, path: str, members: List[str], size: int) -> None:
        self.path = path
        self.members = members
        self.size = size


class BundleWriter:
    """Writes members into tar files of at most ``limit`` bytes each, one after the other.

    A member that does not fit in the current file starts a new one; a
    single member larger than ``limit`` gets a file of its own.  Files are
    named ``<prefix>-NNNN.tar`` in ``directory`` (created exclusively, mode
    0600).  :meth:`add` returns the file it completed, if any, so a caller
    can send and remove it before the next one is written.
    """

    def __init__(self, directory: str, prefix: str = "bundle", limit: int = DEFAULT_BUNDLE_BYTES) -> None:
        if limit < 1:
            raise StoreError("bundle size limit must be at least 1 byte (got %d)" % limit)
        self.directory = directory
        self.prefix = prefix
        self.limit = limit
        self.count = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._file: Optional[IO[bytes]] = None
        self._path = ""
        self._members: List[str] = []

    def add(self, name: str, size: int, fileobj: IO[bytes]) -> Optional[BundleFile]:
        """Add ``size`` bytes read from ``fileobj`` as the regular file ``name``."""
        done = None
        if self._tar is not None and self._members and self._projected(size) > self.limit:
            done = self.finish()
        if self._tar is None:
            self._open()
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        info.type = tarfile.REGTYPE
        tar = self._tar
        if tar is None:
            raise StoreError("bundle writer is closed")
        try:
            tar.addfile(info, fileobj)
        except OSError as exc:
            raise StoreError("%s: writing %s into it failed: %s" % (self._path, name, exc.strerror or exc)) from None
        self._members.append(name)
        return done

    def add_bytes(self, name: str, data: bytes) -> Optional[BundleFile]:
        return self.add(name, len(data), io.BytesIO(data))

    def _projected(self, size: int) -> int:
        """Size of the current file if a member of ``size`` bytes were its last (tar pads to records)."""
        if self._file is None:
            return 0
        return _file_size(self._file.tell() + member_cost(size))

    def _open(self) -> None:
        self.count += 1
        self._path = os.path.join(self.directory, "%s-%04d.tar" % (self.prefix, self.count))
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._members = []

    def finish(self) -> Optional[BundleFile]:
        """Complete the current file (flushed and closed); None if there is none."""
        tar, fobj = self._tar, self._file
        if tar is None or fobj is None:
            return None
        self._tar = self._file = None
        try:
            tar.close()
            fobj.flush()
            size = fobj.tell()
        finally:
            fobj.close()
        return BundleFile(self._path, self._members, size)

    def abort(self) -> None:
        """Close and remove an unfinished file (after an error)."""
        tar, fobj = self._tar, self._file
        self._tar = self._file = None
        if fobj is not None:
            fobj.close()
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
        del tar


def member_cost(size: int) -> int:
    """Bytes a member of ``size`` bytes takes in a tar file (its header and the data padded to a block)."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _file_size(members_end: int) -> int:
    """Size of a tar file whose members end at ``members_end``: end-of-archive blocks, padded to a record."""
    return -(-(members_end + 2 * _BLOCK) // _RECORD) * _RECORD


def pack_objects(sizes: Dict[str, int], limit: int = DEFAULT_BUNDLE_BYTES) -> List[List[str]]:
    """Objects (hex -> size) grouped into bundle files of at most ``limit`` bytes: first fit, largest first.

    A single object too large for ``limit`` gets a file of its own.  First
    fit decreasing leaves at most one file half empty or less, so the
    number of files (transfers) stays near the least possible.  Files with
    less room than a small member are no longer searched (the search stays
    short for hundreds of thousands of objects).
    """
    groups: List[List[str]] = []
    ends: List[int] = []
    open_bins: List[int] = []
    for hexd in sorted(sizes, key=lambda h: (-sizes[h], h)):
        cost = member_cost(sizes[hexd])
        for pos, index in enumerate(open_bins):
            if _file_size(ends[index] + cost) <= limit:
                break
        else:
            index = pos = -1
        if index < 0:
            groups.append([])
            ends.append(0)
            index = len(groups) - 1
            open_bins.append(index)
            pos = len(open_bins) - 1
        groups[index].append(hexd)
        ends[index] += cost
        if _file_size(ends[index] + 2 * _BLOCK) > limit:
            del open_bins[pos]
    return groups


def iter_bundles(store: Store, directory: str, groups: Iterable[Sequence[str]] = (), *, digest: Optional[str] = None,
                 ref: Optional[str] = None, limit: int = DEFAULT_BUNDLE_BYTES, prefix: str = "bundle",
                 signed: bool = False) -> Iterator[BundleFile]:
    """Write bundle files of ``store``'s files into ``directory``; yields each one once it is complete.

    With ``digest``: ``meta.json``, ``refs/<ref>`` (if ``ref``),
    ``images/<digest>`` and its ``images/<digest>.sig`` (when the store has
    one), and with ``signed`` the store's ``signatures/<ref>`` (when it has
    one: a statement names its ref, so it goes only under its own name) come
    first, in a file of their own.  Then the
    objects (hex digests) of each of ``groups`` (see :func:`pack_objects`),
    each group in a file of its own (split further if it exceeds ``limit``).  Everything is read through
    the store's directory descriptors (a symbolic link or non-regular file
    where an object belongs is refused).  Objects are copied as they are:
    the node verifies them.  The caller may remove a yielded file before
    asking for the next one.
    """
    writer = BundleWriter(directory, prefix, limit)
    objdir = ObjectDir(store.objects_dir, mode=None, follow=False, create=False, opener=lambda: store.dir_fd(OBJECTS))
    try:
        done: Optional[BundleFile] = None
        if digest is not None:
            check_digest_hex(digest)
            writer.add_bytes("meta.json", meta_json())
            if ref is not None:
                split_ref_name(ref)
                writer.add_bytes("refs/" + ref, (digest + "\n").encode("ascii"))
            fd = store.open_image(digest)
            with os.fdopen(fd, "rb") as image:
                done = writer.add("images/" + digest, os.fstat(image.fileno()).st_size, image)
            if done is not None:
                yield done
            extra = [("images/" + sig_name(digest).decode("ascii"), read_image_signature(store, digest))]
            if signed and ref is not None:
                extra.append(("signatures/" + ref, read_signatures(store, ref)))
            for name, data in extra:
                done = None if data is None else writer.add_bytes(name, data)
                if done is not None:
                    yield done
        for group in groups:
            if isinstance(group, str):
                raise StoreError("bundle groups are lists of object digests, not %r" % group[:80])
            done = writer.finish()
            if done is not None:
                yield done
            for hexd in group:
                done = _add_object(store, objdir, writer, hexd)
                if done is not None:
                    yield done
        done = writer.finish()
        if done is not None:
            yield done
    finally:
        writer.abort()
        objdir.close()


def _add_object(store: Store, objdir: ObjectDir, writer: BundleWriter, hexd: str) -> Optional[BundleFile]:
    name = object_member(check_digest_hex(hexd))
    shown = "%s/%s" % (os.fsdecode(store.path), name)
    try:
        fd = objdir.open_object(bytes.fromhex(hexd))
    except FileNotFoundError:
        raise StoreError("%s: the image needs it and it is missing: run 'composefs-store fsck'" % shown) from None
    except UnsafePathError as exc:
        raise StoreError("%s: refused: %s" % (shown, exc)) from None
    with os.fdopen(fd, "rb") as obj:
        return writer.add(name, os.fstat(obj.fileno()).st_size, obj)


class _Member:
    __slots__ = ("fd", "file", "offset", "size")

    def __init__(self, fd: int, file: str, offset: int, size: int) -> None:
        self.fd = fd
        self.file = file
        self.offset = offset
        self.size = size


def check_member_name(name: str) -> Optional[str]:
    """Why ``name`` is not the name of a store file (None if it is one)."""
    if not name or "\0" in name:
        return "an empty name or one with NUL"
    if name.startswith("/"):
        return "an absolute name"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "a name with an empty, '.' or '..' component"
    if name == "meta.json":
        return None
    if parts[0] in ("refs", "signatures") and len(parts) > 1:
        try:
            split_ref_name(name[len(parts[0]) + 1:])
        except StoreError as exc:
            return str(exc)
        return None
    if parts[0] == "images" and len(parts) == 2 and is_hex_name(parts[1]):
        return None
    if parts[0] == "images" and len(parts) == 2 and image_of_sig_name(parts[1]) is not None:
        return None
    if parts[0] == "objects" and len(parts) == 3 and is_hex_name(parts[1], 2) and is_hex_name(parts[2], 62):
        return None
    return ("not the name of a store file (meta.json, refs/REF, signatures/REF, images/DIGEST, images/DIGEST.sig, "
            "objects/XX/REST)")


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link (to %r)" % member.linkname
    if member.islnk():
        return "a hard link (to %r)" % member.linkname
    if member.isdir():
        return "a directory"
    if member.issparse():
        return "a sparse file"
    if member.isfifo():
        return "a FIFO"
    if member.isdev():
        return "a device"
    return "of tar type %r" % member.type


class BundleTransport:
    """A transport for :func:`.pull.pull` that reads the members of bundle files.

    All files are indexed when it is made (only tar headers are read); a
    member is then read with ``pread`` from its file (thread-safe: the pull
    reads several at once).  ``url`` names the bundle in messages (default:
    ``bundle:`` and the files' directory).
    """

    def __init__(self, paths: Sequence[str], url: Optional[str] = None) -> None:
        if not paths:
            raise StoreError("a bundle needs at least one file")
        dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
        self.url = url or "bundle:" + (dirs.pop() if len(dirs) == 1 else os.path.abspath(paths[0]))
        self.paths = list(paths)
        self._fds: List[int] = []
        self._members: Dict[str, _Member] = {}
        try:
            for path in self.paths:
                self._index(path)
        except BaseException:
            self.close()
            raise

    def _index(self, path: str) -> None:
        shown = "%s: bundle file %s" % (self.url, path)
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            raise RemoteError(self.url, "bundle file %s is missing" % path) from None
        except (UnsafePathError, OSError) as exc:
            raise RemoteError(self.url, "bundle file %s: %s" % (path, getattr(exc, "strerror", None) or exc)) from None
        self._fds.append(fd)
        file_size = os.fstat(fd).st_size
        try:
            with os.fdopen(os.dup(fd), "rb") as fobj, tarfile.open(fileobj=fobj, mode="r:") as tar:
                last_end = 0
                for member in tar:
                    name = member.name
                    why = check_member_name(name)
                    if why is not None:
                        raise RemoteError(shown, "member %r refused: %s" % (name, why))
                    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
                        raise RemoteError(shown, "member %s refused: it is %s, only regular files are accepted"
                                          % (name, _kind(member)))
                    if member.size < 0 or member.offset_data + member.size > file_size:
                        raise RemoteError(shown, "member %s (%d bytes) runs past the end of the file (%d bytes): "
                                                 "the file is truncated" % (name, member.size, file_size))
                    seen = self._members.get(name)
                    if seen is not None:
                        where = "" if seen.file == path else " (first in %s)" % seen.file
                        raise RemoteError(shown, "member %s appears twice%s: refused" % (name, where))
                    self._members[name] = _Member(fd, path, member.offset_data, member.size)
                    last_end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
        except tarfile.TarError as exc:
            raise RemoteError(shown, "not a readable tar file: %s" % exc) from None
        self._check_trailer(fd, last_end, file_size, shown)

    def _check_trailer(self, fd: int, end: int, file_size: int, shown: str) -> None:
        """After the last member only zero blocks may follow (tar stops at a damaged header silently)."""
        rest = file_size - end
        if rest > _MAX_TRAILER or os.pread(fd, rest, end).strip(b"\0"):
            raise RemoteError(shown, "unreadable data after offset %d (a damaged member header, or appended "
                                     "data): refused" % end)

    def _member(self, path: str) -> _Member:
        member = self._members.get(path)
        if member is None:
            raise RemoteNotFound("%s/%s" % (self.url, path), "not in the bundle")
        return member

    def get_small(self, path: str, limit: int) -> bytes:
        member = self._member(path)
        if member.size > limit:
            raise RemoteError("%s/%s" % (self.url, path), "is %d bytes, more than the %d accepted" % (member.size, limit))
        chunks: List[bytes] = []
        self._read(path, member, chunks.append)
        return b"".join(chunks)

    def stream(self, path: str, sink: Any) -> int:
        member = self._member(path)
        self._read(path, member, lambda chunk: sink.write(memoryview(chunk)))
        return member.size

    def _read(self, path: str, member: _Member, out: Callable[[bytes], Any]) -> None:
        pos, end = member.offset, member.offset + member.size
        while pos < end:
            try:
                chunk = os.pread(member.fd, min(_CHUNK, end - pos), pos)
            except OSError as exc:
                raise RemoteError("%s/%s" % (self.url, path), "reading bundle file %s failed: %s"
                                  % (member.file, exc.strerror or exc)) from None
            if not chunk:
                raise RemoteError("%s/%s" % (self.url, path), "bundle file %s is truncated (it shrank)" % member.file)
            out(chunk)
            pos += len(chunk)

    def names(self) -> List[str]:
        """The members of all files, sorted."""
        return sorted(self._members)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> "BundleTransport":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["DEFAULT_BUNDLE_BYTES", "BundleFile", "BundleTransport", "BundleWriter", "check_member_name", "iter_bundles",
           "member_cost", "meta_json", "object_member", "pack_objects", "source_image"]
