# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""hash_pool: one worker-pool policy for mkcomposefs, add-image and fsck."""
from __future__ import annotations

import os

import pytest

from composefs_fleet import hash_pool

_PARENT = [0]


def _double(job: int) -> int:
    return 2 * job


def _double_dying_at_7(job: int) -> int:
    if os.getpid() != _PARENT[0] and job == 7:
        os._exit(3)
    return 2 * job


def _fail_at_3(job: int) -> int:
    if job == 3:
        raise ValueError("job 3 is bad")
    return job


@pytest.fixture
def always_pool(monkeypatch):
    _PARENT[0] = os.getpid()
    monkeypatch.setattr(hash_pool, "PROCESS_MIN_BYTES", 0)


def test_policy():
    assert not hash_pool.pays_off(100, hash_pool.PROCESS_MIN_BYTES, 1)  # one CPU
    assert not hash_pool.pays_off(1, hash_pool.PROCESS_MIN_BYTES, 4)  # one file
    assert not hash_pool.pays_off(100, hash_pool.PROCESS_MIN_BYTES - 1, 4)  # too little data
    assert hash_pool.pays_off(2, hash_pool.PROCESS_MIN_BYTES, 2)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_in_order(always_pool, workers):
    assert list(hash_pool.hash_map(_double, list(range(50)), 1, workers)) == [2 * i for i in range(50)]


def test_a_dying_worker_leaves_the_rest_to_this_process(always_pool):
    """Whatever the workers returned is kept, the rest is computed here, in order."""
    assert list(hash_pool.hash_map(_double_dying_at_7, list(range(40)), 1, 2)) == [2 * i for i in range(40)]


_DONE_LOG = [""]


def _slow_after_fail(job: int) -> int:
    if job == 3:
        raise ValueError("job 3 is bad")
    if os.getpid() != _PARENT[0] and job > 3:
        import time

        time.sleep(0.05)  # the other worker is busy long after job 3 failed
        with open(_DONE_LOG[0], "a") as log:
            log.write("%d\n" % job)
    return job


def test_a_job_error_is_raised_without_waiting_for_the_other_workers(always_pool, tmp_path):
    _DONE_LOG[0] = str(tmp_path / "done")
    (tmp_path / "done").write_text("")
    with pytest.raises(ValueError, match="job 3 is bad"):
        list(hash_pool.hash_map(_slow_after_fail, list(range(200)), 1, 2))
    # Raised when job 3's turn came, not after the workers had done the other 196.
    assert len((tmp_path / "done").read_text().split()) < 100


def test_a_job_error_is_the_callers(always_pool):
    with pytest.raises(ValueError, match="job 3 is bad"):
        list(hash_pool.hash_map(_fail_at_3, list(range(10)), 1, 2))
    with pytest.raises(ValueError, match="job 3 is bad"):
        list(hash_pool.hash_map(_fail_at_3, list(range(10)), 1, 1))


def test_a_pool_that_cannot_start_is_no_error(always_pool, monkeypatch):
    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert list(hash_pool.hash_map(_double, list(range(5)), 1, 2)) == [0, 2, 4, 6, 8]


def _unmarshallable(job: int):
    return (lambda: job) if os.getpid() != _PARENT[0] and job == 4 else b"%d" % job


def test_a_result_the_workers_cannot_send_is_computed_here(always_pool):
    assert list(hash_pool.hash_map(_unmarshallable, list(range(9)), 1, 2)) == [b"%d" % i for i in range(9)]


def test_closing_early_stops_the_workers(always_pool):
    results = hash_pool.hash_map(_double, list(range(1000)), 1, 2)
    pids = list(results._pool.pids)
    assert len(pids) == 2
    assert next(results) == 0
    results.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already
