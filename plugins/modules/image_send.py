#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image_send
short_description: Send an image from a store on the controller to a node's store, only the objects it lacks
version_added: 0.1.0
description:
  - Makes the ref O(ref) in the node's store O(store) name the image that O(from_ref) names in the store
    O(from_store) on the Ansible controller, for nodes that cannot reach any server (see
    M(composefs.fleet.image) with O(composefs.fleet.image#module:remote) for nodes that can).
  - "How: the controller sends the image (small) in a first transfer; the node checks its fs-verity digest
    against the ref and says which objects its store lacks.  Only those objects travel, packed into bundle files
    (plain tar files) of at most O(batch_size) bytes each, one transfer per bundle file, not one per object.  A
    second module run on the node then pulls from the bundles exactly as C(composefs-store pull) pulls from a
    server: every object's fs-verity digest is computed while it is copied into a staged file and compared with
    its name and its size with the image's, objects are published durably, then the image, and the ref last,
    all under the store's lock.  Nothing unverified is published; a node never has a ref whose objects are
    missing or wrong."
  - The bundle files are written into the controller's local temporary directory one at a time (each removed
    once sent) and into the node's remote temporary directory, which is removed at the end.
  - "Idempotence: when the ref already names the image and the node's store has the image and all its objects,
    nothing but the image is sent and the task reports no change."
  - "Signed refs: the image's bundle file also carries the controller's signed statement of the ref
    (C(signatures/<ref>)) and the image's fs-verity signature (C(images/<digest>.sig)) when the controller's store
    has them.  With O(trusted_keys), the node verifies the statement as a pull does, before anything is written,
    and keeps it with the ref; a signed ref keeps its name (O(from_ref) must then be O(ref))."
  - This module is run by its action plugin; the options O(_phase), O(_bundles), O(_digest) and O(_source) are
    set by that plugin only.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  store:
    description:
      - The store directory on the node (created with M(composefs.fleet.store)).
    type: path
    required: true
  ref:
    description:
      - Name of the ref in the node's store, a relative name such as C(app/v1).
    type: str
    required: true
  from_store:
    description:
      - The store directory on the controller that holds the image. A relative path is relative to the
        playbook's directory.
    type: path
    required: true
  from_ref:
    description:
      - The ref in O(from_store) that names the image to send. Defaults to O(ref).
    type: str
  batch_size:
    description:
      - The largest size in bytes of one bundle file (one transfer). An object larger than this is sent in a
        bundle file of its own.
    type: int
    default: 268435456
  allow_foreign_owner:
    description:
      - Accept a node store whose directory or store subdirectories belong to another user (not the one running
        the module, not root) or are writable by group or others (see M(composefs.fleet.store)). The controller's
        store is always owner-checked.
    type: bool
    default: false
  _phase:
    description:
      - Internal, set by the action plugin; do not set it. V(plan) reports what the node lacks, V(apply) pulls
        from the bundles.
    type: str
    choices: [plan, apply]
  _bundles:
    description:
      - Internal, set by the action plugin; do not set it. The bundle files on the node, the image's first.
    type: list
    elements: path
  _digest:
    description:
      - Internal, set by the action plugin; do not set it. The digest the controller's ref names.
    type: str
  _source:
    description:
      - Internal, set by the action plugin; do not set it. How messages name the controller's store.
    type: str
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.flow
  - composefs.fleet.trust
attributes:
  action:
    support: full
  async:
    support: none
  bypass_host_loop:
    support: none
  check_mode:
    support: full
    details: The image is sent and checked (into the remote temporary directory only); the task reports how many
      objects and bytes would be sent. Nothing is written into O(store).
  diff_mode:
    support: full
    details: The ref's digest before and after.
  platform:
    platforms: posix
notes:
  - The node's store is opened with the owner checks of M(composefs.fleet.store) and locked shared for the pull, as
    M(composefs.fleet.image) does; a C(composefs-store gc) never removes what the pull has written before its ref.
  - The controller's store is locked shared (read-only) while the image and the objects are read from it.
  - An object that is corrupted in the controller's store is refused by the node (its digest is not its name); the
    task fails naming it, and the ref is not changed. Objects verified before the failure stay in the node's store
    (as with an interrupted pull) and are not sent again.
requirements:
  - Python 3.8 or later on the managed node; only the standard library, and the Python package C(cryptography) with
    O(trusted_keys).
seealso:
  - module: composefs.fleet.image
  - module: composefs.fleet.store
"""

EXAMPLES = r"""
- name: Send app/v2 from the controller's store to the nodes (only what each node lacks)
  composefs.fleet.image_send:
    store: /var/lib/composefs
    ref: app/v2
    from_store: /srv/build/composefs-store

- name: Send the release under another name, in transfers of at most 64 MiB
  composefs.fleet.image_send:
    store: /var/lib/composefs
    ref: app/current
    from_store: /srv/build/composefs-store
    from_ref: release/2026-12
    batch_size: 67108864
  register: sent

- name: Send app/v2 only if a key the node trusts signed it (the node verifies the statement)
  composefs.fleet.image_send:
    store: /var/lib/composefs
    ref: app/v2
    from_store: /srv/build/composefs-store
    trusted_keys:
      - /etc/composefs-fleet/keys/trusted.d
"""

RETURN = r"""
digest:
  description: The image's fs-verity digest (what O(ref) names afterwards).
  returned: always
  type: str
  sample: 8d1c2a3f4b5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566
previous_digest:
  description: The digest O(ref) named before, null if there was no such ref.
  returned: always
  type: str
  sample: 3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b
ref:
  description: The ref on the node.
  returned: always
  type: str
  sample: app/v2
from_ref:
  description: The ref in the controller's store.
  returned: always
  type: str
  sample: app/v2
objects:
  description: Number of objects (distinct file contents) the image uses.
  returned: always
  type: int
  sample: 9000
objects_missing:
  description: Objects the node's store lacked (or had damaged) before the task; what is (check mode, would be) sent.
  returned: always
  type: int
  sample: 12
bytes_missing:
  description: Bytes of those objects.
  returned: always
  type: int
  sample: 1048576
objects_sent:
  description: Objects sent in bundle files (0 in check mode).
  returned: always
  type: int
  sample: 12
bytes_sent:
  description: Bytes of the objects sent.
  returned: always
  type: int
  sample: 1048576
objects_written:
  description: Objects the node verified and published into its store.
  returned: always
  type: int
  sample: 12
image_written:
  description: Whether the image file was new in the node's store (or replaced a damaged one).
  returned: always
  type: bool
  sample: true
transfers:
  description: Files transferred to the node (the image's bundle file and the objects' bundle files).
  returned: always
  type: int
  sample: 2
bundle_bytes:
  description: Total size of the files transferred.
  returned: always
  type: int
  sample: 1064960
signature:
  description: With O(trusted_keys), what the verified statement says (keys that verified, signing and expiry time);
    null without.
  returned: always
  type: dict
  sample: {"keys": ["3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"],
           "signed": "2026-12-04T14:40:29Z", "expires": null}
"""

import base64
import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs import fsverity_digest
from ..module_utils.composefs.errors import ComposefsError, RemoteError, SignatureError, StoreError
from ..module_utils.composefs.image_needs import image_data_objects
from ..module_utils.composefs.objects import ObjectDir
from ..module_utils.composefs.pull import MAX_IMAGE_BYTES, MAX_REF_BYTES, pull
from ..module_utils.composefs.remote_bundle import BundleTransport
from ..module_utils.composefs.store import OBJECTS, Store
from ..module_utils.composefs.store_names import is_hex_name, split_ref_name
from ..module_utils.composefs.trust_options import load_policy

#: Concurrent verifications on the node (the files are local: hashing is the work).
_JOBS = 4


def _planned_store(location):
    """No store at ``location`` yet (nothing there, or an empty directory): check mode plans against an empty one."""
    try:
        return not os.listdir(location) and not os.path.islink(location)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # Store.open says what is wrong


def missing_bitmap(store, data, digest):
    """Which of the image's objects (sorted by digest) ``store`` lacks or has with the wrong size, as bits."""
    if fsverity_digest.digest_bytes(data).hex() != digest:
        raise StoreError("the image in the bundle changed after it was checked")
    needed = image_data_objects(data).objects
    bits = bytearray((len(needed) + 7) // 8)
    objdir = ObjectDir(store.objects_dir, mode=None, follow=False, create=False, opener=lambda: store.dir_fd(OBJECTS))
    try:
        for i, hexd in enumerate(sorted(needed)):
            st = objdir.lstat(bytes.fromhex(hexd))
            if st is None or st.st_size != needed[hexd]:
                bits[i // 8] |= 1 << (i % 8)
    finally:
        objdir.close()
    return base64.b64encode(bytes(bits)).decode("ascii")


def _plan(module, params, transport, policy):
    location = params["store"]
    scratch = None
    try:
        if module.check_mode and _planned_store(location):
            # Planned against an empty store, by the same pull as a real store.
            module.warn("store %s does not exist yet; the check assumes an empty store" % location)
            scratch = tempfile.mkdtemp(prefix="image_send.", dir=module.tmpdir)
            store = Store.init(os.path.join(scratch, "store"), notice=None)[0]
        else:
            store = Store.open(location, notice=None, allow_foreign=params["allow_foreign_owner"])
        with store:
            res = pull(store, transport, params["ref"], params["ref"], dry_run=True, jobs=1, trust=policy)
            data = transport.get_small("images/" + res.digest, MAX_IMAGE_BYTES)
            bitmap = missing_bitmap(store, data, res.digest)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return res, dict(missing_bitmap=bitmap)


def _apply(module, params, transport, policy):
    ref = params["ref"]
    raw = transport.get_small("refs/" + ref, MAX_REF_BYTES).strip()
    if raw.decode("ascii", "replace") != params["_digest"]:
        raise RemoteError(transport.url, "the bundle's ref %s names %r, not %s: refused" % (ref, raw[:80], params["_digest"]))
    store = Store.open(params["store"], notice=None, allow_foreign=params["allow_foreign_owner"])
    with store:
        res = pull(store, transport, ref, ref, jobs=_JOBS, trust=policy)
    return res, {}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            store=dict(type="path", required=True),
            ref=dict(type="str", required=True),
            from_store=dict(type="path", required=True),
            from_ref=dict(type="str"),
            batch_size=dict(type="int", default=268435456),
            allow_foreign_owner=dict(type="bool", default=False),
            trusted_keys=dict(type="list", elements="str", no_log=True),
            revoked_keys=dict(type="list", elements="str", no_log=True),
            _phase=dict(type="str", choices=["plan", "apply"]),
            _bundles=dict(type="list", elements="path"),
            _digest=dict(type="str"),
            _source=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if params["_phase"] is None or not params["_bundles"] or not is_hex_name(params["_digest"] or ""):
        module.fail_json(msg="image_send runs through its action plugin (composefs.fleet.image_send in a task); "
                             "the module alone cannot reach the controller's store")
    if params["_phase"] == "apply" and module.check_mode:
        module.fail_json(msg="image_send: the apply phase does not run in check mode")
    source = params["_source"] or "controller:%s" % params["from_store"]
    transport = None
    try:
        split_ref_name(params["ref"])
        transport = BundleTransport(params["_bundles"], url=source)
        policy = load_policy(params["trusted_keys"], params["revoked_keys"], module.tmpdir)
        run = _plan if params["_phase"] == "plan" else _apply
        res, extra = run(module, params, transport, policy)
    except SignatureError as exc:
        # Checked before anything is written: the controller's statement does not vouch for this image here.
        module.fail_json(msg=str(exc), reason=exc.reason)
    except RemoteError as exc:
        module.fail_json(msg="%s (the node verifies what the controller sends; if an object or the image is named "
                             "here, check the controller's store with 'composefs-store --repo %s fsck')"
                             % (exc, params["from_store"]))
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    except ComposefsError as exc:
        module.fail_json(msg="%s: %s" % (params["store"], exc))
    except OSError as exc:
        where = exc.filename if exc.filename is not None else params["store"]
        module.fail_json(msg="%s: %s" % (where, exc.strerror or exc))
    finally:
        if transport is not None:
            transport.close()
    out = res.as_dict()
    out.pop("url", None)
    out.update(extra)
    if out["digest"] != params["_digest"]:
        module.fail_json(msg="the bundle's ref names %s, the controller's %s" % (out["digest"], params["_digest"]))
    module.exit_json(**out)


if __name__ == "__main__":
    main()
