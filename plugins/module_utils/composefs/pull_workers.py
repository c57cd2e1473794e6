# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""A pull's transfers spread over one process per CPU.

Verifying a download is Python code (the fs-verity Merkle tree is hashed
4 KiB at a time), and so is each request; one process runs Python on one
CPU at a time.  On a fast link a pull is CPU-bound, so the missing objects
are split between forked processes, each running its share of the
transfers in threads (:func:`.pull.fetch_in_threads`), staging verified
objects in the store's ``objects/`` as the single-process pull does.

The parent owns the batch: a child reports each object it has staged and
verified (temp name, digest, device) over a pipe, the parent adopts it
(:meth:`.objects.ObjectBatch.adopt`) and publishes on its usual schedule,
so only the parent renames, and the ref is still written last, by the
parent.  A child never publishes, never returns into the caller's code
(it leaves with ``os._exit``), and on SIGTERM from the parent stops its
transfers (their temp files removed) and reports what it had staged.
Errors travel as JSON (type, URL, message, errno) and are raised again in
the parent.

Lines on a child's pipe::

    S <digest hex> <temp name hex> <st_dev>    staged and verified
    P <bytes> <objects>                         progress since the last line
    E <json>                                    the error that stopped it
"""

from __future__ import annotations

import json
import os
import selectors
import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import ComposefsError, RemoteError, RemoteNotFound, StoreError
from .objects import ObjectBatch, write_all

Missing = List[Tuple[str, int, bool]]


class _Child:
    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd
        self.buffer = b""
        self.reported_error = False


def fetch_in_processes(batch: ObjectBatch, transport: Any, missing: Missing, jobs: int, processes: int,
                       counter: Any, tick: Callable[[], None]) -> Tuple[List[Tuple[str, int]], Optional[BaseException]]:
    """:func:`.pull.fetch_in_threads` over ``processes`` forked processes; same result."""
    sizes = {hexd: size for hexd, size, _damaged in missing}
    # Largest first, dealt round-robin: each process gets a like share of bytes.
    processes = max(1, min(processes, len(missing)))
    shares = [missing[i::processes] for i in range(processes)]
    threads = [jobs // processes + (1 if i < jobs % processes else 0) for i in range(processes)]
    batch.dir.fd  # opened before the fork: every child stages into the same directory
    children: List[_Child] = []
    fetched: List[Tuple[str, int]] = []
    error: Optional[BaseException] = None
    try:
        for share, count in zip(shares, threads):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child's coverage is not collected)
                os.close(read_fd)
                _child(batch, transport, share, max(1, count), write_fd)
            os.close(write_fd)
            children.append(_Child(pid, read_fd))
    except BaseException as exc:
        error = exc
    stopping = error is not None
    if stopping:
        _stop(children)
    selector = selectors.DefaultSelector()
    for child in children:
        selector.register(child.fd, selectors.EVENT_READ, child)
    try:
        while selector.get_map():
            try:
                for key, _events in selector.select(timeout=0.25):
                    child = key.data
                    data = os.read(child.fd, 65536)
                    if not data:
                        selector.unregister(child.fd)
                        continue
                    child.buffer += data
                    *lines, child.buffer = child.buffer.split(b"\n")
                    for line in lines:
                        found = _take_line(line, child, batch, counter, sizes, fetched)
                        if found is not None and error is None:
                            error = found
                if error is not None and not stopping:
                    stopping = True
                    _stop(children)
                if not stopping:
                    tick()
            except BaseException as exc:  # an interrupt, a failed commit: stop the children, keep draining
                if error is None:
                    error = exc
                if not stopping:
                    stopping = True
                    _stop(children)
    finally:
        selector.close()
        for child in children:
            os.close(child.fd)
            status = _reap(child.pid)
            if error is None and status != 0 and not child.reported_error:
                error = StoreError("a transfer process of the pull from %s ended with %s"
                                   % (transport.url, _status_text(status)))
    return fetched, error


def _take_line(line: bytes, child: _Child, batch: ObjectBatch, counter: Any, sizes: Dict[str, int],
               fetched: List[Tuple[str, int]]) -> Optional[BaseException]:
    kind, _sep, rest = line.partition(b" ")
    if kind == b"S":
        hexd, tmp, dev = rest.split(b" ")
        name = hexd.decode("ascii")
        batch.adopt(bytes.fromhex(tmp.decode("ascii")), bytes.fromhex(name), int(dev))
        fetched.append((name, sizes[name]))
    elif kind == b"P":
        nbytes, objects = rest.split(b" ")
        counter.add(int(nbytes), int(objects))
    elif kind == b"E":
        child.reported_error = True
        return _error_from(json.loads(rest.decode("utf-8")))
    return None


def _stop(children: List[_Child]) -> None:
    for child in children:
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _reap(pid: int) -> int:
    while True:
        try:
            _pid, status = os.waitpid(pid, 0)
            return status
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.WEXITSTATUS(status)


# ---- the child

def _child(batch: ObjectBatch, transport: Any, share: Missing, threads: int, out: int) -> None:
    """Run in a forked process: fetch ``share``, report, leave with ``os._exit`` (never returns)."""
    from .pull import TransferCounter, fetch_in_threads  # the parent has imported it: no cycle at load time

    code = 1
    try:
        # ^C reaches the whole process group: the parent decides, and says so with SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        counter = TransferCounter(len(share), sum(item[1] for item in share), None)
        signal.signal(signal.SIGTERM, lambda _signum, _frame: counter.stop.set())
        transport.after_fork()
        sent = {"bytes": 0, "objects": 0}

        def report() -> None:
            lines = ["S %s %s %d\n" % (digest.hex(), tmp.hex(), dev) for tmp, digest, dev in batch.take_pending()]
            nbytes, objects = counter.bytes_done - sent["bytes"], counter.objects_done - sent["objects"]
            if nbytes or objects:
                lines.append("P %d %d\n" % (nbytes, objects))
                sent["bytes"] += nbytes
                sent["objects"] += objects
            write_all(out, "".join(lines).encode("ascii"))

        _fetched, error = fetch_in_threads(batch, transport, share, threads, counter, report)
        report()
        if error is None and counter.objects_done < len(share):
            error = KeyboardInterrupt()  # stopped by a signal before its share was done
        if error is not None:
            write_all(out, b"E " + json.dumps(_error_to(error)).encode("utf-8") + b"\n")
        code = 0
    except BaseException as exc:
        try:
            write_all(out, b"E " + json.dumps(_error_to(exc)).encode("utf-8") + b"\n")
            code = 0
        except BaseException:
            pass
    finally:
        os._exit(code)


def _error_to(exc: BaseException) -> Dict[str, Any]:
    if isinstance(exc, RemoteError):
        kind = "not-found" if isinstance(exc, RemoteNotFound) else "remote"
        return {"type": kind, "url": exc.url, "message": str(exc)}
    if isinstance(exc, OSError):
        return {"type": "os", "errno": exc.errno or 0, "message": exc.strerror or str(exc)}
    if isinstance(exc, KeyboardInterrupt):
        return {"type": "interrupt", "message": "interrupted"}
    kind = "store" if isinstance(exc, ComposefsError) else "other"
    return {"type": kind, "message": str(exc) or type(exc).__name__}


def _error_from(doc: Dict[str, Any]) -> BaseException:
    kind = doc.get("type")
    message = str(doc.get("message", "?"))
    if kind in ("remote", "not-found"):
        cls = RemoteNotFound if kind == "not-found" else RemoteError
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)  # the message already starts with the URL
        exc.url = str(doc.get("url", ""))
        return exc
    if kind == "os":
        return OSError(int(doc.get("errno", 0)), message)
    if kind == "interrupt":
        return KeyboardInterrupt()
    return StoreError(message)


__all__ = ["fetch_in_processes"]
