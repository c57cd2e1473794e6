#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: deprecated_names
short_description: Warn that old role or variable names of this collection are in use
version_added: 0.1.0
description:
  - Shows an Ansible deprecation warning for each old name given, naming the new one and the collection version
    that removes the old one.
  - The roles C(composefs.fleet.composefs_node) and C(composefs.fleet.composefs_agent) run it when a play still
    sets variables under their old names (C(node_*), C(agent_*)) or calls them by their old role names
    (C(composefs.fleet.node), C(composefs.fleet.agent)). Not meant to be used on its own.
  - Changes nothing, on the node or elsewhere.
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  role:
    description: The role (its new, fully qualified name) whose old names are in use, for the messages.
    type: str
    required: true
  old_role:
    description: The role's old name, when the play called the role by it.
    type: str
  variables:
    description: Old variable names that are set, each mapped to its new name.
    type: dict
    default: {}
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: posix
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
notes:
  - The old names are removed in version 1.0.0 of composefs.fleet.
"""

EXAMPLES = r"""
- name: Old variable names still in use
  composefs.fleet.deprecated_names:
    role: composefs.fleet.composefs_node
    variables:
      node_stores: composefs_node_stores
"""

RETURN = r"""
deprecated:
  description: The deprecation messages shown, one per old name.
  returned: always
  type: list
  elements: str
  sample:
    - "composefs.fleet.composefs_node: the variable node_stores is deprecated, set composefs_node_stores instead"
"""

from ansible.module_utils.basic import AnsibleModule


def messages(role, old_role, variables):
    """The deprecation messages, the role's old name first, then the variables in name order."""
    found = []
    if old_role:
        found.append("the role name %s is deprecated, use %s instead" % (old_role, role))
    for old in sorted(variables):
        found.append("%s: the variable %s is deprecated, set %s instead" % (role, old, variables[old]))
    return found


def main():
    module = AnsibleModule(
        argument_spec=dict(
            role=dict(type="str", required=True),
            old_role=dict(type="str"),
            variables=dict(type="dict", default={}),
        ),
        supports_check_mode=True,
    )
    found = messages(module.params["role"], module.params["old_role"], module.params["variables"])
    for text in found:
        # 1.0.0: the first release without the old names (one release after the renaming); a literal, as
        # ansible-test's pylint checks the version here.
        module.deprecate(text, version="1.0.0", collection_name="composefs.fleet")
    module.exit_json(changed=False, deprecated=found)


if __name__ == "__main__":
    main()
