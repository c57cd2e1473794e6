# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Debian's nginx serving a directory on 127.0.0.1, started by a test with its own config.

Never the system service: ``/usr/sbin/nginx -c DIR/nginx.conf -p DIR`` with the
config, pid file, logs and temp paths in a private directory, in its own
process group (``kill()`` is ``kill -9`` of the group), on a free port of
127.0.0.1.  One process by default (``master_process off``: the worker is
the process we started, it reads the served files as whoever runs the test);
``worker_processes=N`` > 1 adds a master (``user root`` when run as root).
Options: TLS with a server certificate from a test CA (:class:`TestPki`,
made with openssl) and optionally required client
certificates, basic auth (an htpasswd line made by ``openssl passwd``), a
bearer token, ``limit_rate`` (a throttle), keep-alive settings.  The access log
has one tab-separated line per finished request (:meth:`NginxServer.entries`);
a request cut off by ``kill()`` has no line.

Used by tests/remote/ and, outside pytest, by bench/ and the guest and fleet
drills: the module needs only the standard library; the pytest fixtures at the
end (``nginx``, ``pki``) are defined when pytest is importable.

    srv = NginxServer(store_dir, workdir, limit_rate="200k").start()
    url = srv.url                                  # http://127.0.0.1:PORT/cfs
    ...
    srv.fetches()["objects/ab/cdef..."]            # GETs of that path answered 200, completed
    srv.kill(); srv.start()                        # a fresh access log per start
    srv.stop()
