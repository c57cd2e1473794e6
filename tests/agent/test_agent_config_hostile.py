# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Hostile agent configurations: refused with a clear message, never a
traceback, and a running agent keeps its last good configuration."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from composefs_fleet_agent import config
from composefs_fleet_agent.main import Agent, parse_args
from composefs_fleet_agent.journal_log import Journal

NESTED = b"[" * 100000 + b"]" * 100000
# Deep enough for repr() to fail, shallow enough for json to parse.
NESTED_VALUE = b'{"interval": ' + b"[" * 900 + b"]" * 900 + b"}"
AGENT = [sys.executable, "-m", "composefs_fleet_agent"]


@pytest.mark.parametrize("data, needle", [
    (NESTED, "not valid JSON: the file is nested too deeply"),
    (b'{"mounts": ' + NESTED + b"}", "nested too deeply"),
    (NESTED_VALUE, "interval must be a number of seconds from 1 to 86400, got [[[...]]]"),
    (b'{"version": true}', "version must be 1, got True"),
    (b'{"version": 1.0}', "version must be 1, got 1.0"),
    (b'{"textfile": "/' + b"x" * 5000 + b'"}', "textfile must end in .prom"),
])
def test_hostile_config_is_refused_clearly(data, needle):
    with pytest.raises(config.ConfigError) as err:
        config.parse(data, "agent.json")
    assert needle in str(err.value)
    assert len(str(err.value)) < 1000


def test_check_config_on_nested_json_exits_2_without_traceback(tmp_path: Path):
    for name, data in (("nested.json", NESTED), ("value.json", NESTED_VALUE), ("bool.json", b'{"version": true}')):
        path = tmp_path / name
        path.write_bytes(data)
        res = subprocess.run(AGENT + ["--check-config", "--config", str(path)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr
        assert res.stderr.startswith("composefs-fleet-agent: invalid configuration %s:\n  " % path)


def test_reload_keeps_the_last_good_configuration(tmp_path: Path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"interval": 60}))
    agent = Agent(parse_args(["--config", str(path), "--no-journal"]), Journal(stream=open(os.devnull, "w")))
    assert agent.load_config() and agent.config is not None
    good = agent.config
    for data in (NESTED, NESTED_VALUE, b'{"version": true}'):
        path.write_bytes(data)
        assert agent.load_config() is False
        assert agent.config is good and agent.config_valid is False


def test_sighup_with_nested_json_keeps_the_agent_running(tmp_path: Path):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"interval": 3600, "textfile": str(tmp_path / "m.prom")}))
    proc = subprocess.Popen(AGENT + ["--config", str(path), "--no-journal"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Each config-loaded / config-invalid entry is one line on stderr.
        assert proc.stderr.readline().startswith("<6>agent-started:")
        assert proc.stderr.readline().startswith("<6>config-loaded:")
        path.write_bytes(NESTED)
        proc.send_signal(signal.SIGHUP)
        line = ""
        while not line.startswith("<3>config-invalid:"):
            line = proc.stderr.readline()
            assert line, "the agent ended"
        assert "nested too deeply" in line and "keeping the configuration loaded before" in line
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fifo_as_config_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "agent.json"
    os.mkfifo(str(fifo))
    with pytest.raises(config.ConfigError, match="not a regular file"):
        config.load(str(fifo))


def test_hostile_keys_and_refs_are_refused_without_hanging(tmp_path: Path):
    """A FIFO or a device as a key file must not block --check-config (nor a reload); a huge or nested
    ref is refused with a short message."""
    pytest.importorskip("cryptography", reason="the Python package cryptography (python3-cryptography) is missing")
    fifo = tmp_path / "key.fifo"
    os.mkfifo(str(fifo))
    keydir = tmp_path / "trusted.d"
    keydir.mkdir()
    (keydir / "gone.pub").symlink_to(tmp_path / "no-such-key")
    digest = "ab" * 32
    mount = {"where": "/srv/app", "image": "/s/images/" + digest, "digest": digest, "basedirs": ["/s/objects"]}
    cases = {
        "fifo": ({"trusted_keys": [str(fifo)]}, "keys: key file %s: not a regular file" % fifo),
        "device": ({"revoked_keys": ["/dev/zero"]}, "keys: key file /dev/zero: not a regular file"),
        "dangling": ({"trusted_keys": [str(keydir)]}, "key file %s: No such file or directory" % (keydir / "gone.pub")),
        "nested": ({"trusted_keys": [[[["/k"]]]]}, "trusted_keys[0] must be an absolute path, got [[[...]]]"),
        "long-ref": ({"mounts": [dict(mount, ref="a" * 5000)]}, "mounts[0].ref: ref name too long"),
        "nested-ref": ({"mounts": [dict(mount, ref={"a": [[["b"]]]})]}, "mounts[0].ref must be a ref name"),
    }
    for name, (doc, needle) in cases.items():
        path = tmp_path / (name + ".json")
        path.write_text(json.dumps(doc))
        res = subprocess.run(AGENT + ["--check-config", "--config", str(path)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2 and needle in res.stderr, (name, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr) < 1000, (name, res.stderr)
