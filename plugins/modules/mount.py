#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: mount
short_description: Mount composefs images, persistently through a systemd mount unit
version_added: 0.1.0
description:
  - Mounts a composefs image (EROFS metadata plus an overlayfs over the object store) at O(path), with the same
    code as the collection's C(mount.composefs) helper, and makes the mount persistent with a systemd C(.mount)
    unit in O(unit_dir) instead of an C(/etc/fstab) line.
  - The states mean what they mean for M(ansible.posix.mount) - V(mounted) writes the unit and mounts,
    V(present) only writes the unit, V(unmounted) only unmounts, V(absent) unmounts and removes the unit,
    V(remounted) always mounts again, V(ephemeral) mounts without a unit.
  - The live mount is compared, not only the unit - C(/proc/self/mountinfo) tells whether a composefs overlay is
    mounted at O(path) and with which basedirs, upper and work directories and verity mode; the mount record that
    every mount made by this collection leaves under C(/run/composefs-fleet/mounts/) tells which image (the
    kernel does not show it). A mount that differs from the request (another image, other basedirs, another
    verity mode, other upper or work directories, or no record, so that its image is unknown) is switched to the
    request by O(state=mounted) and O(state=ephemeral); RV(differences) says what differed, the diff from what
    to what.
  - "Switching never unmounts first and never fails because the mount is busy: the new mount is made, put
    beneath the old one (C(move_mount) with C(MOVE_MOUNT_BENEATH), Linux 6.5+) and the old one is detached
    lazily. New opens see the new image at once, never an empty directory; processes holding files or
    directories of the old image keep reading the old bytes until they close them, and the old mount goes away
    with its last user. Kernels without C(MOVE_MOUNT_BENEATH) get a fallback - the old mount detached, then the
    new one attached - in which new opens see the mount point's own directory for that moment; RV(mount.switch)
    says which way was taken."
  - "Writable mounts (O(upperdir)) are the exception: two overlays must not share an upper directory, so the old
    mount is unmounted before the new one is attached, and the task fails (changing nothing) while a process uses
    it."
  - The previous image of every mount point is remembered, across reboots, in
    C(/var/lib/composefs-fleet/mounts/) (RV(mount.previous)); C(composefs-store gc) and M(composefs.fleet.gc)
    keep it, and its objects, while the mount lives and until it moves again, so rolling back works offline -
    mount the previous image by its digest (see the examples). V(absent) forgets it.
  - "Signed refs: with O(require_signature=true), O(image) must be a ref in O(store) whose signed statement
    (C(signatures/<ref>), see C(composefs-store sign)) is by one of O(trusted_keys), not revoked, names this ref and
    the image the ref names, and has not expired; otherwise the task fails before anything is mounted, unmounted
    or written."
author:
  - composefs-fleet contributors (@composefs-fleet)
