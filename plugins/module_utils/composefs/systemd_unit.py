# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""systemd ``.mount`` units for composefs mounts (so they come back at boot).

The unit file name must be the escaped mount point (systemd refuses a mount
unit whose name does not match ``Where=``); :func:`path_escape` does what
``systemd-escape --path`` does.  Values are written so that systemd reads
them back unchanged (``%`` doubled for specifier expansion), and anything a
unit file or libmount's option parser cannot carry is refused with a clear
message instead of being written as a different mount.

The systemctl helpers at the end are shared by the mount module (which runs
commands through Ansible's ``run_command``) and the agent (subprocess).
"""

from __future__ import annotations

import os
import posixpath
# typing costs start-up time, and every mount.composefs names its history file through
# path_escape(): imported for type checkers only (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

    PathArg = Union[str, bytes, "os.PathLike[str]"]
    # argv -> (exit status, stdout, stderr); Ansible's module.run_command fits.
    Runner = Callable[[List[str]], Tuple[int, str, str]]

from .atomic_file import write_atomic
from .errors import ComposefsError

UNIT_NAME_MAX = 255
SYSTEMD_UNIT_DIR = "/etc/systemd/system"
SYSTEMCTL_TIMEOUT = 120
_VALID = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:_.")


class UnitError(ComposefsError):
    """The mount cannot be described by a systemd unit as asked."""


class SystemctlError(ComposefsError):
    """systemctl failed; the message carries its exit status and output."""


def _bytes(path: PathArg) -> bytes:
    return os.fsencode(os.fspath(path))


def _simplify(path: bytes) -> bytes:
    """Collapse ``//`` and ``/./``, drop a trailing slash (systemd path_simplify)."""
    absolute = path.startswith(b"/")
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    return (b"/" if absolute else b"") + b"/".join(parts)


def path_escape(path: PathArg) -> str:
    """The unit name stem of ``path``, as ``systemd-escape --path`` prints it."""
    raw = _simplify(_bytes(path))
    if not raw:
        raise UnitError("cannot escape an empty path")
    if b".." in raw.split(b"/"):
        raise UnitError("path %r is not normalized (contains ..)" % os.fsdecode(raw))
    stem = raw.strip(b"/")
    if not stem:
        return "-"
    out: List[str] = []
    for i, c in enumerate(stem):
        if c == 0x2F:
            out.append("-")
        elif c in _VALID and not (i == 0 and c == 0x2E):
            out.append(chr(c))
        else:
            out.append("\\x%02x" % c)
    return "".join(out)


def unit_name(where: PathArg) -> str:
    name = path_escape(where) + ".mount"
    if len(name) > UNIT_NAME_MAX:
        raise UnitError("unit name for %s would be %d characters, systemd allows %d"
                        % (os.fsdecode(_bytes(where)), len(name), UNIT_NAME_MAX))
    return name


def _value(text: str, what: str) -> str:
    """A unit-file value that systemd reads back as ``text``."""
    if "\n" in text or "\r" in text:
        raise UnitError("%s %r contains a newline, which a unit file cannot carry" % (what, text))
    if text != text.strip(" \t"):
        raise UnitError("%s %r starts or ends with whitespace, which systemd strips" % (what, text))
    if text.endswith("\\"):
        raise UnitError("%s %r ends with a backslash (a line continuation in a unit file)" % (what, text))
    return text.replace("%", "%%")


def _quoted(path: str) -> str:
    """One word of a space-separated list (systemd unquotes and unescapes it)."""
    return '"%s"' % path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def unit_text(image: PathArg, where: PathArg, options: str, description: Optional[str] = None,
              requires_mounts_for: Iterable[PathArg] = (), wanted_by: str = "local-fs.target") -> str:
    """The text of the ``.mount`` unit mounting ``image`` at ``where``.

    ``options`` is the ``-o`` string as mount.composefs takes it; libmount
    splits it on commas before our helper sees it, so no value may hold one.
    """
    image_s = os.fsdecode(_bytes(image))
    where_b = _simplify(_bytes(where))
    where_s = os.fsdecode(where_b)
    if not image_s.startswith("/"):
        raise UnitError("What= must be an absolute path, got %r" % image_s)
    if not where_s.startswith("/"):
        raise UnitError("Where= must be an absolute path, got %r" % where_s)
    unit_name(where_b)  # validates the mount point
    if '"' in options:
        raise UnitError("mount options %r contain a double quote, which libmount treats as quoting" % options)
    if "\\," in options:
        raise UnitError("mount options %r contain an escaped comma: mount(8) splits options on every comma "
                        "before the helper sees them, so such a path cannot be named in a unit" % options)
    desc = description or "composefs image %s" % image_s
    lines = [
        "# Written by mount.composefs (composefs-fleet); mounts a composefs image at boot.",
        "[Unit]",
        "Description=" + _value(desc, "Description"),
    ]
    extra = [os.fsdecode(_bytes(p)) for p in requires_mounts_for]
    needs = [posixpath.dirname(image_s) or "/"] + [p for p in extra if p.startswith("/")]
    seen: List[str] = []
    for p in needs:
        if p not in seen and "\n" not in p:
            seen.append(p)
    lines.append("RequiresMountsFor=" + " ".join(_quoted(p) for p in seen))
    lines += [
        "",
        "[Mount]",
        "What=" + _value(image_s, "What="),
        "Where=" + _value(where_s, "Where="),
        "Type=composefs",
        "Options=" + _value(options, "Options="),
        "",
        "[Install]",
        "WantedBy=" + wanted_by,
        "",
    ]
    return "\n".join(lines)


def write_unit(directory: PathArg, image: PathArg, where: PathArg, options: str,
               description: Optional[str] = None, requires_mounts_for: Sequence[PathArg] = (),
               wanted_by: str = "local-fs.target") -> str:
    """Write the unit into ``directory`` atomically; return its path."""
    text = unit_text(image, where, options, description, requires_mounts_for, wanted_by)
    path = os.path.join(os.fsdecode(_bytes(directory)), unit_name(where))
    write_atomic(path, text.encode("utf-8", "surrogateescape"), mode=0o644)
    return path


# -- systemctl -------------------------------------------------------------------

def systemd_running() -> bool:
    """Is systemd PID 1 here (sd_booted)?"""
    return os.path.isdir("/run/systemd/system")


def _subprocess_run(argv: List[str]) -> Tuple[int, str, str]:
    import subprocess

    res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=SYSTEMCTL_TIMEOUT, check=False)
    return res.returncode, res.stdout, res.stderr


