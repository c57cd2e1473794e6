# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Structured entries to the journal, or plain lines to stderr without one.

systemd-python's ``journal.send`` drops entries silently when journald's
socket is missing, so the socket is looked for before each entry: a node
whose journal is gone (journald stopped, a container without it) still gets
every finding on stderr, with a ``<priority>`` prefix that journald and
syslog understand when they read the stream.  Nothing here may raise: the
agent's checks must outlive their logging.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, Optional, TextIO

from .findings import KINDS, Finding

IDENTIFIER = "composefs-fleet-agent"
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _load_send() -> Optional[Callable[..., Any]]:
    try:
        from systemd import journal  # type: ignore[import-not-found]  # python3-systemd, optional
    except ImportError:
        return None
    return journal.send  # type: ignore[no-any-return]


def _field_value(value: object) -> object:
    if isinstance(value, (bytes, int, float)):
        return value
    # Paths may hold bytes that are not UTF-8 (surrogate-escaped): send them as bytes.
    return os.fsencode(str(value))


def _plain(value: object) -> str:
    text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
    if text and all(c.isprintable() and c not in ' "\\=' for c in text):
        return text
    return '"%s"' % text.encode("unicode_escape", "backslashreplace").decode("ascii").replace('"', '\\"')


class Journal:
    def __init__(self, stream: Optional[TextIO] = None, echo: bool = False,
                 socket_path: str = JOURNAL_SOCKET, send: Optional[Callable[..., Any]] = None,
                 use_journal: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.echo = echo
        self.socket_path = socket_path
        self.send = (send or _load_send()) if use_journal else None
        self.journal_failures = 0

    def finding(self, finding: Finding, extra: Optional[Dict[str, object]] = None) -> None:
        fields = dict(finding.fields)
        fields.update(extra or {})
        self.entry(finding.kind, finding.message, fields)

    def entry(self, kind: str, message: str, fields: Dict[str, object]) -> None:
        info = KINDS[kind]
        sent = False
        if self.send is not None and os.path.exists(self.socket_path):
            args = {"COMPOSEFS_" + k.upper(): _field_value(v) for k, v in fields.items() if v is not None}
            args.update(MESSAGE_ID=info.message_id, PRIORITY=str(info.priority),
                        SYSLOG_IDENTIFIER=IDENTIFIER, COMPOSEFS_FINDING=kind)
            try:
                self.send(message, **args)
                sent = True
            except (OSError, ValueError, TypeError):
                self.journal_failures += 1
        if not sent or self.echo:
            self.line(info.priority, kind, message, fields)

    def line(self, priority: int, kind: str, message: str, fields: Dict[str, object]) -> None:
        parts = ["<%d>%s: %s" % (priority, kind, message.replace("\n", " "))]
        parts.extend("%s=%s" % (k, _plain(v)) for k, v in sorted(fields.items()) if v is not None)
        try:
            self.stream.write(" ".join(parts) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: nowhere left to say it
