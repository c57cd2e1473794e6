# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""scripts/build-packages: the wheel, the sdist and the Debian package it writes.

The packages are built once per session into a temporary directory (not dist/). Nothing is
installed system-wide: the wheel goes into a throwaway venv, the .deb is only inspected,
unpacked (dpkg-deb -x) and its maintainer scripts run with stand-ins for the systemd and
Python helpers they call.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-packages"
BUILD = 3  # a build number other than the default: the .deb's version must follow it

# Every path the .deb must install. The catalog and the rules come from the agent's operability work.
TOOLS = ["usr/bin/mkcomposefs", "usr/bin/composefs-info", "usr/bin/composefs-store",
         "usr/sbin/mount.composefs", "usr/sbin/composefs-fsverity-keys", "usr/sbin/composefs-fleet-agent"]
REQUIRED = TOOLS + [
    "usr/lib/python3/dist-packages/composefs_fleet/__init__.py",
    "usr/lib/python3/dist-packages/composefs_fleet_cli/__init__.py",
    "usr/lib/python3/dist-packages/composefs_fleet_agent/main.py",
    "usr/share/doc/composefs-fleet/copyright",
    "usr/share/man/man1/mkcomposefs.1.gz", "usr/share/man/man1/composefs-info.1.gz",
    "usr/share/man/man1/composefs-store.1.gz", "usr/share/man/man8/mount.composefs.8.gz",
    "usr/share/man/man8/composefs-fsverity-keys.8.gz", "usr/share/man/man8/composefs-fleet-agent.8.gz",
]
CATALOG = "usr/lib/systemd/catalog/composefs-fleet-agent.catalog"
RULES = "usr/share/composefs-fleet/prometheus/composefs-fleet.rules.yml"
UNITS = ["composefs-fleet-agent.service", "composefs-fleet-fsverity-keys.service"]
# lintian warnings we keep, each explained in the README's "Packages" section.
EXPLAINED_WARNINGS = {"initial-upload-closes-no-bugs"}


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI=true, where scripts/setup has installed the build tools."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true requires it: " + reason, pytrace=False)
    pytest.skip(reason)


def _script(*args: str, env: "Dict[str, str] | None" = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(["bash", str(SCRIPT)] + list(args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=600)


def _upstream_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    if match is None:
        raise ValueError("no version in pyproject.toml")
    return match.group(1)


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """Build once: {"wheel", "sdist", "deb"} -> file."""
    check = _script("--check-tools")
    if check.returncode == 3:
        _unavailable(check.stderr.strip())
    assert check.returncode == 0, check.stderr
    out = tmp_path_factory.mktemp("dist")
    before = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True, text=True).stdout
    built = _script("--build", str(BUILD), "--no-lintian", "--out", str(out))
    assert built.returncode == 0, built.stdout + built.stderr
    after = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True, text=True).stdout
    # Built in a copy: the checkout gains nothing (no build/, egg-info, debian/.debhelper).
    assert after == before
    found = {"wheel": sorted(out.glob("*.whl")), "sdist": sorted(out.glob("*.tar.gz")), "deb": sorted(out.glob("*.deb"))}
    assert {kind: len(files) for kind, files in found.items()} == {"wheel": 1, "sdist": 1, "deb": 1}, found
    return {kind: files[0] for kind, files in found.items()}


@pytest.fixture(scope="session")
def deb_root(packages: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    subprocess.run(["dpkg-deb", "-x", str(packages["deb"]), str(root)], check=True)
    return root


@pytest.fixture(scope="session")
def deb_control(packages: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    control = tmp_path_factory.mktemp("deb-control") / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(packages["deb"]), str(control)], check=True)
    return control


def _deb_paths(deb: Path) -> List[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    # "-rw-r--r-- root/root 1729 2026-12-04 21:00 ./usr/bin/x" (symlinks add " -> target")
    return [line.split(None, 5)[5].split(" -> ")[0][2:] for line in listing.splitlines()]


def _deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True).stdout.strip()


def _tree(root: Path) -> None:
    """A small source tree: inlined and external files, a subdirectory, a symlink."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "small").write_text("inline\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 40)
    (root / "etc" / "config").write_text("x = 1\n" * 30)
    (root / "link").symlink_to("etc/config")


def _clean_env() -> Dict[str, str]:
    """The environment without our PYTHONPATH: what runs must be the installed package."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


