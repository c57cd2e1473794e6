# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""scripts/venv-direct-imports: the editable install's finder replaced by a directory of links.

A fake venv laid out as pip leaves an editable install of composefs-fleet
(finder with its MAPPING, .pth, dist-info, console scripts) is rewritten; the
packages then import from the links, without the finder, and the console
scripts without ``import re``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "venv-direct-imports"
PIP_SCRIPT = ("#!{python}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\nfrom {module} import main\n"
              "if __name__ == '__main__':\n    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
              "    sys.exit(main())\n")


def _fake_venv(tmp_path: Path):
    venv = tmp_path / "venv"
    site = venv / "lib" / "site-packages"
    (venv / "bin").mkdir(parents=True)
    site.mkdir(parents=True)
    mapping = {"composefs_fleet": str(REPO / "plugins" / "module_utils" / "composefs"),
               "composefs_fleet_cli": str(REPO / "cli"), "composefs_fleet_agent": str(REPO / "agent")}
    (site / "__editable___composefs_fleet_0_1_0_finder.py").write_text(
        "from __future__ import annotations\nimport sys\nMAPPING: dict[str, str] = %r\n"
        "NAMESPACES: dict[str, list[str]] = {}\n"
        "def install():\n    raise SystemExit('the finder ran')\n" % mapping)
    pth = site / "__editable__.composefs_fleet-0.1.0.pth"
    pth.write_text("import __editable___composefs_fleet_0_1_0_finder; __editable___composefs_fleet_0_1_0_finder.install()")
    info = site / "composefs_fleet-0.1.0.dist-info"
    info.mkdir()
    (info / "entry_points.txt").write_text("[console_scripts]\nmkcomposefs = composefs_fleet_cli.mkcomposefs:main\n"
                                           "mount.composefs = composefs_fleet_cli.mount_composefs:main\n")
    for command, module in (("mkcomposefs", "composefs_fleet_cli.mkcomposefs"),
                            ("mount.composefs", "composefs_fleet_cli.mount_composefs")):
        path = venv / "bin" / command
        path.write_text(PIP_SCRIPT.format(python=sys.executable, module=module))
        path.chmod(0o755)
    return venv, site, pth


def _run(venv: Path, site: Path):
    return subprocess.run([sys.executable, str(SCRIPT), str(venv), "--site", str(site)], capture_output=True, text=True)


def test_links_replace_the_finder_and_scripts_skip_re(tmp_path: Path):
    venv, site, pth = _fake_venv(tmp_path)
    res = _run(venv, site)
    assert res.returncode == 0, res.stderr
    links = venv / "composefs-fleet-src"
    assert pth.read_text() == str(links) + "\n"
    assert os.readlink(links / "composefs_fleet") == str(REPO / "plugins" / "module_utils" / "composefs")
    assert sorted(p.name for p in links.iterdir()) == ["composefs_fleet", "composefs_fleet_agent", "composefs_fleet_cli"]
    script = (venv / "bin" / "mount.composefs").read_text()
    assert "\nimport re\n" not in script and "from composefs_fleet_cli.mount_composefs import main" in script
    assert os.access(venv / "bin" / "mount.composefs", os.X_OK)
    # The .pth as site reads it: the packages come from the links, and the finder never runs.
    code = ("import site, sys; site.addsitedir(%r); import composefs_fleet, composefs_fleet_cli.mount_composefs; "
            "print(composefs_fleet.__file__); print('re' in sys.modules)" % str(site))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    where, re_loaded = out.stdout.split()
    assert where == str(links / "composefs_fleet" / "__init__.py") and re_loaded == "False"
    # A second run changes nothing.
    before = {p: p.stat().st_mtime_ns for p in (pth, venv / "bin" / "mkcomposefs")}
    assert _run(venv, site).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_mount_helper_script_runs_without_site(tmp_path: Path):
    # mount.composefs needs only the standard library: its interpreter skips site (-S) and the
    # script finds our packages through the links itself, after PYTHONPATH (which -S honours).
    venv, site, _pth = _fake_venv(tmp_path)
    assert _run(venv, site).returncode == 0
    links = venv / "composefs-fleet-src"
    helper = (venv / "bin" / "mount.composefs").read_text()
    assert helper.startswith("#!%s -S\n" % (venv / "bin" / "python")) and "sys.path.append(%r)" % str(links) in helper
    assert not (venv / "bin" / "mkcomposefs").read_text().split("\n")[0].endswith("-S")  # may need site-packages
    env = {"PATH": os.environ["PATH"]}
    out = subprocess.run([sys.executable, "-S", str(venv / "bin" / "mount.composefs"), "--help"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("usage: mount.composefs"), out.stderr
    code = "import runpy, sys; sys.argv = ['mount.composefs']; runpy.run_path(%r, run_name='x'); print(sys.path)" % str(
        venv / "bin" / "mount.composefs")
    shim = tmp_path / "shim"
    shim.mkdir()
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=str(shim)))
    assert out.returncode == 0, out.stderr
    path = ast.literal_eval(out.stdout)
    assert path.index(str(shim)) < path.index(str(links)) == len(path) - 1


def test_an_unexpected_install_is_left_alone(tmp_path: Path):
    venv, site, pth = _fake_venv(tmp_path)
    (site / "__editable___composefs_fleet_0_2_0_finder.py").write_text("MAPPING = {}\n")
    res = _run(venv, site)
    assert res.returncode != 0 and "expected one editable finder" in res.stderr
    assert "install()" in pth.read_text() and "\nimport re\n" in (venv / "bin" / "mkcomposefs").read_text()
    (site / "__editable___composefs_fleet_0_2_0_finder.py").unlink()
    (site / "__editable___composefs_fleet_0_1_0_finder.py").write_text("MAPPING = {}\n")
    res = _run(venv, site)
    assert res.returncode != 0 and "no package MAPPING" in res.stderr
    assert not (venv / "composefs-fleet-src").exists()