options:
  path:
    description:
      - The mount point, an absolute path. Symbolic links in it are resolved (systemd requires that of C(Where=)).
      - Created (mode 0755) by O(state=mounted) and O(state=remounted) when missing, removed again if the mount
        then fails. O(state=absent) removes it when it is empty and the task unmounted or removed something.
    type: path
    required: true
    aliases: [name]
  image:
    description:
      - The image to mount - a ref name or a 64 hex digit image digest (optionally prefixed with C(sha256:)) in
        O(store), or the absolute path of an image file.
      - Required with O(state=mounted), O(state=present), O(state=remounted) and O(state=ephemeral); ignored
        otherwise.
      - In check mode, a store, ref or image file that does not exist yet (an earlier task of the play would make it)
        is no error - the result says what would be mounted, with the image digest unknown (null).
    type: str
  store:
    description:
      - The composefs store holding the image named by O(image) (needed when O(image) is a ref or digest).
      - Its C(objects/) directory is the default O(basedir).
    type: path
  basedir:
    description:
      - Object directories (overlayfs data layers), first one searched first.
      - Default - C(objects/) of O(store). Required when O(store) is not given.
    type: list
    elements: path
  verity:
    description:
      - fs-verity checking of the files read through the mount (overlayfs C(verity=require)).
      - V(require) - always; the task fails now if the filesystem of a basedir has no fs-verity.
      - V(auto) - require it when the filesystems of all basedirs support fs-verity, else off; decided when the
        task runs, and the unit carries the decision.
      - V(boot) - like V(auto) when the task mounts, but the unit asks the mount helper to decide again at every
        boot (C(tryverity)). V(on) is the old name of V(boot) and still accepted.
      - V(off) - no fs-verity checks.
    type: str
    choices: [require, boot, "on", "off", auto]
    default: auto
  digest:
    description:
      - Pin the image - the mount checks that the image file's fs-verity digest (measured by the kernel) is this
        one (64 hex digits, optionally prefixed with C(sha256:)). Needs fs-verity on the image file.
      - The task fails before mounting when the image's digest computed here differs.
    type: str
  pin_digest:
    description:
      - Pin the image to its own digest (its name in the store, or the digest computed of an image file), as
        O(digest) would.
    type: bool
    default: false
  upperdir:
    description:
      - Writable overlayfs upper directory (makes the mount writable). Needs O(workdir).
    type: path
  workdir:
    description:
      - overlayfs work directory on the same filesystem as O(upperdir).
    type: path
  state:
    description:
      - V(mounted) - the unit is written and enabled, and the image is mounted; an existing composefs mount that
        differs is switched to it (see above).
      - V(ephemeral) - mounted (or switched) as with V(mounted), but no unit is written or changed - a one-off mount
        that does not come back at boot.
      - V(present) - the unit is written and enabled; nothing is mounted or unmounted.
      - V(unmounted) - composefs mounts at O(path) are unmounted; the unit is left alone.
      - V(absent) - unmounted, and the unit and its C(local-fs.target.wants) link removed.
      - V(remounted) - mounted again (a switch to a fresh mount, also of the same image) and the unit written;
        always reports a change.
    type: str
    required: true
    choices: [mounted, unmounted, present, absent, remounted, ephemeral]
  unit_dir:
    description:
      - Directory of the systemd unit (its name is the escaped mount point, for example C(srv-app.mount)).
      - The unit is enabled with a symbolic link in C(local-fs.target.wants/) below it. When systemd runs (PID 1)
        and O(unit_dir) is C(/etc/systemd/system), C(systemctl enable) and C(systemctl disable) do that, and
        C(systemctl daemon-reload) follows every change of the unit.
    type: path
    default: /etc/systemd/system
  allow_foreign_owner:
    description:
      - Accept a store whose directory or store subdirectories belong to another user (not the one running the
        module, not root) or are writable by group or others.
      - By default such a store is refused, since whoever can write there could swap its contents under the module.
      - Matters only when O(image) names an image in O(store) (a ref or digest), the case where the store is opened.
    type: bool
    default: false
  require_signature:
    description:
      - The ref O(image) names must verify with O(trusted_keys) and O(revoked_keys) (see above) for
        O(state=mounted), O(state=present) and O(state=remounted); else the task fails and nothing is mounted or
        written.
      - O(image) must then be a ref (a digest or an image file has no signed statement), and O(trusted_keys) is
        required.
      - The check is made every time the task runs, also when the mount is already there.
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - composefs.fleet.attributes
  - composefs.fleet.trust