# ------------------------------------------------------------------ version --

def test_version_is_pyprojects_plus_the_build_number() -> None:
    upstream = _upstream_version()
    assert _script("--print-version").stdout.strip() == upstream + "-1"
    assert _script("--build", "7", "--print-version").stdout.strip() == upstream + "-7"
    env = dict(os.environ, COMPOSEFS_FLEET_DEB_BUILD="12")
    assert _script("--print-version", env=env).stdout.strip() == upstream + "-12"
    assert _script("--version", upstream + "-4", "--print-version").stdout.strip() == upstream + "-4"
    # A newer build upgrades an older one (dpkg's ordering, not string order: 12 > 7).
    assert subprocess.run(["dpkg", "--compare-versions", upstream + "-12", "gt", upstream + "-7"]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--build", "0"], "build number must be a positive integer, got: 0"),
    (["--build", "2a"], "build number must be a positive integer, got: 2a"),
    (["--version", "9.9.9-1"], "must be pyproject's version"),
    (["--frobnicate"], "unknown argument: --frobnicate"),
])
def test_bad_arguments_are_refused_by_name(args: List[str], message: str) -> None:
    result = _script(*(args + ["--print-version"]))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -------------------------------------------------------------- wheel, sdist --

def test_sdist_holds_the_sources_and_the_licence(packages: Dict[str, Path]) -> None:
    with tarfile.open(str(packages["sdist"])) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for path in ["pyproject.toml", "README.md", "LICENSES/Apache-2.0.txt", "plugins/module_utils/composefs/__init__.py",
                 "cli/mkcomposefs.py", "agent/main.py"]:
        assert path in names


def test_wheel_installs_and_its_commands_run(packages: Dict[str, Path], tmp_path: Path, ours) -> None:
    with zipfile.ZipFile(str(packages["wheel"])) as wheel:
        entry_points = wheel.read("composefs_fleet-%s.dist-info/entry_points.txt" % _upstream_version()).decode()
    for tool in ["mkcomposefs", "composefs-info", "composefs-store", "composefs-fsverity-keys", "mount.composefs",
                 "composefs-fleet-agent"]:
        assert "\n%s = " % tool in entry_points
    venv = tmp_path / "venv"
    env = _clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--no-deps", str(packages["wheel"])],
                   check=True, env=env)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import composefs_fleet, composefs_fleet_agent; "
                            "print(composefs_fleet.__file__); print(composefs_fleet_agent.__file__)"],
                           capture_output=True, text=True, check=True, env=env).stdout.split()
    assert all(path.startswith(str(venv) + "/") for path in where), where
    usage = {"mkcomposefs": "Usage: mkcomposefs", "composefs-info": "Commands:", "composefs-store": "usage: composefs-store",
             "mount.composefs": "usage: mount.composefs", "composefs-fsverity-keys": "usage: composefs-fsverity-keys",
             "composefs-fleet-agent": "usage: composefs-fleet-agent"}
    for tool, text in usage.items():
        result = subprocess.run([str(venv / "bin" / tool), "--help"], capture_output=True, text=True, env=env)
        assert text in result.stdout + result.stderr, (tool, result)
    # A real image: byte for byte what the in-tree mkcomposefs writes, same objects.
    _tree(tmp_path / "src")
    subprocess.run([str(venv / "bin" / "mkcomposefs"), "--digest-store=%s" % (tmp_path / "objs-wheel"),
                    str(tmp_path / "src"), str(tmp_path / "wheel.cfs")], check=True, env=env)
    mine = ours.run("mkcomposefs", "--digest-store=%s" % (tmp_path / "objs-tree"), tmp_path / "src", tmp_path / "tree.cfs")
    assert mine.returncode == 0, mine.stderr
    assert (tmp_path / "wheel.cfs").read_bytes() == (tmp_path / "tree.cfs").read_bytes()
    assert sorted(p.name for p in (tmp_path / "objs-wheel").rglob("*") if p.is_file()) == \
        sorted(p.name for p in (tmp_path / "objs-tree").rglob("*") if p.is_file())


# ---------------------------------------------------------------------- deb --

