# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs.fleet.image with ``remote``: pulls run by ansible-playbook on this machine.

The remote is a store built by the test, served by Debian's nginx on
127.0.0.1 (tests/remote/nginx_server.py, with basic auth) or reached as
``file://``.  The node's store is read straight from its directory; nginx's
access log tells what was fetched.  Option checks run the module in-process
(conftest.run_module).
"""
from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from composefs_fleet.store import Store
from composefs_fleet.store_fsck import check as fsck

from pull_play import local_host, make_remote, object_path, output, recap, run_playbook  # type: ignore[import-not-found]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "remote"))
from nginx_server import nginx, pki  # noqa: E402,F401  (fixtures)

USER = "fleet"
PASSWORD = "pw-Qx7rT2mVb9"  # must never show in ansible-playbook's output, even with -vvv
HEADER_VALUE = "hv-K3nL8pW0"  # a header value is treated as secret too
RESULTS = "results.json"


def tree_of(top: Path):
    """Every path under ``top`` with its type, size and contents (to see that nothing was written)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            out[str(full.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                               full.read_bytes() if full.is_file() else None)
    return out


def pull_task(name: str, register: str, **args: object) -> dict:
    return {"name": name, "composefs.fleet.image": args, "register": register, "ignore_errors": True}


def save_results(tmp: Path, names) -> dict:
    """A task writing the registered results to tmp/results.json (also in check mode; no diff shown)."""
    content = "{{ %s | to_json }}" % ("{" + ", ".join("%r: %s" % (n, n) for n in names) + "}")
    return {"name": "Keep the results", "ansible.builtin.copy": {"content": content, "dest": str(tmp / RESULTS)},
            "check_mode": False, "diff": False}


def play(tmp: Path, tasks) -> list:
    names = [task["register"] for task in tasks]
    return [{"name": "pull", "hosts": "all", "gather_facts": False, "tasks": list(tasks) + [save_results(tmp, names)]}]


def results(tmp: Path) -> dict:
    return json.loads((tmp / RESULTS).read_text())


def refs_of(top: Path) -> dict:
    refs = top / "refs"
    return {str(p.relative_to(refs)): p.read_text().strip() for p in refs.rglob("*") if p.is_file()}


def assert_clean(top: Path) -> None:
    with Store.open(top, notice=None) as store:
        report = fsck(store)
    assert report.clean, report.errors


@pytest.fixture
def served(tmp_path):
    """(remote store directory, its releases)."""
    remote = tmp_path / "remote" / "store"
    remote.parent.mkdir()
    return remote, make_remote(remote)


@pytest.fixture
def node(tmp_path):
    top = tmp_path / "node"
    Store.init(top, notice=None)[0].close()
    return top


@pytest.mark.network
def test_pull_over_http_check_real_idempotent_errors_no_secrets(tmp_path, served, node, nginx):
    remote, releases = served
    srv = nginx(remote, basic_auth=(USER, PASSWORD))
    v1 = releases["app/v1"]
    common = dict(store=str(node), ref="app/v1", remote=srv.url, url_username=USER, url_password=PASSWORD,
                  headers={"X-Fleet-Note": HEADER_VALUE}, jobs=3, timeout=20)
    hosts = {"localhost": local_host()}

    # Check mode: what would be fetched, nothing fetched or written.
    before = tree_of(node)
    proc = run_playbook(tmp_path, "check", play(tmp_path, [pull_task("Pull v1 (check)", "planned", **common)]),
                        hosts, "--check", "--diff")
    assert proc.returncode == 0, output(proc)
    planned = results(tmp_path)["planned"]
    assert not planned.get("failed"), planned
    assert planned["changed"] is True
    assert planned["digest"] == v1.digest
    assert planned["pull"]["objects"] == len(v1.objects)
    assert planned["pull"]["objects_missing"] == len(v1.objects)
    assert planned["pull"]["bytes_missing"] == sum(v1.objects.values())
    assert planned["pull"]["objects_fetched"] == 0 and planned["pull"]["previous_digest"] is None
    assert tree_of(node) == before
    assert srv.fetches(kind="objects/") == {}
    # Diff mode: the ref's change.
    assert '+    "digest": "%s"' % v1.digest in proc.stdout and '-    "digest": null' in proc.stdout, proc.stdout

    # The pull, again (nothing to do), and errors; all with -vvv.
    missing_store = srv.url.rsplit("/", 1)[0] + "/nostore"
    tasks = [
        pull_task("Pull v1", "first", **common),
        pull_task("Pull v1 again", "second", **common),
        pull_task("Pull v1 again (check)", "second_check", **dict(common)),
        pull_task("Wrong password", "bad_auth", **dict(common, url_password=PASSWORD + "x")),
        pull_task("Unknown ref", "unknown_ref", **dict(common, remote_ref="app/v9")),
        pull_task("No store there", "no_store", **dict(common, remote=missing_store)),
    ]
    tasks[2]["check_mode"] = True
    proc = run_playbook(tmp_path, "pull", play(tmp_path, tasks), hosts, "--diff", "-vvv")
    assert proc.returncode == 0, output(proc)
    got = results(tmp_path)
    first, second = got["first"], got["second"]
    assert not first.get("failed"), first
    assert first["changed"] is True
    assert first["pull"]["objects_fetched"] == len(v1.objects)
    assert first["pull"]["bytes_fetched"] == sum(v1.objects.values())
    assert first["pull"]["image_fetched"] is True
    assert refs_of(node) == {"app/v1": v1.digest}
    assert (node / "images" / v1.digest).read_bytes() == (remote / "images" / v1.digest).read_bytes()
    for hexd in v1.objects:
        assert (node / object_path(hexd)).read_bytes() == (remote / object_path(hexd)).read_bytes()
    assert_clean(node)
    # Each object fetched once (by the first pull), with the credentials.
    assert srv.fetches(kind="objects/") == {object_path(h): 1 for h in v1.objects}
    assert {e.user for e in srv.entries() if e.status == 200} == {USER}
    for res in (second, got["second_check"]):
        assert not res.get("failed"), res
        assert res["changed"] is False
        assert res["pull"]["objects_missing"] == 0 and res["pull"]["objects_fetched"] == 0
        assert res["pull"]["previous_digest"] == v1.digest
    assert second["diff"] == {"before": {"ref": "app/v1", "digest": v1.digest},
                              "after": {"ref": "app/v1", "digest": v1.digest}}

    assert got["bad_auth"]["failed"] is True
    assert srv.url in got["bad_auth"]["msg"] and "401" in got["bad_auth"]["msg"], got["bad_auth"]["msg"]
    assert got["unknown_ref"]["failed"] is True
    assert srv.url in got["unknown_ref"]["msg"] and "app/v9" in got["unknown_ref"]["msg"], got["unknown_ref"]["msg"]
    assert got["no_store"]["failed"] is True
    assert missing_store in got["no_store"]["msg"] and "meta.json" in got["no_store"]["msg"], got["no_store"]["msg"]
    assert refs_of(node) == {"app/v1": v1.digest}  # the failed pulls changed nothing
    assert_clean(node)

    # No secret anywhere in the output, the registered results or the module's arguments.
    basic = base64.b64encode(("%s:%s" % (USER, PASSWORD)).encode()).decode()
    text = proc.stdout + proc.stderr + (tmp_path / RESULTS).read_text()
    assert "ESTABLISH LOCAL CONNECTION" in proc.stdout  # really verbose
    # -vvv prints the module's arguments: the secrets masked, the rest shown.
    assert '"url_password": "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"' in proc.stdout
    assert '"url_username": "%s"' % USER in proc.stdout
    for secret in (PASSWORD, HEADER_VALUE, basic):
        assert secret not in text


def test_pull_from_file_url_v1_then_v2_into_another_ref(tmp_path, served, node):
    """A file:// remote (no server): v1, then v2 under the local name app/current; shared objects stay."""
    remote, releases = served
    v1, v2 = releases["app/v1"], releases["app/v2"]
    common = dict(store=str(node), ref="app/current", remote="file://%s" % remote)
    tasks = [pull_task("v1", "v1", remote_ref="app/v1", **common),
             pull_task("v2 (check)", "v2_check", remote_ref="app/v2", **common),
             pull_task("v2", "v2", remote_ref="app/v2", **common),
             pull_task("v2 again", "v2_again", remote_ref="app/v2", **common)]
    tasks[1]["check_mode"] = True
    proc = run_playbook(tmp_path, "file", play(tmp_path, tasks), {"localhost": local_host()}, "--diff")
    assert proc.returncode == 0, output(proc)
    got = results(tmp_path)
    for name in ("v1", "v2_check", "v2", "v2_again"):
        assert not got[name].get("failed"), got[name]
    new_in_v2 = {h: s for h, s in v2.objects.items() if h not in v1.objects}
    assert new_in_v2 and len(new_in_v2) < len(v2.objects)  # the releases share objects
    assert got["v2_check"]["pull"]["objects_missing"] == len(new_in_v2)
    assert got["v2_check"]["pull"]["bytes_missing"] == sum(new_in_v2.values())
    assert got["v2_check"]["diff"]["before"]["digest"] == v1.digest
    assert got["v2_check"]["diff"]["after"]["digest"] == v2.digest
    assert got["v2"]["changed"] is True and got["v2"]["pull"]["objects_fetched"] == len(new_in_v2)
    assert got["v2_again"]["changed"] is False
    assert refs_of(node) == {"app/current": v2.digest}
    assert_clean(node)


@pytest.mark.network
def test_https_options_reach_the_transfer(module_runner, served, node, nginx, pki):
    """ca_path, validate_certs, client_cert and client_key against nginx with TLS and required client certificates."""
    remote, releases = served
    srv = nginx(remote, tls=pki.issue("server-127"), client_ca=pki.ca("clients").cert)
    client = pki.issue("node-1", ca="clients", client=True)
    args = dict(store=str(node), ref="app/v1", remote=srv.url, client_cert=str(client.cert), client_key=str(client.key))
    r = module_runner("image", args)  # the system's CAs do not know the test CA
    assert r.get("failed") and srv.url in r["msg"] and "certificate" in r["msg"], r.get("msg")
    r = module_runner("image", dict(args, ca_path=str(pki.ca().cert), client_cert=None, client_key=None))
    assert r.get("failed") and srv.url in r["msg"], r.get("msg")  # no client certificate: refused by nginx
    assert refs_of(node) == {}
    r = module_runner("image", dict(args, ca_path=str(pki.ca().cert)))
    assert not r.get("failed"), r.get("msg")
    assert r["changed"] and refs_of(node) == {"app/v1": releases["app/v1"].digest}
    r = module_runner("image", dict(args, ref="app/v2", remote_ref="app/v2", validate_certs=False))
    assert not r.get("failed"), r.get("msg")
    assert refs_of(node)["app/v2"] == releases["app/v2"].digest
    assert {e.client_verify for e in srv.entries() if e.status == 200} == {"SUCCESS"}
    assert_clean(node)


@pytest.mark.network
def test_password_in_the_url_is_used_and_masked(module_runner, served, node, nginx):
    remote, releases = served
    srv = nginx(remote, basic_auth=(USER, PASSWORD))
    url = srv.url_with_credentials(USER, PASSWORD)
    r = module_runner("image", dict(store=str(node), ref="app/v1", remote=url))
    assert not r.get("failed"), r.get("msg")
    assert r["pull"]["url"] == srv.url  # the core drops the credentials
    assert PASSWORD not in json.dumps(r)
    assert r["invocation"]["module_args"]["remote"] == url.replace(PASSWORD, "********")
    r = module_runner("image", dict(store=str(node), ref="app/v1", remote=url.replace(PASSWORD, PASSWORD + "x")))
    assert r["failed"] and "401" in r["msg"] and PASSWORD not in json.dumps(r), r["msg"]


def test_check_mode_before_the_store_exists(module_runner, served, tmp_path):
    """A play that creates the store first can be checked: an empty store is assumed."""
    remote, releases = served
    top = tmp_path / "not-yet"
    r = module_runner("image", dict(store=str(top), ref="app/v2", remote="file://%s" % remote), check=True)
    assert not r.get("failed"), r.get("msg")
    assert r["changed"] is True and r["pull"]["objects_missing"] == len(releases["app/v2"].objects)
    assert not top.exists()
    r = module_runner("image", dict(store=str(top), ref="app/v2", remote="origin"), check=True)
    assert r["failed"] and "no remote named origin" in r["msg"]


def test_configured_remote_by_name(module_runner, served, node):
    remote, releases = served
    with Store.open(node, notice=None) as store:
        from composefs_fleet.store_remotes import add_remote
        add_remote(store, "origin", "file://%s" % remote)
    r = module_runner("image", dict(store=str(node), ref="app/v1", remote="origin"))
    assert not r.get("failed"), r.get("msg")
    assert r["changed"] and refs_of(node) == {"app/v1": releases["app/v1"].digest}
    r = module_runner("image", dict(store=str(node), ref="app/v1", remote="elsewhere"))
    assert r["failed"] and "no remote named elsewhere" in r["msg"]


@pytest.mark.parametrize("args, message", [
    (dict(src="/nonexistent"), "mutually exclusive: src|remote"),
    (dict(objects_from="/nonexistent"), "mutually exclusive: objects_from|remote"),
    (dict(use_epoch=True), "use_epoch shapes an image built from src"),
    (dict(skip_xattrs=True, format_version=1), "format_version, skip_xattrs shape an image built from src"),
    (dict(jobs=0), "jobs must be at least 1"),
    (dict(timeout=0), "timeout must be more than 0"),
    (dict(headers={"Bad Name": "x"}), "is not a valid HTTP header name"),
    (dict(client_key="/k.pem"), "client_key needs client_cert"),
    (dict(remote_ref="../x"), "ref"),
])
def test_option_errors(module_runner, node, args, message):
    r = module_runner("image", dict(dict(store=str(node), ref="app/v1", remote="file:///nonexistent"), **args))
    assert r.get("failed") and message in r["msg"], r.get("msg")
    assert refs_of(node) == {}


def test_state_present_needs_src_or_remote(module_runner, node):
    r = module_runner("image", dict(store=str(node), ref="app/v1"))
    assert r.get("failed") and "src, remote" in r["msg"], r["msg"]


@pytest.mark.network
def test_role_node_images_pull_hides_secrets(tmp_path, served, nginx):
    """The node role: an item with remote pulls; one with url_password or headers is not logged, even at -vvv."""
    remote, releases = served
    srv = nginx(remote, basic_auth=(USER, PASSWORD))
    store = tmp_path / "node"
    images = [{"store": str(store), "ref": "app/v1", "remote": srv.url, "url_username": USER, "url_password": PASSWORD},
              {"store": str(store), "ref": "app/current", "remote_ref": "app/v2", "remote": srv.url, "jobs": 2,
               "url_username": USER, "headers": {"Authorization": "Basic " + base64.b64encode(
                   ("%s:%s" % (USER, PASSWORD)).encode()).decode()}},
              {"store": str(store), "ref": "app/v2", "remote": srv.url_with_credentials(USER, PASSWORD)},
              {"store": str(store), "ref": "local", "remote": "file://%s" % remote, "remote_ref": "app/v1"}]
    play_vars = {"composefs_node_tools": "none", "composefs_node_stores": [{"path": str(store)}], "composefs_node_images": images}
    plays = [{"name": "node", "hosts": "all", "gather_facts": False, "vars": play_vars,
              "roles": ["composefs.fleet.composefs_node"]}]
    for run in ("first", "second"):
        proc = run_playbook(tmp_path, "role", plays, {"localhost": local_host()}, "-vvv")
        assert proc.returncode == 0, output(proc)
        text = proc.stdout + proc.stderr
        for secret in (PASSWORD, base64.b64encode(("%s:%s" % (USER, PASSWORD)).encode()).decode()):
            assert secret not in text
        # The item without secrets is logged as usual; the others are censored.
        assert "'local'" in text or '"ref": "local"' in text, output(proc)
        assert text.count("the output has been hidden due to the fact that 'no_log: true'") >= 3, output(proc)
        changed = recap(proc)["localhost"]["changed"]
        assert changed == (2 if run == "first" else 0), output(proc)  # the store, the images task
    assert refs_of(store) == {"app/v1": releases["app/v1"].digest, "app/current": releases["app/v2"].digest,
                              "app/v2": releases["app/v2"].digest, "local": releases["app/v1"].digest}
    assert_clean(store)
