# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The composefs EROFS on-disk format: struct layouts and constants, in one place.

The writer (:mod:`.erofs_writer`) and the reader (:mod:`.erofs_reader`) both
use these definitions; nothing else should hard-code an offset or a magic.
All integers are little-endian.  Field names follow the kernel's
``fs/erofs/erofs_fs.h`` and libcomposefs' ``lcfs-erofs.h``.
"""

from __future__ import annotations

import struct

# -- composefs header (32 bytes at offset 0) --------------------------------
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1  # LCFS_EROFS_VERSION: layout of this header
COMPOSEFS_FLAGS_HAS_ACL = 1 << 0
COMPOSEFS_VERSION_MAX = 1  # highest image format version we write and read
# magic, version, flags, composefs_version, unused[4]
COMPOSEFS_HEADER = struct.Struct("<IIII16x")

# -- EROFS superblock (128 bytes at offset 1024) ----------------------------
EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_MAGIC = 0xE0F5E1E2
EROFS_FEATURE_COMPAT_SB_CHKSUM = 0x1
EROFS_FEATURE_COMPAT_MTIME = 0x2
EROFS_FEATURE_COMPAT_XATTR_FILTER = 0x4
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos,
# build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid[16],
# volume_name[16], feature_incompat, u1, extra_devices, devt_slotoff,
# dirblkbits, xattr_prefix_count, xattr_prefix_start, packed_nid,
# xattr_filter_reserved, reserved2[23]
EROFS_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
if EROFS_SUPER.size != 128:
    raise AssertionError("EROFS_SUPER.size == 128")

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
SLOT_BITS = 5  # inodes are addressed in 32-byte slots: nid = offset >> 5
SLOT_SIZE = 1 << SLOT_BITS
# The first inode follows the superblock (composefs puts the root there).
INODES_START = EROFS_SUPER_OFFSET + EROFS_SUPER.size

# -- inodes -----------------------------------------------------------------
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_COMPRESSION_LEGACY = 1
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_FLAT_COMPRESSION = 3
EROFS_INODE_CHUNK_BASED = 4
EROFS_INODE_LAYOUT_COMPACT = 0
EROFS_INODE_LAYOUT_EXTENDED = 1
EROFS_I_VERSION_MASK = 0x1
EROFS_I_DATALAYOUT_BIT = 1
EROFS_I_DATALAYOUT_MASK = 0x7
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x1F
EROFS_CHUNK_FORMAT_INDEXES = 0x20
EROFS_NULL_ADDR = 0xFFFFFFFF
EROFS_BLOCK_MAP_ENTRY_SIZE = 4
# i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_reserved, i_u, i_ino,
# i_uid, i_gid, i_reserved2
EROFS_INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
if EROFS_INODE_COMPACT.size != 32:
    raise AssertionError("EROFS_INODE_COMPACT.size == 32")
# i_format, i_xattr_icount, i_mode, i_reserved, i_size, i_u, i_ino, i_uid,
# i_gid, i_mtime, i_mtime_nsec, i_nlink, i_reserved2[16]
EROFS_INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
if EROFS_INODE_EXTENDED.size != 64:
    raise AssertionError("EROFS_INODE_EXTENDED.size == 64")
# Largest chunk: 2^(12 + 31) bytes, the most the 5-bit chunk format expresses here.
EROFS_CHUNK_BITS_MAX = BLOCK_BITS + 31
EROFS_CHUNKS_MAX = 1024

# -- xattrs -----------------------------------------------------------------
# h_name_filter, h_shared_count, h_reserved2[7]
EROFS_XATTR_IBODY_HEADER = struct.Struct("<IB7x")
if EROFS_XATTR_IBODY_HEADER.size != 12:
    raise AssertionError("EROFS_XATTR_IBODY_HEADER.size == 12")
# e_name_len, e_name_index, e_value_size
EROFS_XATTR_ENTRY = struct.Struct("<BBH")
EROFS_XATTR_INDEX_USER = 1
EROFS_XATTR_INDEX_POSIX_ACL_ACCESS = 2
EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT = 3
EROFS_XATTR_INDEX_TRUSTED = 4
EROFS_XATTR_INDEX_LUSTRE = 5
EROFS_XATTR_INDEX_SECURITY = 6
EROFS_XATTR_LONG_PREFIX = 0x80
EROFS_XATTR_FILTER_BITS = 32
EROFS_XATTR_FILTER_DEFAULT = 0xFFFFFFFF
EROFS_XATTR_FILTER_SEED = 0x25BBE08F
# Most shared xattrs one inode may reference (the C writer's limit).
EROFS_MAX_SHARED_XATTRS = 128

# Order matters: the first matching prefix wins (lcfs-writer-erofs.c).
XATTR_PREFIXES = (
    (b"user.", EROFS_XATTR_INDEX_USER),
    (b"system.posix_acl_access", EROFS_XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT),
    (b"trusted.", EROFS_XATTR_INDEX_TRUSTED),
    (b"security.", EROFS_XATTR_INDEX_SECURITY),
)
XATTR_PREFIX_BY_INDEX = {index: prefix for prefix, index in XATTR_PREFIXES}
XATTR_PREFIX_BY_INDEX[EROFS_XATTR_INDEX_LUSTRE] = b"lustre."

# -- directories ------------------------------------------------------------
# nid, nameoff, file_type, reserved
EROFS_DIRENT = struct.Struct("<QHBx")
if EROFS_DIRENT.size != 12:
    raise AssertionError("EROFS_DIRENT.size == 12")
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7
EROFS_FT_MAX = 8

# -- overlayfs xattrs composefs relies on -----------------------------------
OVERLAY_XATTR_PREFIX = b"trusted.overlay."
OVERLAY_XATTR_ESCAPED_PREFIX = b"trusted.overlay.overlay."
OVERLAY_XATTR_USERXATTR_PREFIX = b"user.overlay."
OVERLAY_XATTR_METACOPY = b"trusted.overlay.metacopy"
OVERLAY_XATTR_REDIRECT = b"trusted.overlay.redirect"
OVERLAY_XATTR_OPAQUE = b"trusted.overlay.opaque"
OVERLAY_XATTR_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
OVERLAY_XATTR_ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
OVERLAY_XATTR_ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
OVERLAY_XATTR_USERXATTR_WHITEOUT = b"user.overlay.whiteout"
OVERLAY_XATTR_USERXATTR_WHITEOUTS = b"user.overlay.whiteouts"
OVERLAY_XATTR_USERXATTR_OPAQUE = b"user.overlay.opaque"
# struct ovl_metacopy: version, len, flags, digest_algo, then the digest.
OVL_METACOPY_HEADER = struct.Struct("<BBBB")
OVL_METACOPY_VERSION = 0
OVL_METACOPY_DIGEST_ALGO_SHA256 = 1
XATTR_POSIX_ACL_ACCESS = b"system.posix_acl_access"
XATTR_POSIX_ACL_DEFAULT = b"system.posix_acl_default"
XATTR_SELINUX = b"security.selinux"


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def xattr_entry_index(key: bytes) -> tuple:
    """(e_name_index, suffix) for a full xattr name, as the C writer picks them."""
    for prefix, index in XATTR_PREFIXES:
        if key.startswith(prefix):
            return index, key[len(prefix):]
    return 0, key
