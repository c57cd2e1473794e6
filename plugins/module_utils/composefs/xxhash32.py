# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""xxHash32, as the kernel's lib/xxhash.c computes it.

EROFS uses it for the per-inode xattr name bloom filter; the writer must set
the same bits as the kernel tests, or lookups of existing xattrs would fail.
"""

from __future__ import annotations

_P1 = 2654435761
_P2 = 2246822519
_P3 = 3266489917
_P4 = 668265263
_P5 = 374761393
_M = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 13) * _P1) & _M


def xxh32(data: bytes, seed: int) -> int:
    seed &= _M
    length = len(data)
    pos = 0
    if length >= 16:
        v1 = (seed + _P1 + _P2) & _M
        v2 = (seed + _P2) & _M
        v3 = seed
        v4 = (seed - _P1) & _M
        limit = length - 16
        while pos <= limit:
            v1 = _round(v1, int.from_bytes(data[pos:pos + 4], "little"))
            v2 = _round(v2, int.from_bytes(data[pos + 4:pos + 8], "little"))
            v3 = _round(v3, int.from_bytes(data[pos + 8:pos + 12], "little"))
            v4 = _round(v4, int.from_bytes(data[pos + 12:pos + 16], "little"))
            pos += 16
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + length) & _M
    while pos + 4 <= length:
        h = (h + int.from_bytes(data[pos:pos + 4], "little") * _P3) & _M
        h = (_rotl(h, 17) * _P4) & _M
        pos += 4
    while pos < length:
        h = (h + data[pos] * _P5) & _M
        h = (_rotl(h, 11) * _P1) & _M
        pos += 1
    h ^= h >> 15
    h = (h * _P2) & _M
    h ^= h >> 13
    h = (h * _P3) & _M
    h ^= h >> 16
    return h
