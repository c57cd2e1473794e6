# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""At boot, the fs-verity keys unit loads the certificates before the composefs mount units.

An image whose fs-verity carries a built-in signature is checked by the
kernel whenever it loads the file's verity data, so after a reboot the
mount unit of a signed image (mounted with ``digest=``) can only come up if
the certificate is already in ``.fs-verity``.  Here: the unit as the node
role installs it (image_signature_checks.install_unit), a signed image in a
store, its ``.mount`` unit enabled; the guest is rebooted; then the keys unit
finished before the mount unit started, the mount is up, files read through
it, and the kernel holds the signature.  The session guest is rebooted once
(tests after this one set up their own state).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import guest_vm
import pytest

pytestmark = [pytest.mark.guest, pytest.mark.usefixtures("guest_mount_helper")]

HERE = Path(__file__).resolve().parent
WHERE = "/mnt/cf-keyring-boot"

_BEFORE = r"""
import json, os, subprocess, sys, types
spec = json.loads(sys.stdin.readline())
checks = types.ModuleType("image_signature_checks")
checks.SPEC = spec
exec(compile(spec["checks_source"], "image_signature_checks.py", "exec"), checks.__dict__)
from composefs_fleet.fsverity_sig import pkcs7_sign
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_image_sig import ensure_image_signature
out = {}
# mount(8) looks for its helper in /sbin (the node role puts ours there too).
out["helper_made"] = not os.path.lexists("/sbin/mount.composefs")
if out["helper_made"]:
    os.symlink("/usr/local/sbin/mount.composefs", "/sbin/mount.composefs")
checks.install_unit(out)
# A unit left active by an earlier test (RemainAfterExit) is not started again: restart it, as the
# node role does when the certificates change, so that this certificate is loaded now.
out["restart"] = checks.sh(["systemctl", "restart", checks.UNIT])
out["enable"] = checks.sh(["systemctl", "enable", checks.UNIT])
src = "/var/tmp/cf-keyring-boot/src"
os.makedirs(src, exist_ok=True)
with open(src + "/payload", "wb") as f:
    f.write(bytes(range(256)) * 400)
with open(src + "/small", "w") as f:
    f.write("small\n")
store = Store.init("/var/lib/cf-keyring-boot", notice=None)[0]
digest = add_image(store, src, "app").digest
sig = pkcs7_sign(bytes.fromhex(digest), spec["trusted_key"].encode(), spec["trusted_cert"].encode())
ensure_image_signature(store, digest, sig)
image = "/var/lib/cf-keyring-boot/images/" + digest
os.makedirs(spec["where"], exist_ok=True)
out["unit"] = checks.sh(["mount.composefs", "--write-systemd-unit=/etc/systemd/system", "-o",
                         "basedir=/var/lib/cf-keyring-boot/objects,digest=" + digest, image, spec["where"]])
mount_unit = subprocess.run(["systemd-escape", "--path", "--suffix=mount", spec["where"]], capture_output=True,
                            text=True).stdout.strip()
checks.sh(["systemctl", "daemon-reload"])
out["mount_enable"] = checks.sh(["systemctl", "enable", mount_unit])
out["digest"], out["sig"] = digest, sig.hex()
print(json.dumps(out))
"""

_AFTER = r"""
import json, os, subprocess, sys
from composefs_fleet import fsverity_ioctl, kernel_keyring
spec = json.loads(sys.stdin.readline())
def show(unit, prop):
    return subprocess.run(["systemctl", "show", "-p", prop, "--value", unit], capture_output=True, text=True).stdout.strip()
out = {"keys": [desc for _serial, desc in kernel_keyring.keyring_keys()]}
keys_unit = "composefs-fleet-fsverity-keys.service"
mount_unit = subprocess.run(["systemd-escape", "--path", "--suffix=mount", spec["where"]], capture_output=True,
                            text=True).stdout.strip()
out["keys_state"] = show(keys_unit, "ActiveState")
out["keys_done"] = int(show(keys_unit, "ExecMainExitTimestampMonotonic") or 0)
out["mount_state"] = show(mount_unit, "ActiveState")
out["mount_started"] = int(show(mount_unit, "InactiveExitTimestampMonotonic") or 0)
out["mount_journal"] = subprocess.run(["journalctl", "-b", "-u", mount_unit, "-u", keys_unit, "-o", "cat", "--no-pager"],
                                     capture_output=True, text=True).stdout[-3000:]
out["mount_unit_name"] = mount_unit
out["enabled"] = subprocess.run(["systemctl", "is-enabled", mount_unit], capture_output=True, text=True).stdout.strip()
try:
    with open(spec["where"] + "/payload", "rb") as f:
        out["payload_ok"] = f.read() == bytes(range(256)) * 400
except OSError as exc:
    out["payload_ok"] = str(exc)
fd = os.open("/var/lib/cf-keyring-boot/images/" + spec["digest"], os.O_RDONLY)
try:
    out["kernel_sig"] = fsverity_ioctl.read_signature(fd).hex()
finally:
    os.close(fd)
subprocess.run(["systemctl", "disable", "--now", mount_unit], capture_output=True)
os.unlink("/etc/systemd/system/" + mount_unit)
subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
if spec["helper_made"]:
    os.unlink("/sbin/mount.composefs")
print(json.dumps(out))
"""


def _pair(d: Path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "k.pem"),
                    "-out", str(d / "c.pem"), "-subj", "/CN=fleet boot signer", "-days", "2"],
                   check=True, capture_output=True)
    return (d / "k.pem").read_text(), (d / "c.pem").read_text()


def _in_guest(guest, script: str, spec: dict) -> dict:
    res = guest.vm.run(["env", "PYTHONPATH=%s/lib" % guest_vm.GUEST_ROOT, "python3", "-c", script],
                       input=(json.dumps(spec) + "\n").encode(), timeout=600)
    return json.loads(res.stdout)


def test_certificates_are_loaded_before_the_signed_image_mounts_at_boot(guest, tmp_path):
    key, cert = _pair(tmp_path)
    unit = guest_vm.REPO / "roles" / "composefs_node" / "files" / "composefs-fleet-fsverity-keys.service"
    spec = {"trusted_key": key, "trusted_cert": cert, "unit": unit.read_text(), "where": WHERE,
            "checks_source": (HERE / "image_signature_checks.py").read_text()}
    before = _in_guest(guest, _BEFORE, spec)
    assert before["unit_active"] == "active" and before["enable"]["rc"] == 0, before
    assert before["unit"]["rc"] == 0 and before["mount_enable"]["rc"] == 0, before
    guest.vm.reboot()
    after = _in_guest(guest, _AFTER, {"where": WHERE, "digest": before["digest"], "helper_made": before["helper_made"]})
    assert any("fleet boot signer" in desc for desc in after["keys"]), after["keys"]
    assert after["keys_state"] == "active" and after["mount_state"] == "active", after["mount_journal"]
    # The keys were in the keyring before the mount unit began: the ordering the unit promises.
    assert 0 < after["keys_done"] <= after["mount_started"], after
    assert after["payload_ok"] is True
    assert after["kernel_sig"] == before["sig"]
