# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Pulls over TLS (a test CA, a wrong CA, --insecure, client certificates), with basic auth, a bearer
token, extra headers and a proxy from the environment, against nginx on 127.0.0.1.

A secret (password, token) never appears in the output, on success or on an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest

from pull_fixtures import Node, Source, assert_failed, assert_has_image, assert_untouched  # type: ignore[import-not-found]
from pull_fixtures import nginx, node, pki, served, source_template  # type: ignore[import-not-found]  # noqa: F401  (fixtures)
from nginx_server import TestPki  # type: ignore[import-not-found]

pytestmark = pytest.mark.network


PASSWORD = "Zq8-pass-word:with colon"
TOKEN = "tok3n-4f1c9e2b7a"
FAST = ("--retries", "1", "--timeout", "5")


def secret_file(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def assert_secret_hidden(res, *secrets: str) -> None:
    for secret in secrets:
        for where, text in (("stdout", res.stdout), ("stderr", res.stderr)):
            assert secret not in text, "a secret appears on %s:\n%s" % (where, text)


# ------------------------------------------------------------------------ TLS --

@pytest.fixture
def tls_server(served: Source, nginx, pki: TestPki):
    return nginx(served.path, tls=pki.issue("server-127"))


def test_tls_with_the_test_ca(served: Source, node: Node, tls_server, pki: TestPki) -> None:
    assert tls_server.url.startswith("https://")
    node.pull_ok(tls_server.url, "app/v1", "--ca-file", pki.ca().cert)
    assert_has_image(node, served, "app/v1")
    assert {e.ssl_protocol for e in tls_server.entries()} <= {"TLSv1.2", "TLSv1.3"}


@pytest.mark.parametrize("trust", ["wrong CA", "system CAs"])
def test_tls_untrusted_server_is_refused(served: Source, node: Node, tls_server, pki: TestPki, trust: str) -> None:
    options = ["--ca-file", str(pki.ca("wrong-ca").cert)] if trust == "wrong CA" else []
    res = node.pull(tls_server.url, "app/v1", *options, *FAST)
    assert_failed(res, tls_server.url, r"certificate")
    assert_untouched(node, {}, set())
    assert tls_server.entries() == []  # not one request went through


def test_tls_name_mismatch_is_refused(served: Source, node: Node, nginx, pki: TestPki) -> None:
    srv = nginx(served.path, tls=pki.issue("server-elsewhere", san="DNS:elsewhere.example"))
    res = node.pull(srv.url, "app/v1", "--ca-file", pki.ca().cert, *FAST)
    assert_failed(res, srv.url, r"certificate", r"127\.0\.0\.1|mismatch|match")
    assert_untouched(node, {}, set())


def test_tls_insecure_accepts_any_certificate(served: Source, node: Node, nginx, pki: TestPki) -> None:
    srv = nginx(served.path, tls=pki.issue("server-other", ca="other-ca", san="DNS:elsewhere.example"))
    node.pull_ok(srv.url, "app/v1", "--insecure")
    assert_has_image(node, served, "app/v1")


def test_tls_bad_ca_file_is_a_clear_error(served: Source, node: Node, tls_server, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    res = node.pull(tls_server.url, "app/v1", "--ca-file", junk, *FAST)
    assert res.returncode == 1 and str(junk) in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert_untouched(node, {}, set())


@pytest.fixture
def mtls_server(served: Source, nginx, pki: TestPki):
    return nginx(served.path, tls=pki.issue("server-mtls"), client_ca=pki.ca("clients").cert)


def test_client_certificate_required_and_given(served: Source, node: Node, mtls_server, pki: TestPki,
                                               tmp_path: Path) -> None:
    client = pki.issue("node-1", ca="clients", client=True)
    node.pull_ok(mtls_server.url, "app/v1", "--ca-file", pki.ca().cert,
                 "--client-cert", client.cert, "--client-key", client.key)
    assert_has_image(node, served, "app/v1")
    assert {e.client_verify for e in mtls_server.entries()} == {"SUCCESS"}
    # Certificate and key in one PEM file: --client-cert alone.
    both = tmp_path / "node-1-both.pem"
    both.write_text(client.cert.read_text() + client.key.read_text())
    node.pull_ok(mtls_server.url, "app/v2", "--ca-file", pki.ca().cert, "--client-cert", both)
    assert_has_image(node, served, "app/v2")


@pytest.mark.parametrize("given", ["none", "from another CA"])
def test_client_certificate_required_and_missing_or_wrong(served: Source, node: Node, mtls_server, pki: TestPki,
                                                          given: str) -> None:
    options = ["--ca-file", str(pki.ca().cert)]
    if given != "none":
        stranger = pki.issue("stranger", ca="other-ca", client=True)
        options += ["--client-cert", str(stranger.cert), "--client-key", str(stranger.key)]
    res = node.pull(mtls_server.url, "app/v1", *options, *FAST)
    # nginx answers "400 No required SSL certificate was sent" / "400 The SSL certificate error" (in the
    # page's title): "HTTP 400 Bad Request" alone would not say that the client certificate is the problem.
    assert_failed(res, mtls_server.url, r"certificate")
    assert_untouched(node, {}, set())
    assert not [e for e in mtls_server.entries() if e.status == 200]


# ----------------------------------------------------------------- basic auth --

@pytest.fixture
def auth_server(served: Source, nginx):
    return nginx(served.path, basic_auth=("fleet", PASSWORD))


@pytest.mark.parametrize("how", ["--password-file", "environment"])
def test_basic_auth(served: Source, node: Node, auth_server, tmp_path: Path, how: str) -> None:
    env: Dict[str, str] = {}
    options = ["--user", "fleet"]
    if how == "environment":
        env["COMPOSEFS_REMOTE_PASSWORD"] = PASSWORD
    else:
        options += ["--password-file", str(secret_file(tmp_path, "password", PASSWORD))]
    res = node.run("--json", "pull", *options, auth_server.url, "app/v1", env=env)
    assert res.returncode == 0, res.stderr
    assert_secret_hidden(res, PASSWORD)
    assert_has_image(node, served, "app/v1")
    assert {e.user for e in auth_server.entries()} == {"fleet"}


@pytest.mark.parametrize("case", ["wrong password", "no credentials", "wrong password in the URL"])
def test_basic_auth_refused_without_showing_the_password(served: Source, node: Node, auth_server, tmp_path: Path,
                                                         case: str) -> None:
    wrong = "not-" + PASSWORD
    url = auth_server.url
    options = []
    if case == "wrong password":
        options = ["--user", "fleet", "--password-file", str(secret_file(tmp_path, "password", wrong))]
    elif case == "wrong password in the URL":
        url = auth_server.url_with_credentials("fleet", "not-the-password")
        wrong = "not-the-password"
    res = node.pull(url, "app/v1", *options, *FAST)
    assert_failed(res, auth_server.url, r"401")
    assert_secret_hidden(res, PASSWORD, wrong)
    assert_untouched(node, {}, set())
    assert auth_server.requests()[("meta.json", 401)] == 1  # refused credentials are not retried


def test_basic_auth_in_the_url(served: Source, node: Node, auth_server) -> None:
    res = node.run("--json", "pull", auth_server.url_with_credentials("fleet", "p4ss"), "app/v1")
    assert res.returncode == 1  # the server's password is PASSWORD, see above; now the right one:
    secret = "s3cret-in-url"
    srv_url = auth_server.url_with_credentials("fleet", secret)
    auth_server.restart(basic_auth=("fleet", secret))
    res = node.run("--json", "pull", srv_url, "app/v1")
    assert res.returncode == 0, res.stderr
    assert_secret_hidden(res, secret, "fleet:")
    assert_has_image(node, served, "app/v1")


# --------------------------------------------------------------- bearer token --

@pytest.fixture
def token_server(served: Source, nginx):
    return nginx(served.path, token=TOKEN)


@pytest.mark.parametrize("how", ["--token-file", "environment"])
def test_bearer_token(served: Source, node: Node, token_server, tmp_path: Path, how: str) -> None:
    env: Dict[str, str] = {}
    options = []
    if how == "environment":
        env["COMPOSEFS_REMOTE_TOKEN"] = TOKEN
    else:
        options = ["--token-file", str(secret_file(tmp_path, "token", TOKEN))]
    res = node.run("--json", "pull", *options, token_server.url, "app/v1", env=env)
    assert res.returncode == 0, res.stderr
    assert_secret_hidden(res, TOKEN)
    assert_has_image(node, served, "app/v1")


@pytest.mark.parametrize("json_output", [False, True])
def test_bearer_token_refused_without_showing_it(served: Source, node: Node, token_server, tmp_path: Path,
                                                 json_output: bool) -> None:
    wrong = "wr0ng-" + TOKEN
    res = node.run(*(["--json"] if json_output else []), "pull", "--token-file", secret_file(tmp_path, "token", wrong),
                   *FAST, token_server.url, "app/v1")
    assert_failed(res, token_server.url, r"401")
    assert_secret_hidden(res, TOKEN, wrong)
    assert_untouched(node, {}, set())


def test_extra_header(served: Source, node: Node, nginx) -> None:
    srv = nginx(served.path, extra_server='if ($http_x_fleet_node != "node-7") { return 403; }')
    res = node.pull(srv.url, "app/v1", *FAST)
    assert_failed(res, srv.url, r"403")
    assert_untouched(node, {}, set())
    node.pull_ok(srv.url, "app/v1", "--header", "X-Fleet-Node: node-7")
    assert_has_image(node, served, "app/v1")


# ---------------------------------------------------------------------- proxy --

def test_http_proxy_from_the_environment(served: Source, node: Node, nginx) -> None:
    """http_proxy names a second nginx that forwards to the store's: the store's host name never resolves."""
    origin = nginx(served.path)
    proxy = nginx(served.path, prefix="/not-served",
                  extra_server="location / { proxy_pass http://127.0.0.1:%d; }" % origin.port)
    url = "http://store.invalid%s" % origin.prefix
    env = {"http_proxy": "http://127.0.0.1:%d" % proxy.port, "no_proxy": ""}
    node.pull_ok(url, "app/v1", env=env)
    assert_has_image(node, served, "app/v1")
    # The proxy serves under another prefix: its log keeps the store's path whole.
    through = {path[len(origin.prefix) + 1:]: n for path, n in proxy.fetches(kind=origin.prefix + "/objects/").items()}
    assert through == origin.fetches(kind="objects/")
    assert len(origin.fetches(kind="objects/")) == len(served.needs["app/v1"])
    res = node.pull(url, "app/v2", "--retries", "0", env={"no_proxy": ""})
    assert res.returncode == 1 and "store.invalid" in res.stderr, res.stderr  # without the proxy: no such host


def test_named_remote_keeps_its_ca_file(served: Source, node: Node, tls_server, pki: TestPki) -> None:
    res = node.run("remote", "add", "secure", tls_server.url, "--ca-file", pki.ca().cert)
    assert res.returncode == 0, res.stderr
    node.pull_ok("secure", "app/v1")
    assert_has_image(node, served, "app/v1")
    res = node.pull("secure", "app/v2", "--ca-file", pki.ca("wrong-ca").cert, *FAST)
    assert_failed(res, tls_server.url, r"certificate")  # the command line wins over the remote's setting
