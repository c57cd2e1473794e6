# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Action plugin of composefs.fleet.image_send: the controller's half of a send.

The controller reads the image and its object list from its own store;
the node (the module, run twice) says what it lacks and then verifies and
publishes what it got.  Between the two runs only the missing objects
travel, packed into bundle files of at most ``batch_size`` bytes: one
transfer per file, never one per object.  Local bundle files are written
one at a time and removed once sent, so the controller needs at most one
bundle's worth of temporary space.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile

from ansible import constants as C
from ansible.plugins.action import ActionBase

from ansible_collections.composefs.fleet.plugins.module_utils.composefs.errors import ComposefsError
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.remote_bundle import (
    DEFAULT_BUNDLE_BYTES, iter_bundles, pack_objects, source_image)
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store import Store
from ansible_collections.composefs.fleet.plugins.module_utils.composefs.store_names import split_ref_name

MODULE = "composefs.fleet.image_send"
#: The image's bundle is always one file (the node reads it in the plan phase alone).
_ONE_FILE = 1 << 62

ARGUMENT_SPEC = dict(
    # The node's path: expanded on the node by the module, not here.
    store=dict(type="str", required=True),
    ref=dict(type="str", required=True),
    from_store=dict(type="path", required=True),
    from_ref=dict(type="str"),
    batch_size=dict(type="int", default=DEFAULT_BUNDLE_BYTES),
    allow_foreign_owner=dict(type="bool", default=False),
    trusted_keys=dict(type="list", elements="str", no_log=True),
    revoked_keys=dict(type="list", elements="str", no_log=True),
)


class _Failed(Exception):
    """The task fails with this message (and the module's result, if it came from the node)."""

    def __init__(self, msg, result=None):
        super().__init__(msg)
        self.result = result


