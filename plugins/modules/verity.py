#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: verity
short_description: Enable fs-verity on files and trees, checking their digests first
version_added: 0.1.0
description:
  - Enables fs-verity on the regular files named by O(paths) (and, with O(recurse), on the regular files in the
    directories named there) that do not have it yet. A file with fs-verity cannot be modified any more, and
    overlayfs can check its digest on every open (what composefs mounts with verity rely on).
  - Before enabling, the fs-verity digest of every file is computed in userspace (sha256, 4096-byte blocks, no
    salt, as composefs and C(fsverity digest) use). With O(expected_digest), a different digest fails the task
    and nothing is enabled. After enabling, the digest the kernel measures is compared with the one computed
    before, so a file that changed in between is reported.
  - Files that already have fs-verity are left alone; their digest is the one the kernel reports.
  - Whether the filesystem supports fs-verity is asked of the kernel for every file without changing anything, so
    check mode predicts exactly, and a task that fails for lack of support enables nothing.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  paths:
    description:
      - Regular files, or directories with O(recurse).
      - A path named here may be a symbolic link (it is followed). Inside directories, symbolic links are never
        followed, and entries that are neither regular files nor directories are skipped.
      - A file named twice, or reached through several hard links, is handled once.
      - In check mode a path that does not exist yet (an earlier task of the play would make it) is no error - it is
        listed in RV(missing), the task reports a change and warns (and O(expected_digest) cannot be checked yet).
    type: list
    elements: path
    required: true
  recurse:
    description:
      - Enable fs-verity on every regular file below the directories in O(paths). Without it a directory in
        O(paths) fails the task.
    type: bool
    default: false
  expected_digest:
    description:
      - The fs-verity sha256 digest (64 hex digits, optionally prefixed with C(sha256:) as C(fsverity measure)
        prints it) the file must have. Only valid when O(paths) names exactly one regular file.
      - On a mismatch the task fails and fs-verity is not enabled. Also checked, and failing, when fs-verity is
        already on or when O(unsupported=skip) skips enabling.
    type: str
  unsupported:
    description:
      - What to do when the filesystem of a file has no fs-verity (kernel built without it, ext4 without the
        C(verity) feature, tmpfs, ...).
      - V(fail) fails the task before anything is enabled.
      - V(skip) leaves such files alone (a warning says so) and still reports their digests, and enables fs-verity
        on the other files.
    type: str
    choices: [fail, skip]
    default: fail
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - composefs.fleet.attributes
notes:
  - Enabling fs-verity fails for a file that is open for writing anywhere (ETXTBSY); close the writers first.
  - Files are hashed on every run unless they already have fs-verity, so the first run over a large tree costs a
    full read; later runs only ask the kernel.
  - fs-verity cannot be disabled again; to change such a file, replace it with a new copy.
  - In diff mode, C(before) and C(after) list (in C(fsverity_enabled)) the files examined that have fs-verity
    before and after the task.
requirements:
  - Linux with C(CONFIG_FS_VERITY) and a filesystem with fs-verity (ext4 with the C(verity) feature, f2fs, btrfs)
    to enable anything; the digests are computed everywhere.
seealso:
  - module: composefs.fleet.store
    description: A store on a filesystem with fs-verity gives its objects fs-verity itself.
  - module: composefs.fleet.mount
    description: Mount composefs images, requiring fs-verity on the objects.
  - module: composefs.fleet.image
    description: Build images into a store.
"""

EXAMPLES = r"""
- name: Protect an image file, refusing any other content
  composefs.fleet.verity:
    paths:
      - /srv/images/app.cfs
    expected_digest: 6b3bfbdcad8ca13e06d0ad42d1fdd858a3c55bf01ab2e99e645b77983d16b3ba

- name: Protect every object of a store copied from elsewhere
  composefs.fleet.verity:
    paths:
      - /var/lib/composefs/store/objects
    recurse: true
  register: verity

- name: Report digests only where fs-verity is missing
  composefs.fleet.verity:
    paths:
      - /srv/images/app.cfs
    unsupported: skip
"""

RETURN = r"""
missing:
  description: In check mode, the paths of O(paths) that do not exist yet; always empty outside check mode.
  returned: always
  type: list
  elements: str
  sample: []