def systemctl_output(args: Sequence[str], run: Optional[Runner] = None, binary: str = "systemctl") -> Tuple[int, str, str]:
    """Run ``systemctl ARGS``; (exit status, stdout, stderr), never raises for a failure."""
    return (run or _subprocess_run)([binary] + list(args))


def systemctl(args: Sequence[str], run: Optional[Runner] = None, binary: str = "systemctl") -> str:
    """Run ``systemctl ARGS``; its stdout, or :class:`SystemctlError`."""
    rc, out, err = systemctl_output(args, run, binary)
    if rc != 0:
        raise SystemctlError("systemctl %s failed (rc %d): %s" % (" ".join(args), rc, (err or out).strip()))
    return out


def unit_loaded(unit: str, run: Optional[Runner] = None, binary: str = "systemctl") -> bool:
    """Does systemd know ``unit`` (a unit file it has read)?"""
    rc, out, _err = systemctl_output(["show", "--property=LoadState", "--value", "--", unit], run, binary)
    return rc == 0 and out.strip() == "loaded"


def daemon_reload(run: Optional[Runner] = None, binary: str = "systemctl") -> None:
    systemctl(["daemon-reload"], run, binary)


def enable_unit(unit: str, run: Optional[Runner] = None, binary: str = "systemctl") -> None:
    systemctl(["enable", "--", unit], run, binary)


def disable_unit(unit: str, run: Optional[Runner] = None, binary: str = "systemctl") -> None:
    systemctl(["disable", "--", unit], run, binary)


def start_unit(unit: str, run: Optional[Runner] = None, binary: str = "systemctl") -> None:
    systemctl(["start", "--", unit], run, binary)


def manages_unit_dir(unit_dir: PathArg) -> bool:
    """Should units in ``unit_dir`` be enabled through systemctl (else by a wants link)?"""
    return systemd_running() and os.path.realpath(os.fsdecode(_bytes(unit_dir))) == SYSTEMD_UNIT_DIR
