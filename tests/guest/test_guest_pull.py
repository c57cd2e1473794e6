# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Issue 14's guest node: it pulls an image from the host's nginx through an
SSH reverse tunnel and mounts it with ``verity=require``.

The guest's network is QEMU user networking with ``restrict=on``: it can reach
nothing on the host but what the harness forwards. The host's nginx listens on
the host's 127.0.0.1 only; ``ssh -R`` (on the harness's master connection)
makes the guest's own 127.0.0.1:PORT reach it, so the pull URL is the guest's
loopback and no other address is involved. The guest's store is on its ext4
root, which has fs-verity: every pulled object must come out verity-enabled
with the digest its name says, and the overlay's ``verity=require`` makes the
kernel check each one when the mounted files are read.

Guest time is kept small: one in-guest run (guest_checks.py pull) for the
first pull and all its checks, one SSH call for the second pull (nothing left
to fetch) and one for the pull after the tunnel is closed (refused: the tunnel
was the only way).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional

import guest_checks
import guest_vm
import pytest

from composefs_fleet import fsverity_digest

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("guest_mount_helper"),
              # Checked before the session's guest boots for nothing. The file, not
              # find_spec: the venv's editable install may find another checkout's.
              pytest.mark.skipif(not (guest_vm.REPO / "plugins/module_utils/composefs/pull.py").is_file(),
                                 reason="the core pull (plugins/module_utils/composefs/pull.py) is not on this branch")]

REF = "app/v1"
GUEST_STORE = "/var/lib/cfpull/store"  # the guest's ext4 root: fs-verity capable


def _content(name: str, size: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return bytes((i * 131 + seed[i % 32]) % 251 for i in range(size))


# Five objects (> 64 bytes is external in composefs; all here are > 4 KiB, one
# spans many Merkle tree blocks), a duplicate (one object for two files), an
# inline file, an empty file and a symlink.
OBJECT_FILES = {"a.bin": 5000, "sub/b.bin": 12288, "sub/c.bin": 70001, "sub/deeper/d.bin": 300000,
                "big.bin": 1048577}
INLINE_FILES = {"small.txt": 40, "empty": 0}


def _make_source(src: Path) -> None:
    for name, size in dict(OBJECT_FILES, **INLINE_FILES).items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(name, size))
    (src / "dup.bin").write_bytes(_content("a.bin", OBJECT_FILES["a.bin"]))
    (src / "link").symlink_to("sub/c.bin")
    os.chmod(str(src / "sub" / "deeper" / "d.bin"), 0o600)


