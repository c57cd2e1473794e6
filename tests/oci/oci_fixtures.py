# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""OCI images the tests build themselves, with Debian's umoci and skopeo, and the two-step reference.

Not a conftest.py: test modules import these by name.  The reference for
"same tree" is what users do without us: ``umoci unpack`` of the image, then
``mkcomposefs`` of its rootfs (our mkcomposefs, byte-identical to C's;
tests/core checks that), compared as ``composefs-info dump`` text.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple


def _harness():
    """tests/conftest.py, by path: a test directory with its own conftest.py shadows the name."""
    import importlib.util

    module = sys.modules.get("composefs_fleet_tests_harness")
    if module is None:
        spec = importlib.util.spec_from_file_location("composefs_fleet_tests_harness",
                                                      str(Path(__file__).resolve().parent.parent / "conftest.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def unavailable(reason: str) -> None:
    _harness().unavailable(reason)


OCI_TOOLS = ("umoci", "skopeo")


def require_tools() -> None:
    missing = [tool for tool in OCI_TOOLS if shutil.which(tool) is None]
    if missing:
        unavailable("%s not installed (scripts/setup installs Debian's umoci and skopeo)" % " and ".join(missing))


def run(*argv: object, cwd: Optional[Path] = None) -> str:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL,
                         check=False)
    if res.returncode != 0:
        raise AssertionError("%s failed (exit %d): %s" % (" ".join(map(str, argv)), res.returncode, res.stderr.strip()))
    return res.stdout


def cli(module: str, *args: object, check: bool = True) -> "subprocess.CompletedProcess[str]":
    res = subprocess.run([sys.executable, "-m", module] + [str(a) for a in args], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, check=False)
    if check and res.returncode != 0:
        raise AssertionError("%s %s failed (exit %d): %s" % (module, args, res.returncode, res.stderr.strip()))
    return res


def store_cli(*args: object, check: bool = True) -> "subprocess.CompletedProcess[str]":
    return cli("composefs_fleet_cli.composefs_store", *args, check=check)


class Layout:
    """An OCI image layout built step by step: umoci repack for tree changes, raw tars for the rest."""

    def __init__(self, path: Path, tag: str = "t") -> None:
        self.path = path
        self.tag = tag
        self.bundle = path.parent / (path.name + ".bundle")
        run("umoci", "init", "--layout", path)
        run("umoci", "new", "--image", "%s:%s" % (path, tag))
        run("umoci", "unpack", "--image", "%s:%s" % (path, tag), self.bundle)

    @classmethod
    def existing(cls, path: Path, tag: str = "t") -> "Layout":
        """A layout already on disk (to read or damage), without a bundle."""
        layout = cls.__new__(cls)
        layout.path, layout.tag = path, tag
        layout.bundle = path.parent / (path.name + ".bundle")
        return layout

    def copy(self, path: Path) -> "Layout":
        shutil.copytree(self.path, path)
        return Layout.existing(path, self.tag)

    @property
    def ref(self) -> str:
        return "%s:%s" % (self.path, self.tag)

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    def layer(self, change: Callable[[Path], None]) -> None:
        """A layer of whatever ``change(rootfs)`` does to the bundle (umoci writes whiteouts for removals)."""
        change(self.rootfs)
        run("umoci", "repack", "--refresh-bundle", "--image", self.ref, self.bundle)

    def raw_layer(self, members: List["Member"]) -> None:
        """A layer from a hand-made tar (names, whiteouts and order exactly as given)."""
        tar_path = self.path.parent / ("%s.layer%d.tar" % (self.path.name, len(self.manifest()["layers"])))
        tar_path.write_bytes(make_tar(members))
        run("umoci", "raw", "add-layer", "--image", self.ref, tar_path)

    # -- reading and rewriting the layout by hand (for damaged images) -----------------
    def index(self) -> dict:
        return json.loads((self.path / "index.json").read_text())

    def blob(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def manifest(self) -> dict:
        desc = [m for m in self.index()["manifests"] if m.get("annotations", {}).get(
            "org.opencontainers.image.ref.name") == self.tag][0]
        return json.loads(self.blob(desc["digest"]).read_text())

    def put_blob(self, data: bytes) -> Tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blob(digest).write_bytes(data)
        return digest, len(data)

    def set_manifest(self, manifest: dict, index_extra: Optional[List[dict]] = None) -> None:
        """Store ``manifest`` and point the tag at it (nothing else in index.json but ``index_extra``)."""
        digest, size = self.put_blob(json.dumps(manifest).encode())
        entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
                 "annotations": {"org.opencontainers.image.ref.name": self.tag}}
        index = {"schemaVersion": 2, "manifests": [entry] + (index_extra or [])}
        (self.path / "index.json").write_text(json.dumps(index))

    def config(self) -> dict:
        return json.loads(self.blob(self.manifest()["config"]["digest"]).read_text())


class Member:
    """One tar member for :func:`make_tar`."""

    def __init__(self, name: str, data: Optional[bytes] = None, kind: bytes = tarfile.REGTYPE, link: str = "",
                 mode: int = 0o644, mtime: float = 1700000000, uid: int = 0, gid: int = 0,
                 pax: Optional[Dict[str, str]] = None) -> None:
        self.name, self.data, self.kind, self.link = name, data, kind, link
        self.mode, self.mtime, self.uid, self.gid, self.pax = mode, mtime, uid, gid, pax or {}


def make_tar(members: List[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.linkname = m.link
            info.mode = m.mode
            info.mtime = m.mtime
            info.uid, info.gid = m.uid, m.gid
            info.pax_headers = dict(m.pax)
            if m.data is not None:
                info.size = len(m.data)
            tar.addfile(info, io.BytesIO(m.data) if m.data is not None else None)
    return out.getvalue()


def directory(name: str, mtime: float = 1700000000, mode: int = 0o755) -> Member:
    return Member(name.rstrip("/") + "/", kind=tarfile.DIRTYPE, mode=mode, mtime=mtime)


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def dump_text(image: Path) -> str:
    return cli("composefs_fleet_cli.composefs_info", "dump", image).stdout


def without_root(dump: str) -> str:
    return "\n".join(line for line in dump.splitlines() if not line.startswith("/ "))


def two_step_dump(image_ref: str, work: Path) -> str:
    """``umoci unpack`` then ``mkcomposefs`` of the rootfs: the dump users would get without us."""
    bundle = work / "unpacked"
    if bundle.exists():
        shutil.rmtree(bundle)
    run("umoci", "unpack", "--image", image_ref, bundle)
    image = work / "two-step.cfs"
    cli("composefs_fleet_cli.mkcomposefs", bundle / "rootfs", image)
    return dump_text(image)


def store_dump(store: Path, ref: str) -> str:
    digest = (store / "refs" / ref).read_text().strip()
    return dump_text(store / "images" / digest)


def store_files(store: Path) -> List[str]:
    """Every file and directory under the store (relative), lock files aside: what an import may change."""
    out = []
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), store)
            if rel not in ("lock", "gate.lock", "gc.lock"):
                out.append(rel)
    return sorted(out)


def tree_facts(root: Path) -> Dict[str, tuple]:
    """path -> (type+mode, uid, gid, mtime ns, size, content digest or link target, xattrs): to compare trees."""
    facts = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            if not name and dirpath != str(root):
                continue
            st = os.lstat(path)
            if os.path.islink(path):
                what = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            else:
                what = ""
            try:
                xattrs = sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                for n in os.listxattr(path, follow_symlinks=False) if not n.startswith("trusted.overlay."))
            except OSError:
                xattrs = []
            size = st.st_size if not os.path.isdir(path) else 0
            facts[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, size, what, tuple(xattrs), st.st_rdev)
    return facts


