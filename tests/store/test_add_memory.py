"""add-image of a dump file streams it: memory follows the tree, not the file.

Measured as peak resident memory (GNU time), not time.  Before issue 13 the
whole file was read first, so 30 MB of junk cost about 165 MB.
"""

from __future__ import annotations

from pathlib import Path

from store_fixtures import store, store_argv  # noqa: F401  (fixtures)

MIB = 1024 * 1024


def test_junk_dump_costs_what_a_one_line_one_costs(store, peak_rss, tmp_path: Path):  # noqa: F811
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"y\n")
    junk = tmp_path / "junk"
    junk.write_bytes(b"y\n" * (15 * MIB))
    argv = store_argv() + ["--repo", store.path, "add-image"]
    base_rc, base_rss = peak_rss.run(argv + [tiny, "--ref", "t"], tmp_path)
    junk_rc, junk_rss = peak_rss.run(argv + [junk, "--ref", "j"], tmp_path)
    assert base_rc == junk_rc == 1
    assert "neither a composefs image nor a composefs-dump file" in (tmp_path / "stderr").read_text()
    # One read buffer and allocator rounding; the file itself is 30 MiB.
    assert junk_rss - base_rss <= 4 * MIB, "junk %d KiB, one line %d KiB" % (junk_rss // 1024, base_rss // 1024)
