# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""How to reach a remote store: its URL, TLS, credentials, patience.

A remote is a store directory served as plain files (``http://``,
``https://``) or reached directly (``file://``).  This module holds what
every transport needs to know and the one place URLs are checked and
shown: a URL in a message never carries its credentials.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from .errors import StoreError

SCHEMES = ("http", "https", "file")

#: A header name is an RFC 9110 token; values may not hold control characters (no header injection).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class RemoteOptions:
    """TLS, credentials and patience of the transfers from one remote.

    ``token`` is sent as ``Authorization: Bearer``; ``username``/``password``
    as basic auth (``username`` may also come from the URL).  ``timeout``:
    seconds to connect and between two reads.  A transfer slower than
    ``low_speed_limit`` bytes/s for ``low_speed_time`` seconds is aborted
    (ostree's 1000 B/s for 30 s).  Transient failures (connection lost,
    timeouts, HTTP 408/429/5xx) are retried ``retries`` times, waiting
    ``retry_delay`` seconds, doubled each time.
    """

    def __init__(self, validate_certs: bool = True, ca_path: Optional[str] = None,
                 client_cert: Optional[str] = None, client_key: Optional[str] = None,
                 username: Optional[str] = None, password: Optional[str] = None,
                 token: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 timeout: float = 30.0, low_speed_limit: int = 1000, low_speed_time: float = 30.0,
                 retries: int = 5, retry_delay: float = 0.5) -> None:
        self.validate_certs = validate_certs
        self.ca_path = ca_path
        self.client_cert = client_cert
        self.client_key = client_key
        self.username = username
        self.password = password
        self.token = token
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.low_speed_limit = low_speed_limit
        self.low_speed_time = low_speed_time
        self.retries = retries
        self.retry_delay = retry_delay
        self.check()

    def check(self) -> None:
        """Refuse values no transfer could use, naming the option."""
        if self.timeout <= 0:
            raise StoreError("timeout must be more than 0 seconds (got %r)" % self.timeout)
        if self.low_speed_limit < 0 or self.low_speed_time <= 0:
            raise StoreError("low_speed_limit must be >= 0 and low_speed_time > 0")
        if self.retries < 0 or self.retry_delay < 0:
            raise StoreError("retries and retry_delay must not be negative")
        if self.client_key and not self.client_cert:
            raise StoreError("client_key needs client_cert")
        for name, value in self.headers.items():
            if not isinstance(name, str) or not _HEADER_NAME.match(name):
                raise StoreError("header name %r is not a valid HTTP header name" % (name,))
            if not isinstance(value, str) or CONTROL_CHARS.search(value.replace("\t", " ")):
                # The value is not shown: it may be a secret.
                raise StoreError("header %s: the value must be text without control characters" % name)
        for name in ("username", "password", "token"):
            value = getattr(self, name)
            if value is not None and CONTROL_CHARS.search(value):
                raise StoreError("%s may not contain control characters" % name)
        if self.username is not None and ":" in self.username:
            raise StoreError("username may not contain ':' (basic auth)")

    def with_defaults(self, defaults: Dict[str, Any]) -> "RemoteOptions":
        """A copy where the options still unset take ``defaults`` (a configured remote's)."""
        out = RemoteOptions.__new__(RemoteOptions)
        out.__dict__.update(self.__dict__)
        out.headers = dict(self.headers)
        for key, value in defaults.items():
            if key in ("ca_path", "client_cert", "client_key", "username") and getattr(out, key) is None:
                setattr(out, key, value)
        out.check()
        return out


class RemoteURL:
    """A checked remote URL: scheme, host, port, base path; credentials kept apart."""

    def __init__(self, url: str) -> None:
        if not isinstance(url, str) or not url:
            raise StoreError("remote URL is empty")
        if CONTROL_CHARS.search(url) or " " in url:
            raise StoreError("remote URL %r contains spaces or control characters (percent-encode them)" % shown_url(url))
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise StoreError("remote URL %s: scheme must be one of %s" % (shown_url(url), ", ".join(s + "://" for s in SCHEMES)))
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise StoreError("remote URL %s: a query or fragment is not part of a store's address" % shown_url(url))
        self.scheme = scheme
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        try:
            self.port = parts.port
        except ValueError:
            raise StoreError("remote URL %s: the port is not a number from 0 to 65535" % shown_url(url)) from None
        self.host = parts.hostname or ""
        if scheme == "file":
            if self.host not in ("", "localhost") or self.port is not None or self.username:
                raise StoreError("remote URL %s: a file:// URL names a local path (file:///path)" % shown_url(url))
            self.path = unquote(parts.path)
            if not self.path.startswith("/"):
                raise StoreError("remote URL %s: a file:// path must be absolute" % shown_url(url))
            if "\x00" in self.path:
                raise StoreError("remote URL %s: the path contains NUL" % shown_url(url))
        else:
            if not self.host:
                raise StoreError("remote URL %s has no host" % shown_url(url))
            # The base path stays percent-encoded as given; it is sent as is.
            self.path = parts.path.rstrip("/")
        netloc = ("[%s]" % self.host if ":" in self.host else self.host) + ("" if self.port is None else ":%d" % self.port)
        #: The URL as shown in messages: no user name, no password.
        self.shown = urlunsplit((scheme, netloc, parts.path, "", ""))

    def file_url(self, relpath: str) -> str:
        """Where ``relpath`` of this remote is, for messages."""
        return self.shown.rstrip("/") + "/" + relpath

    def request_path(self, relpath: str) -> str:
        """The HTTP request target of ``relpath`` (a store-relative name: hex digests and ref names)."""
        return self.path + "/" + quote(relpath, safe="/")

    def host_port(self) -> Tuple[str, int]:
        return self.host, self.port if self.port is not None else (443 if self.scheme == "https" else 80)


def shown_url(url: str) -> str:
    """``url`` without user name and password (for a message about a URL that failed to parse)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url)[:300]


def is_url(remote: str) -> bool:
    """A URL (else a remote's name in the store's config)."""
    return "://" in remote


def open_transport(url: str, options: Optional[RemoteOptions] = None, connections: int = 8) -> Any:
    """The transport that reads the remote store at ``url`` (http, https or file)."""
    parsed = RemoteURL(url)
    options = options or RemoteOptions()
    if parsed.scheme == "file":
        from .remote_file import FileTransport

        return FileTransport(parsed)
    from .remote_http import HttpTransport

    return HttpTransport(parsed, options, connections)


def check_readable_file(path: Optional[str], what: str) -> None:
    """A CA/cert/key file named in the options exists and is readable, said before any transfer."""
    if path is not None and not os.access(path, os.R_OK):
        raise StoreError("%s %s: not a readable file" % (what, path))
