# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""A pull spread over transfer processes (pull_workers): same result, same errors, nothing half published."""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from composefs_fleet import pull as pull_module
from composefs_fleet import pull_workers
from composefs_fleet.errors import RemoteError, RemoteNotFound, StoreError
from composefs_fleet.pull import pull
from composefs_fleet.remote_file import FileTransport
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.store_fsck import check as fsck


@pytest.fixture
def remote(tmp_path: Path):
    """A store with one image of 40 objects (5-200 KB)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(40):
        (tree / ("f%02d" % i)).write_bytes(os.urandom(5000 + 5000 * i))
    src, _ = Store.init(tmp_path / "remote")
    digest = add_image(src, tree, "app/v1").digest
    needed = src.image_objects(digest).objects
    src.close()
    return tmp_path / "remote", digest, needed


@pytest.fixture
def two_processes(monkeypatch):
    """Every pull in the test spreads its transfers over two processes."""
    calls = []

    def count(transport, missing, jobs):
        calls.append(len(missing))
        return 2

    monkeypatch.setattr(pull_module, "_process_count", count)
    return calls


def _leftovers(store_dir: Path) -> list:
    return sorted(p.name for p in (store_dir / "objects").iterdir() if p.name.startswith(".tmp"))


def _clean(store_dir: Path) -> None:
    with Store.open(store_dir) as store:
        result = fsck(store)
    assert result.clean, result.as_dict()


def test_two_processes_give_the_same_store(tmp_path: Path, remote, two_processes) -> None:
    src, digest, needed = remote
    local, _ = Store.init(tmp_path / "local")
    res = pull(local, "file://%s" % src, "app/v1", jobs=4)
    assert two_processes == [len(needed)]
    assert (res.digest, res.objects_fetched, res.bytes_fetched) == (digest, len(needed), sum(needed.values()))
    assert (tmp_path / "local/images" / digest).read_bytes() == (src / "images" / digest).read_bytes()
    for hexd in needed:
        rel = Path("objects") / hexd[:2] / hexd[2:]
        assert (tmp_path / "local" / rel).read_bytes() == (src / rel).read_bytes()
    assert _leftovers(tmp_path / "local") == []
    _clean(tmp_path / "local")


def test_a_corrupt_object_stops_both_processes_and_publishes_nothing_wrong(tmp_path: Path, remote, two_processes) -> None:
    src, _digest, needed = remote
    victim = sorted(needed)[len(needed) // 2]
    path = src / "objects" / victim[:2] / victim[2:]
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 0x55]))
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(RemoteError, match="fs-verity digest is .*not its name") as info:
        pull(local, "file://%s" % src, "app/v1", jobs=2)
    assert info.value.url.endswith(victim[2:]) and str(src) in str(info.value)
    assert local.list_refs() == [] and local.list_images() == []
    assert not (tmp_path / "local/objects" / victim[:2] / victim[2:]).exists()
    assert _leftovers(tmp_path / "local") == []
    _clean(tmp_path / "local")
    kept = sum(1 for p in (tmp_path / "local/objects").glob("??/*"))
    path.write_bytes(good)
    again = pull(local, "file://%s" % src, "app/v1", jobs=2)
    assert again.objects_fetched == len(needed) - kept
    _clean(tmp_path / "local")


def test_a_transfer_process_that_dies_is_an_error(tmp_path: Path, remote, two_processes, monkeypatch) -> None:
    src, _digest, needed = remote
    victim = sorted(needed)[0]
    real_stream = FileTransport.stream

    def stream(self, path, sink):
        if path.endswith(victim[2:]):
            os.kill(os.getpid(), signal.SIGKILL)  # in the child, which has this patch too
        return real_stream(self, path, sink)

    monkeypatch.setattr(FileTransport, "stream", stream)
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(StoreError, match="transfer process .* ended with signal %d" % signal.SIGKILL):
        pull(local, "file://%s" % src, "app/v1", jobs=2)
    assert local.list_refs() == [] and local.list_images() == []
    _clean(tmp_path / "local")


@pytest.mark.parametrize("error", [
    RemoteError("http://h/cfs/objects/ab/cd", "fs-verity digest is x, not its name"),
    RemoteNotFound("http://h/cfs/objects/ab/cd", "not found"),
    OSError(errno.ENOSPC, "No space left on device while writing object ab/cd"),
    StoreError("objects/ab is a symbolic link"),
    KeyboardInterrupt(),
])
def test_errors_cross_the_pipe_intact(error: BaseException) -> None:
    back = pull_workers._error_from(pull_workers._error_to(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    if isinstance(error, RemoteError):
        assert back.url == error.url
    if isinstance(error, OSError):
        assert back.errno == error.errno


def test_process_count_policy(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    big = [("%064x" % i, 1 << 20, False) for i in range(64)]
    transport = FileTransport.__new__(FileTransport)
    assert pull_module._process_count(transport, big, 8) == 4
    assert pull_module._process_count(transport, big, 2) == 2
    assert pull_module._process_count(transport, big[:8], 8) == 1          # too few objects to share
    assert pull_module._process_count(transport, [(h, 1000, d) for h, _s, d in big], 8) == 1  # too few bytes
    assert pull_module._process_count(object(), big, 8) == 1               # a transport that cannot fork


def test_a_transfer_process_stopped_from_outside_publishes_no_ref(tmp_path: Path, remote, two_processes,
                                                                   monkeypatch) -> None:
    """SIGTERM to a transfer process alone (pkill, a cgroup kill): its share is unfinished, so no ref."""
    src, _digest, needed = remote
    victim = sorted(needed)[0]
    real_stream = FileTransport.stream

    def stream(self, path, sink):
        if path.endswith(victim[2:]):
            os.kill(os.getpid(), signal.SIGTERM)  # in the child: its handler only asks it to stop
            time.sleep(1.0)  # the handler runs in the child's main thread: let it, before this transfer goes on
        return real_stream(self, path, sink)

    monkeypatch.setattr(FileTransport, "stream", stream)
    local, _ = Store.init(tmp_path / "local")
    with pytest.raises(KeyboardInterrupt):
        pull(local, "file://%s" % src, "app/v1", jobs=2)
    assert local.list_refs() == [] and local.list_images() == []
    assert _leftovers(tmp_path / "local") == []
    _clean(tmp_path / "local")
