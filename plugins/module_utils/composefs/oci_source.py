# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""OCI image sources: where the blobs are, which manifest a tag names, every blob checked.

Sources, as skopeo names them:

* ``oci:DIR[:TAG]``: an OCI image layout (``oci-layout``, ``index.json``,
  ``blobs/<alg>/<hex>``);
* ``oci-archive:FILE[:TAG]``: a tar of such a layout (read in place);
* ``docker-archive:FILE[:TAG]``: what ``docker save`` writes
  (``manifest.json`` with ``Config``, ``RepoTags`` and ``Layers``).

A tag resolves through ``index.json`` (the annotation
``org.opencontainers.image.ref.name``), through nested indexes, and by
platform (default: this machine's).  Every JSON blob is read at most
:data:`MAX_JSON_BLOB` bytes and checked against its descriptor's digest and
size before it is parsed; layers are checked while they stream
(:class:`VerifiedReader`).  Nothing here writes anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform as _platform
import re
import stat
import tarfile
from typing import Any, BinaryIO, Dict, List, Optional, Set, Tuple

from .errors import StoreError

MAX_JSON_BLOB = 4 << 20
MAX_INDEX_DEPTH = 8

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
#: Layer media type -> compression ("" = plain tar).
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
}
REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm",
             "armv6l": "arm", "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
             "riscv64": "riscv64"}
KINDS = ("oci", "oci-archive", "docker-archive")


class OciError(StoreError):
    """An OCI source that cannot be used: the message names the source and the blob or file."""


def is_oci_source(source: Any) -> bool:
    return isinstance(source, str) and source.split(":", 1)[0] in KINDS and ":" in source


def parse_source(source: str) -> Tuple[str, str, Optional[str]]:
    """(kind, path, tag or None) of ``oci:DIR[:TAG]`` and the archive forms."""
    kind, _sep, rest = source.partition(":")
    if kind not in KINDS or not rest:
        raise OciError("%r: an OCI source is oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:TAG]"
                       % source[:200])
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not path:
        path, tag = rest, ""
    return kind, path, tag or None


class Descriptor:
    """An OCI descriptor, checked: media type, sha256 digest, size."""

    __slots__ = ("media_type", "digest", "size", "platform", "annotations")

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise OciError("%s: a descriptor must be a JSON object" % where)
        self.media_type = doc.get("mediaType")
        self.digest = doc.get("digest")
        self.size = doc.get("size")
        if not isinstance(self.media_type, str):
            raise OciError("%s: descriptor without a mediaType" % where)
        if not isinstance(self.digest, str) or not _DIGEST.match(self.digest):
            raise OciError("%s: descriptor digest %r is not sha256:<64 lowercase hex> (other algorithms "
                           "are not supported)" % (where, self.digest))
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise OciError("%s: descriptor of %s has no valid size" % (where, self.digest))
        self.platform = doc.get("platform") if isinstance(doc.get("platform"), dict) else None
        self.annotations = doc.get("annotations") if isinstance(doc.get("annotations"), dict) else {}


class VerifiedReader(io.RawIOBase):
    """A blob read once, front to back: at its end its sha256 and size must be the descriptor's."""

    def __init__(self, raw: BinaryIO, digest: Optional[str], size: int, shown: str, name: str = "") -> None:
        super().__init__()
        self._raw = raw
        self._digest = name or digest
        self._expected = digest
        self._size = size
        self._shown = shown
        self._hash = hashlib.sha256()
        self._got = 0
        self.checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf)
        want = min(len(view), self._size + 1 - self._got)  # one byte more than declared: a longer blob
        if want <= 0:
            self._finish()
            return 0
        data = self._raw.read(want)
        n = len(data)
        view[:n] = data
        if n:
            self._hash.update(data)
            self._got += n
            if self._got > self._size:
                raise OciError("%s: blob %s is larger than its descriptor's %d bytes" % (self._shown, self._digest, self._size))
        else:
            self._finish()
        return n

    def _finish(self) -> None:
        if self.checked:
            return
        if self._got != self._size:
            raise OciError("%s: blob %s is truncated: %d of %d bytes" % (self._shown, self._digest, self._got, self._size))
        actual = "sha256:" + self._hash.hexdigest()
        if self._expected is not None and actual != self._expected:
            raise OciError("%s: blob %s has digest %s: corrupted or replaced" % (self._shown, self._digest, actual))
        self.checked = True

    def drain(self) -> None:
        """Read what is left, so that the whole blob is checked."""
        while self.read(1 << 20):
            pass
        self._finish()


