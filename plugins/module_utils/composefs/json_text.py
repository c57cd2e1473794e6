# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Small JSON documents we read back (store meta, agent config, records, memos).

They may have been written by someone else: ``json.loads`` of deeply nested
input raises RecursionError, not ValueError, and a caller that only expects
ValueError dies with a traceback.  One loader turns every way such a file
can be wrong into one exception that names the file.
"""

from __future__ import annotations

import json
import os
# typing costs start-up time, and every mount.composefs reads its history through here:
# imported for type checkers only (annotations are strings here).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Union

from .errors import ComposefsError

#: Our files are tiny; a larger one is not ours (and is not read whole).
MAX_JSON_BYTES = 1 << 20


class JsonFileError(ComposefsError):
    """A JSON file is unreadable as the object it should hold."""


def load_json_object(raw: Union[bytes, str], what: str) -> Dict[str, Any]:
    """The JSON object in ``raw``; JsonFileError naming ``what`` otherwise."""
    if len(raw) > MAX_JSON_BYTES:
        raise JsonFileError("%s is too large (%d bytes; at most %d)" % (what, len(raw), MAX_JSON_BYTES))
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text)
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


__all__ = ["JsonFileError", "MAX_JSON_BYTES", "is_int", "json_files_in", "load_json_file_or_none", "load_json_object"]
