# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent hashes large objects in chunks (ticking its watchdog between them): same digest as the core."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from composefs_fleet import fsverity_digest
from composefs_fleet_agent.checks import DigestCache


@pytest.mark.parametrize("size", [0, 1, 4096, DigestCache.CHUNK, DigestCache.CHUNK + 1, 65 * DigestCache.CHUNK + 7])
def test_chunked_digest_matches_the_core(tmp_path: Path, size: int):
    data = os.urandom(min(size, 1 << 16)) * (size // (1 << 16) + 1)
    data = data[:size]
    path = tmp_path / "f"
    path.write_bytes(data)
    ticks = []
    cache = DigestCache(lambda: ticks.append(1))
    fd = os.open(path, os.O_RDONLY)
    try:
        got = cache.digest(fd, os.fstat(fd))
        again = cache.digest(fd, os.fstat(fd))
    finally:
        os.close(fd)
    assert got == again == fsverity_digest.digest_bytes(data).hex()
    assert len(ticks) == size // (64 * DigestCache.CHUNK)
    assert len(cache.entries) == 1