notes:
  - Needs root (CAP_SYS_ADMIN). Linux 6.5+ for data-only overlay layers; fs-verity checks need 6.6+ and a basedir
    filesystem with fs-verity.
  - Paths may hold spaces, commas, colons and C(=) - the mount passes each of them to the kernel separately. A
    basedir, upper or work directory holding a comma cannot be written into a unit (mount(8) splits unit options
    on commas), nor can any path holding a newline; the task then fails before doing anything.
  - Unmounting (V(unmounted), V(absent)) a busy mount does not detach it lazily - the task fails and says it is in
    use. Switching (V(mounted), V(ephemeral), V(remounted)) is never refused for that.
  - Something other than a composefs mount at O(path) is never unmounted; the task fails instead.
  - The image is identified by its fs-verity digest computed in user space, so identical images in two places
    count as the same image.
  - The unit names the image file itself (for a store, C(images/<digest>)), so a ref that moves later changes
    nothing until the task runs again; the same task then switches the mount and rewrites the unit in one step, so
    a reboot brings up the image the mount shows.
  - In diff mode, C(before) and C(after) hold the mount (C(mounted), C(image_digest), C(basedirs), C(verity),
    C(upperdir), C(workdir)), the unit text as a list of lines (null without a unit) and C(enabled).
  - Mount records live in C(/run) and vanish at reboot; a mount made at boot by the unit (through the
    collection's C(mount.composefs) helper) writes its record again. Mounts made by other tools have none.
requirements:
  - Linux with EROFS and overlayfs.
  - The Python package C(cryptography) on the node with O(require_signature=true).
seealso:
  - module: composefs.fleet.store
    description: Create the object store.
  - module: composefs.fleet.image
    description: Build images into a store.
  - module: composefs.fleet.info
    description: Facts about stores, images and mounts.
  - module: composefs.fleet.verity
    description: Enable fs-verity on files and trees.
  - module: ansible.posix.mount
    description: The model for the states.
"""

EXAMPLES = r"""
- name: Mount the image the ref app/current names, now and at every boot
  composefs.fleet.mount:
    path: /srv/app
    store: /var/lib/composefs/store
    image: app/current
    state: mounted
  register: app_mount

- name: Say what the mount showed before (switched when the ref had moved)
  ansible.builtin.debug:
    msg: "{{ app_mount.mount.previous }} -> {{ app_mount.mount.image_digest }}"
  when: app_mount is changed

- name: Roll back to the image shown before the last switch (kept by gc, so this works offline)
  composefs.fleet.mount:
    path: /srv/app
    store: /var/lib/composefs/store
    image: "{{ app_mount.mount.previous.image_digest }}"
    state: mounted
  when: health_check is failed

- name: A one-off mount that does not come back at boot
  composefs.fleet.mount:
    path: /mnt/inspect
    store: /var/lib/composefs/store
    image: app/candidate
    state: ephemeral

- name: Mount an image file with a writable upper layer, requiring fs-verity
  composefs.fleet.mount:
    path: /srv/scratch
    image: /var/lib/images/scratch.cfs
    basedir:
      - /var/lib/composefs/store/objects
    upperdir: /var/lib/scratch/upper
    workdir: /var/lib/scratch/work
    verity: require
    state: mounted

- name: Mount app/current only if a key the node trusts signed that ref for the image it names
  composefs.fleet.mount:
    path: /srv/app
    store: /var/lib/composefs/store
    image: app/current
    require_signature: true
    trusted_keys:
      - /etc/composefs-fleet/keys/trusted.d
    revoked_keys:
      - /etc/composefs-fleet/keys/revoked.d
    state: mounted

- name: Remove the mount and its unit
  composefs.fleet.mount:
    path: /srv/app
    state: absent
"""

RETURN = r"""
mount:
  description: The mount after the task (in check mode, as it would be).
  returned: always
  type: dict
  contains:
    where:
      description: The mount point (symbolic links resolved).
      type: str
      returned: always
      sample: /srv/app
    image_file:
      description: The image file mounted (or to be mounted); null when unknown.
      type: str
      returned: always
      sample: /var/lib/composefs/store/images/4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27
    image_digest:
      description: The fs-verity (sha256) digest of that image file; null when unknown.
      type: str
      returned: always
      sample: 4c1d0a0a5e0c5f1e9a8bd13ab8a4c0c3d7b5ab4b6aef0ef2a0a7bb2f1e0b1f27
    basedirs:
      description: The object directories.
      type: list
      elements: str
      returned: always
      sample: [/var/lib/composefs/store/objects]
    verity:
      description: The verity mode of the mount, V(require) or V(off); null when not mounted and not requested.
      type: str
      returned: always
      sample: "off"
    unit_name:
      description: The systemd unit name.
      type: str
      returned: always
      sample: srv-app.mount
    unit_file:
      description: The unit file path.
      type: str
      returned: always
      sample: /etc/systemd/system/srv-app.mount
    mounted:
      description: Whether a composefs image is mounted at RV(mount.where).
      type: bool
      returned: always
      sample: true
    differences:
      description: Same as the top-level RV(differences).
      type: list
      elements: str
      returned: always
      sample: []
    record:
      description: The mount record file of the mount; null when there is none.
      type: str
      returned: always
      sample: /run/composefs-fleet/mounts/srv-app.mount@4026531832.json
    ref:
      description:
        - The ref O(image) names in O(store), null when O(image) is a digest or a file (or is not needed by the
          state).
        - What the node agent re-verifies for this mount (its configuration's C(ref)).
      type: str
      returned: always
      sample: app/current
    previous:
      description:
        - The image the mount point showed before its last switch (before this task's switch, when it switched); null
          when unknown or there was none. Mount it by RV(mount.previous.image_digest) to roll back.
      type: dict
      returned: always
      contains:
        image_file:
          description: The image file.
          type: str
        image_digest:
          description: Its fs-verity digest (64 hex digits).
          type: str
        ref:
          description: The ref it was mounted by, null when mounted by digest or file.
          type: str
      sample: {"image_file": "/var/lib/composefs/store/images/9f2c...e1", "image_digest": "9f2c...e1",
               "ref": "app/current"}
    switch:
      description:
        - How this task mounted - V(attach) (nothing was mounted), V(beneath) (switched atomically) or
          V(detach-attach) (switched on a kernel without C(MOVE_MOUNT_BENEATH)) or V(unmount-attach) (a writable
          mount switched); null when it did not mount (or in check mode).
      type: str
      returned: always
      sample: beneath
    signature:
      description: With O(require_signature=true), what the verified statement says; null otherwise.
      type: dict
      returned: always
      sample: {"keys": ["3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"],
               "signed": "2026-12-04T14:40:29Z", "expires": null}
differences:
  description:
    - How the composefs mount found at RV(mount.where) differs from the request, one sentence each, before the
      task acted. Empty when nothing was mounted or it matched.
  returned: always
  type: list
  elements: str
  sample:
    - "image: 9f2c...e1 is mounted (/var/lib/composefs/store/images/9f2c...e1), 4c1d...27 is wanted"
action:
  description: What the task did (or would do in check mode), comma-separated, or V(none).
  returned: always
  type: str
  sample: switched, updated unit
actions:
  description: The same as a list.
  returned: always
  type: list
  elements: str
  sample: [mounted, wrote unit, enabled unit]
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.composefs import mount_history, mount_record, mountinfo
from ..module_utils.composefs.errors import ComposefsError, SignatureError
from ..module_utils.composefs.fsverity_digest import digest_file
from ..module_utils.composefs.mount_state import NOT_MOUNTED, MountRequest, differences, live_mount, resolve_verity
from ..module_utils.composefs.ref_trust import verify_ref
from ..module_utils.composefs.store import Store
from ..module_utils.composefs.store_names import is_hex_name, parse_digest
from ..module_utils.composefs.systemd_unit import (SYSTEMD_UNIT_DIR, daemon_reload, disable_unit, enable_unit,
                                                   manages_unit_dir, systemd_running, unit_name, unit_text,
                                                   write_unit)
from ..module_utils.composefs.trust_options import load_policy, ref_name, statement_info

WANTED_BY = "local-fs.target"


class Fail(Exception):
    """A clear error for fail_json."""


def _fs(path):
    return os.fsdecode(path)


class Signed:
    """The ref a request mounts (None for a digest or a file) and its verified statement (None: not asked for)."""

    def __init__(self):
        self.ref = None
        self.statement = None


def resolve(params, where, need_image, signed=None, policy=None, check_mode=False):
    """The request as a :class:`MountRequest` (verity decided); the ref it names, verified with ``policy``, in ``signed``.

    In check mode a store or image that does not exist yet (an earlier task would make it) leaves the
    image unknown instead of failing: the result says what would be done.
    """
    if signed is None:
        signed = Signed()
    image, store_path = params["image"], params["store"]
    if image is not None and parse_digest(image) is not None:
        image = parse_digest(image)
    image_file = image_digest = pin = None
    if need_image and check_mode and _not_there_yet(image, store_path):
        need_image = False
        if not image.startswith("/") and not is_hex_name(image.lower()):
            signed.ref = ref_name(image)
        image_file = image if image.startswith("/") else None
    elif need_image:
        if policy is not None and (image.startswith("/") or is_hex_name(image.lower())):
            raise Fail("require_signature: image %r is %s, which has no signed statement; name a ref of the store"
                       % (image, "an image file" if image.startswith("/") else "a digest"))
        if image.startswith("/"):
            image_file = os.path.normpath(image)
            if not os.path.isfile(image_file):
                raise Fail("image file %s does not exist (or is not a regular file)" % image_file)
            image_digest = digest_file(image_file).hex()
        else:
            if not store_path:
                raise Fail("image %r is not an absolute path, so it names an image in a store: store is required"
                           % image)
            store = Store.open(store_path, notice=None, allow_foreign=params["allow_foreign_owner"])
            if is_hex_name(image.lower()):
                digest = image.lower()
            else:
                digest = store.read_ref(image)
                signed.ref = ref_name(image)
                if policy is not None:
                    # Before anything is mounted or written: the ref must vouch for this very image.
                    signed.statement = verify_ref(store, image, policy, digest=digest)
            image_file = _fs(store.image_path(digest))
            if not os.path.isfile(image_file):
                raise Fail("image %s is not in the store %s" % (digest, store_path))
            image_digest = digest
    basedirs = []
    if params["basedir"]:
        basedirs = [os.path.normpath(os.path.abspath(d)) for d in params["basedir"]]
    elif store_path:
        basedirs = [os.path.normpath(os.path.join(os.path.abspath(store_path), "objects"))]
    elif need_image:
        raise Fail("basedir is required when store is not given")
    if params["digest"]:
        pin = parse_digest(params["digest"])
        if pin is None:
            raise Fail("digest %r is not a sha256 fs-verity digest (64 hex digits)" % params["digest"])
        if image_digest is not None and pin != image_digest:
            raise Fail("digest %s does not match the image %s, whose fs-verity digest is %s"
                       % (pin, image_file, image_digest))
    elif params["pin_digest"]:
        pin = image_digest
    upper, work = (None if params[w] is None else os.path.abspath(params[w]) for w in ("upperdir", "workdir"))
    if params["image"] is not None or need_image:
        verity = resolve_verity(params["verity"], basedirs, pinned=bool(pin))
        if params["verity"] == "require" and verity.problem and need_image:
            raise Fail("verity=require, but %s (use verity: auto or off there)" % verity.problem)
    else:
        verity = resolve_verity("off", basedirs)
    return MountRequest(where, image_file, image_digest, basedirs, verity, pin, upper, work)


def _not_there_yet(image, store_path):
    """Is the image to mount still missing (store, ref or file), as on a fresh node in check mode?"""
    if image.startswith("/"):
        return not os.path.lexists(image)
    if not store_path or not os.path.isdir(store_path):
        return bool(store_path)
    digest = parse_digest(image)
    if digest is not None:
        return not os.path.lexists(os.path.join(store_path, "images", digest))
    return not os.path.lexists(os.path.join(store_path, "refs", image))


def wanted_unit_text(req):
    """The text of the unit that mounts ``req`` at boot."""
    return unit_text(req.image_file, req.where, req.options(), requires_mounts_for=req.needs(), wanted_by=WANTED_BY)


class Unit:
    def __init__(self, unit_dir, where):
        self.name = unit_name(where)
        self.dir = os.path.normpath(os.path.abspath(unit_dir))  # the wants link must be absolute
        self.file = os.path.join(unit_dir, self.name)
        self.link = os.path.join(unit_dir, WANTED_BY + ".wants", self.name)
        self.text = _read_text(self.file)
        try:
            self.enabled = os.readlink(self.link) == self.file
        except OSError:
            self.enabled = False
        self.link_exists = os.path.lexists(self.link)


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Fail("cannot read %s: %s" % (path, exc.strerror)) from None


class Runner:
    """Carries out the actions (unless check mode) and lists them."""

    def __init__(self, module, where, ref=None, store=None):
        self.module = module
        self.where = where
        self.ref = ref
        self.store = store
        self.actions = []
        self.check = module.check_mode
        self.made_dir = False
        self.record = None
        self.reload_needed = False
        self.switched = False
        self.previous = None  # what the mount point showed before (from the core's history)
        self.method = None  # how the mount was made: attach, beneath, detach-attach or unmount-attach

    def _systemctl(self):
        """(runner, binary) for the systemd_unit helpers: through Ansible's run_command."""
        return self.module.run_command, self.module.get_bin_path("systemctl", required=True)

    def mount(self, req, replace=False, always=False):
        """Mount ``req``; with ``replace``, switch the composefs mount there to it (never "busy")."""
        self.switched = replace
        self.actions.append(("remounted" if always else "switched") if replace else "mounted")
        if self.check:
            return
        if not os.path.isdir(self.where):
            if os.path.lexists(self.where):
                raise Fail("mount point %s exists and is not a directory" % self.where)
            os.makedirs(self.where, mode=0o755)
            self.made_dir = True
        # Imported here: a run that changes nothing (mounts as asked) need not load the mount code.
        from ..module_utils.composefs.mount import mount_composefs

        try:
            result = mount_composefs(req.image_file, self.where, req.basedirs, replace=replace, ref=self.ref,
                                     store=self.store, **req.mount_args())
        except BaseException:
            self.rmdir_made()
            raise
        self.record = result.record_path
        self.method = result.method
        self.previous = result.previous
        if replace and result.replaced is None:
            # Nothing was mounted after all (gone meanwhile): a plain mount.
            self.actions[-1] = "mounted"
            self.switched = False
        if result.record_error:
            self.module.warn("%s is mounted, but no mount record was written (%s): later runs cannot tell which "
                             "image it shows" % (self.where, result.record_error))

    def rmdir_made(self):
        if self.made_dir:
            try:
                os.rmdir(self.where)
            except OSError:
                pass
            self.made_dir = False

    def unmount(self, layers):
        for _layer in range(layers):
            self.actions.append("unmounted")
            if not self.check:
                mount_record.unmount(self.where)

    def forget_history(self):
        if mount_history.load(self.where) is not None:
            self.actions.append("forgot history")
            if not self.check:
                mount_history.forget(self.where)

    def write_unit(self, unit, req, text):
        if text is None and self.check:
            self.actions.append("wrote unit" if unit.text is None else "updated unit")
        elif unit.text != text:
            self.actions.append("wrote unit" if unit.text is None else "updated unit")
            if not self.check:
                os.makedirs(unit.dir, mode=0o755, exist_ok=True)
                write_unit(unit.dir, req.image_file, self.where, req.options(), requires_mounts_for=req.needs(),
                           wanted_by=WANTED_BY)
                self.reload_needed = True
        if not unit.enabled:
            self.actions.append("enabled unit")
            if not self.check:
                if manages_unit_dir(unit.dir):
                    self.daemon_reload()
                    enable_unit(unit.name, *self._systemctl())
                else:
                    os.makedirs(os.path.dirname(unit.link), mode=0o755, exist_ok=True)
                    if os.path.lexists(unit.link):
                        os.unlink(unit.link)
                    os.symlink(unit.file, unit.link)

    def remove_unit(self, unit):
        if unit.link_exists:
            self.actions.append("disabled unit")
            if not self.check:
                if manages_unit_dir(unit.dir) and unit.text is not None:
                    disable_unit(unit.name, *self._systemctl())
                if os.path.lexists(unit.link):
                    os.unlink(unit.link)
                _rmdir_quietly(os.path.dirname(unit.link))
        if unit.text is not None:
            self.actions.append("removed unit")
            if not self.check:
                os.unlink(unit.file)
                self.reload_needed = True

    def daemon_reload(self):
        if self.reload_needed and not self.check and systemd_running():
            daemon_reload(*self._systemctl())
        self.reload_needed = False


def _rmdir_quietly(path):
    try:
        os.rmdir(path)
    except OSError:
        pass


def _diff_state(mounted_state, unit_text_value, enabled):
    out = dict(mounted_state)
    # One list item per line: Ansible renders dict diffs as JSON, so a
    # line-wise unit diff stays readable.
    out["unit"] = None if unit_text_value is None else unit_text_value.splitlines()
    out["enabled"] = enabled
    return out


def _previous_info(previous):
    if not previous:
        return None
    return {"image_file": previous.get("image"), "image_digest": previous.get("image_digest"), "ref": previous.get("ref")}


def run(module):
    params = module.params
    state = params["state"]
    raw = params["path"]
    if not raw.startswith("/"):
        raise Fail("path must be an absolute path, got %r" % raw)
    where = mountinfo.canonical(raw)
    need_image = state in ("mounted", "present", "remounted", "ephemeral")
    policy = None
    if need_image and params["require_signature"]:
        policy = load_policy(params["trusted_keys"], params["revoked_keys"], module.tmpdir)
    signed = Signed()
    req = resolve(params, where, need_image, signed, policy, check_mode=module.check_mode)
    unit = Unit(params["unit_dir"], where)
    live = live_mount(where)
    foreign = live.foreign()
    if foreign and state != "present":
        raise Fail("something other than a composefs image is mounted at %s: %s; not touching it" % (where, foreign))
    if req.image_digest is None and need_image:
        # Check mode on a node where the store or image is still to be made: what is there cannot be
        # compared yet, so a mount there would be switched.
        diffs = ["image: not known before the store exists (check mode)"] if live.mounted else []
    else:
        diffs = [str(d) for d in differences(live, req)] if need_image else []
    before = _diff_state(live.state(), unit.text, unit.enabled)
    runner = Runner(module, where, signed.ref, params["store"])
    after_mounted = live.state()
    if need_image:
        wanted_state = req.state()
        # None: the image is not known yet (check mode before the store exists).
        wanted_text = wanted_unit_text(req) if req.image_file is not None else None
    if state in ("mounted", "ephemeral"):
        if not live.mounted:
            runner.mount(req)
            after_mounted = wanted_state
        elif diffs:
            runner.mount(req, replace=True)
            after_mounted = wanted_state
        if state == "mounted":
            try:
                runner.write_unit(unit, req, wanted_text)
            except BaseException:
                if runner.actions[:1] == ["mounted"] and not module.check_mode:
                    _undo_mount(runner)
                raise
    elif state == "remounted":
        runner.mount(req, replace=live.mounted, always=True)
        after_mounted = wanted_state
        runner.write_unit(unit, req, wanted_text)
    elif state == "present":
        runner.write_unit(unit, req, wanted_text)
    elif state == "unmounted":
        runner.unmount(live.layers)
        after_mounted = NOT_MOUNTED
    else:  # absent
        runner.unmount(live.layers)
        after_mounted = NOT_MOUNTED
        runner.remove_unit(unit)
        runner.forget_history()
        # As ansible.posix.mount: the mount point goes with the mount, if empty
        # (not an action of its own: an empty directory alone is no mount).
        if runner.actions and not module.check_mode and os.path.isdir(where) and not os.path.islink(where):
            _rmdir_quietly(where)
    runner.daemon_reload()
    if state in ("present", "mounted", "remounted"):
        after_unit, after_enabled = wanted_text, True
    elif state == "absent":
        after_unit, after_enabled = None, False
    else:
        after_unit, after_enabled = unit.text, unit.enabled
    changed = bool(runner.actions) or state == "remounted"
    record = runner.record
    if record is None and live.record is not None and state in ("mounted", "present", "ephemeral"):
        record = mount_record.record_path(where)
    if runner.switched and not module.check_mode:
        previous = _previous_info(runner.previous)
    elif runner.switched and live.record and live.record.get("image_digest") != req.image_digest:
        previous = _previous_info(mount_history.previous_of(live.record))  # what the switch would make previous
    else:
        previous = _previous_info((mount_history.load(where) or {}).get("previous"))
    info = {
        "where": where,
        "image_file": req.image_file if need_image else (live.record or {}).get("image"),
        "image_digest": req.image_digest if need_image else (live.record or {}).get("image_digest"),
        "basedirs": list(req.basedirs) if need_image else (live.layout or {}).get("basedirs", []),
        "verity": after_mounted["verity"] if after_mounted["mounted"] else (req.verity.effective if need_image else None),
        "unit_name": unit.name,
        "unit_file": unit.file,
        "mounted": after_mounted["mounted"],
        "differences": diffs,
        "record": record if after_mounted["mounted"] else None,
        "ref": signed.ref,
        "signature": None if signed.statement is None else statement_info(signed.statement),
        "previous": previous,
        "switch": runner.method,
    }
    result = {
        "changed": changed,
        "mount": info,
        "differences": diffs,
        "actions": runner.actions,
        "action": ", ".join(runner.actions) or "none",
    }
    if module._diff:
        result["diff"] = {"before": before, "after": _diff_state(after_mounted, after_unit, after_enabled)}
    return result


def _undo_mount(runner):
    try:
        mount_record.unmount(runner.where)
    except (mount_record.UnmountError, OSError):
        return
    runner.rmdir_made()


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True, aliases=["name"]),
            image=dict(type="str"),
            store=dict(type="path"),
            basedir=dict(type="list", elements="path"),
            verity=dict(type="str", default="auto", choices=["require", "boot", "on", "off", "auto"]),
            digest=dict(type="str"),
            pin_digest=dict(type="bool", default=False),
            upperdir=dict(type="path"),
            workdir=dict(type="path"),
            state=dict(type="str", required=True,
                       choices=["mounted", "unmounted", "present", "absent", "remounted", "ephemeral"]),
            unit_dir=dict(type="path", default=SYSTEMD_UNIT_DIR),
            allow_foreign_owner=dict(type="bool", default=False),
            require_signature=dict(type="bool", default=False),
            trusted_keys=dict(type="list", elements="str", no_log=True),
            revoked_keys=dict(type="list", elements="str", no_log=True),
        ),
        required_if=[
            ("state", "mounted", ["image"]),
            ("state", "present", ["image"]),
            ("state", "remounted", ["image"]),
            ("state", "ephemeral", ["image"]),
            ("require_signature", True, ["trusted_keys"]),
        ],
        required_together=[("upperdir", "workdir")],
        supports_check_mode=True,
    )
    if module.params["digest"] and module.params["pin_digest"]:
        module.fail_json(msg="parameters are mutually exclusive: digest|pin_digest")
    if (module.params["trusted_keys"] or module.params["revoked_keys"]) and not module.params["require_signature"]:
        module.fail_json(msg="trusted_keys and revoked_keys are used only with require_signature: true")
    try:
        result = run(module)
    except Fail as exc:
        module.fail_json(msg=str(exc))
    except SignatureError as exc:
        module.fail_json(msg="%s; nothing was mounted or written" % exc, reason=exc.reason)
    except mount_record.UnmountError as exc:
        module.fail_json(msg=str(exc))
    except ComposefsError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        name = " %s" % _fs(exc.filename) if exc.filename else ""
        module.fail_json(msg="%s:%s %s" % (type(exc).__name__, name, exc.strerror or exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
