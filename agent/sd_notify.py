# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The sd_notify(3) protocol: one datagram to $NOTIFY_SOCKET, stdlib only."""

from __future__ import annotations

import os
import socket
from typing import Optional


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; False when not run by it or on failure."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8", "replace"))
        return True
    except OSError:
        return False


def watchdog_interval() -> Optional[float]:
    """Seconds between WATCHDOG=1 pings systemd expects (None: no watchdog for us)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings at half the interval systemd allows, from the agent's own work loop (a
    thread would keep pinging while the work is stuck, which is what the watchdog must catch)."""

    def __init__(self) -> None:
        import time

        self.interval = watchdog_interval()
        self._now = time.monotonic
        self._last = self._now()

    def due(self) -> bool:
        return self.interval is not None and self._now() - self._last >= self.interval / 2

    def ping(self, force: bool = False) -> None:
        if self.interval is not None and (force or self.due()):
            notify("WATCHDOG=1")
            self._last = self._now()

    def sleep_limit(self) -> Optional[float]:
        return None if self.interval is None else self.interval / 2
