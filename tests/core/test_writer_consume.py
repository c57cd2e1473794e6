"""build_image_buffer(consume=True): the layout done on the caller's tree itself.

Byte identity with the C tool is checked by test_writer_oracle (every image
there is written both ways); these are the refusals the private copy made
and the in-place rewrite must make too.
"""

from __future__ import annotations

import io
import stat

import pytest

from composefs_fleet.dump import parse_dump
from composefs_fleet.erofs_writer import build_image, build_image_buffer
from composefs_fleet.errors import FormatError
from composefs_fleet.tree import Node

DUMP = b"""/ 0 40755 2 0 0 0 1000.0 - - - user.a=1
/dir 0 40755 2 0 0 0 1000.0 - - -
/dir/file 5 100644 1 0 0 0 1000.0 - hello - security.selinux=x
/dir/link 0 @100644 1 0 0 0 0.0 /dir/file - -
/dir/wh 0 20000 1 0 0 0 1000.0 - - -
/sym 3 120777 1 0 0 0 1000.0 abc - -
"""


def test_consumed_tree_gives_the_copy_image():
    expected = build_image(parse_dump(io.BytesIO(DUMP)), max_version=1)
    assert bytes(build_image_buffer(parse_dump(io.BytesIO(DUMP)), max_version=1, consume=True)) == expected


def test_copy_leaves_the_tree_alone():
    root = parse_dump(io.BytesIO(DUMP))
    build_image(root)
    assert sorted(root.children) == [b"dir", b"sym"]
    assert root.xattrs == {b"user.a": b"1"}
    assert root.children[b"dir"].children[b"wh"].mode == stat.S_IFCHR


def test_consume_refuses_a_hard_link_outside_the_tree():
    root = Node(stat.S_IFDIR | 0o755)
    outside = Node(stat.S_IFREG | 0o644)
    link = Node(stat.S_IFREG | 0o644)
    link.link_to = outside
    root.add_child(b"link", link)
    with pytest.raises(FormatError, match="outside the tree"):
        build_image_buffer(root, consume=True)


def test_consume_refuses_children_of_a_file():
    root = Node(stat.S_IFDIR | 0o755)
    file = Node(stat.S_IFREG | 0o644)
    root.add_child(b"file", file)
    file.children[b"x"] = Node(stat.S_IFREG | 0o644)
    with pytest.raises(FormatError, match="only directories can have children"):
        build_image_buffer(root, consume=True)
    with pytest.raises(FormatError, match="only directories can have children"):
        build_image(root)
