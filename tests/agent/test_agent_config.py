# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent's configuration: what it accepts, and every problem listed when it refuses."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from composefs_fleet_agent import config
from composefs_fleet_agent.findings import KINDS, PROBLEMS, REPAIRS

DIGEST = "ab" * 32


def _mount(**over: object) -> dict:
    m = {"where": "/srv/app", "image": "/var/lib/cfs/images/" + DIGEST, "digest": DIGEST,
         "basedirs": ["/var/lib/cfs/objects"]}
    m.update(over)
    return m


def _parse(doc: object) -> config.Config:
    return config.parse(json.dumps(doc).encode())


def test_minimal_config_takes_the_defaults():
    cfg = _parse({"mounts": [_mount()]})
    assert cfg.interval == 300 and cfg.quarantine is False and cfg.textfile == "" and cfg.stores == []
    (m,) = cfg.mounts
    assert (m.where, m.digest, m.verity, m.remount, m.upperdir) == ("/srv/app", DIGEST, "auto", False, None)


def test_paths_are_normalised_and_digests_lowercased():
    cfg = _parse({"stores": [{"path": "/var/lib//cfs/"}], "mounts": [_mount(digest=DIGEST.upper(),
                                                                              where="/srv/./app/")]})
    assert cfg.stores == ["/var/lib/cfs"] and cfg.mounts[0].where == "/srv/app" and cfg.mounts[0].digest == DIGEST


def test_every_problem_is_listed_at_once():
    doc = {"version": 2, "interval": 0, "quarantine": "yes", "textfile": "metrics.txt", "colour": "red",
           "stores": [{"path": "relative"}],
           "mounts": [_mount(digest="xyz", verity="always", remount="true", basedirs=[], reboot=True),
                      _mount(upperdir="/u"), _mount(), _mount()]}
    with pytest.raises(config.ConfigError) as err:
        _parse(doc)
    text = "\n".join(err.value.problems)
    for needle in ("unknown key 'colour'", "version must be 1", "interval must be", "quarantine must be",
                   "textfile must be an absolute path", "stores[0].path must be an absolute path",
                   "mounts[0].digest must be 64 hex digits", "mounts[0].verity must be one of",
                   "mounts[0].remount must be true or false", "mounts[0].basedirs must be a non-empty list",
                   "mounts[0]: unknown key 'reboot'", "mounts[1]: upperdir and workdir go together",
                   "mounts[3]: /srv/app is listed twice"):
        assert needle in text, needle


@pytest.mark.parametrize("data, needle", [
    (b"{", "not valid JSON"), (b"[]", "top level must be a JSON object"), (b"\xff\xfe", "not valid JSON"),
    (json.dumps({"textfile": "/x/metrics.txt"}).encode(), "must end in .prom"),
    (json.dumps({"interval": True}).encode(), "interval must be"),
])
def test_malformed_input_is_refused_clearly(data, needle):
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert needle in str(err.value)


def test_check_config_exit_codes(tmp_path: Path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"mounts": [_mount()]}))
    bad.write_text(json.dumps({"mounts": [_mount(digest="nope")]}))
    argv = [sys.executable, "-m", "composefs_fleet_agent", "--check-config", "--config"]
    ok = subprocess.run(argv + [str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid (0 stores, 1 mounts" in ok.stdout
    ko = subprocess.run(argv + [str(bad)], capture_output=True, text=True)
    assert ko.returncode == 2 and "mounts[0].digest must be 64 hex digits" in ko.stderr
    missing = subprocess.run(argv + [str(tmp_path / "none.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read it" in missing.stderr
    once = subprocess.run([sys.executable, "-m", "composefs_fleet_agent", "--once", "--no-journal", "--config",
                           str(bad)], capture_output=True, text=True)
    assert once.returncode == 2 and "config-invalid" in once.stderr


def test_message_ids_are_fixed_unique_and_documented():
    ids = [k.message_id for k in KINDS.values()]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 and int(i, 16) for i in ids)
    readme = (Path(__file__).resolve().parents[2] / "agent" / "README.md").read_text()
    for kind, info in KINDS.items():
        assert "`%s`" % kind in readme and info.message_id in readme, kind
    assert set(REPAIRS) == {"mount-remounted", "object-verity-enabled", "object-quarantined"}
    assert not set(PROBLEMS) & set(REPAIRS)


def test_ref_and_keys_are_read():
    image = "/var/lib/cfs/images/" + DIGEST
    cfg = _parse({"trusted_keys": ["/etc/k/trusted.d/"], "revoked_keys": ["/etc/k/revoked.pub"],
                  "mounts": [_mount(ref="app/v1", image=image), _mount(where="/srv/other")]})
    assert cfg.trusted_keys == ["/etc/k/trusted.d"] and cfg.revoked_keys == ["/etc/k/revoked.pub"]
    assert (cfg.mounts[0].ref, cfg.mounts[0].store, cfg.mounts[1].ref) == ("app/v1", "/var/lib/cfs", None)
    assert [m.where for m in cfg.signed_mounts] == ["/srv/app"]
    # Without trusted keys a ref is kept but nothing is checked.
    assert _parse({"mounts": [_mount(ref="app/v1", image=image)]}).signed_mounts == []


def test_bad_refs_and_key_lists_are_listed():
    doc = {"trusted_keys": "/etc/k", "revoked_keys": ["relative.pub", 3],
           "mounts": [_mount(ref="../etc"), _mount(where="/a", ref=7),
                      _mount(where="/b", ref="app/v1", image="/var/lib/cfs/app.img"),
                      _mount(where="/c", ref="app/v1", image="/var/lib/cfs/images/" + "cd" * 32)]}
    with pytest.raises(config.ConfigError) as err:
        _parse(doc)
    text = "\n".join(err.value.problems)
    for needle in ("trusted_keys must be a list of absolute paths", "revoked_keys[0] must be an absolute path",
                   "revoked_keys[1] must be an absolute path", "mounts[0].ref: ref name '../etc' contains '..'",
                   "mounts[1].ref must be a ref name (like app/v1), got 7",
                   "mounts[2].ref needs the image file in its store, STORE/images/%s" % DIGEST,
                   "mounts[3].ref needs the image file in its store"):
        assert needle in text, (needle, text)


def test_check_config_refuses_keys_it_cannot_use(tmp_path: Path):
    """A missing key path, or a private key given as trusted, fails --check-config (the role's validation)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test's ed25519 key)")
    pytest.importorskip("cryptography", reason="the Python package cryptography (python3-cryptography) is missing")
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    argv = [sys.executable, "-m", "composefs_fleet_agent", "--check-config", "--config"]
    cases = {"good": ([str(public)], 0, "valid"),
             "missing": ([str(tmp_path / "none.pub")], 2, "keys: key file %s: No such file" % (tmp_path / "none.pub")),
             "private": ([str(private)], 2, "holds a private key; trust needs the public key only")}
    for name, (trusted, rc, needle) in cases.items():
        path = tmp_path / (name + ".json")
        path.write_text(json.dumps({"trusted_keys": trusted, "mounts": [_mount()]}))
        res = subprocess.run(argv + [str(path)], capture_output=True, text=True)
        assert res.returncode == rc and needle in res.stdout + res.stderr, (name, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
