# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""In-guest half of the guest tests: runs INSIDE the QEMU guest.

    PYTHONPATH=/opt/composefs-fleet/lib python3 guest_checks.py CHECK WORKDIR [SPEC-JSON]

Each CHECK does its work in one process (Python in the guest is 15-25x
slower than on the host, and every SSH call costs time) and prints one JSON
object with what it observed. The assertions are made on the host, in
tests/guest/test_*.py, so a failure shows the observed values.
"""
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

from composefs_fleet import fsverity_digest, fsverity_ioctl
from composefs_fleet.errors import VerityNotEnabled

FS_IOC_GETFLAGS = 0x80086601
FS_VERITY_FL = 0x00100000


def sh(argv, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    return {"rc": res.returncode, "out": res.stdout, "err": res.stderr}


def getflags(path):
    import fcntl
    import struct
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        return struct.unpack_from("=I", buf)[0]
    finally:
        os.close(fd)


def cli_measure(paths):
    """`fsverity measure` of many files in one call: {path: "alg:hex"}."""
    if not paths:
        return {}
    res = sh(["fsverity", "measure"] + list(paths))
    out = {}
    for line in res["out"].splitlines():
        digest, _, path = line.partition(" ")
        out[path] = digest
    for p in paths:
        out.setdefault(p, "ERROR rc=%d %s" % (res["rc"], res["err"].strip()))
    return out


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fresh(workdir):
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    return workdir


# ------------------------------------------------------------ fs-verity --

def check_verity(workdir):
    fresh(workdir)
    cases = []
    # (size, block_size, salt): sizes around block and Merkle-level edges.
    params = [(0, 4096, b""), (1, 4096, b""), (100, 4096, b""), (4096, 4096, b""), (4097, 4096, b""),
              (65539, 4096, b""), (1048576 + 12345, 4096, b""),
              (200000, 1024, b"salty"), (8193, 2048, b"")]
    for i, (size, block_size, salt) in enumerate(params):
        path = os.path.join(workdir, "f%d" % i)
        write(path, os.urandom(size))
        case = {"path": path, "size": size, "block_size": block_size, "salt": salt.hex()}
        case["userspace"] = fsverity_digest.digest_file(path, block_size=block_size, salt=salt).hex()
        fd = os.open(path, os.O_RDONLY)
        try:
            case["flag_before"] = fsverity_ioctl.verity_enabled(fd)
            try:
                fsverity_ioctl.measure_verity(fd)
                case["measure_before"] = "no error"
            except VerityNotEnabled as exc:
                case["measure_before"] = type(exc).__name__
            case["enabled_now"] = fsverity_ioctl.enable_verity(fd, block_size=block_size, salt=salt)
            case["enabled_again"] = fsverity_ioctl.enable_verity(fd, block_size=block_size, salt=salt)
            alg, digest = fsverity_ioctl.measure_verity(fd)
            case["kernel"] = "%s:%s" % (alg, digest.hex())
            case["flag_after"] = fsverity_ioctl.verity_enabled(fd)
        finally:
            os.close(fd)
        case["getflags_verity"] = bool(getflags(path) & FS_VERITY_FL)
        try:
            with open(path, "r+b"):
                case["open_for_write"] = "allowed"
        except OSError as exc:
            case["open_for_write"] = errno.errorcode.get(exc.errno, str(exc.errno))
        cases.append(case)
    measured = cli_measure([c["path"] for c in cases])
    for c in cases:
        c["cli"] = measured[c["path"]]
    return {"cases": cases, "helpers": verity_helpers(workdir)}


def verity_helpers(workdir):
    """measure_or_none / enable_then_check / digest_measured_or_computed for real."""
    from composefs_fleet.errors import VerityError

    out = {}
    path = os.path.join(workdir, "helpers")
    data = os.urandom(70000)
    write(path, data)
    want = fsverity_digest.digest_bytes(data)
    out["want"] = want.hex()
    fd = os.open(path, os.O_RDONLY)
    try:
        out["measure_before"] = fsverity_ioctl.measure_or_none(fd)
        digest, measured = fsverity_ioctl.digest_measured_or_computed(fd)
        out["before"] = [digest.hex(), measured]
        out["enable"] = fsverity_ioctl.enable_then_check(fd, want, path)
        out["enable_again"] = fsverity_ioctl.enable_then_check(fd, want, path)
        alg, digest = fsverity_ioctl.measure_or_none(fd)
        out["measure_after"] = "%s:%s" % (alg, digest.hex())
        digest, measured = fsverity_ioctl.digest_measured_or_computed(fd)
        out["after"] = [digest.hex(), measured]
        try:
            fsverity_ioctl.enable_then_check(fd, bytes(32), path)
            out["wrong"] = "no error"
        except VerityError as exc:
            out["wrong"] = [type(exc).__name__, str(exc)]
    finally:
        os.close(fd)
    # Objects whose filesystem has none: a reason, asked once per filesystem.
    shm = os.path.join("/dev/shm", "cfverity-helpers")
    shutil.rmtree(shm, ignore_errors=True)
    os.makedirs(shm)
    try:
        out["tmpfs"] = []
        for name in ("a", "b"):
            write(os.path.join(shm, name), data)
            out["tmpfs"].append(fsverity_ioctl.enable_then_check_path(os.path.join(shm, name), want))
        out["tmpfs_devs"] = len(fsverity_ioctl.unsupported_devs)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return out


# --------------------------------------------------------- digest store --

def make_source(src):
    """A small tree: inline-sized and external files, a duplicate, empty file,
    subdirectories, a symlink."""
    files = {
        "tiny": b"x" * 10,
        "edge64": b"e" * 64,
        "edge65": b"f" * 65,
        "a.bin": os.urandom(5000),
        "b.bin": os.urandom(4096),
        "sub/c.bin": os.urandom(70000),
        "sub/deeper/d.bin": os.urandom(123457),
        "sub/e.bin": os.urandom(300),
        "empty": b"",
    }
    files["dup.bin"] = files["a.bin"]
    for rel, data in files.items():
        write(os.path.join(src, rel), data)
    os.symlink("sub/c.bin", os.path.join(src, "link"))
    return files


def store_objects(store):
    objects = []
    for dirpath, dirnames, filenames in os.walk(store):
        dirnames.sort()
        for name in sorted(filenames):
            objects.append(os.path.join(dirpath, name))
    return objects


def check_digest_store(workdir):
    fresh(workdir)
    src, store, image = (os.path.join(workdir, n) for n in ("src", "store", "image.cfs"))
    files = make_source(src)
    res = sh(["mkcomposefs", "--digest-store=" + store, src, image])
    out = {"mkcomposefs": res, "objects": []}
    if res["rc"] != 0:
        return out
    expected = sorted({fsverity_digest.digest_bytes(d).hex() for d in files.values() if len(d) > 64})
    out["expected_digests"] = expected
    objects = store_objects(store)
    measured = cli_measure(objects)
    for path in objects:
        rel = os.path.relpath(path, store)
        out["objects"].append({
            "rel": rel,
            "name_digest": rel.replace("/", ""),
            "verity_flag": bool(getflags(path) & FS_VERITY_FL),
            "cli": measured[path],
        })
    return out


# --------------------------------------------------------------- mounts --

def mounted(target):
    target = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def umount(target):
    while mounted(target):
        if sh(["umount", target])["rc"] != 0:
            sh(["umount", "-l", target])
            break


def mount_cfs(image, target, opts):
    os.makedirs(target, exist_ok=True)
    res = sh(["mount.composefs", "-o", opts, image, target])
    res["mounted"] = mounted(target)
    return res


def read_all(root, rels):
    """{rel: "ok"/"mismatch"/errno name} reading each file through the mount."""
    out = {}
    for rel, want in rels.items():
        try:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
            out[rel] = "ok" if data == want else "mismatch"
        except OSError as exc:
            out[rel] = errno.errorcode.get(exc.errno, str(exc.errno))
    return out


def build_image(workdir):
    src, store, image = (os.path.join(workdir, n) for n in ("src", "store", "image.cfs"))
    files = make_source(src)
    res = sh(["mkcomposefs", "--print-digest", "--digest-store=" + store, src, image])
    if res["rc"] != 0:
        raise SystemExit("mkcomposefs failed: %s" % res)
    digest = res["out"].split()[0]
    return files, store, image, digest


def check_mount(workdir):
    fresh(workdir)
    files, store, image, digest = build_image(workdir)
    plain = os.path.join(workdir, "plain.cfs")
    shutil.copyfile(image, plain)  # same bytes, no fs-verity
    fd = os.open(image, os.O_RDONLY)
    try:
        fsverity_ioctl.enable_verity(fd)
        kernel_digest = fsverity_ioctl.measure_verity(fd)[1].hex()
    finally:
        os.close(fd)
    out = {"print_digest": digest, "kernel_digest": kernel_digest}
    mnt = os.path.join(workdir, "mnt")
    base = "basedir=" + store
    wrong = "%064x" % (int(digest, 16) ^ 1)

    out["right"] = mount_cfs(image, mnt, base + ",digest=" + digest)
    out["right_read"] = read_all(mnt, files) if out["right"]["mounted"] else {}
    out["right_symlink"] = os.readlink(os.path.join(mnt, "link")) if out["right"]["mounted"] else None
    umount(mnt)

    out["wrong"] = mount_cfs(image, mnt, base + ",digest=" + wrong)
    umount(mnt)
    out["no_verity_image"] = mount_cfs(plain, mnt, base + ",digest=" + digest)
    umount(mnt)
    out["no_digest_plain"] = mount_cfs(plain, mnt, base)  # control: the plain image itself is fine
    out["no_digest_plain_read"] = read_all(mnt, files) if out["no_digest_plain"]["mounted"] else {}
    umount(mnt)
    return out


def check_tamper(workdir):
    fresh(workdir)
    files, store, image, digest = build_image(workdir)
    fd = os.open(image, os.O_RDONLY)
    try:
        fsverity_ioctl.enable_verity(fd)
    finally:
        os.close(fd)
    mnt = os.path.join(workdir, "mnt")
    opts = "basedir=%s,digest=%s,verity" % (store, digest)
    external = {rel: data for rel, data in files.items() if len(data) > 64}
    out = {"external": sorted(external)}

    # Before: everything reads through a verity=require mount.
    out["before"] = mount_cfs(image, mnt, opts)
    out["before_read"] = read_all(mnt, files) if out["before"]["mounted"] else {}
    umount(mnt)
    # Nothing of the first mount may be served from cache after tampering.
    sh(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")

    def obj(rel):
        return os.path.join(store, fsverity_digest.digest_to_hex(fsverity_digest.digest_bytes(files[rel]))[:2],
                            fsverity_digest.digest_to_hex(fsverity_digest.digest_bytes(files[rel]))[2:])

    # 1. One byte flipped: a verity file cannot be written, so copy it (the
    #    copy has no verity), flip the byte, rename the copy over the object.
    victim = obj("sub/c.bin")
    tmp = victim + ".tmp"
    shutil.copyfile(victim, tmp)
    with open(tmp, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0x01]))
    os.rename(tmp, victim)
    # 2. Replaced by a verity-enabled file with other content.
    victim2 = obj("sub/deeper/d.bin")
    write(victim2 + ".tmp", os.urandom(len(files["sub/deeper/d.bin"])))
    fd = os.open(victim2 + ".tmp", os.O_RDONLY)
    try:
        fsverity_ioctl.enable_verity(fd)
    finally:
        os.close(fd)
    os.rename(victim2 + ".tmp", victim2)
    # 3. Deleted.
    os.unlink(obj("sub/e.bin"))
    out["tampered"] = {"flipped": "sub/c.bin", "replaced": "sub/deeper/d.bin", "deleted": "sub/e.bin"}
    out["flipped_has_verity"] = bool(getflags(victim) & FS_VERITY_FL)
    out["replaced_has_verity"] = bool(getflags(victim2) & FS_VERITY_FL)

    dmesg_mark = len(sh(["dmesg"])["out"].splitlines())
    out["after"] = mount_cfs(image, mnt, opts)
    out["after_read"] = read_all(mnt, files) if out["after"]["mounted"] else {}
    out["after_listing"] = sorted(os.listdir(mnt)) if out["after"]["mounted"] else []
    umount(mnt)
    out["dmesg"] = sh(["dmesg"])["out"].splitlines()[dmesg_mark:][-20:]
    return out


# ----------------------------------------------------------------- pull --

def manifest(root):
    """{rel: [kind, ...]} of everything under root: type, permissions and
    content (sha256) of each entry; a file that cannot be read says why.
    Also used on the host for the source tree the guest's mount must equal."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ["link", os.readlink(path)]
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ["dir", stat.S_IMODE(st.st_mode)]
            else:
                try:
                    with open(path, "rb") as f:
                        out[rel] = ["file", stat.S_IMODE(st.st_mode), hashlib.sha256(f.read()).hexdigest()]
                except OSError as exc:
                    out[rel] = ["error", errno.errorcode.get(exc.errno, str(exc.errno))]
    return out


