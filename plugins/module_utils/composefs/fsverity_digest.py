# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity digests computed in userspace (the kernel's side is :mod:`.fsverity_ioctl`).

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
So the file readers parallelise the *hashing* in threads only for blocks of
at least :data:`PARALLEL_HASH_MIN_BLOCK`.  For smaller blocks a file of at
least :data:`FORK_MIN_BYTES` is hashed by forked processes (each with its own
GIL; only from a process with no other thread, where fork is safe), and a
smaller one by the caller's thread while an extra thread reads ahead
(``preadv`` also runs without the GIL).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import deque
from typing import TYPE_CHECKING, Callable, Deque, Dict, List, Optional, Tuple, TypeVar, Union

from .errors import VerityError

if TYPE_CHECKING:
    import mmap
    from concurrent.futures import Future

__all__ = [
    "ALGORITHMS",
    "FsVerityHasher",
    "check_params",
    "digest_bytes",
    "digest_fd",
    "digest_file",
    "digest_to_hex",
    "hash_fd",
]

# name -> (FS_VERITY_HASH_ALG_* id, digest size, compression-function input size).
# The last column is what the salt is padded to, so that the salted prefix is a
# whole number of hash input blocks (the kernel then hashes it only once).
ALGORITHMS: Dict[str, Tuple[int, int, int]] = {
    "sha256": (1, 32, 64),
    "sha512": (2, 64, 128),
}

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
#: From this size on, a file hashed with threads > 1 at small blocks is split among forked processes.
FORK_MIN_BYTES = 64 << 20
#: Bytes of leaf hashes one fork round collects (the shared buffer): 1 GiB of data at 4 KiB sha256 blocks.
FORK_WINDOW_HASH_BYTES = 8 << 20


def check_params(algorithm: str, block_size: int, salt: bytes) -> None:
    """VerityError unless the kernel could take these fs-verity parameters."""
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


#: hashlib releases the GIL for inputs of at least this many bytes (HASHLIB_GIL_MINSIZE).
_GIL_MINSIZE = 2048


def _hash_blocks_holding_gil(new: Callable[..., "hashlib._Hash"], view: memoryview, block_size: int) -> bytes:
    """:func:`_hash_blocks`, fed in pieces under hashlib's GIL threshold, so the GIL is never released.

    Where many threads run (a pull's transfers), releasing the GIL for every
    4 KiB block makes the hashing thread queue for it again after each
    block (about 25 us instead of 3 per block, measured with 8 transfers);
    holding it costs ~7% more calls and lets the other threads' system
    calls run on the other CPUs meanwhile.
    """
    piece = _GIL_MINSIZE - 1
    out = []
    for start in range(0, len(view), block_size):
        end = start + block_size
        h = new(view[start:start + piece])
        pos = start + piece
        while pos < end:
            h.update(view[pos:min(pos + piece, end)])
            pos += piece
        out.append(h.digest())
    return b"".join(out)