class Image:
    """A resolved image: its manifest and config (checked), and its layers in order."""

    def __init__(self, source: str, manifest: Descriptor, config: Descriptor, config_doc: Dict[str, Any],
                 layers: List[Descriptor], diff_ids: List[str]) -> None:
        self.source = source
        self.manifest = manifest
        self.config = config
        self.config_doc = config_doc
        self.layers = layers
        self.diff_ids = diff_ids


class BlobSource:
    """Where blobs are read from; subclasses: a layout directory, a layout archive, a docker archive."""

    def __init__(self, shown: str) -> None:
        self.shown = shown

    def open_file(self, name: str) -> Optional[BinaryIO]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def open_blob(self, desc: Descriptor) -> VerifiedReader:
        if isinstance(desc, DockerLayer):
            # Checked by its diff_id (the uncompressed stream's digest) and its size.
            name, digest = desc.path, None
        else:
            name, digest = "blobs/sha256/" + desc.digest.split(":", 1)[1], desc.digest
        raw = self.open_file(name)
        if raw is None:
            raise OciError("%s: blob %s is missing (%s)" % (self.shown, desc.digest, name))
        return VerifiedReader(raw, digest, desc.size, self.shown, name=desc.digest)

    def read_json_blob(self, desc: Descriptor, what: str) -> Dict[str, Any]:
        if desc.size > MAX_JSON_BLOB:
            raise OciError("%s: %s %s is %d bytes; more than %d is not a %s" % (self.shown, what, desc.digest, desc.size,
                                                                                MAX_JSON_BLOB, what))
        reader = self.open_blob(desc)
        data = reader.read(desc.size + 1)
        reader.drain()
        return _json(data, "%s: %s %s" % (self.shown, what, desc.digest))

    def read_json_file(self, name: str) -> Dict[str, Any]:
        raw = self.open_file(name)
        if raw is None:
            raise OciError("%s: no %s: not an OCI image layout" % (self.shown, name))
        data = raw.read(MAX_JSON_BLOB + 1)
        if len(data) > MAX_JSON_BLOB:
            raise OciError("%s: %s is larger than %d bytes" % (self.shown, name, MAX_JSON_BLOB))
        return _json(data, "%s: %s" % (self.shown, name))


def _json(data: bytes, shown: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise OciError("%s: not valid JSON: %s" % (shown, exc)) from None
    except RecursionError:
        raise OciError("%s: JSON nested too deeply" % shown) from None


class LayoutDir(BlobSource):
    """An OCI image layout directory; no symlink inside it is followed."""

    def __init__(self, path: str, shown: str) -> None:
        super().__init__(shown)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OciError("%s: %s" % (shown, exc.strerror or exc)) from None

    def open_file(self, name: str) -> Optional[BinaryIO]:
        parts = name.split("/")
        fd = os.dup(self._fd)
        try:
            for part in parts[:-1]:
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    raise OciError("%s: %s: %s (a symbolic link or not a directory: refused)" % (self.shown, part, exc.strerror)) from None
                os.close(fd)
                fd = nfd
            try:
                ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise OciError("%s: %s: %s (a symbolic link is refused)" % (self.shown, name, exc.strerror)) from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(ffd).st_mode):
            os.close(ffd)
            raise OciError("%s: %s is not a regular file" % (self.shown, name))
        return os.fdopen(ffd, "rb", buffering=1 << 20)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TarArchive(BlobSource):
    """A tar holding a layout (oci-archive) or a docker save (docker-archive), read in place."""

    def __init__(self, path: str, shown: str) -> None:
        super().__init__(shown)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise OciError("%s: %s" % (shown, exc.strerror or exc)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OciError("%s: not a regular file" % shown)
        self._file = os.fdopen(fd, "rb")
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:")
            self._members: Dict[str, tarfile.TarInfo] = {}
            for member in self._tar.getmembers():
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                self._members[name] = member
        except (tarfile.TarError, EOFError) as exc:
            self._file.close()
            raise OciError("%s: not a readable tar archive: %s" % (shown, exc)) from None

    def open_file(self, name: str) -> Optional[BinaryIO]:
        member = self._members.get(name)
        if member is None:
            return None
        if not member.isreg():
            raise OciError("%s: %s is not a regular file in the archive" % (self.shown, name))
        return self._tar.extractfile(member)

    def member_size(self, name: str) -> Optional[int]:
        """The size of a regular member, None if there is none of that name."""
        member = self._members.get(name)
        return member.size if member is not None and member.isreg() else None

    def close(self) -> None:
        self._file.close()


def this_platform() -> Tuple[str, str, Optional[str]]:
    machine = _platform.machine().lower()
    arch = _MACHINES.get(machine, machine)
    variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine)
    return "linux", arch, variant


