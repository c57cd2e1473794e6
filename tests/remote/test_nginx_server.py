# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The nginx fixture itself: what the pull tests (and bench/, the drills) rely on."""
from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import nginx_server
from nginx_server import nginx, nginx_missing  # noqa: F401  (fixture)

pytestmark = pytest.mark.network


@pytest.fixture
def root(tmp_path: Path) -> Path:
    top = tmp_path / "root"
    (top / "objects" / "ab").mkdir(parents=True)
    (top / "objects" / "ab" / "cd").write_bytes(bytes(range(256)) * 1000)
    (top / "meta.json").write_text("{}\n")
    return top


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def test_missing_nginx_is_named(monkeypatch) -> None:
    monkeypatch.setattr(nginx_server, "NGINX", "/nonexistent/sbin/nginx")
    assert nginx_missing() == "/nonexistent/sbin/nginx missing (Debian package nginx; scripts/setup installs it)"


def test_serves_on_loopback_and_logs_each_request(nginx, root: Path) -> None:
    srv = nginx(root)
    assert srv.url.startswith("http://127.0.0.1:") and srv.url.endswith("/cfs")
    assert get(srv.url + "/objects/ab/cd") == (root / "objects" / "ab" / "cd").read_bytes()
    with pytest.raises(urllib.error.HTTPError) as err:
        get(srv.url + "/objects/ab/ef")
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError):
        get(srv.base + "/meta.json")  # outside the prefix: not the store
    srv.wait_for(lambda entries: len(entries) >= 3, timeout=10, what="access log lines of the three requests")
    assert srv.requests() == {("objects/ab/cd", 200): 1, ("objects/ab/ef", 404): 1, ("/meta.json", 404): 1}
    assert srv.fetches() == {"objects/ab/cd": 1}
    # Only 127.0.0.1: the config says so (no other address of this machine is tried from here).
    assert "listen 127.0.0.1:%d;" % srv.port in srv.conf_path.read_text()


def test_kill_cuts_a_transfer_and_restart_keeps_the_port(nginx, root: Path) -> None:
    srv = nginx(root, limit_rate="20k")
    port = srv.port
    outcome = []
    started = threading.Event()

    def fetch() -> None:
        try:
            with urllib.request.urlopen(srv.url + "/objects/ab/cd", timeout=10) as resp:
                first = resp.read(1000)
                started.set()
                outcome.append(len(first + resp.read()))
        except Exception as exc:  # noqa: BLE001  (any error is the expected outcome)
            outcome.append(exc)
        finally:
            started.set()

    reader = threading.Thread(target=fetch)
    reader.start()
    assert started.wait(10)
    srv.kill()
    reader.join(30)
    assert outcome and isinstance(outcome[0], Exception), outcome
    assert "IncompleteRead" in repr(outcome[0]) or "reset" in repr(outcome[0]).lower(), outcome
    assert srv.entries() == []  # the cut transfer was never logged
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    srv.start(limit_rate=None)
    assert srv.port == port and srv.generation == 2
    assert len(get(srv.url + "/objects/ab/cd")) == 256000
    # nginx logs a request after its last byte went out: the client can be done before the line is written.
    srv.wait_for(lambda entries: len(entries) >= 1, timeout=10, what="access log line of the fetch")
    assert srv.fetches() == {"objects/ab/cd": 1}
    assert srv.entries(1) == []


def test_two_workers_with_a_master(nginx, root: Path) -> None:
    srv = nginx(root, worker_processes=2)
    assert "master_process on;" in srv.conf_path.read_text()
    assert get(srv.url + "/meta.json") == b"{}\n"
    srv.stop()
    assert not srv.running()
