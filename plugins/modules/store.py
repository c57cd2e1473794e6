#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: store
short_description: Create or remove a composefs object store
version_added: 0.1.0
description:
  - Creates a composefs object store (C(meta.json), C(objects/), C(images/), C(refs/)) at O(path), or removes one.
  - An existing valid store is left alone. An empty directory (or one holding only C(lost+found), as a freshly made
    filesystem has) becomes a store. Any other non-empty directory that is not a store is refused, so that a
    typo never adopts or deletes an unrelated directory.
  - Reports whether the filesystem of the store supports fs-verity (the objects of a store on such a filesystem
    get fs-verity when they are written, and mounts can then require it).
  - Like sshd's C(StrictModes), a store whose directory (or C(objects/), C(images/), C(refs/), C(cache/),
    C(damaged/)) belongs to another user than the one running the module or root, or is writable by group or
    others, is refused unless O(allow_foreign_owner=true). A symbolic link where a store directory belongs is
    always refused.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  path:
    description:
      - The store directory. Missing parent directories are created with O(state=present).
      - With O(state=absent) it must not be a symbolic link.
    type: path
    required: true
  state:
    description:
      - V(present) creates the store unless a valid one is there already.
      - V(absent) deletes the store directory and everything in it. A path where there is no store (missing, or a
        directory without C(meta.json)) is left alone and reported unchanged.
      - V(absent) always refuses while the store is in use, whatever O(force) says, that is while an image of the
        store is mounted or attached to a loop device, a mounted composefs image uses objects of the store, an
        overlay has a layer inside the store (for example its C(objects/) directory as data layer), or anything is
        mounted inside it.
    type: str
    choices: [present, absent]
    default: present
  force:
    description:
      - With O(state=absent), also remove a store that still has refs, or one that is damaged (its C(meta.json) or
        directories fail the store check). Without it such a store is not removed and the task fails, saying how
        many refs it has.
      - Has no effect with O(state=present).
    type: bool
    default: false
  shared_layout:
    description:
      - With O(state=present), create the store directories with mode C(0755), the layout of the C composefs tools
        (anyone may list the objects and read the images).
      - By default a new store (and an empty directory that becomes the store) gets mode C(0700) and its
        directories too; the objects are read through mounts, nobody else needs to list them.
      - An existing store keeps its modes; this option does not change them.
    type: bool
    default: false
  allow_foreign_owner:
    description:
      - Accept a store whose directory or store subdirectories belong to another user (not the one running the
        module, not root) or are writable by group or others.
      - By default such a store is refused, since whoever can write there could swap its contents under the module.
        O(force) does not override this.
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - composefs.fleet.attributes
notes:
  - Removal first renames the store to a hidden temporary name next to it, so no half-deleted store is ever
    visible under O(path). A store directory that is itself a mount point stays as an empty directory; its
    C(meta.json) is removed first.
  - The "in use" check reads C(/proc/self/mountinfo) (overlay layers, mount points) and, because loop devices are
    global, every composefs image attached to a loop device or mounted as erofs, in any mount namespace. A mounted
    image of another store whose files have the same content as objects of this one also counts, since objects are
    named by content only.
  - Removal takes the store lock exclusively, so it waits for image additions that are running and keeps new ones
    out until it is done.
  - Unreferenced objects and images are not collected by this module; use C(composefs-store gc).
  - In check mode the result describes the store as it would be after the task.
requirements:
  - Linux. fs-verity support is reported, not required.
seealso:
  - module: composefs.fleet.image
    description: Build images into a store.
  - module: composefs.fleet.mount
    description: Mount images of a store.
  - module: composefs.fleet.info
    description: Facts about stores, images and mounts.
  - module: composefs.fleet.verity
    description: Enable fs-verity on files and trees.
"""

EXAMPLES = r"""
- name: Create the store
  composefs.fleet.store:
    path: /var/lib/composefs/store
  register: store

- name: Tell whether mounts can require fs-verity
  ansible.builtin.debug:
    msg: "fs-verity: {{ store.store.verity_supported }} ({{ store.store.verity_problem }})"

- name: Remove a store, refs and all (refused while any of its images is mounted)
  composefs.fleet.store:
    path: /var/lib/composefs/old-store
    state: absent
    force: true
