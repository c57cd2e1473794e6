# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""A server that redirects, lies or serves crafted files; a pull interrupted on the node; CLI misuse.

nginx does the redirecting (``return 302``, ``rewrite``) and serves what the
test wrote into the served store.
"""
from __future__ import annotations

import io
import signal

import pytest

from pull_fixtures import Node, Source, assert_failed, assert_has_image, assert_untouched, wait_exit  # type: ignore[import-not-found]
from pull_fixtures import nginx, node, served, source_template  # type: ignore[import-not-found]  # noqa: F401  (fixtures)
from nginx_server import TestPki, pki  # type: ignore[import-not-found]  # noqa: F401  (fixture)

from composefs_fleet.dump import parse_dump
from composefs_fleet.erofs_writer import build_image
from composefs_fleet.fsverity_digest import digest_bytes

pytestmark = pytest.mark.network

FAST = ("--retries", "1", "--timeout", "5")
TOKEN = "red1rect-t0ken"


# ----------------------------------------------------------------- redirects --

def test_redirect_to_a_mirror_on_the_same_server(served: Source, node: Node, nginx) -> None:
    """Objects are answered by a 302 to another path of the same origin (a CDN layout); the token follows."""
    srv = nginx(served.path, token=TOKEN, extra_server=(
        "location /cfs/objects/ { rewrite ^/cfs/objects/(.*)$ /mirror/$1 redirect; }\n"
        "        location /mirror/ { alias %s/objects/; }" % served.path))
    res = node.run("--json", "pull", srv.url, "app/v1", env={"COMPOSEFS_REMOTE_TOKEN": TOKEN})
    assert res.returncode == 0, res.stderr
    assert_has_image(node, served, "app/v1")
    assert srv.requests()[("objects/" + sorted(served.needs["app/v1"])[0][:2] + "/" + sorted(served.needs["app/v1"])[0][2:],
                           302)] == 1
    mirrored = [e for e in srv.entries() if e.path.startswith("/mirror/") and e.status == 200]
    assert len(mirrored) == len(served.needs["app/v1"])


def test_credentials_do_not_follow_a_redirect_to_another_origin(served: Source, node: Node, nginx) -> None:
    """The store (with a token) redirects objects to another server, which refuses any Authorization header:
    the pull succeeds only if the token stayed with its own origin."""
    mirror = nginx(served.path, extra_server='if ($http_authorization != "") { return 400; }')
    srv = nginx(served.path, token=TOKEN, extra_server=(
        "location /cfs/objects/ { rewrite ^/cfs/objects/(.*)$ %s/objects/$1 redirect; }" % mirror.url))
    res = node.run("pull", srv.url, "app/v1", *FAST, env={"COMPOSEFS_REMOTE_TOKEN": TOKEN})
    assert res.returncode == 0, res.stderr
    assert_has_image(node, served, "app/v1")
    assert len(mirror.fetches(kind="objects/")) == len(served.needs["app/v1"])
    assert TOKEN not in res.stdout + res.stderr


def test_redirect_loop_is_cut(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path, extra_server="location = /cfs/refs/app/v1 { return 302 /cfs/refs/app/v1; }")
    res = node.pull(srv.url, "app/v1", *FAST)
    assert_failed(res, srv.url + "/refs/app/v1", r"redirects")
    assert_untouched(node, {}, set())
    assert srv.requests()[("refs/app/v1", 302)] <= 2 * 6  # bounded (attempts x hops)


def test_redirect_to_a_file_url_is_refused(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path, extra_server="location = /cfs/refs/app/v1 { return 302 file:///etc/hostname; }")
    res = node.pull(srv.url, "app/v1", *FAST)
    assert_failed(res, srv.url + "/refs/app/v1", r"file: URL")
    assert_untouched(node, {}, set())


def test_redirect_from_https_to_http_is_refused(served: Source, node: Node, nginx, pki: TestPki) -> None:
    plain = nginx(served.path)
    srv = nginx(served.path, tls=pki.issue("server-redirecting"),
                extra_server="location /cfs/objects/ { rewrite ^/cfs/objects/(.*)$ %s/objects/$1 redirect; }" % plain.url)
    res = node.pull(srv.url, "app/v1", "--ca-file", pki.ca().cert, *FAST)
    assert_failed(res, srv.url + "/objects/", r"https to plain http")
    assert_untouched(node, {}, allowed=set())
    assert plain.entries() == []


# ------------------------------------------------------------- crafted files --

def serve_image(served: Source, ref: str, image: bytes) -> str:
    digest = digest_bytes(image).hex()
    (served.path / "images" / digest).write_bytes(image)
    path = served.path / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(digest + "\n")
    return digest


@pytest.mark.parametrize("payload", ["../../../../etc/shadow", "/etc/shadow", "ab/not-a-digest"])
def test_image_naming_files_outside_the_objects_is_refused(served: Source, node: Node, nginx, payload: str) -> None:
    """An image whose digest matches its ref (the server's own), but whose files point outside objects/."""
    dump = "/ 0 40755 2 0 0 0 0.0 - - -\n/evil 4096 100644 1 0 0 0 0.0 %s - -\n" % payload
    digest = serve_image(served, "evil", build_image(parse_dump(io.BytesIO(dump.encode()))))
    srv = nginx(served.path)
    res = node.pull(srv.url, "evil", *FAST)
    assert_failed(res, srv.url + "/images/" + digest, r"cannot be stored|not a usable")
    assert_untouched(node, {}, set())
    assert node.images() == set()
    assert [e.path for e in srv.entries() if not e.path.startswith(("meta.json", "refs/", "images/"))] == []


def test_oversized_ref_is_refused(served: Source, node: Node, nginx) -> None:
    (served.path / "refs" / "huge").write_text(served.digests["app/v1"] + "\n" + "x" * 8192)
    srv = nginx(served.path)
    assert_failed(node.pull(srv.url, "huge", *FAST), srv.url + "/refs/huge", r"4096")
    assert_untouched(node, {}, set())


def test_meta_of_another_format_is_refused(served: Source, node: Node, nginx) -> None:
    (served.path / "meta.json").write_text('{"format": 99, "digest": "sha256"}\n')
    srv = nginx(served.path)
    assert_failed(node.pull(srv.url, "app/v1", *FAST), srv.url, r"format 99")
    assert_untouched(node, {}, set())


def test_secret_header_values_are_never_shown(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path, extra_server='if ($http_x_api_key != "right-key") { return 403; }')
    res = node.pull(srv.url, "app/v1", "--header", "X-Api-Key: wrong-key-5ecret", *FAST)
    assert_failed(res, srv.url, r"403")
    assert "wrong-key-5ecret" not in res.stdout + res.stderr
    assert_untouched(node, {}, set())


# ------------------------------------------------------- the node interrupted --

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_pull_interrupted_on_the_node_then_again(served: Source, node: Node, nginx, sig: int) -> None:
    """The pull itself is stopped mid-transfer: no ref; fsck clean; the next pull completes.  A killed pull may
    leave staged files (gc removes them); an interrupted (SIGINT) or terminated (SIGTERM: systemd stopping a
    unit, a timeout of Ansible's) one removes its own: gc would leave objects/.tmp* for --tmp-grace (1 h)."""
    srv = nginx(served.path, limit_rate="80k")
    proc = node.popen("pull", "--jobs", "8", srv.url, "many")
    srv.wait_for(lambda es: sum(e.path.startswith("objects/") and e.completed for e in es) >= 8, what="8 objects sent")
    proc.send_signal(sig)
    res = wait_exit(proc, 60, "pull after %s" % signal.Signals(sig).name)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert node.refs() == {}
    if sig != signal.SIGKILL:
        assert node.debris() == [], "temporary files left behind: %s" % node.debris()
    node.fsck()
    srv.restart(limit_rate=None)
    node.pull_ok(srv.url, "many")
    assert_has_image(node, served, "many")
    assert node.run("gc", "--tmp-grace", "0").returncode == 0
    assert node.debris() == []
    assert_has_image(node, served, "many")


# ------------------------------------------------------------------ CLI misuse --

@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs"),
    (["--insecure", "--ca-file", "/etc/hostname"], "--insecure"),
    (["--password-file", "/nonexistent/pw", "--user", "u"], "/nonexistent/pw"),
    (["--token-file", "/nonexistent/token"], "/nonexistent/token"),
    (["--header", "no colon"], "--header"),
    (["--client-cert", "/nonexistent/cert.pem"], "/nonexistent/cert.pem"),
])
def test_bad_options_are_refused_before_any_request(served: Source, node: Node, nginx, args, message: str) -> None:
    srv = nginx(served.path)
    res = node.pull(srv.url, "app/v1", *args)
    assert res.returncode in (1, 2) and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert srv.entries() == []
    assert_untouched(node, {}, set())


def test_usage_errors_exit_2(node: Node) -> None:
    for args in (["pull"], ["pull", "http://127.0.0.1:1/cfs"], ["pull", "--jobs", "x", "http://127.0.0.1:1/cfs", "r"]):
        res = node.run(*args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
