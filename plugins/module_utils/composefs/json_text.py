# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Small JSON documents we read back (store meta, agent config, records, memos).

They may have been written by someone else: ``json.loads`` of deeply nested
input raises RecursionError, not ValueError, and a caller that only expects
ValueError dies with a traceback.  One loader turns every way such a file
can be wrong into one exception that names the file.

Every mount.composefs reads its mount point's history and writes a mount
record through here, and importing :mod:`json` costs a mount more CPU than
the mount itself: json imports :mod:`re` (with enum, functools, collections)
and compiles seven regular expressions at import, only for its pure-Python
fallbacks and the whitespace around a document.  So where CPython's own
accelerator ``_json`` is there, the parser and string escaper json itself
would call are called directly (the same C code, the same strictness);
anything unusual (an error, a type the small writer does not know, another
Python) goes to :mod:`json` itself, so results and messages stay json's.
"""

from __future__ import annotations

import os
# typing costs start-up time, and every mount.composefs reads its history through here:
# imported for type checkers only (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Union

from .errors import ComposefsError

#: Our files are tiny; a larger one is not ours (and is not read whole).
MAX_JSON_BYTES = 1 << 20

try:
    import _json as _c_json
except ImportError:  # not CPython: json's own code only
    _c_json = None  # type: ignore[assignment]

_JSON_SPACE = " \t\n\r"


class _ScanContext:
    """The settings json.loads hands to ``_json.make_scanner`` (those of a default JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


_scan_once = _c_json.make_scanner(_ScanContext()) if _c_json is not None else None  # type: ignore[attr-defined]


def json_loads(text: str) -> Any:
    """``json.loads(text)``, without importing json when the document is well formed."""
    if _scan_once is not None:
        start = len(text) - len(text.lstrip(_JSON_SPACE))
        try:
            value, end = _scan_once(text, start)
        except (StopIteration, ValueError):
            pass  # json.loads below raises json's own error, with its message
        else:
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return value
    import json

    return json.loads(text)


def json_dumps(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True)``: how we write our files.

    Plain data (dicts with str keys, lists, str, int, float, bool, None) is
    written here with json's own C string escaper; anything else by json."""
    if _c_json is not None:
        out: List[str] = []
        try:
            _write_value(value, "\n", out)
        except TypeError:
            pass
        else:
            return "".join(out)
    import json

    return json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True)


def _write_value(value: Any, newline: str, out: List[str]) -> None:
    # The layout of json.dumps(indent=1): one item per line, indented one space per level,
    # "key": value, "," ending every item but the last, empty containers as {} and [].
    if isinstance(value, str):
        out.append(_c_json.encode_basestring_ascii(value))  # type: ignore[union-attr]
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_float_text(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        if not all(isinstance(key, str) for key in value):
            raise TypeError("keys that are not str: json's own conversion")
        inner = newline + " "
        out.append("{")
        for i, key in enumerate(sorted(value)):
            out.append(("," if i else "") + inner + _c_json.encode_basestring_ascii(key) + ": ")  # type: ignore[union-attr]
            _write_value(value[key], inner, out)
        out.append(newline + "}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("[]")
            return
        inner = newline + " "
        out.append("[")
        for i, item in enumerate(value):
            out.append(("," if i else "") + inner)
            _write_value(item, inner, out)
        out.append(newline + "]")
    else:
        raise TypeError("not plain data: %s" % type(value).__name__)


def _float_text(value: float) -> str:
    # As json.encoder's floatstr (allow_nan): our files hold no floats today, hence the late import.
    import math

    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


class JsonFileError(ComposefsError):
    """A JSON file is unreadable as the object it should hold."""


def load_json_object(raw: Union[bytes, str], what: str) -> Dict[str, Any]:
    """The JSON object in ``raw``; JsonFileError naming ``what`` otherwise."""
    if len(raw) > MAX_JSON_BYTES:
        raise JsonFileError("%s is too large (%d bytes; at most %d)" % (what, len(raw), MAX_JSON_BYTES))
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json_loads(text)
    except UnicodeDecodeError:
        raise JsonFileError("%s is not UTF-8 text" % what) from None
    except ValueError as exc:
        raise JsonFileError("%s is not valid JSON: %s" % (what, exc)) from None
    except RecursionError:
        raise JsonFileError("%s is nested too deeply to be ours" % what) from None
    if not isinstance(value, dict):
        raise JsonFileError("%s must hold a JSON object, not %s" % (what, type(value).__name__))
    return value


def load_json_file_or_none(path: str, what: str) -> Optional[Dict[str, Any]]:
    """The JSON object in the regular file ``path``, or None when it is missing, not a regular file
    (a link is not followed, a FIFO not waited on), too large or not a JSON object: for files we
    wrote ourselves and only believe when they are intact (records, histories)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return load_json_object(os.read(fd, MAX_JSON_BYTES + 1), "%s %s" % (what, path))
    except (OSError, JsonFileError):
        return None
    finally:
        os.close(fd)


def json_files_in(directory: str, suffix: str = ".json") -> List[str]:
    """Paths of the ``*suffix`` files of ``directory``, sorted; dot files (temp files, locks) left out;
    none when it cannot be listed."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, name) for name in names if name.endswith(suffix) and not name.startswith(".")]


def is_int(value: Any) -> bool:
    """A JSON integer (``true`` is an int to Python, not to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["JsonFileError", "MAX_JSON_BYTES", "is_int", "json_dumps", "json_files_in", "json_loads", "load_json_file_or_none",
           "load_json_object"]
