#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gc
short_description: Remove the images and objects of a composefs store that nothing uses
version_added: 0.1.0
description:
  - Garbage collection of a composefs store, as C(composefs-store gc) does it.
  - Keeps every image a ref names, every image mounted now (also in other mount namespaces, also on loop devices),
    and the image every live mount showed before its last switch (its mount record or the mount point's history
    in O(history_dir)), so rolling back to it works offline, until the mount moves again. Then removes the
    other images (with their signatures and OCI origin records), every object no kept image needs, and crash
    debris (temporary files older than O(tmp_grace) seconds in C(objects/); any in C(images/), C(cache/),
    C(refs/)).
  - Refuses, and removes nothing, when the objects a mount of this store reads cannot be established (for
    example an image file deleted or replaced after it was mounted, or a composefs mount without a mount
    record); the task then fails saying why.
  - In check mode nothing is removed and the result tells what would be freed.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  tmp_grace:
    description:
      - Age in seconds after which temporary files in C(objects/) count as crash debris (they may also be the
        C composefs tools' files being written right now).
    type: float
    default: 3600
  history_dir:
    description:
      - Where the mount points' histories are (written by C(composefs.fleet.mount) and C(mount.composefs)); the
        previous image of each mount point with a composefs mount on it now is kept.
    type: path
    default: /var/lib/composefs-fleet/mounts
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - composefs.fleet.attributes
  - composefs.fleet.store_path
notes:
  - The collection waits for image additions that are running and keeps new ones waiting while it removes.
  - In check mode, a store directory that does not exist yet (a fresh node whose store a previous task would
    create) is reported as having nothing to collect.
  - Run as root, so that mounts of every kind can be inspected.
requirements:
  - Linux.
seealso:
  - module: composefs.fleet.fsck
    description: Check a store, and repair it.
  - module: composefs.fleet.info
    description: Facts about stores and mounts, including the previous image of each mount.
  - module: composefs.fleet.mount
    description: Mount images; switching remembers the previous image.
"""

EXAMPLES = r"""
- name: Tell what garbage collection would free
  composefs.fleet.gc:
    path: /var/lib/composefs/store
  check_mode: true
  register: would

- name: Show it
  ansible.builtin.debug:
    msg: "{{ would.freed.images }} images and {{ would.freed.objects }} objects, {{ would.freed.bytes }} bytes"

- name: Collect garbage
  composefs.fleet.gc:
    path: /var/lib/composefs/store
"""

RETURN = r"""
freed:
  description: What was removed (in check mode, what would be).
  returned: success
  type: dict
  contains:
    images:
      description: Number of images removed.
      type: int
      returned: success
      sample: 1
    image_bytes:
      description: Their size in bytes.
      type: int
      returned: success
      sample: 65536
    objects:
      description: Number of objects removed.
      type: int
      returned: success
      sample: 120
    object_bytes:
      description: Their size in bytes.
      type: int
      returned: success
      sample: 10485760
    bytes:
      description: RV(freed.image_bytes) plus RV(freed.object_bytes).
      type: int
      returned: success
      sample: 10551296
    temp_files:
      description: Number of temporary files (crash debris) removed.
      type: int
      returned: success
      sample: 0
removed_images:
  description: Digests of the images removed (in check mode, that would be).
  returned: success
  type: list
  elements: str
  sample: [4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27]
removed_signatures:
  description: Digests of the images whose fs-verity signature file was removed.
  returned: success
  type: list
  elements: str
  sample: []
removed_temp_files:
  description: Paths of the temporary files removed.
  returned: success
  type: list
  elements: str
  sample: []
kept_images:
  description: Digests of the images kept (named by a ref, mounted, or the previous image of a live mount).
  returned: success
  type: list
  elements: str
  sample: [9a1b6c0e2f4d8a7c5b3e1f0d2c4b6a8e0f1d3c5b7a9e2d4f6b8a0c1e3d5f7b9a]
kept_objects:
  description: Number of objects kept.
  returned: success
  type: int
  sample: 1840
mounted:
  description: The mounted images taken into account, as text.
  returned: success
  type: list
  elements: str
  sample: [composefs image /var/lib/composefs/store/images/9a1b... on /srv/app]
previous_images:
  description:
    - The images live mounts showed before their last switch, which a rollback mounts, and whether they were kept.
    - One that cannot be kept (not in the store, and its file is gone or was replaced) is also a warning; a rollback
      to it needs the image again.
  returned: success
  type: list
  elements: dict
  contains:
    where:
      description: The mount point.
      type: str
      returned: success
      sample: /srv/app
    image_digest:
      description: The digest of the previous image.
      type: str
      returned: success
      sample: 4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27
    image_file:
      description: The image file it was mounted from; null when unknown.
      type: str
      returned: success
      sample: /var/lib/composefs/store/images/4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27
    kept:
      description: Whether it was kept (the image of this store with its objects, or the objects of an image file).
      type: bool
      returned: success
      sample: true
    in_store:
      description: Whether the image is in this store.
      type: bool
      returned: success
      sample: true
    reason:
      description: Why it cannot be kept; null when it was.
      type: str
      returned: success
      sample: null
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs import store_admin
from ..module_utils.composefs.errors import ComposefsError
from ..module_utils.composefs.store import Store
from ..module_utils.composefs.store_gc import GcResult, collect


def _result(gc):
    removed_anything = any((gc.removed_images, gc.removed_objects, gc.removed_signatures, gc.removed_origins,
                            gc.removed_temp_files))
    return {
        "changed": removed_anything,
        "freed": {
            "images": len(gc.removed_images),
            "image_bytes": gc.removed_image_bytes,
            "objects": len(gc.removed_objects),
            "object_bytes": gc.removed_object_bytes,
            "bytes": gc.removed_image_bytes + gc.removed_object_bytes,
            "temp_files": len(gc.removed_temp_files),
        },
        "removed_images": list(gc.removed_images),
        "removed_signatures": list(gc.removed_signatures),
        "removed_temp_files": list(gc.removed_temp_files),
        "kept_images": list(gc.kept_images),
        "kept_objects": gc.kept_objects,
        "mounted": list(gc.mounted),
        "previous_images": [dict(p, kept=True, reason=None) for p in gc.kept_previous]
        + [dict(p, kept=False, in_store=False) for p in gc.missing_previous],
    }


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            tmp_grace=dict(type="float", default=3600),
            history_dir=dict(type="path", default="/var/lib/composefs-fleet/mounts"),
            allow_foreign_owner=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    location = module.params["path"]
    if module.params["tmp_grace"] < 0:
        module.fail_json(msg="tmp_grace cannot be negative (got %s)" % module.params["tmp_grace"])
    if module.check_mode and store_admin.path_state(location) in (store_admin.MISSING, store_admin.EMPTY):
        result = _result(GcResult())
        result["msg"] = "store %s does not exist yet: nothing to collect" % location
        module.exit_json(**result)
    try:
        with Store(location, notice=None, allow_foreign=module.params["allow_foreign_owner"]) as store:
            store.check()
            images_before = store.list_images()
            gc = collect(store, dry_run=module.check_mode, tmp_grace=module.params["tmp_grace"],
                         history_dir=module.params["history_dir"])
    except ComposefsError as exc:
        module.fail_json(msg="store %s: %s" % (location, exc))
    except OSError as exc:
        where = os.fsdecode(exc.filename) + ": " if exc.filename else ""
        module.fail_json(msg="store %s: %s%s" % (location, where, exc.strerror or exc))
    result = _result(gc)
    for missing in gc.missing_previous:
        module.warn("the previous image %s of %s cannot be kept for a rollback: %s"
                    % (missing["image_digest"], missing["where"], missing["reason"]))
    if module._diff:
        removed = set(gc.removed_images)
        objects_before = gc.kept_objects + len(gc.removed_objects)
        result["diff"] = {
            "before": {"images": images_before, "objects": objects_before},
            "after": {"images": [i for i in images_before if i not in removed], "objects": gc.kept_objects},
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
