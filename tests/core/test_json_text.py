"""json_text's JSON reading and writing without importing json: the results, bytes and errors of json itself.

mount.composefs reads a history and writes a record on every mount through
json_text.json_loads/json_dumps, which call CPython's ``_json`` directly so
that ``re`` is never imported; these tests hold them to json.loads/json.dumps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import composefs_fleet
from composefs_fleet import json_text
from composefs_fleet.json_text import JsonFileError, json_dumps, json_loads, load_json_object

needs_c_json = pytest.mark.skipif(json_text._c_json is None, reason="no _json accelerator (not CPython): json is used")

# Text with what escaping must get right: controls, quotes, backslashes, non-ASCII, astral and lone surrogates
# (undecodable path bytes after os.fsdecode).
_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=12)
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | _TEXT
_DATA = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                     max_leaves=25)


def _same(a, b) -> bool:
    # NaN != NaN: compare through json's own text of both.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@given(_DATA)
@settings(max_examples=300, deadline=None)
def test_dumps_writes_the_bytes_json_dumps_writes(value):
    assert json_dumps(value) == json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True)


@given(_DATA)
@settings(max_examples=300, deadline=None)
def test_loads_reads_what_json_loads_reads(value):
    for text in (json.dumps(value), json.dumps(value, indent=2), " \n\t%s\r\n " % json.dumps(value, ensure_ascii=False)):
        assert _same(json_loads(text), json.loads(text))


def test_dumps_of_what_the_small_writer_leaves_to_json():
    # Non-str keys (json turns them into strings), tuples, int and float subclasses, an unknown type.
    value = {"x": {1: "a", 2: (1, 2.5)}, "b": True, "c": [], "d": {}}
    assert json_dumps(value) == json.dumps(value, sort_keys=True, indent=1, ensure_ascii=True)
    assert json_dumps([True, 1.0, -0.0, 10 ** 30, float("inf")]) == json.dumps(
        [True, 1.0, -0.0, 10 ** 30, float("inf")], sort_keys=True, indent=1, ensure_ascii=True)
    with pytest.raises(TypeError, match="not JSON serializable"):
        json_dumps({"a": object()})


@pytest.mark.parametrize("text", ["", " ", "{", "{\"a\": 1,}", "[1] x", "{} {}", "\ufeff{}", "{\"a\": \"\x01\"}",
                                  "01", "nul", "{\"a\" 1}", "[1, 2", "\"\\ud800\\u\"", "{\"a\": NaN} ]"])
def test_bad_documents_fail_as_in_json(text):
    with pytest.raises(ValueError) as ours:
        json_loads(text)
    with pytest.raises(ValueError) as theirs:
        json.loads(text)
    assert str(ours.value) == str(theirs.value)


def test_constants_and_numbers_parse_as_in_json():
    value = json_loads("[NaN, Infinity, -Infinity, 1e400, -0.0, 12345678901234567890, 1.5]")
    assert math.isnan(value[0]) and value[1:4] == [math.inf, -math.inf, math.inf]
    assert value[4] == 0.0 and math.copysign(1, value[4]) < 0 and value[5] == 12345678901234567890 and value[6] == 1.5


def test_deep_nesting_is_still_a_named_error():
    with pytest.raises(JsonFileError, match="record x is nested too deeply"):
        load_json_object("[" * 100000 + "]" * 100000, "record x")
    with pytest.raises(JsonFileError, match=r"record x is not valid JSON: Expecting value: line 1 column 2 \(char 1\)"):
        load_json_object("[", "record x")


@needs_c_json
def test_a_mount_module_reads_and_writes_json_without_importing_re(tmp_path):
    # re (with enum, functools...) is most of json's import cost, which every mount.composefs would pay.
    code = ("import sys\n"
            "from composefs_fleet import mount, mount_history, mount_record\n"
            "from composefs_fleet.json_text import json_dumps, load_json_object\n"
            "assert load_json_object(json_dumps({'a': [1, 2.5, None, '\\udcff']}), 'x')['a'][3] == '\\udcff'\n"
            "print(sorted(m for m in ('re', 'json', 'typing', 'enum') if m in sys.modules))\n")
    # Without site, the venv's .pth does not run: the package comes in through a link, whatever way
    # this venv installed it (editable finder, links directory or PYTHONPATH).
    (tmp_path / "composefs_fleet").symlink_to(os.path.dirname(composefs_fleet.__file__))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
