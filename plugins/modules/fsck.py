#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fsck
short_description: Check a composefs store, and optionally repair it
version_added: 0.1.0
description:
  - Checks a composefs store as C(composefs-store fsck) does - every object's fs-verity digest equals its name
    (measured by the kernel when the object has fs-verity, computed otherwise), every entry under C(objects/) and
    C(images/) has a valid name and is a regular file, every image's digest equals its name and it parses, every
    object an image needs is present with the right size, every ref names a present image, and image signature
    files are well-formed.
  - The problems found are returned as a list (RV(findings)); the task fails when there are any, unless
    O(fail_on_findings=false).
  - With O(repair=true), damaged objects and images (wrong content, not a regular file, invalid name) are moved
    into C(STORE/damaged/), as C(composefs-store fsck --repair) does; the task is then changed. Images that then
    miss objects, and refs to missing images, stay findings (RV(remaining)); they need their source added again
    (for example with C(composefs.fleet.image)).
  - Temporary files (crash debris) are notes, not findings; C(composefs.fleet.gc) removes them.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  repair:
    description: Move damaged objects and images aside into C(STORE/damaged/).
    type: bool
    default: false
  fail_on_findings:
    description:
      - Fail the task when problems remain (without O(repair), when any were found).
      - With V(false) the task succeeds and the caller decides from RV(clean) and RV(findings).
    type: bool
    default: true
  threads:
    description: Number of threads computing digests; by default the number of CPUs.
    type: int
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - composefs.fleet.attributes
  - composefs.fleet.store_path
notes:
  - Reads every object of the store once; on a large store this takes a while.
  - In check mode nothing is moved; RV(damaged) tells what a repair would move. A store directory that does not
    exist yet (a fresh node) is reported as having nothing to check.
requirements:
  - Linux.
seealso:
  - module: composefs.fleet.gc
    description: Remove what nothing uses (also the temporary files fsck notes).
  - module: composefs.fleet.info
    description: Facts about stores, images (with missing objects) and mounts.
"""

EXAMPLES = r"""
- name: Check the store, failing when it is damaged
  composefs.fleet.fsck:
    path: /var/lib/composefs/store

- name: Check the store and move damaged files aside
  composefs.fleet.fsck:
    path: /var/lib/composefs/store
    repair: true
    fail_on_findings: false
  register: fsck

- name: Report what is still wrong
  ansible.builtin.debug:
    var: fsck.remaining
  when: not fsck.clean
"""

RETURN = r"""
clean:
  description: Whether no problem remains (with O(repair), after the repair).
  returned: success
  type: bool
  sample: false
findings:
  description:
    - The problems found, one sentence each naming the object, image or ref; with O(repair), also those the moves
      caused (an image now missing the object moved aside).
  returned: success
  type: list
  elements: str
  sample: ["objects/3b/0e8c...: content has digest 9f2a... (computed): damaged"]
remaining:
  description: The problems left after the task (without O(repair), or in check mode, the same as RV(findings)).
  returned: success
  type: list
  elements: str
  sample: ["images/4c1d...: 1 object(s) missing or damaged, e.g. 3b0e8c..."]
notes:
  description: Things that are not damage (for example temporary files left by a crash).
  returned: success
  type: list
  elements: str
  sample: []
damaged:
  description: Paths of the damaged entries found (what a repair moves aside).
  returned: success
  type: list
  elements: str
  sample: [/var/lib/composefs/store/objects/3b/0e8c4f...]
moved:
  description: What the repair moved aside, and where to (empty without O(repair) and in check mode).
  returned: success
  type: list
  elements: str
  sample: ["/var/lib/composefs/store/objects/3b/0e8c... -> /var/lib/composefs/store/damaged/objects_3b_0e8c....20261204T183000.a1b2c3"]
counts:
  description: What was checked.
  returned: success
  type: dict
  contains:
    objects:
      description: Number of objects checked.
      type: int
      returned: success
      sample: 1840
    object_bytes:
      description: Their size in bytes.
      type: int
      returned: success
      sample: 73400320
    verity_measured:
      description: Number of objects whose digest the kernel measured (they have fs-verity).
      type: int
      returned: success
      sample: 1840
    images:
      description: Number of images checked.
      type: int
      returned: success
      sample: 2
    refs:
      description: Number of refs checked.
      type: int
      returned: success
      sample: 2
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs import store_admin
from ..module_utils.composefs.errors import ComposefsError
from ..module_utils.composefs.store import Store
from ..module_utils.composefs.store_fsck import FsckResult, check


def _counts(fsck):
    return {"objects": fsck.objects, "object_bytes": fsck.object_bytes, "verity_measured": fsck.verity_measured,
            "images": fsck.images, "refs": fsck.refs}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            repair=dict(type="bool", default=False),
            fail_on_findings=dict(type="bool", default=True),
            threads=dict(type="int"),
            allow_foreign_owner=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    location = module.params["path"]
    threads = module.params["threads"]
    if threads is not None and threads < 1:
        module.fail_json(msg="threads must be at least 1 (got %d)" % threads)
    repair = module.params["repair"] and not module.check_mode
    if module.check_mode and store_admin.path_state(location) in (store_admin.MISSING, store_admin.EMPTY):
        module.exit_json(changed=False, clean=True, findings=[], remaining=[], notes=[], damaged=[], moved=[],
                         counts=_counts(FsckResult()),
                         msg="store %s does not exist yet: nothing to check" % location)
    try:
        with Store(location, notice=None, allow_foreign=module.params["allow_foreign_owner"]) as store:
            store.check()  # not a store at all: fail here, not as a finding
            fsck = check(store, repair=repair, threads=threads)
    except ComposefsError as exc:
        module.fail_json(msg="store %s: %s" % (location, exc))
    except OSError as exc:
        where = os.fsdecode(exc.filename) + ": " if exc.filename else ""
        module.fail_json(msg="store %s: %s%s" % (location, where, exc.strerror or exc))
    damaged = [os.fsdecode(p) for p, _identity in fsck.damaged]
    remaining = list(fsck.errors if fsck.remaining is None else fsck.remaining)
    findings = list(fsck.errors)
    result = dict(
        changed=bool(fsck.moved) or (module.check_mode and module.params["repair"] and bool(damaged)),
        clean=not remaining, findings=findings, remaining=remaining, notes=list(fsck.notes), damaged=damaged,
        moved=list(fsck.moved), counts=_counts(fsck),
    )
    if module._diff:
        moved_from = set(m.split(" -> ", 1)[0] for m in fsck.moved)
        left = [] if module.check_mode and module.params["repair"] else [d for d in damaged if d not in moved_from]
        result["diff"] = {"before": {"damaged": damaged}, "after": {"damaged": left}}
    if remaining and module.params["fail_on_findings"]:
        result["msg"] = "store %s: %d problem%s%s: %s" % (
            location, len(remaining), "" if len(remaining) == 1 else "s", " after the repair" if repair else "",
            "; ".join(remaining[:5]) + ("; ..." if len(remaining) > 5 else ""))
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