files:
  description: Every regular file examined, in the order of O(paths) (trees in sorted order).
  returned: always
  type: list
  elements: dict
  contains:
    file:
      description: The file's name (a name from O(paths), or such a directory joined with the path below it).
      type: str
      returned: always
      sample: /srv/images/app.cfs
    digest:
      description: The fs-verity digest in hex (computed in userspace, or measured by the kernel if fs-verity was
        already on).
      type: str
      returned: always
      sample: 6b3bfbdcad8ca13e06d0ad42d1fdd858a3c55bf01ab2e99e645b77983d16b3ba
    verity_before:
      description: Whether the file had fs-verity before the task.
      type: bool
      returned: always
      sample: false
    verity_after:
      description: Whether the file has fs-verity after the task (in check mode, would have).
      type: bool
      returned: always
      sample: true
    verity_supported:
      description: Whether the file's filesystem supports fs-verity.
      type: bool
      returned: always
      sample: true
enabled:
  description: Number of files fs-verity was enabled on (in check mode, would be; a path of RV(missing) counts as one).
  returned: always
  type: int
  sample: 3
verity_supported:
  description: Whether the filesystems of all the files examined support fs-verity (V(true) when there were none).
  returned: always
  type: bool
  sample: true
verity_problem:
  description: Why fs-verity is not supported for the first file where it is not; null otherwise.
  returned: always
  type: str
  sample: "/srv/a: fs-verity is not supported: measure on tmpfs: ... (errno 25, ENOTTY)"
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs.errors import ComposefsError
from ..module_utils.composefs import verity_files


def _threads():
    return max(1, min(4, os.cpu_count() or 1))


def _result(planned, enabled):
    return dict(
        files=[vf.as_dict() for vf in planned.files],
        enabled=enabled,
        verity_supported=planned.verity_supported,
        verity_problem=planned.verity_problem,
    )


def _verity_list(planned, attribute):
    return {"fsverity_enabled": sorted(vf.name for vf in planned.files if getattr(vf, attribute))}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            paths=dict(type="list", elements="path", required=True),
            recurse=dict(type="bool", default=False),
            expected_digest=dict(type="str"),
            unsupported=dict(type="str", default="fail", choices=["fail", "skip"]),
        ),
        supports_check_mode=True,
    )
    params = module.params
    if not params["paths"]:
        module.fail_json(msg="paths is empty: name at least one file or directory")
    skip = params["unsupported"] == "skip"
    paths, missing = params["paths"], []
    if module.check_mode:
        # A fresh node in check mode: what an earlier task would make is not there yet.
        missing = [p for p in paths if not os.path.lexists(p)]
        paths = [p for p in paths if p not in missing]
        if missing:
            module.warn("%s do%s not exist yet (check mode): fs-verity would be enabled on what is there then"
                        % (", ".join(missing), "es" if len(missing) == 1 else ""))
    try:
        planned = verity_files.plan(paths, recurse=params["recurse"],
                                    expected_digest=params["expected_digest"] if not missing else None,
                                    threads=_threads())
    except (ComposefsError, OSError) as exc:
        module.fail_json(msg=str(exc))
    unsupported = planned.unsupported
    if unsupported and not skip:
        module.fail_json(msg="%s (%d of %d file(s) affected; unsupported=skip leaves them alone); "
                             "nothing was enabled" % (planned.verity_problem, len(unsupported), len(planned.files)),
                         **_result(planned, 0))
    before = _verity_list(planned, "verity_after")
    to_enable = planned.to_enable
    changed = bool(to_enable)
    if changed and not module.check_mode:
        try:
            done = verity_files.enable(planned, skip_unsupported=skip)
        except verity_files.EnableError as exc:
            module.fail_json(msg=str(exc), changed=bool(exc.enabled), **_result(planned, len(exc.enabled)))
        except (ComposefsError, OSError) as exc:
            module.fail_json(msg=str(exc), **_result(planned, 0))
        count = len(done)
        changed = bool(done)
    else:
        for vf in to_enable:
            vf.verity_after = True
        count = len(to_enable)
    if planned.unsupported:
        module.warn("fs-verity left off on %d file(s) whose filesystem lacks it: %s"
                    % (len(planned.unsupported), planned.verity_problem))
    result = dict(changed=changed or bool(missing), missing=missing, **_result(planned, count + len(missing)))
    if module._diff:
        # What check mode cannot see yet would have fs-verity too: the diff says so.
        after = _verity_list(planned, "verity_after")
        after["fsverity_enabled"] = sorted(after["fsverity_enabled"] + missing)
        result["diff"] = {"before": before, "after": after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
