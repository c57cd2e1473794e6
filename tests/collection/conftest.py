"""Run the collection's modules in-process, as ``ansible_collections.composefs.fleet``.

The repository is the collection; a symlink under a temporary
``ansible_collections/composefs/fleet`` makes it importable by its collection
name, so a module's relative imports resolve exactly as in AnsiballZ.  The
module's ``main()`` runs with real arguments against the real filesystem and
kernel; its JSON result is returned.
"""

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TREE = tempfile.mkdtemp(prefix="composefs-fleet-collection.")
os.makedirs(os.path.join(_TREE, "ansible_collections", "composefs"))
os.symlink(ROOT, os.path.join(_TREE, "ansible_collections", "composefs", "fleet"))
sys.path.insert(0, _TREE)


def pytest_unconfigure(config):
    shutil.rmtree(_TREE, ignore_errors=True)


class ModuleResult(dict):
    """The module's JSON result; ``failed`` is set when it called fail_json."""


def run_module(name, args, check=False, diff=False):
    """Run ``composefs.fleet.<name>`` with ``args``; returns its result dict."""
    pytest.importorskip("ansible", reason="ansible-core is not installed (pip install -e .[test])")
    from ansible.module_utils.testing import patch_module_args
    import importlib

    module = importlib.import_module("ansible_collections.composefs.fleet.plugins.modules." + name)
    full = dict(args)
    full["_ansible_check_mode"] = check
    full["_ansible_diff"] = diff
    out = io.StringIO()
    with patch_module_args(full), contextlib.redirect_stdout(out):
        try:
            module.main()
        except SystemExit:
            pass
        else:
            raise AssertionError("module %s returned without exit_json/fail_json" % name)
    text = out.getvalue()
    try:
        return ModuleResult(json.loads(text))
    except ValueError:
        raise AssertionError("module %s printed no JSON result: %r" % (name, text[-2000:]))


@pytest.fixture
def module_runner():
    return run_module


@pytest.fixture
def keys(tmp_path):
    """ed25519 keys made by openssl: "release" (signs the test stores' app/v1) and "other" (trusted by nobody)."""
    from signing import make_keys  # type: ignore[import-not-found]

    return make_keys(tmp_path / "keys", "release", "other")
