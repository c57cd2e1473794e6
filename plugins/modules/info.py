#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: info
short_description: Facts about composefs stores, images and mounts
version_added: 0.1.0
description:
  - Reports the refs, images (digest, refs naming them, object counts, missing objects, size) and statistics of
    the given composefs stores, and every composefs mount of the node.
  - Mounts are read from C(/proc/self/mountinfo) (overlayfs mounts with source C(composefs)); the image of a mount
    comes from the mount record that this collection's mount code writes under C(/run/composefs-fleet/mounts/),
    used only while the mount it describes is the one mounted (mountinfo ID, device and, on Linux 6.8+, the
    boot-unique mount ID match).
  - Never changes anything.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  stores:
    description: Store directories to report on. Each must be a composefs store.
    type: list
    elements: path
    default: []
  mounts:
    description: Report the composefs mounts of the node.
    type: bool
    default: true
  check_objects:
    description:
      - For each image, check that every object it needs is in the store, and list the missing ones (at most 100
        names per image; RV(stores[].images[].missing_count) always counts them all).
      - Costs one C(lstat) per object of each image.
    type: bool
    default: true
  allow_foreign_owner:
    description:
      - Accept stores whose directory or store subdirectories belong to another user (not the one running the
        module, not root) or are writable by group or others.
      - By default such a store is refused (the task fails naming it), as sshd's C(StrictModes) refuses such
        files; a symbolic link where a store directory belongs is always refused.
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: The module never changes anything, so it runs the same in check mode.
  diff_mode:
    support: N/A
    details: The module never changes anything.
  platform:
    platforms: posix
notes:
  - Reading the mount table needs no privileges; reading a store needs read access to it.
  - A mount made by another tool (for example the C composefs C(mount.composefs)) has no record, so its image is
    reported as unknown (RV(mounts[].recorded) is V(false)).
requirements:
  - Linux.
seealso:
  - module: composefs.fleet.store
    description: Create or remove stores.
  - module: composefs.fleet.image
    description: Build images into a store.
  - module: composefs.fleet.mount
    description: Mount images.
  - module: composefs.fleet.verity
    description: Enable fs-verity on files and trees.
"""

EXAMPLES = r"""
- name: Gather facts about the store and the mounts
  composefs.fleet.info:
    stores:
      - /var/lib/composefs/store
  register: cfs

- name: Fail when an image lacks objects
  ansible.builtin.assert:
    that: cfs.stores[0].images | map(attribute='missing_count') | sum == 0

- name: Show which image is mounted where
  ansible.builtin.debug:
    msg: "{{ item.where }}: {{ item.image_digest | default('unknown', true) }}"
  loop: "{{ cfs.mounts }}"
"""

RETURN = r"""
stores:
  description: One entry per store in O(stores), in that order.
  returned: always
  type: list
  elements: dict
  contains:
    location:
      description: The store directory as given.
      type: str
      returned: always
      sample: /var/lib/composefs/store
    format:
      description: The store format version.
      type: int
      returned: always
      sample: 1
    verity_supported:
      description: Whether the filesystem of the store's objects supports fs-verity.
      type: bool
      returned: always
      sample: false
    verity_problem:
      description: Why it does not; null when it does.
      type: str
      returned: always
      sample: null
    refs:
      description: Ref name to image digest (damaged refs are left out).
      type: dict
      returned: always
      sample: {"app/current": "4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27"}
    images:
      description: The images of the store.
      type: list
      elements: dict
      returned: always
      contains:
        digest:
          description: The image digest (its file name).
          type: str
          returned: always
          sample: 4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27
        refs:
          description: Names of the refs naming this image.
          type: list
          elements: str
          returned: always
          sample: [app/current]
        objects:
          description: Number of distinct objects the image needs; null if the image cannot be read.
          type: int
          returned: always
          sample: 1840
        missing_objects:
          description: Digests of needed objects missing from the store (at most 100); empty without O(check_objects).
          type: list
          elements: str
          returned: always
          sample: []
        missing_count:
          description: Number of missing objects; null without O(check_objects).
          type: int
          returned: always
          sample: 0
        size:
          description: Size of the image file in bytes.
          type: int
          returned: always
          sample: 524288
        mounted_at:
          description: Mount points where this image is mounted (as far as mount records tell).
          type: list
          elements: str
          returned: always
          sample: [/srv/app]
        error:
          description: Why the image could not be read; null when it could.
          type: str
          returned: always
          sample: null
    stats:
      description: Store statistics (objects, bytes, sharing, bytes saved by sharing), as C(composefs-store stats).
      type: dict
      returned: always
      sample: {"objects": 1840, "object_bytes": 73400320, "saved_bytes": 52428800, "images": 2, "refs": 2}