def _store_cli(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.composefs_store"] + list(args),
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return json.loads(res.stdout) if "--json" in args else {}


NGINX = "/usr/sbin/nginx"
NGINX_CONF = """\
%(user)sdaemon off;
worker_processes 1;
pid %(d)s/nginx.pid;
error_log %(d)s/error.log info;
events { worker_connections 64; }
http {
    log_format requests '$request_method $request_uri $status $body_bytes_sent';
    access_log %(d)s/access.log requests;
    client_body_temp_path %(d)s/body;
    proxy_temp_path %(d)s/proxy;
    fastcgi_temp_path %(d)s/fastcgi;
    uwsgi_temp_path %(d)s/uwsgi;
    scgi_temp_path %(d)s/scgi;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:%(port)d;
        root %(root)s;
    }
}
"""


class _Nginx:
    """Debian's nginx serving ``root`` as static files on the host's
    127.0.0.1, with its own config, pid and logs in ``workdir`` (never the
    system service); requests() reads its access log."""

    def __init__(self, root: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True)
        self.workdir = workdir
        self.access_log = workdir / "access.log"
        self.proc: Optional[subprocess.Popen] = None
        for _attempt in range(3):
            self.port = guest_vm.free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(NGINX_CONF % dict(d=workdir, port=self.port, root=root,
                                              user="user root;\n" if os.geteuid() == 0 else ""))
            with open(str(workdir / "stderr"), "wb") as stderr:
                self.proc = subprocess.Popen([NGINX, "-e", str(workdir / "error.log"), "-p", str(workdir), "-c", str(conf)],
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            if self._wait_listening():
                return
            err = (workdir / "stderr").read_text(errors="replace") + (workdir / "error.log").read_text(errors="replace")
            self.close()
            if "Address already in use" not in err:
                raise RuntimeError("nginx did not start on 127.0.0.1:%d: %s" % (self.port, err[-2000:]))
        raise RuntimeError("nginx found no free port on 127.0.0.1")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return True
            time.sleep(0.05)
        return False

    def requests(self) -> List[List[object]]:
        if not self.access_log.exists():
            return []
        out: List[List[object]] = []
        for line in self.access_log.read_text().splitlines():
            method, path, status, _size = line.split(" ")
            out.append([method, path, int(status)])
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@contextlib.contextmanager
def _nginx(root: Path, workdir: Path) -> Iterator[_Nginx]:
    if not os.access(NGINX, os.X_OK):
        reason = "nginx is not installed (%s missing: apt-get install nginx, as scripts/setup does)" % NGINX
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true requires it: " + reason, pytrace=False)
        pytest.skip(reason)
    server = _Nginx(root, workdir)
    try:
        yield server
    finally:
        server.close()


def _pull_argv(url: str) -> List[str]:
    return ["composefs-store", "--repo", GUEST_STORE, "pull", "--json", url, REF]


def test_guest_pulls_through_a_reverse_tunnel_and_mounts_with_verity_require(guest, tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    _make_source(src)
    _store_cli("--repo", str(store), "init")
    added = _store_cli("--repo", str(store), "--json", "add-image", str(src), "--ref", REF)
    digest = added["digest"]
    want_objects = sorted({fsverity_digest.digest_bytes(_content(n, s)).hex() for n, s in OBJECT_FILES.items()})
    assert added["objects"] == len(want_objects) == 5

    with _nginx(store, tmp_path / "nginx") as server:
        with guest.vm.reverse_tunnel(server.port) as port:
            url = "http://127.0.0.1:%d/" % port
            first = guest.run_check("pull", dict(store=GUEST_STORE, url=url, ref=REF, port=port))
            first_requests = server.requests()
            second = guest.run(_pull_argv(url), check=False, timeout=300)
            second_requests = server.requests()[len(first_requests):]
        # The tunnel was the guest's only way to the host: closed, the pull fails.
        closed = guest.run(_pull_argv(url) + ["--retries", "0"], check=False, timeout=300)
        after_close = server.requests()[len(first_requests) + len(second_requests):]

    # The tunnel's guest end is the guest's loopback, nothing else.
    assert first["listeners"] == ["127.0.0.1"], first["listeners"]

    pull = first["pull"]
    assert pull["rc"] == 0, pull
    res = pull["json"]
    assert res["digest"] == digest and res["ref"] == REF and res["remote_ref"] == REF, res
    assert res["changed"] is True and res["image_fetched"] is True and res["previous"] is None, res
    assert res["objects"] == res["objects_missing"] == res["objects_fetched"] == 5, res
    total = sum(OBJECT_FILES.values())
    assert res["bytes_missing"] == res["bytes_fetched"] == total, res
    assert first["ref_file"] == digest + "\n"

    # Every object arrived with fs-verity on, measured by the kernel, equal to its name.
    assert sorted(first["objects"]) == want_objects
    assert first["objects"] == {d: "sha256:" + d for d in want_objects}
    assert first["images"] == {digest: "sha256:" + digest}
    fsck = first["fsck"]
    assert fsck["rc"] == 0 and fsck["json"]["clean"] is True, fsck
    assert fsck["json"]["objects"] == 5 and fsck["json"]["images"] == 1 and fsck["json"]["refs"] == 1, fsck
    assert fsck["json"]["verity_measured"] == 5, fsck  # each object's digest came from the kernel

    # Mounted with digest= and verity=require: the same tree as the host's source.
    assert first["mount"]["rc"] == 0, first["mount"]
    assert first["overlay"][0] == "overlay" and "verity=require" in first["overlay"], first["overlay"]
    assert first["manifest"] == guest_checks.manifest(str(src))
    assert first["unmounted"] is True

    # nginx saw the pull (through the tunnel): the store's meta.json, the ref,
    # the image and each object exactly once, nothing else.
    want_requests = [("GET", "/meta.json", 200), ("GET", "/refs/" + REF, 200), ("GET", "/images/" + digest, 200)]
    want_requests += [("GET", "/objects/%s/%s" % (d[:2], d[2:]), 200) for d in want_objects]
    assert sorted(tuple(r) for r in first_requests) == sorted(want_requests), first_requests

    # Second pull: nothing left to fetch, nothing changed; only meta.json and the ref were asked for.
    assert second.returncode == 0, (second.stdout, second.stderr)
    again = json.loads(second.stdout)
    assert again["digest"] == digest and again["previous"] == digest, again
    assert again["changed"] is False and again["image_fetched"] is False, again
    assert again["objects_missing"] == again["objects_fetched"] == again["bytes_fetched"] == 0, again
    assert [tuple(r) for r in second_requests] == [("GET", "/meta.json", 200), ("GET", "/refs/" + REF, 200)], second_requests

    # Tunnel closed: the guest cannot reach the host's nginx any more.
    assert closed.returncode == 1, (closed.stdout, closed.stderr)
    assert closed.stderr.startswith("composefs-store: "), closed.stderr
    assert "http://127.0.0.1:%d/" % port in closed.stderr and "connection refused" in closed.stderr, closed.stderr
    assert after_close == [], after_close
    assert "Traceback" not in closed.stderr
