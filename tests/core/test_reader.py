# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The image reader: C-compatible semantics and hostile input.

Images come from our writer (byte-identical to C mkcomposefs, checked in
test_writer_oracle.py); the expected dumps below were taken from C
composefs-info 1.0.8 on the same images.  test_composefs_info.py compares the
two tools directly.
"""

from __future__ import annotations

import io
import mmap
import random
import struct
from typing import Dict, List, Tuple

import pytest
from dump_strategies import DIGEST, PAYLOAD, SAMPLE, nested_dirs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composefs_fleet import erofs_format as fmt
from composefs_fleet.dump import parse_dump, write_dump
from composefs_fleet.erofs_reader import image_version, read_image, read_image_file
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.errors import ImageError

# C composefs-info 1.0.8 `dump` of SAMPLE's image.
SAMPLE_DUMP = (
    "/ 4096 40755 3 0 0 0 1000.5 - - - trusted.overlay.opaque=x trusted.overlay.x=y user.foo=bar"
    " user.overlay.opaque=x security.selinux=ctx\n"
    "/00 0 20644 1 0 0 0 1000.5 - - -\n"
    "/blk 0 60600 1 0 0 2049 1000.5 - - -\n"
    "/d 57 40755 2 0 0 0 1000.5 - - - trusted.overlay.overlay.z=q\n"
    "/d/old 0 100600 1 70000 70000 0 -5.7 - - -\n"
    "/d/sym 3 120777 1 0 0 0 2000.0 foo - -\n"
    "/dev 0 20600 1 0 0 259 1000.5 - - -\n"
    "/fifo 0 10644 1 0 0 0 1000.5 - - -\n"
    "/file 100 100644 2 1 2 0 1000.5 {p} - {d} user.a=1\n"
    "/hl 100 @100644 2 1 2 0 1000.5 /file - {d} user.a=1\n"
    "/inl 5 100644 1 0 0 0 1000.5 - hello -\n"
    "/sock 0 140644 1 0 0 0 1000.5 - - -\n"
    "/wh 0 20644 1 0 0 0 1000.5 - - -\n"
).format(p=PAYLOAD, d=DIGEST).encode()


def make_image(text, **versions) -> bytes:
    if isinstance(text, str):
        text = text.encode()
    return build_image(parse_dump(io.BytesIO(text)), **versions)


def dump_of(root) -> bytes:
    out = io.BytesIO()
    write_dump(root, out)
    return out.getvalue()


def files(n: int, prefix: str = "/f", mtime: str = "1000.0") -> str:
    return "".join("%s%d 0 100644 1 0 0 0 %s - - -\n" % (prefix, i, mtime) for i in range(n))


ROOT = "/ 0 40755 2 0 0 0 1000.0 - - -\n"


# -- a minimal, independent view of the layout, for patching images ----------

def root_nid(img: bytes) -> int:
    return fmt.EROFS_SUPER.unpack_from(img, fmt.EROFS_SUPER_OFFSET)[5]


def inode_offset(img: bytes, nid: int) -> int:
    meta_blkaddr = fmt.EROFS_SUPER.unpack_from(img, fmt.EROFS_SUPER_OFFSET)[10]
    return meta_blkaddr * fmt.BLOCK_SIZE + nid * fmt.SLOT_SIZE


def dir_blocks(img: bytes, nid: int) -> List[Tuple[int, int]]:
    """(offset, size) of each dirent block of a compact directory inode."""
    off = inode_offset(img, nid)
    i_format, icount, _mode, _nlink, size, _, i_u = fmt.EROFS_INODE_COMPACT.unpack_from(img, off)[:7]
    assert i_format & 1 == 0, "test helper handles compact inodes only"
    layout = (i_format >> 1) & 7
    xattr_size = 0 if icount == 0 else 12 + (icount - 1) * 4
    full = size // fmt.BLOCK_SIZE if layout == fmt.EROFS_INODE_FLAT_INLINE else -(-size // fmt.BLOCK_SIZE)
    blocks = [(i_u * fmt.BLOCK_SIZE + i * fmt.BLOCK_SIZE, min(fmt.BLOCK_SIZE, size - i * fmt.BLOCK_SIZE))
              for i in range(full)]
    if layout == fmt.EROFS_INODE_FLAT_INLINE:
        blocks.append((off + 32 + xattr_size, size % fmt.BLOCK_SIZE))
    return blocks


def dirents(img: bytes, nid: int) -> Dict[bytes, Tuple[int, int]]:
    """name -> (child nid, absolute offset of its dirent)."""
    result = {}
    for start, size in dir_blocks(img, nid):
        block = img[start:start + size]
        count = fmt.EROFS_DIRENT.unpack_from(block, 0)[1] // 12
        offs = [fmt.EROFS_DIRENT.unpack_from(block, i * 12) for i in range(count)]
        for i, (child, nameoff, _t) in enumerate(offs):
            end = offs[i + 1][1] if i + 1 < count else size
            name = block[nameoff:end].split(b"\0")[0]
            result[name] = (child, start + i * 12)
    return result


def patched(img: bytes, offset: int, st: struct.Struct, *values) -> bytes:
    buf = bytearray(img)
    st.pack_into(buf, offset, *values)
    return bytes(buf)


def assert_rejected(img, match: "str | None" = None) -> str:
    with pytest.raises(ImageError, match=match) as info:
        read_image(img)
    return str(info.value)


# -- semantics ----------------------------------------------------------------

def test_sample_reads_like_c_composefs_info():
    root = read_image(make_image(SAMPLE))
    assert dump_of(root) == SAMPLE_DUMP


def test_sample_node_fields():
    root = read_image(make_image(SAMPLE))
    f = root.children[b"file"]
    assert f.payload == PAYLOAD.encode() and f.digest == bytes.fromhex(DIGEST)
    assert (f.size, f.nlink, f.uid, f.gid, f.content) == (100, 2, 1, 2, None)
    hl = root.children[b"hl"]
    assert hl.link_to is f and hl.resolve() is f and hl.mode == f.mode
    assert root.children[b"inl"].content == b"hello"
    wh = root.children[b"wh"]
    assert wh.is_whiteout() and wh.size == 0 and wh.xattrs == {}
    # The user's own 00 whiteout survives; the other 255 stubs do not.
    assert b"00" in root.children and b"01" not in root.children
    old = root.children[b"d"].children[b"old"]
    assert (old.mtime_sec, old.mtime_nsec, old.uid) == (-5, 7, 70000)
    assert root.children[b"dev"].rdev == 259 and root.children[b"blk"].rdev == 2049
    # Hidden: root opaque=y, whiteouts markers; unescaped: overlay.overlay.z.
    assert b"trusted.overlay.opaque" in root.xattrs and root.xattrs[b"trusted.overlay.opaque"] == b"x"
    assert not any(k.endswith(b"whiteouts") for k in root.xattrs)
    assert root.children[b"d"].xattrs == {b"trusted.overlay.overlay.z": b"q"}


def test_compact_inode_mtime_comes_from_build_time():
    img = make_image(ROOT.replace("1000.0", "77.3") + "/a 0 100644 1 0 0 0 77.3 - - -\n"
                     "/b 0 100644 1 0 0 0 99.0 - - -\n")
    root = read_image(img)
    a = root.children[b"a"]
    assert (a.mtime_sec, a.mtime_nsec) == (77, 3)
    assert (root.children[b"b"].mtime_sec, root.children[b"b"].mtime_nsec) == (99, 0)


def test_xattr_order_is_unshared_then_shared():
    text = (ROOT + "/f1 0 100644 1 0 0 0 1000.0 - - - user.a=1 user.b=shared user.c=2 trusted.z=sh2 security.x=u\n"
            "/f2 0 100644 1 0 0 0 1000.0 - - - user.b=shared trusted.z=sh2 user.d=3\n")
    root = read_image(make_image(text))
    assert list(root.children[b"f1"].xattrs) == [b"security.x", b"user.a", b"user.c", b"trusted.z", b"user.b"]
    assert list(root.children[b"f2"].xattrs) == [b"user.d", b"trusted.z", b"user.b"]


def test_redirect_payload_off_by_two_quirk():
    # libcomposefs reads the redirect value "/abc" two bytes too far: here the
    # next bytes are the 0xff chunk-index holes after the xattrs.
    text = (ROOT + "/f1 100 100644 1 0 0 0 1000.0 abc - -\n"
            "/f2 100 100644 1 0 0 0 1000.0 abcd - - user.z=1\n"
            "/f3 100 100644 1 0 0 0 1000.0 /abs - -\n"
            "/f4 100 100644 1 0 0 0 1000.0 efgh - -\n"
            "/f5 100 100644 1 0 0 0 1000.0 efgh - -\n")
    root = read_image(make_image(text))
    payloads = {name: node.payload for name, node in root.children.items() if name.startswith(b"f")}
    assert payloads == {b"f1": b"abc\xff\xff", b"f2": b"abcd", b"f3": b"/abs", b"f4": b"efgh", b"f5": b"efgh"}


def test_whiteouts_in_v1_image():
    text = ROOT + "/d 0 40755 2 0 0 0 1000.0 - - -\n/d/w 0 20000 1 0 0 0 1000.0 - - -\n"
    img = make_image(text)
    assert image_version(img) == 1
    root = read_image(img)
    d = root.children[b"d"]
    assert d.xattrs == {b"trusted.overlay.opaque": b"x", b"user.overlay.opaque": b"x"}
    assert d.children[b"w"].is_whiteout()
    assert image_version(make_image(ROOT + files(2))) == 0


def test_toplevel_filter():
    text = (ROOT + "/a 0 40755 2 0 0 0 1000.0 - - -\n/a/x 0 100644 1 0 0 0 1000.0 - - -\n"
            "/b 0 100644 1 0 0 0 1000.0 - - -\n/c 3 120777 1 0 0 0 1000.0 foo - -\n")
    img = make_image(text)
    root = read_image(img, toplevel_filter=[b"a", b"c", b"nope"])
    assert sorted(root.children) == [b"a", b"c"]
    assert list(root.children[b"a"].children) == [b"x"]
    assert read_image(img, toplevel_filter=[]).children == {}


def test_filter_changes_which_entry_owns_a_hardlink():
    text = (ROOT + "/a 10 100644 2 0 0 0 1000.0 - 0123456789 -\n/b 0 @100644 0 0 0 0 0.0 /a - -\n")
    img = make_image(text)
    full = read_image(img)
    assert full.children[b"b"].link_to is full.children[b"a"]
    only_b = read_image(img, toplevel_filter={b"b"})
    assert only_b.children[b"b"].link_to is None and only_b.children[b"b"].content == b"0123456789"


def test_input_types_and_files(tmp_path):
    img = make_image(SAMPLE)
    for data in (img, bytearray(img), memoryview(img), memoryview(bytearray(img)).cast("I")):
        assert dump_of(read_image(data)) == SAMPLE_DUMP
    path = tmp_path / "x.img"
    path.write_bytes(img)
    assert dump_of(read_image_file(path)) == SAMPLE_DUMP
    assert dump_of(read_image_file(str(path), toplevel_filter=[b"d"])).count(b"\n") == 4
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert dump_of(read_image(mm)) == SAMPLE_DUMP
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_image_file(empty)


def test_deep_nesting_and_big_directory():
    depth = 1500
    lines = [ROOT] + nested_dirs(depth, "a", "0 40755 2 0 0 0 1000.0 - - -")
    lines.append("/big 0 40755 2 0 0 0 1000.0 - - -\n")
    lines.append(files(3000, "/big/entry-with-a-longish-name-"))
    root = read_image(make_image("".join(lines)))
    node, seen = root, 0
    while b"a" in node.children:
        node = node.children[b"a"]
        seen += 1
    assert seen == depth
    assert len(root.children[b"big"].children) == 3000
    assert root.children[b"big"].size > 3 * fmt.BLOCK_SIZE


def test_long_names_symlinks_and_inline_sizes():
    name = "n" * 255
    target = "t" * 4000
    text = (ROOT + "/%s 0 100644 1 0 0 0 1000.0 - - -\n" % name
            + "/l 4000 120777 1 0 0 0 1000.0 %s - -\n" % target
            + "/c 4097 100644 1 0 0 0 1000.0 - %s -\n" % ("x" * 4097))
    root = read_image(make_image(text))
    assert name.encode() in root.children
    assert root.children[b"l"].payload == target.encode() and root.children[b"l"].size == 4000
    assert root.children[b"c"].content == b"x" * 4097


# -- hostile input --------------------------------------------------------------

def nested_image() -> bytes:
    return make_image(ROOT + "/loopdir 0 40755 2 0 0 0 1000.0 - - -\n"
                      "/loopdir/zzchild 0 40755 2 0 0 0 1000.0 - - -\n"
                      "/loopdir/zzchild/f 0 100644 1 0 0 0 1000.0 - - -\n" + files(3))


def test_header_and_superblock_checks():
    img = nested_image()
    assert_rejected(img[:4095], "too small")
    assert_rejected(b"", "too small")
    assert_rejected(patched(img, 0, struct.Struct("<I"), 0x12345678), "magic")
    assert_rejected(patched(img, 4, struct.Struct("<I"), 2), "header version")
    assert_rejected(patched(img, fmt.EROFS_SUPER_OFFSET, struct.Struct("<I"), 0), "EROFS superblock magic")
    assert_rejected(patched(img, fmt.EROFS_SUPER_OFFSET + 12, struct.Struct("<B"), 9), "block size")
    assert_rejected(patched(img, fmt.EROFS_SUPER_OFFSET + 80, struct.Struct("<I"), 0x2), "incompatible")
    assert_rejected(patched(img, fmt.EROFS_SUPER_OFFSET + 40, struct.Struct("<I"), 1 << 20), "beyond")
    assert_rejected(patched(img, fmt.EROFS_SUPER_OFFSET + 14, struct.Struct("<H"), 0xFFFF), "beyond")
    with pytest.raises(ImageError):
        image_version(b"\0" * 32)
    with pytest.raises(ImageError):
        image_version(b"")
    assert image_version(img) == 0


def test_directory_loop_is_rejected():
    img = nested_image()
    loopdir, _ = dirents(img, root_nid(img))[b"loopdir"]
    self_nid, _ = dirents(img, loopdir)[b"."]
    _, child_dirent = dirents(img, loopdir)[b"zzchild"]
    # loopdir/zzchild -> loopdir itself
    assert_rejected(patched(img, child_dirent, struct.Struct("<Q"), self_nid), "reached twice")
    # loopdir/zzchild -> the root
    assert_rejected(patched(img, child_dirent, struct.Struct("<Q"), root_nid(img)), "reached twice")


def test_dirent_nid_outside_the_image():
    img = nested_image()
    _, dirent = dirents(img, root_nid(img))[b"f0"]
    for nid in (len(img) // 32, len(img) // 32 - 1, 1 << 40, (1 << 64) - 1):
        assert_rejected(patched(img, dirent, struct.Struct("<Q"), nid))


def test_nameoff_out_of_order_or_out_of_range():
    img = nested_image()
    blocks = dir_blocks(img, root_nid(img))
    start, _size = blocks[0]
    first_nameoff = fmt.EROFS_DIRENT.unpack_from(img, start)[1]
    # second entry's name before the first one's
    assert_rejected(patched(img, start + 12 + 8, struct.Struct("<H"), first_nameoff - 1), "name offset")
    assert_rejected(patched(img, start + 12 + 8, struct.Struct("<H"), 0xFFFF), "name offset")
    # a table size that is no multiple of 12, or larger than the block
    assert_rejected(patched(img, start + 8, struct.Struct("<H"), first_nameoff + 1), "dirent table")
    assert_rejected(patched(img, start + 8, struct.Struct("<H"), 0xFFF0), "dirent table")


def test_bad_entry_names():
    """Names a directory block may not hold, first, in the middle or last in
    the block: the reader takes a well-formed block as a whole and any other
    entry by entry, and the error names the entry either way."""
    img = nested_image()
    root = root_nid(img)
    entries = dirents(img, root)
    start, _size = dir_blocks(img, root)[0]
    nameoff = {name: fmt.EROFS_DIRENT.unpack_from(img, off)[1] for name, (_nid, off) in entries.items()}
    name_at = {name: start + off for name, off in nameoff.items()}
    byte = struct.Struct("<B")
    assert_rejected(patched(img, name_at[b"f1"], byte, ord("/")), r"invalid entry name b'/1'")
    assert_rejected(patched(img, name_at[b"f0"] + 1, byte, ord("/")), r"invalid entry name b'f/'")
    assert_rejected(patched(img, name_at[b"loopdir"] + 2, byte, ord("/")), r"invalid entry name b'lo/pdir'")
    # "f1" made empty: its name offset is the next entry's
    assert_rejected(patched(img, entries[b"f1"][1] + 8, struct.Struct("<H"), nameoff[b"f2"]), r"invalid entry name b''")
    # A NUL ends a name: "f1" reads as "f", "." followed by one is no name at all.
    cut = read_image(patched(img, name_at[b"f1"] + 1, byte, 0))
    assert sorted(cut.children) == [b"f", b"f0", b"f2", b"loopdir"]
    assert_rejected(patched(img, name_at[b"f1"], struct.Struct("<BB"), ord("."), 0), r"invalid entry name b'\.'")
    assert dump_of(read_image(img)).count(b"\n") == 7  # the unpatched image reads


def test_absurd_sizes_and_counts():
    img = nested_image()
    root_off = inode_offset(img, root_nid(img))
    # directory claiming 2^32-1 bytes of entries (a million entries in 4 KiB)
    assert_rejected(patched(img, root_off + 8, struct.Struct("<I"), 0xFFFFFFFF), "beyond the end")
    # absurd xattr count on the root
    assert_rejected(patched(img, root_off + 2, struct.Struct("<H"), 0xFFFF))
    f_nid, _ = dirents(img, root_nid(img))[b"f0"]
    f_off = inode_offset(img, f_nid)
    # a regular file turned into an inline file of 4 GiB, then a chunked one with an index table
    assert_rejected(patched(img, f_off, struct.Struct("<HHHHI"), fmt.EROFS_INODE_FLAT_PLAIN << 1, 0, 0o100644, 1,
                            0xFFFFFFFF), "too large")
    chunked = patched(img, f_off, struct.Struct("<HHHHIII"), fmt.EROFS_INODE_CHUNK_BASED << 1, 0, 0o100644, 1,
                      100000, 0, fmt.EROFS_CHUNK_FORMAT_INDEXES)
    assert_rejected(chunked, "chunk format")
    compressed = patched(img, f_off, struct.Struct("<HHHHI"), fmt.EROFS_INODE_FLAT_COMPRESSION << 1, 0, 0o100644, 1,
                         100)
    assert_rejected(compressed, "layout")
    assert_rejected(patched(img, f_off + 4, struct.Struct("<H"), 0o170644), "mode")


def test_bad_xattrs():
    text = ROOT + "/f 0 100644 1 0 0 0 1000.0 - - - user.a=1 user.b=shared\n/g 0 100644 1 0 0 0 1000.0 - - - user.b=shared\n"
    img = make_image(text)
    f_nid, _ = dirents(img, root_nid(img))[b"f"]
    off = inode_offset(img, f_nid) + 32
    assert struct.unpack_from("<B", img, off + 4)[0] == 1  # one shared id
    assert_rejected(patched(img, off + 4, struct.Struct("<B"), 255), "shared xattr ids")
    assert_rejected(patched(img, off + 12, struct.Struct("<I"), 0xFFFFFFFF), "shared xattr")
    # the inline entry: unknown name index, then a value running off the area
    assert_rejected(patched(img, off + 17, struct.Struct("<B"), 0x80), "name index")
    assert_rejected(patched(img, off + 18, struct.Struct("<H"), 0xFFFF), "xattr")
    # an empty name (index 0, length 0) is invalid
    assert_rejected(patched(img, off + 16, struct.Struct("<BB"), 0, 0), "xattr name")


def test_shared_directory_blocks_exhaust_the_budget():
    # 200 empty directories all pointed at the data block of one big
    # directory: each would list its 300 entries again (as hard links).
    text = ROOT + "/big 0 40755 2 0 0 0 1000.0 - - -\n" + files(300, "/big/longish-name-") + \
        "".join("/e%03d 0 40755 2 0 0 0 1000.0 - - -\n" % i for i in range(200))
    img = make_image(text)
    entries = dirents(img, root_nid(img))
    big_nid, _ = entries[b"big"]
    big = fmt.EROFS_INODE_COMPACT.unpack_from(img, inode_offset(img, big_nid))
    assert big[4] > fmt.BLOCK_SIZE  # at least one full dirent block at big[6]
    buf = bytearray(img)
    for i in range(200):
        nid, _ = entries[b"e%03d" % i]
        off = inode_offset(img, nid)
        fields = list(fmt.EROFS_INODE_COMPACT.unpack_from(buf, off))
        fields[0] = fmt.EROFS_INODE_FLAT_PLAIN << fmt.EROFS_I_DATALAYOUT_BIT
        fields[4] = fmt.BLOCK_SIZE
        fields[6] = big[6]
        fmt.EROFS_INODE_COMPACT.pack_into(buf, off, *fields)
    assert_rejected(bytes(buf), "overlap or loop")


def valid_images() -> List[bytes]:
    return [make_image(SAMPLE), nested_image(),
            make_image(ROOT + "/d 0 40755 2 0 0 0 1000.0 - - -\n" + files(200, "/d/some-file-")
                       + "/x 5000 100644 1 0 0 0 1000.0 - %s -\n" % ("y" * 5000))]


def _read_or_reject(data: bytes):
    try:
        return read_image(data)
    except ImageError:
        return None


# Hang guards, not speed checks: a reader that loops on hostile input would
# never finish; one that merely runs slowly belongs in bench/.
@pytest.mark.timeout(300)
def test_truncations():
    for img in valid_images():
        full = dump_of(read_image(img))
        cuts = sorted(set(list(range(0, len(img), 61)) + [4095, 4096, 4097, len(img) - 1, len(img) - 4096]))
        for cut in cuts:
            root = _read_or_reject(img[:cut])
            # A cut in unused trailing space may still read, but never differently.
            if root is not None:
                assert dump_of(root) == full, "truncation at %d read differently" % cut


@pytest.mark.timeout(300)
def test_seeded_byte_flips():
    rng = random.Random(20240601)
    for img in valid_images():
        for _ in range(120):
            buf = bytearray(img)
            for _ in range(rng.choice((1, 1, 2, 4, 16))):
                # Mostly the metadata (first blocks), where flips matter.
                limit = len(buf) if rng.random() < 0.2 else min(len(buf), 3 * fmt.BLOCK_SIZE)
                buf[rng.randrange(limit)] ^= 1 << rng.randrange(8)
            _read_or_reject(bytes(buf))


@pytest.mark.fuzz
@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    which=st.integers(0, 2),
    edits=st.lists(
        st.tuples(st.integers(0, 3 * fmt.BLOCK_SIZE), st.sampled_from([1, 2, 4, 8]),
                  st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, 1 << 63]),
                            st.integers(0, 1 << 64))),
        min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 4 * fmt.BLOCK_SIZE)),
)
def test_fuzz_mutated_images(which, edits, cut):
    img = _FUZZ_IMAGES[which]
    buf = bytearray(img)
    for offset, width, value in edits:
        if offset + width <= len(buf):
            buf[offset:offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    data = bytes(buf if cut is None else buf[:cut])
    try:
        read_image(data)
    except ImageError:
        pass
    _objects_both_ways(data)  # the lean lister too: ImageError or a list, nothing else


_FUZZ_IMAGES = valid_images()


# -- the lean object lister (the agent's and gc's view of large images) --------

def _objects_both_ways(data: bytes):
    from composefs_fleet.image_needs import image_data_objects, image_objects

    try:
        tree = image_objects(read_image(data))
    except ImageError:
        tree = None
    try:
        lean = image_data_objects(data)
    except ImageError:
        lean = None
    return tree, lean


def test_lean_object_list_matches_the_tree():
    objects = "".join("/o%d 70000 100644 1 0 0 0 1000.0 %s/%s - %s\n" % (i, d[:2], d[2:], d)
                      for i, d in enumerate(("%02x" % i) * 32 for i in range(5)))
    extra = "/hl2 0 @100644 0 0 0 0 0.0 /o1 - -\n/d 0 40755 2 0 0 0 1000.0 - - -\n/d/o9 70000 100644 1 0 0 0 1000.0 %s - -\n" % PAYLOAD
    for img in valid_images() + [make_image(ROOT + objects + extra)]:
        tree, lean = _objects_both_ways(img)
        assert tree is not None and lean is not None
        assert lean.objects == tree.objects and lean.files == tree.files and lean.problems == tree.problems
    assert len(_objects_both_ways(make_image(ROOT + objects + extra))[1].objects) == 6


@pytest.mark.timeout(300)
def test_lean_object_list_on_hostile_images():
    """Flipped bytes: the lean lister raises ImageError or lists objects, never anything else;
    where the full reader accepts the image, both list the same objects."""
    rng = random.Random(20261123)
    for img in valid_images():
        for _ in range(120):
            buf = bytearray(img)
            for _ in range(rng.choice((1, 2, 4, 16))):
                limit = len(buf) if rng.random() < 0.2 else min(len(buf), 3 * fmt.BLOCK_SIZE)
                buf[rng.randrange(limit)] ^= 1 << rng.randrange(8)
            tree, lean = _objects_both_ways(bytes(buf))
            if tree is not None and lean is not None:
                assert lean.objects == tree.objects