class FsVerityHasher:
    """Streaming fs-verity digest of data fed through :meth:`update`.

    Memory is one block per tree level: full blocks of a level are hashed into
    the next level as soon as they are complete.
    """

    def __init__(self, algorithm: str = "sha256", block_size: int = 4096, salt: bytes = b"",
                 hold_gil: bool = False) -> None:
        salt = bytes(salt)
        # hold_gil: for a hasher among many busy threads (see _hash_blocks_holding_gil).
        self._hash_blocks = _hash_blocks_holding_gil if hold_gil else _hash_blocks
        check_params(algorithm, block_size, salt)
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
            self._push(0, self._hash_blocks(self._new, view[start:end], bs), (end - start) // bs)
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

    def _add_leaf_hashes(self, hashes: bytes, nbytes: int) -> None:
        """Feed the leaf hashes of ``nbytes`` of data, the last block zero-padded when
        ``nbytes`` is not a whole number of blocks: that ends the data."""
        if self._partial:
            raise AssertionError("not self._partial")
        if nbytes:
            self._size += nbytes
            self._push(0, hashes, -(-nbytes // self.block_size))

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
            hashes = self._hash_blocks(self._new, view[:full], bs)
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


def digest_fd(fd: int, algorithm: str = "sha256", block_size: int = 4096, salt: bytes = b"", threads: int = 1) -> bytes:
    """fs-verity digest of everything an fd holds, from offset 0 to EOF.

    Uses ``pread``, so the fd's file offset is left alone.  ``threads > 1``
    adds worker threads (see the module docstring for how they are used); the
    result is the same for any value.
    """
    return hash_fd(fd, algorithm, block_size, salt, threads).digest()


def hash_fd(fd: int, algorithm: str = "sha256", block_size: int = 4096, salt: bytes = b"",
            threads: int = 1) -> FsVerityHasher:
    """Like :func:`digest_fd`, but the hasher itself: ``.size`` tells how many
    bytes were hashed (callers check it against what they expected)."""
    hasher = FsVerityHasher(algorithm, block_size, salt)
    # Only a hint (the file may change); small files skip the thread start-up
    # and the big buffers, which would cost more than hashing them.
    size_hint = os.fstat(fd).st_size
    if threads <= 1 or size_hint <= READ_CHUNK:
        _digest_sequential(fd, hasher, 0, size_hint)
    elif block_size >= PARALLEL_HASH_MIN_BLOCK:
        _digest_parallel_hash(fd, hasher, threads)
    elif size_hint >= FORK_MIN_BYTES and _fork_is_safe():
        _digest_forked(fd, hasher, threads, size_hint)
    else:
        _digest_read_ahead(fd, hasher, threads)
    return hasher


def _digest_sequential(fd: int, hasher: FsVerityHasher, offset: int, size_hint: int) -> None:
    """Feed ``hasher`` from ``offset`` to the end of the file, in this thread."""
    buf = bytearray(min(READ_CHUNK, -(-(size_hint - offset + 1) // 65536) * 65536))
    reader = _ChunkReader(fd, 0)
    while True:
        n = reader.read(buf, offset)
        if n == 0:
            break
        hasher.update(memoryview(buf)[:n])
        offset += n
        if n < len(buf):
            break


def _fork_is_safe() -> bool:
    """Can this process fork hashing workers?  Not with other threads running (a
    lock one of them holds would stay locked in the child), nor without fork."""
    return hasattr(os, "fork") and threading.active_count() == 1


def _digest_forked(fd: int, hasher: FsVerityHasher, threads: int, size_hint: int) -> None:
    """Hash the file in rounds of up to 1 GiB, each shared by this process and forked ones.

    Every process takes ``READ_CHUNK``-sized pieces from a pipe of piece
    numbers (so a busy CPU gets fewer) and writes their leaf hashes into a
    shared anonymous mapping; this process then feeds them in order.  A
    child that fails or dies is no error: the pieces it did not finish are
    hashed here (which raises the real error, if any).
    """
    from .hash_pool import cpu_count

    bs = hasher.block_size
    slot = READ_CHUNK // bs * hasher.digest_size
    window = max(1, FORK_WINDOW_HASH_BYTES // slot)
    offset = 0
    while offset < size_hint:
        count = min(window, -(-(size_hint - offset) // READ_CHUNK))
        workers = min(threads, cpu_count(), count)
        for hashes, n in _hash_round(fd, hasher, offset, count, slot, workers):
            hasher._add_leaf_hashes(hashes, n)
            if n < READ_CHUNK:
                return  # end of file (sooner than the size said: the file shrank)
        offset += count * READ_CHUNK
    # The file grew since its size was read: the rest in this thread.
    _digest_sequential(fd, hasher, offset, offset)


_STATUS = struct.Struct("<q")  # bytes hashed of one piece; -1: not done


def _hash_round(fd: int, hasher: FsVerityHasher, offset: int, count: int, slot: int,
                workers: int) -> List[Tuple[bytes, int]]:
    """(leaf hashes, bytes) of ``count`` pieces from ``offset``, hashed by ``workers`` processes."""
    import mmap
    import sys

    from .hash_pool import reap

    bs, new = hasher.block_size, hasher._new
    status_size = count * _STATUS.size
    shared = mmap.mmap(-1, status_size + count * slot)  # MAP_SHARED: the children write into it
    try:
        for k in range(count):
            _STATUS.pack_into(shared, k * _STATUS.size, -1)
        tokens_r, tokens_w = os.pipe()
        children: List[int] = []
        try:
            # Written whole before any reader starts (at most 1 KiB per round, so the
            # pipe holds it); a read of 4 bytes then takes exactly one piece number.
            os.write(tokens_w, b"".join(struct.pack("<I", k) for k in range(count)))
            os.close(tokens_w)
            tokens_w = -1
            for _child in range(workers - 1):
                pid = os.fork()
                if pid == 0:
                    _hash_pieces_child(fd, tokens_r, shared, offset, slot, status_size, bs, new)
                children.append(pid)
            _hash_pieces(fd, tokens_r, shared, offset, slot, status_size, bs, new)
        finally:
            if tokens_w >= 0:
                os.close(tokens_w)
            os.close(tokens_r)
            # After an error here (an interrupt included), the children are stopped first.
            reap(children, kill=sys.exc_info()[0] is not None)
        results = []
        for k in range(count):
            (n,) = _STATUS.unpack_from(shared, k * _STATUS.size)
            if n < 0:  # a child did not finish it
                hashes, n = _hash_piece(fd, offset + k * READ_CHUNK, bytearray(READ_CHUNK), bs, new)
            else:
                start = status_size + k * slot
                hashes = shared[start:start + -(-n // bs) * hasher.digest_size]
            results.append((hashes, n))
        return results
    finally:
        shared.close()


def _hash_pieces_child(fd: int, tokens: int, shared: "mmap.mmap", offset: int, slot: int, status_size: int,
                       bs: int, new: Callable[..., "hashlib._Hash"]) -> None:
    """A forked worker: hash pieces until none is left, then exit, never returning into the caller."""
    code = 1
    try:
        _hash_pieces(fd, tokens, shared, offset, slot, status_size, bs, new)
        code = 0
    finally:
        os._exit(code)


def _hash_pieces(fd: int, tokens: int, shared: "mmap.mmap", offset: int, slot: int, status_size: int,
                 bs: int, new: Callable[..., "hashlib._Hash"]) -> None:
    buf = bytearray(READ_CHUNK)
    while True:
        token = os.read(tokens, 4)
        if len(token) < 4:
            return
        (k,) = struct.unpack("<I", token)
        hashes, n = _hash_piece(fd, offset + k * READ_CHUNK, buf, bs, new)
        start = status_size + k * slot
        shared[start:start + len(hashes)] = hashes
        _STATUS.pack_into(shared, k * _STATUS.size, n)


def _hash_piece(fd: int, offset: int, buf: bytearray, bs: int, new: Callable[..., "hashlib._Hash"]) -> Tuple[bytes, int]:
    """Leaf hashes of the piece at ``offset`` (its last block zero-padded) and its length."""
    n = _ChunkReader(fd, 0).read(buf, offset)
    whole = n // bs * bs
    view = memoryview(buf)
    try:
        hashes = _hash_blocks(new, view[:whole], bs)
        if whole < n:
            hashes += new(bytes(view[whole:n]) + bytes(bs - (n - whole))).digest()
    finally:
        view.release()
    return hashes, n


_Chunk = TypeVar("_Chunk")


def _chunks_in_order(job: Callable[[int], _Chunk], consume: Callable[[_Chunk], bool], workers: int,
                     inflight: int) -> None:
    """``job(offset)`` for every ``READ_CHUNK`` of a file on ``workers`` threads,
    ``inflight`` chunks ahead; ``consume`` gets the results in file order and
    returns False at the end of the file."""
    from concurrent.futures import ThreadPoolExecutor  # costs ~10 ms to import

    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: Deque["Future[_Chunk]"] = deque()
        next_offset = 0
        for _slot in range(inflight):
            queue.append(pool.submit(job, next_offset))
            next_offset += READ_CHUNK
        try:
            while queue:
                if not consume(queue.popleft().result()):
                    break
                queue.append(pool.submit(job, next_offset))
                next_offset += READ_CHUNK
        finally:
            for fut in queue:
                fut.cancel()


def _digest_read_ahead(fd: int, hasher: FsVerityHasher, threads: int) -> None:
    """Worker threads read ahead; this thread hashes (see module docstring)."""
    inflight = max(1, threads - 1) + 1
    reader = _ChunkReader(fd, inflight + 1)

    def job(offset: int) -> Tuple[bytearray, int]:
        buf = reader.take()
        return buf, reader.read(buf, offset)

    def consume(chunk: Tuple[bytearray, int]) -> bool:
        buf, n = chunk
        try:
            if n:
                hasher.update(memoryview(buf)[:n])
        finally:
            reader.give(buf)
        return n == READ_CHUNK

    _chunks_in_order(job, consume, max(1, threads - 1), inflight)


def _digest_parallel_hash(fd: int, hasher: FsVerityHasher, threads: int) -> None:
    """Worker threads read and hash whole chunks; results are fed in order."""
    bs = hasher.block_size
    new = hasher._new
    reader = _ChunkReader(fd, threads + 1)

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

    def consume(chunk: Tuple[bytes, bytes, int]) -> bool:
        hashes, tail, n = chunk
        hasher._add_block_hashes(hashes, n - len(tail))
        if n < READ_CHUNK:
            # Only end of file gives a short chunk (and so a tail).
            hasher.update(tail)
            return False
        return True

    _chunks_in_order(job, consume, threads, threads + 1)


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
