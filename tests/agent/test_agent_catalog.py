# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The agent's journal catalog (agent/catalog/composefs-fleet-agent.catalog).

Every MESSAGE_ID the agent can log has exactly one entry, with the headers
and the three parts (what happened, what it means, what to do); the real
journalctl compiles it and lists every entry. That journalctl -x shows the
text under a real entry is proven in the guest (tests/guest/test_guest_agent.py).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from composefs_fleet_agent.findings import KINDS

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "agent" / "catalog" / "composefs-fleet-agent.catalog"
AGENT_README = REPO / "agent" / "README.md"
RULES = REPO / "agent" / "prometheus" / "composefs-fleet.rules.yml"
HEADERS = ("Subject", "Defined-By", "Support", "Documentation")
PARTS = ("What happened:", "What it means:", "What to do:")


class Entry:
    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.headers: Dict[str, str] = {}
        self.body: List[str] = []

    @property
    def text(self) -> str:
        return "\n".join(self.body).strip()


def parse(text: str) -> List[Entry]:
    """The catalog as systemd's catalog_import_file reads it: '#' lines are comments,
    '-- <32 hex>' starts an entry, 'Key: value' headers up to the first empty line, then the body."""
    entries: List[Entry] = []
    entry = None
    in_headers = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        if line.startswith("-- "):
            m = re.fullmatch(r"-- ([0-9a-f]{32})", line)
            assert m, "line %d: bad entry start %r (lower-case 32 hex digits, no language)" % (number, line)
            entry = Entry(m.group(1))
            entries.append(entry)
            in_headers = True
            continue
        if entry is None:
            assert not line.strip(), "line %d: text before the first entry: %r" % (number, line)
            continue
        if in_headers:
            if not line.strip():
                in_headers = False
                continue
            key, sep, value = line.partition(": ")
            assert sep and key in HEADERS, "line %d: unknown header line %r" % (number, line)
            assert key not in entry.headers, "line %d: %s given twice" % (number, key)
            entry.headers[key] = value
            continue
        entry.body.append(line)
    return entries


@pytest.fixture(scope="module")
def entries() -> List[Entry]:
    return parse(CATALOG.read_text(encoding="utf-8"))


def test_every_message_id_the_agent_logs_has_one_entry_and_no_other(entries: List[Entry]):
    ids = [e.message_id for e in entries]
    assert len(ids) == len(set(ids)), "entries given twice: %s" % sorted({i for i in ids if ids.count(i) > 1})
    logged = {kind.message_id: name for name, kind in KINDS.items()}
    missing = sorted("%s (%s)" % (mid, name) for mid, name in logged.items() if mid not in ids)
    extra = sorted(set(ids) - set(logged))
    assert not missing, "no catalog entry for: %s" % ", ".join(missing)
    assert not extra, "catalog entries for MESSAGE_IDs the agent never logs: %s" % ", ".join(extra)


def test_each_entry_has_the_headers_and_says_what_happened_means_and_to_do(entries: List[Entry]):
    for e in entries:
        assert set(e.headers) == set(HEADERS), "%s: headers %s" % (e.message_id, sorted(e.headers))
        assert e.headers["Defined-By"] == "composefs-fleet"
        assert e.headers["Documentation"].startswith("https://") and e.headers["Support"].startswith("https://")
        positions = [e.text.find(part) for part in PARTS]
        assert -1 not in positions and positions == sorted(positions), \
            "%s: the body must say %s, in this order" % (e.message_id, " / ".join(PARTS))
        assert all(len(line) <= 100 for line in e.body), "%s: a line over 100 characters" % e.message_id


def _journal_fields() -> List[str]:
    """The fields the agent's README says the entries carry (the ## Journal section)."""
    section = AGENT_README.read_text(encoding="utf-8").split("## Journal", 1)[1].split("\n## ", 1)[0]
    return sorted(set(re.findall(r"COMPOSEFS_[A-Z_]+", section)))


def test_substituted_fields_are_fields_the_agent_sends(entries: List[Entry]):
    # journalctl -x replaces @FIELD@ with the entry's field, or with the bare name when the entry lacks it;
    # journald adds _PID to every entry.
    known = set(_journal_fields()) | {"_PID"}
    assert {"COMPOSEFS_MOUNT", "COMPOSEFS_PASS", "COMPOSEFS_OBJECT"} <= known
    for e in entries:
        used = set(re.findall(r"@([A-Za-z0-9_]+)@", e.headers["Subject"] + "\n" + e.text))
        assert used <= known, "%s uses fields the agent never sends: %s" % (e.message_id, sorted(used - known))
        assert "@" not in re.sub(r"@[A-Z0-9_]+@", "", e.text), "%s: a stray @" % e.message_id


def test_alerts_the_catalog_names_exist_in_the_rules(entries: List[Entry]):
    rules = RULES.read_text(encoding="utf-8")
    named = {a for e in entries for a in re.findall(r"\bComposefsFleet[A-Za-z]+", e.text)}
    assert named, "the catalog points at the alerts (remounts, fs-verity, signature expiry)"
    for alert in sorted(named):
        assert re.search(r"- alert: %s\n" % alert, rules), "the catalog names alert %s, which %s lacks" % (alert, RULES)


def _journalctl() -> str:
    path = shutil.which("journalctl")
    if path is None:
        pytest.skip("journalctl not found (systemd's journalctl compiles the catalog)")
    return path


def _compile(root: Path, catalog_dir: str) -> Tuple[str, "subprocess.CompletedProcess[str]"]:
    journalctl = _journalctl()
    dest = root / catalog_dir.lstrip("/")
    dest.mkdir(parents=True)
    shutil.copy(str(CATALOG), str(dest / CATALOG.name))
    res = subprocess.run([journalctl, "--root", str(root), "--update-catalog"], capture_output=True, text=True)
    return journalctl, res


@pytest.mark.parametrize("catalog_dir", ["/usr/lib/systemd/catalog", "/usr/local/lib/systemd/catalog"])
def test_journalctl_compiles_the_catalog_and_lists_every_entry(tmp_path: Path, entries: List[Entry], catalog_dir: str):
    # The package's directory and the role's loose-mode one: journalctl reads both.
    journalctl, res = _compile(tmp_path, catalog_dir)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "var/lib/systemd/catalog/database").is_file()
    listed = subprocess.run([journalctl, "--root", str(tmp_path), "--list-catalog"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    lines = dict(line.split(" ", 1) for line in listed.stdout.splitlines() if line.strip())
    for e in entries:
        assert lines.get(e.message_id) == "composefs-fleet: " + e.headers["Subject"]
    wrong = KINDS["mount-wrong-image"].message_id
    dumped = subprocess.run([journalctl, "--root", str(tmp_path), "--dump-catalog", wrong],
                            capture_output=True, text=True)
    assert dumped.returncode == 0, dumped.stderr
    assert "What to do:" in dumped.stdout and "@COMPOSEFS_MOUNT@ shows another image" in dumped.stdout


def test_journalctl_refuses_a_broken_catalog(tmp_path: Path):
    # So the exit status checked above can fail: a bad entry id makes --update-catalog fail, naming the file.
    journalctl = _journalctl()
    dest = tmp_path / "usr/lib/systemd/catalog"
    dest.mkdir(parents=True)
    (dest / "bad.catalog").write_text("-- %s\nSubject: x\n\nbody\n" % ("0" * 31 + "g"))
    res = subprocess.run([journalctl, "--root", str(tmp_path), "--update-catalog"], capture_output=True, text=True)
    assert res.returncode != 0 and "bad.catalog" in res.stderr
