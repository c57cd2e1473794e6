# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""fs-verity digests against ``fsverity digest`` (fsverity-utils), and the ioctls.

The kernel of the development machine has no fs-verity, so the ioctl tests
check the "not supported" outcomes there; on a kernel with CONFIG_FS_VERITY
the ext4 test enables verity for real and compares the kernel's measurement.
"""

from __future__ import annotations

import errno
import os
import platform
import random
import shutil
import subprocess
import tempfile

import pytest

from composefs_fleet import fsverity_digest, fsverity_ioctl, tree
from composefs_fleet.errors import VerityError, VerityMismatch, VerityNotEnabled, VerityNotSupported

# Data blocks per sha256 tree block with 4 KiB blocks, and the size just over
# the point where the tree needs a third level: up to 128 data blocks one
# level, up to 128*128 two levels.
HASHES_PER_BLOCK = 4096 // 32
THREE_LEVEL_SIZE = HASHES_PER_BLOCK * HASHES_PER_BLOCK * 4096 + 1


def _tool():
    path = shutil.which("fsverity")
    if path is None:
        pytest.skip("the 'fsverity' program (Debian package fsverity, fsverity-utils) is not in PATH")
    return path


@pytest.fixture(scope="module")
def fsverity_tool():
    return _tool()


def tool_digest(tool, path, algorithm="sha256", block_size=4096, salt=b"", extra=()):
    argv = [tool, "digest", str(path), "--hash-alg=" + algorithm, "--block-size=%d" % block_size]
    if salt:
        argv.append("--salt=" + salt.hex())
    out = subprocess.run(argv + list(extra), check=True, capture_output=True, text=True).stdout
    name, _, hexdigest = out.split()[0].partition(":")
    assert name == algorithm
    return bytes.fromhex(hexdigest)


def write(tmp_path, data, name="f"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


SALT = bytes(range(1, 20))  # 19 bytes: padded, not a multiple of anything


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1])
@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("salt", [b"", SALT], ids=["nosalt", "salt"])
def test_matches_fsverity_tool(fsverity_tool, tmp_path, size, algorithm, salt):
    data = random.Random(size).randbytes(size)
    path = write(tmp_path, data)
    expected = tool_digest(fsverity_tool, path, algorithm, 4096, salt)
    assert fsverity_digest.digest_bytes(data, algorithm, 4096, salt) == expected
    assert fsverity_digest.digest_file(path, algorithm, 4096, salt) == expected


@pytest.mark.parametrize("block_size", [1024, 2048, 65536])
@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
@pytest.mark.parametrize("salt", [b"", b"\xaa", bytes(range(32))], ids=["nosalt", "salt1", "salt32"])
def test_other_block_sizes(fsverity_tool, tmp_path, block_size, algorithm, salt):
    rnd = random.Random(block_size)
    # Sizes around the block and the first tree-level boundary (where that
    # stays small: 64 KiB blocks would need 64 MiB or more of random data).
    per_block = block_size // fsverity_digest.ALGORITHMS[algorithm][1]
    sizes = [block_size - 1, block_size + 1, 3 * block_size + 5]
    if per_block * block_size <= 1 << 20:
        sizes.append(per_block * block_size + 7)
    for size in sizes:
        data = rnd.randbytes(size)
        path = write(tmp_path, data)
        expected = tool_digest(fsverity_tool, path, algorithm, block_size, salt)
        assert fsverity_digest.digest_bytes(data, algorithm, block_size, salt) == expected, size


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_three_level_tree(fsverity_tool, tmp_path, algorithm):
    path = tmp_path / "big"
    # Sparse, with random bytes at the ends and at a tree-block boundary so
    # that different blocks at every level hash differently.
    rnd = random.Random(3)
    with open(path, "wb") as f:
        f.truncate(THREE_LEVEL_SIZE)
        for offset in (0, HASHES_PER_BLOCK * 4096 - 10, THREE_LEVEL_SIZE - 4097):
            f.seek(offset)
            f.write(rnd.randbytes(4097))
    tree_file = tmp_path / "merkle"
    expected = tool_digest(
        fsverity_tool, path, algorithm, extra=["--out-merkle-tree=%s" % tree_file]
    )
    if algorithm == "sha256":
        # 16385 data blocks -> 129 + 2 + 1 tree blocks: three levels indeed.
        assert tree_file.stat().st_size == (129 + 2 + 1) * 4096
    assert fsverity_digest.digest_file(path, algorithm, threads=1) == expected
    assert fsverity_digest.digest_file(path, algorithm, threads=2) == expected


def test_known_digests_without_tool():
    # From fsverity-utils 1.5, so these run where the tool is missing.
    assert fsverity_digest.digest_bytes(b"").hex() == (
        "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
    )
    assert fsverity_digest.digest_bytes(b"a").hex() == (
        "bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557"
    )
    assert fsverity_digest.digest_bytes(b"a", "sha512", 1024, b"\x00\xff").hex() == (
        "69df7b5f72a65e9496adaac91d0976d899351d48daad1ffa405d4a1e27481454"
        "a106b1027232b4f4ab9e5961bf4d4ed6c95872fa61c53f0b67b3a03cce66bd82"
    )


def test_empty_root_hash_is_zero():
    hasher = fsverity_digest.FsVerityHasher("sha512")
    assert hasher.root_hash() == bytes(64)
    descriptor = hasher.descriptor()
    assert len(descriptor) == 256
    assert descriptor[:4] == bytes([1, 2, 12, 0])


@pytest.mark.parametrize("salt", [b"", SALT], ids=["nosalt", "salt"])
def test_streaming_odd_chunks(salt):
    rnd = random.Random(7)
    data = rnd.randbytes(1024 * 1024 + 12345)
    expected = fsverity_digest.digest_bytes(data, salt=salt)
    hasher = fsverity_digest.FsVerityHasher(salt=salt)
    pos = 0
    while pos < len(data):
        step = rnd.choice([1, 3, 4095, 4096, 4097, 65537, 200000])
        hasher.update(memoryview(data)[pos : pos + step])
        pos += step
    assert hasher.digest() == expected
    # digest() does not finish the stream: more data can follow.
    assert hasher.digest() == expected
    assert hasher.hexdigest() == expected.hex()
    hasher.update(b"more")
    assert hasher.digest() == fsverity_digest.digest_bytes(data + b"more", salt=salt)
    assert hasher.size == len(data) + 4


def test_update_accepts_non_byte_buffers():
    import array

    words = array.array("I", range(3000))
    assert fsverity_digest.digest_bytes(words) == fsverity_digest.digest_bytes(words.tobytes())


@pytest.mark.parametrize("block_size", [4096, 65536])  # read-ahead path, parallel-hash path
def test_threads_equal_single_thread_and_offset_untouched(tmp_path, block_size):
    data = random.Random(block_size).randbytes(2 * fsverity_digest.READ_CHUNK + 4096 * 3 + 123)
    path = write(tmp_path, data)
    expected = fsverity_digest.digest_bytes(data, block_size=block_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 777, os.SEEK_SET)
        for threads in (1, 2, 3):
            assert fsverity_digest.digest_fd(fd, block_size=block_size, threads=threads) == expected, threads
        assert os.lseek(fd, 0, os.SEEK_CUR) == 777
    finally:
        os.close(fd)
    # An exact multiple of the read chunk ends with an empty read.
    path = write(tmp_path, data[: 2 * fsverity_digest.READ_CHUNK], "exact")
    assert fsverity_digest.digest_file(path, block_size=block_size, threads=2) == fsverity_digest.digest_bytes(
        data[: 2 * fsverity_digest.READ_CHUNK], block_size=block_size
    )


@pytest.mark.parametrize("block_size, salt, extra", [(4096, b"", 123), (1024, SALT, 0), (4096, SALT, 4096 * 5)])
@pytest.mark.parametrize("window", [8 << 20, 1])  # one round, one piece per round
def test_forked_workers_equal_single_thread(tmp_path, monkeypatch, block_size, salt, extra, window):
    # Large files are shared with forked processes; made to apply to a small file here.
    monkeypatch.setattr(fsverity_digest, "FORK_MIN_BYTES", 1)
    monkeypatch.setattr(fsverity_digest, "FORK_WINDOW_HASH_BYTES", window)
    data = random.Random(extra).randbytes(3 * fsverity_digest.READ_CHUNK + extra)
    path = write(tmp_path, data)
    hasher = fsverity_digest.FsVerityHasher(block_size=block_size, salt=salt)
    hasher.update(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fsverity_digest.hash_fd(fd, block_size=block_size, salt=salt, threads=2)
    finally:
        os.close(fd)
    assert (got.digest(), got.size) == (hasher.digest(), len(data))


def test_forked_worker_that_fails_is_replaced(tmp_path, monkeypatch):
    # A child that takes a piece and dies: this process hashes that piece too.
    monkeypatch.setattr(fsverity_digest, "FORK_MIN_BYTES", 1)
    monkeypatch.setattr(fsverity_digest, "_hash_pieces_child", lambda fd, tokens, *rest: (os.read(tokens, 4), os._exit(3)))
    forks = []
    real_fork = os.fork

    def counting_fork():
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", counting_fork)
    data = random.Random(5).randbytes(4 * fsverity_digest.READ_CHUNK + 77)
    path = write(tmp_path, data)
    assert fsverity_digest.digest_file(path, threads=2) == fsverity_digest.digest_bytes(data)
    assert forks == [1]


def test_no_fork_while_other_threads_run(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(fsverity_digest, "FORK_MIN_BYTES", 1)
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked with another thread running"))
    data = random.Random(6).randbytes(2 * fsverity_digest.READ_CHUNK + 5)
    path = write(tmp_path, data)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert fsverity_digest.digest_file(path, threads=2) == fsverity_digest.digest_bytes(data)
    finally:
        stop.set()
        other.join()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"algorithm": "md5"}, "unsupported fs-verity hash algorithm"),
        ({"block_size": 512}, "invalid fs-verity block size"),
        ({"block_size": 3000}, "invalid fs-verity block size"),
        ({"block_size": 131072}, "invalid fs-verity block size"),
        ({"salt": bytes(33)}, "at most 32"),
    ],
)
def test_invalid_parameters(kwargs, words):
    with pytest.raises(VerityError, match=words):
        fsverity_digest.FsVerityHasher(**kwargs)


def test_hex_and_path_helpers():
    digest = bytes(range(32))
    assert fsverity_digest.digest_to_hex(digest) == digest.hex()
    assert tree.digest_to_path(digest) == b"00/" + digest[1:].hex().encode()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reference values are for x86_64")
def test_ioctl_numbers():
    # linux/fsverity.h and linux/fs.h as compiled on x86_64.
    assert fsverity_ioctl.FS_IOC_ENABLE_VERITY == 0x40806685
    assert fsverity_ioctl.FS_IOC_MEASURE_VERITY == 0xC0046686
    assert fsverity_ioctl.FS_IOC_GETFLAGS == 0x80086601


# --- ioctls on real filesystems --------------------------------------------

def _kernel_without_verity():
    if fsverity_ioctl._kernel_has_fsverity() is not False:
        pytest.skip("needs a kernel known to lack CONFIG_FS_VERITY (/proc/config.gz or /boot/config-*)")


def _open_probe(directory):
    path = os.path.join(directory, "probe")
    with open(path, "wb") as f:
        f.write(b"verity probe\n" * 100)
    return os.open(path, os.O_RDONLY)


def _assert_not_supported(fd):
    assert fsverity_ioctl.verity_enabled(fd) is False
    with pytest.raises(VerityNotSupported, match="not supported") as measured:
        fsverity_ioctl.measure_verity(fd)
    with pytest.raises(VerityNotSupported, match="not supported") as enabled:
        fsverity_ioctl.enable_verity(fd)
    for exc in (measured.value, enabled.value):
        assert "errno" in str(exc)
        assert not isinstance(exc, VerityNotEnabled)
    return str(enabled.value)


def test_tmpfs_has_no_verity():
    # tmpfs never implements fs-verity, whatever the kernel.
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    directory = tempfile.mkdtemp(dir="/dev/shm")
    try:
        fd = _open_probe(directory)
        try:
            message = _assert_not_supported(fd)
            assert "tmpfs" in message and "errno %d" % errno.ENOTTY in message
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(directory)


def test_this_filesystem_without_kernel_support(tmp_path):
    _kernel_without_verity()
    fd = _open_probe(str(tmp_path))
    try:
        assert "CONFIG_FS_VERITY" in _assert_not_supported(fd)
    finally:
        os.close(fd)


def test_enable_rejects_non_regular(tmp_path):
    fd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        with pytest.raises(VerityError, match="regular files"):
            fsverity_ioctl.enable_verity(fd)
        assert fsverity_ioctl.verity_enabled(fd) is False
    finally:
        os.close(fd)


@pytest.fixture
def ext4_verity_mount(tmp_path):
    """A loop-mounted ext4 made with ``-O verity``."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounting ext4 needs root")
    for program in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(program) is None:
            pytest.skip("%s is not in PATH" % program)
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "verity", str(image)],
        check=True,
        capture_output=True,
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("cannot loop-mount an ext4 image: %s" % done.stderr.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.kernel
def test_ext4_with_verity_feature(ext4_verity_mount):
    data = b"verity probe\n" * 100
    path = ext4_verity_mount / "probe"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        if fsverity_ioctl._kernel_has_fsverity() is False:
            message = _assert_not_supported(fd)
            assert "CONFIG_FS_VERITY" in message and "errno %d" % errno.EOPNOTSUPP in message
            return
        # A kernel with fs-verity: the real thing.
        assert fsverity_ioctl.verity_enabled(fd) is False
        with pytest.raises(VerityNotEnabled):
            fsverity_ioctl.measure_verity(fd)
        assert fsverity_ioctl.enable_verity(fd) is True
        assert fsverity_ioctl.verity_enabled(fd) is True
        assert fsverity_ioctl.measure_verity(fd) == ("sha256", fsverity_digest.digest_bytes(data))
        assert fsverity_ioctl.enable_verity(fd) is False  # EEXIST: already enabled
    finally:
        os.close(fd)


# --- the helpers every caller uses (measure or none, enable then check, digest measured or computed) ---
# The host kernel has no fs-verity: the unsupported answers are real, the
# supported ones are the kernel's replies stood in for (the guest tests run them for real).

@pytest.fixture
def devs(monkeypatch):
    """A fresh shared "no fs-verity on this filesystem" cache."""
    cache = {}
    monkeypatch.setattr(fsverity_ioctl, "unsupported_devs", cache)
    return cache


class Kernel:
    """Stands in for FS_IOC_ENABLE_VERITY / FS_IOC_MEASURE_VERITY, counting the calls."""

    def __init__(self, monkeypatch, measured=None, enable_error=None, measure_error=None):
        self.measured = measured  # (algorithm, digest) once enabled, or None: no fs-verity yet
        self.enable_error = enable_error
        self.measure_error = measure_error
        self.calls = []
        monkeypatch.setattr(fsverity_ioctl, "enable_verity", self.enable)
        monkeypatch.setattr(fsverity_ioctl, "measure_verity", self.measure)

    def enable(self, fd, *args, **kwargs):
        self.calls.append("enable")
        if self.enable_error is not None:
            raise self.enable_error
        if self.measured is not None:
            return False  # EEXIST
        self.measured = ("sha256", fsverity_digest.digest_fd(fd))
        return True

    def measure(self, fd):
        self.calls.append("measure")
        if self.measure_error is not None:
            raise self.measure_error
        if self.measured is None:
            raise VerityNotEnabled("fs-verity is not enabled on this file (errno 61, ENODATA)")
        return self.measured


def _ro(path):
    return os.open(path, os.O_RDONLY)


def test_measure_or_none_unsupported_filesystem_is_none_and_asked_once(tmp_path, devs):
    # Real kernel: this filesystem (or kernel) has no fs-verity.
    paths = [write(tmp_path, b"a" * 100, "a"), write(tmp_path, b"b" * 100, "b")]
    fd = _ro(paths[0])
    try:
        st = os.fstat(fd)
        if fsverity_ioctl.verity_enabled(fd) or fsverity_ioctl._kernel_has_fsverity() is not False:
            pytest.skip("this kernel has CONFIG_FS_VERITY, or its config cannot be read (/proc/config.gz, /boot/config-*): the unsupported path needs a kernel without it (the guest tier covers the kernel with it)")
        assert fsverity_ioctl.measure_or_none(fd) is None
    finally:
        os.close(fd)
    assert "not supported" in devs[st.st_dev]
    # Asked once per filesystem: the second file is not measured at all.
    calls = []
    real = fsverity_ioctl.measure_verity
    fsverity_ioctl.measure_verity = lambda fd: calls.append(fd) or real(fd)
    try:
        fd = _ro(paths[1])
        try:
            assert fsverity_ioctl.measure_or_none(fd) is None
        finally:
            os.close(fd)
    finally:
        fsverity_ioctl.measure_verity = real
    assert calls == []


def test_measure_or_none_not_enabled_is_none_and_not_cached(tmp_path, devs, monkeypatch):
    kernel = Kernel(monkeypatch)
    fd = _ro(write(tmp_path, b"x" * 100))
    try:
        assert fsverity_ioctl.measure_or_none(fd) is None
        assert devs == {}
        kernel.measured = ("sha256", b"\1" * 32)
        assert fsverity_ioctl.measure_or_none(fd) == ("sha256", b"\1" * 32)
    finally:
        os.close(fd)


def test_measure_or_none_other_errors_raise(tmp_path, devs, monkeypatch):
    Kernel(monkeypatch, measure_error=VerityError("FS_IOC_MEASURE_VERITY failed: Bad address (errno 14, EFAULT)"))
    fd = _ro(write(tmp_path, b"x" * 100))
    try:
        with pytest.raises(VerityError, match="EFAULT"):
            fsverity_ioctl.measure_or_none(fd)
        with pytest.raises(VerityError, match="EFAULT"):
            fsverity_ioctl.digest_measured_or_computed(fd)
    finally:
        os.close(fd)
    assert devs == {}


def test_measure_or_none_device_answers_for_itself_not_its_filesystem(devs):
    # /dev/null says ENOTTY for its driver; /dev's other files may well have fs-verity.
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert fsverity_ioctl.measure_or_none(fd) is None
    finally:
        os.close(fd)
    assert devs == {}


def test_measure_or_none_uses_the_callers_cache(tmp_path, devs, monkeypatch):
    kernel = Kernel(monkeypatch, measure_error=VerityNotSupported("fs-verity is not supported: measure on x"))
    mine = {}
    fd = _ro(write(tmp_path, b"x" * 100))
    try:
        st = os.fstat(fd)
        assert fsverity_ioctl.measure_or_none(fd, st, mine) is None
        assert fsverity_ioctl.measure_or_none(fd, st, mine) is None
    finally:
        os.close(fd)
    assert kernel.calls == ["measure"] and mine == {st.st_dev: "fs-verity is not supported: measure on x"}
    assert devs == {}


def test_enable_then_check_unsupported_filesystem_is_reported_once(tmp_path, devs):
    # Real kernel, no fs-verity: a reason comes back, nothing is raised, and the
    # next file of the same filesystem does not ask the kernel again.
    if fsverity_ioctl._kernel_has_fsverity() is not False:
        pytest.skip("this kernel has CONFIG_FS_VERITY, or its config cannot be read (/proc/config.gz, /boot/config-*): the unsupported path needs a kernel without it (the guest tier covers the kernel with it)")
    data = b"x" * 100
    first = fsverity_ioctl.enable_then_check_path(bytes(write(tmp_path, data, "a")), fsverity_digest.digest_bytes(data))
    assert first is not None and "not supported" in first and "CONFIG_FS_VERITY" in first
    calls = []
    real = fsverity_ioctl.enable_verity
    fsverity_ioctl.enable_verity = lambda fd, *a: calls.append(fd) or real(fd, *a)
    try:
        again = fsverity_ioctl.enable_then_check_path(str(write(tmp_path, data, "b")), fsverity_digest.digest_bytes(data))
    finally:
        fsverity_ioctl.enable_verity = real
    assert again == first and calls == []


def test_enable_then_check_enables_and_checks(tmp_path, devs, monkeypatch):
    data = b"sealed" * 1000
    kernel = Kernel(monkeypatch)
    fd = _ro(write(tmp_path, data))
    try:
        assert fsverity_ioctl.enable_then_check(fd, fsverity_digest.digest_bytes(data), "f") is None
        # Re-measured after enabling, not trusted.
        assert kernel.calls == ["enable", "measure"]
        # Already enabled with the right digest: fine.
        assert fsverity_ioctl.enable_then_check(fd, fsverity_digest.digest_bytes(data), "f") is None
        assert fsverity_ioctl.digest_measured_or_computed(fd) == (fsverity_digest.digest_bytes(data), True)
    finally:
        os.close(fd)
    assert devs == {}


@pytest.mark.parametrize("measured", [("sha256", b"\1" * 32), ("sha512", b"\2" * 64)], ids=["other", "sha512"])
def test_enable_then_check_mismatch_names_the_file(tmp_path, devs, monkeypatch, measured):
    # Also a file that already had fs-verity with other content or another algorithm.
    Kernel(monkeypatch, measured=measured)
    data = b"x" * 100
    path = write(tmp_path, data)
    fd = _ro(path)
    try:
        with pytest.raises(VerityMismatch, match="does not match") as raised:
            fsverity_ioctl.enable_then_check(fd, fsverity_digest.digest_bytes(data), str(path))
    finally:
        os.close(fd)
    assert str(path) in str(raised.value) and measured[1].hex() in str(raised.value)
    assert (raised.value.algorithm, raised.value.measured) == measured


def test_enable_then_check_other_failure_raises_naming_the_file(tmp_path, devs, monkeypatch):
    Kernel(monkeypatch, enable_error=VerityError("FS_IOC_ENABLE_VERITY failed: no space left for the Merkle tree"))
    path = write(tmp_path, b"x" * 100)
    with pytest.raises(VerityError, match="no space") as raised:
        fsverity_ioctl.enable_then_check_path(str(path), b"\0" * 32)
    assert str(path) in str(raised.value) and not isinstance(raised.value, VerityMismatch)
    assert devs == {}  # not a property of the filesystem


def test_enable_then_check_refuses_what_is_not_a_regular_file(tmp_path, devs):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(VerityError, match="regular file"):
            fsverity_ioctl.enable_then_check(fd, b"\0" * 32, str(tmp_path))
    finally:
        os.close(fd)
    os.symlink(write(tmp_path, b"x"), tmp_path / "link")
    with pytest.raises(OSError) as raised:
        fsverity_ioctl.enable_then_check_path(str(tmp_path / "link"), b"\0" * 32)
    assert raised.value.errno == errno.ELOOP


def test_enable_then_check_path_relative_to_a_directory(tmp_path, devs, monkeypatch):
    data = b"y" * 5000
    write(tmp_path, data, "obj")
    kernel = Kernel(monkeypatch)
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fsverity_ioctl.enable_then_check_path(b"obj", fsverity_digest.digest_bytes(data), dir_fd=dirfd) is None
    finally:
        os.close(dirfd)
    assert kernel.measured == ("sha256", fsverity_digest.digest_bytes(data))


def test_digest_measured_or_computed(tmp_path, devs, monkeypatch):
    data = b"z" * 9000
    want = fsverity_digest.digest_bytes(data)
    fd = _ro(write(tmp_path, data))
    try:
        # No fs-verity here (real kernel, or no fs-verity on this file): computed from the fd.
        assert fsverity_ioctl.digest_measured_or_computed(fd) == (want, False)
        assert fsverity_ioctl.digest_measured_or_computed(fd, compute=lambda f: b"c" * 32) == (b"c" * 32, False)
        devs.clear()  # the real kernel's "not supported" for this filesystem
        kernel = Kernel(monkeypatch, measured=("sha256", b"\3" * 32))
        # The kernel's word is taken (that it matches the content is the kernel's business).
        assert fsverity_ioctl.digest_measured_or_computed(fd) == (b"\3" * 32, True)
        # Not sha256: the sha256 digest is computed instead.
        kernel.measured = ("sha512", b"\4" * 64)
        assert fsverity_ioctl.digest_measured_or_computed(fd, os.fstat(fd), {}) == (want, False)
    finally:
        os.close(fd)
