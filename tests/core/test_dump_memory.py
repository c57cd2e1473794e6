"""Peak memory of ``mkcomposefs --from-file``: ours against the C tool's.

The parser streams its input, so memory follows what the input builds (the
tree), not the size of the file.  Figures are the peak resident set size of
each run (the peak_rss fixture), a measurement, not a timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MIB = 1024 * 1024
JUNK_BYTES = 30 * MIB
PAYLOAD = b"ab/cdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
DIGEST = b"abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"


def both(oracle, ours, peak_rss, tmp_path: Path, src: Path) -> "tuple[int, int]":
    """Peak RSS of C's and our mkcomposefs --from-file src (same exit status)."""
    c_rc, c_rss = peak_rss.run(oracle.argv("mkcomposefs") + ["--from-file", src, tmp_path / "c.img"], tmp_path)
    our_rc, our_rss = peak_rss.run(ours.argv("mkcomposefs") + ["--from-file", src, tmp_path / "our.img"], tmp_path)
    assert our_rc == c_rc
    return c_rss, our_rss


def valid_dump(entries: int) -> bytes:
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -\n"]
    for d in range(entries // 1000):
        lines.append(b"/dir%d 4096 40755 2 1000 1000 0 1695372970.944925700 - - - "
                     b"security.selinux=unconfined_u:object_r:unlabeled_t:s0\\x00\n" % d)
        for f in range(999):
            lines.append(b"/dir%d/file-%d 259 100644 1 1000 1000 0 1695368732.385062094 %s - %s "
                         b"security.selinux=unconfined_u:object_r:unlabeled_t:s0\\x00\n"
                         % (d, f, PAYLOAD, DIGEST))
    return b"".join(lines)


@pytest.mark.oracle
def test_junk_without_newlines_within_twice_c(oracle, ours, peak_rss, tmp_path):
    # C grows its line buffer to hold the whole file; we stop at LINE_MAX.
    src = tmp_path / "junk"
    src.write_bytes(b"x" * JUNK_BYTES)
    c_rss, our_rss = both(oracle, ours, peak_rss, tmp_path, src)
    assert our_rss <= 2 * c_rss, "ours %d MiB, C %d MiB" % (our_rss // MIB, c_rss // MIB)


@pytest.mark.oracle
def test_junk_lines_cost_what_a_tiny_input_costs(oracle, ours, peak_rss, tmp_path):
    # C stops at line 1 after a 64 KiB read (about 4 MiB in all, less than a
    # Python interpreter alone), so the ratio that can be compared is the
    # memory each tool spends on the input beyond a one-line input.
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"y\n")
    junk = tmp_path / "junk"
    junk.write_bytes(b"y\n" * (JUNK_BYTES // 2))
    c_base, our_base = both(oracle, ours, peak_rss, tmp_path, tiny)
    c_rss, our_rss = both(oracle, ours, peak_rss, tmp_path, junk)
    # The slack covers one read buffer and allocator rounding.
    assert our_rss - our_base <= 2 * max(c_rss - c_base, 0) + 2 * MIB, (
        "ours %d KiB over %d KiB, C %d KiB over %d KiB" % (our_rss // 1024, our_base // 1024,
                                                          c_rss // 1024, c_base // 1024))


@pytest.mark.oracle
def test_large_valid_dump_within_twice_c(oracle, ours, peak_rss, tmp_path):
    src = tmp_path / "valid.dump"
    src.write_bytes(valid_dump(50000))
    c_rss, our_rss = both(oracle, ours, peak_rss, tmp_path, src)
    assert (tmp_path / "our.img").read_bytes() == (tmp_path / "c.img").read_bytes()
    assert our_rss <= 2 * c_rss, "ours %d MiB, C %d MiB" % (our_rss // MIB, c_rss // MIB)
