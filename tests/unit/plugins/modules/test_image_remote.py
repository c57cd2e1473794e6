# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Unit tests of composefs.fleet.image with ``remote``: what reaches the core's pull, file:// pulls, errors."""

from __future__ import annotations

import os

import pytest

from ansible_collections.composefs.fleet.plugins.modules import image
from ansible_collections.composefs.fleet.tests.unit.plugins.modules.module_runner import run_module
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.errors import RemoteError
from ansible_collections.composefs.fleet.plugins.module_utils.composefs import pull as pull_module
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store import Store
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store_add import add_image


def run(capsys, args, check=False, diff=False):
    return run_module(image, capsys, args, check, diff)


@pytest.fixture
def remote(tmp_path):
    """A store with app/v1 (two objects and an inline file): (its file:// URL, the digest)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(os.urandom(5000))
    (tree / "b").write_bytes(os.urandom(9000))
    (tree / "small").write_bytes(b"x")
    with Store.init(str(tmp_path / "remote"), notice=None)[0] as store:
        digest = add_image(store, str(tree), "app/v1").digest
    return "file://%s" % (tmp_path / "remote"), digest


@pytest.fixture
def node(tmp_path):
    with Store.init(str(tmp_path / "node"), notice=None)[0] as store:
        return os.fsdecode(store.path)


def test_options_reach_the_pull(capsys, node, monkeypatch):
    seen = {}

    class Result:
        url, remote_ref, ref, digest, previous = "https://h/s", "app/v2", "app", "ab" * 32, None
        changed, objects, objects_missing, bytes_missing = True, 3, 2, 10
        objects_fetched, bytes_fetched, image_fetched = 0, 0, False
        signature, verify_seconds, image_signature, image_signed = None, 0.0, False, False

    def fake_pull(store, remote, remote_ref, ref=None, options=None, jobs=8, dry_run=False, trust="unset"):
        seen.update(remote=remote, remote_ref=remote_ref, ref=ref, options=options, jobs=jobs, dry_run=dry_run,
                    trust=trust)
        return Result()

    monkeypatch.setattr(pull_module, "pull", fake_pull)
    r = run(capsys, {"store": node, "ref": "app", "remote": "https://h/s", "remote_ref": "app/v2",
                     "validate_certs": False, "ca_path": "/ca.pem", "client_cert": "/c.pem", "client_key": "/k.pem",
                     "url_username": "u", "url_password": "pw-9f3k", "headers": {"X-A": 1, "X-B": "two"},
                     "jobs": 3, "timeout": 2.5}, check=True, diff=True)
    assert not r.get("failed"), r
    opts = seen.pop("options")
    # No trusted_keys: no policy (signatures are not asked for).
    assert seen == {"remote": "https://h/s", "remote_ref": "app/v2", "ref": "app", "jobs": 3, "dry_run": True,
                    "trust": None}
    assert (opts.validate_certs, opts.ca_path, opts.client_cert, opts.client_key) == (False, "/ca.pem", "/c.pem", "/k.pem")
    assert (opts.username, opts.password, opts.token, opts.timeout) == ("u", "pw-9f3k", None, 2.5)
    assert opts.headers == {"X-A": "1", "X-B": "two"}  # numbers from YAML are sent as text
    assert r["changed"] is True and r["digest"] == "ab" * 32
    assert r["pull"]["objects_missing"] == 2 and r["pull"]["previous_digest"] is None
    assert r["diff"] == {"before": {"ref": "app", "digest": None}, "after": {"ref": "app", "digest": "ab" * 32}}
    assert "pw-9f3k" not in repr(r)


def test_remote_ref_defaults_to_ref(capsys, node, monkeypatch):
    seen = {}

    def fake_pull(store, remote, remote_ref, ref=None, **kwargs):
        seen.update(remote_ref=remote_ref, ref=ref)
        raise RemoteError("https://h/s", "no ref %s there" % remote_ref)

    monkeypatch.setattr(pull_module, "pull", fake_pull)
    r = run(capsys, {"store": node, "ref": "app/v1", "remote": "https://h/s", "url_password": "sekrit"})
    assert seen == {"remote_ref": "app/v1", "ref": "app/v1"}
    assert r["failed"] and r["msg"] == "pull: https://h/s: no ref app/v1 there" and r["url"] == "https://h/s"
    assert "sekrit" not in repr(r)


def test_file_remote_pull_check_then_real_then_unchanged(capsys, node, remote):
    url, digest = remote
    args = {"store": node, "ref": "app/v1", "remote": url}
    before = sorted(os.walk(node))
    planned = run(capsys, args, check=True, diff=True)
    assert planned["changed"] is True and planned["pull"]["objects_missing"] == 2
    assert planned["pull"]["bytes_missing"] == 14000 and planned["pull"]["objects_fetched"] == 0
    assert sorted(os.walk(node)) == before
    done = run(capsys, args)
    assert done["changed"] is True and done["pull"]["objects_fetched"] == 2 and done["digest"] == digest
    again = run(capsys, args, check=True)
    assert again["changed"] is False and again["pull"]["objects_missing"] == 0
    again = run(capsys, args)
    assert again["changed"] is False and again["pull"]["previous_digest"] == digest
    with open(os.path.join(node, "refs", "app", "v1")) as f:
        assert f.read().strip() == digest


@pytest.mark.parametrize("more, message", [
    ({"src": "/"}, "mutually exclusive"),
    ({"expected_digest": "ab" * 32}, "mutually exclusive"),
    ({"skip_devices": True}, "skip_devices shapes an image built from src"),
    ({"jobs": 0}, "jobs must be at least 1"),
])
def test_remote_option_errors(capsys, node, remote, more, message):
    args = {"store": node, "ref": "app/v1", "remote": remote[0]}
    args.update(more)
    r = run(capsys, args)
    assert r["failed"] and message in r["msg"], r["msg"]
    assert not os.path.exists(os.path.join(node, "refs", "app"))