def parse_platform(text: Optional[str]) -> Tuple[str, str, Optional[str]]:
    """``os/arch[/variant]``; None: this machine's."""
    if text is None:
        return this_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise OciError("platform %r: expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8" % text)
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def open_source(source: str) -> Tuple[BlobSource, str, Optional[str]]:
    kind, path, tag = parse_source(source)
    shown = "%s:%s" % (kind, path)
    if kind == "oci":
        return LayoutDir(path, shown), kind, tag
    return TarArchive(path, shown), kind, tag


def resolve(blobs: BlobSource, kind: str, tag: Optional[str], platform: Optional[str] = None) -> Image:
    """The image ``tag`` names in ``blobs`` (for the platform), its manifest and config checked."""
    if kind == "docker-archive":
        return _resolve_docker(blobs, tag)
    layout = blobs.read_json_file("oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise OciError("%s: oci-layout has imageLayoutVersion %r; 1.0.0 is supported"
                       % (blobs.shown, layout.get("imageLayoutVersion")))
    index = blobs.read_json_file("index.json")
    want = parse_platform(platform)
    found = _manifests(blobs, index, "index.json", tag, want, set(), 0)
    if not found:
        tags = sorted(_tags(index))
        raise OciError("%s: no image %sfor %s in index.json%s" % (
            blobs.shown, "tagged %r " % tag if tag else "", "/".join(p for p in want if p),
            " (tags: %s)" % ", ".join(tags) if tags else ""))
    if len(found) > 1:
        raise OciError("%s: %d images match%s; name one with :TAG (tags: %s)" % (
            blobs.shown, len(found), " %r" % tag if tag else "", ", ".join(sorted(_tags(index))) or "none"))
    desc = found[0]
    manifest = blobs.read_json_blob(desc, "manifest")
    image = _image_of_manifest(blobs, desc, manifest)
    if platform is not None and desc.platform is None:
        # A single-platform image says its platform in its config only: a platform asked for must match it.
        have = (image.config_doc.get("os"), image.config_doc.get("architecture"), image.config_doc.get("variant"))
        if have[:2] != want[:2] or (want[2] is not None and have[2] not in (None, want[2])):
            raise OciError("%s: the image%s is for %s, not %s" % (
                blobs.shown, " tagged %r" % tag if tag else "", "/".join(str(p) for p in have if p), platform))
    return image


def _tags(index: Dict[str, Any]) -> Set[str]:
    out = set()
    for doc in index.get("manifests") or []:
        if isinstance(doc, dict) and isinstance(doc.get("annotations"), dict):
            name = doc["annotations"].get(REF_NAME)
            if isinstance(name, str):
                out.add(name)
    return out


def _manifests(blobs: BlobSource, index: Dict[str, Any], where: str, tag: Optional[str],
               want: Tuple[str, str, Optional[str]], seen: Set[str], depth: int) -> List[Descriptor]:
    if depth > MAX_INDEX_DEPTH:
        raise OciError("%s: indexes nested more than %d deep at %s" % (blobs.shown, MAX_INDEX_DEPTH, where))
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise OciError("%s: %s has no \"manifests\" list" % (blobs.shown, where))
    out = []
    for number, doc in enumerate(entries):
        desc = Descriptor(doc, "%s: %s manifests[%d]" % (blobs.shown, where, number))
        if tag is not None and depth == 0 and desc.annotations.get(REF_NAME) != tag:
            continue
        if desc.platform is not None and not _platform_matches(desc.platform, want):
            continue
        if desc.media_type in INDEX_TYPES:
            if desc.digest in seen:
                raise OciError("%s: index %s refers to itself (a loop)" % (blobs.shown, desc.digest))
            nested = blobs.read_json_blob(desc, "index")
            out += _manifests(blobs, nested, "index " + desc.digest, None, want, seen | {desc.digest}, depth + 1)
        elif desc.media_type in MANIFEST_TYPES:
            out.append(desc)
    return out


def _platform_matches(doc: Dict[str, Any], want: Tuple[str, str, Optional[str]]) -> bool:
    if doc.get("os") != want[0] or doc.get("architecture") != want[1]:
        return False
    return want[2] is None or doc.get("variant") in (None, want[2])


