# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Every way a pull from nginx can fail, provoked for real.

Each failure must give exit status 1 and one message naming the URL and what
failed, create or move no ref, publish nothing unverified (the bad object is
not in objects/), leave no temporary file, and leave a store fsck finds
clean.  Where it makes sense, the next pull resumes: it fetches only what is
still missing (nginx's access log of the second attempt says so).
"""
from __future__ import annotations

import collections
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from pull_fixtures import (CHUNKED, MANY_COUNT, Node, Source, assert_failed, assert_has_image,  # type: ignore[import-not-found]
                           assert_untouched, make_node, object_rel, wait_exit)
from pull_fixtures import nginx, node, served, source_template  # type: ignore[import-not-found]  # noqa: F401  (fixtures)

pytestmark = pytest.mark.network


FAST = ("--retries", "1", "--timeout", "5")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def largest(objects: dict) -> str:
    return max(sorted(objects), key=lambda h: objects[h])


def test_error_message_names_the_command(served: Source, node: Node, nginx) -> None:
    """The CLI contract: "composefs-store: pull: URL: what failed"."""
    srv = nginx(served.path)
    res = node.pull(srv.url, "app/missing")
    assert res.returncode == 1
    assert res.stderr.startswith("composefs-store: pull: %s" % srv.url), res.stderr


def test_unknown_ref(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    res = node.pull(srv.url, "app/missing")
    assert_failed(res, srv.url, r"no ref app/missing")
    assert_untouched(node, {}, set())
    assert not [e for e in srv.entries() if e.path.startswith(("images/", "objects/"))]
    assert srv.requests()[("refs/app/missing", 404)] == 1  # a 404 is not retried


def test_not_a_store(served: Source, node: Node, nginx, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    srv = nginx(tmp_path / "empty")
    assert_failed(node.pull(srv.url, "app/v1"), srv.url, r"not a composefs store")
    assert_untouched(node, {}, set())


@pytest.mark.parametrize("name", ["../meta.json", "app/../../x", "/abs", "a//b"])
def test_hostile_ref_names_send_no_request(served: Source, node: Node, nginx, name: str) -> None:
    srv = nginx(served.path)
    res = node.pull(srv.url, name)
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr and name in res.stderr, res.stderr
    assert srv.entries() == []
    assert_untouched(node, {}, set())


def test_ref_not_a_digest(served: Source, node: Node, nginx) -> None:
    (served.path / "refs" / "app" / "v1").write_text("<html>not found</html>\n")
    srv = nginx(served.path)
    assert_failed(node.pull(srv.url, "app/v1"), srv.url + "/refs/app/v1", r"not an image digest")
    assert_untouched(node, {}, set())
    assert not [e for e in srv.entries() if e.path.startswith(("images/", "objects/"))]


def test_object_404_then_resume(served: Source, node: Node, nginx) -> None:
    needs = served.needs["app/v1"]
    gone = largest(needs)
    saved = served.object(gone).read_bytes()
    served.object(gone).unlink()
    srv = nginx(served.path)
    res = node.pull(srv.url, "app/v1", *FAST)
    assert_failed(res, srv.url + "/" + object_rel(gone), r"not found")
    assert_untouched(node, {}, set(), allowed=set(needs) - {gone})
    assert gone not in node.objects()
    assert srv.requests()[(object_rel(gone), 404)] == 1  # a 404 is not retried
    # Put it back: the next pull fetches what is still missing, once each.
    kept = node.objects()
    served.object(gone).write_bytes(saved)
    mark = len(srv.entries())
    node.pull_ok(srv.url, "app/v1")
    assert_has_image(node, served, "app/v1")
    again = collections.Counter(e.path for e in srv.entries()[mark:] if e.path.startswith("objects/"))
    assert again == collections.Counter({object_rel(h): 1 for h in set(needs) - kept})


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "appended"])
def test_damaged_object_is_refused(served: Source, node: Node, nginx, damage: str) -> None:
    needs = served.needs["app/v2"]
    bad = largest(needs)
    path = served.object(bad)
    size = path.stat().st_size
    if damage == "flipped byte":
        flip_byte(path, size // 2)
        pattern = r"fs-verity digest is [0-9a-f]{64}, not its name"
    elif damage == "truncated":
        os.truncate(str(path), size - 4096)
        pattern = r"has %d bytes, its image says %d" % (size - 4096, size)
    else:
        with open(str(path), "ab") as f:
            f.write(b"trailing bytes")
        pattern = r"larger than the %d bytes" % size
    srv = nginx(served.path)
    res = node.pull(srv.url, "app/v2", *FAST)
    assert_failed(res, srv.url + "/" + object_rel(bad), pattern)
    assert_untouched(node, {}, set(), allowed=set(needs) - {bad})
    assert bad not in node.objects()
    assert served.digests["app/v2"] not in node.images()


@pytest.mark.parametrize("damage", ["another image", "flipped byte", "missing"])
def test_image_not_matching_its_ref_is_refused_before_parsing(served: Source, node: Node, nginx, damage: str) -> None:
    digest = served.digests["app/v1"]
    image = served.image("app/v1")
    if damage == "another image":
        image.write_bytes(served.image("app/v2").read_bytes())
        pattern = r"image digest is %s, not the %s its ref names" % (served.digests["app/v2"], digest)
    elif damage == "flipped byte":
        flip_byte(image, 100)
        pattern = r"image digest is [0-9a-f]{64}, not the %s its ref names" % digest
    else:
        image.unlink()
        pattern = r"not there"
    srv = nginx(served.path)
    res = node.pull(srv.url, "app/v1", *FAST)
    assert_failed(res, srv.url + "/images/" + digest, pattern)
    assert_untouched(node, {}, set())
    assert node.images() == set()
    assert not [e for e in srv.entries() if e.path.startswith("objects/")]


def test_ref_pointing_elsewhere_leaves_the_local_ref(served: Source, node: Node, nginx) -> None:
    """A node with app/v1 pulls it again from a server whose image is damaged: the ref stays where it was."""
    srv = nginx(served.path)
    node.pull_ok(srv.url, "app/v1")
    refs, objects = node.refs(), node.objects()
    (served.path / "refs" / "app" / "v1").write_text(served.digests["other"][::-1] + "\n")
    res = node.pull(srv.url, "app/v1", *FAST)
    assert_failed(res, srv.url, r"images/%s" % served.digests["other"][::-1])
    assert_untouched(node, refs, objects)
    assert_has_image(node, served, "app/v1")


def test_server_errors_are_retried_then_reported(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path, extra_server="location = /cfs/refs/app/v1 { return 503; }")
    res = node.pull(srv.url, "app/v1", "--retries", "2")
    assert_failed(res, srv.url + "/refs/app/v1", r"503", r"3 attempts")
    assert srv.requests()[("refs/app/v1", 503)] == 3
    assert_untouched(node, {}, set())


def test_server_down(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path)
    srv.stop()
    res = node.pull(srv.url, "app/v1", "--retries", "1")
    assert_failed(res, srv.url, r"connection refused")
    assert_untouched(node, {}, set())


@pytest.mark.parametrize("framing", ["Content-Length", "chunked"])
def test_server_killed_mid_pull_then_resume(served: Source, node: Node, nginx, framing: str) -> None:
    """kill -9 nginx after some objects arrived; restart it; the second pull fetches only what is missing."""
    needs = served.needs["many"]
    # nginx lets a response send limit_rate bytes in its first second: these 100 KB objects take a
    # second each, 8 at a time (--jobs 8).  Killed once the first 8 have arrived.
    srv = nginx(served.path, limit_rate="80k", extra_server=CHUNKED if framing == "chunked" else "")
    proc = node.popen("pull", "--jobs", "8", "--retries", "1", "--timeout", "5", srv.url, "many")
    try:
        srv.wait_for(lambda es: sum(e.path.startswith("objects/") and e.completed for e in es) >= MANY_COUNT // 3,
                     what="%d objects sent" % (MANY_COUNT // 3))
    finally:
        srv.kill()
    res = wait_exit(proc, 90, "server killed")
    assert_failed(res, srv.url + "/objects/", r"connection refused|cut short|closed the connection")
    kept = node.objects()
    assert kept <= set(needs)
    assert kept, "the objects verified before the server died were not kept"
    assert_untouched(node, {}, allowed=set(needs))
    srv.start(limit_rate=None)
    out = node.pull_ok(srv.url, "many")
    assert_has_image(node, served, "many")
    second = collections.Counter(e.path for e in srv.entries() if e.path.startswith("objects/"))
    assert second == collections.Counter({object_rel(h): 1 for h in set(needs) - kept})
    assert out["objects_fetched"] == len(needs) - len(kept)


def test_stalled_transfer_aborts(served: Source, node: Node, nginx) -> None:
    """The objects trickle at 200 bytes/s after their first 50 KB: the low-speed limit aborts the pull."""
    srv = nginx(served.path, limit_rate="200", limit_rate_after="50k")
    started = time.monotonic()
    proc = node.popen("pull", "--jobs", "2", "--retries", "0", "--low-speed-limit", "5000",
                      "--low-speed-time", "2", srv.url, "many")
    res = wait_exit(proc, 60, "stalled transfer")
    assert_failed(res, srv.url + "/objects/", r"too slow|stalled")
    assert_untouched(node, {}, set())
    assert time.monotonic() - started < 60


def test_trickling_transfer_aborts(served: Source, node: Node, nginx) -> None:
    """Data keeps coming, but too slowly: 50 KB at once, then 2000 bytes/s (nginx sends 4 KiB every 2 s,
    so no read waits longer than --low-speed-time 4; the socket timeout never fires).  Under
    --low-speed-limit 5000 for 4 s the pull must abort, long before the first object could finish
    at that rate (25 s): a check that waits for a whole read buffer to fill comes too late."""
    srv = nginx(served.path, limit_rate="2000", limit_rate_after="50k")
    proc = node.popen("pull", "--jobs", "2", "--retries", "0", "--low-speed-limit", "5000",
                      "--low-speed-time", "4", srv.url, "many")
    res = wait_exit(proc, 20, "transfer at 2000 bytes/s under --low-speed-limit 5000 --low-speed-time 4")
    assert_failed(res, srv.url + "/objects/", r"too slow")
    assert_untouched(node, {}, set())
    assert not [e for e in srv.entries() if e.path.startswith("objects/") and e.completed]


def test_unresponsive_server_times_out(served: Source, node: Node, tmp_path: Path) -> None:
    """A server that accepts the connection and never answers: --timeout ends the pull."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = "http://127.0.0.1:%d/cfs" % listener.getsockname()[1]
        res = node.pull(url, "app/v1", "--retries", "0", "--timeout", "1", "--low-speed-time", "1", timeout=60)
    assert_failed(res, url, r"no answer|stalled|timed out")
    assert_untouched(node, {}, set())


# ------------------------------------------------------------------ disk full --

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (euid %d)" % os.geteuid())
    where = tmp_path / "tmpfs"
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % res.stderr.strip())
    try:
        yield where
    finally:
        done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full(served: Source, nginx, small_tmpfs: Path) -> None:
    """2.4 MB of objects into a 1 MiB store: "No space left", naming what it was writing; then room again."""
    node = make_node(small_tmpfs / "store")
    srv = nginx(served.path)
    res = node.pull(srv.url, "many", *FAST)
    text = assert_failed(res, srv.url, r"No space left on device")
    assert str(node.repo) in text, "the message does not say what was being written:\n" + text
    needs = served.needs["many"]
    assert_untouched(node, {}, allowed=set(needs))
    kept = node.objects()
    # Room again: the next pull fetches only what is still missing.
    grown = subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    mark = len(srv.entries())
    node.pull_ok(srv.url, "many")
    assert_has_image(node, served, "many")
    again = collections.Counter(e.path for e in srv.entries()[mark:] if e.path.startswith("objects/"))
    assert again == collections.Counter({object_rel(h): 1 for h in set(needs) - kept})