def guest_root_disk() -> Path:
    """The guest's root filesystem image (a real Debian trixie tree), built if it can be."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "guest"))
    import guest_vm  # type: ignore[import-not-found]

    if not guest_vm.image_complete():
        reason = guest_vm.missing_requirements()
        if reason:
            unavailable("a Debian root filesystem is needed: " + reason)
        guest_vm.build_image(quiet=True)
    return guest_vm.image_dir() / "disk.raw"


def debian_layout(work: Path) -> Layout:
    """A 3-layer gzip image of the guest's Debian tree: the system without /usr/share, then
    /usr/share, then removals (locales, zoneinfo) and a changed /etc/hostname."""
    disk = guest_root_disk()
    mnt = work / "debian-root"
    mnt.mkdir()
    run("mount", "-o", "ro,loop,noload", disk, mnt)
    try:
        layout = Layout(work / "debian")
        root = layout.rootfs

        def system(rootfs: Path) -> None:
            for entry in sorted(os.listdir(mnt)):
                if entry in ("lost+found", "proc", "sys", "dev", "run", "tmp"):
                    continue
                run("cp", "-a", mnt / entry, rootfs / entry)
            shutil.rmtree(rootfs / "usr" / "share")

        def share(rootfs: Path) -> None:
            run("cp", "-a", mnt / "usr" / "share", rootfs / "usr" / "share")

        def removals(rootfs: Path) -> None:
            for gone in ("usr/share/locale", "usr/share/zoneinfo", "usr/share/i18n"):
                if (rootfs / gone).exists():
                    shutil.rmtree(rootfs / gone)
            (rootfs / "etc" / "hostname").write_text("imported\n")

        layout.layer(system)
        layout.layer(share)
        layout.layer(removals)
        assert root.is_dir()
        return layout
    finally:
        run("umount", mnt)
