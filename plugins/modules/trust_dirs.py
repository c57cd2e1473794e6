#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: trust_dirs
short_description: Remove from key and certificate directories every file no list names
version_added: 0.1.0
description:
  - Makes each directory given hold no file but those it keeps (a trusted key taken off the list is no longer
    trusted, a revoked key no longer revoked, a certificate no longer loaded at boot), and removes the paths
    given in O(absent).
  - The role C(composefs.fleet.composefs_node) runs it once for its trusted and revoked keys, its fs-verity
    certificates and the unit that loads them; one module run, also where nothing is configured, so that a node
    whose lists became empty still gets its directories emptied.
  - A directory that does not exist holds nothing to remove; it is not created. Symbolic links are removed, never
    followed; a directory inside a listed directory is removed with its contents.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  dirs:
    description: The directories to prune.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: The directory (absolute path).
        type: path
        required: true
      keep:
        description: The names of the files the directory keeps (plain names, no C(/)).
        type: list
        elements: str
        default: []
  absent:
    description: Further paths (absolute) that must not exist, such as a unit that is no longer configured.
    type: list
    elements: path
    default: []
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - composefs.fleet.attributes
"""

EXAMPLES = r"""
- name: Only release.pub stays trusted
  composefs.fleet.trust_dirs:
    dirs:
      - path: /etc/composefs-fleet/keys/trusted.d
        keep: [release.pub]
      - path: /etc/composefs-fleet/keys/revoked.d
    absent:
      - /etc/systemd/system/sysinit.target.wants/composefs-fleet-fsverity-keys.service
"""

RETURN = r"""
removed:
  description: The paths removed (in check mode, those that would be), in the order of O(dirs), then O(absent).
  returned: always
  type: list
  elements: str
  sample:
    - /etc/composefs-fleet/keys/trusted.d/old.pub
"""

import os
import shutil

from ansible.module_utils.basic import AnsibleModule


def unwanted(dirs, absent):
    """The paths to remove: each directory's entries it does not keep (sorted), then the absent paths that exist."""
    found = []
    for item in dirs:
        path = item["path"]
        # A directory path that is a symbolic link is not followed into.
        names = os.listdir(path) if os.path.isdir(path) and not os.path.islink(path) else []
        keep = set(item["keep"] or [])
        found.extend(os.path.join(path, name) for name in sorted(names) if name not in keep)
    found.extend(path for path in absent if os.path.lexists(path) and path not in found)
    return found


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dirs=dict(type="list", elements="dict", default=[], options=dict(
                path=dict(type="path", required=True),
                keep=dict(type="list", elements="str", default=[], no_log=False),
            )),
            absent=dict(type="list", elements="path", default=[]),
        ),
        supports_check_mode=True,
    )
    for item in module.params["dirs"]:
        bad = [name for name in item["keep"] if not name or "/" in name or name in (".", "..")]
        if bad or not os.path.isabs(item["path"]):
            module.fail_json(msg="trust_dirs: %s: give an absolute directory and plain file names to keep (not %s)"
                             % (item["path"], ", ".join(repr(name) for name in bad) or "a relative path"))
    relative = [path for path in module.params["absent"] if not os.path.isabs(path)]
    if relative:
        module.fail_json(msg="trust_dirs: absent: give absolute paths (not %s)" % ", ".join(relative))
    try:
        found = unwanted(module.params["dirs"], module.params["absent"])
    except OSError as exc:
        module.fail_json(msg="trust_dirs: cannot list %s: %s" % (exc.filename, exc.strerror or exc))
    if not module.check_mode:
        for path in found:
            try:
                remove(path)
            except OSError as exc:
                module.fail_json(msg="trust_dirs: cannot remove %s: %s" % (path, exc.strerror or exc), removed=found)
    result = dict(changed=bool(found), removed=found)
    if module._diff:
        result["diff"] = {"before": "".join(path + "\n" for path in found), "after": "",
                          "before_header": "paths no list names", "after_header": "paths no list names"}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
