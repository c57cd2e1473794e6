# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Signed-ref findings of the node agent: runs INSIDE the QEMU guest, as root.

    PYTHONPATH=/opt/composefs-fleet/lib python3 - WORKDIR SPEC-JSON < agent_signature_drill.py

(sent on stdin by tests/guest/test_guest_agent_signatures.py: the harness
copies only guest_checks.py into the guest). SPEC holds the PEM keys the host
made with openssl ({"keys": {name: {"private": PEM, "public": PEM}},
"expires_in": seconds}).

A store on the guest's ext4 root (fs-verity), an image of a small tree under
ref app/v1, mounted with its digest pinned and ``verity=require``, the ref
signed by the trusted key. Each agent pass is ``composefs-fleet-agent --once``
started by ``systemd-run`` with the sandbox of the role's unit (so its entries
reach journald from a unit, and ``cryptography`` must work under
``MemoryDenyWriteExecute=`` and the system call filter); after each, the
entries of that pass are read back with ``journalctl -o json MESSAGE_ID=…``
and the textfile is read. Passes: baseline (valid), the signature replaced by
one from an untrusted key, signed again by the trusted key with a short expiry
(``composefs-store sign --expires``), and the same statement after it expired.

Prints one JSON object; the host asserts.
"""
import calendar
import json
import os
import shutil
import subprocess
import sys
import time

from composefs_fleet import mount_record, mountinfo
from composefs_fleet.mount import mount_composefs
from composefs_fleet.ref_trust import sign_ref
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet_agent.findings import KINDS

REF = "app/v1"
LIB = "/opt/composefs-fleet/lib"
IDENT = "composefs-fleet-agent"
WATCHED = ("signature-invalid", "signature-expired")
# The sandbox of roles/composefs_agent/templates/composefs-fleet-agent.service.j2 (what can matter to a pass).
SANDBOX = ("ProtectSystem=strict", "NoNewPrivileges=yes", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
           "PrivateNetwork=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectControlGroups=yes",
           "RestrictNamespaces=yes", "LockPersonality=yes", "MemoryDenyWriteExecute=yes",
           "SystemCallArchitectures=native", "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_UNIX",
           "CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER")


def sh(argv, timeout=300):
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    return {"rc": res.returncode, "out": res.stdout, "err": res.stderr}


def journal(after, *matches):
    argv = ["journalctl", "-o", "json", "--no-pager", "-q"]
    if after:
        argv.append("--after-cursor=" + after)
    out = []
    for line in sh(argv + list(matches))["out"].splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        out.append({k: v for k, v in entry.items() if k.startswith("COMPOSEFS_") or k in (
            "MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER", "_SYSTEMD_UNIT", "__CURSOR")})
    return out


def cursor():
    entries = journal(None, "-n", "1")
    return entries[-1]["__CURSOR"] if entries else None


def textfile(path):
    out = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as exc:
        return {"_error": exc.strerror}
    for line in lines:
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class Drill:
    def __init__(self, workdir, spec):
        self.workdir = workdir
        self.spec = spec
        self.store = os.path.join(workdir, "store")
        self.mnt = os.path.join(workdir, "mnt")
        self.keys = os.path.join(workdir, "keys")
        self.config = os.path.join(workdir, "agent.json")
        self.prom = os.path.join(workdir, "metrics", "agent.prom")
        self.number = 0

    def unmount(self):
        for _ in range(4):
            top = mountinfo.top_mount(self.mnt)
            if top is None or not top.is_composefs():
                return
            mount_record.unmount(self.mnt)

    def key(self, name, part):
        return os.path.join(self.keys, "%s.%s" % (name, "pem" if part == "private" else "pub"))

    def setup(self):
        self.unmount()
        shutil.rmtree(self.workdir, ignore_errors=True)
        src = os.path.join(self.workdir, "src")
        for rel, size in (("a.bin", 5000), ("sub/b.bin", 70001), ("sub/c.bin", 12288), ("small", 20)):
            path = os.path.join(src, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(bytes((i * 7 + len(rel)) % 251 for i in range(size)))
        os.makedirs(os.path.join(self.keys, "trusted.d"))
        os.makedirs(os.path.dirname(self.prom))
        for name, pems in self.spec["keys"].items():
            for part, pem in pems.items():
                with open(self.key(name, part), "w") as f:
                    f.write(pem)
        shutil.copyfile(self.key("trusted", "public"), os.path.join(self.keys, "trusted.d", "trusted.pub"))
        with Store.init(self.store, notice=None)[0] as store:
            self.digest = add_image(store, src, REF).digest
            self.image = os.fsdecode(store.image_path(self.digest))
        os.makedirs(self.mnt)
        mount_composefs(self.image, self.mnt, [os.path.join(self.store, "objects")], digest=self.digest, verity=True)
        with open(self.config, "w") as f:
            json.dump({"version": 1, "interval": 3600, "textfile": self.prom, "stores": [{"path": self.store}],
                       "trusted_keys": [os.path.join(self.keys, "trusted.d")],
                       "mounts": [{"where": self.mnt, "image": self.image, "digest": self.digest, "ref": REF,
                                   "basedirs": [os.path.join(self.store, "objects")], "verity": "auto"}]}, f)

    def sign(self, key):
        with Store.open(self.store, notice=None) as store:
            sign_ref(store, REF, [self.key(key, "private")])

    def agent_pass(self):
        """One --once pass in a transient sandboxed unit; its journal entries and the textfile."""
        self.number += 1
        unit = "cf-agent-signatures-%d-%d.service" % (os.getpid(), self.number)
        after = cursor()
        argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--unit", unit,
                "--setenv=PYTHONPATH=" + LIB, "-p", "ReadWritePaths=" + self.workdir]
        for prop in SANDBOX:
            argv += ["-p", prop]
        run = sh(argv + ["python3", "-m", "composefs_fleet_agent", "--once", "--config", self.config])
        # The pass's summary is its last entry: wait until journald has it. Matched by identifier after
        # the cursor, not by _SYSTEMD_UNIT: journald may not learn the unit of a process already gone.
        deadline = time.monotonic() + 60
        summary = []
        while not summary and time.monotonic() < deadline:
            summary = journal(after, "SYSLOG_IDENTIFIER=" + IDENT, "MESSAGE_ID=" + KINDS["pass-summary"].message_id)
            if not summary:
                time.sleep(0.5)
        rec = {"unit": unit, "run": run, "summary": summary[-1] if summary else None, "ended": time.time(),
               "kinds": [e.get("COMPOSEFS_FINDING") for e in journal(after, "SYSLOG_IDENTIFIER=" + IDENT)],
               "textfile": textfile(self.prom)}
        # Read back by MESSAGE_ID, as an operator filters them.
        rec["by_id"] = {kind: journal(after, "MESSAGE_ID=" + KINDS[kind].message_id) for kind in WATCHED}
        return rec

    def run(self):
        out = {"digest": self.digest, "mount": self.mnt, "message_ids": {k: KINDS[k].message_id for k in WATCHED}}
        self.sign("trusted")
        out["baseline"] = self.agent_pass()
        # (a) The signature replaced by one from a key the node does not trust.
        self.sign("stranger")
        out["untrusted"] = self.agent_pass()
        # (b) Signed again by the trusted key, expiring a few seconds later.
        out["sign_cli"] = sh(["composefs-store", "--repo", self.store, "sign", REF, "--key",
                              self.key("trusted", "private"), "--expires", "%ds" % self.spec["expires_in"]])
        with open(os.path.join(self.store, "signatures", REF)) as f:
            out["statement"] = json.load(f)["statement"]
        out["fresh"] = self.agent_pass()
        expires = [line.split(": ", 1)[1] for line in out["statement"].splitlines() if line.startswith("expires: ")]
        out["expires"] = expires[0] if expires else None
        expires_at = calendar.timegm(time.strptime(expires[0], "%Y-%m-%dT%H:%M:%SZ")) if expires else 0
        out["fresh"]["before_expiry"] = out["fresh"]["ended"] < expires_at
        while time.time() < expires_at + 1:
            time.sleep(0.5)
        out["expired"] = self.agent_pass()
        return out


def main(argv):
    drill = Drill(argv[1], json.loads(argv[2]))
    try:
        drill.setup()
        out = drill.run()
    finally:
        drill.unmount()
    shutil.rmtree(drill.workdir, ignore_errors=True)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
