# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Issue 14's guest node: it pulls an image from the host's nginx through an
SSH reverse tunnel and mounts it with ``verity=require``.

The guest's network is QEMU user networking with ``restrict=on``: it can reach
nothing on the host but what the harness forwards. The host's nginx listens on
the host's 127.0.0.1 only; ``ssh -R`` (on the harness's master connection)
makes the guest's own 127.0.0.1:PORT reach it, so the pull URL is the guest's
loopback and no other address is involved. The guest's store is on its ext4
root, which has fs-verity: every pulled object must come out verity-enabled
with the digest its name says, and the overlay's ``verity=require`` makes the
kernel check each one when the mounted files are read.

Guest time is kept small (about 10 s on top of the boot): one in-guest run
(guest_checks.py pull) for the first pull and all its checks, then one SSH call
each for the same pull again (nothing left to fetch), a v2 sharing most objects
(only its new ones fetched, and measured) and a pull after the tunnel is closed
(refused: the tunnel was the only way). nginx (tests/remote/nginx_server.py,
shared with the pull tests) logs every request; its log is read after each.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import List

import guest_checks
import guest_vm
import pytest

from composefs_fleet import fsverity_digest

pytestmark = [pytest.mark.guest, pytest.mark.network, pytest.mark.usefixtures("guest_mount_helper")]

REF = "app/v1"
REF2 = "app/v2"
GUEST_STORE = "/var/lib/cfpull/store"  # the guest's ext4 root: fs-verity capable


def _content(name: str, size: int) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return bytes((i * 131 + seed[i % 32]) % 251 for i in range(size))


# Five objects (> 64 bytes is external in composefs; all here are > 4 KiB, one
# spans many Merkle tree blocks), a duplicate (one object for two files), an
# inline file, an empty file and a symlink.
OBJECT_FILES = {"a.bin": 5000, "sub/b.bin": 12288, "sub/c.bin": 70001, "sub/deeper/d.bin": 300000,
                "big.bin": 1048577}
INLINE_FILES = {"small.txt": 40, "empty": 0}


def _make_source(src: Path) -> None:
    for name, size in dict(OBJECT_FILES, **INLINE_FILES).items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(name, size))
    (src / "dup.bin").write_bytes(_content("a.bin", OBJECT_FILES["a.bin"]))
    (src / "link").symlink_to("sub/c.bin")
    os.chmod(str(src / "sub" / "deeper" / "d.bin"), 0o600)


def _store_cli(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "composefs_fleet_cli.composefs_store"] + list(args),
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return json.loads(res.stdout) if "--json" in args else {}


def _load_nginx_server() -> ModuleType:
    """tests/remote/nginx_server.py, shared with the pull tests and bench, loaded
    by path: tests/remote is on sys.path only when its own tests are collected."""
    module = sys.modules.get("nginx_server")
    if module is None:
        spec = importlib.util.spec_from_file_location("nginx_server", str(guest_vm.REPO / "tests/remote/nginx_server.py"))
        if spec is None or spec.loader is None:
            raise ImportError("tests/remote/nginx_server.py cannot be loaded")
        module = importlib.util.module_from_spec(spec)
        sys.modules["nginx_server"] = module
        spec.loader.exec_module(module)
    return module


nginx = _load_nginx_server().nginx  # the fixture: Debian's nginx on the host's 127.0.0.1, own config and logs


def _pull_argv(url: str, ref: str = REF) -> List[str]:
    return ["composefs-store", "--repo", GUEST_STORE, "pull", "--json", url, ref]


def _object_path(digest: str) -> str:
    return "objects/%s/%s" % (digest[:2], digest[2:])


