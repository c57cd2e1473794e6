# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity: userspace digests and the kernel ioctls.

The digest is the one the kernel reports from ``FS_IOC_MEASURE_VERITY`` and
``fsverity digest`` (fsverity-utils) prints: a Merkle tree over fixed-size
blocks, the last block of every level zero-padded, an optional salt
(zero-padded to the hash's input block size) prepended to every hashed tree
or data block, and finally the hash of a 256-byte descriptor that records the
parameters, the file size and the root hash.  An empty file has an all-zero
root hash; a file of at most one block has that block's hash as root.

Performance note: hashlib releases the GIL while it hashes inputs of 2 KiB or
more, but each 4 KiB block is a separate release/re-acquire, and with several
hashing threads the GIL hand-offs cost more than the hashing itself (measured:
2 threads are slower than 1 at 4 KiB blocks, 2x faster at 64 KiB blocks).
So the file readers parallelise the *hashing* only for blocks of at least
:data:`PARALLEL_HASH_MIN_BLOCK`; for smaller blocks the extra thread reads
ahead (``preadv`` also runs without the GIL) while the caller's thread hashes.
"""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import os
import stat
import struct
import threading
from collections import deque
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Tuple, Union

from .errors import VerityError, VerityNotEnabled, VerityNotSupported
from .tree import digest_to_path

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = [
    "ALGORITHMS",
    "FsVerityHasher",
    "digest_bytes",
    "digest_fd",
    "digest_file",
    "digest_to_hex",
    "digest_to_path",
    "enable_verity",
    "measure_verity",
    "verity_enabled",
]

# name -> (FS_VERITY_HASH_ALG_* id, digest size, compression-function input size).
# The last column is what the salt is padded to, so that the salted prefix is a
# whole number of hash input blocks (the kernel then hashes it only once).
ALGORITHMS: Dict[str, Tuple[int, int, int]] = {
    "sha256": (1, 32, 64),
    "sha512": (2, 64, 128),
}
_ALGORITHM_NAMES = {alg_id: name for name, (alg_id, _size, _hexlen) in ALGORITHMS.items()}

MIN_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 65536
MAX_SALT_SIZE = 32  # the descriptor's salt field
MAX_DIGEST_SIZE = 64  # the descriptor's root_hash field (sha512)
DESCRIPTOR_SIZE = 256

# struct fsverity_descriptor (include/uapi/linux/fsverity.h, without the
# on-disk-only signature size, which is zero in the measured descriptor):
# version, hash_algorithm, log_blocksize, salt_size, reserved u32, data_size
# le64, root_hash[64], salt[32], reserved[144].
_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")
if _DESCRIPTOR.size != DESCRIPTOR_SIZE:
    raise AssertionError("_DESCRIPTOR.size == DESCRIPTOR_SIZE")

# Reads are this big so that syscall and per-chunk Python costs vanish next
# to hashing, yet a few in-flight buffers stay small.  A multiple of every
# supported block size.
READ_CHUNK = 4 << 20
PARALLEL_HASH_MIN_BLOCK = 16384


def _check_params(algorithm: str, block_size: int, salt: bytes) -> None:
    if algorithm not in ALGORITHMS:
        raise VerityError(
            "unsupported fs-verity hash algorithm %r (supported: %s)"
            % (algorithm, ", ".join(sorted(ALGORITHMS)))
        )
    if (
        not isinstance(block_size, int)
        or block_size < MIN_BLOCK_SIZE
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise VerityError(
            "invalid fs-verity block size %r: must be a power of two from %d to %d"
            % (block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
        )
    if len(salt) > MAX_SALT_SIZE:
        raise VerityError(
            "fs-verity salt is %d bytes, at most %d are allowed" % (len(salt), MAX_SALT_SIZE)
        )


def _block_hash_function(algorithm: str, salt: bytes) -> Callable[..., "hashlib._Hash"]:
    """Constructor ``f(data) -> hash object`` of one (salted) block hash."""
    constructor = getattr(hashlib, algorithm)
    if not salt:
        return constructor
    pad_to = ALGORITHMS[algorithm][2]
    padded = salt + bytes(-len(salt) % pad_to)
    # Hashing the padded salt once and copying that state per block is both
    # faster and exactly what the kernel does.
    prototype = constructor(padded)

    def salted(data: Union[bytes, memoryview]) -> "hashlib._Hash":
        h = prototype.copy()
        h.update(data)
        return h

    return salted


def _hash_blocks(new: Callable[..., "hashlib._Hash"], view: memoryview, block_size: int) -> bytes:
    """Concatenated hashes of the whole blocks of ``view`` (length is a multiple)."""
    # A list comprehension over memoryview slices is the cheapest per-block
    # path found (map/methodcaller and hash.copy() variants measured slower).
    return b"".join(
        [new(view[i : i + block_size]).digest() for i in range(0, len(view), block_size)]
    )


class FsVerityHasher:
    """Streaming fs-verity digest of data fed through :meth:`update`.

    Memory is one block per tree level: full blocks of a level are hashed into
    the next level as soon as they are complete.
    """

    def __init__(self, algorithm: str = "sha256", block_size: int = 4096, salt: bytes = b"") -> None:
        salt = bytes(salt)
        _check_params(algorithm, block_size, salt)
        self.algorithm = algorithm
        self.block_size = block_size
        self.salt = salt
        self.digest_size = ALGORITHMS[algorithm][1]
        self._new = _block_hash_function(algorithm, salt)
        self._size = 0
        # Partial data block not hashed yet.
        self._partial = bytearray()
        # _pending[i]: hashes of level-i blocks not yet grouped into a full
        # level-(i+1) block; _counts[i]: number of level-i blocks hashed.
        # Level 0 is the data.  The root is the hash of the lowest level that
        # has exactly one block.
        self._pending: List[bytearray] = []
        self._counts: List[int] = []

    @property
    def size(self) -> int:
        """Bytes fed so far (the ``data_size`` of the descriptor)."""
        return self._size

    def update(self, data: Union[bytes, bytearray, memoryview]) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        length = len(view)
        if not length:
            return
        self._size += length
        bs = self.block_size
        start = 0
        if self._partial:
            start = min(bs - len(self._partial), length)
            self._partial += view[:start]
            if len(self._partial) < bs:
                return
            self._push(0, self._new(self._partial).digest(), 1)
            self._partial = bytearray()
        end = start + (length - start) // bs * bs
        if end > start:
            self._push(0, _hash_blocks(self._new, view[start:end], bs), (end - start) // bs)
        if end < length:
            self._partial += view[end:]

    def _add_block_hashes(self, hashes: bytes, nbytes: int) -> None:
        """Feed ready-made hashes of ``nbytes`` (whole blocks) of data."""
        # Only valid on a block boundary; the file readers guarantee it.
        if self._partial or nbytes % self.block_size != 0:
            raise AssertionError("not self._partial and nbytes % self.block_size == 0")
        if nbytes:
            self._size += nbytes
            self._push(0, hashes, nbytes // self.block_size)

    def _push(
        self,
        level: int,
        hashes: bytes,
        nblocks: int,
        pending: Optional[List[bytearray]] = None,
        counts: Optional[List[int]] = None,
    ) -> None:
        # root_hash() passes copies so that finishing leaves the state intact.
        pending = self._pending if pending is None else pending
        counts = self._counts if counts is None else counts
        bs = self.block_size
        while True:
            if level == len(counts):
                counts.append(0)
                pending.append(bytearray())
            counts[level] += nblocks
            buf = pending[level]
            buf += hashes
            if len(buf) < bs:
                return
            # Whole blocks of hashes form the next level up.
            full = len(buf) // bs * bs
            view = memoryview(buf)
            hashes = _hash_blocks(self._new, view[:full], bs)
            nblocks = full // bs
            rest = bytes(view[full:])
            view.release()
            pending[level] = bytearray(rest)
            level += 1

    def root_hash(self) -> bytes:
        """Merkle tree root (all zeros for empty input, not padded to 64)."""
        if self._size == 0:
            return bytes(self.digest_size)
        bs = self.block_size
        pending = [bytearray(b) for b in self._pending]
        counts = list(self._counts)
        if self._partial:
            block = bytes(self._partial) + bytes(bs - len(self._partial))
            self._push(0, self._new(block).digest(), 1, pending, counts)
        level = 0
        while counts[level] != 1:
            if pending[level]:
                block = bytes(pending[level]) + bytes(bs - len(pending[level]))
                pending[level] = bytearray()
                self._push(level + 1, self._new(block).digest(), 1, pending, counts)
            level += 1
        return bytes(pending[level])

    def descriptor(self) -> bytes:
        """The 256-byte ``struct fsverity_descriptor`` whose hash is the digest."""
        return _DESCRIPTOR.pack(
            1,
            ALGORITHMS[self.algorithm][0],
            self.block_size.bit_length() - 1,
            len(self.salt),
            0,
            self._size,
            self.root_hash(),
            self.salt,
        )

    def digest(self) -> bytes:
        # The descriptor is hashed without the salt.
        return getattr(hashlib, self.algorithm)(self.descriptor()).digest()

    def hexdigest(self) -> str:
        return self.digest().hex()


def digest_bytes(
    data: Union[bytes, bytearray, memoryview],
    algorithm: str = "sha256",
    block_size: int = 4096,
    salt: bytes = b"",
) -> bytes:
    """fs-verity digest of an in-memory byte string."""
    hasher = FsVerityHasher(algorithm, block_size, salt)
    hasher.update(data)
    return hasher.digest()


def digest_to_hex(digest: bytes) -> str:
    """Lowercase hex, as ``fsverity digest`` and composefs-info print it."""
    return bytes(digest).hex()


class _ChunkReader:
    """Reads ``READ_CHUNK``-sized pieces of an fd into reusable buffers."""

    def __init__(self, fd: int, nbuffers: int) -> None:
        self.fd = fd
        self._free: List[bytearray] = [bytearray(READ_CHUNK) for _buffer in range(nbuffers)]
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        with self._lock:
            return self._free.pop()

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)

    def read(self, buf: bytearray, offset: int) -> int:
        """Fill ``buf`` from ``offset``; fewer bytes only at end of file."""
        got = 0
        view = memoryview(buf)
        try:
            while got < len(buf):
                n = _pread_into(self.fd, view[got:], offset + got)
                if n == 0:
                    break
                got += n
        finally:
            view.release()
        return got


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if _HAVE_PREADV:
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


_HAVE_PREADV = hasattr(os, "preadv")


def digest_fd(
    fd: int,
    algorithm: str = "sha256",
    block_size: int = 4096,
    salt: bytes = b"",
    threads: int = 1,
) -> bytes:
    """fs-verity digest of everything an fd holds, from offset 0 to EOF.

    Uses ``pread``, so the fd's file offset is left alone.  ``threads > 1``
    adds worker threads (see the module docstring for how they are used); the
    result is the same for any value.
    """
    return hash_fd(fd, algorithm, block_size, salt, threads).digest()


def hash_fd(
    fd: int,
    algorithm: str = "sha256",
    block_size: int = 4096,
    salt: bytes = b"",
    threads: int = 1,
) -> FsVerityHasher:
    """Like :func:`digest_fd`, but the hasher itself: ``.size`` tells how many
    bytes were hashed (callers check it against what they expected)."""
    hasher = FsVerityHasher(algorithm, block_size, salt)
    # Only a hint (the file may change); small files skip the thread start-up
    # and the big buffers, which would cost more than hashing them.
    size_hint = os.fstat(fd).st_size
    if threads <= 1 or size_hint <= READ_CHUNK:
        buf = bytearray(min(READ_CHUNK, -(-(size_hint + 1) // 65536) * 65536))
        reader = _ChunkReader(fd, 0)
        offset = 0
        while True:
            n = reader.read(buf, offset)
            if n == 0:
                break
            hasher.update(memoryview(buf)[:n])
            offset += n
            if n < len(buf):
                break
    elif block_size >= PARALLEL_HASH_MIN_BLOCK:
        _digest_parallel_hash(fd, hasher, threads)
    else:
        _digest_read_ahead(fd, hasher, threads)
    return hasher


def _digest_read_ahead(fd: int, hasher: FsVerityHasher, threads: int) -> None:
    """Worker threads read ahead; this thread hashes (see module docstring)."""
    inflight = max(1, threads - 1) + 1
    reader = _ChunkReader(fd, inflight + 1)

    def job(offset: int) -> Tuple[bytearray, int]:
        buf = reader.take()
        return buf, reader.read(buf, offset)

    from concurrent.futures import ThreadPoolExecutor  # costs ~10 ms to import

    with ThreadPoolExecutor(max_workers=max(1, threads - 1)) as pool:
        queue: Deque["Future[Tuple[bytearray, int]]"] = deque()
        next_offset = 0
        for _slot in range(inflight):
            queue.append(pool.submit(job, next_offset))
            next_offset += READ_CHUNK
        try:
            while queue:
                buf, n = queue.popleft().result()
                try:
                    if n:
                        hasher.update(memoryview(buf)[:n])
                finally:
                    reader.give(buf)
                if n < READ_CHUNK:
                    break
                queue.append(pool.submit(job, next_offset))
                next_offset += READ_CHUNK
        finally:
            for fut in queue:
                fut.cancel()


def _digest_parallel_hash(fd: int, hasher: FsVerityHasher, threads: int) -> None:
    """Worker threads read and hash whole chunks; results are fed in order."""
    bs = hasher.block_size
    new = hasher._new
    inflight = threads + 1
    reader = _ChunkReader(fd, inflight)

    def job(offset: int) -> Tuple[bytes, bytes, int]:
        buf = reader.take()
        try:
            n = reader.read(buf, offset)
            whole = n // bs * bs
            view = memoryview(buf)
            try:
                hashes = _hash_blocks(new, view[:whole], bs)
                tail = bytes(view[whole:n])
            finally:
                view.release()
            return hashes, tail, n
        finally:
            reader.give(buf)

    from concurrent.futures import ThreadPoolExecutor  # costs ~10 ms to import

    with ThreadPoolExecutor(max_workers=threads) as pool:
        queue: Deque["Future[Tuple[bytes, bytes, int]]"] = deque()
        next_offset = 0
        for _slot in range(inflight):
            queue.append(pool.submit(job, next_offset))
            next_offset += READ_CHUNK
        try:
            while queue:
                hashes, tail, n = queue.popleft().result()
                hasher._add_block_hashes(hashes, n - len(tail))
                if n < READ_CHUNK:
                    # Only end of file gives a short chunk (and so a tail).
                    hasher.update(tail)
                    break
                queue.append(pool.submit(job, next_offset))
                next_offset += READ_CHUNK
        finally:
            for fut in queue:
                fut.cancel()


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def digest_file(
    path: Union[str, bytes, "os.PathLike[str]"],
    algorithm: str = "sha256",
    block_size: int = 4096,
    salt: bytes = b"",
    threads: Optional[int] = None,
) -> bytes:
    """fs-verity digest of the file at ``path`` (threads default: min(4, CPUs))."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return digest_fd(fd, algorithm, block_size, salt, _default_threads() if threads is None else threads)
    finally:
        os.close(fd)


# --- ioctls ---------------------------------------------------------------

def _ioc_layout() -> Tuple[int, int, int, int]:
    """(size bits, _IOC_NONE, _IOC_READ, _IOC_WRITE) of this architecture."""
    machine = os.uname().machine.lower()
    # These use 13 size bits and 3 direction bits (arch/*/include/uapi/asm/ioctl.h);
    # everything else uses asm-generic/ioctl.h.
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return 13, 1, 2, 4
    return 14, 0, 2, 1


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    size_bits = _ioc_layout()[0]
    # nr: bits 0-7, type: 8-15, size: 16 up, direction above the size.
    return (direction << (16 + size_bits)) | (size << 16) | (ord(kind) << 8) | nr


def _iow(kind: str, nr: int, size: int) -> int:
    return _ioc(_ioc_layout()[3], kind, nr, size)


def _ior(kind: str, nr: int, size: int) -> int:
    return _ioc(_ioc_layout()[2], kind, nr, size)


def _iowr(kind: str, nr: int, size: int) -> int:
    layout = _ioc_layout()
    return _ioc(layout[2] | layout[3], kind, nr, size)


# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size,
# salt_ptr, sig_size, reserved, sig_ptr, reserved[11] (all native order).
_ENABLE_ARG = struct.Struct("=IIIIQIIQ88x")
if _ENABLE_ARG.size != 128:
    raise AssertionError("_ENABLE_ARG.size == 128")
# struct fsverity_digest: digest_algorithm u16, digest_size u16, digest[].
_DIGEST_HEADER = struct.Struct("=HH")

FS_IOC_ENABLE_VERITY = _iow("f", 133, _ENABLE_ARG.size)  # 0x40806685 on x86
FS_IOC_MEASURE_VERITY = _iowr("f", 134, _DIGEST_HEADER.size)  # 0xc0046686 on x86
# Declared with sizeof(long) although the kernel reads and writes an int.
FS_IOC_GETFLAGS = _ior("f", 1, struct.calcsize("l"))  # 0x80086601 on x86_64
FS_VERITY_FL = 0x00100000


def _errno_text(err: int) -> str:
    # errorcode maps 95 to the alias ENOTSUP; the ioctl docs say EOPNOTSUPP.
    name = "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errno.errorcode.get(err, "?")
    return "errno %d, %s" % (err, name)


_kernel_config_cache: List[Optional[bool]] = []


def _kernel_has_fsverity() -> Optional[bool]:
    """CONFIG_FS_VERITY of the running kernel, None when the config is not readable."""
    if _kernel_config_cache:
        return _kernel_config_cache[0]
    result: Optional[bool] = None
    candidates = [("/proc/config.gz", True), ("/boot/config-" + os.uname().release, False)]
    for path, compressed in candidates:
        try:
            import gzip  # rarely needed; kept out of every CLI start

            opener = gzip.open if compressed else open
            with opener(path, "rt", errors="replace") as config:  # type: ignore[operator]
                for line in config:
                    if line.startswith("CONFIG_FS_VERITY="):
                        result = True
                        break
                    if line.startswith("# CONFIG_FS_VERITY is not set"):
                        result = False
                        break
        except OSError:
            continue
        if result is not None:
            break
    _kernel_config_cache.append(result)
    return result


def _fs_type(fd: int) -> Optional[str]:
    """Filesystem type holding ``fd`` (from /proc/self/mountinfo), if found."""
    try:
        st = os.fstat(fd)
        wanted = "%d:%d" % (os.major(st.st_dev), os.minor(st.st_dev))
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and "-" in fields:
                    rest = fields[fields.index("-") + 1 :]
                    if rest:
                        return rest[0]
    except OSError:
        pass
    return None


def _not_supported(fd: int, err: int, operation: str) -> VerityNotSupported:
    fstype = _fs_type(fd) or "unknown"
    if _kernel_has_fsverity() is False:
        reason = "the running kernel is built without CONFIG_FS_VERITY"
    elif err == errno.ENOTTY:
        reason = "the filesystem (%s) does not implement fs-verity, or the kernel lacks it" % fstype
    else:
        reason = (
            "the filesystem (%s) has no fs-verity support enabled (ext4/f2fs need the "
            "'verity' feature, e.g. tune2fs -O verity), or the kernel lacks it" % fstype
        )
    return VerityNotSupported(
        "fs-verity is not supported: %s on %s: %s (%s)" % (operation, fstype, reason, _errno_text(err))
    )


def verity_enabled(fd: int) -> bool:
    """Whether the file has fs-verity; False wherever the question cannot be asked."""
    buf = bytearray(struct.calcsize("l"))
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    except OSError:
        # No FS_IOC_GETFLAGS on this filesystem: it cannot have verity files.
        return False
    return bool(struct.unpack_from("=I", buf)[0] & FS_VERITY_FL)


def measure_verity(fd: int) -> Tuple[str, bytes]:
    """Kernel-reported (algorithm name, digest) of a verity file."""
    buf = bytearray(_DIGEST_HEADER.pack(0, MAX_DIGEST_SIZE) + bytes(MAX_DIGEST_SIZE))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as exc:
        err = exc.errno or 0
        if err == errno.ENODATA:
            raise VerityNotEnabled(
                "fs-verity is not enabled on this file (%s)" % _errno_text(err)
            ) from exc
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise _not_supported(fd, err, "measure") from exc
        raise VerityError("FS_IOC_MEASURE_VERITY failed: %s (%s)" % (exc.strerror, _errno_text(err))) from exc
    alg_id, size = _DIGEST_HEADER.unpack_from(buf)
    name = _ALGORITHM_NAMES.get(alg_id, "unknown-%d" % alg_id)
    return name, bytes(buf[_DIGEST_HEADER.size : _DIGEST_HEADER.size + size])


_ENABLE_ERRORS = {
    errno.ETXTBSY: "file is open for writing (close all writable descriptors first)",
    errno.EPERM: "not permitted (append-only or immutable file, or missing capability)",
    errno.EACCES: "no write permission on the file",
    errno.EROFS: "read-only filesystem",
    errno.EFBIG: "file too large for fs-verity on this filesystem",
    errno.ENOSPC: "no space left for the Merkle tree",
    errno.EMSGSIZE: "salt or signature too large",
    errno.EINTR: "interrupted",
}


def enable_verity(fd: int, algorithm: str = "sha256", block_size: int = 4096, salt: bytes = b"") -> bool:
    """Enable fs-verity on a regular file opened read-only.

    Returns True when verity was enabled now and False when the file already
    had it (EEXIST) -- callers storing content-addressed objects treat both as
    success, but the existing parameters are not compared here; use
    :func:`measure_verity` for that.
    """
    salt = bytes(salt)
    _check_params(algorithm, block_size, salt)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise VerityError("fs-verity can only be enabled on regular files")
    # The kernel reads the salt through a user pointer: array.buffer_info()
    # gives the address of a buffer we keep alive across the call.
    salt_buf = array.array("B", salt or b"\0")
    arg = _ENABLE_ARG.pack(
        1,
        ALGORITHMS[algorithm][0],
        block_size,
        len(salt),
        salt_buf.buffer_info()[0] if salt else 0,
        0,
        0,
        0,
    )
    try:
        fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg)
    except OSError as exc:
        err = exc.errno or 0
        if err == errno.EEXIST:
            return False
        if err in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise _not_supported(fd, err, "enable") from exc
        if err == errno.EINVAL:
            # Parameters were validated above, so the filesystem refuses them
            # (ext4 before Linux 6.3: block size must equal the page size).
            raise VerityNotSupported(
                "fs-verity is not supported with block size %d and %s on this filesystem (%s) (%s)"
                % (block_size, algorithm, _fs_type(fd) or "unknown", _errno_text(err))
            ) from exc
        reason = _ENABLE_ERRORS.get(err, exc.strerror or "failed")
        raise VerityError("FS_IOC_ENABLE_VERITY failed: %s (%s)" % (reason, _errno_text(err))) from exc
    return True
