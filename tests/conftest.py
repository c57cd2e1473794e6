# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Shared test harness: markers, the C oracle, our CLIs, kernel-mount checks.

Tiers (markers):
  kernel  real mounts (root, CAP_SYS_ADMIN, erofs + overlay, loop devices)
  oracle  runs the C composefs 1.0.8 tools fetched by scripts/fetch-oracle
  guest   runs in the QEMU guest (tests/guest/guest_vm.py, scripts/build-guest)
  fuzz    fuzzing of the reader and the dump parser: a fixed, derandomized set
          of examples in every run; open-ended (random, time-budgeted) by
          scripts/fuzz

Not a tier: ``network`` marks tests that start nginx on 127.0.0.1
(tests/remote/); they run in every run, the marker only selects them.

A test that cannot run skips with a reason naming exactly what is missing.
Under CI=true a missing oracle (or a missing CLI of ours) is an error instead:
CI must have them.

Hypothesis runs under a settings profile chosen here, before any test module
is imported (so each test's own @settings inherits it): "deterministic" by
default (derandomize=True: the same examples on every run and machine, no
example database, no deadline or too_slow check, which measure time), or
"explore" when COMPOSEFS_FLEET_HYPOTHESIS=explore (scripts/fuzz): fresh random
examples, failures kept in a database under the cache directory.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

ORACLE_VERSION = "1.0.8"
ORACLE_TOOLS = ("mkcomposefs", "composefs-info", "mount.composefs")
OUR_MODULES = {
    "mkcomposefs": "composefs_fleet_cli.mkcomposefs",
    "composefs-info": "composefs_fleet_cli.composefs_info",
    "mount.composefs": "composefs_fleet_cli.mount_composefs",
}
MARKERS = {
    "kernel": "needs real mounts: root, CAP_SYS_ADMIN, erofs and overlay in /proc/filesystems, /dev/loop-control",
    "oracle": "needs the C composefs 1.0.8 tools (scripts/fetch-oracle)",
    "guest": "runs in the QEMU trixie guest (fs-verity, systemd, journald): qemu-system-x86_64 with TCG, "
             "ssh, and the image from scripts/build-guest (built on first use when possible)",
    "fuzz": "fuzzing of the image reader and the dump parser (deterministic here; open-ended in scripts/fuzz)",
    "network": "starts Debian's nginx on 127.0.0.1 with its own config (tests/remote/nginx_server.py); "
               "not a tier: part of every run, the marker only selects",
}

# tests/unit is the collection's ansible-test unit suite: it imports the
# collection as ansible_collections.composefs.fleet, which only exists in the
# tree scripts/collection-tests builds, so `ansible-test units` runs it there.
collect_ignore = ["unit"]

def _arg(a: object) -> "str | bytes":
    if isinstance(a, (str, bytes)):
        return a
    if isinstance(a, os.PathLike):
        return os.fspath(a)
    return str(a)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true where the missing piece must exist."""
    if in_ci():
        pytest.fail("CI=true requires it: " + reason, pytrace=False)
    pytest.skip(reason)


def cache_dir() -> Path:
    env = os.environ.get("COMPOSEFS_FLEET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "composefs-fleet"


def oracle_dir() -> Path:
    return cache_dir() / "oracle" / ORACLE_VERSION


# -------------------------------------------------------------- hypothesis --

HYPOTHESIS_PROFILE_ENV = "COMPOSEFS_FLEET_HYPOTHESIS"
_UNTIMED = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("deterministic", derandomize=True, database=None, max_examples=100, **_UNTIMED)
settings.register_profile("explore", derandomize=False, max_examples=100,
                          database=DirectoryBasedExampleDatabase(str(cache_dir() / "hypothesis")), **_UNTIMED)
settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV) or "deterministic")


# ---------------------------------------------------------------- C oracle --

class Oracle:
    """The C composefs tools, run through their own unpacked ld.so."""

    def __init__(self, base: Path, info: Dict[str, object]) -> None:
        self.base = base
        self.root = base / str(info["root"])
        self.version = str(info["version"])
        self.debian_version = str(info.get("debian_version", self.version))
        self.ld_so = base / str(info["ld_so"])
        self.libdir = base / str(info["libdir"])
        tools = info["tools"]
        assert isinstance(tools, dict)
        self.tools = {name: base / str(path) for name, path in tools.items()}

    def argv(self, tool: str) -> List[str]:
        if tool not in self.tools:
            raise KeyError("unknown C tool %r (have %s)" % (tool, ", ".join(sorted(self.tools))))
        return [str(self.ld_so), "--library-path", str(self.libdir), str(self.tools[tool])]

    def run(self, tool: str, *args: object, **kwargs: object) -> "subprocess.CompletedProcess[bytes]":
        """Run a C tool; output captured, never raises on a non-zero exit."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(tool) + [_arg(a) for a in args], **kwargs)  # type: ignore[arg-type]

    def copy_to(self, dest: Path) -> "Oracle":
        """A copy at dest, e.g. for a test that runs it as an unprivileged
        user, who cannot reach the cache under a 0700 home directory."""
        shutil.copytree(str(self.base), str(dest), symlinks=True)
        os.chmod(str(dest), 0o755)
        return Oracle(dest, json.loads((dest / "oracle.json").read_text()))

    def __repr__(self) -> str:
        return "Oracle(composefs %s at %s)" % (self.debian_version, self.base)


def load_oracle(base: Optional[Path] = None) -> "tuple[Optional[Oracle], str]":
    """Return (oracle, "") or (None, reason naming what is missing)."""
    base = base or oracle_dir()
    hint = ": run scripts/fetch-oracle"
    meta = base / "oracle.json"
    if not meta.is_file():
        return None, "C oracle composefs %s not found in %s%s" % (ORACLE_VERSION, base, hint)
    try:
        info = json.loads(meta.read_text())
        oracle = Oracle(base, info)
    except (ValueError, KeyError, AssertionError) as exc:
        return None, "C oracle metadata %s unreadable (%s)%s" % (meta, exc, hint)
    if oracle.version != ORACLE_VERSION:
        return None, "C oracle in %s is composefs %s, need %s%s" % (base, oracle.version, ORACLE_VERSION, hint)
    for path in [oracle.ld_so] + [oracle.tools.get(t, base / ("<no %s>" % t)) for t in ORACLE_TOOLS]:
        if not path.is_file():
            return None, "C oracle incomplete: %s missing%s" % (path, hint)
    # mkcomposefs prints usage and exits 1 on --help; a loader problem exits 127.
    probe = oracle.run("mkcomposefs", "--help")
    if b"Usage: mkcomposefs" not in probe.stderr + probe.stdout:
        return None, "C oracle in %s does not run (mkcomposefs --help exit %d: %s)%s" % (
            base, probe.returncode, (probe.stderr or probe.stdout)[:200].decode(errors="replace").strip(), hint)
    return oracle, ""


_oracle_cache: "Dict[str, tuple]" = {}


def _oracle_or_reason() -> "tuple[Optional[Oracle], str]":
    key = str(oracle_dir())
    if key not in _oracle_cache:
        _oracle_cache[key] = load_oracle()
    return _oracle_cache[key]


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    found, reason = _oracle_or_reason()
    if found is None:
        unavailable(reason)
    assert found is not None
    return found


# -------------------------------------------------------------- our CLIs --

class Ours:
    """argv prefixes for our own CLIs, from the interpreter running pytest."""

    def argv(self, tool: str) -> List[str]:
        module = OUR_MODULES.get(tool)
        if module is None:
            raise KeyError("unknown tool %r (have %s)" % (tool, ", ".join(sorted(OUR_MODULES))))
        if importlib.util.find_spec(module) is None:
            unavailable("our %s is missing: module %s not importable from %s" % (tool, module, sys.executable))
        script = Path(sys.executable).parent / tool
        if script.is_file() and os.access(str(script), os.X_OK):
            return [str(script)]
        # Not installed as a console script (yet): call main() directly, with
        # argv[0] set so usage messages name the tool as the script would.
        return [sys.executable, "-c",
                "import sys; sys.argv[0] = %r; from %s import main; sys.exit(main())" % (tool, module)]

    def run(self, tool: str, *args: object, **kwargs: object) -> "subprocess.CompletedProcess[bytes]":
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(tool) + [_arg(a) for a in args], **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ours() -> Ours:
    return Ours()


# ------------------------------------------------------------ peak memory --

class PeakRss:
    """Peak resident memory of a command, measured by GNU time(1).

    Not by wait4() here: a child's ru_maxrss also counts the memory of the
    process it was forked from until its exec(), so any child of pytest
    would report at least pytest's own size; time(1) is about 2 MiB.
    """

    def __init__(self, time_bin: str) -> None:
        self.time_bin = time_bin

    def run(self, argv: Sequence[object], workdir: Path) -> "tuple[int, int]":
        """(exit status, peak RSS in bytes); output goes to files in workdir."""
        report = workdir / "peak-rss"
        with open(str(workdir / "stdout"), "wb") as out, open(str(workdir / "stderr"), "wb") as err:
            proc = subprocess.run([self.time_bin, "-q", "-f", "%M", "-o", str(report)] + [_arg(a) for a in argv],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        return proc.returncode, int(report.read_text().split()[-1]) * 1024


@pytest.fixture(scope="session")
def peak_rss() -> PeakRss:
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    if time_bin is None:
        unavailable("GNU time (/usr/bin/time, Debian package time) is needed to measure peak memory")
    assert time_bin is not None
    return PeakRss(time_bin)


# ---------------------------------------------------------- kernel mounts --

CAP_SYS_ADMIN = 21


def kernel_mount_missing(euid: int, filesystems: str, cap_eff: Optional[int],
                         loop_control: bool, tools: Dict[str, bool]) -> List[str]:
    """Every missing piece for real erofs/overlay mounts, as readable phrases."""
    missing = []
    if euid != 0:
        missing.append("not root (euid %d)" % euid)
    if cap_eff is not None and not (cap_eff >> CAP_SYS_ADMIN) & 1:
        missing.append("no CAP_SYS_ADMIN")
    names = {line.split()[-1] for line in filesystems.splitlines() if line.strip()}
    for fs in ("erofs", "overlay"):
        if fs not in names:
            missing.append("%s not in /proc/filesystems" % fs)
    if not loop_control:
        missing.append("/dev/loop-control missing")
    for tool, present in sorted(tools.items()):
        if not present:
            missing.append("%s not on PATH" % tool)
    return missing


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cap_eff() -> Optional[int]:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return None


def require_kernel_mount() -> None:
    """Skip (never fail, not even in CI) when this machine cannot mount."""
    missing = kernel_mount_missing(
        os.geteuid(), _read("/proc/filesystems"), _cap_eff(),
        os.path.exists("/dev/loop-control"),
        {t: shutil.which(t) is not None for t in ("mount", "umount")})
    if missing:
        pytest.skip("kernel mount not possible here: " + "; ".join(missing))


class KernelMount:
    """Plain kernel mounts (no composefs helper), undone at teardown."""

    def __init__(self) -> None:
        self.mounted: List[Path] = []

    def _mount(self, argv: Sequence[str], target: Path) -> Path:
        res = subprocess.run(list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError("%s failed (exit %d): %s" % (" ".join(argv), res.returncode, res.stderr.strip()))
        self.mounted.append(target)
        return target

    def mount_erofs(self, image: Path, target: Path) -> Path:
        """Mount a composefs image as plain read-only erofs through a loop device."""
        target.mkdir(parents=True, exist_ok=True)
        return self._mount(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(target)], target)

    def mount_composefs(self, image: Path, target: Path, basedir: Path) -> Path:
        """erofs + overlay with the object store as a data-only lower layer."""
        for p in (target, basedir):
            if set(str(p)) & set(",:="):
                raise ValueError("overlay options cannot carry %s" % p)
        meta = target.parent / (target.name + ".erofs")
        self.mount_erofs(image, meta)
        target.mkdir(parents=True, exist_ok=True)
        opts = "ro,metacopy=on,redirect_dir=on,lowerdir=%s::%s" % (meta, basedir)
        return self._mount(["mount", "-t", "overlay", "-o", opts, "overlay", str(target)], target)

    def unmount_all(self) -> None:
        errors = []
        for target in reversed(self.mounted):
            res = subprocess.run(["umount", str(target)], capture_output=True, text=True)
            if res.returncode != 0:
                lazy = subprocess.run(["umount", "-l", str(target)], capture_output=True, text=True)
                if lazy.returncode != 0:
                    errors.append("%s: %s" % (target, res.stderr.strip()))
        self.mounted.clear()
        if errors:
            raise RuntimeError("could not unmount: " + "; ".join(errors))


@pytest.fixture
def kernel_mount():
    require_kernel_mount()
    km = KernelMount()
    try:
        yield km
    finally:
        km.unmount_all()


# ------------------------------------------------------------------ hooks --

def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", "%s: %s" % (name, text))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        require_kernel_mount()
    if item.get_closest_marker("oracle") is not None:
        found, reason = _oracle_or_reason()
        if found is None:
            unavailable(reason)
    if item.get_closest_marker("guest") is not None:
        reason = _guest_missing()
        if reason:
            unavailable(reason)


_guest_reason: List[str] = []


def _guest_missing() -> str:
    """Why the QEMU guest cannot run here ("" if it can); asked once per session."""
    if not _guest_reason:
        path = Path(__file__).resolve().parent / "guest" / "guest_vm.py"
        spec = importlib.util.spec_from_file_location("guest_vm", str(path))
        if spec is None or spec.loader is None or not path.is_file():
            _guest_reason.append("QEMU guest not available: %s missing" % path)
        else:
            module = sys.modules.get("guest_vm")
            if module is None:
                module = importlib.util.module_from_spec(spec)
                sys.modules["guest_vm"] = module
                spec.loader.exec_module(module)
            _guest_reason.append(module.missing_requirements())
    return _guest_reason[0]


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if getattr(r, "longrepr", None)]
    counts = collections.Counter(_skip_reason(r) for r in skipped)
    terminalreporter.write_sep("=", "SKIPPED TESTS SUMMARY: %d skipped" % len(skipped))
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        terminalreporter.write_line("%5d x %s" % (n, reason))