class ActionModule(ActionBase):

    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp  # no effect any more (ActionBase.run)
        _validation, args = self.validate_argument_spec(ARGUMENT_SPEC)
        local = None
        try:
            local = tempfile.mkdtemp(prefix="image_send.", dir=C.DEFAULT_LOCAL_TMP)
            result.update(self._send(args, task_vars or {}, local))
        except _Failed as exc:
            if exc.result:
                result.update(exc.result)
            result.update(failed=True, msg=str(exc))
        except (ComposefsError, OSError) as exc:
            # The node's errors come as _Failed: these are the controller's.
            why = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
            result.update(failed=True, msg="controller store %s: %s" % (args["from_store"], why))
        finally:
            if local is not None:
                shutil.rmtree(local, ignore_errors=True)
            self._remove_tmp_path(self._connection._shell.tmpdir)
        return result

    def _send(self, args, task_vars, local):
        ref = args["ref"]
        from_ref = args["from_ref"] or ref
        batch = args["batch_size"]
        if batch < 1:
            raise _Failed("batch_size must be at least 1 byte (got %d)" % batch)
        split_ref_name(ref)
        split_ref_name(from_ref)
        # A statement names its ref: it is sent only under that name, and a node that checks signatures
        # would refuse any other name (said here, before anything travels).
        same_name = split_ref_name(ref) == split_ref_name(from_ref)
        if args["trusted_keys"] and not same_name:
            raise _Failed("a signed ref keeps its name: the signature of %s does not vouch for %s (send it as %s, "
                          "or without trusted_keys)" % (from_ref, ref, from_ref))
        from_store = args["from_store"]
        if not os.path.isabs(from_store):
            from_store = os.path.join(self._loader.get_basedir(), from_store)
        source = "controller:%s" % from_store
        module_args = dict(store=args["store"], ref=ref, from_store=from_store, from_ref=from_ref, batch_size=batch,
                           allow_foreign_owner=args["allow_foreign_owner"], trusted_keys=args["trusted_keys"],
                           revoked_keys=args["revoked_keys"], _source=source)
        with Store.open(from_store, notice=None) as src, src.lock.shared_read_only():
            digest, needed = source_image(src, from_ref)
            module_args["_digest"] = digest
            out = dict(changed=False, digest=digest, previous_digest=None, ref=ref, from_ref=from_ref,
                       objects=len(needed.objects), objects_missing=0, bytes_missing=0, objects_sent=0, bytes_sent=0,
                       objects_written=0, image_written=False, transfers=0, bundle_bytes=0, signature=None)

            # Phase 1: the image (with meta.json and the ref); the node checks it and says what it lacks.
            (image,) = iter_bundles(src, local, digest=digest, ref=ref, limit=_ONE_FILE, prefix="image", signed=same_name)
            remote = [self._send_file(image.path, "image_send-image.tar", out, image.size)]
            plan = self._module(module_args, task_vars, "plan", remote)
            _keep_notes(out, plan)
            out["previous_digest"] = plan["previous"]
            out["signature"] = plan.get("signature")
            missing = _decode_missing(plan, needed.objects)
            out["objects_missing"] = len(missing)
            out["bytes_missing"] = sum(size for _hexd, size in missing)
            if self._task.diff:
                out["diff"] = dict(before=dict(ref=ref, digest=plan["previous"]), after=dict(ref=ref, digest=digest))
            out["changed"] = bool(plan["changed"])
            if not plan["changed"] or self._task.check_mode:
                return out

            # Phase 2: only the missing objects, packed into files of at most batch_size bytes.
            groups = pack_objects(dict(missing), batch)
            for bundle in iter_bundles(src, local, groups, limit=batch, prefix="objects"):
                name = "image_send-objects-%04d.tar" % (len(remote))
                remote.append(self._send_file(bundle.path, name, out, bundle.size))
                os.unlink(bundle.path)
                out["objects_sent"] += len(bundle.members)
            out["bytes_sent"] = out["bytes_missing"]
        done = self._module(module_args, task_vars, "apply", remote)
        _keep_notes(out, done)
        out["changed"] = bool(done["changed"])
        out["objects_written"] = done["objects_fetched"]
        out["image_written"] = bool(done["image_fetched"])
        out["previous_digest"] = done["previous"]
        out["signature"] = done.get("signature")
        return out

    def _send_file(self, path, name, out, size):
        """Transfer one file into the remote temporary directory: its remote path."""
        tmpdir = self._connection._shell.tmpdir
        if tmpdir is None:
            tmpdir = self._make_tmp_path()
        remote = self._connection._shell.join_path(tmpdir, name)
        self._transfer_file(path, remote)
        out["transfers"] += 1
        out["bundle_bytes"] += size
        return remote

    def _module(self, module_args, task_vars, phase, remote):
        args = dict(module_args, _phase=phase, _bundles=list(remote))
        self._fixup_perms2([self._connection._shell.tmpdir] + list(remote))
        res = self._execute_module(module_name=MODULE, module_args=args, task_vars=task_vars)
        if res.get("failed"):
            res.pop("invocation", None)
            raise _Failed(res.get("msg") or "the node's %s phase failed" % phase, res)
        if res.get("digest") != module_args["_digest"]:
            raise _Failed("the node reports digest %r, the controller sent %s" % (res.get("digest"), module_args["_digest"]))
        return res


def _keep_notes(out, res):
    """The node's warnings and deprecations go into the task's result."""
    for key in ("warnings", "deprecations"):
        if res.get(key):
            out.setdefault(key, []).extend(res[key])


def _decode_missing(plan, objects):
    """(hex, size) of the objects the node lacks, from its bitmap over the image's objects sorted by digest."""
    names = sorted(objects)
    try:
        bits = base64.b64decode(plan["missing_bitmap"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise _Failed("the node's plan has no readable missing_bitmap")
    if len(bits) != (len(names) + 7) // 8:
        raise _Failed("the node's plan covers %d objects, the controller's image has %d: refused"
                      % (len(bits) * 8, len(names)))
    return [(hexd, objects[hexd]) for i, hexd in enumerate(names) if bits[i // 8] >> (i % 8) & 1]
