# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""``images/<digest>.sig`` in the store: written with its image, removed by gc with it, checked by fsck.

The host kernel has no fs-verity, so the kernel's part (the signature given
to FS_IOC_ENABLE_VERITY, a refusal publishing nothing, an image present
without the signature written again) runs here against a fake kernel that
keeps the signature given at enable per inode; the real kernel does it in
tests/guest/test_guest_image_signatures.py.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from composefs_fleet import fsverity_ioctl
from composefs_fleet.errors import StoreError, VeritySignatureError
from composefs_fleet.fsverity_sig import pkcs7_sign
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check
from composefs_fleet.store_gc import collect
from composefs_fleet.store_image_sig import ensure_image_signature, read_image_signature, write_image_signature

from store_fixtures import store, write_tree  # noqa: F401  (fixtures)

pytest.importorskip("cryptography", reason="python3-cryptography is not installed (it makes the RSA signature)")


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    """sign(digest hex) -> PKCS#7 DER, by a key and certificate made with openssl."""
    d = tmp_path_factory.mktemp("signer")
    res = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "k.pem"),
                          "-out", str(d / "c.pem"), "-subj", "/CN=store test", "-days", "2"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip("openssl cannot make a key here: %s" % res.stderr.strip())
    key, cert = (d / "k.pem").read_bytes(), (d / "c.pem").read_bytes()
    return lambda hexd: pkcs7_sign(bytes.fromhex(hexd), key, cert)


def images_listing(store):
    return sorted(os.listdir(os.fsdecode(store.images_dir)))


def added(store, tmp_path, seed, ref):
    src = tmp_path / ("src%d" % seed)
    write_tree(src, seed, files=4)
    r = add_image(store, src, ref)
    return r.digest, Path(os.fsdecode(store.image_path(r.digest))).read_bytes()


def test_write_image_writes_the_signature_next_to_it(store, tmp_path, signer):
    digest, data = added(store, tmp_path, 1, "app")
    sig = signer(digest)
    assert store.write_image(data, signature=sig) == (digest, False)  # image there already: only the .sig
    assert read_image_signature(store, digest) == sig
    assert images_listing(store) == [digest, digest + ".sig"]
    assert store.list_images() == [digest]  # a .sig is not an image
    assert store.write_image(data, signature=sig) == (digest, False)
    assert write_image_signature(store, digest, sig) is False  # same bytes: nothing written
    # A new image with its signature: both appear.
    other = data + b"\0" * 4096
    other_hex, written = store.write_image(other, signature=signer("ab" * 32))
    assert written and read_image_signature(store, other_hex) == signer("ab" * 32)
    assert check(store).clean, check(store).errors


def test_a_malformed_signature_writes_nothing(store, tmp_path, signer):
    digest, data = added(store, tmp_path, 2, "app")
    before = images_listing(store)
    for bad in (b"", b"junk", signer(digest)[:-3], b"\x30" + bytes(20000)):
        with pytest.raises(VeritySignatureError, match="signature of images/"):
            store.write_image(data + b"new", signature=bad)
        with pytest.raises(VeritySignatureError, match="images/%s.sig: " % digest):
            write_image_signature(store, digest, bad)
    assert images_listing(store) == before


def test_a_link_or_fifo_as_signature_is_refused(store, tmp_path, signer):
    digest, _data = added(store, tmp_path, 3, "app")
    path = Path(os.fsdecode(store.images_dir)) / (digest + ".sig")
    path.symlink_to("/etc/passwd")
    with pytest.raises(StoreError, match="symbolic link"):
        read_image_signature(store, digest)
    report = check(store)
    assert any(digest + ".sig: not a regular file (symbolic link)" in e for e in report.errors), report.errors
    check(store, repair=True)
    assert not os.path.lexists(path) and check(store).clean
    os.mkfifo(path)
    with pytest.raises(StoreError, match="not a regular file"):
        read_image_signature(store, digest)


def test_gc_removes_the_signature_with_its_image(store, tmp_path, signer):
    a, data_a = added(store, tmp_path, 4, "a")
    b, data_b = added(store, tmp_path, 5, "b")
    write_image_signature(store, a, signer(a))
    write_image_signature(store, b, signer(b))
    orphan = "cd" * 32  # a signature whose image is not in the store
    write_image_signature(store, orphan, signer(orphan))
    store.remove_ref("a")
    dry = collect(store, dry_run=True, tmp_grace=0)
    assert dry.removed_images == [a] and sorted(dry.removed_signatures) == sorted([a, orphan])
    assert len(images_listing(store)) == 5
    real = collect(store, tmp_grace=0)
    assert real.removed_images == [a] and sorted(real.removed_signatures) == sorted([a, orphan])
    assert images_listing(store) == [b, b + ".sig"]
    assert check(store).clean


