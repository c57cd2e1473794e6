# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment(object):
    # trusted_keys and revoked_keys: the signed-ref trust options of image, image_send and mount.
    DOCUMENTATION = r"""
options:
  trusted_keys:
    description:
      - The ed25519 public keys whose signatures vouch for a ref (signed refs, C(composefs-store sign)). When given,
        a ref is accepted only with a signed statement (C(signatures/<ref>) in the store) by one of these keys that
        names this ref and this image, has not expired, was not signed in the future, and is not older than the
        statement the store already holds for the ref (rollback). A missing signature is then an error.
      - Each item is a path on the node (a key file, or a directory whose regular files not starting with a dot are
        key files, as C(/etc/composefs-fleet/keys/trusted.d)) or the key's text. Key files and texts are PEM
        (C(openssl pkey -pubout)) or ostree's ed25519 format (one base64 key per line).
      - A path is absolute and one line; anything else is taken as a key's text.
      - Given but holding no key (an empty directory), the task fails rather than go on unchecked.
      - Never logged or shown.
      - Needs the Python package C(cryptography) on the node.
    type: list
    elements: str
  revoked_keys:
    description:
      - Public keys whose signatures never count, even when they are in O(trusted_keys); as O(trusted_keys) (paths
        on the node or key texts).
      - Never logged or shown.
    type: list
    elements: str
"""
