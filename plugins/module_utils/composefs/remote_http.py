# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Reading a remote store over HTTP(S): keep-alive connections, retries, stall detection.

Standard library only (``http.client``), so a node needs nothing but its
Python.  Each thread takes a connection from a small pool and gives it back
after a complete response, so a pull of thousands of objects opens only as
many connections as it runs transfers (as ostree and wget keep theirs
alive).

What is retried, with a doubling delay: a lost or refused connection, a
timeout, a stalled transfer, a response cut short, HTTP 408, 429 and 5xx.
What is not: 404 (:class:`.errors.RemoteNotFound`), 401/403, a TLS
certificate that fails the check, and anything the sink raises (a digest
that does not match, a full disk): trying again would not change those.

Secrets (the password, the token, the headers) go into request headers and
nowhere else: messages name the URL without its credentials.
"""

from __future__ import annotations

import base64
import http.client
import os
import queue
import random
import re
import socket
import ssl
import threading
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import getproxies, proxy_bypass

from .errors import RemoteError, RemoteNotFound, StoreError
from .remote_options import CONTROL_CHARS, RemoteOptions, RemoteURL, check_readable_file

USER_AGENT = "composefs-fleet/0.1"
#: Bytes read per call: big enough that per-call overhead vanishes next to hashing.
READ_SIZE = 256 * 1024
#: Redirects followed per request (a CDN or bucket may send one or two).
MAX_REDIRECTS = 5
#: Longest wait between two attempts.
MAX_RETRY_DELAY = 30.0

_RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)
_REDIRECT_STATUS = (301, 302, 303, 307, 308)


class _Transient(Exception):
    """A failure worth another attempt."""


class _Target:
    """Where a request goes: a connection key and the request target."""

    def __init__(self, scheme: str, host: str, port: int, target: str, same_origin: bool) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.target = target
        # Credentials go only to the remote's own host (not to a redirect elsewhere).
        self.same_origin = same_origin


class HttpTransport:
    """A remote store at an ``http://`` or ``https://`` URL."""

    def __init__(self, remote: RemoteURL, options: RemoteOptions, connections: int = 8) -> None:
        self.remote = remote
        self.url = remote.shown
        self.options = options
        check_readable_file(options.ca_path, "ca_path")
        check_readable_file(options.client_cert, "client_cert")
        check_readable_file(options.client_key, "client_key")
        # The environment's proxies, read once (getproxies() walks all of os.environ).
        self._proxies: Dict[Tuple[str, str], Optional[Tuple[str, int, Optional[str]]]] = {}
        self._context = _ssl_context(options) if remote.scheme == "https" else None
        self._auth = _auth_headers(remote, options)
        self._pool: "queue.LifoQueue[Tuple[Tuple[str, str, int], http.client.HTTPConnection]]" = queue.LifoQueue()
        self._max_idle = max(1, connections)
        self._closed = False
        self._lock = threading.Lock()

    # ---- the Transport interface
    def get_small(self, path: str, limit: int) -> bytes:
        """The whole file ``path``; a RemoteError if it is larger than ``limit`` bytes."""
        sink = _Collect()
        self._fetch(path, sink, limit)
        return bytes(sink.data)

    def stream(self, path: str, sink: Any) -> int:
        """Feed the file ``path`` to ``sink.write``; ``sink.reset()`` before an attempt starts over."""
        return self._fetch(path, sink, None)

    def after_fork(self) -> None:
        """In a forked transfer process: never share the parent's kept connections (one stream each)."""
        while True:
            try:
                self._pool.get_nowait()  # left open: the parent still owns the socket
            except queue.Empty:
                break
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                _key, conn = self._pool.get_nowait()
            except queue.Empty:
                return
            conn.close()

    # ---- requests
    def _fetch(self, path: str, sink: Any, limit: Optional[int]) -> int:
        shown = self.remote.file_url(path)
        attempt = 0
        while True:
            try:
                return self._follow(path, sink, limit, shown)
            except _Transient as exc:
                if attempt >= self.options.retries:
                    tries = "" if attempt == 0 else " (gave up after %d attempts)" % (attempt + 1)
                    raise RemoteError(shown, "%s%s" % (exc, tries)) from None
                delay = min(self.options.retry_delay * (2 ** attempt), MAX_RETRY_DELAY)
                # Jitter, so that many nodes cut off at once do not return at once.
                time.sleep(delay * (0.5 + random.random() / 2))
                attempt += 1
                sink.reset()

    def _follow(self, path: str, sink: Any, limit: Optional[int], shown: str) -> int:
        host, port = self.remote.host_port()
        target = _Target(self.remote.scheme, host, port, self.remote.request_path(path), True)
        for _hop in range(MAX_REDIRECTS + 1):
            location = self._once(target, sink, limit, shown)
            if isinstance(location, int):
                return location
            target = self._redirect(target, location, shown)
        raise RemoteError(shown, "more than %d redirects" % MAX_REDIRECTS)

    def _redirect(self, current: _Target, location: str, shown: str) -> _Target:
        base = "%s://%s:%d%s" % (current.scheme, current.host, current.port, current.target)
        new = urlsplit(urljoin(base, location))
        scheme = new.scheme.lower()
        if scheme not in ("http", "https"):
            raise RemoteError(shown, "redirected to a %s: URL; only http and https are followed" % (scheme or "relative"))
        if current.scheme == "https" and scheme == "http":
            raise RemoteError(shown, "redirected from https to plain http: refused")
        try:
            port = new.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise RemoteError(shown, "redirected to a URL with a bad port") from None
        host = new.hostname or ""
        if not host:
            raise RemoteError(shown, "redirected to a URL without a host")
        if scheme == "https" and self._context is None:
            self._context = _ssl_context(self.options)
        target = new.path or "/"
        if new.query:
            target += "?" + new.query
        same = current.same_origin and (scheme, host, port) == (self.remote.scheme,) + self.remote.host_port()
        return _Target(scheme, host, port, target, same)

    def _once(self, target: _Target, sink: Any, limit: Optional[int], shown: str) -> Any:
        """One request: the body's size, or the Location of a redirect."""
        key, conn = self._take(target)
        reusable = False
        try:
            resp = self._request(conn, target, shown)
            status = resp.status
            if status == 200:
                size = self._read_body(resp, sink, limit, shown)
                reusable = not resp.will_close
                return size
            reason = "HTTP %d %s%s" % (status, resp.reason or "", _error_detail(resp, status))
            if status in _REDIRECT_STATUS:
                location = resp.getheader("Location")
                if not location:
                    raise RemoteError(shown, "%s without a Location" % reason.strip())
                return location
            if status in (404, 410):
                raise RemoteNotFound(shown, "not found (%s)" % reason.strip())
            if status in (401, 403):
                raise RemoteError(shown, "%s: credentials missing or refused" % reason.strip())
            if status in _RETRY_STATUS:
                raise _Transient(reason.strip())
            raise RemoteError(shown, reason.strip())
        finally:
            if reusable:
                self._give(key, conn)
            else:
                conn.close()

    def _request(self, conn: http.client.HTTPConnection, target: _Target, shown: str) -> http.client.HTTPResponse:
        proxy = self._proxy(target)
        request_target = target.target
        if proxy is not None and target.scheme == "http":
            # A plain-HTTP proxy is asked for the absolute URL.
            request_target = "http://%s:%d%s" % (_bracket(target.host), target.port, target.target)
        try:
            conn.putrequest("GET", request_target)
            conn.putheader("User-Agent", USER_AGENT)
            headers = dict(self.options.headers)
            if target.same_origin:
                for name, value in self._auth.items():
                    headers.setdefault(name, value)
            else:
                headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}
            if proxy is not None and target.scheme == "http" and proxy[2]:
                headers["Proxy-Authorization"] = proxy[2]
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            return conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            raise RemoteError(shown, "TLS certificate check failed: %s" % (exc.verify_message or exc.reason)) from None
        except ssl.SSLError as exc:
            if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                raise _Transient("TLS connection closed: %s" % (exc.reason or exc)) from None
            raise RemoteError(shown, "TLS failed: %s" % (exc.reason or exc)) from None
        except socket.timeout:
            raise _Transient("no answer within %g s" % self.options.timeout) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(_describe(exc, proxy)) from None

    def _read_body(self, resp: http.client.HTTPResponse, sink: Any, limit: Optional[int], shown: str) -> int:
        length = resp.length
        if limit is not None and length is not None and length > limit:
            raise RemoteError(shown, "is %d bytes, more than the %d accepted" % (length, limit))
        buf = bytearray(READ_SIZE if length is None else max(1, min(READ_SIZE, length)))
        view = memoryview(buf)
        opts = self.options
        total = 0
        window_start = time.monotonic()
        window_bytes = 0
        while True:
            try:
                # readinto1: what has arrived, at most one recv.  readinto would wait for the whole
                # buffer (256 KiB), so a trickling transfer would not be checked against the low-speed limit.
                n = resp.readinto1(view)
            except socket.timeout:
                raise _Transient("transfer stalled: no data for %g s after %d bytes" % (self._read_timeout(), total)) from None
            except http.client.IncompleteRead as exc:
                raise _Transient("transfer cut short after %d bytes (%d more expected)"
                                 % (total + len(exc.partial), exc.expected or 0)) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient("transfer failed after %d bytes: %s" % (total, _describe(exc, None))) from None
            if not n:
                if resp.length:  # readinto1 does not raise IncompleteRead: the connection ended early
                    raise _Transient("transfer cut short after %d bytes (%d more expected)" % (total, resp.length))
                resp.close()  # nor does it mark the response done, which the next request on the connection needs
                return total
            total += n
            if limit is not None and total > limit:
                raise RemoteError(shown, "is more than the %d bytes accepted" % limit)
            sink.write(view[:n])
            window_bytes += n
            now = time.monotonic()
            elapsed = now - window_start
            if elapsed >= opts.low_speed_time:
                if window_bytes < opts.low_speed_limit * elapsed:
                    raise _Transient("transfer too slow: %d bytes in the last %.0f s, under %d bytes/s"
                                     % (window_bytes, elapsed, opts.low_speed_limit))
                window_start, window_bytes = now, 0

    def _read_timeout(self) -> float:
        # A transfer that stops altogether is caught by the socket timeout.
        return min(self.options.timeout, self.options.low_speed_time)

    def _proxy(self, target: _Target) -> Optional[Tuple[str, int, Optional[str]]]:
        key = (target.scheme, target.host)
        if key not in self._proxies:
            self._proxies[key] = _proxy_for(target.scheme, target.host)
        return self._proxies[key]

    # ---- the connection pool
    def _take(self, target: _Target) -> Tuple[Tuple[str, str, int], http.client.HTTPConnection]:
        key = (target.scheme, target.host, target.port)
        kept: List[Tuple[Tuple[str, str, int], http.client.HTTPConnection]] = []
        found = None
        while True:
            try:
                item = self._pool.get_nowait()
            except queue.Empty:
                break
            if item[0] == key:
                found = item[1]
                break
            kept.append(item)
        for item in kept:
            self._pool.put(item)
        if found is not None:
            return key, found
        return key, self._connect(target)

    def _give(self, key: Tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            closed = self._closed
        if closed or self._pool.qsize() >= self._max_idle:
            conn.close()
        else:
            self._pool.put((key, conn))

    def _connect(self, target: _Target) -> http.client.HTTPConnection:
        timeout = self._read_timeout()
        proxy = self._proxy(target)
        if target.scheme == "https":
            if self._context is None:
                self._context = _ssl_context(self.options)
            if proxy is not None:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    proxy[0], proxy[1], timeout=timeout, context=self._context)
                tunnel_headers = {"Proxy-Authorization": proxy[2]} if proxy[2] else None
                conn.set_tunnel(target.host, target.port, headers=tunnel_headers)
                return conn
            return http.client.HTTPSConnection(target.host, target.port, timeout=timeout, context=self._context)
        if proxy is not None:
            return http.client.HTTPConnection(proxy[0], proxy[1], timeout=timeout)
        return http.client.HTTPConnection(target.host, target.port, timeout=timeout)


