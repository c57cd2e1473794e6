# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Boot the Debian trixie test guest (scripts/build-guest) under QEMU and use it.

Importable (the pytest fixture in tests/guest/conftest.py) and a CLI (molecule's
create/destroy playbooks, or by hand):

  python3 tests/guest/guest_vm.py start --state-dir DIR   boot, detached; prints JSON
  python3 tests/guest/guest_vm.py ssh --state-dir DIR -- CMD...
  python3 tests/guest/guest_vm.py reboot --state-dir DIR  poweroff, boot again (same overlay and port)
  python3 tests/guest/guest_vm.py stop --state-dir DIR    poweroff, then kill
  python3 tests/guest/guest_vm.py run -- CMD...           boot, copy project, run, stop
  python3 tests/guest/guest_vm.py check                   why the guest cannot run here

QEMU always runs with ``-accel tcg``: KVM hangs on this project's machines
instead of failing. Every start uses a fresh qcow2 overlay over the cached raw
image (a reboot keeps it), user networking with ``restrict=on`` and one
forwarded SSH port on 127.0.0.1. An attached guest (the pytest fixture) can never outlive its Python
process: poweroff at stop, kill after a timeout, atexit and SIGTERM/SIGHUP
handlers, and PR_SET_PDEATHSIG as the last resort. A detached guest (molecule)
runs under ``timeout`` so it dies after --lifetime seconds even if destroy never
runs.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-guest"
GUEST_ROOT = "/opt/composefs-fleet"   # the project inside the guest
HOST_ALIAS = "composefs-fleet-guest"  # name the host keys are pinned under
IMAGE_FILES = ("disk.raw", "vmlinuz", "initrd.img", "id_ed25519", "id_ed25519.pub", "known_hosts", "guest.json")
# Our CLIs in the guest: (wrapper path, module). The guest has no network and
# no pip: the project is copied to GUEST_ROOT/lib and run from there.
GUEST_TOOLS = (
    ("/usr/local/bin/mkcomposefs", "composefs_fleet_cli.mkcomposefs"),
    ("/usr/local/bin/composefs-info", "composefs_fleet_cli.composefs_info"),
    ("/usr/local/sbin/mount.composefs", "composefs_fleet_cli.mount_composefs"),
    ("/usr/local/bin/composefs-store", "composefs_fleet_cli.composefs_store"),
)
# Emulated hardware the guest never uses; loading its drivers only slows boot.
BLACKLIST = (
    "floppy,pcspkr,joydev,psmouse,evdev,serio_raw,i2c_piix4,ata_piix,ata_generic,pata_acpi,intel_rapl_msr,"
    "kvm,kvm_amd,kvm_intel,ccp,drm,efi_pstore,vmw_vmci,vsock,vmw_vsock_vmci_transport,"
    "vmw_vsock_virtio_transport_common,vsock_loopback,qemu_fw_cfg,button"
)

PathLike = Union[str, "os.PathLike[str]"]


