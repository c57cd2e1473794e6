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

- name: Show which image is mounted where, and the one it replaced (kept by gc for a rollback)
  ansible.builtin.debug:
    msg: "{{ item.where }}: {{ item.image_digest | default('unknown', true) }}
      (before: {{ item.previous_image_digest | default('none', true) }})"
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
    exists:
      description:
        - Whether the store exists. Always V(true) outside check mode (a missing store fails the task); in check
          mode a store that does not exist yet (a missing or empty directory, which an earlier task of the play would
          initialise) is reported with V(false) as the empty store it would be (no refs, no images, zero stats).
      type: bool
      returned: always
      sample: true
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
      description:
        - Store statistics (objects, bytes, sharing, bytes saved by sharing), as C(composefs-store stats).
        - Objects not needed by any image count as unreferenced; C(composefs.fleet.gc) removes them (and images no
          ref names, unless mounted or kept for a rollback).
      type: dict
      returned: always
      contains:
        objects:
          description: Number of objects in the store.
          type: int
          returned: always
          sample: 1840
        object_bytes:
          description: Total size of the objects in bytes.
          type: int
          returned: always
          sample: 73400320
        object_disk_bytes:
          description: Disk space the objects take (allocated blocks) in bytes.
          type: int
          returned: always
          sample: 74973184
        images:
          description: Number of images in the store.
          type: int
          returned: always
          sample: 2
        image_bytes:
          description: Total size of the readable images in bytes.
          type: int
          returned: always
          sample: 1048576
        refs:
          description: Number of refs.
          type: int
          returned: always
          sample: 2
        shared_objects:
          description: Number of objects present and needed by more than one image.
          type: int
          returned: always
          sample: 1500
        shared_object_bytes:
          description: Total size of the shared objects in bytes.
          type: int
          returned: always
          sample: 52428800
        unreferenced_objects:
          description: Number of objects no readable image needs.
          type: int
          returned: always
          sample: 0
        unreferenced_bytes:
          description: Total size of the unreferenced objects in bytes.
          type: int
          returned: always
          sample: 0
        logical_bytes:
          description:
            - Bytes the images' external files would take without a shared store (every file of every image at its
              size, duplicates included).
          type: int
          returned: always
          sample: 125829120
        saved_bytes:
          description: RV(stores[].stats.logical_bytes) minus the bytes of the distinct objects the images use.
          type: int
          returned: always
          sample: 52428800
        max_sharing:
          description: The largest number of images needing one same object (0 without images).
          type: int
          returned: always
          sample: 2
        unreadable_images:
          description: Digests of images that could not be read (left out of the other numbers).
          type: list
          elements: str
          returned: always
          sample: []
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
    ref:
      description:
        - The ref the image was mounted by (a ref as O(composefs.fleet.mount#module:image)); null when unknown or
          mounted by path or digest.
      type: str
      returned: always
      sample: app/current
    previous_image_digest:
      description:
        - The fs-verity digest of the image this mount point showed before its last switch, from the mount record
          or else the mount point's history (C(/var/lib/composefs-fleet/mounts/)); null when unknown or never
          switched.
        - C(composefs.fleet.gc) keeps that image while the mount is live, so rolling back to it works offline.
      type: str
      returned: always
      sample: 9a1b6c0e2f4d8a7c5b3e1f0d2c4b6a8e0f1d3c5b7a9e2d4f6b8a0c1e3d5f7b9a
    previous_image_file:
      description: The image file of the previous image (see RV(mounts[].previous_image_digest)); null when unknown.
      type: str
      returned: always
      sample: /var/lib/composefs/store/images/9a1b6c0e2f4d8a7c5b3e1f0d2c4b6a8e0f1d3c5b7a9e2d4f6b8a0c1e3d5f7b9a
"""

import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs import mount_history, mount_record, mountinfo, store_admin
from ..module_utils.composefs.errors import ComposefsError
from ..module_utils.composefs.fsverity_ioctl import verity_problem
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
            "exists": True,
            "format": meta.get("format"),
            "verity_supported": problem is None,
            "verity_problem": problem,
            "refs": refs,
            "images": [image_facts(store, hexd, refs, mounted_at, check_objects) for hexd in store.list_images()],
            "stats": stats(store),
        }


def planned_store_facts(module, location, check_objects):
    """The entry of the empty store the store module would create at ``location`` (check mode on a fresh node).

    Read from a fresh store in the module's temp directory, so it has every key (and zero stats) a real
    entry has: a play that reads them in check mode works as it will for real.
    """
    scratch = tempfile.mkdtemp(prefix="info.", dir=module.tmpdir)
    try:
        Store.init(os.path.join(scratch, "store"), notice=None)[0].close()
        facts = store_facts(os.path.join(scratch, "store"), {}, check_objects)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    problem = store_admin.verity_problem_at(location)
    facts.update(location=location, exists=False, verity_supported=problem is None, verity_problem=problem)
    return facts


def mount_facts():
    entries = mountinfo.read_mountinfo()
    mounts = [mount_record.describe_mount(e, entries) for e in mountinfo.composefs_mounts(entries)]
    for m in mounts:
        if m["image_digest"] and not m["previous_image_digest"]:
            # A record written before the history knew the previous image: the history tells, if it
            # describes the image mounted now.
            entry = mount_history.load(m["where"], mount_history.HISTORY_DIR)
            if entry and entry["image_digest"] == m["image_digest"] and entry.get("previous"):
                m["previous_image_digest"] = entry["previous"]["image_digest"]
                m["previous_image_file"] = entry["previous"]["image"]
                m["ref"] = m["ref"] or entry.get("ref")
    return mounts


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
            if module.check_mode and store_admin.path_state(location) in (store_admin.MISSING, store_admin.EMPTY):
                # A fresh node in check mode: the store task before this one made nothing (a missing or
                # empty directory is what the store module would initialise).
                module.warn("store %s does not exist yet (check mode): reported empty" % location)
                result["stores"].append(planned_store_facts(module, location, module.params["check_objects"]))
                continue
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
