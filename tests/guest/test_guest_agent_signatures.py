# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Issue 15 in the QEMU guest: the node agent re-verifies the signature of a
mounted, signed ref and reports ``signature-invalid`` and ``signature-expired``
to journald, read back with ``journalctl -o json MESSAGE_ID=…``.

The keys are made here by ``openssl`` and sent in; everything else happens in
one guest process (tests/guest/agent_signature_drill.py, sent on stdin): a
store on the guest's ext4 root, the image mounted with its digest pinned and
``verity=require``, agent passes in transient units under the role unit's
sandbox. The drill waits for the short expiry it signs (a few seconds); the
assertions are made here on what it saw.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import guest_vm
import pytest

from composefs_fleet_agent.findings import KINDS

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("guest_mount_helper")]

DRILL = Path(__file__).resolve().parent / "agent_signature_drill.py"
WORKDIR = "/var/lib/cfguest-agent-signatures"  # not under /var/tmp: the sandbox's PrivateTmp= hides it
REF = "app/v1"


def _keys(tmp: Path) -> Dict[str, Dict[str, str]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test's ed25519 keys)")
    keys = {}
    for name in ("trusted", "stranger"):
        private = tmp / (name + ".pem")
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
        public = subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout"], check=True,
                                capture_output=True, text=True).stdout
        keys[name] = {"private": private.read_text(), "public": public}
    return keys


def _summary(rec: dict, healthy: str) -> None:
    assert rec["summary"] is not None, "no pass-summary entry came from %s: %s" % (rec["unit"], rec)
    assert rec["summary"]["COMPOSEFS_HEALTHY"] == healthy and rec["summary"]["COMPOSEFS_SIGNATURES"] == "1", rec


def _found(rec: dict, kind: str) -> dict:
    """The one entry of ``kind`` read back by its MESSAGE_ID, from this pass's unit; the pass's only finding."""
    assert rec["run"]["rc"] == 1, rec["run"]
    _summary(rec, "0")
    assert rec["kinds"] == ["config-loaded", kind, "pass-summary"], rec["kinds"]
    (entry,) = rec["by_id"][kind]
    assert entry["MESSAGE_ID"] == KINDS[kind].message_id and entry["COMPOSEFS_FINDING"] == kind, entry
    assert entry["SYSLOG_IDENTIFIER"] == "composefs-fleet-agent", entry
    assert entry["PRIORITY"] == str(KINDS[kind].priority) and entry["COMPOSEFS_REF"] == REF, entry
    other = "signature-expired" if kind == "signature-invalid" else "signature-invalid"
    assert rec["by_id"][other] == [], rec["by_id"]
    tf = rec["textfile"]
    assert tf['composefs_fleet_agent_findings{kind="%s"}' % kind] == 1, tf
    assert tf['composefs_fleet_agent_findings{kind="%s"}' % other] == 0, tf
    assert tf["composefs_fleet_agent_healthy"] == 0 and tf["composefs_fleet_agent_signatures_checked"] == 1, tf
    return entry


def test_guest_agent_reports_untrusted_and_expired_signatures_in_the_journal(guest, tmp_path):
    spec = {"keys": _keys(tmp_path), "expires_in": 8}
    res = guest.run(["env", "PYTHONPATH=%s/lib" % guest_vm.GUEST_ROOT, "python3", "-", WORKDIR, json.dumps(spec)],
                    input=DRILL.read_bytes(), timeout=900)
    out = json.loads(res.stdout)
    digest = out["digest"]
    assert out["message_ids"] == {k: KINDS[k].message_id for k in ("signature-invalid", "signature-expired")}

    # Signed by the trusted key: a clean pass (under the unit's sandbox, cryptography included).
    base = out["baseline"]
    assert base["run"]["rc"] == 0, base["run"]
    _summary(base, "1")
    assert base["kinds"] == ["config-loaded", "pass-summary"], base["kinds"]
    assert base["by_id"] == {"signature-invalid": [], "signature-expired": []}, base["by_id"]
    assert base["textfile"]['composefs_fleet_agent_findings{kind="signature-invalid"}'] == 0, base["textfile"]

    # (a) Signature replaced by one from an untrusted key.
    entry = _found(out["untrusted"], "signature-invalid")
    assert entry["COMPOSEFS_REASON"] == "untrusted" and entry["COMPOSEFS_IMAGE_DIGEST"] == digest, entry
    assert entry["COMPOSEFS_MOUNT"] == out["mount"], entry
    assert entry["MESSAGE"].startswith("signature of ref %s: signed by key " % REF), entry
    assert "none of them a trusted key" in entry["MESSAGE"], entry

    # (b) Signed again with `composefs-store sign --expires 8s`: valid until then, signature-expired after.
    assert out["sign_cli"]["rc"] == 0, out["sign_cli"]
    assert out["expires"] and "image: fsverity-sha256:%s\n" % digest in out["statement"], out["statement"]
    fresh = out["fresh"]
    if fresh["before_expiry"]:  # the guest is slow: a pass that ended after the expiry proves nothing here
        assert fresh["run"]["rc"] == 0 and fresh["kinds"] == ["config-loaded", "pass-summary"], fresh
        series = [k for k in fresh["textfile"] if k.startswith("composefs_fleet_agent_signature_expiry_timestamp")]
        assert series == ['composefs_fleet_agent_signature_expiry_timestamp_seconds{mount="%s",ref="%s"}'
                          % (out["mount"], REF)], fresh["textfile"]
    entry = _found(out["expired"], "signature-expired")
    assert entry["COMPOSEFS_REASON"] == "expired", entry
    assert entry["MESSAGE"].startswith("signature of ref %s: the statement expired at %s" % (REF, out["expires"])), entry