def test_fsck_checks_signatures(store, tmp_path, signer):
    digest, _data = added(store, tmp_path, 6, "app")
    images = Path(os.fsdecode(store.images_dir))
    write_image_signature(store, digest, signer(digest))
    # Crash debris of a signature being written: a note, not damage.
    (images / (".%s.sig.0123456789ab.tmp" % digest)).write_bytes(b"x")
    orphan = "ef" * 32
    write_image_signature(store, orphan, signer(orphan))
    report = check(store)
    assert report.clean, report.errors
    assert any(".sig.0123456789ab.tmp" in n and "crash debris" in n for n in report.notes), report.notes
    assert any("images/%s.sig: its image is not in the store" % orphan in n for n in report.notes), report.notes
    (images / (digest + ".sig")).write_bytes(b"\x30\x03\x02\x01\x01")
    report = check(store)
    assert report.errors == ["images/%s.sig: not a PKCS#7 SignedData: damaged" % digest]
    repaired = check(store, repair=True)
    assert len(repaired.moved) == 1 and not (images / (digest + ".sig")).exists()
    assert check(store).clean


class FakeKernel:
    """fs-verity with built-in signatures, per inode: what the kernel keeps of FS_IOC_ENABLE_VERITY."""

    def __init__(self, refused: bytes) -> None:
        self.refused = refused
        self.held = {}
        self.enabled = []

    def enable_then_check(self, fd, digest, name, st=None, unsupported=None, signature=None):
        if signature == self.refused:
            inner = VeritySignatureError("the kernel refuses the fs-verity signature: not in the keyring (errno %d, ENOKEY)"
                                         % errno.ENOKEY)
            raise VeritySignatureError("%s: %s" % (name, inner)) from inner
        st = os.fstat(fd)
        self.held[(st.st_dev, st.st_ino)] = (digest, signature)
        self.enabled.append(signature)
        return None

    def measure_or_none(self, fd, st=None, unsupported=None):
        st = os.fstat(fd)
        held = self.held.get((st.st_dev, st.st_ino))
        return None if held is None else ("sha256", held[0])

    def read_signature(self, fd):
        st = os.fstat(fd)
        return self.held[(st.st_dev, st.st_ino)][1]


@pytest.fixture
def kernel(monkeypatch, signer):
    fake = FakeKernel(refused=signer("00" * 32))
    monkeypatch.setattr(fsverity_ioctl, "unsupported_devs", {})
    for name in ("enable_then_check", "measure_or_none", "read_signature"):
        monkeypatch.setattr(fsverity_ioctl, name, getattr(fake, name))
    return fake


def test_signature_goes_to_the_kernel_and_a_refusal_publishes_nothing(store, tmp_path, signer, kernel):
    data = b"an image, as far as the store's writer cares" * 100
    good, _ = store.write_image(data)
    assert kernel.enabled == [None]
    # Present with fs-verity but without the signature in the kernel: written again, with it.
    sig = signer(good)
    assert store.write_image(data, signature=sig) == (good, True)
    assert kernel.enabled == [None, sig] and read_image_signature(store, good) == sig
    # Now the kernel holds it: nothing to do.
    assert store.write_image(data, signature=sig) == (good, False)
    assert kernel.enabled == [None, sig]
    before = images_listing(store)
    with pytest.raises(VeritySignatureError) as info:
        store.write_image(data + b"other", signature=kernel.refused)
    message = str(info.value)
    assert message.startswith("images/") and "of %s: the kernel refuses the fs-verity signature" % os.fsdecode(store.path) in message
    assert message.endswith("ENOKEY); nothing published") and ".tmp" not in message
    assert images_listing(store) == before  # no image, no .sig, no temp file
    # A refused signature for an image already there leaves the image and its .sig as they were.
    with pytest.raises(VeritySignatureError):
        store.write_image(data, signature=kernel.refused)
    assert images_listing(store) == before and read_image_signature(store, good) == sig