def test_deb_control_fields(packages: Dict[str, Path]) -> None:
    deb = packages["deb"]
    assert _deb_field(deb, "Package") == "composefs-fleet"
    assert _deb_field(deb, "Version") == "%s-%d" % (_upstream_version(), BUILD)
    assert _deb_field(deb, "Architecture") == "all"
    assert re.split(r"[,\s]+", _deb_field(deb, "Depends"))[0] in ("python3", "python3:any")
    # Debian's composefs ships the same tool paths as regular files: one package or the other.
    assert _deb_field(deb, "Conflicts") == "composefs"
    assert _deb_field(deb, "Replaces") == "composefs"


def test_deb_installs_the_tools_the_code_and_the_units(packages: Dict[str, Path]) -> None:
    paths = set(_deb_paths(packages["deb"]))
    missing = [path for path in REQUIRED if path not in paths]
    assert missing == []
    for unit in UNITS:
        assert "usr/lib/systemd/system/" + unit in paths
    # Nothing under /lib: on merged-/usr (trixie) dpkg would warn about the aliased directory at purge.
    assert not [path for path in paths if path.startswith("lib/")]
    # dh_python3 compiles at installation (py3compile), for the node's Python.
    assert not [path for path in paths if "__pycache__" in path or path.endswith(".pyc")]
    # The promtool unit tests stay in the source.
    assert not [path for path in paths if path.endswith(".rules.test.yml")]


def test_deb_installs_the_journal_catalog_and_the_prometheus_rules(packages: Dict[str, Path], deb_root: Path) -> None:
    """Fails until agent/catalog/composefs-fleet-agent.catalog and
    agent/prometheus/composefs-fleet.rules.yml are in the source (the ops branch)."""
    paths = set(_deb_paths(packages["deb"]))
    missing = [path for path in (CATALOG, RULES) if path not in paths]
    assert not missing, "the .deb lacks %s (source files: agent/catalog/composefs-fleet-agent.catalog, " \
        "agent/prometheus/composefs-fleet.rules.yml)" % ", ".join(missing)
    assert (deb_root / CATALOG).read_bytes() == (REPO / "agent/catalog/composefs-fleet-agent.catalog").read_bytes()
    assert (deb_root / RULES).read_bytes() == (REPO / "agent/prometheus/composefs-fleet.rules.yml").read_bytes()


def _deb_image(deb_root: Path, tmp_path: Path) -> Dict[str, str]:
    """An image of a small tree made by the unpacked package's mkcomposefs (tmp_path/deb.cfs); its environment."""
    env = dict(_clean_env(), PYTHONPATH=str(deb_root / "usr/lib/python3/dist-packages"))
    _tree(tmp_path / "src")
    # Run by the interpreter the shebang names, not the test's.
    subprocess.run(["/usr/bin/python3", str(deb_root / "usr/bin/mkcomposefs"), str(tmp_path / "src"), str(tmp_path / "deb.cfs")],
                   check=True, env=env)
    return env


def test_deb_tools_run_from_the_unpacked_package(deb_root: Path, tmp_path: Path, ours) -> None:
    for tool in TOOLS:
        assert (deb_root / tool).read_text().startswith("#!/usr/bin/python3\n"), tool
        assert os.access(str(deb_root / tool), os.X_OK), tool
    env = _deb_image(deb_root, tmp_path)
    mine = ours.run("mkcomposefs", tmp_path / "src", tmp_path / "tree.cfs")
    assert mine.returncode == 0, mine.stderr
    assert (tmp_path / "deb.cfs").read_bytes() == (tmp_path / "tree.cfs").read_bytes()
    listed = subprocess.run(["/usr/bin/python3", str(deb_root / "usr/bin/composefs-info"), "ls", str(tmp_path / "deb.cfs")],
                            capture_output=True, text=True, check=True, env=env).stdout
    assert "/etc/config" in listed
    agent = subprocess.run(["/usr/bin/python3", str(deb_root / "usr/sbin/composefs-fleet-agent"), "--help"],
                           capture_output=True, text=True, env=env)
    assert "--once" in agent.stdout, agent


@pytest.mark.oracle
def test_deb_image_matches_the_c_tool(deb_root: Path, tmp_path: Path, oracle) -> None:
    _deb_image(deb_root, tmp_path)
    c = oracle.run("mkcomposefs", tmp_path / "src", tmp_path / "c.cfs")
    assert c.returncode == 0, c.stderr
    assert (tmp_path / "deb.cfs").read_bytes() == (tmp_path / "c.cfs").read_bytes()