class _Collect:
    """A sink that keeps what it is given (small files: refs, meta.json, images)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, view: memoryview) -> None:
        self.data += view

    def reset(self) -> None:
        self.data = bytearray()


def _error_detail(resp: http.client.HTTPResponse, status: int) -> str:
    """What a short error page says (nginx: "400 No required SSL certificate was sent"), cleaned for a message."""
    if status in _REDIRECT_STATUS:
        return ""
    try:
        body = resp.read(4096) if (resp.length or 0) <= 4096 else b""
    except (OSError, http.client.HTTPException):
        return ""
    found = re.search(rb"<title>(.*?)</title>", body, re.I | re.S)
    if found:
        text = found.group(1)
    elif (resp.getheader("Content-Type") or "").startswith("text/plain"):
        text = body.strip().split(b"\n", 1)[0]
    else:
        return ""
    cleaned = " ".join(CONTROL_CHARS.sub(" ", text.decode("utf-8", "replace")).split())[:160]
    if not cleaned or cleaned in ("%d %s" % (status, resp.reason or "")):
        return ""
    return " (the server says: %s)" % cleaned


def _ssl_context(options: RemoteOptions) -> ssl.SSLContext:
    try:
        if options.validate_certs:
            ca = options.ca_path
            if ca is not None and os.path.isdir(ca):
                context = ssl.create_default_context(capath=ca)
            else:
                context = ssl.create_default_context(cafile=ca)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    except (ssl.SSLError, OSError) as exc:
        raise StoreError("ca_path %s: not a usable CA certificate file or directory: %s"
                         % (options.ca_path, getattr(exc, "reason", None) or exc)) from None
    if options.client_cert:
        try:
            context.load_cert_chain(options.client_cert, options.client_key)
        except (ssl.SSLError, OSError) as exc:
            raise StoreError("client_cert %s%s: cannot be used: %s" % (
                options.client_cert, " / client_key %s" % options.client_key if options.client_key else "",
                getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)) from None
    return context


def _auth_headers(remote: RemoteURL, options: RemoteOptions) -> Dict[str, str]:
    if options.token is not None:
        return {"Authorization": "Bearer %s" % options.token}
    user = options.username if options.username is not None else remote.username
    password = options.password if options.password is not None else remote.password
    if user is None:
        return {}
    raw = ("%s:%s" % (user, password or "")).encode("utf-8")
    return {"Authorization": "Basic %s" % base64.b64encode(raw).decode("ascii")}


def _proxy_for(scheme: str, host: str) -> Optional[Tuple[str, int, Optional[str]]]:
    """(host, port, Proxy-Authorization) of the proxy the environment names for ``scheme``, or None."""
    proxy = getproxies().get(scheme)
    if not proxy or proxy_bypass(host):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    parts = urlsplit(proxy)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise StoreError("proxy %s (from %s_proxy): only http:// proxies are supported" % (_strip_user(proxy), scheme))
    try:
        port = parts.port or 80
    except ValueError:
        raise StoreError("proxy %s (from %s_proxy): bad port" % (_strip_user(proxy), scheme)) from None
    auth = None
    if parts.username:
        raw = ("%s:%s" % (unquote(parts.username), unquote(parts.password or ""))).encode("utf-8")
        auth = "Basic %s" % base64.b64encode(raw).decode("ascii")
    return parts.hostname, port, auth


def _strip_user(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)


def _bracket(host: str) -> str:
    return "[%s]" % host if ":" in host else host


def _describe(exc: BaseException, proxy: Optional[Tuple[str, int, Optional[str]]]) -> str:
    via = "" if proxy is None else " (through the proxy %s:%d)" % (proxy[0], proxy[1])
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused%s" % via
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering%s" % via
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host name: %s" % (exc.strerror or exc)
    if isinstance(exc, OSError):
        return "%s%s" % (exc.strerror or exc, via)
    return "%s: %s%s" % (type(exc).__name__, exc, via)