def tcp_listeners(port):
    """Addresses listening on TCP ``port`` here (/proc/net/tcp{,6}, state 0A)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                addr, hexport = fields[1].rsplit(":", 1)
                if fields[3] != "0A" or int(hexport, 16) != port:
                    continue
                if len(addr) == 8:  # IPv4, little-endian hex
                    found.append(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.append("ipv6:" + addr)
    return found


def overlay_options(target):
    """[fstype, super options...] of the mount on target, None if nothing is mounted there."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            if left.split(" ")[4] == target:
                fstype, _source, sopts = right.split(" ", 2)
                return [fstype] + sopts.split(",")
    return None


def with_json(res):
    try:
        res["json"] = json.loads(res["out"])
    except ValueError:
        res["json"] = None
    return res


def check_pull(workdir, spec):
    """composefs-store pull from spec["url"] (the host's server through a
    reverse tunnel) into spec["store"] on the verity-capable root, then what
    the host asserts on: who listens on the tunnel's port, the kernel's
    measurement of every object and image, fsck, and the image mounted with
    digest= and verity (verity=require) read back in full."""
    store, url, ref = spec["store"], spec["url"], spec["ref"]
    for top in (workdir, os.path.dirname(store)):
        shutil.rmtree(top, ignore_errors=True)
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt)
    out = {"listeners": tcp_listeners(spec["port"])}
    out["init"] = sh(["composefs-store", "--repo", store, "init"])
    out["pull"] = with_json(sh(["composefs-store", "--repo", store, "pull", "--json", url, ref]))
    try:
        with open(os.path.join(store, "refs", ref)) as f:
            out["ref_file"] = f.read()
    except OSError as exc:
        out["ref_file"] = "ERROR " + exc.strerror
    objects = store_objects(os.path.join(store, "objects"))
    images = store_objects(os.path.join(store, "images"))
    measured = cli_measure(objects + images)
    out["objects"] = {os.path.relpath(p, os.path.join(store, "objects")).replace("/", ""): measured[p] for p in objects}
    out["images"] = {os.path.basename(p): measured[p] for p in images}
    out["fsck"] = with_json(sh(["composefs-store", "--repo", store, "fsck", "--json"]))
    digest = out["ref_file"].strip()
    out["mount"] = mount_cfs(os.path.join(store, "images", digest), mnt,
                             "basedir=%s/objects,digest=%s,verity" % (store, digest))
    if out["mount"]["mounted"]:
        try:
            out["overlay"] = overlay_options(mnt)
            out["manifest"] = manifest(mnt)
        finally:
            umount(mnt)
            out["unmounted"] = not mounted(mnt)
    return out


