# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The node role's signed-ref trust and fs-verity certificates, through ansible-playbook on this machine.

No tools installed (composefs_node_tools: none), the key and certificate directories and
the units in the test's temp dir, mounts only as units (state: present), a
remote store reached as file://.  Nothing is loaded into this machine's
keyring: systemd is not PID 1 here, so the keyring unit is written and
enabled for the next boot only (and the handler would act only on
/etc/systemd/system).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from composefs_fleet.store import Store
from composefs_fleet.store_signatures import read_signatures
from composefs_fleet.systemd_unit import unit_name

from pull_play import local_host, output, recap, run_playbook  # type: ignore[import-not-found]
from signing import make_keys, make_signed_remote, store_files  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[2]
KEYRING_UNIT = "composefs-fleet-fsverity-keys.service"


def play(tmp: Path, name: str, play_vars: dict, *options: str) -> "subprocess.CompletedProcess[str]":
    plays = [{"name": name, "hosts": "all", "gather_facts": False, "vars": play_vars, "roles": ["composefs.fleet.composefs_node"]}]
    return run_playbook(tmp, name, plays, {"localhost": local_host()}, *options)


@pytest.fixture
def setup(tmp_path):
    keys = make_keys(tmp_path / "keys", "release", "second", "old", "other")
    releases = make_signed_remote(tmp_path / "remote", keys["release"])
    node = tmp_path / "node"
    play_vars = {
        "composefs_node_tools": "none",
        "composefs_node_unit_dir": str(tmp_path / "units"),
        "composefs_node_keys_dir": str(tmp_path / "etc" / "keys"),
        "composefs_node_fsverity_certs_dir": str(tmp_path / "etc" / "fsverity-certs.d"),
        "composefs_node_trusted_keys": [{"name": "release.pub", "src": str(keys["release"].public)},
                              {"name": "second.pub", "content": keys["second"].ostree + "\n"}],
        "composefs_node_revoked_keys": [{"name": "old.pub", "content": keys["old"].public_text}],
        "composefs_node_stores": [{"path": str(node)}],
        "composefs_node_images": [{"store": str(node), "ref": "app/v1", "remote": "file://%s" % (tmp_path / "remote")}],
        "composefs_node_mounts": [{"path": str(tmp_path / "mnt"), "store": str(node), "image": "app/v1", "state": "present"}],
    }
    return tmp_path, keys, releases, node, play_vars


def test_keys_installed_and_given_to_images_and_mounts(setup):
    tmp, keys, releases, node, play_vars = setup
    trusted, revoked = tmp / "etc" / "keys" / "trusted.d", tmp / "etc" / "keys" / "revoked.d"
    # A new node in check mode: the image task gets the keys as texts (no files yet) and checks the signed pull.
    # (Without the mount: the mount module cannot plan against a store that does not exist yet, signed or not.)
    proc = play(tmp, "check-new", dict(play_vars, composefs_node_mounts=[]), "--check")
    assert proc.returncode == 0, output(proc)
    assert not trusted.exists() and not node.exists()
    proc = play(tmp, "converge", play_vars)
    assert proc.returncode == 0, output(proc)
    assert (trusted / "release.pub").read_text() == keys["release"].public_text
    assert (trusted / "second.pub").read_text() == keys["second"].ostree + "\n"
    assert (revoked / "old.pub").read_text() == keys["old"].public_text
    assert sorted(p.name for p in trusted.iterdir()) == ["release.pub", "second.pub"]
    with Store.open(node, notice=None) as store, Store.open(tmp / "remote", notice=None) as remote:
        assert store.read_ref("app/v1") == releases["app/v1"].digest
        assert read_signatures(store, "app/v1") == read_signatures(remote, "app/v1")  # pulled with trust
    assert (tmp / "units" / unit_name(str(tmp / "mnt"))).is_file()  # the mount task verified the ref
    assert not (tmp / "units" / KEYRING_UNIT).exists()  # no certificates: no keyring unit
    for secret in (keys["release"].public_text.splitlines()[1], keys["second"].ostree, keys["old"].public_text.splitlines()[1]):
        assert secret not in proc.stdout and secret not in proc.stderr

    for name, options in (("idempotent", ()), ("idempotent-check", ("--check",))):
        proc = play(tmp, name, play_vars, *options)
        assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 0, output(proc)

    # A key taken off the list, and a file nobody listed, are removed: no longer trusted.
    (trusted / "stray.pub").write_text(keys["other"].public_text)
    play_vars["composefs_node_trusted_keys"] = play_vars["composefs_node_trusted_keys"][:1]
    proc = play(tmp, "fewer-keys", play_vars)
    assert proc.returncode == 0, output(proc)
    assert sorted(p.name for p in trusted.iterdir()) == ["release.pub"]


