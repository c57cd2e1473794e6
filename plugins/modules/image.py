#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image
short_description: Build or pull a composefs image into a store and point a ref at it
version_added: 0.1.0
description:
  - Builds a composefs image from O(src) (a directory on the node, a composefs-dump(5) file, or an existing
    composefs image file) into the object store O(store), stores the file contents it needs as objects, and
    points the ref O(ref) at the image (O(state=present)).
  - Or pulls it from the remote store O(remote), a store directory served as plain files over C(https://) or
    C(http://), or reached as C(file://). The image the remote ref O(remote_ref) names is fetched and its
    fs-verity digest compared to the ref before it is parsed, then only the objects O(store) lacks are
    fetched, O(jobs) at a time, each one's fs-verity digest checked against its name while it streams in;
    the objects are published first, then the image, the ref O(ref) last (as C(composefs-store pull)).
    The TLS and credential options are named as M(ansible.builtin.get_url) names them.
  - The image is byte-identical to what C C(mkcomposefs --digest-store=STORE/objects) 1.0.8 builds from the
    same source with the same options, so its digest can be pinned and compared with images built elsewhere.
  - O(state=absent) removes the ref only (and its signed statement).
  - "Signed refs: with O(trusted_keys), the ref must be signed by one of those keys for the image it names, or nothing
    is changed.  A pull fetches the remote's signed statement (C(signatures/<ref>)) and verifies it before any object
    or image is written, and keeps it in O(store) (a signed pull keeps the ref's name: O(remote_ref) must be O(ref)).
    A build from O(src) must produce exactly the image that the ref's signed statement names: the statement
    O(store) already holds for O(ref), or the signatures file O(signature) (then kept in O(store) once the ref names
    the image).  The image is built and its digest compared before anything is stored; on a mismatch the module
    fails and the ref does not move.  Without O(trusted_keys), a ref the store holds a signed statement for is never
    moved (neither by a pull nor by a build): that would replace a verified image with an unverified one."
  - "Idempotence: the module reports a change only when the ref is created or moved, or when the image or
    any object had to be written into the store.  With O(remote), every run reads the remote's C(meta.json),
    the remote ref and (unless the store has it) the image, and lists which of its objects are in the store;
    a store that has the image, all its objects and the ref naming it is left alone (V(changed=false))."
  - "What an unchanged directory costs: every run scans the whole tree (one C(lstat) and one C(listxattr)
    per entry, plus C(getxattr) per extended attribute, a second C(lstat) per file larger than 64 bytes and
    one of each object the image needs, to see that it is in the store), and hashes the tree's metadata; nothing
    in the store is written when nothing changed.  File contents are not read again: the store's digest cache
    (C(STORE/cache/digests)) maps a file's identity and change state to its fs-verity digest.  The image is
    not built again either: the image memo (C(STORE/cache/images)) maps the tree's metadata, the format
    options and the writer's code to the image already in the store (checked by its fs-verity digest)."
  - "What makes a file be read and hashed again: any change of its device number (C(st_dev)), inode number,
    size, modification time or status change time (C(st_ctime), which the kernel updates on every write,
    truncate, C(chmod), C(chown), C(touch), link count or extended attribute change; a file replaced by
    another one has another inode).  A file whose ctime was less
    than one second old when it was hashed is not cached (it could still be changing), nor is anything when
    O(use_cache=false).  A cache entry is only used when its object is present in the store, so objects
    removed by C(composefs-store gc) are hashed and copied again."
  - "What makes the image change (a new digest, the ref moves): any change in the tree's content, names,
    modes, owners, extended attributes or (without O(use_epoch)) modification times, and a change of
    O(format_version), O(use_epoch), O(xattrs), O(skip_xattrs), O(user_xattrs) or O(skip_devices)."
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  store:
    description:
      - The store directory (created with M(composefs.fleet.store) or C(composefs-store init)).
    type: path
    required: true
  ref:
    description:
      - Name of the ref, a relative name such as C(app/v1); components may not be empty, V(.), V(..) or start
        with a dot.
    type: str
    required: true
  src:
    description:
      - The source on the node; with O(state=present) one of O(src) and O(remote) is required.
      - A directory (its contents are hashed and stored as objects), a composefs-dump(5) file, or a composefs
        image file (stored as it is).
      - Or an OCI container image, named as skopeo names them, C(oci:DIR[:TAG]) (an image layout),
        C(oci-archive:FILE[:TAG]) or C(docker-archive:FILE[:TAG]); its layers are streamed into the store (never
        unpacked to disk), every blob is checked against its digest and the config's C(diff_ids), and
        whiteouts are applied as the OCI image spec says (see O(platform)).
      - The objects a dump or an image refers to must already be in the store, or in O(objects_from).
      - In check mode a O(src) path that does not exist yet (an earlier task of the play would make it) is no error -
        the result says the ref would move, with the digest unknown (null), and warns.
      - Mutually exclusive with O(remote).
    type: path
  platform:
    description:
      - For an OCI O(src) holding images for several platforms, which one, as C(OS/ARCH[/VARIANT]), for example
        C(linux/arm64/v8). By default the node's own.
    type: str
  remote:
    description:
      - Pull the image from this remote store instead of building it from O(src).
      - A URL (V(https://host/path/to/store), V(http://...), V(file:///absolute/path)) naming the directory
        of a store served as plain files (its C(meta.json), C(refs/), C(images/) and C(objects/)), or the name
        of a remote configured in O(store) with C(composefs-store remote add NAME URL) (then its C(ca_path),
        C(client_cert), C(client_key) and user name apply unless given here).
      - Give credentials in O(url_username) and O(url_password) rather than in the URL. A password in the URL
        is used too and is masked in the module's result (as O(url_password) is); messages show URLs without
        credentials.
      - Mutually exclusive with O(src), O(objects_from) and O(expected_digest); the options that filter a
        source tree (O(use_epoch), O(xattrs), O(skip_xattrs), O(user_xattrs), O(skip_devices), O(format_version)) do
        not apply to it.
    type: str
  remote_ref:
    description:
      - The ref to read in O(remote); by default the same name as O(ref).
    type: str
  validate_certs:
    description:
      - With an C(https://) O(remote), check the server's certificate (against O(ca_path) if given, else
        the system's CA certificates) and its host name.
      - V(false) turns both checks off; only for a test setup.
    type: bool
    default: true
  ca_path:
    description:
      - A PEM file (or a directory prepared with C(openssl rehash)) of the CA certificates that sign the
        server's certificate, instead of the system's.
    type: path
  client_cert:
    description:
      - A PEM file with the client certificate to present to the server (and its key, unless O(client_key)
        is given).
    type: path
  client_key:
    description:
      - A PEM file with the private key of O(client_cert) (unencrypted).
    type: path
  url_username:
    description:
      - User name for HTTP basic authentication.
    type: str
  url_password:
    description:
      - Password for HTTP basic authentication (with O(url_username)). Never logged or shown.
    type: str
  headers:
    description:
      - More HTTP headers to send with every request, as a dictionary of header names and values, for example
        an C(Authorization) header with a bearer token.
      - Treated as secret, since they often carry a token; never logged or shown.
    type: dict
  jobs:
    description:
      - How many objects are fetched at once (over as many keep-alive connections).
    type: int
    default: 8
  timeout:
    description:
      - Seconds to wait for a connection and between two reads of a transfer; a transfer that stalls
        longer fails (and is retried, up to 5 times, as other transient errors are).
    type: float
    default: 30
  state:
    description:
      - V(present) builds the image and points O(ref) at it.
      - V(absent) removes O(ref). The image and its objects stay in the store until C(composefs-store gc)
        removes what no ref or mount uses any more.
    type: str
    choices: [present, absent]
    default: present
  format_version:
    description:
      - The lowest composefs format version of the image (C(mkcomposefs --min-version)); V(0) lets the
        writer choose the lowest version that can hold the tree, V(1) forces version 1.
      - Ignored for an image file source, which is stored as it is.
    type: int
    choices: [0, 1]
    default: 0
  use_epoch:
    description:
      - Set every modification time in the image to 0 (C(mkcomposefs --use-epoch)).
    type: bool
    default: false
  xattrs:
    description:
      - Which extended attributes of the source go into the image - V(all), only V(user) ones (C(user.*),
        C(mkcomposefs --user-xattrs)) or V(none) (C(mkcomposefs --skip-xattrs)).
      - Default - V(all), unless the older O(skip_xattrs) or O(user_xattrs) say otherwise.
    type: str
    choices: [all, user, none]
  skip_xattrs:
    description:
      - V(true) is O(xattrs=none) (kept for playbooks written before O(xattrs)).
      - Refused when it contradicts O(xattrs) or O(user_xattrs) (both V(true)); V(false) never contradicts.
    type: bool
    default: false
  user_xattrs:
    description:
      - V(true) is O(xattrs=user) (kept for playbooks written before O(xattrs)).
      - Refused when it contradicts O(xattrs) or O(skip_xattrs) (both V(true)); V(false) never contradicts.
    type: bool
    default: false
  skip_devices:
    description:
      - Leave block and character devices out of the image (C(mkcomposefs --skip-devices)).
    type: bool
    default: false
  expected_digest:
    description:
      - The fs-verity digest (64 hex digits, optionally prefixed with C(sha256:)) the image must have.
      - The image is built and its digest compared before anything is stored; on a mismatch the module fails
        and writes nothing into the store (no object, image or ref).
    type: str
  objects_from:
    description:
      - A digest store directory (C(XX/YYYY...) files, as written by C(mkcomposefs --digest-store)) from which
        objects missing in the store are copied when O(src) is a dump or an image. Each copied object is
        verified against its name.
    type: path
  signature:
    description:
      - With O(src) and O(trusted_keys), a signatures file (as C(composefs-store sign) writes C(signatures/<ref>))
        whose statement names the image that O(src) must build; by default the statement O(store) already holds for
        O(ref).
      - Verified with O(trusted_keys) and O(revoked_keys) (and against the statement O(store) holds, which it must
        not be older than) before anything is built into the store; stored as C(signatures/<ref>) once the ref names
        the image.
      - Mutually exclusive with O(remote).
    type: path
  use_cache:
    description:
      - Use the store's digest cache (see above). V(false) hashes every file on every run.
    type: bool
    default: true
  allow_foreign_owner:
    description:
      - Accept a store whose directory or store subdirectories belong to another user (not the one running the
        module, not root) or are writable by group or others. By default such a store is refused, since whoever
        can write there could swap its contents under the module (see the notes).
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - composefs.fleet.trust
attributes:
  check_mode:
    support: full
    details: A real dry run; the tree is scanned, hashed where needed and the image built in memory (or found
      through the image memo), but nothing under O(store) is written, not even the digest cache.
      With O(remote), the remote ref and the image are read (not stored) to report which objects and how
      many bytes a pull would fetch; no object is fetched.
  diff_mode:
    support: full
    details: The ref's digest before and after; with O(trusted_keys) also the signing time of the ref's statement.
  platform:
    platforms: posix
notes:
  - Options that filter the source (O(use_epoch), O(xattrs), O(skip_xattrs), O(user_xattrs), O(skip_devices)) cannot apply to
    an image file source and make the module fail.
  - In check mode a store that does not exist yet (a missing or empty directory) is treated as an empty store,
    so that a play that creates the store first can be checked.
  - Adds and pulls run under the store's shared lock, so they never overlap a C(composefs-store gc) sweep.
  - A pull that fails (a server that stops, a corrupted object, a full disk) keeps the verified objects it
    fetched, so the next run fetches only what is still missing; the ref is written only after the image and
    all its objects are in the store.
  - Proxies come from the node's C(http_proxy), C(https_proxy) and C(no_proxy) environment variables (set
    them with the task's C(environment)).
  - Like sshd's C(StrictModes), a store owned by another user or writable by group or others is refused unless
    O(allow_foreign_owner=true) (see M(composefs.fleet.store)); this module never creates a store, so a new
    store's mode is chosen by M(composefs.fleet.store) (its O(composefs.fleet.store#module:shared_layout)).
requirements:
  - Python 3.8 or later on the managed node; only the standard library, and the Python package C(cryptography) with
    O(trusted_keys).
seealso:
  - module: composefs.fleet.store
  - module: composefs.fleet.mount
  - module: composefs.fleet.info
  - module: composefs.fleet.verity
  - module: ansible.builtin.get_url
    description: The TLS and credential options have the same names there.
"""

EXAMPLES = r"""
- name: Build the application tree into the store as app/v1
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: app/v1
    src: /srv/build/app

- name: Store an image built elsewhere, only if it is the one we released
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: app/v2
    src: /tmp/app-v2.cfs
    objects_from: /tmp/app-v2-objects
    expected_digest: 0f2b1e4c2e5d9c0a0f7f1f2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7

- name: Reproducible image (all mtimes 0, only user xattrs)
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: base
    src: /srv/rootfs
    use_epoch: true
    xattrs: user
    format_version: 1
  register: base_image

- name: Pull release 2 from the build server's store, fetching only the objects this node lacks
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: app/current
    remote: https://images.example.com/stores/app
    remote_ref: app/v2
    ca_path: /etc/pki/composefs-ca.pem
    url_username: fleet
    url_password: "{{ vault_image_password }}"
  register: pulled

- name: Tell how much a pull would fetch, without fetching
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: app/v3
    remote: https://images.example.com/stores/app
    headers:
      Authorization: "Bearer {{ vault_image_token }}"
  check_mode: true
  register: plan

- name: Pull app/v2 only if a key the node trusts signed it for that image (no key material in the output)
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: app/v2
    remote: https://images.example.com/stores/app
    trusted_keys:
      - /etc/composefs-fleet/keys/trusted.d
    revoked_keys:
      - /etc/composefs-fleet/keys/revoked.d

- name: Build app/v2 on the node; it must be the image the release manager signed
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: app/v2
    src: /srv/build/app
    signature: /srv/build/app-v2.sig
    trusted_keys:
      - "{{ lookup('ansible.builtin.file', 'keys/release.pub') }}"

- name: Drop the old ref (objects go with the next composefs-store gc)
  composefs.fleet.image:
    store: /var/lib/composefs
    ref: app/v0
    state: absent
"""

RETURN = r"""
digest:
  description: The image's fs-verity digest (the ref's target); with O(state=absent) the digest the ref named
    (null if there was no ref); null in check mode when O(src) does not exist yet.
  returned: always
  type: str
  sample: 8d1c2a3f4b5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566
image:
  description: What was built and stored (in check mode, what would be).
  returned: when O(state=present) and O(src) is given
  type: dict
  contains:
    digest:
      description: The image's fs-verity digest.
      type: str
      returned: always
      sample: 8d1c2a3f4b5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566
    ref:
      description: The ref name.
      type: str
      returned: always
      sample: app/v1
    previous_digest:
      description: The digest the ref named before, null if it did not exist (or was damaged).
      type: str
      returned: always
      sample: 3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b
    source_kind:
      description: What O(src) was, V(directory), V(dump) or V(image).
      type: str
      returned: always
      sample: directory
    image_written:
      description: Whether the image file was new in the store (or replaced a damaged one).
      type: bool
      returned: always
      sample: true
    objects:
      description: Number of objects (distinct file contents) the image refers to.
      type: int
      returned: always
      sample: 9000
    objects_written:
      description: Objects that were (check mode, would be) copied into the store.
      type: int
      returned: always
      sample: 12
    bytes_written:
      description: Bytes of those objects.
      type: int
      returned: always
      sample: 1048576
    files_hashed:
      description: Source files that were read and hashed (not found in the digest cache).
      type: int
      returned: always
      sample: 12
    bytes_hashed:
      description: Bytes read for hashing.
      type: int
      returned: always
      sample: 1048576
    cache_hits:
      description: Files whose digest came from the digest cache, without reading them.
      type: int
      returned: always
      sample: 8988
    signature:
      description: With O(trusted_keys), what the verified statement says; null otherwise.
      type: dict
      returned: always
      contains:
        keys:
          description: Ids (sha256 of the raw public key, hex) of the trusted keys whose signatures verified.
          type: list
          elements: str
          sample: [3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29]
        signed:
          description: The statement's signing time (UTC).
          type: str
          sample: "2026-12-04T14:40:29Z"
        expires:
          description: The statement's expiry (UTC), null if it has none.
          type: str
          sample: "2027-01-01T00:00:00Z"
    signature_written:
      description: Whether the O(signature) file was (check mode, would be) stored as the ref's statement.
      type: bool
      returned: always
      sample: true
pull:
  description: What the pull found and fetched (in check mode, what it would fetch).
  returned: when O(remote) is given
  type: dict
  contains:
    url:
      description: The remote's URL (without credentials).
      type: str
      returned: always
      sample: https://images.example.com/stores/app
    remote_ref:
      description: The ref read in the remote.
      type: str
      returned: always
      sample: app/v2
    ref:
      description: The ref set in O(store).
      type: str
      returned: always
      sample: app/current
    digest:
      description: The image's fs-verity digest (what the remote ref names).
      type: str
      returned: always
      sample: 8d1c2a3f4b5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566
    previous_digest:
      description: The digest O(ref) named before, null if it did not exist (or was damaged).
      type: str
      returned: always
      sample: 3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b
    objects:
      description: Number of objects the image refers to.
      type: int
      returned: always
      sample: 9000
    objects_missing:
      description: Objects the store lacked (or had with the wrong size) before the pull; what a pull fetches.
      type: int
      returned: always
      sample: 12
    bytes_missing:
      description: Bytes of those objects.
      type: int
      returned: always
      sample: 1048576
    objects_fetched:
      description: Objects fetched and published by this run (0 in check mode).
      type: int
      returned: always
      sample: 12
    bytes_fetched:
      description: Bytes of those objects.
      type: int
      returned: always
      sample: 1048576
    image_fetched:
      description: Whether the image file was fetched and stored by this run (false in check mode).
      type: bool
      returned: always
      sample: true
    signature:
      description: With O(trusted_keys), what the remote's verified statement says (as RV(image.signature)); null
        without.
      type: dict
      returned: always
      sample: {"keys": ["3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"],
               "signed": "2026-12-04T14:40:29Z", "expires": null}
    verify_seconds:
      description: Seconds the signature check took (0 without O(trusted_keys)).
      type: float
      returned: always
      sample: 0.0004
    image_signature:
      description: Whether the remote has the image's fs-verity built-in signature (C(images/<digest>.sig)).
      type: bool
      returned: always
      sample: true
    image_signed:
      description:
        - Whether this run stored that signature (with the image, or given to the kernel for an image already in
          O(store)); false in check mode.
      type: bool
      returned: always
      sample: true
removed:
  description: Whether the ref was (check mode, would be) removed.
  returned: when O(state=absent)
  type: bool
  sample: true
"""

import os
import shutil
import tempfile
from contextlib import nullcontext
from urllib.parse import unquote, urlsplit

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs.errors import ComposefsError, RefNotFound, RemoteError, SignatureError, StoreError
from ..module_utils.composefs.oci_source import is_oci_source
from ..module_utils.composefs.ref_statement import MAX_SIGNATURES_BYTES
from ..module_utils.composefs.ref_trust import verify_signature_bytes
from ..module_utils.composefs.remote_options import RemoteOptions, is_url
from ..module_utils.composefs.safe_dirs import UnsafePathError, open_regular
from ..module_utils.composefs.store import Store
from ..module_utils.composefs.store_names import parse_digest, split_ref_name
from ..module_utils.composefs.store_add import DigestMismatch, add_image
from ..module_utils.composefs.store_signatures import read_signatures, write_signatures
from ..module_utils.composefs.trust_options import load_policy, ref_name, signed_time, statement_info

_RESULT_KEYS = ("digest", "ref", "source_kind", "image_written", "objects", "objects_written", "bytes_written",
                "files_hashed", "bytes_hashed", "cache_hits")


def _not_created(location):
    """True if ``location`` is no store yet but the store module would create one there."""
    if os.path.lexists(os.path.join(location, "meta.json")):
        return False
    if not os.path.lexists(location):
        return True
    return os.path.isdir(location) and not os.path.islink(location) and not os.listdir(location)


_PULL_KEYS = ("url", "remote_ref", "ref", "digest", "objects", "objects_missing", "bytes_missing",
              "objects_fetched", "bytes_fetched", "image_fetched", "signature", "verify_seconds", "image_signature",
              "image_signed")
#: Options that shape an image built from src; a pulled image is taken as it is.
_SRC_ONLY = ("format_version", "use_epoch", "xattrs", "skip_xattrs", "user_xattrs", "skip_devices")


def xattr_choice(params):
    """The one xattrs choice (all, user, none) of ``xattrs``, ``skip_xattrs`` and ``user_xattrs``;
    ValueError naming the options when their values contradict (a V(false) never does)."""
    implied = [name for name, value in (("skip_xattrs", "none"), ("user_xattrs", "user")) if params[name]]
    if len(implied) == 2:
        raise ValueError("skip_xattrs: true and user_xattrs: true contradict each other (use xattrs: none or user)")
    choice = params["xattrs"]
    if implied:
        wanted = "none" if implied[0] == "skip_xattrs" else "user"
        if choice is not None and choice != wanted:
            raise ValueError("%s: true means xattrs: %s, which contradicts xattrs: %s" % (implied[0], wanted, choice))
        return wanted
    return choice or "all"


def _planned_store(module, location):
    """True (with a warning) in check mode when the store is still to be created by an earlier task."""
    if module.check_mode and _not_created(location):
        module.warn("store %s does not exist yet; the check assumes an empty store" % location)
        return True
    return False


def _open_store(module, params):
    if _planned_store(module, params["store"]):
        return Store(params["store"], notice=None, allow_foreign=params["allow_foreign_owner"])
    return Store.open(params["store"], notice=None, allow_foreign=params["allow_foreign_owner"])


def _ref_diff(ref, before, after, signed=None):
    """The ref's digest before and after; with trust (``signed``: (before, after) signing times) also those."""
    out = {"before": {"ref": ref, "digest": before}, "after": {"ref": ref, "digest": after}}
    if signed is not None:
        out["before"]["signed"], out["after"]["signed"] = signed
    return out


def _remote_options(params):
    headers = params["headers"] or {}
    return RemoteOptions(
        validate_certs=params["validate_certs"], ca_path=params["ca_path"], client_cert=params["client_cert"],
        client_key=params["client_key"], username=params["url_username"], password=params["url_password"],
        # YAML may give a number or a bool as a header's value: it is sent as text.
        headers=dict((str(name), value if isinstance(value, str) else str(value)) for name, value in headers.items()),
        timeout=params["timeout"])


def _pull(module, params, policy):
    location = params["store"]
    held = None
    if _planned_store(module, location):
        if not is_url(params["remote"]):
            module.fail_json(msg="store %s does not exist yet, so it has no remote named %s; give a URL"
                                 % (location, params["remote"]))
        # A dry run reads the store, so it needs one: an empty throw-away store answers as the new one would.
        scratch = tempfile.mkdtemp(prefix="composefs-image-check.")
        try:
            store = Store.init(os.path.join(scratch, "store"), notice=None)[0]
            with store:
                result = _pull_into(store, params, policy, dry_run=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        store = Store.open(location, notice=None, allow_foreign=params["allow_foreign_owner"])
        if policy is not None:
            held = read_signatures(store, params["ref"])
        result = _pull_into(store, params, policy, dry_run=module.check_mode)
    info = dict((key, getattr(result, key)) for key in _PULL_KEYS)
    info["previous_digest"] = result.previous
    out = dict(changed=bool(result.changed), digest=result.digest, pull=info)
    if module._diff:
        signed = None
        if policy is not None:
            signed = (signed_time(held, params["ref"]), (result.signature or {}).get("signed"))
        out["diff"] = _ref_diff(params["ref"], result.previous, result.digest, signed)
    return out


def _pull_into(store, params, policy, dry_run):
    # Imported here: a local build (the everyday no-change run) need not load the pull code.
    from ..module_utils.composefs.pull import pull

    return pull(store, params["remote"], params["remote_ref"] or params["ref"], ref=params["ref"],
                options=_remote_options(params), jobs=params["jobs"], dry_run=dry_run, trust=policy)


def _read_signature_file(path):
    """The bytes of the ``signature`` option's file (a regular file, at most what a signatures file may be)."""
    try:
        fd = open_regular(path)
    except (UnsafePathError, OSError) as exc:
        raise StoreError("signature %s: %s" % (path, getattr(exc, "strerror", None) or exc)) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_SIGNATURES_BYTES + 1)
    if len(data) > MAX_SIGNATURES_BYTES:
        raise StoreError("signature %s: larger than %d bytes; not a signatures file" % (path, MAX_SIGNATURES_BYTES))
    return data


def _signed_build(store, params, policy):
    """(statement, its signatures file if it is to be stored, the one the store holds) for a build from src.

    Verified before anything is built: the build must then produce the
    image the statement names (add_image's expected digest).
    """
    ref = params["ref"]
    held = read_signatures(store, ref)
    if params["signature"] is None:
        statement = verify_signature_bytes(held, ref, policy)
        return statement, None, held
    data = _read_signature_file(params["signature"])
    statement = verify_signature_bytes(data, ref, policy, held=held, shown="signature %s" % params["signature"])
    return statement, (None if data == held else data), held


def _unsigned_build_guard(store, ref, expected):
    """The digest a build without trusted_keys must produce: a signed ref is never moved by one (as a pull).

    With a statement in the store for ``ref``, the build may only confirm the
    image the ref names (``expected`` otherwise, None: any).
    """
    current = store.read_ref_or_none(ref)
    if current is None or read_signatures(store, ref) is None:
        return expected
    if expected is not None and expected != current:
        raise _unsigned_move(ref, expected)
    return current


def _unsigned_move(ref, digest):
    return SignatureError(ref_name(ref), "unsigned", "this store holds a signed statement for the ref (signatures/%s): "
                          "a build without trusted_keys would move it to the unverified image %s; give trusted_keys "
                          "(and signature, the new image's statement)" % (ref_name(ref), digest))


def _present(module, params, policy):
    if params["remote"] is not None:
        return _pull(module, params, policy)
    store = _open_store(module, params)
    if module.check_mode and not is_oci_source(params["src"]) and not os.path.lexists(params["src"]):
        return _src_to_be_made(module, store, params)
    expected = params["expected_digest"]
    statement = new_signature = held = None
    if policy is not None:
        statement, new_signature, held = _signed_build(store, params, policy)
        if expected is not None and expected != statement.image:
            raise SignatureError(ref_name(params["ref"]), "wrong-image", "the statement vouches for image %s, "
                                 "expected_digest is %s" % (statement.image, expected))
        expected = statement.image
    else:
        expected = _unsigned_build_guard(store, params["ref"], expected)
    try:
        result = add_image(
            store, params["src"], params["ref"],
            use_epoch=params["use_epoch"], skip_devices=params["skip_devices"],
            skip_xattrs=params["_xattrs"] == "none", user_xattrs=params["_xattrs"] == "user",
            use_cache=params["use_cache"], objects_from=params["objects_from"],
            min_version=params["format_version"], max_version=1, expected_digest=expected,
            dry_run=module.check_mode, platform=params["platform"])
    except DigestMismatch as exc:
        if statement is None:
            if params["expected_digest"] is None:  # the guard's digest: the signed ref would have moved
                raise _unsigned_move(params["ref"], exc.actual) from None
            raise
        raise SignatureError(ref_name(params["ref"]), "wrong-image", "the statement vouches for image %s, the "
                             "image built from %s is %s: nothing was stored, the ref was not moved"
                             % (statement.image, params["src"], exc.actual)) from None
    if new_signature is not None and not module.check_mode:
        # After the ref, as a pull does not: add_image publishes objects, image and ref in one
        # call. A failure in between leaves the ref with its old statement, which the agent reports
        # (wrong image); the next run stores this one.
        with store.lock.shared():
            write_signatures(store, params["ref"], new_signature)
    changed = (result.previous != result.digest or result.image_written or result.objects_written > 0
               or new_signature is not None)
    image = dict((key, getattr(result, key)) for key in _RESULT_KEYS)
    image["previous_digest"] = result.previous
    image["signature"] = None if statement is None else statement_info(statement)
    image["signature_written"] = new_signature is not None
    out = dict(changed=bool(changed), digest=result.digest, image=image)
    if module._diff:
        signed = None if statement is None else (signed_time(held, params["ref"]), statement_info(statement)["signed"])
        out["diff"] = _ref_diff(params["ref"], result.previous, result.digest, signed)
    return out


def _src_to_be_made(module, store, params):
    """Check mode before an earlier task has made ``src`` (a fresh node): the ref would move to an image
    whose digest cannot be known yet."""
    module.warn("src %s does not exist yet (check mode): the image would be built from it, its digest is not known "
                "before" % params["src"])
    previous = store.read_ref_or_none(params["ref"])
    image = dict((key, None) for key in _RESULT_KEYS)
    image.update(ref=params["ref"], previous_digest=previous, signature=None, signature_written=False)
    out = dict(changed=True, digest=None, image=image)
    if module._diff:
        out["diff"] = _ref_diff(params["ref"], previous, None)
    return out


def _absent(module, params):
    location = params["store"]
    ref = params["ref"]
    previous = None
    if not _not_created(location):  # else: no store, no ref
        store = Store.open(location, notice=None, allow_foreign=params["allow_foreign_owner"])
        with store.lock.shared() if not module.check_mode else nullcontext():
            try:
                previous = store.read_ref(ref)
            except RefNotFound:
                previous = None
            if previous is not None and not module.check_mode:
                store.remove_ref(ref)
    out = dict(changed=previous is not None, removed=previous is not None, digest=previous)
    if module._diff:
        out["diff"] = _ref_diff(ref, previous, None)
    return out


def _hide_url_password(module, remote):
    """A password written into the URL is masked wherever the result shows it, as url_password is."""
    try:
        password = urlsplit(remote).password
    except ValueError:
        return  # not a URL the pull accepts either: its own error says so
    if password:
        module.no_log_values.add(password)
        module.no_log_values.add(unquote(password))


def main():
    module = AnsibleModule(
        argument_spec=dict(
            store=dict(type="path", required=True),
            ref=dict(type="str", required=True),
            src=dict(type="path"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            format_version=dict(type="int", default=0, choices=[0, 1]),
            use_epoch=dict(type="bool", default=False),
            xattrs=dict(type="str", choices=["all", "user", "none"]),
            skip_xattrs=dict(type="bool", default=False),
            user_xattrs=dict(type="bool", default=False),
            skip_devices=dict(type="bool", default=False),
            expected_digest=dict(type="str"),
            objects_from=dict(type="path"),
            signature=dict(type="path"),
            trusted_keys=dict(type="list", elements="str", no_log=True),
            revoked_keys=dict(type="list", elements="str", no_log=True),
            use_cache=dict(type="bool", default=True),
            allow_foreign_owner=dict(type="bool", default=False),
            platform=dict(type="str"),
            remote=dict(type="str"),
            remote_ref=dict(type="str"),
            validate_certs=dict(type="bool", default=True),
            ca_path=dict(type="path"),
            client_cert=dict(type="path"),
            client_key=dict(type="path", no_log=False),
            url_username=dict(type="str"),
            url_password=dict(type="str", no_log=True),
            headers=dict(type="dict", no_log=True),
            jobs=dict(type="int", default=8),
            timeout=dict(type="float", default=30.0),
        ),
        required_if=[("state", "present", ["src", "remote"], True)],
        mutually_exclusive=[("src", "remote"), ("objects_from", "remote"),
                            ("expected_digest", "remote"), ("signature", "remote")],
        required_by={"signature": "trusted_keys"},
        supports_check_mode=True,
    )
    params = module.params
    try:
        params["_xattrs"] = xattr_choice(params)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    if params["remote"] is not None:
        _hide_url_password(module, params["remote"])
        given = [name for name in _SRC_ONLY if params[name] != module.argument_spec[name].get("default")]
        if given:
            module.fail_json(msg="%s shape%s an image built from src; a pulled image is stored as the remote "
                                 "has it" % (", ".join(given), "" if len(given) > 1 else "s"))
    if params["platform"] is not None and not is_oci_source(params["src"]):
        module.fail_json(msg="platform applies to an OCI src (oci:, oci-archive:, docker-archive:)")
    expected = params["expected_digest"]
    if expected is not None:
        expected = parse_digest(expected)
        if expected is None:
            module.fail_json(msg="expected_digest must be 64 hexadecimal digits (an fs-verity sha256 digest, "
                                 "optionally prefixed with sha256:), not %r" % params["expected_digest"])
        params["expected_digest"] = expected
    try:
        split_ref_name(params["ref"])
        if params["state"] == "present":
            out = _present(module, params, load_policy(params["trusted_keys"], params["revoked_keys"], module.tmpdir))
        else:
            out = _absent(module, params)
    except SignatureError as exc:
        # Nothing was published: the statement is checked before the image, objects or ref are written.
        module.fail_json(msg=str(exc), reason=exc.reason)
    except RemoteError as exc:
        # The message names the URL (without credentials) and what failed.
        module.fail_json(msg="pull: %s" % exc, url=exc.url)
    except StoreError as exc:
        msg = str(exc)
        if "not a composefs store" in msg:
            msg += " (or use the composefs.fleet.store module)"
        extra = {}
        actual = getattr(exc, "actual", None)
        if actual is not None:
            extra["digest"] = actual
        module.fail_json(msg=msg, **extra)
    except ComposefsError as exc:
        module.fail_json(msg="%s: %s" % (params.get("src") or params["store"], exc))
    except OSError as exc:
        where = exc.filename if exc.filename is not None else params.get("src") or params["store"]
        module.fail_json(msg="%s: %s" % (where, exc.strerror or exc))
    module.exit_json(**out)


if __name__ == "__main__":
    main()
