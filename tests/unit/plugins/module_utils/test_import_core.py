# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The core as AnsiballZ ships it: importable from the collection namespace on
every target Python, using only relative and standard-library imports."""

from __future__ import annotations

import ast
import importlib
import io
import os
import pkgutil
import sys

import pytest

from ansible_collections.composefs.fleet.plugins.module_utils import composefs as core
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.dump import parse_dump, write_dump
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.erofs_reader import read_image
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.erofs_writer import build_image

CORE_DIR = os.path.dirname(core.__file__)
CORE_MODULES = sorted(info.name for info in pkgutil.iter_modules([CORE_DIR]))
STDLIB = getattr(sys, 'stdlib_module_names', None)  # Python 3.10+


#: Packages the user chose for optional features, imported only inside the functions that need
#: them (a node without them runs everything else): signatures, zstd layers (Python 3.14 has it).
OPTIONAL = {'cryptography', 'zstandard', 'compression'}


def _absolute_imports(path, lazy=False):
    """Top-level names of the absolute imports in the module at path: those at module level, or
    (``lazy``) those inside functions."""
    with open(path, 'rb') as source:
        tree = ast.parse(source.read(), path)
    in_functions = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_functions.update(id(inner) for inner in ast.walk(node) if inner is not node)
    for node in ast.walk(tree):
        if (id(node) in in_functions) != lazy:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split('.')[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split('.')[0]


def test_core_has_modules():
    # An empty list would make the parametrized tests below pass vacuously.
    assert 'erofs_writer' in CORE_MODULES and 'dump' in CORE_MODULES


@pytest.mark.parametrize('name', CORE_MODULES)
def test_module_imports_from_collection(name):
    module = importlib.import_module('%s.%s' % (core.__name__, name))
    assert module.__name__.startswith('ansible_collections.composefs.fleet.')


@pytest.mark.parametrize('name', CORE_MODULES)
def test_imports_are_relative_or_stdlib(name):
    names = set(_absolute_imports(os.path.join(CORE_DIR, name + '.py')))
    assert not (names & OPTIONAL), 'optional packages imported at module level: %s' % sorted(names & OPTIONAL)
    # AnsiballZ only ships module_utils reached through relative (or
    # ansible_collections) imports; an installed-package name would break on a target.
    assert 'composefs_fleet' not in names
    assert 'ansible_collections' not in names
    lazy = set(_absolute_imports(os.path.join(CORE_DIR, name + '.py'), lazy=True))
    assert not ({'composefs_fleet', 'ansible_collections'} & lazy)
    if STDLIB is not None:
        assert names - {'__future__'} <= set(STDLIB), 'non-stdlib imports: %s' % sorted(names - set(STDLIB))
        assert lazy <= set(STDLIB) | OPTIONAL, 'non-stdlib imports in functions: %s' % sorted(lazy - set(STDLIB) - OPTIONAL)


DUMP = (
    b'/ 4096 40755 3 0 0 0 1700000000.0 - - - user.note=root\n'
    b'/dir 43 40700 2 1000 1000 0 1700000001.5 - - -\n'
    b'/dir/file 11 100644 1 1000 1000 0 1700000002.0 '
    b'aa/bbccddeeff00112233445566778899aabbccddeeff00112233445566778899 - '
    b'aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899 trusted.x=1\n'
    b'/link 4 120777 1 0 0 0 1700000003.0 dir/ - -\n'
    b'/small 5 100600 1 0 0 0 1700000004.0 - hello -\n'
)


@pytest.mark.parametrize('version', [0, 1])
def test_image_round_trip(version):
    """Dump -> image -> tree -> dump keeps every field, on this target Python
    (directory sizes in DUMP are the ones the image layout gives)."""
    tree = parse_dump(io.BytesIO(DUMP))
    image = build_image(tree, min_version=version, max_version=1)
    assert image[1024:1028] == b'\xe2\xe1\xf5\xe0'  # erofs superblock magic
    out = io.BytesIO()
    write_dump(read_image(image), out)
    assert out.getvalue() == DUMP