"""

RETURN = r"""
store:
  description:
    - The store after the task (in check mode, as it would be).
    - After O(state=absent), RV(store.exists) is V(false) and the other keys are null or zero.
  returned: always
  type: dict
  contains:
    location:
      description: The store directory, as given in O(path).
      type: str
      returned: always
      sample: /var/lib/composefs/store
    exists:
      description: Whether the store exists.
      type: bool
      returned: always
      sample: true
    format:
      description: The store format version from C(meta.json).
      type: int
      returned: always
      sample: 1
    digest_algorithm:
      description: The digest algorithm of objects and images.
      type: str
      returned: always
      sample: sha256
    verity_supported:
      description:
        - Whether the filesystem holding the objects supports fs-verity (for a store not created yet, the
          filesystem where it would be created). Null after removal.
      type: bool
      returned: always
      sample: false
    verity_problem:
      description: Why fs-verity is not available there; null when it is.
      type: str
      returned: always
      sample: "fs-verity is not supported: measure on ext4: the running kernel is built without CONFIG_FS_VERITY"
    objects:
      description: Number of objects in the store.
      type: int
      returned: always
      sample: 1840
    images:
      description: Number of images in the store.
      type: int
      returned: always
      sample: 3
    refs:
      description: Number of refs in the store.
      type: int
      returned: always
      sample: 2
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs.errors import ComposefsError, StoreError
from ..module_utils.composefs.store import PRIVATE_MODE, SHARED_MODE, Store
from ..module_utils.composefs import store_admin


def _absent_summary(location):
    return {
        "location": location,
        "exists": False,
        "format": None,
        "digest_algorithm": None,
        "verity_supported": None,
        "verity_problem": None,
        "objects": 0,
        "images": 0,
        "refs": 0,
    }


def _diff_state(summary):
    if not summary["exists"]:
        return {"state": "absent"}
    return {
        "state": "present",
        "format": summary["format"],
        "digest_algorithm": summary["digest_algorithm"],
        "objects": summary["objects"],
        "images": summary["images"],
        "refs": summary["refs"],
    }


def _store(module, location):
    return Store(location, notice=None, allow_foreign=module.params["allow_foreign_owner"])


def _present(module, location):
    state = store_admin.path_state(location)
    if state == store_admin.NOT_A_DIRECTORY:
        module.fail_json(msg="%s exists and is not a directory: refusing to create a store there" % location)
    if state == store_admin.NOT_A_STORE:
        module.fail_json(msg="%s is a non-empty directory that is not a composefs store (no meta.json): "
                             "refusing to turn it into one; use an empty or new directory" % location)
    if state == store_admin.STORE:
        with _store(module, location) as store:  # closed: an open directory keeps a mount busy
            meta = store.check()  # a damaged store fails here, with the reason
            before = store_admin.summary(store, meta)
        return False, before, before
    before = _absent_summary(location)
    if module.check_mode:
        return True, before, store_admin.new_store_summary(location)
    mode = SHARED_MODE if module.params["shared_layout"] else PRIVATE_MODE
    store, _created = Store.init(location, notice=None, allow_foreign=module.params["allow_foreign_owner"], mode=mode)
    with store:
        return True, before, store_admin.summary(store)


def _absent(module, location, force):
    if os.path.islink(location.rstrip("/")):
        module.fail_json(msg="%s is a symbolic link: give the store's real directory to remove it" % location)
    state = store_admin.path_state(location)
    after = _absent_summary(location)
    if state != store_admin.STORE:
        if state in (store_admin.NOT_A_STORE, store_admin.NOT_A_DIRECTORY):
            module.warn("%s is not a composefs store (no meta.json); left alone" % location)
        return False, after, after
    with _store(module, location) as store:
        plan = store_admin.plan_removal(store)
        why = store_admin.refusal(plan, force)
        if why is not None:
            module.fail_json(msg="refusing to remove the store %s: %s" % (location, why), refs=len(plan.refs))
        if plan.damage is None:
            before = store_admin.summary(store)
        else:
            before = _absent_summary(location)
            before.update(exists=True, refs=len(plan.refs))
        if not module.check_mode:
            store_admin.remove_store(store, force=force)
    return True, before, after


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            force=dict(type="bool", default=False),
            shared_layout=dict(type="bool", default=False),
            allow_foreign_owner=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    location = module.params["path"]
    try:
        if module.params["state"] == "present":
            changed, before, after = _present(module, location)
        else:
            changed, before, after = _absent(module, location, module.params["force"])
    except (ComposefsError, StoreError) as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="%s: %s" % (os.fsdecode(exc.filename) if exc.filename else location, exc.strerror or exc))
    result = dict(changed=changed, store=after)
    if module._diff:
        result["diff"] = {"before": _diff_state(before), "after": _diff_state(after)}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
