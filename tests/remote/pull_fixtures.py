# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the pull tests: a source store to serve, a node store, checks on both.

Not a conftest.py (see tests/store/store_fixtures.py): test modules import
these by name.  The node's state is read straight from its directory (refs,
objects, temp files), not through the code under test; ``fsck`` is the
store's own check.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "store"))
from store_fixtures import store_argv, write_tree  # type: ignore[import-not-found]  # noqa: E402

from composefs_fleet.image_needs import image_file_objects  # noqa: E402
from composefs_fleet.store import PRIVATE_MODE, SHARED_MODE, Store  # noqa: E402
from composefs_fleet.store_add import add_image  # noqa: E402

from nginx_server import nginx, pki  # noqa: E402,F401  (fixtures)

#: Refs of the source store: v1 and v2 share objects (the ``common*`` files), "many" is
#: MANY_COUNT objects of MANY_SIZE bytes (for throttled transfers), "other" shares nothing.
REFS = ("app/v1", "app/v2", "many", "other")
MANY_COUNT = 24
MANY_SIZE = 100_000
PULL_TIMEOUT = 120


def many_objects_tree(root: Path, count: int = MANY_COUNT, size: int = MANY_SIZE, seed: int = 7) -> None:
    """``count`` files of ``size`` random bytes: as many objects of the same size."""
    rng = random.Random(seed)
    (root / "d").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / "d" / ("obj%03d" % i)).write_bytes(rng.randbytes(size))


def object_rel(hexd: str) -> str:
    return "objects/%s/%s" % (hexd[:2], hexd[2:])


class Source:
    """A store with REFS, its trees and what each ref's image needs."""

    def __init__(self, path: Path, trees: Dict[str, Path], digests: Dict[str, str],
                 needs: Dict[str, Dict[str, int]]) -> None:
        self.path = path
        self.trees = trees
        self.digests = digests
        self.needs = needs   # ref -> {object hex: size}

    def copy(self, dest: Path) -> "Source":
        shutil.copytree(str(self.path), str(dest), symlinks=True)
        return Source(dest, self.trees, self.digests, self.needs)

    def image(self, ref: str) -> Path:
        return self.path / "images" / self.digests[ref]

    def object(self, hexd: str) -> Path:
        return self.path / object_rel(hexd)

    def only_in(self, ref: str, *others: str) -> Dict[str, int]:
        """Objects of ``ref`` none of ``others`` uses."""
        seen: Set[str] = set()
        for other in others:
            seen |= set(self.needs[other])
        return {h: n for h, n in self.needs[ref].items() if h not in seen}


def build_source(base: Path, shared_layout: bool = False) -> Source:
    base.mkdir(parents=True, exist_ok=True)
    trees = {"app/v1": base / "tree-v1", "app/v2": base / "tree-v2", "many": base / "tree-many",
             "other": base / "tree-other"}
    write_tree(trees["app/v1"], 1, files=10, shared_from=0)
    write_tree(trees["app/v2"], 2, files=10, shared_from=0)
    many_objects_tree(trees["many"])
    write_tree(trees["other"], 3, files=6)
    store, _created = Store.init(base / "store", notice=None, mode=SHARED_MODE if shared_layout else PRIVATE_MODE)
    digests, needs = {}, {}
    for ref in REFS:
        digests[ref] = add_image(store, trees[ref], ref).digest
        needs[ref] = dict(image_file_objects(store.image_path(digests[ref])).objects)
    store.close()
    if not set(needs["app/v1"]) & set(needs["app/v2"]) or not set(needs["app/v2"]) - set(needs["app/v1"]):
        raise RuntimeError("test trees v1 and v2 must share some objects and differ in others")
    return Source(base / "store", trees, digests, needs)


@pytest.fixture(scope="session")
def source_template(tmp_path_factory) -> Source:
    return build_source(tmp_path_factory.mktemp("source"))


@pytest.fixture
def served(source_template: Source, tmp_path: Path) -> Source:
    """A private copy of the source store, for the test to serve (and damage)."""
    return source_template.copy(tmp_path / "served")


# ---------------------------------------------------------------------- node --

