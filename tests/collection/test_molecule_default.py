"""The molecule scenario ``default``: the node and agent roles on this machine, for real.

molecule runs cleanup, syntax, converge (node role, then agent role),
idempotence (a second converge must change nothing), check (a dry run of the
converged node must succeed), verify (reads through the mounts compared with
the source trees, the installed mount.composefs used by ``mount -t
composefs``, the agent's configuration and unit, one pass of the installed
agent reporting healthy in its textfile, then a mount unmounted by hand and
mounted again by the agent) and cleanup.  Any failing step fails this test,
with molecule's output.
"""

import os
import re

import pytest
from molecule_run import run_scenario  # type: ignore[import-not-found]

pytestmark = pytest.mark.kernel


def test_molecule_default_scenario(kernel_mount):  # kernel_mount: skips where mounting is impossible
    out = run_scenario("default")
    # The sequence ran in full: a converge that changed things, then one that changed nothing.
    assert "idempotence" in out.lower(), out[-3000:]
    # The dry run (molecule check) of the converged node predicts no change.
    check = re.search(r"\[default > check\] Executing(.*?)\[default > check\] Executed", out, re.S)
    assert check, "molecule did not run the check step:\n" + out[-3000:]
    recaps = re.findall(r"^\S+\s*:\s*ok=\d+\s+changed=(\d+)", check.group(1), re.M)
    assert recaps and recaps == ["0"] * len(recaps), "check mode predicted changes:\n" + check.group(1)[-5000:]
    assert not os.path.exists("/var/tmp/composefs-fleet-molecule"), "cleanup left the scenario directory"
    for path in ("/usr/local/bin/composefs-fleet-agent", "/etc/systemd/system/composefs-fleet-agent.service"):
        assert not os.path.exists(path), "cleanup left %s behind" % path
    with open("/proc/self/mountinfo") as f:
        assert "composefs-fleet-molecule" not in f.read(), "cleanup left a mount behind"