mounts:
  description: Every composefs mount of the node (none when O(mounts=false)).
  returned: always
  type: list
  elements: dict
  contains:
    where:
      description: The mount point.
      type: str
      returned: always
      sample: /srv/app
    fstype:
      description: The filesystem type (always V(overlay)).
      type: str
      returned: always
      sample: overlay
    source:
      description: The mount source (always V(composefs)).
      type: str
      returned: always
      sample: composefs
    options:
      description: The overlayfs options as the kernel shows them.
      type: str
      returned: always
      sample: ro,lowerdir+=/,datadir+=/var/lib/composefs/store/objects,redirect_dir=on,metacopy=on
    basedirs:
      description: The object directories (overlayfs data layers).
      type: list
      elements: str
      returned: always
      sample: [/var/lib/composefs/store/objects]
    upperdir:
      description: The overlayfs upper directory; null for a read-only mount.
      type: str
      returned: always
      sample: null
    workdir:
      description: The overlayfs work directory; null for a read-only mount.
      type: str
      returned: always
      sample: null
    verity:
      description: The overlayfs verity mode, V(require) or V(off).
      type: str
      returned: always
      sample: "off"
    image_file:
      description: The image file mounted, from the mount record; null when unknown.
      type: str
      returned: always
      sample: /var/lib/composefs/store/images/4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27
    image_digest:
      description: The fs-verity digest of the image, from the mount record; null when unknown.
      type: str
      returned: always
      sample: 4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27
    recorded:
      description: Whether a valid (not stale) mount record describes this mount.
      type: bool
      returned: always
      sample: true
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs import mount_record, mountinfo
from ..module_utils.composefs.errors import ComposefsError
from ..module_utils.composefs.mount import verity_problem
from ..module_utils.composefs.store import Store
from ..module_utils.composefs.store_stats import stats

MISSING_LIST_MAX = 100


def image_facts(store, hexd, refs, mounted_at, check_objects):
    entry = {
        "digest": hexd,
        "refs": sorted(name for name, target in refs.items() if target == hexd),
        "objects": None,
        "missing_objects": [],
        "missing_count": None,
        "size": None,
        "mounted_at": sorted(mounted_at.get(hexd, [])),
        "error": None,
    }
    try:
        needed = store.image_objects(hexd)
    except (OSError, ComposefsError) as exc:
        entry["error"] = "cannot read image %s: %s" % (hexd, getattr(exc, "strerror", None) or exc)
        return entry
    entry["size"] = needed.image_bytes
    entry["objects"] = len(needed.objects)
    if check_objects:
        missing = []
        for obj, size in sorted(needed.objects.items()):
            try:
                present = store.object_state(obj, size)
            except ComposefsError:
                present = False  # damaged counts as missing: reads of it would fail
            if not present:
                missing.append(obj)
        entry["missing_count"] = len(missing)
        entry["missing_objects"] = missing[:MISSING_LIST_MAX]
    return entry


def store_facts(location, mounted_at, check_objects, allow_foreign=False):
    with Store(location, notice=None, allow_foreign=allow_foreign) as store:  # closed: it would keep a mount busy
        meta = store.check()
        refs = store.ref_targets()
        problem = verity_problem(store.objects_dir)
        return {
            "location": location,
            "format": meta.get("format"),
            "verity_supported": problem is None,
            "verity_problem": problem,
            "refs": refs,
            "images": [image_facts(store, hexd, refs, mounted_at, check_objects) for hexd in store.list_images()],
            "stats": stats(store),
        }


def mount_facts():
    entries = mountinfo.read_mountinfo()
    return [mount_record.describe_mount(e, entries) for e in mountinfo.composefs_mounts(entries)]


def main():
    module = AnsibleModule(
        argument_spec=dict(
            stores=dict(type="list", elements="path", default=[]),
            mounts=dict(type="bool", default=True),
            check_objects=dict(type="bool", default=True),
            allow_foreign_owner=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    result = {"changed": False, "stores": [], "mounts": []}
    try:
        mounts = mount_facts()
        mounted_at = {}
        for m in mounts:
            if m["image_digest"]:
                mounted_at.setdefault(m["image_digest"], []).append(m["where"])
        if module.params["mounts"]:
            result["mounts"] = mounts
        for location in module.params["stores"]:
            try:
                result["stores"].append(store_facts(location, mounted_at, module.params["check_objects"],
                                                    module.params["allow_foreign_owner"]))
            except ComposefsError as exc:
                module.fail_json(msg="store %s: %s" % (location, exc))
    except OSError as exc:
        name = " %s" % os.fsdecode(exc.filename) if exc.filename else ""
        module.fail_json(msg="cannot read%s: %s" % (name, exc.strerror or exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