def _unit(deb_root: Path, name: str) -> str:
    return (deb_root / "usr/lib/systemd/system" / name).read_text()


def test_agent_unit_waits_for_its_configuration(deb_root: Path) -> None:
    unit = _unit(deb_root, "composefs-fleet-agent.service")
    assert "\nConditionPathExists=/etc/composefs-fleet/agent.json\n" in unit
    assert "\nExecStart=/usr/sbin/composefs-fleet-agent --config /etc/composefs-fleet/agent.json\n" in unit
    assert "\nWantedBy=multi-user.target\n" in unit
    keys = _unit(deb_root, "composefs-fleet-fsverity-keys.service")
    assert "\nExecStart=/usr/sbin/composefs-fsverity-keys load /etc/composefs-fleet/fsverity-certs.d\n" in keys
    for text in (unit, keys):
        for line in text.splitlines():
            if line.startswith(("ExecStart=", "ExecReload=")):
                binary = line.split("=", 1)[1].split()[0]
                assert binary.startswith("/usr/sbin/") and (deb_root / binary[1:]).is_file() or binary == "/bin/kill", line


def _run_maintainer_script(control: Path, script: str, args: List[str], fake_bin: Path) -> List[str]:
    """Run a maintainer script with only stand-ins on PATH; returns the calls they logged."""
    fake_bin.mkdir(exist_ok=True)
    log = fake_bin / "calls.log"
    log.write_text("")
    # rm and rmdir too: the postrm removes the agent's cache, which a test must not do to this machine.
    for tool in ("deb-systemd-helper", "deb-systemd-invoke", "systemctl", "py3compile", "pypy3compile", "py3clean", "rm", "rmdir"):
        # debian-installed: a first installation (no state); was-enabled defaults to yes.
        (fake_bin / tool).write_text('#!/bin/sh\necho "%s $*" >> %s\n'
                                     'case "$1 $2" in "debian-installed "*) exit 1;; esac\nexit 0\n' % (tool, log))
        (fake_bin / tool).chmod(0o755)
    result = subprocess.run(["/bin/sh", str(control / script)] + args, capture_output=True, text=True,
                            env={"PATH": str(fake_bin)}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result
    return [line.split() for line in log.read_text().splitlines()]


def test_postinst_does_not_enable_the_agent(deb_control: Path, tmp_path: Path) -> None:
    calls = _run_maintainer_script(deb_control, "postinst", ["configure", ""], tmp_path / "bin")
    assert ["py3compile", "-p", "composefs-fleet"] in calls
    enabled = [call[-1].strip("'") for call in calls if call[:2] == ["deb-systemd-helper", "enable"]]
    # The keyring loader is enabled (it does nothing without certificates); the agent is not.
    assert enabled == ["composefs-fleet-fsverity-keys.service"]
    assert ["deb-systemd-helper", "update-state", "composefs-fleet-agent.service"] in calls


def test_prerm_and_postrm_purge(deb_control: Path, tmp_path: Path) -> None:
    calls = _run_maintainer_script(deb_control, "prerm", ["remove"], tmp_path / "bin")
    assert ["py3clean", "-p", "composefs-fleet"] in calls
    for action in ("remove", "purge"):
        calls = _run_maintainer_script(deb_control, "postrm", [action], tmp_path / "bin")
        # The agent's object-list cache goes with the package; the configuration stays until purge.
        assert ["rm", "-rf", "/var/cache/composefs-fleet/agent"] in calls, (action, calls)
    if not Path("/usr/bin/deb-systemd-helper").is_file():
        pytest.skip("postrm purges unit state only where /usr/bin/deb-systemd-helper exists (init-system-helpers)")
    calls = _run_maintainer_script(deb_control, "postrm", ["purge"], tmp_path / "bin")
    assert sorted(call[2] for call in calls if call[:2] == ["deb-systemd-helper", "purge"]) == sorted(UNITS)


def test_lintian_reports_no_errors(packages: Dict[str, Path]) -> None:
    result = subprocess.run(["lintian", "--fail-on", "error", "--tag-display-limit", "0", str(packages["deb"])],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    tags = [line.split()[2] for line in result.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert [tag for tag in tags if tag not in EXPLAINED_WARNINGS] == []
