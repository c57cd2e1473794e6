# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Enable fs-verity on files and trees, checking digests first.

Two steps, so that callers can show a plan (check mode) and so that a bad
input enables nothing: :func:`plan` finds the regular files (symlinks inside
trees are never followed; a path named directly may be a symlink), asks the
kernel about each one (``FS_IOC_MEASURE_VERITY``: a digest if verity is on,
ENODATA if the filesystem has fs-verity but the file lacks it, ENOTTY or
EOPNOTSUPP if the filesystem has none), computes the digest of the others in
userspace and checks an expected digest.  :func:`enable` then enables
fs-verity on the planned files and compares what the kernel measures with
the digest computed before: a file that changed in between is reported.

Digests are fs-verity sha256 digests with 4096-byte blocks and no salt (what
composefs and ``fsverity digest`` use) -- except for files that already have
fs-verity, whose digest is the one the kernel reports for them.
"""

from __future__ import annotations

import os
import stat
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

from . import fsverity_digest, fsverity_ioctl
from .errors import VerityError, VerityMismatch, VerityNotSupported

PathLike = Union[str, "os.PathLike[str]"]

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class VerityFile:
    """One regular file: what it is, and (after :func:`enable`) what became of it."""

    def __init__(self, name: str, dev: int, ino: int, top_level: bool) -> None:
        self.name = name
        self.dev = dev
        self.ino = ino
        self.top_level = top_level  # named directly: may be reached through a symlink
        self.digest = ""
        self.algorithm = "sha256"
        self.verity_before = False
        self.verity_after = False
        self.supported = True
        self.problem: Optional[str] = None

    @property
    def needs_enabling(self) -> bool:
        return self.supported and not self.verity_before

    def as_dict(self) -> Dict[str, object]:
        return {
            "file": self.name,
            "digest": self.digest,
            "verity_before": self.verity_before,
            "verity_after": self.verity_after,
            "verity_supported": self.supported,
        }


class VerityPlan:
    def __init__(self) -> None:
        self.files: List[VerityFile] = []

    @property
    def unsupported(self) -> List[VerityFile]:
        return [f for f in self.files if not f.supported]

    @property
    def to_enable(self) -> List[VerityFile]:
        return [f for f in self.files if f.needs_enabling]

    @property
    def verity_supported(self) -> bool:
        return all(f.supported for f in self.files)

    @property
    def verity_problem(self) -> Optional[str]:
        for f in self.files:
            if not f.supported:
                return "%s: %s" % (f.name, f.problem)
        return None


def normalize_digest(text: str) -> str:
    """64 lowercase hex digits from ``text`` (an optional ``sha256:`` prefix,
    as ``fsverity measure`` prints it, is accepted); VerityError otherwise."""
    from .store_names import parse_digest

    digest = parse_digest(text)
    if digest is None:
        raise VerityError("expected_digest %r is not a sha256 fs-verity digest (64 hex digits)" % text)
    return digest


def find_files(paths: Sequence[PathLike], recurse: bool) -> List[VerityFile]:
    """Regular files named by ``paths`` (directories only with ``recurse``).

    Each file once (hard links and repeats are the same file); entries that
    are neither regular files nor directories inside a tree are skipped,
    named directly they are an error.
    """
    found: List[VerityFile] = []
    seen: Set[Tuple[int, int]] = set()

    def add(name: str, st: os.stat_result, top_level: bool) -> None:
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            found.append(VerityFile(name, st.st_dev, st.st_ino, top_level))

    for path in paths:
        name = os.fspath(path)
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise VerityError("%s does not exist%s" % (
                name, " (a dangling symbolic link)" if os.path.islink(name) else "")) from None
        except OSError as exc:
            raise VerityError("cannot examine %s: %s" % (name, exc.strerror or exc)) from None
        if stat.S_ISREG(st.st_mode):
            add(name, st, True)
        elif stat.S_ISDIR(st.st_mode):
            if not recurse:
                raise VerityError("%s is a directory: set recurse to enable fs-verity on the files in it" % name)
            for sub, sub_st in _walk(name):
                add(sub, sub_st, False)
        else:
            raise VerityError("%s is not a regular file or directory" % name)
    return found


def _walk(top: str) -> List[Tuple[str, os.stat_result]]:
    """Regular files under ``top`` in sorted pre-order ("a/z" before "b"),
    never following symlinks."""
    out: List[Tuple[str, os.stat_result]] = []
    pending: List[List[Tuple[str, Optional[os.stat_result]]]] = [[(top, None)]]
    while pending:
        level = pending[-1]
        if not level:
            pending.pop()
            continue
        path, st = level.pop()
        if st is not None:
            out.append((path, st))
            continue
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise VerityError("cannot list %s: %s" % (path, exc.strerror or exc)) from None
        children: List[Tuple[str, Optional[os.stat_result]]] = []
        for entry in entries:
            try:
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise VerityError("cannot examine %s: %s" % (entry.path, exc.strerror or exc)) from None
            if stat.S_ISREG(est.st_mode):
                children.append((entry.path, est))
            elif stat.S_ISDIR(est.st_mode):
                children.append((entry.path, None))  # listed when its turn comes
        children.reverse()  # popped from the end
        pending.append(children)
    return out


def _open(vf: VerityFile) -> int:
    """Open the file found earlier, checking it is still the same regular file."""
    flags = _OPEN_FLAGS if vf.top_level else _OPEN_FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(vf.name, flags)
    except OSError as exc:
        raise VerityError("cannot open %s: %s" % (vf.name, exc.strerror or exc)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (vf.dev, vf.ino):
        os.close(fd)
        raise VerityError("%s was replaced while it was being examined" % vf.name)
    return fd


def examine(vf: VerityFile, threads: int = 1) -> None:
    """Fill in fs-verity state, support and digest of one file."""
    fd = _open(vf)
    try:
        try:
            found = fsverity_ioctl.measure_or_none(fd)
        except VerityError as exc:
            raise VerityError("%s: %s" % (vf.name, exc)) from None
        if found is not None:
            vf.verity_before = vf.verity_after = True
            vf.algorithm, measured = found
            vf.digest = measured.hex()
            return
        problem = fsverity_ioctl.unsupported_devs.get(vf.dev)
        if problem is not None:
            vf.supported = False
            vf.problem = problem
        vf.digest = fsverity_digest.digest_fd(fd, threads=threads).hex()
    except OSError as exc:
        raise VerityError("cannot read %s: %s" % (vf.name, exc.strerror or exc)) from None
    finally:
        os.close(fd)


def plan(paths: Sequence[PathLike], recurse: bool = False, expected_digest: Optional[str] = None,
         threads: int = 1) -> VerityPlan:
    """Find and examine the files; VerityError if ``expected_digest`` (which
    needs exactly one regular file) does not match.  Changes nothing."""
    expected = normalize_digest(expected_digest) if expected_digest is not None else None
    result = VerityPlan()
    result.files = find_files(paths, recurse)
    if expected is not None and len(result.files) != 1:
        raise VerityError("expected_digest needs exactly one regular file, the paths name %d"
                          % len(result.files))
    for vf in result.files:
        examine(vf, threads)
    if expected is not None:
        vf = result.files[0]
        if vf.algorithm != "sha256":
            raise VerityError("%s already has fs-verity with %s, expected_digest is a sha256 digest"
                              % (vf.name, vf.algorithm))
        if vf.digest != expected:
            raise VerityError("%s has fs-verity digest %s, expected %s: fs-verity not enabled"
                              % (vf.name, vf.digest, expected))
    return result


class EnableError(VerityError):
    """Enabling failed for one file; ``enabled`` lists the files enabled before it."""

    def __init__(self, message: str, enabled: List[VerityFile]) -> None:
        super().__init__(message)
        self.enabled = enabled


def enable(planned: VerityPlan, skip_unsupported: bool = False) -> List[VerityFile]:
    """Enable fs-verity on every planned file that lacks it; returns those enabled.

    Files on filesystems without fs-verity are skipped with
    ``skip_unsupported``, otherwise they raise (before anything is enabled
    if the plan already knew; a filesystem that refuses only at enable time,
    e.g. for the block size, raises :class:`EnableError`).
    """
    if planned.unsupported and not skip_unsupported:
        raise VerityNotSupported(planned.verity_problem or "fs-verity is not supported")
    done: List[VerityFile] = []
    for vf in planned.to_enable:
        try:
            fd = _open(vf)
        except VerityError as exc:
            raise EnableError(str(exc), done) from None
        try:
            problem = fsverity_ioctl.enable_then_check(fd, bytes.fromhex(vf.digest), vf.name)
        except VerityMismatch as exc:
            # Changed between examine and enable: fs-verity is on now, for the new content.
            vf.verity_after = True
            done.append(vf)
            raise EnableError("%s changed while fs-verity was being enabled: the kernel measured %s:%s, "
                              "the file had %s before; fs-verity is now on for the new content"
                              % (vf.name, exc.algorithm, exc.measured.hex(), vf.digest), done) from None
        except VerityError as exc:
            raise EnableError(str(exc), done) from None
        except OSError as exc:
            raise EnableError("%s: %s" % (vf.name, exc.strerror or exc), done) from None
        finally:
            os.close(fd)
        if problem is not None:
            if not skip_unsupported:
                raise EnableError("%s: %s" % (vf.name, problem), done)
            vf.supported = False
            vf.problem = problem
            continue
        vf.verity_after = True
        done.append(vf)
    return done


__all__ = ["EnableError", "VerityFile", "VerityPlan", "enable", "examine", "find_files", "normalize_digest",
           "plan"]
