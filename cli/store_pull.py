# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-store pull and remote: options, progress line, output."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List

from . import store_sign

PULL_DESCRIPTION = """\
Make REF in this store name the image REF names in a remote store, fetching
only the objects this store lacks.

A remote is a store directory exactly as composefs-store leaves it, served
as plain files by any web server (http://, https://) or reached directly
(file:///path); REMOTE may also be the name of a remote added with
'remote add'.  The image is checked against its ref's digest before it is
read; every object's fs-verity digest is computed while it streams in and
compared with its name.  Objects are published first, then the image, the
ref last: a failed or interrupted pull leaves no ref to a partial image, and
the next pull fetches only what is still missing.

With --trusted-key (or trusted keys kept for a named remote), the remote's
signatures/REF must hold a statement signed by a trusted, unrevoked key for
this ref and this image, unexpired and not older than the one this store
holds; it is checked before anything is written.

Credentials are never taken on the command line (others can read it):
--password-file or $COMPOSEFS_REMOTE_PASSWORD, --token-file or
$COMPOSEFS_REMOTE_TOKEN.  Proxies come from http_proxy, https_proxy and
no_proxy.
"""

PULL_EPILOG = """\
examples:
  composefs-store --repo /var/lib/cfs pull https://images.example.com/cfs app/v2
  composefs-store --repo /var/lib/cfs pull --ca-file /etc/ssl/fleet-ca.pem --token-file /etc/cfs/token \\
      https://images.example.com/cfs app/v2 --ref app/current
  composefs-store --repo /var/lib/cfs remote add origin https://images.example.com/cfs
  composefs-store --repo /var/lib/cfs pull origin app/v2
"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    pull = sub.add_parser("pull", parents=[common], help="fetch an image and the objects it lacks from a remote store",
                          description=PULL_DESCRIPTION, epilog=PULL_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    pull.add_argument("remote", metavar="URL|REMOTE")
    pull.add_argument("remote_ref", metavar="REF", help="the ref in the remote store")
    pull.add_argument("--ref", metavar="LOCAL", help="the ref to set here (default: REF)")
    pull.add_argument("--jobs", "-j", type=int, default=8, metavar="N", help="transfers at once (default 8)")
    pull.add_argument("--dry-run", action="store_true",
                      help="fetch only the ref and the image; say what a pull would fetch; write nothing")
    tls = pull.add_argument_group("TLS")
    tls.add_argument("--ca-file", metavar="FILE", help="CA certificates (PEM file or directory) to check the server with")
    tls.add_argument("--insecure", action="store_true", help="do not check the server's certificate")
    tls.add_argument("--client-cert", metavar="FILE", help="client certificate (PEM; may hold the key too)")
    tls.add_argument("--client-key", metavar="FILE", help="client certificate's key (PEM)")
    auth = pull.add_argument_group("authentication")
    auth.add_argument("--user", metavar="NAME", help="user name for basic auth")
    auth.add_argument("--password-file", metavar="FILE", help="basic auth password: first line of FILE")
    auth.add_argument("--token-file", metavar="FILE", help="bearer token: first line of FILE")
    auth.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                      help="an extra request header (repeatable; visible to other users on the command line: put "
                           "a token in --token-file instead)")
    patience = pull.add_argument_group("retries and timeouts")
    patience.add_argument("--retries", type=int, default=5, metavar="N",
                          help="attempts after a transient failure (default 5, waiting 0.5 s, doubled each time)")
    patience.add_argument("--retry-delay", type=float, default=0.5, metavar="SECONDS", help=argparse.SUPPRESS)
    patience.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                          help="to connect, and at most between two reads (default 30)")
    patience.add_argument("--low-speed-limit", type=int, default=1000, metavar="BYTES",
                          help="abort a transfer slower than this many bytes/s ... (default 1000)")
    patience.add_argument("--low-speed-time", type=float, default=30.0, metavar="SECONDS",
                          help="... for this long (default 30)")
    trust = pull.add_argument_group("signatures")
    store_sign.add_trust_options(trust)
    progress = pull.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None,
                          help="show a progress line on stderr (default: when stderr is a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")

    remote = sub.add_parser("remote", parents=[common], help="name remote stores: remote add|rm|ls",
                            description="Name remote stores, so that 'pull NAME REF' finds them.  Kept in "
                                        "DIR/remotes.json, without credentials.")
    rsub = remote.add_subparsers(dest="remote_command", metavar="add|rm|ls")
    add = rsub.add_parser("add", parents=[common], help="add a remote")
    add.add_argument("name", metavar="NAME")
    add.add_argument("url", metavar="URL")
    add.add_argument("--ca-file", metavar="FILE", help="CA certificates to check this remote's server with")
    store_sign.add_trust_options(add)
    add.add_argument("--replace", action="store_true", help="change a remote that exists")
    rm = rsub.add_parser("rm", parents=[common], help="remove a remote")
    rm.add_argument("name", metavar="NAME")
    rsub.add_parser("ls", parents=[common], help="list remotes")


def _first_line(path: str, what: str, fail: Callable[[str], Exception]) -> str:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(65536)
    except OSError as exc:
        raise fail("%s %s: %s" % (what, path, exc.strerror or exc)) from None
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise fail("%s %s: the first line is empty" % (what, path))
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise fail("%s %s: not UTF-8 text" % (what, path)) from None


def _options(args: argparse.Namespace, fail: Callable[[str], Exception]) -> Any:
    from composefs_fleet.remote_options import RemoteOptions

    if args.jobs < 1:
        raise fail("--jobs must be at least 1")
    if args.insecure and args.ca_file:
        raise fail("--insecure and --ca-file exclude each other")
    password = os.environ.get("COMPOSEFS_REMOTE_PASSWORD")
    if args.password_file:
        password = _first_line(args.password_file, "--password-file", fail)
    token = os.environ.get("COMPOSEFS_REMOTE_TOKEN")
    if args.token_file:
        token = _first_line(args.token_file, "--token-file", fail)
    if password is not None and args.user is None:
        raise fail("a password needs --user")
    if token is not None and args.user is not None:
        raise fail("use either basic auth (--user) or a bearer token, not both")
    headers: Dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise fail("--header %r: expected 'NAME: VALUE'" % name.strip()[:40])
        headers[name.strip()] = value.strip()
    return RemoteOptions(validate_certs=not args.insecure, ca_path=args.ca_file, client_cert=args.client_cert,
                         client_key=args.client_key, username=args.user, password=password, token=token,
                         headers=headers, timeout=args.timeout, low_speed_limit=args.low_speed_limit,
                         low_speed_time=args.low_speed_time, retries=args.retries, retry_delay=args.retry_delay)


class _ProgressLine:
    """One line on stderr, rewritten in place: objects, bytes, rate."""

    def __init__(self, human: Callable[[int], str]) -> None:
        import time

        self._human = human
        self._time = time.monotonic
        self._start = time.monotonic()
        self.shown = False

    def __call__(self, objects: int, objects_total: int, nbytes: int, bytes_total: int) -> None:
        elapsed = max(self._time() - self._start, 1e-3)
        line = "pull: %d/%d objects, %s/%s, %s/s" % (objects, objects_total, self._human(nbytes),
                                                     self._human(bytes_total), self._human(int(nbytes / elapsed)))
        sys.stderr.write("\r\x1b[K" + line)
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def cmd_pull(args: argparse.Namespace, store: Any, emit: Callable[[Any, List[str]], None],
             human: Callable[[int], str], fail: Callable[[str], Exception]) -> int:
    from composefs_fleet.pull import pull

    options = _options(args, fail)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    line = _ProgressLine(human) if show and not args.dry_run else None
    try:
        result = pull(store, args.remote, args.remote_ref, args.ref, options=options, jobs=args.jobs,
                      dry_run=args.dry_run, progress=line, trust=store_sign.trust_policy(args))
    finally:
        if line is not None:
            line.end()
    moved = "" if result.previous in (None, result.digest) else " (was %s)" % result.previous
    if args.dry_run:
        lines = ["would pull %s %s%s from %s" % (result.digest, result.ref, moved, result.url),
                 "  %d objects: %d missing (%s)" % (result.objects, result.objects_missing, human(result.bytes_missing))]
    else:
        lines = ["%s %s%s from %s" % (result.digest, result.ref, moved, result.url),
                 "  %d objects: %d fetched (%s), %d already here; %s image"
                 % (result.objects, result.objects_fetched, human(result.bytes_fetched),
                    result.objects - result.objects_missing, "new" if result.image_fetched else "existing")]
    if result.signature is not None:
        lines.append("  signed at %s by %s%s; checked in %.3f s" % (
            result.signature["signed"], ", ".join("key " + k[:16] for k in result.signature["keys"]),
            "" if result.signature["expires"] is None else ", expires %s" % result.signature["expires"],
            result.verify_seconds))
    emit(result.as_dict(), lines)
    return 0


def cmd_remote(args: argparse.Namespace, store: Any, emit: Callable[[Any, List[str]], None],
               fail: Callable[[str], Exception]) -> int:
    from composefs_fleet.store_remotes import add_remote, load_remotes, remove_remote

    command = getattr(args, "remote_command", None)
    if command == "add":
        settings: Dict[str, Any] = {"ca_path": args.ca_file} if args.ca_file else {}
        if args.trusted_key or args.revoked_key:
            settings["trusted_keys"] = [os.path.abspath(p) for p in args.trusted_key]
            settings["revoked_keys"] = [os.path.abspath(p) for p in args.revoked_key]
        changed = add_remote(store, args.name, args.url, settings, replace=args.replace)
        emit({"name": args.name, "url": args.url, "changed": changed},
             ["added remote %s: %s" % (args.name, args.url) if changed else "remote %s is already %s" % (args.name, args.url)])
        return 0
    if command == "rm":
        if not remove_remote(store, args.name):
            raise fail("no remote named %s" % args.name)
        emit({"name": args.name, "changed": True}, ["removed remote %s" % args.name])
        return 0
    if command == "ls":
        remotes = load_remotes(store)
        emit(remotes, ["%s\t%s%s" % (name, entry["url"], "".join("\t%s=%s" % (k, v) for k, v in sorted(entry.items()) if k != "url"))
                       for name, entry in sorted(remotes.items())])
        return 0
    raise fail("remote: a command is required: add, rm or ls")