# -------------------------------------------------------------- journal --

def check_journal(workdir):
    from systemd import journal
    token = "cf-%d-%s" % (os.getpid(), os.urandom(4).hex())
    journal.send("composefs-fleet guest journal check", COMPOSEFS_FLEET_CHECK=token,
                 COMPOSEFS_FLEET_NUMBER="42", PRIORITY=str(journal.LOG_INFO),
                 SYSLOG_IDENTIFIER="composefs-fleet-test")
    entries = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        res = sh(["journalctl", "-o", "json", "--no-pager", "COMPOSEFS_FLEET_CHECK=" + token])
        entries = [json.loads(line) for line in res["out"].splitlines() if line.strip()]
        if entries:
            break
        time.sleep(0.5)
    return {"token": token, "entries": entries}


# --------------------------------------------------------------- system --

def check_system(workdir):
    with open("/proc/1/comm") as f:
        pid1 = f.read().strip()
    return {
        "pid1": pid1,
        "state": sh(["systemctl", "is-system-running"])["out"].strip(),
        "journald": sh(["systemctl", "is-active", "systemd-journald.service"])["out"].strip(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "imports": {m: _importable(m) for m in ("xattr", "systemd.journal", "cryptography")},
        "root_features": sh(["tune2fs", "-l", "/dev/vda"])["out"],
        "filesystems": open("/proc/filesystems").read().split(),
    }


def _importable(name):
    try:
        __import__(name)
        return "ok"
    except Exception as exc:  # report, the host asserts
        return "%s: %s" % (type(exc).__name__, exc)


CHECKS = {
    "verity": check_verity,
    "digest-store": check_digest_store,
    "mount": check_mount,
    "tamper": check_tamper,
    "journal": check_journal,
    "system": check_system,
}
# Checks that take a JSON spec as a third argument.
CHECKS_WITH_SPEC = {
    "pull": check_pull,
}


def main(argv):
    if len(argv) == 3 and argv[1] in CHECKS:
        result = CHECKS[argv[1]](argv[2])
    elif len(argv) == 4 and argv[1] in CHECKS_WITH_SPEC:
        result = CHECKS_WITH_SPEC[argv[1]](argv[2], json.loads(argv[3]))
    else:
        sys.stderr.write("usage: guest_checks.py {%s} WORKDIR | {%s} WORKDIR SPEC-JSON\n"
                         % (",".join(CHECKS), ",".join(CHECKS_WITH_SPEC)))
        return 2
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