"""
from __future__ import annotations

import atexit
import collections
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Counter, Dict, List, NamedTuple, Optional, Tuple

NGINX = "/usr/sbin/nginx"
OPENSSL = "openssl"
PREFIX = "/cfs"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# One line per request: the fields of LogEntry, tab-separated.  $request_completion
# is "OK" only when the whole response was sent; $connection/$connection_requests
# show keep-alive reuse.  No header is logged (the Authorization header is a secret).
LOG_FORMAT = "\\t".join(["$msec", "$request_method", "$uri", "$status", "$body_bytes_sent",
                         "$request_completion", "$connection", "$connection_requests",
                         "$ssl_protocol", "$ssl_client_verify", "$remote_user"])


def nginx_missing() -> str:
    """Why this machine cannot run the server ("" if it can)."""
    if not os.path.isfile(NGINX) or not os.access(NGINX, os.X_OK):
        return "%s missing (Debian package nginx; scripts/setup installs it)" % NGINX
    return ""


def openssl_missing() -> str:
    if shutil.which(OPENSSL) is None:
        return "openssl not on PATH (Debian package openssl; scripts/setup installs it)"
    return ""


class LogEntry(NamedTuple):
    msec: float
    method: str
    path: str            # relative to the served directory ("objects/ab/cd...", "refs/app/v1")
    status: int
    body_bytes: int
    completed: bool      # the whole response was sent
    connection: int
    connection_requests: int
    ssl_protocol: str    # "" over plain HTTP
    client_verify: str   # "SUCCESS", "NONE", "FAILED:..." ("" over plain HTTP)
    user: str            # basic-auth user name ("" if none)


def _run(argv: List[str], cwd: Optional[Path] = None, stdin: Optional[str] = None) -> str:
    res = subprocess.run(argv, cwd=str(cwd) if cwd else None, input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (" ".join(argv), res.returncode, res.stderr.strip()))
    return res.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ test PKI --

class Cert(NamedTuple):
    cert: Path
    key: Path


class TestPki:
    """A directory of test CAs and certificates made with openssl (EC P-256: fast)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(str(self.dir), 0o700)
        self.cas: Dict[str, Cert] = {}

    def _key(self, name: str) -> Path:
        key = self.dir / (name + ".key")
        _run([OPENSSL, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
        return key

    def ca(self, name: str = "ca") -> Cert:
        """A self-signed CA (made once per name)."""
        if name not in self.cas:
            key = self._key(name)
            cert = self.dir / (name + ".pem")
            _run([OPENSSL, "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "30",
                  "-subj", "/CN=composefs-fleet test CA %s" % name,
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                  "-addext", "subjectKeyIdentifier=hash"])
            self.cas[name] = Cert(cert, key)
        return self.cas[name]

    def issue(self, name: str, ca: str = "ca", client: bool = False,
              san: str = "IP:127.0.0.1,DNS:localhost") -> Cert:
        """A leaf certificate signed by CA ``ca``: a server's for ``san``, or a client's."""
        authority = self.ca(ca)
        key = self._key(name)
        csr = self.dir / (name + ".csr")
        cert = self.dir / (name + ".pem")
        _run([OPENSSL, "req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=%s" % name])
        ext = self.dir / (name + ".ext")
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
                 "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]
        lines.append("extendedKeyUsage=clientAuth" if client else "extendedKeyUsage=serverAuth")
        if not client:
            lines.append("subjectAltName=" + san)
        ext.write_text("\n".join(lines) + "\n")
        _run([OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(authority.cert), "-CAkey", str(authority.key),
              "-CAcreateserial", "-out", str(cert), "-days", "30", "-extfile", str(ext)])
        return Cert(cert, key)


def htpasswd_line(user: str, password: str) -> str:
    """``user:$apr1$...`` (nginx checks apr1 itself, whatever the libc's crypt())."""
    hashed = _run([OPENSSL, "passwd", "-apr1", "-stdin"], stdin=password + "\n").strip()
    return "%s:%s\n" % (user, hashed)


# --------------------------------------------------------------------- server --

class NginxServer:
    """nginx serving ``root`` at ``URL = scheme://127.0.0.1:PORT/cfs`` (``prefix``)."""

    def __init__(self, root: Path, workdir: Path, *, prefix: str = PREFIX,
                 tls: Optional[Cert] = None, client_ca: Optional[Path] = None,
                 basic_auth: Optional[Tuple[str, str]] = None, token: Optional[str] = None,
                 limit_rate: Optional[str] = None, limit_rate_after: Optional[str] = None,
                 keepalive_timeout: Optional[str] = None, keepalive_requests: Optional[int] = None,
                 worker_processes: int = 1, extra_server: str = "") -> None:
        """``tls``: the server's certificate and key (https); ``client_ca``: require a client
        certificate signed by it (``ssl_verify_client on``); ``basic_auth``: (user, password);
        ``token``: require ``Authorization: Bearer TOKEN``; ``limit_rate``/``limit_rate_after``:
        nginx's throttle ("64k", "1m"), per response, which may send ``limit_rate`` bytes in its
        first second and then sends in bursts (4 KiB every 2 s at "2000"): a file smaller than
        ``limit_rate`` is not slowed at all; ``keepalive_*``: nginx's directives
        ("0" disables keep-alive); ``extra_server``: more directives for the server block."""
        if not prefix.startswith("/") or prefix.endswith("/") or set(prefix) & set(" ;{}\"'\\"):
            raise ValueError("prefix must look like /name: %r" % prefix)
        if token is not None and set(token) & set(" ;{}\"'\\$\n"):
            raise ValueError("token must be a plain word (it goes into nginx.conf)")
        self.root = Path(root).resolve()
        self.dir = Path(workdir)
        self.prefix = prefix
        self.tls = tls
        self.client_ca = client_ca
        self.basic_auth = basic_auth
        self.token = token
        self.limit_rate = limit_rate
        self.limit_rate_after = limit_rate_after
        self.keepalive_timeout = keepalive_timeout
        self.keepalive_requests = keepalive_requests
        self.worker_processes = worker_processes
        self.extra_server = extra_server
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.generation = 0
        # nginx runs in its own session: a script that dies without stop() would leave it running.
        atexit.register(self.stop)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(str(self.dir), 0o700)
        for sub in ("temp", "logs"):
            (self.dir / sub).mkdir(exist_ok=True)

    # -- addresses and files

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def base(self) -> str:
        """scheme://127.0.0.1:PORT (no path)."""
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    @property
    def url(self) -> str:
        """The served store's URL (no trailing slash)."""
        return self.base + self.prefix

    def url_with_credentials(self, user: str, password: str) -> str:
        return "%s://%s:%s@127.0.0.1:%d%s" % (self.scheme, user, password, self.port, self.prefix)

    @property
    def conf_path(self) -> Path:
        return self.dir / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.dir / "logs" / "error.log"

    def access_log(self, generation: Optional[int] = None) -> Path:
        """The access log of the ``generation``-th start (default: the current one), 1-based."""
        return self.dir / "logs" / ("access-%d.log" % (generation or self.generation))

    # -- config

    def config(self) -> str:
        d = self.dir
        # One worker: no master process.  The master would hand its workers, once killed
        # with it, to PID 1, which in some containers never reaps them (zombies pile up).
        master = "on" if self.worker_processes > 1 else "off"
        user = "user root root;\n" if os.geteuid() == 0 and master == "on" else ""
        listen = "listen 127.0.0.1:%d%s;" % (self.port, " ssl" if self.tls else "")
        server: List[str] = [listen, "server_name localhost;"]
        if self.tls:
            server += ["ssl_certificate %s;" % self.tls.cert, "ssl_certificate_key %s;" % self.tls.key,
                       "ssl_protocols TLSv1.2 TLSv1.3;"]
            if self.client_ca:
                server += ["ssl_client_certificate %s;" % self.client_ca, "ssl_verify_client on;"]
        if self.basic_auth:
            (d / "htpasswd").write_text(htpasswd_line(*self.basic_auth))
            os.chmod(str(d / "htpasswd"), 0o600)
            server += ['auth_basic "composefs test";', "auth_basic_user_file %s;" % (d / "htpasswd")]
        if self.token:
            server += ['if ($http_authorization != "Bearer %s") { return 401; }' % self.token]
        if self.limit_rate:
            server.append("limit_rate %s;" % self.limit_rate)
        if self.limit_rate_after:
            server.append("limit_rate_after %s;" % self.limit_rate_after)
        if self.keepalive_timeout is not None:
            server.append("keepalive_timeout %s;" % self.keepalive_timeout)
        if self.keepalive_requests is not None:
            server.append("keepalive_requests %d;" % self.keepalive_requests)
        server.append("location %s/ { alias %s/; autoindex off; }" % (self.prefix, self.root))
        if self.extra_server:
            server.append(self.extra_server)
        temps = "".join("%s_temp_path %s;\n    " % (what, d / "temp" / what)
                        for what in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return (
            "# written by tests/remote/nginx_server.py\n"
            "%(user)sdaemon off;\n"
            "master_process %(master)s;\n"
            "worker_processes %(workers)d;\n"
            "pid %(pid)s;\n"
            "error_log %(error)s info;\n"
            "events { worker_connections 512; }\n"
            "http {\n"
            "    %(temps)s"
            "default_type application/octet-stream;\n"
            "    sendfile on;\n"
            "    server_tokens off;\n"
            "    log_format cfs '%(fmt)s';\n"
            "    access_log %(access)s cfs;\n"
            "    server {\n        %(server)s\n    }\n"
            "}\n" % dict(user=user, master=master, workers=self.worker_processes, pid=d / "nginx.pid", error=self.error_log,
                         temps=temps, fmt=LOG_FORMAT, access=self.access_log(), server="\n        ".join(server)))

    # -- process

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, **changes: object) -> "NginxServer":
        """Start (again), with a fresh access log; ``changes`` replace constructor options
        (e.g. ``limit_rate=None`` to lift a throttle).  The port stays the same across starts."""
        if self.running():
            raise RuntimeError("nginx already running (pid %d)" % self.proc.pid)  # type: ignore[union-attr]
        for name, value in changes.items():
            if not hasattr(self, name) or name in ("root", "dir", "port", "proc", "generation"):
                raise TypeError("unknown nginx option %r" % name)
            setattr(self, name, value)
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()   # another process may take it before nginx binds: retry
            self.generation += 1
            self.conf_path.write_text(self.config())
            self.access_log().touch()
            error_size = self.error_log.stat().st_size if self.error_log.exists() else 0
            self.proc = subprocess.Popen([NGINX, "-c", str(self.conf_path), "-p", str(self.dir) + "/",
                                          "-e", str(self.error_log)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            problem = self._wait_ready()
            if not problem:
                return self
            self.kill()
            errors = self.error_log.read_text(errors="replace")[error_size:] if self.error_log.exists() else ""
            if "Address already in use" not in errors + problem or attempt == attempts - 1:
                raise RuntimeError("nginx (%s) did not start: %s\n%s" % (self.conf_path, problem, errors.strip()))
        raise RuntimeError("nginx did not start")  # not reached

    def _wait_ready(self) -> str:
        """"" once the port accepts connections; else why not (nginx exited, or timeout)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc and self.proc.stdout else ""
                return "exited with status %s: %s" % (self.proc.returncode if self.proc else "?", out.strip())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return ""
            except OSError:
                time.sleep(0.02)
        return "port 127.0.0.1:%d not accepting connections after %.0f s" % (self.port, START_TIMEOUT)

    def _signal_group(self, sig: int) -> None:
        # Only while the master is unreaped: its pid, and so the group id, cannot be reused meanwhile.
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self, timeout: float) -> bool:
        """Wait (up to timeout) for the master to exit; kill what is left of its group; reap it."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return True
        deadline = time.monotonic() + timeout
        exited = False
        while time.monotonic() < deadline:
            # WNOWAIT: the master stays a zombie, so its process group id stays ours to signal.
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                exited = True
                break
            time.sleep(0.02)
        self._signal_group(signal.SIGKILL)   # workers left behind, or a master that did not exit
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
        return exited

    def kill(self) -> None:
        """``kill -9`` master and workers at once: connections are cut mid-transfer."""
        self._signal_group(signal.SIGKILL)
        self._reap(STOP_TIMEOUT)

    def stop(self) -> None:
        """Fast shutdown (SIGTERM); kill -9 if that takes longer than STOP_TIMEOUT."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._reap(STOP_TIMEOUT)

    def restart(self, **changes: object) -> "NginxServer":
        self.stop()
        return self.start(**changes)

    def __enter__(self) -> "NginxServer":
        return self if self.running() else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- access log

    def entries(self, generation: Optional[int] = None) -> List[LogEntry]:
        """The access log of a start (default: the current one), parsed."""
        out = []
        path = self.access_log(generation)
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            f = line.split("\t")
            if len(f) != len(LogEntry._fields):
                raise ValueError("%s: unexpected access log line %r" % (path, line))
            rel = f[2]
            rel = rel[len(self.prefix) + 1:] if rel.startswith(self.prefix + "/") else rel
            out.append(LogEntry(float(f[0]), f[1], rel, int(f[3]), int(f[4]), f[5] == "OK", int(f[6]), int(f[7]),
                                "" if f[8] == "-" else f[8], "" if f[9] == "-" else f[9],
                                "" if f[10] == "-" else f[10]))
        return out

    def fetches(self, generation: Optional[int] = None, kind: str = "") -> Counter[str]:
        """Per path: GETs answered 200 whose whole body was sent; ``kind`` = "objects/", "images/"..."""
        return collections.Counter(e.path for e in self.entries(generation)
                                   if e.method == "GET" and e.status == 200 and e.completed
                                   and e.path.startswith(kind))

    def requests(self, generation: Optional[int] = None) -> Counter[Tuple[str, int]]:
        """Per (path, status): every logged request."""
        return collections.Counter((e.path, e.status) for e in self.entries(generation))

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> None:
        """Poll the access log until predicate(entries) is true (e.g. a number of objects sent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.entries()):
                return
            time.sleep(0.02)
        raise TimeoutError("nginx access log %s: no %s after %.0f s" % (self.access_log(), what, timeout))

    def ssl_context(self, ca: Path) -> ssl.SSLContext:
        """A client context trusting ``ca`` (for checks of the server itself)."""
        return ssl.create_default_context(cafile=str(ca))


# --------------------------------------------------------------- pytest side --

try:
    import pytest
except ImportError:  # bench/ and the drills use the classes without pytest
    pytest = None  # type: ignore[assignment]


def _unavailable(reason: str) -> None:
    # conftest.unavailable: skip here, fail under CI=true (setup installs nginx and openssl).
    try:
        from conftest import unavailable
    except ImportError:
        pytest.skip(reason)
    unavailable(reason)


if pytest is not None:
    @pytest.fixture
    def nginx(tmp_path_factory):
        """Factory: ``nginx(root, **options)`` starts an :class:`NginxServer`; all are stopped at teardown."""
        reason = nginx_missing()
        if reason:
            _unavailable(reason)
        servers: List[NginxServer] = []

        def start(root: Path, **options: object) -> NginxServer:
            srv = NginxServer(root, tmp_path_factory.mktemp("nginx"), **options)  # type: ignore[arg-type]
            servers.append(srv)
            return srv.start()

        yield start
        for srv in servers:
            srv.stop()

    @pytest.fixture(scope="session")
    def pki(tmp_path_factory) -> TestPki:
        """Test CAs and certificates (one set per session)."""
        reason = openssl_missing()
        if reason:
            _unavailable(reason)
        return TestPki(tmp_path_factory.mktemp("pki"))
