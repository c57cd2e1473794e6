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
propagates to the caller as it would in-process: the job is run again here,
which raises it.

The pool is a few ``os.fork()`` calls and pipes rather than
``concurrent.futures.ProcessPoolExecutor``: the workers inherit the job list
(nothing is pickled on the way in), take chunks of it from one pipe of chunk
numbers and send their results back through a pipe each, ``marshal``-ed.
Importing multiprocessing and starting its manager thread cost a directory
build about 20 ms, as much as hashing 40 MB.
"""

from __future__ import annotations

import marshal
import os
import signal
import struct
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, TypeVar

from .objects import write_all

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

    ``func`` runs in the workers on their inherited copy of ``jobs`` and must
    return what ``marshal`` can send (bytes, str, numbers, None, tuples,
    lists); a result it cannot send is computed again here.  Descriptors in
    the jobs stay valid; the workers are forked now, before this returns (so
    before the caller starts threads).
    """
    pool = _start(func, jobs, total_bytes, workers) if pays_off(len(jobs), total_bytes, workers) else None
    return _Results(_results(func, jobs, pool), pool)


class _Results:
    """The results iterator; :meth:`close` (also before the first result) stops the workers."""

    def __init__(self, results: Iterator[Any], pool: Optional["_Pool"]) -> None:
        self._results = results
        self._pool = pool

    def __iter__(self) -> "_Results":
        return self

    def __next__(self) -> Any:
        return next(self._results)

    def close(self) -> None:
        self._results.close()
        if self._pool is not None:
            self._pool.stop()


class _Pool:
    """Forked workers and the pipes their results come back through."""

    def __init__(self) -> None:
        self.pids: List[int] = []
        self.pipes: Dict[int, bytearray] = {}  # read end -> bytes received, not yet parsed
        self.results: Dict[int, Any] = {}  # job index -> result
        self.failed: Set[int] = set()  # jobs whose function raised in a worker: run again here

    def pump(self) -> bool:
        """Wait for results; False once every worker has ended (nothing more will come)."""
        import select

        if not self.pipes:
            return False
        poller = select.poll()  # not select(): descriptors above 1023 are fine
        for fd in self.pipes:
            poller.register(fd, select.POLLIN)
        for fd, _events in poller.poll():
            data = os.read(fd, 1 << 16)
            if not data:
                del self.pipes[fd]
                os.close(fd)
                continue
            buf = self.pipes[fd]
            buf += data
            while len(buf) >= _FRAME.size:
                (length,) = _FRAME.unpack_from(buf)
                if len(buf) < _FRAME.size + length:
                    break
                first, values, failed = marshal.loads(bytes(buf[_FRAME.size:_FRAME.size + length]))
                del buf[:_FRAME.size + length]
                for offset, value in enumerate(values):
                    self.results[first + offset] = value
                if failed:
                    self.failed.add(first + len(values))
        return True

    def stop(self) -> None:
        """Kill the workers still running (after an error or an early end) and reap them all."""
        for fd in self.pipes:
            os.close(fd)
        self.pipes.clear()
        reap(self.pids, kill=True)
        self.pids.clear()


def reap(pids: Sequence[int], kill: bool) -> None:
    """Wait for forked workers; ``kill``: stop them first (SIGKILL: they hold nothing to clean up)."""
    for pid in pids:
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # already gone
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


#: Length of the marshal-ed (first job index, [results]) message that follows.
_FRAME = struct.Struct("<I")
_TOKEN = struct.Struct("<I")
#: Chunk numbers are written into the pipe whole, before any worker starts: they must fit.
_MAX_TOKENS = 8192


def _start(func: Callable[[Job], Result], jobs: Sequence[Job], total_bytes: int, workers: int) -> Optional[_Pool]:
    if not hasattr(os, "fork"):
        return None
    workers = min(workers, len(jobs))
    # Small chunks balance the load (the last one is what one worker may hash
    # alone while the others are done); at most _MAX_TOKENS of them.
    chunk = max(1, min(16, len(jobs) // (8 * workers)), -(-len(jobs) // _MAX_TOKENS))
    pool = _Pool()
    try:
        tokens_r, tokens_w = os.pipe()
    except OSError:
        return None
    try:
        os.write(tokens_w, b"".join(_TOKEN.pack(first) for first in range(0, len(jobs), chunk)))
        os.close(tokens_w)
        tokens_w = -1
        for _worker in range(workers):
            results_r, results_w = os.pipe()
            try:
                pid = os.fork()
            except OSError:
                os.close(results_r)
                os.close(results_w)
                break
            if pid == 0:
                _worker_main(func, jobs, chunk, tokens_r, results_w)
            os.close(results_w)
            pool.pids.append(pid)
            pool.pipes[results_r] = bytearray()
    except OSError:
        pool.stop()
        return None
    finally:
        if tokens_w >= 0:
            os.close(tokens_w)
        os.close(tokens_r)
    return pool if pool.pids else None


def _worker_main(func: Callable[[Job], Result], jobs: Sequence[Job], chunk: int, tokens: int, results: int) -> None:
    """A forked worker: take chunks until none is left, send their results; never returns."""
    code = 1
    try:
        while True:
            token = os.read(tokens, _TOKEN.size)
            if len(token) < _TOKEN.size:
                break
            (first,) = _TOKEN.unpack(token)
            values = []
            failed = False
            for job in jobs[first:first + chunk]:
                try:
                    values.append(func(job))
                except Exception:
                    failed = True  # the caller runs this job again and gets the error itself
                    break
            try:
                payload = marshal.dumps((first, values, failed))
            except ValueError:
                break  # a result marshal cannot send: the caller computes the rest
            write_all(results, _FRAME.pack(len(payload)) + payload)
            if failed:
                break
        code = 0
    finally:
        os._exit(code)


def _results(func: Callable[[Job], Result], jobs: Sequence[Job], pool: Optional[_Pool]) -> Iterator[Result]:
    try:
        for index, job in enumerate(jobs):
            if pool is not None:
                # A job that failed in a worker is run here at once: its error
                # is raised without waiting for the other workers.
                while index not in pool.results and index not in pool.failed and pool.pump():
                    pass
                if index in pool.results:
                    yield pool.results.pop(index)
                    continue
            # No pool, a worker that died or failed on this job: computed here.
            yield func(job)
    finally:
        if pool is not None:
            pool.stop()


__all__ = ["PROCESS_MIN_BYTES", "cpu_count", "hash_map", "pays_off", "reap"]
