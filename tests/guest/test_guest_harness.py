# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""The guest runner on the host side (no boot): availability reasons, the
recipe key shared with scripts/build-guest, the QEMU command line."""
import subprocess
from pathlib import Path

import guest_vm
import pytest


def test_missing_tools_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("COMPOSEFS_FLEET_CACHE", str(tmp_path / "empty-cache"))
    reason = guest_vm.missing_requirements()
    assert reason.startswith("QEMU guest not available: ")
    for piece in ("qemu-system-x86_64 not on PATH (apt-get install qemu-system-x86)",
                  "qemu-img not on PATH (apt-get install qemu-utils)",
                  "ssh not on PATH (apt-get install openssh-client)",
                  "debootstrap not on PATH (apt-get install debootstrap)",
                  str(tmp_path / "empty-cache" / "guest" / guest_vm.recipe_hash())):
        assert piece in reason, reason


def test_recipe_key_matches_build_script(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSEFS_FLEET_CACHE", str(tmp_path))
    out = subprocess.run(["bash", str(guest_vm.BUILD_SCRIPT), "--print-dir"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert Path(out) == guest_vm.image_dir() == tmp_path / "guest" / guest_vm.recipe_hash()
    # --check says "not built" for an empty cache.
    assert subprocess.run(["bash", str(guest_vm.BUILD_SCRIPT), "--check"]).returncode == 1
    assert not guest_vm.image_complete()


def test_qemu_command_line_is_tcg_headless_and_restricted(tmp_path):
    vm = guest_vm.Guest(state_dir=tmp_path, image=tmp_path / "image")
    argv = vm._qemu_argv(tmp_path / "overlay.qcow2", 2222)
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg" and "kvm" not in argv
    for flag in ("-nodefaults", "-no-reboot"):
        assert flag in argv
    assert argv[argv.index("-vga") + 1] == "none" and argv[argv.index("-display") + 1] == "none"
    assert "-serial file:%s" % (tmp_path / "serial.log") in joined
    assert "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22" in argv
    assert "file=%s,if=virtio,format=qcow2,cache=unsafe" % (tmp_path / "overlay.qcow2") in argv


def test_reverse_tunnel_rides_on_the_master_connection(monkeypatch, tmp_path):
    vm = guest_vm.Guest(state_dir=tmp_path, image=tmp_path / "image")
    with pytest.raises(guest_vm.GuestError, match="no SSH master connection"):
        vm.open_reverse_tunnel(8080)
    vm.control_path.touch()
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        port0 = ":0:" in argv[argv.index("-R") + 1]
        return subprocess.CompletedProcess(argv, 0, "41234\n" if port0 and "forward" in argv else "", "")

    monkeypatch.setattr(guest_vm.subprocess, "run", fake_run)
    with vm.reverse_tunnel(8080) as port:
        assert port == 41234
        # -O forward on the existing master: no new login; loopback on both ends.
        assert calls[-1] == ["ssh", "-F", str(vm.ssh_config), "-o", "ControlPath=%s" % vm.control_path,
                             "-O", "forward", "-R", "127.0.0.1:0:127.0.0.1:8080", "guest"]
        with pytest.raises(guest_vm.GuestError, match="already open"):
            vm.open_reverse_tunnel(8080)
        assert vm.open_reverse_tunnel(8081, 5000) == 5000
        with pytest.raises(guest_vm.GuestError, match="5000 is already forwarded"):
            vm.open_reverse_tunnel(9000, 5000)
        vm.close_reverse_tunnel(5000)
        assert calls[-1][-4:] == ["cancel", "-R", "127.0.0.1:5000:127.0.0.1:8081", "guest"]
    # A port-0 forward is cancelled by the spec that opened it (the master
    # does not know it by the allocated port).
    assert calls[-1][-4:] == ["cancel", "-R", "127.0.0.1:0:127.0.0.1:8080", "guest"]
    n = len(calls)
    vm.close_reverse_tunnel(41234)  # already closed: nothing to do
    assert len(calls) == n


def test_reverse_tunnel_failure_is_reported(monkeypatch, tmp_path):
    vm = guest_vm.Guest(state_dir=tmp_path, image=tmp_path / "image")
    vm.control_path.touch()
    monkeypatch.setattr(guest_vm.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, 255, "", "mux_client_forward: forwarding request failed: remote port forwarding failed for listen port 22\n"))
    with pytest.raises(guest_vm.GuestError, match="reverse tunnel 127.0.0.1:22:127.0.0.1:80 failed .exit 255.: "
                                                  "mux_client_forward: .*listen port 22"):
        vm.open_reverse_tunnel(80, 22)


def test_reverse_tunnel_block_error_is_not_hidden_by_a_failed_close(monkeypatch, tmp_path):
    vm = guest_vm.Guest(state_dir=tmp_path, image=tmp_path / "image")
    vm.control_path.touch()
    answers = iter([subprocess.CompletedProcess([], 0, "41000\n", ""), subprocess.CompletedProcess([], 255, "", "gone\n")])
    monkeypatch.setattr(guest_vm.subprocess, "run", lambda argv, **kw: next(answers))
    with pytest.raises(KeyError, match="from the block"):
        with vm.reverse_tunnel(80):
            raise KeyError("from the block")
