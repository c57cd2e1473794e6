# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The Prometheus rules for the agent's textfile (agent/prometheus/).

promtool (Debian's prometheus package, unpacked by scripts/fetch-promtool,
never installed) checks the rules and runs their unit tests; the series the
rules read must be ones agent/textfile.py writes, so a renamed metric breaks
a test here; and a pass's real textfile, fed to the rules, fires what it should.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Set

import pytest
from conftest import cache_dir, unavailable

from composefs_fleet_agent.findings import KINDS, PROBLEMS, REPAIRS
from composefs_fleet_agent.textfile import render

REPO = Path(__file__).resolve().parents[2]
RULES_DIR = REPO / "agent" / "prometheus"
RULES = RULES_DIR / "composefs-fleet.rules.yml"
RULES_TEST = RULES_DIR / "composefs-fleet.rules.test.yml"
CATALOG = REPO / "agent" / "catalog" / "composefs-fleet-agent.catalog"
SERIES = re.compile(r"(?<![\w:])(composefs_fleet_agent_[a-z_]+)(?![\w:])")


@pytest.fixture(scope="module")
def promtool() -> str:
    base = cache_dir() / "promtool"
    meta = base / "promtool.json"
    if not meta.is_file():
        unavailable("promtool not found: %s missing (run scripts/fetch-promtool)" % meta)
    tool = base / json.loads(meta.read_text())["promtool"]
    probe = subprocess.run([str(tool), "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        unavailable("promtool %s does not run (exit %d): run scripts/fetch-promtool" % (tool, probe.returncode))
    return str(tool)


def _sample_textfile() -> str:
    return render({"object-missing": 1}, {"mount-remounted": 1}, False, 0.5, 1e9, 10, 2, 3, True, 1,
                  [("/srv/app", "app/v2", 2000000000)])


def _written_series() -> Set[str]:
    return {line.split()[2] for line in _sample_textfile().splitlines() if line.startswith("# TYPE ")}


def test_promtool_checks_the_rules(promtool: str):
    res = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 14 rules found" in res.stdout


def test_promtool_unit_tests_of_the_rules_pass(promtool: str):
    res = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=str(RULES_DIR), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@pytest.mark.parametrize("old, new", [
    ("sum_over_time(composefs_fleet_agent_repairs{kind=\"mount-remounted\"}[1h:5m]) >= 3",
     "sum_over_time(composefs_fleet_agent_repairs{kind=\"mount-remounted\"}[1h:5m]) >= 1"),
    ("expr: composefs_fleet_agent_healthy == 0\n        for: 15m", "expr: composefs_fleet_agent_healthy == 0\n        for: 1m"),
    ("composefs_fleet_agent_last_pass_timestamp_seconds > 900", "composefs_fleet_agent_last_pass_timestamp_seconds > 9000"),
    ("composefs_fleet_agent_config_valid == 0", "composefs_fleet_agents_config_valid == 0"),
])
def test_the_unit_tests_catch_a_changed_rule(promtool: str, tmp_path: Path, old: str, new: str):
    # Each alert's tests hold a node that must fire and one that must not: a looser or dead rule fails them.
    rules = RULES.read_text(encoding="utf-8")
    assert old in rules
    (tmp_path / RULES.name).write_text(rules.replace(old, new), encoding="utf-8")
    shutil.copy(str(RULES_TEST), str(tmp_path / RULES_TEST.name))
    res = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=str(tmp_path), capture_output=True,
                         text=True)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr, res.stdout + res.stderr


def test_every_series_the_rules_read_is_one_the_agent_writes():
    written = _written_series()
    assert {"composefs_fleet_agent_findings", "composefs_fleet_agent_last_pass_timestamp_seconds"} <= written
    text = RULES.read_text(encoding="utf-8")
    read = set(SERIES.findall(text))
    assert {"composefs_fleet_agent_healthy", "composefs_fleet_agent_repairs",
            "composefs_fleet_agent_signature_expiry_timestamp_seconds"} <= read
    assert read <= written, "the rules read series agent/textfile.py never writes: %s" % sorted(read - written)
    for kinds in re.findall(r'kind=~?"([^"]+)"', text):
        for kind in kinds.split("|"):
            assert kind in KINDS, "the rules name an unknown finding kind %r" % kind
            assert kind in PROBLEMS or kind in REPAIRS


def _alerts() -> List[str]:
    return re.findall(r"- alert: (\w+)\n", RULES.read_text(encoding="utf-8"))


def _slugs(markdown: Path) -> Set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown.read_text(encoding="utf-8"), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_every_alert_has_labels_annotations_and_a_runbook_section():
    text = RULES.read_text(encoding="utf-8")
    alerts = _alerts()
    assert len(alerts) == len(set(alerts)) >= 6
    blocks = text.split("- alert: ")[1:]
    links = set(re.findall(r"https://github.com/composefs-fleet/composefs-fleet/blob/main/([\w/.]+)#([\w-]+)",
                           text + CATALOG.read_text(encoding="utf-8")))
    for name, block in zip(alerts, blocks):
        assert re.search(r"severity: (critical|warning|info)\n", block), name
        for key in ("summary", "description", "runbook_url"):
            assert re.search(r"\n {10}%s: " % key, block), "%s lacks annotation %s" % (name, key)
        assert ("agent/README.md", name.lower()) in links, "%s: runbook_url must point at its own section" % name
    for path, anchor in sorted(links):
        assert anchor in _slugs(REPO / path), "link to %s#%s: no such heading" % (path, anchor)


def _series_lines(textfile: str, instance: str) -> List[Dict[str, str]]:
    """A textfile's samples as promtool input series of one node, held for 30 minutes."""
    out = []
    for line in textfile.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        labels = labels.rstrip("}")
        labels = (labels + "," if labels else "") + 'instance="%s",job="node"' % instance
        # Passes every minute: the timestamp moves with the evaluation time (promtool's clock starts at 0).
        values = "0+60x30" if name.endswith("last_pass_timestamp_seconds") else "%sx30" % value
        out.append({"series": "%s{%s}" % (name, labels), "values": values})
    return out


def test_a_real_textfile_fires_what_it_should(promtool: str, tmp_path: Path):
    # The agent's own rendering (not hand-made series): an unhealthy pass with a changed object alerts at
    # once and after 15 minutes; a healthy pass (with repairs) alerts on nothing. The alerts firing are read
    # from the ALERTS series, which carries their labels (annotations are the rules' own tests' business).
    now = 1e9
    bad = render({"object-digest-mismatch": 1, "object-missing": 2}, {}, False, 0.2, now, 5, 1, 1, True)
    good = render({}, {"object-verity-enabled": 3}, True, 0.2, now, 5, 1, 1, True)
    firing = [{"alertname": "ComposefsFleetNodeUnhealthy", "severity": "warning"},
              {"alertname": "ComposefsFleetIntegrityViolation", "severity": "critical", "kind": "object-digest-mismatch"}]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": _series_lines(bad, "bad") + _series_lines(good, "good")
            + [{"series": 'up{instance="%s",job="node"}' % i, "values": "1x30"} for i in ("bad", "good")],
            "promql_expr_test": [{
                "expr": 'ALERTS{alertstate="firing"}',
                "eval_time": "20m",
                "exp_samples": [{"labels": "ALERTS{%s}" % ",".join(
                    '%s="%s"' % kv for kv in sorted(dict(a, alertstate="firing", instance="bad", job="node").items())),
                    "value": 1} for a in firing],
            }],
        }],
    }
    path = tmp_path / "real.test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    res = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
