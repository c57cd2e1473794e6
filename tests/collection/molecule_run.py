"""Running a molecule scenario of this repository from a test (``molecule test -s NAME``)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.dirname(sys.executable)


def run_scenario(name: str, timeout: int = 1200) -> str:
    """Run the whole test sequence of scenario ``name``; its output (the test fails with it unless it passed)."""
    molecule = os.path.join(VENV_BIN, "molecule")
    if not os.path.exists(molecule):
        pytest.skip("molecule is not installed in %s (scripts/setup installs it with the test extras)" % VENV_BIN)
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("/usr/bin/python3 (the scenario's module interpreter) is missing")
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
               ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1", NO_COLOR="1")
    proc = subprocess.run([molecule, "test", "-s", name], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
    assert proc.returncode == 0, "molecule test -s %s failed (exit %d):\n%s" % (name, proc.returncode,
                                                                              proc.stdout[-15000:])
    return proc.stdout
