# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""One worker-pool policy for hashing many files: mkcomposefs, add-image, fsck.

Hashing 4 KiB blocks holds the GIL between blocks, so Python threads do not
hash in parallel; forked worker processes do.  Starting them costs more
than it saves below :data:`PROCESS_MIN_BYTES` of data, with fewer than two
files, or with one CPU, so then everything is hashed in the calling process.

A pool that cannot start (no fork, a sandbox) or breaks because a worker
died (OOM killer, seccomp) is never an error: what the workers did not
return is hashed in the calling process.  An exception raised by the job
function itself (a file that changed, an I/O error) is the job's result and
propagates to the caller as it would in-process.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")

#: Below this much data to hash, starting worker processes costs more than it saves.
PROCESS_MIN_BYTES = 32 << 20


def cpu_count() -> int:
    """CPUs this process may run on (the default number of workers)."""
    # C mkcomposefs counts the CPUs in its affinity mask, not all CPUs.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pays_off(jobs: int, total_bytes: int, workers: int) -> bool:
    """Would :func:`hash_map` use worker processes for this much work?"""
    return workers >= 2 and jobs >= 2 and total_bytes >= PROCESS_MIN_BYTES


def hash_map(func: Callable[[Job], Result], jobs: Sequence[Job], total_bytes: int,
             workers: int) -> Iterator[Result]:
    """``func(job)`` for every job, in order: in ``workers`` forked processes when that pays off.

    ``func`` must be a module-level function (it is called in the workers)
    and ``jobs`` picklable; descriptors in them stay valid, the workers are
    forked now, before this returns (so before the caller starts threads).
    """
    started = _start(func, jobs, total_bytes, workers)
    return _results(func, jobs, started)


def _start(func: Callable[[Job], Result], jobs: Sequence[Job], total_bytes: int,
           workers: int) -> Optional[Tuple[Any, Iterator[Result]]]:
    if not pays_off(len(jobs), total_bytes, workers):
        return None
    # Imported here: multiprocessing costs every CLI start ~15 ms otherwise.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    try:
        # fork: the workers need nothing but the already imported modules.
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                   mp_context=multiprocessing.get_context("fork"))
    except (ValueError, OSError, ImportError, NotImplementedError):
        return None
    chunk = max(1, min(64, len(jobs) // (8 * workers)))
    from concurrent.futures.process import BrokenProcessPool

    try:
        # map() submits every job now, so every worker is forked now; an
        # error here is the pool's (fork, pipes), never a job's.
        return pool, pool.map(func, jobs, chunksize=chunk)
    except (OSError, BrokenProcessPool):
        _shutdown(pool)
        return None


def _results(func: Callable[[Job], Result], jobs: Sequence[Job],
             started: Optional[Tuple[Any, Iterator[Result]]]) -> Iterator[Result]:
    done = 0
    if started is not None:
        from concurrent.futures.process import BrokenProcessPool

        pool, results = started
        try:
            for result in results:
                done += 1
                yield result
        except BrokenProcessPool:
            pass  # a worker died: the rest is hashed here
        finally:
            _shutdown(pool)
    for job in jobs[done:]:
        yield func(job)


def _shutdown(pool: Any) -> None:
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    except TypeError:  # Python 3.8: no cancel_futures
        pool.shutdown(wait=True)


__all__ = ["PROCESS_MIN_BYTES", "cpu_count", "hash_map", "pays_off"]