def test_ensure_image_signature_for_an_image_already_present(store, tmp_path, signer, kernel):
    """What a pull does when it has the image already: the kernel gets the signature, the .sig is written."""
    data = b"an image a pull found present" * 200
    digest, _ = store.write_image(data)
    sig = signer(digest)
    assert ensure_image_signature(store, digest, sig) is True
    assert kernel.enabled == [None, sig] and read_image_signature(store, digest) == sig
    assert ensure_image_signature(store, digest, sig) is False  # nothing left to do
    assert kernel.enabled == [None, sig]
    with pytest.raises(VeritySignatureError, match="ENOKEY"):
        ensure_image_signature(store, digest, kernel.refused)
    assert read_image_signature(store, digest) == sig and kernel.enabled == [None, sig]
    # Without fs-verity (this host): only the .sig is written.
    other, _ = store.write_image(data + b"x")
    kernel.held.clear()
    assert ensure_image_signature(store, other, signer(other)) is True
    assert read_image_signature(store, other) == signer(other) and kernel.enabled[-1] is None
    # A damaged image is never published again under its name.
    path = Path(os.fsdecode(store.image_path(other)))
    st = path.stat()
    kernel.held[(st.st_dev, st.st_ino)] = (b"", None)  # "fs-verity without a signature"
    path.write_bytes(b"damaged")  # same inode
    with pytest.raises(StoreError, match="images/%s is damaged" % other):
        ensure_image_signature(store, other, signer("12" * 32))


def test_sign_cli_writes_what_fsverity_sign_writes(tmp_path):
    """``composefs-store sign --fsverity-key --fsverity-cert``: images/DIGEST.sig is byte for byte
    ``fsverity sign images/DIGEST``'s output; gc removes it with its image."""
    from store_fixtures import StoreCli

    if not shutil.which("fsverity"):
        pytest.skip("the 'fsverity' program (fsverity-utils) is not in PATH")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    res = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-keyout", str(key), "-out", str(cert),
                          "-subj", "/O=composefs-fleet/CN=cli signer", "-days", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cli = StoreCli(tmp_path / "store")
    src = tmp_path / "src"
    write_tree(src, 7, files=4)
    assert cli.run("init").returncode == 0
    assert cli.run("add-image", src, "--ref", "app").returncode == 0
    digest = (tmp_path / "store" / "refs" / "app").read_text().strip()
    res = cli.run("sign", "app", "--fsverity-key", key, "--fsverity-cert", cert)
    assert res.returncode == 0, res.stderr
    image = tmp_path / "store" / "images" / digest
    expected = tmp_path / "expected.sig"
    subprocess.run(["fsverity", "sign", str(image), str(expected), "--key", str(key), "--cert", str(cert)],
                   check=True, capture_output=True)
    assert (tmp_path / "store" / "images" / (digest + ".sig")).read_bytes() == expected.read_bytes()
    res = cli.run("fsck")
    assert res.returncode == 0, res.stdout + res.stderr
    assert cli.run("rm-ref", "app").returncode == 0
    assert cli.run("gc").returncode == 0
    assert os.listdir(tmp_path / "store" / "images") == []


def test_a_pull_brings_the_image_signature_with_the_image(store, tmp_path, signer):
    """A file:// remote serving images/<digest>.sig: the node stores it byte for byte, and a
    second pull changes nothing; a remote .sig that is no PKCS#7 stops the pull before anything
    is written."""
    from composefs_fleet.pull import pull
    from composefs_fleet.store import Store

    source = Store.init(str(tmp_path / "source"))[0]
    digest, _data = added(source, tmp_path, 7, "app/v1")
    sig = signer(digest)
    write_image_signature(source, digest, sig)
    first = pull(store, "file://%s" % source.path.decode(), "app/v1")
    assert first.image_fetched and first.image_signature and first.image_signed
    assert read_image_signature(store, digest) == sig
    again = pull(store, "file://%s" % source.path.decode(), "app/v1")
    assert not again.changed and again.image_signature
    # A damaged .sig on the remote: refused by name, the node keeps what it had.
    node = Store.init(str(tmp_path / "node"))[0]
    (Path(os.fsdecode(source.images_dir)) / (digest + ".sig")).write_bytes(b"\x30\x03\x02\x01\x00")
    with pytest.raises(StoreError, match=r"images/%s\.sig: not a usable fs-verity signature" % digest):
        pull(node, "file://%s" % source.path.decode(), "app/v1")
    assert images_listing(node) == [] and not os.listdir(os.fsdecode(node.objects_dir))