class GuestError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("COMPOSEFS_FLEET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "composefs-fleet"


def recipe_hash(script: Path = BUILD_SCRIPT) -> str:
    # Same key as scripts/build-guest: the first 16 hex digits of its sha256.
    return hashlib.sha256(script.read_bytes()).hexdigest()[:16]


def image_dir() -> Path:
    return cache_dir() / "guest" / recipe_hash()


def image_complete(path: Optional[Path] = None) -> bool:
    path = path or image_dir()
    return all((path / f).is_file() and (path / f).stat().st_size > 0 for f in IMAGE_FILES)


def _tcg_available(qemu: str) -> bool:
    try:
        out = subprocess.run([qemu, "-accel", "help"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "tcg" in out.stdout.split()


def missing_requirements() -> str:
    """Why the guest cannot run here ("" when it can, building the image first if needed)."""
    missing = []
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        missing.append("qemu-system-x86_64 not on PATH (apt-get install qemu-system-x86)")
    elif not _tcg_available(qemu):
        missing.append("qemu-system-x86_64 has no TCG accelerator (-accel help)")
    for tool, pkg in (("qemu-img", "qemu-utils"), ("ssh", "openssh-client")):
        if shutil.which(tool) is None:
            missing.append("%s not on PATH (apt-get install %s)" % (tool, pkg))
    if not BUILD_SCRIPT.is_file():
        missing.append("%s missing" % BUILD_SCRIPT)
    elif not image_complete():
        cannot = []
        if os.geteuid() != 0:
            cannot.append("not root")
        for tool, pkg in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"), ("ssh-keygen", "openssh-client")):
            if shutil.which(tool) is None:
                cannot.append("%s not on PATH (apt-get install %s)" % (tool, pkg))
        if cannot:
            missing.append("guest image %s not built and cannot be built here (%s): run scripts/build-guest as root"
                           % (image_dir(), "; ".join(cannot)))
    if missing:
        return "QEMU guest not available: " + "; ".join(missing)
    return ""


def build_image(quiet: bool = False) -> Path:
    """Run scripts/build-guest (a no-op when the recipe's image is cached)."""
    if not image_complete():
        res = subprocess.run(["bash", str(BUILD_SCRIPT)], stdin=subprocess.DEVNULL,
                             capture_output=quiet, text=True)
        if res.returncode != 0:
            raise GuestError("scripts/build-guest failed (exit %d)%s" % (
                res.returncode, (":\n" + (res.stdout or "")[-2000:] + (res.stderr or "")[-3000:]) if quiet else ""))
    path = image_dir()
    if not image_complete(path):
        raise GuestError("scripts/build-guest succeeded but %s is incomplete" % path)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:
    # Runs in the child between fork and exec: die with the parent, whatever
    # kills it (SIGKILL included), so no qemu is ever left behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped) counts as gone.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def running_guests() -> List[int]:
    """PIDs of the QEMU processes running a guest of this project (any
    recipe), whoever started them. Two emulated guests at once starve each
    other on a small machine (tests flaked so): callers that boot one check
    first."""
    marker = (str(cache_dir() / "guest") + "/").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).startswith(b"qemu-system") and any(marker in a for a in argv):
            pids.append(int(entry.name))
    return sorted(pids)


def _sweep_stale_state_dirs() -> None:
    """Remove what a killed session (SIGKILL: no cleanup ran) left in the temp dir."""
    for path in Path(tempfile.gettempdir()).glob("cfguest-*"):
        try:
            state = json.loads((path / "state.json").read_text())
            if path.stat().st_uid != os.geteuid() or state.get("detached"):
                continue
            pid = state.get("pid")
            if isinstance(pid, int) and _pid_alive(pid):
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if str(path).encode() in f.read():
                        continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(str(path), ignore_errors=True)


class Guest:
    """One boot of the guest. Use start(), run(), stop(); or as a context manager."""

    def __init__(self, state_dir: Optional[PathLike] = None, memory_mb: int = 1536, cpus: int = 2,
                 boot_timeout: float = 420.0, image: Optional[Path] = None) -> None:
        self.image = Path(image) if image else image_dir()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self._own_state_dir = state_dir is None
        if state_dir is None:
            _sweep_stale_state_dirs()
        # Short path: the SSH control socket must fit in sun_path (108 bytes).
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="cfguest-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None
        self.port: Optional[int] = None
        self.detached = False
        self.boot_seconds: Optional[float] = None
        self.ready_seconds: Optional[float] = None
        self.system_state: Optional[str] = None
        self.failed_units: List[str] = []
        self.panics = 0  # boots retried after a guest kernel panic
        self._stopped = False
        # Reverse tunnels open on the master connection: guest port -> the -R spec that opened it.
        self._tunnels: Dict[int, str] = {}

    # ---------------------------------------------------------------- paths --
    @property
    def log_path(self) -> Path:
        return self.state_dir / "serial.log"

    @property
    def ssh_config(self) -> Path:
        return self.state_dir / "ssh_config"

    @property
    def key(self) -> Path:
        return self.image / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        # A copy beside the state, so Ansible can pin the host keys at a fixed path.
        return self.state_dir / "known_hosts"

    @property
    def control_path(self) -> Path:
        return self.state_dir / "cm"

    # ---------------------------------------------------------------- start --
    def _qemu_argv(self, overlay: Path, port: int) -> List[str]:
        append = ("root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 "
                  "modprobe.blacklist=%s systemd.show_status=false" % BLACKLIST)
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max",
            "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-nodefaults", "-vga", "none", "-display", "none", "-no-reboot",
            "-serial", "file:%s" % self.log_path,
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
            "-append", append,
            # The overlay is thrown away after the boot: flushes need not reach disk.
            "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe" % overlay,
            "-netdev", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:%d-:22" % port,
            "-device", "virtio-net-pci,netdev=net0",
        ]

    def _write_ssh_config(self) -> None:
        shutil.copyfile(str(self.image / "known_hosts"), str(self.known_hosts))
        lines = [
            "Host guest %s" % HOST_ALIAS,
            "  HostName 127.0.0.1",
            "  Port %d" % self.port,
            "  User root",
            "  IdentityFile %s" % self.key,
            "  IdentitiesOnly yes",
            "  HostKeyAlias %s" % HOST_ALIAS,
            "  UserKnownHostsFile %s" % self.known_hosts,
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 20",
            "  ServerAliveInterval 10",
            "  ServerAliveCountMax 6",
            "  LogLevel ERROR",
            "",
        ]
        self.ssh_config.write_text("\n".join(lines))

    def start(self, detached: bool = False, lifetime: int = 3 * 3600) -> "Guest":
        if not image_complete(self.image):
            raise GuestError("guest image %s incomplete: run scripts/build-guest" % self.image)
        self.detached = detached
        overlay = self.state_dir / "overlay.qcow2"
        if overlay.exists():
            overlay.unlink()
        res = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                              "-b", str(self.image / "disk.raw"), str(overlay)],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise GuestError("qemu-img create failed: %s" % res.stderr.strip())
        if not detached:
            atexit.register(self.stop)
            _install_signal_handlers()
        self._boot(lifetime)
        return self

    def _boot(self, lifetime: int, port: Optional[int] = None) -> None:
        """Start QEMU on the existing overlay and wait until the system is up.
        ``port``: try that SSH port first (a reboot keeps the address Ansible
        already has in its inventory).

        A guest kernel that panics while booting is booted again, up to twice:
        under TCG with two vCPUs the kernel's live code patching (int3 while
        patching static keys) sometimes oopses in early boot - seen here on a
        second boot of the same disk. It happens before the root file system
        is used, so a new boot on the same overlay is a clean retry."""
        t0 = time.monotonic()
        for boot_try in range(3):
            self._launch(lifetime, port)
            try:
                self._write_ssh_config()
                self._wait_for_ssh(t0 + boot_try * 60)
                break
            except GuestError:
                panicked = "Kernel panic" in self.serial_tail(200)
                if self._alive() or not panicked or boot_try == 2:
                    raise
                os.replace(str(self.log_path), str(self.state_dir / ("serial.panic-%d.log" % (boot_try + 1))))
                self.panics += 1
                port = self.port
        self.boot_seconds = time.monotonic() - t0
        self._wait_for_system(t0)
        self.ready_seconds = time.monotonic() - t0
        self._save_state()

    def _launch(self, lifetime: int, port: Optional[int]) -> None:
        overlay = self.state_dir / "overlay.qcow2"
        for attempt in range(5 if port else 3):
            if port and attempt < 3:
                self.port = port
            else:
                self.port = free_port()
            argv = self._qemu_argv(overlay, self.port)
            if self.log_path.exists():
                self.log_path.unlink()
            with open(str(self.state_dir / "qemu.stderr"), "wb") as stderr:
                if self.detached:
                    argv = ["timeout", "--kill-after=15", str(lifetime)] + argv
                    self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=stderr, start_new_session=True)
                else:
                    # Own session: Ctrl-C reaches pytest (which then powers off), not QEMU.
                    self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=stderr, start_new_session=True,
                                                 preexec_fn=_set_pdeathsig)
            self.pid = self.proc.pid
            _RUNNING.add(self)
            self._save_state()
            time.sleep(0.5)
            if self.proc.poll() is None:
                return
            err = (self.state_dir / "qemu.stderr").read_text(errors="replace")
            if "Could not set up host forwarding" not in err or attempt == (4 if port else 2):
                raise GuestError("qemu exited at once (exit %s): %s" % (self.proc.returncode, err.strip()))
            time.sleep(1.0)

    def reboot(self, poweroff_timeout: float = 60.0, lifetime: int = 3 * 3600) -> float:
        """Power the guest off cleanly and boot it again on the same overlay
        (what was written in the guest stays), on the same SSH port if it is
        free. QEMU runs with -no-reboot, so a guest-side reboot would only end
        it: the harness starts the second boot. Returns the seconds from the
        poweroff request until the system was up again."""
        if not self._alive():
            raise GuestError("reboot: the guest is not running")
        t0 = time.monotonic()
        asked = self.run("systemctl --no-block poweroff", check=False, timeout=30)
        if asked.returncode != 0:
            raise GuestError("reboot: poweroff refused: %s" % asked.stderr.strip())
        deadline = time.monotonic() + poweroff_timeout
        while self._alive() and time.monotonic() < deadline:
            time.sleep(0.25)
        if self._alive():
            # A kill instead of a clean poweroff would lose what the guest had
            # not written yet: that is no reboot test any more.
            raise GuestError("reboot: the guest did not power off within %.0f s. Serial log tail:\n%s"
                             % (poweroff_timeout, self.serial_tail()))
        if self.proc is not None:
            self.proc.wait(timeout=10)
        self._close_master()
        if self.log_path.exists():
            os.replace(str(self.log_path), str(self.state_dir / "serial.previous.log"))
        self._boot(lifetime, port=self.port)
        return time.monotonic() - t0

    def _close_master(self) -> None:
        self._tunnels.clear()  # the master's forwards end with it
        if self.control_path.exists():
            subprocess.run(["ssh", "-F", str(self.ssh_config), "-o", "ControlPath=%s" % self.control_path,
                            "-O", "exit", "guest"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
            try:
                self.control_path.unlink()
            except OSError:
                pass

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None or not _pid_alive(self.pid):
            return False
        # Attached from state.json: make sure the pid was not reused by
        # something else (QEMU's and timeout's argv name our serial log).
        try:
            with open("/proc/%d/cmdline" % self.pid, "rb") as f:
                return str(self.log_path).encode() in f.read()
        except OSError:
            return False

    def serial_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no serial log)"
        return "\n".join(lines[-n:])

    def _wait_for_ssh(self, t0: float) -> None:
        # The master connection is made once with -f (it goes to the background
        # after authentication); later ssh calls reuse it and cost ~0.2 s
        # instead of 2+ s under emulation.
        deadline = t0 + self.boot_timeout
        last = ""
        while time.monotonic() < deadline:
            if not self._alive():
                raise GuestError("QEMU exited during boot. Serial log tail:\n" + self.serial_tail())
            try:
                res = subprocess.run(
                    ["ssh", "-F", str(self.ssh_config), "-o", "ControlMaster=yes",
                     "-o", "ControlPath=%s" % self.control_path, "-o", "ControlPersist=yes",
                     "-o", "ConnectTimeout=10", "-f", "-N", "guest"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    timeout=60)
                if res.returncode == 0:
                    return
                last = res.stderr.decode(errors="replace").strip()
            except subprocess.TimeoutExpired:
                last = "ssh timed out"
            time.sleep(1.0)
        raise GuestError("no SSH from the guest within %.0f s (last: %s). Serial log tail:\n%s"
                         % (self.boot_timeout, last, self.serial_tail()))

    def _wait_for_system(self, t0: float) -> None:
        left = max(30.0, t0 + self.boot_timeout - time.monotonic())
        res = self.run("systemctl is-system-running --wait", check=False, timeout=left)
        self.system_state = res.stdout.strip()
        if self.system_state not in ("running", "degraded"):
            raise GuestError("guest system state %r after boot (%s)" % (self.system_state, res.stderr.strip()))
        if self.system_state == "degraded":
            failed = self.run("systemctl --failed --no-legend --plain", check=False)
            self.failed_units = [line.split()[0] for line in failed.stdout.splitlines() if line.strip()]

    # ------------------------------------------------------------------ use --
    def ssh_argv(self) -> List[str]:
        return ["ssh", "-F", str(self.ssh_config), "-o", "ControlMaster=no",
                "-o", "ControlPath=%s" % self.control_path, "guest"]

    def run(self, command: Union[str, Sequence[str]], input: Optional[bytes] = None, check: bool = True,
            timeout: Optional[float] = 600, text: bool = True) -> "subprocess.CompletedProcess":
        """Run a command in the guest as root: a string goes to the guest's
        shell as is, an argv list is quoted for it."""
        remote = command if isinstance(command, str) else " ".join(shlex.quote(str(a)) for a in command)
        data: Union[bytes, str, None] = input
        if text and isinstance(input, bytes):
            data = input.decode()
        res = subprocess.run(self.ssh_argv() + ["--", remote], input=data,
                             stdin=None if input is not None else subprocess.DEVNULL,
                             capture_output=True, text=text, timeout=timeout)
        if check and res.returncode != 0:
            raise GuestError("guest command failed (exit %d): %s\nstdout: %s\nstderr: %s" % (
                res.returncode, remote, _tail(res.stdout), _tail(res.stderr)))
        return res

    def run_json(self, command: Union[str, Sequence[str]], timeout: Optional[float] = 600) -> object:
        res = self.run(command, timeout=timeout)
        try:
            return json.loads(res.stdout)
        except ValueError:
            raise GuestError("guest command printed no JSON: %s\nstdout: %s\nstderr: %s" % (
                command, _tail(res.stdout), _tail(res.stderr)))

    # -------------------------------------------------------------- tunnels --
    def _mux(self, op: str, spec: str) -> "subprocess.CompletedProcess":
        return subprocess.run(["ssh", "-F", str(self.ssh_config), "-o", "ControlPath=%s" % self.control_path,
                               "-O", op, "-R", spec, "guest"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)

    def open_reverse_tunnel(self, host_port: int, guest_port: int = 0) -> int:
        """Make ``127.0.0.1:guest_port`` in the guest reach ``127.0.0.1:host_port``
        on the host: ``ssh -R 127.0.0.1:GUEST:127.0.0.1:HOST``, added to the
        master connection (``-O forward``) instead of a new SSH login, which
        costs seconds under emulation. The guest listens on its loopback only;
        the guest's own network stays restricted (the tunnel rides on the SSH
        session). ``guest_port`` 0: the guest's sshd picks a free port.
        Returns the guest port. Closed by :meth:`close_reverse_tunnel`, or at
        the latest when the master connection ends (stop, reboot)."""
        if not self.control_path.exists():
            raise GuestError("reverse tunnel: no SSH master connection to the guest (not started?)")
        spec = "127.0.0.1:%d:127.0.0.1:%d" % (guest_port, host_port)
        if guest_port in self._tunnels:
            # The master answers a repeated forward with success: refuse it here,
            # or closing one of the two would close the other.
            raise GuestError("reverse tunnel: guest port %d is already forwarded" % guest_port)
        if guest_port == 0 and spec in self._tunnels.values():
            # The master cancels a port-0 forward by its spec, not by the port it
            # got: two of them to one host port could not be told apart.
            raise GuestError("reverse tunnel: one to host port %d with a guest-chosen port is already open"
                             % host_port)
        res = self._mux("forward", spec)
        if res.returncode != 0:
            raise GuestError("reverse tunnel %s failed (exit %d): %s" % (spec, res.returncode, res.stderr.strip()))
        if guest_port == 0:
            # The master prints the port the guest's sshd allocated.
            try:
                guest_port = int(res.stdout.strip())
            except ValueError:
                self._mux("cancel", spec)
                raise GuestError("reverse tunnel %s: no allocated port in ssh's answer %r" % (spec, res.stdout))
        self._tunnels[guest_port] = spec
        return guest_port

    def close_reverse_tunnel(self, guest_port: int) -> None:
        """Stop forwarding the guest's 127.0.0.1:guest_port (a no-op if it is not open)."""
        spec = self._tunnels.pop(guest_port, None)
        if spec is None or not self.control_path.exists():
            return
        res = self._mux("cancel", spec)
        if res.returncode != 0:
            raise GuestError("closing reverse tunnel %s failed (exit %d): %s"
                             % (spec, res.returncode, res.stderr.strip()))

    @contextlib.contextmanager
    def reverse_tunnel(self, host_port: int, guest_port: int = 0) -> Iterator[int]:
        """:meth:`open_reverse_tunnel` for a ``with`` block; yields the guest port."""
        port = self.open_reverse_tunnel(host_port, guest_port)
        try:
            yield port
        except BaseException:
            # The block's own error is the one to see, not a failed close after it.
            try:
                self.close_reverse_tunnel(port)
            except GuestError:
                pass
            raise
        self.close_reverse_tunnel(port)

    def copy_project(self, repo: Path = REPO) -> None:
        """Copy the core package, the CLIs and the in-guest test scripts into
        GUEST_ROOT, with wrappers on PATH for our CLIs."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            def add(src: Path, arcname: str) -> None:
                for path in sorted(src.rglob("*")) if src.is_dir() else [src]:
                    if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
                        continue
                    rel = path.relative_to(src) if src.is_dir() else Path(path.name)
                    info = tar.gettarinfo(str(path), arcname="%s/%s" % (arcname, rel) if src.is_dir() else arcname)
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
            add(repo / "plugins" / "module_utils" / "composefs", "lib/composefs_fleet")
            add(repo / "cli", "lib/composefs_fleet_cli")
            if (repo / "agent").is_dir():
                add(repo / "agent", "lib/composefs_fleet_agent")
            add(repo / "tests" / "guest" / "guest_checks.py", "tests/guest_checks.py")
            for wrapper, module in GUEST_TOOLS:
                name = os.path.basename(wrapper)
                body = ("#!/bin/sh\n# composefs-fleet %s, run from the copy in %s\n"
                        "PYTHONPATH=%s/lib${PYTHONPATH:+:$PYTHONPATH} exec python3 -c "
                        "'import sys; sys.argv[0] = \"%s\"; from %s import main; sys.exit(main())' \"$@\"\n"
                        % (name, GUEST_ROOT, GUEST_ROOT, name, module)).encode()
                info = tarfile.TarInfo("bin/%s" % name)
                info.size = len(body)
                info.mode = 0o755
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(body))
        links = " && ".join("ln -sf %s/bin/%s %s" % (GUEST_ROOT, os.path.basename(w), w) for w, _ in GUEST_TOOLS)
        script = ("set -e; rm -rf {r}; mkdir -p {r}; tar -x -C {r}; {links}; "
                  "python3 -m compileall -q {r}/lib {r}/tests >/dev/null").format(r=GUEST_ROOT, links=links)
        self.run(script, input=buf.getvalue(), text=False)

    # ----------------------------------------------------------------- stop --
    def stop(self, poweroff_timeout: float = 45.0) -> None:
        """Power the guest off; kill QEMU if it is still there after the timeout."""
        if self._stopped:
            return
        self._stopped = True
        try:
            # Poweroff only through an SSH connection that is up; a guest still
            # booting (or wedged) is killed at once: its overlay is thrown away.
            if self._alive() and self.control_path.exists():
                try:
                    asked = subprocess.run(self.ssh_argv() + ["--", "systemctl --no-block poweroff"],
                                           stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
                    powering_off = asked.returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    powering_off = False
                deadline = time.monotonic() + (poweroff_timeout if powering_off else 0)
                while self._alive() and time.monotonic() < deadline:
                    time.sleep(0.25)
            self._kill()
        finally:
            self._close_master()
            _RUNNING.discard(self)
            if not self._own_state_dir and (self.state_dir / "state.json").exists():
                self.pid = None
                self._save_state()
            overlay = self.state_dir / "overlay.qcow2"
            if overlay.exists():
                overlay.unlink()
            if self._own_state_dir:
                shutil.rmtree(str(self.state_dir), ignore_errors=True)

    def _kill(self) -> None:
        if self.pid is None:
            return
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if not self._alive():
                break
            try:
                if self.detached:
                    os.killpg(self.pid, sig)  # timeout and the qemu below it
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self._alive():
            raise GuestError("QEMU pid %d survived SIGKILL" % self.pid)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- state --
    def state(self) -> Dict[str, object]:
        return {
            "pid": self.pid, "port": self.port, "host": "127.0.0.1", "user": "root",
            "identity_file": str(self.key), "known_hosts": str(self.known_hosts),
            "host_key_alias": HOST_ALIAS, "ssh_config": str(self.ssh_config),
            "control_path": str(self.control_path), "state_dir": str(self.state_dir),
            "serial_log": str(self.log_path), "image": str(self.image), "detached": self.detached,
            "boot_seconds": self.boot_seconds, "ready_seconds": self.ready_seconds,
            "system_state": self.system_state, "failed_units": self.failed_units, "panics": self.panics,
        }

    def _save_state(self) -> None:
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state(), indent=1) + "\n")
        os.replace(str(tmp), str(self.state_dir / "state.json"))

    @classmethod
    def attach(cls, state_dir: PathLike) -> "Guest":
        """The guest a detached `start` left running in state_dir."""
        state = json.loads((Path(state_dir) / "state.json").read_text())
        guest = cls(state_dir=state_dir, image=Path(state["image"]))
        guest._own_state_dir = False
        guest.pid = state["pid"]
        guest.port = state["port"]
        guest.detached = bool(state["detached"])
        guest.system_state = state.get("system_state")
        return guest


def _tail(text: Union[str, bytes, None], n: int = 3000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:]


_RUNNING: "set" = set()
_handlers_installed = False


def _install_signal_handlers() -> None:
    """SIGTERM/SIGHUP: stop the guests at once, then unwind like Ctrl-C (pytest
    ends the session on KeyboardInterrupt; it would count SystemExit as one
    test's error and go on)."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True

    def handler(signum: int, frame: object) -> None:
        for guest in list(_RUNNING):
            try:
                guest.stop(poweroff_timeout=10)
            except Exception:
                pass
        raise KeyboardInterrupt("signal %d" % signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, handler)


# ------------------------------------------------------------------- CLI --

def _cmd_start(args: argparse.Namespace) -> int:
    build_image(quiet=False)
    guest = Guest(state_dir=args.state_dir, memory_mb=args.memory, cpus=args.cpus, boot_timeout=args.boot_timeout)
    try:
        guest.start(detached=True, lifetime=args.lifetime)
        if not args.no_copy:
            guest.copy_project()
    except BaseException:
        guest.stop(poweroff_timeout=5)
        raise
    print(json.dumps(guest.state()))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    if not (Path(args.state_dir) / "state.json").is_file():
        print("guest_vm: nothing to stop in %s" % args.state_dir, file=sys.stderr)
        return 0
    Guest.attach(args.state_dir).stop()
    return 0


def _cmd_reboot(args: argparse.Namespace) -> int:
    guest = Guest.attach(args.state_dir)
    seconds = guest.reboot(lifetime=args.lifetime)
    print(json.dumps(dict(guest.state(), reboot_seconds=seconds)))
    return 0


def _cmd_ssh(args: argparse.Namespace) -> int:
    guest = Guest.attach(args.state_dir)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    return subprocess.call(guest.ssh_argv() + ["--", " ".join(shlex.quote(c) for c in cmd)])


def _cmd_run(args: argparse.Namespace) -> int:
    build_image(quiet=False)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    with Guest(memory_mb=args.memory, cpus=args.cpus, boot_timeout=args.boot_timeout) as guest:
        guest.start()
        print("guest_vm: SSH after %.1f s, system %s after %.1f s%s" % (
            guest.boot_seconds, guest.system_state, guest.ready_seconds,
            " (failed: %s)" % ", ".join(guest.failed_units) if guest.failed_units else ""), file=sys.stderr)
        guest.copy_project()
        rc = subprocess.call(guest.ssh_argv() + ["--", " ".join(shlex.quote(c) for c in cmd)]) if cmd else 0
        t = time.monotonic()
    print("guest_vm: powered off in %.1f s" % (time.monotonic() - t), file=sys.stderr)
    return rc


def _cmd_check(args: argparse.Namespace) -> int:
    reason = missing_requirements()
    print(reason or "guest available (image %s%s)" % (image_dir(), "" if image_complete() else ", to be built"))
    return 1 if reason else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="guest_vm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("start", "run"):
        s = sub.add_parser(name)
        s.add_argument("--memory", type=int, default=1536, help="MiB")
        s.add_argument("--cpus", type=int, default=2)
        s.add_argument("--boot-timeout", type=float, default=420.0)
        if name == "start":
            s.add_argument("--state-dir", required=True)
            s.add_argument("--lifetime", type=int, default=3 * 3600,
                           help="seconds after which QEMU is killed even without stop")
            s.add_argument("--no-copy", action="store_true", help="do not copy the project in")
        else:
            s.add_argument("command", nargs=argparse.REMAINDER)
    s = sub.add_parser("stop")
    s.add_argument("--state-dir", required=True)
    s = sub.add_parser("reboot", help="poweroff, then boot again on the same overlay and SSH port")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--lifetime", type=int, default=3 * 3600,
                   help="seconds after which the new QEMU is killed even without stop")
    s = sub.add_parser("ssh")
    s.add_argument("--state-dir", required=True)
    s.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("check")
    sub.add_parser("build")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            print(build_image())
            return 0
        return {"start": _cmd_start, "stop": _cmd_stop, "ssh": _cmd_ssh, "run": _cmd_run, "reboot": _cmd_reboot,
                "check": _cmd_check}[args.cmd](args)
    except GuestError as exc:
        print("guest_vm: ERROR: %s" % exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
