# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""A small getopt_long(3) work-alike.

The drop-in CLIs must accept exactly what the C tools accept (``--opt=value``
and ``--opt value``, unambiguous prefixes, options after operands, ``--``) and
fail the same way, which argparse does not do (different messages, exit 2).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple


class OptionError(Exception):
    """Bad command line.

    ``kind``: 'unknown' (long option), 'invalid' (short option), 'ambiguous',
    'missing' (no value) or 'unexpected' (a value for a flag).
    """

    def __init__(self, kind: str, option: str) -> None:
        super().__init__("%s option %s" % (kind, option))
        self.kind = kind
        self.option = option


def parse(argv: Sequence[str], longopts: Dict[str, bool]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """Split *argv* into ([(name, value)], operands).

    *longopts* maps option names (without ``--``) to whether they take a value.
    Like glibc, options and operands may be mixed, a unique prefix selects an
    option, and everything after ``--`` is an operand.
    """
    options: List[Tuple[str, str]] = []
    operands: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            operands.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        if not arg.startswith("--"):
            raise OptionError("invalid", arg)
        name, has_value, value = arg[2:].partition("=")
        if name in longopts:
            match = name
        else:
            candidates = [opt for opt in longopts if opt.startswith(name)]
            if not name or not candidates:
                raise OptionError("unknown", arg)
            if len(candidates) > 1:
                raise OptionError("ambiguous", arg)
            match = candidates[0]
        if longopts[match]:
            if not has_value:
                if i >= len(argv):
                    raise OptionError("missing", "--" + match)
                value = argv[i]
                i += 1
        elif has_value:
            raise OptionError("unexpected", "--" + match)
        options.append((match, value))
    return options, operands


def parse_long(text: str) -> int:
    """strtol(text, &end, 10) accepting the whole string, as the C tools check it."""
    stripped = text.lstrip(" \t\n\r\v\f")
    if not text or not stripped:
        raise ValueError(text)
    sign = 1
    if stripped[0] in "+-":
        sign = -1 if stripped[0] == "-" else 1
        stripped = stripped[1:]
    if not stripped or not stripped.isdigit() or not stripped.isascii():
        raise ValueError(text)
    return sign * int(stripped)
