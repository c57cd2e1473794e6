# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The node_exporter textfile: counts of the last pass, written atomically
(node_exporter reads only ``*.prom``; the temp file's name ends in ``.tmp``)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from composefs_fleet.atomic_file import write_atomic

from .findings import PROBLEMS, REPAIRS

PREFIX = "composefs_fleet_agent_"


def render(findings: Dict[str, int], repairs: Dict[str, int], healthy: bool, duration: float,
           timestamp: float, objects: int, mounts: int, passes: int, config_valid: bool,
           signatures: int = 0, expiries: Sequence[Tuple[str, str, int]] = ()) -> str:
    out: List[str] = []

    def metric(name: str, help_text: str, values: Dict[str, float], label: str = "") -> None:
        out.append("# HELP %s%s %s" % (PREFIX, name, help_text))
        out.append("# TYPE %s%s gauge" % (PREFIX, name))
        for key, value in values.items():
            labels = '{%s="%s"}' % (label, key) if label else ""
            out.append("%s%s%s %s" % (PREFIX, name, labels, _number(value)))

    metric("findings", "Problems found by the last pass, by kind (repaired ones included).",
           {k: findings.get(k, 0) for k in PROBLEMS}, "kind")
    metric("repairs", "Repairs made by the last pass, by kind.", {k: repairs.get(k, 0) for k in REPAIRS}, "kind")
    metric("healthy", "1 when the last pass left no unresolved problem.", {"": 1 if healthy else 0})
    metric("pass_duration_seconds", "Duration of the last pass.", {"": duration})
    metric("last_pass_timestamp_seconds", "When the last pass ended (Unix time).", {"": timestamp})
    metric("objects_checked", "Objects checked by the last pass.", {"": objects})
    metric("mounts_checked", "Mounts checked by the last pass.", {"": mounts})
    metric("passes_total", "Passes since the agent started.", {"": passes})
    metric("config_valid", "0 when the last configuration load failed (the previous one is in use).",
           {"": 1 if config_valid else 0})
    metric("signatures_checked", "Signed statements of mounted refs checked by the last pass.", {"": signatures})
    # Alerting on this one warns before a statement expires (signature-expired comes only after).
    name = PREFIX + "signature_expiry_timestamp_seconds"
    out.append("# HELP %s When the signed statement of a mounted ref expires (Unix time; verified ones with an "
               "expiry)." % name)
    out.append("# TYPE %s gauge" % name)
    for where, ref, expires in expiries:
        out.append('%s{mount="%s",ref="%s"} %d' % (name, _label(where), _label(ref), expires))
    return "\n".join(out) + "\n"


def _label(value: str) -> str:
    """A label value in the text exposition format (UTF-8; backslash, quote and newline escaped)."""
    # A path's bytes that are not UTF-8 (surrogate escapes) are shown as \udcXX escapes.
    text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return "%.6f" % value


def write(path: str, text: str) -> None:
    write_atomic(path, text.encode("utf-8"), mode=0o644)
