# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The image memo: an unchanged tree is not built again, and a memo entry can
never put a wrong image behind a ref."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from composefs_fleet import erofs_writer, store_image_memo
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.scan import build_tree_from_directory
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check

from store_fixtures import make_tree, store  # noqa: F401  (fixtures)


def memo_path(store) -> Path:
    return Path(os.fsdecode(store.path)) / "cache" / "images"


@pytest.fixture
def count_builds(monkeypatch):
    calls = []
    real = erofs_writer.build_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(erofs_writer, "build_image", counting)
    return calls


def expected_digest(src: Path, **options) -> str:
    from composefs_fleet import fsverity_digest

    root = build_tree_from_directory(os.fsencode(src), compute_digest=True)
    return fsverity_digest.digest_bytes(build_image(root, **options)).hex()


def test_unchanged_tree_is_not_built_again(store, tmp_path, make_tree, count_builds):
    src = tmp_path / "src"
    make_tree(src, 1)
    time.sleep(1.1)  # files younger than a second are never cached
    first = add_image(store, src, "r")
    assert len(count_builds) == 1 and memo_path(store).is_file()
    again = add_image(store, src, "r")
    assert len(count_builds) == 1, "the unchanged tree was built again"
    assert again.digest == first.digest == expected_digest(src)
    assert not again.image_written and again.objects_written == 0
    plan = add_image(store, src, "r", dry_run=True)
    assert len(count_builds) == 1 and plan.digest == first.digest and not plan.image_written
    # Other options are another key.
    v1 = add_image(store, src, "r1", min_version=1)
    assert len(count_builds) == 2 and v1.digest == expected_digest(src, min_version=1)
    # A changed file is another tree.
    (src / "tiny").write_bytes(b"y")
    changed = add_image(store, src, "r")
    assert len(count_builds) == 3 and changed.digest == expected_digest(src) != first.digest
    assert check(store).clean


def test_entry_whose_image_is_gone_or_differs_means_a_rebuild(store, tmp_path, make_tree, count_builds):
    src = tmp_path / "src"
    make_tree(src, 2)
    first = add_image(store, src, "r")
    memo = store_image_memo.ImageMemo(store.cache_file(b"images"))
    (key,) = memo.entries
    # The recorded size no longer matches the file: not used.
    memo.entries[key] = (first.digest, memo.entries[key][1] + 4096)
    memo.dirty = True
    memo.save(key)
    builds = len(count_builds)
    again = add_image(store, src, "r")
    assert len(count_builds) == builds + 1 and again.digest == first.digest
    # The image itself removed (as gc does after an rm-ref): rebuilt, stored again.
    store.remove_ref("r")
    os.unlink(store.image_path(first.digest))
    builds = len(count_builds)
    back = add_image(store, src, "r")
    assert len(count_builds) == builds + 1
    assert back.digest == first.digest and back.image_written
    assert check(store).clean


def test_damaged_memo_is_ignored(store, tmp_path, make_tree, count_builds):
    src = tmp_path / "src"
    make_tree(src, 4)
    first = add_image(store, src, "r")
    path = memo_path(store)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    builds = len(count_builds)
    again = add_image(store, src, "r")
    assert len(count_builds) == builds + 1 and again.digest == first.digest
    assert store_image_memo._parse(path.read_bytes()), "the memo was not rewritten after the rebuild"


def test_no_cache_turns_the_memo_off(store, tmp_path, make_tree, count_builds):
    src = tmp_path / "src"
    make_tree(src, 5)
    add_image(store, src, "r", use_cache=False)
    add_image(store, src, "r", use_cache=False)
    assert len(count_builds) == 2 and not memo_path(store).exists()


def test_writer_identity_from_loaders_giving_text_or_bytes(monkeypatch):
    """zipimport (AnsiballZ) gives the source as text, Ansible's collection loader as bytes."""
    from composefs_fleet import erofs_format, tree

    monkeypatch.setattr(store_image_memo, "_writer_identity", None)
    as_text = store_image_memo.writer_identity()
    assert as_text is not None and len(as_text) == 32

    class BytesLoader:
        def __init__(self, real):
            self.real = real

        def get_source(self, name):
            return self.real.get_source(name).encode("utf-8")

    for module in (erofs_writer, erofs_format, tree):
        monkeypatch.setattr(module, "__loader__", BytesLoader(module.__loader__))
    monkeypatch.setattr(store_image_memo, "_writer_identity", None)
    assert store_image_memo.writer_identity() == as_text

    class NoSource:
        def get_source(self, name):
            return None

    monkeypatch.setattr(tree, "__loader__", NoSource())
    monkeypatch.setattr(store_image_memo, "_writer_identity", None)
    assert store_image_memo.writer_identity() is None  # the memo is off, never wrong