class Node:
    """A node's store, driven through the composefs-store CLI."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def argv(self, *args: object) -> List[str]:
        return store_argv() + ["--repo", str(self.repo)] + [str(a) for a in args]

    def run(self, *args: object, env: Optional[Dict[str, str]] = None,
            timeout: float = PULL_TIMEOUT) -> "subprocess.CompletedProcess[str]":
        full_env = dict(os.environ)
        for name in ("COMPOSEFS_REMOTE_PASSWORD", "COMPOSEFS_REMOTE_TOKEN", "http_proxy", "https_proxy",
                     "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            full_env.pop(name, None)
        full_env.update(env or {})
        return subprocess.run(self.argv(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=full_env, timeout=timeout)

    def popen(self, *args: object, env: Optional[Dict[str, str]] = None) -> "subprocess.Popen[str]":
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, env=full_env)

    def pull(self, url: str, ref: str, *options: object, env: Optional[Dict[str, str]] = None,
             timeout: float = PULL_TIMEOUT) -> "subprocess.CompletedProcess[str]":
        return self.run("pull", *options, url, ref, env=env, timeout=timeout)

    def pull_ok(self, url: str, ref: str, *options: object, env: Optional[Dict[str, str]] = None) -> Dict[str, object]:
        """Pull with --json; the result, after checking the exit status."""
        res = self.run("--json", "pull", *options, url, ref, env=env)
        if res.returncode != 0:
            raise AssertionError("pull %s %s failed (exit %d):\n%s%s" % (url, ref, res.returncode, res.stdout,
                                                                         res.stderr))
        return json.loads(res.stdout)

    # -- state, read from the directory itself

    def refs(self) -> Dict[str, str]:
        out = {}
        top = self.repo / "refs"
        for dirpath, _dirs, files in os.walk(str(top)):
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                out[str(path.relative_to(top))] = path.read_text().strip()
        return out

    def objects(self) -> Set[str]:
        out = set()
        top = self.repo / "objects"
        for sub in sorted(os.listdir(str(top))):
            if len(sub) == 2 and not sub.startswith("."):
                out |= {sub + name for name in os.listdir(str(top / sub)) if not name.startswith(".")}
        return out

    def images(self) -> Set[str]:
        return {n for n in os.listdir(str(self.repo / "images")) if not n.startswith(".")}

    def debris(self) -> List[str]:
        """Temporary files left anywhere in the store (dot files)."""
        out = []
        for dirpath, dirs, files in os.walk(str(self.repo)):
            out += [os.path.join(dirpath, n) for n in dirs + files if n.startswith(".")]
        return sorted(out)

    def fsck(self) -> Dict[str, object]:
        res = self.run("--json", "fsck")
        if res.returncode != 0:
            raise AssertionError("fsck of %s not clean (exit %d):\n%s%s"
                                 % (self.repo, res.returncode, res.stdout, res.stderr))
        return json.loads(res.stdout)


def make_node(path: Path, *init_options: str) -> Node:
    node = Node(path)
    res = node.run("init", *init_options)
    if res.returncode != 0:
        raise RuntimeError("init %s: %s" % (path, res.stderr))
    return node


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return make_node(tmp_path / "node")


def assert_has_image(node: Node, src: Source, ref: str, local: Optional[str] = None) -> None:
    """``local`` (default ``ref``) names the source's image of ``ref``, byte for byte, with all its objects
    (each byte-identical to the source's), and fsck is clean."""
    digest = src.digests[ref]
    assert node.refs().get(local or ref) == digest
    assert (node.repo / "images" / digest).read_bytes() == src.image(ref).read_bytes()
    missing = set(src.needs[ref]) - node.objects()
    assert not missing, "objects of %s missing after the pull: %s" % (ref, sorted(missing)[:5])
    for hexd in src.needs[ref]:
        assert (node.repo / object_rel(hexd)).read_bytes() == src.object(hexd).read_bytes()
    node.fsck()


def assert_failed(res: "subprocess.CompletedProcess[str]", url: str, *patterns: str) -> str:
    """Exit 1, one clear message naming ``url`` and matching each regex of ``patterns``; no traceback."""
    import re
    text = res.stderr
    assert res.returncode == 1, "exit %d, want 1:\n%s%s" % (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in text, text
    # The prefix as the brief's contract words it ("composefs-store: pull: URL: ...") is checked once, by
    # test_pull_errors.py::test_error_message_names_the_command; here only the tool's name.
    assert text.startswith("composefs-store: "), text
    assert len(text.strip().splitlines()) == 1, "more than one line:\n" + text
    assert url in text, "the message does not name %s:\n%s" % (url, text)
    for pattern in patterns:
        assert re.search(pattern, text, re.I | re.S), "no %r in the message:\n%s" % (pattern, text)
    return text


def assert_untouched(node: Node, refs_before: Dict[str, str], objects_before: Optional[Set[str]] = None,
                     allowed: Optional[Set[str]] = None) -> None:
    """After a failed pull: refs as before, fsck clean, no debris, only ``allowed`` objects new."""
    assert node.refs() == refs_before
    if objects_before is not None:
        new = node.objects() - objects_before
        assert new <= (allowed or set()), "unexpected objects published: %s" % sorted(new - (allowed or set()))
    assert node.debris() == [], "temporary files left behind: %s" % node.debris()
    node.fsck()


#: nginx server directives: responses without Content-Length (chunked), the bytes unchanged (sub_filter
#: replaces a string by itself), as a filtering proxy or a CDN may send them.
CHUNKED = "sub_filter_types *;\n        sub_filter 'composefs' 'composefs';"


def wait_exit(proc: "subprocess.Popen[str]", timeout: float, what: str) -> "subprocess.CompletedProcess[str]":
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("%s: the pull did not end within %.0f s:\n%s%s" % (what, timeout, out, err)) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tree_of(top: Path) -> Dict[str, object]:
    """What a reader sees: per path, the type, mode, owner and content or link target."""
    out: Dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(str(top)):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            entry: List[object] = [st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns]
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry.append(f.read())
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(path))
            out[os.path.relpath(path, str(top))] = entry
    return out
