# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent as a service speaks sd_notify(3): READY, STATUS after each pass,
WATCHDOG pings, reload on SIGHUP keeping the last good configuration, a
clean stop on SIGTERM.  Here the test plays systemd's side of the notify
socket; under real systemd (PID 1, the unit, the watchdog killing a stalled
agent) it is proven in the guest (tests/guest/).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from agent_fixtures import Node, node  # noqa: F401  (node: a fixture)

pytestmark = pytest.mark.kernel


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: List[str] = []

    def wait_for(self, predicate, timeout: float = 120.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for m in self.messages:
                if predicate(m):
                    self.messages.remove(m)
                    return m
            self.sock.settimeout(max(0.05, end - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                break
        raise AssertionError("no matching notification; got %r" % self.messages)



def test_notify_watchdog_reload_and_stop(node: Node, tmp_path: Path):
    digest = node.image("app", 1)
    where = tmp_path / "mnt"
    node.mount(digest, where)
    node.add_mount(digest, where, remount=True)
    cfg = node.write_config()
    notify = NotifySocket(tmp_path / "notify")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000", WATCHDOG_PID="")
    agent = subprocess.Popen([sys.executable, "-m", "composefs_fleet_agent", "--config", str(cfg), "--no-journal",
                              "--cache-dir", str(tmp_path / "cache")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        notify.wait_for(lambda m: m == "READY=1")
        assert "healthy" in notify.wait_for(lambda m: m.startswith("STATUS=pass 1:"))
        # Pings keep coming while the agent waits for its next pass (interval 3600 s).
        for _ in range(3):
            notify.wait_for(lambda m: m == "WATCHDOG=1")

        # A broken configuration is refused; the pass it triggers runs with the old one.
        cfg.write_text('{"mounts": [{"where": "relative"}]}')
        agent.send_signal(signal.SIGHUP)
        notify.wait_for(lambda m: m.startswith("RELOADING=1"))
        status = notify.wait_for(lambda m: m.startswith("STATUS=pass 2:"))
        assert "healthy; 1 mounts" in status
        metrics = node.metrics()
        assert metrics["config_valid"] == 0 and metrics["passes_total"] == 2 and metrics["mounts_checked"] == 1

        # A good one takes over: no mounts configured now.
        cfg.write_text(json.dumps({"textfile": str(node.textfile), "interval": 3600}))
        agent.send_signal(signal.SIGHUP)
        status = notify.wait_for(lambda m: m.startswith("STATUS=pass 3:"))
        assert "0 mounts" in status and node.metrics()["config_valid"] == 1

        agent.send_signal(signal.SIGTERM)
        notify.wait_for(lambda m: m == "STOPPING=1")
        assert agent.wait(timeout=60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    err = agent.stderr.read()
    lines = [line for line in err.splitlines() if line.startswith("<")]
    assert lines[0].startswith("<6>agent-started:")
    assert any(line.startswith("<3>config-invalid:") and "mounts[0].where must be an absolute path" in line
               and "keeping the configuration loaded before" in line for line in lines), err
    assert sum(line.startswith("<6>config-loaded:") for line in lines) == 2