def _image_of_manifest(blobs: BlobSource, desc: Descriptor, manifest: Dict[str, Any]) -> Image:
    where = "%s: manifest %s" % (blobs.shown, desc.digest)
    media = manifest.get("mediaType", desc.media_type)
    if media not in MANIFEST_TYPES:
        raise OciError("%s: media type %r is not an image manifest" % (where, media))
    config = Descriptor(manifest.get("config"), where + " config")
    layers_doc = manifest.get("layers")
    if not isinstance(layers_doc, list):
        raise OciError("%s: no \"layers\" list" % where)
    layers = [Descriptor(doc, "%s layers[%d]" % (where, i)) for i, doc in enumerate(layers_doc)]
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise OciError("%s: layer %s has media type %r, not a tar layer this tool reads"
                           % (where, layer.digest, layer.media_type))
    config_doc = blobs.read_json_blob(config, "config")
    diff_ids = _diff_ids(config_doc, "%s: config %s" % (blobs.shown, config.digest), len(layers))
    return Image(blobs.shown, desc, config, config_doc, layers, diff_ids)


def _diff_ids(config: Dict[str, Any], where: str, count: int) -> List[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) and _DIGEST.match(i) for i in ids):
        raise OciError("%s: rootfs.diff_ids must be a list of sha256 digests" % where)
    if len(ids) != count:
        raise OciError("%s: %d diff_ids for %d layers" % (where, len(ids), count))
    return list(ids)


def _resolve_docker(blobs: BlobSource, tag: Optional[str]) -> Image:
    manifest = blobs.read_json_file("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise OciError("%s: manifest.json must be a non-empty list" % blobs.shown)
    chosen = []
    for entry in manifest:
        if not isinstance(entry, dict):
            raise OciError("%s: manifest.json entries must be objects" % blobs.shown)
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list):
            raise OciError("%s: manifest.json \"RepoTags\" must be a list" % blobs.shown)
        if tag is None or tag in tags or any(t.rsplit(":", 1)[-1] == tag for t in tags if isinstance(t, str)):
            chosen.append(entry)
    if len(chosen) != 1:
        raise OciError("%s: %s images match%s in manifest.json; name one with :TAG" % (
            blobs.shown, len(chosen) or "no", " %r" % tag if tag else ""))
    entry = chosen[0]
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list) or \
            not all(isinstance(n, str) for n in layer_names):
        raise OciError("%s: manifest.json entry needs \"Config\" and \"Layers\"" % blobs.shown)
    raw = blobs.open_file(config_name)
    if raw is None:
        raise OciError("%s: config %s is missing" % (blobs.shown, config_name))
    data = raw.read(MAX_JSON_BLOB + 1)
    if len(data) > MAX_JSON_BLOB:
        raise OciError("%s: config %s is too large" % (blobs.shown, config_name))
    config_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    config = Descriptor({"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest,
                         "size": len(data)}, blobs.shown)
    config_doc = _json(data, "%s: config %s" % (blobs.shown, config_name))
    diff_ids = _diff_ids(config_doc, "%s: config %s" % (blobs.shown, config_name), len(layer_names))
    layers = []
    for name, diff_id in zip(layer_names, diff_ids):
        size = blobs.member_size(name) if isinstance(blobs, TarArchive) else None
        if size is None:
            raise OciError("%s: layer %s is missing" % (blobs.shown, name))
        # docker save writes uncompressed layers: the diff_id is the blob's own digest.
        layers.append(DockerLayer(name, diff_id, size))
    manifest_bytes = json.dumps(entry, sort_keys=True).encode()
    manifest_desc = Descriptor({"mediaType": MANIFEST_TYPES[1], "digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
                                "size": len(manifest_bytes)}, blobs.shown)
    return Image(blobs.shown, manifest_desc, config, config_doc, layers, diff_ids)  # type: ignore[arg-type]


class DockerLayer(Descriptor):
    """A docker-archive layer: a file in the archive, named by path; its digest is its diff_id."""

    __slots__ = ("path",)

    def __init__(self, path: str, diff_id: str, size: int) -> None:
        super().__init__({"mediaType": "application/vnd.docker.image.rootfs.diff.tar", "digest": diff_id, "size": size},
                         path)
        self.path = path


__all__ = ["Descriptor", "Image", "KINDS", "LAYER_TYPES", "OciError", "VerifiedReader", "is_oci_source",
           "open_source", "parse_platform", "parse_source", "resolve"]
