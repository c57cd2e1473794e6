# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""In-guest half of test_guest_image_signatures.py: runs INSIDE the guest, as root.

The host sends this file on stdin with ``SPEC = {...}`` prepended (keys and
certificates made by openssl on the host, the unit file) and runs it with
PYTHONPATH=/opt/composefs-fleet/lib; it prints one JSON object with what it
observed.  One process: Python in the guest is slow and SSH calls cost.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import traceback

from composefs_fleet import fsverity_ioctl, kernel_keyring
from composefs_fleet.fsverity_sig import cert_der, pkcs7_sign
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check
from composefs_fleet.store_image_sig import read_image_signature

SPEC = globals().get("SPEC", {})
WORK = "/var/tmp/cfguest/image-signatures"
CERT_DIR = "/etc/composefs-fleet/fsverity-certs.d"
UNIT = "composefs-fleet-fsverity-keys.service"
TOOL = "/usr/local/sbin/composefs-fsverity-keys"


def sh(argv, **kw):
    res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    return {"rc": res.returncode, "out": res.stdout, "err": res.stderr}


def write(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def error_of(fn):
    """None, or (exception class, message) of what fn() raised."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- reported to the host, which asserts on it
        return [type(exc).__name__, str(exc)]
    return None


def listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def kernel_signature(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        sig = fsverity_ioctl.read_signature(fd)
        return None if sig is None else sig.hex()
    finally:
        os.close(fd)


def open_cold(path):
    """Open ``path`` after the inode cache is dropped, so the kernel loads its fs-verity data (and checks its signature) again."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def reopen_without_key(path):
    """The signature is checked whenever the kernel loads the file's verity data, not only at enable:
    without the certificate in the keyring the signed image cannot be opened."""
    import ctypes

    keyctl_unlink, sys_keyctl = 9, 250  # x86_64, the guest's architecture
    libc = ctypes.CDLL(None, use_errno=True)
    ring = kernel_keyring.fsverity_keyring_id()
    for serial, _desc in kernel_keyring.keyring_keys():
        if libc.syscall(ctypes.c_long(sys_keyctl), ctypes.c_int(keyctl_unlink), ctypes.c_int32(serial),
                        ctypes.c_int32(ring)) != 0:
            raise OSError(ctypes.get_errno(), "keyctl unlink")
    without = open_cold(path)
    kernel_keyring.load_certificates([CERT_DIR])
    return without, open_cold(path)


def install_unit(out):
    """The boot unit, as the node role installs it: wrapper, certificates, unit; then started."""
    wrapper = ("#!/bin/sh\nPYTHONPATH=/opt/composefs-fleet/lib exec python3 -c "
               "'import sys; sys.argv[0] = \"composefs-fsverity-keys\"; "
               "from composefs_fleet_cli.fsverity_keys import main; sys.exit(main())' \"$@\"\n")
    write(TOOL, wrapper.encode(), 0o755)
    shutil.rmtree(CERT_DIR, ignore_errors=True)
    # The trusted certificate as DER (what the role ships), plus a dot file the loader skips.
    write(os.path.join(CERT_DIR, "fleet.der"), cert_der(SPEC["trusted_cert"].encode()))
    write(os.path.join(CERT_DIR, ".ignored"), b"not a certificate")
    write("/etc/systemd/system/" + UNIT, SPEC["unit"].encode())
    out["daemon_reload"] = sh(["systemctl", "daemon-reload"])
    out["unit_start"] = sh(["systemctl", "start", UNIT])
    out["unit_active"] = sh(["systemctl", "is-active", UNIT])["out"].strip()
    out["unit_journal"] = sh(["journalctl", "-b", "-u", UNIT, "-o", "cat", "--no-pager"])["out"][-2000:]
    out["unit_verify"] = sh(["systemd-analyze", "verify", "/etc/systemd/system/" + UNIT])
    out["unit_before"] = sh(["systemctl", "show", "-p", "Before", "--value", UNIT])["out"].strip()


def main():
    out = {}
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    out["keyring_id"] = kernel_keyring.fsverity_keyring_id()
    out["keys_before"] = kernel_keyring.keyring_keys()
    install_unit(out)
    out["keys_after_unit"] = kernel_keyring.keyring_keys()
    out["cli_list"] = sh([TOOL, "list", "--json"])
    # Loading again through the library (what the CLI calls) replaces the key: still one.
    out["load_again"] = kernel_keyring.load_certificates([CERT_DIR])
    out["keys_after_reload"] = kernel_keyring.keyring_keys()

    # A store with an image added the ordinary way: fs-verity enabled without a signature.
    src = os.path.join(WORK, "src")
    files = {"a.bin": os.urandom(70000), "sub/b.bin": os.urandom(5000), "tiny": b"tiny"}
    for rel, data in files.items():
        write(os.path.join(src, rel), data)
    store_dir = os.path.join(WORK, "store")
    Store.init(store_dir, notice=None)
    store = Store.open(store_dir, notice=None)
    digest = add_image(store, src, "app").digest
    image_path = os.fsdecode(store.image_path(digest))
    with open(image_path, "rb") as f:
        data = f.read()
    out["digest"] = digest
    out["unsigned_kernel_signature"] = kernel_signature(image_path)
    obj = next(iter(store.iter_objects()))
    out["object_kernel_signature"] = kernel_signature(os.fsdecode(obj[1]))

    trusted_key, trusted_cert = SPEC["trusted_key"].encode(), SPEC["trusted_cert"].encode()
    sig = pkcs7_sign(bytes.fromhex(digest), trusted_key, trusted_cert)
    out["signature"] = sig.hex()
    # The image is there with unsigned fs-verity: written again, with the signature given to the kernel.
    out["write_signed"] = list(store.write_image(data, signature=sig))
    out["signed_kernel_signature"] = kernel_signature(image_path)
    out["sig_file"] = read_image_signature(store, digest).hex()
    out["measure"] = sh(["fsverity", "measure", image_path])["out"].split()
    out["write_signed_again"] = list(store.write_image(data, signature=sig))

    # Mounted with its digest pinned; the files read back.
    mnt = os.path.join(WORK, "mnt")
    os.makedirs(mnt)
    objects = os.fsdecode(store.objects_dir)
    out["mount"] = sh(["mount.composefs", "-o", "basedir=%s,digest=%s" % (objects, digest), image_path, mnt])
    reads = {}
    for rel, want in files.items():
        try:
            with open(os.path.join(mnt, rel), "rb") as f:
                reads[rel] = "ok" if f.read() == want else "mismatch"
        except OSError as exc:
            reads[rel] = errno.errorcode.get(exc.errno, str(exc.errno))
    out["reads"] = reads
    out["umount"] = sh(["umount", mnt])
    out["fsck_errors"] = check(store).errors
    out["open_without_key"], out["open_after_reload"] = reopen_without_key(image_path)

    # Refusals, each in a fresh store: nothing may appear in images/.
    refusals = {}
    untrusted_sig = pkcs7_sign(bytes.fromhex(digest), SPEC["untrusted_key"].encode(), SPEC["untrusted_cert"].encode())
    other_sig = pkcs7_sign(bytes(32), trusted_key, trusted_cert)  # trusted key, another digest
    for label, bad in (("untrusted", untrusted_sig), ("other_digest", other_sig)):
        other_dir = os.path.join(WORK, "refused-" + label)
        Store.init(other_dir, notice=None)
        other = Store.open(other_dir, notice=None)
        refusals[label] = {"error": error_of(lambda: other.write_image(data, signature=bad)),
                           "images": listing(os.fsdecode(other.images_dir))}
    # Below the store: a blob that is DER but no PKCS#7 goes to the ioctl as is.
    raw = os.path.join(WORK, "raw")
    write(raw, b"raw file for FS_IOC_ENABLE_VERITY" * 100)
    fd = os.open(raw, os.O_RDONLY)
    try:
        refusals["malformed_ioctl"] = {"error": error_of(lambda: fsverity_ioctl.enable_verity(
            fd, signature=b"\x30\x03\x02\x01\x01"))}
        refusals["malformed_ioctl"]["verity_after"] = fsverity_ioctl.verity_enabled(fd)
    finally:
        os.close(fd)
    out["refusals"] = refusals
    out["dmesg"] = [line for line in sh(["dmesg"])["out"].splitlines() if "fs-verity" in line or "fsverity" in line][-10:]
    return out


if __name__ == "__main__":
    try:
        result = main()
    except Exception:  # noqa: BLE001 -- the host shows it
        result = {"crash": traceback.format_exc()}
    json.dump(result, sys.stdout, default=str)
    sys.stdout.write("\n")