def test_unsigned_image_and_unsigned_mount_are_refused(setup):
    tmp, keys, _releases, node, play_vars = setup
    proc = play(tmp, "converge", play_vars)
    assert proc.returncode == 0, output(proc)
    before = store_files(node)
    play_vars["composefs_node_images"] = [dict(play_vars["composefs_node_images"][0], ref="app/v2")]
    proc = play(tmp, "unsigned-pull", play_vars)
    assert proc.returncode != 0 and "signatures/app/v2 is missing" in proc.stdout, output(proc)
    assert store_files(node) == before
    # A mount of an image by digest has no statement: refused unless the item turns the check off.
    with Store.open(node, notice=None) as store:
        digest = store.read_ref("app/v1")
    play_vars["composefs_node_images"] = []
    play_vars["composefs_node_mounts"] = [{"path": str(tmp / "mnt2"), "store": str(node), "image": digest, "state": "present"}]
    proc = play(tmp, "digest-mount", play_vars)
    assert proc.returncode != 0 and "has no signed statement; name a ref of the store" in proc.stdout, output(proc)
    assert not (tmp / "units" / unit_name(str(tmp / "mnt2"))).exists()
    play_vars["composefs_node_mounts"][0]["require_signature"] = False
    proc = play(tmp, "digest-mount-unchecked", play_vars)
    assert proc.returncode == 0, output(proc)
    assert (tmp / "units" / unit_name(str(tmp / "mnt2"))).is_file()


def test_bad_key_items_are_refused(setup):
    tmp, keys, _releases, _node, play_vars = setup
    play_vars["composefs_node_trusted_keys"] = [{"name": "../escape.pub", "content": keys["release"].public_text}]
    proc = play(tmp, "bad-name", play_vars)
    assert proc.returncode != 0 and "give a file name (no '/', not starting with '.')" in proc.stdout, output(proc)
    assert not (tmp / "etc").exists()


def test_fsverity_certificates_and_keyring_unit(setup):
    tmp, _keys, _releases, _node, play_vars = setup
    source = REPO / "roles" / "composefs_node" / "files" / KEYRING_UNIT
    assert source.is_file(), source
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (Debian package openssl): the test makes its certificate with it")
    cert = tmp / "signer.der"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp / "signer.key"),
                    "-subj", "/CN=composefs-fleet test", "-days", "2", "-outform", "DER", "-out", str(cert)],
                   check=True, capture_output=True)
    certs = tmp / "etc" / "fsverity-certs.d"
    play_vars.update(composefs_node_images=[], composefs_node_mounts=[], composefs_node_fsverity_certs=[{"name": "signer.der", "src": str(cert)}],
                     composefs_node_fsverity_keys_command=str(tmp / "sbin" / "composefs-fsverity-keys"))
    proc = play(tmp, "certs", play_vars)
    assert proc.returncode == 0, output(proc)
    assert (certs / "signer.der").read_bytes() == cert.read_bytes()
    unit = (tmp / "units" / KEYRING_UNIT).read_text()
    assert "ExecStart=%s load %s\n" % (tmp / "sbin" / "composefs-fsverity-keys", certs) in unit
    assert "ConditionDirectoryNotEmpty=%s\n" % certs in unit
    # Before local-fs-pre.target, which every (default-dependency) local mount unit comes after.
    assert "Before=local-fs-pre.target" in unit and "DefaultDependencies=no" in unit
    link = tmp / "units" / "sysinit.target.wants" / KEYRING_UNIT
    assert link.is_symlink() and link.resolve() == (tmp / "units" / KEYRING_UNIT)
    proc = play(tmp, "certs-again", play_vars)
    assert proc.returncode == 0 and recap(proc)["localhost"]["changed"] == 0, output(proc)
    # No certificate any more: unit disabled and removed, the directory emptied.
    play_vars["composefs_node_fsverity_certs"] = []
    proc = play(tmp, "no-certs", play_vars)
    assert proc.returncode == 0, output(proc)
    assert not link.is_symlink() and not (tmp / "units" / KEYRING_UNIT).exists()
    assert list(certs.iterdir()) == []


def test_role_never_sets_require_signatures():
    """fs.verity.require_signatures would refuse every unsigned fs-verity file (the store's objects): never set."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it comes with ansible-core)")
    tasks = list((REPO / "roles").glob("*/tasks/*.yml")) + list((REPO / "roles").glob("*/handlers/*.yml"))
    assert any(path.name == "trust.yml" for path in tasks)
    for path in tasks:
        text = json.dumps(yaml.safe_load(path.read_text()))  # what runs: the comments (which say why) are gone
        assert "sysctl" not in text and "require_signatures" not in text, path