def test_guest_pulls_through_a_reverse_tunnel_and_mounts_with_verity_require(guest, nginx, tmp_path):
    src, src2, store = tmp_path / "src", tmp_path / "src2", tmp_path / "store"
    _make_source(src)
    _store_cli("--repo", str(store), "init")
    added = _store_cli("--repo", str(store), "--json", "add-image", str(src), "--ref", REF)
    digest = added["digest"]
    want_objects = sorted({fsverity_digest.digest_bytes(_content(n, s)).hex() for n, s in OBJECT_FILES.items()})
    assert added["objects"] == len(want_objects) == 5
    # v2: one file changed, one added; the other objects are shared with v1.
    shutil.copytree(str(src), str(src2), symlinks=True)
    v2_files = {"sub/c.bin": _content("c.bin v2", 70001), "new.bin": _content("new.bin", 20000)}
    for name, data in v2_files.items():
        (src2 / name).write_bytes(data)
    added2 = _store_cli("--repo", str(store), "--json", "add-image", str(src2), "--ref", REF2)
    digest2 = added2["digest"]
    v2_new = sorted(fsverity_digest.digest_bytes(data).hex() for data in v2_files.values())

    server = nginx(store)
    seen = [0]

    def new_requests() -> List[tuple]:
        """(method, path, status) of the requests nginx logged since the last call, sorted;
        each must have been answered in full."""
        got = server.entries()
        new, seen[0] = got[seen[0]:], len(got)
        assert all(e.completed for e in new), new
        return sorted((e.method, e.path, e.status) for e in new)

    with guest.vm.reverse_tunnel(server.port) as port:
        url = "http://127.0.0.1:%d%s/" % (port, server.prefix)
        first = guest.run_check("pull", dict(store=GUEST_STORE, url=url, ref=REF, port=port))
        first_requests = new_requests()
        again = guest.run(_pull_argv(url), check=False, timeout=300)
        again_requests = new_requests()
        # v2 into the store v1 is in; the new objects measured in the same call.
        v2 = guest.run(" ".join(shlex.quote(a) for a in _pull_argv(url, REF2)) + " && fsverity measure "
                       + " ".join(GUEST_STORE + "/" + _object_path(d) for d in v2_new), check=False, timeout=300)
        v2_requests = new_requests()
    # The tunnel was the guest's only way to the host: closed, the pull fails.
    closed = guest.run(_pull_argv(url) + ["--retries", "0"], check=False, timeout=300)
    closed_requests = new_requests()

    # The tunnel's guest end is the guest's loopback, nothing else.
    assert first["listeners"] == ["127.0.0.1"], first["listeners"]

    pull = first["pull"]
    assert pull["rc"] == 0, pull
    res = pull["json"]
    assert res["digest"] == digest and res["ref"] == REF and res["remote_ref"] == REF, res
    assert res["changed"] is True and res["image_fetched"] is True and res["previous"] is None, res
    assert res["objects"] == res["objects_missing"] == res["objects_fetched"] == 5, res
    total = sum(OBJECT_FILES.values())
    assert res["bytes_missing"] == res["bytes_fetched"] == total, res
    assert first["ref_file"] == digest + "\n"

    # Every object arrived with fs-verity on, measured by the kernel, equal to its name.
    assert sorted(first["objects"]) == want_objects
    assert first["objects"] == {d: "sha256:" + d for d in want_objects}
    assert first["images"] == {digest: "sha256:" + digest}
    fsck = first["fsck"]
    assert fsck["rc"] == 0 and fsck["json"]["clean"] is True, fsck
    assert fsck["json"]["objects"] == 5 and fsck["json"]["images"] == 1 and fsck["json"]["refs"] == 1, fsck
    assert fsck["json"]["verity_measured"] == 5, fsck  # each object's digest came from the kernel

    # Mounted with digest= and verity=require: the same tree as the host's source.
    assert first["mount"]["rc"] == 0, first["mount"]
    assert first["overlay"][0] == "overlay" and "verity=require" in first["overlay"], first["overlay"]
    assert first["manifest"] == guest_checks.manifest(str(src))
    assert first["unmounted"] is True

    # nginx saw the pull (through the tunnel): the store's meta.json, the ref,
    # the image and each object exactly once, nothing else.
    # (images/<digest>.sig is asked for too: the image's fs-verity signature, none here.)
    want = [("GET", "meta.json", 200), ("GET", "refs/" + REF, 200), ("GET", "images/" + digest, 200),
            ("GET", "images/%s.sig" % digest, 404)]
    assert first_requests == sorted(want + [("GET", _object_path(d), 200) for d in want_objects]), first_requests

    # The same pull again: nothing left to fetch, nothing changed; only meta.json, the ref and the
    # image's signature (which could have appeared since) were asked for.
    assert again.returncode == 0, (again.stdout, again.stderr)
    res = json.loads(again.stdout)
    assert res["digest"] == digest and res["previous"] == digest, res
    assert res["changed"] is False and res["image_fetched"] is False, res
    assert res["objects_missing"] == res["objects_fetched"] == res["bytes_fetched"] == 0, res
    assert again_requests == sorted([("GET", "meta.json", 200), ("GET", "refs/" + REF, 200),
                                     ("GET", "images/%s.sig" % digest, 404)]), again_requests

    # v2: only its two new objects travel, and they too come out verity-enabled.
    assert v2.returncode == 0, (v2.stdout, v2.stderr)
    res, end = json.JSONDecoder().raw_decode(v2.stdout)
    assert res["digest"] == digest2 and res["previous"] is None and res["image_fetched"] is True, res
    assert res["objects"] == 6 and res["objects_missing"] == res["objects_fetched"] == 2, res
    assert res["bytes_missing"] == res["bytes_fetched"] == sum(len(d) for d in v2_files.values()), res
    measured = v2.stdout[end:].split()
    assert measured == [w for d in v2_new for w in ("sha256:" + d, GUEST_STORE + "/" + _object_path(d))], v2.stdout
    want = [("GET", "meta.json", 200), ("GET", "refs/" + REF2, 200), ("GET", "images/" + digest2, 200),
            ("GET", "images/%s.sig" % digest2, 404)]
    assert v2_requests == sorted(want + [("GET", _object_path(d), 200) for d in v2_new]), v2_requests

    # Tunnel closed: the guest cannot reach the host's nginx any more.
    assert closed.returncode == 1, (closed.stdout, closed.stderr)
    assert closed.stderr.startswith("composefs-store: pull: http://127.0.0.1:%d%s/" % (port, server.prefix)), closed.stderr
    assert "connection refused" in closed.stderr, closed.stderr
    assert "Traceback" not in closed.stderr
    assert closed_requests == [], closed_requests


SIGNED_REF = "app/signed"
SIGNED_STORE = "/var/lib/cfpull/signed"
# In the guest, one process: the kernel keyring gets the image signer's certificate; then a pull
# with the trusted ed25519 key fetches the statement, the image (with images/<digest>.sig, given to
# FS_IOC_ENABLE_VERITY) and the objects; the signature the kernel holds is read back.
_SIGNED_PULL = r"""
import json, os, subprocess, sys
from composefs_fleet import fsverity_ioctl, kernel_keyring
from composefs_fleet.fsverity_sig import cert_der
spec = json.loads(sys.stdin.readline())
out = {}
os.makedirs("/var/tmp/cfsigned", exist_ok=True)
with open("/var/tmp/cfsigned/fleet.pub", "w") as f:
    f.write(spec["pub"])
with open("/var/tmp/cfsigned/other.pub", "w") as f:
    f.write(spec["other_pub"])
kernel_keyring.add_certificate(cert_der(spec["cert"].encode()))
def pull(*extra):
    res = subprocess.run(["composefs-store", "--repo", spec["store"], "pull", "--json", spec["url"], spec["ref"]]
                         + list(extra), capture_output=True, text=True)
    return {"rc": res.returncode, "out": res.stdout, "err": res.stderr}
subprocess.run(["composefs-store", "--repo", spec["store"], "init"], check=True, capture_output=True)
out["untrusted"] = pull("--trusted-key", "/var/tmp/cfsigned/other.pub")
out["listing_after_refusal"] = sorted(os.listdir(spec["store"] + "/images")) + sorted(os.listdir(spec["store"] + "/objects"))
out["pull"] = pull("--trusted-key", "/var/tmp/cfsigned/fleet.pub")
image = spec["store"] + "/images/" + spec["digest"]
fd = os.open(image, os.O_RDONLY)
try:
    out["kernel_signature"] = fsverity_ioctl.read_signature(fd).hex()
    out["measured"] = fsverity_ioctl.measure_verity(fd)[1].hex()
finally:
    os.close(fd)
with open(image + ".sig", "rb") as f:
    out["sig_file"] = f.read().hex()
out["verify"] = subprocess.run(["composefs-store", "--repo", spec["store"], "verify", spec["ref"], "--trusted-key",
                                "/var/tmp/cfsigned/fleet.pub"], capture_output=True, text=True).returncode
print(json.dumps(out))
"""


def test_guest_pull_verifies_the_signed_ref_and_hands_the_image_signature_to_the_kernel(guest, nginx, tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    _make_source(src)
    _store_cli("--repo", str(store), "init")
    digest = _store_cli("--repo", str(store), "--json", "add-image", str(src), "--ref", SIGNED_REF)["digest"]
    keys = {}
    for name in ("fleet", "other"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / (name + ".key"))], check=True)
        keys[name] = subprocess.run(["openssl", "pkey", "-in", str(tmp_path / (name + ".key")), "-pubout"], check=True,
                                    capture_output=True, text=True).stdout
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "rsa.key"),
                    "-out", str(tmp_path / "rsa.crt"), "-subj", "/CN=fleet pull signer", "-days", "2"],
                   check=True, capture_output=True)
    _store_cli("--repo", str(store), "sign", SIGNED_REF, "--key", str(tmp_path / "fleet.key"),
               "--fsverity-key", str(tmp_path / "rsa.key"), "--fsverity-cert", str(tmp_path / "rsa.crt"))
    sig_file = (store / "images" / (digest + ".sig")).read_bytes()
    server = nginx(store)
    with guest.vm.reverse_tunnel(server.port) as port:
        spec = {"url": "http://127.0.0.1:%d%s/" % (port, server.prefix), "ref": SIGNED_REF, "store": SIGNED_STORE,
                "digest": digest, "pub": keys["fleet"], "other_pub": keys["other"],
                "cert": (tmp_path / "rsa.crt").read_text()}
        res = guest.vm.run(["env", "PYTHONPATH=%s/lib" % guest_vm.GUEST_ROOT, "python3", "-c", _SIGNED_PULL],
                           input=(json.dumps(spec) + "\n").encode(), timeout=300)
    out = json.loads(res.stdout)
    # A key the statement was not signed with: refused before the image or any object was written.
    assert out["untrusted"]["rc"] == 1 and "none of them a trusted key" in out["untrusted"]["err"], out["untrusted"]
    assert out["listing_after_refusal"] == []
    pulled = json.loads(out["pull"]["out"])
    assert out["pull"]["rc"] == 0 and pulled["signature"]["keys"] and pulled["image_signed"] is True, out["pull"]
    # The kernel accepted the image's PKCS#7 signature (its certificate is in .fs-verity) and holds exactly it.
    assert out["kernel_signature"] == out["sig_file"] == sig_file.hex()
    assert out["measured"] == digest
    assert out["verify"] == 0
