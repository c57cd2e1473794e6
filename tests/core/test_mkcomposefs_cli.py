"""Our mkcomposefs CLI against the C one: stdout, exit codes, refusals, images."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

DUMP = b"/ 0 40755 2 0 0 0 1000.0 - - -\n/f 5 100644 1 0 0 0 1000.0 - hello -\n"


def run(argv, *args, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(list(argv) + [str(a) for a in args], **kw)


@pytest.fixture
def src_dir(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(b"B" * 10000)
    (src / "small").write_bytes(b"small")
    (src / "d" / "other").write_bytes(b"O" * 70)
    os.link(src / "d" / "big", src / "hardlink")
    os.symlink("d/big", src / "link")
    return src


@pytest.mark.oracle
@pytest.mark.parametrize("args", [
    [],
    ["--version", "SRC", "OUT"],
    ["-C", "SRC", "OUT"],
    ["--bogus", "SRC", "OUT"],
    ["--min-version=x", "SRC", "OUT"],
    ["--max-version=", "SRC", "OUT"],
    ["--threads=0", "SRC", "OUT"],
    ["--threads=-3", "SRC", "OUT"],
    ["--threads=2x", "SRC", "OUT"],
    ["SRC"],
    ["SRC", "OUT", "EXTRA"],
    ["--print-digest-only", "SRC", "OUT"],
    ["", "OUT"],
    ["--digest-store"],
    ["--from-file", "MISSING", "OUT"],
    ["MISSING", "OUT"],
    ["--skip-xattrs", "--user-xattrs", "SRC", "OUT"],
    ["--min-version=2", "SRC", "OUT"],
])
def test_refusals_match_c(oracle, ours, tmp_path, src_dir, args):
    def expand(which):
        out = []
        for a in args:
            a = a.replace("SRC", str(src_dir)).replace("MISSING", str(tmp_path / "missing"))
            out.append(a.replace("OUT", str(tmp_path / ("%s.img" % which))))
        return out

    c = run(oracle.argv("mkcomposefs"), *expand("c"))
    mine = run(ours.argv("mkcomposefs"), *expand("ours"))
    assert (c.returncode != 0) == (mine.returncode != 0), (c.stderr, mine.stderr)
    assert mine.returncode == c.returncode, (c.stderr, mine.stderr)
    assert mine.stdout == c.stdout
    assert mine.stderr, "a refusal must say why"
    if c.returncode != 0:
        # Ours never leaves a partial image behind.
        assert not (tmp_path / "ours.img").exists()


@pytest.mark.oracle
@pytest.mark.parametrize("flags", [
    [], ["--use-epoch"], ["--skip-xattrs"], ["--user-xattrs"], ["--skip-devices"],
    ["--min-version=1"], ["--max-version=0"], ["--threads=1"], ["--print-digest"],
])
def test_directory_images_and_stdout_match_c(oracle, ours, tmp_path, src_dir, flags):
    c = run(oracle.argv("mkcomposefs"), *flags, src_dir, tmp_path / "c.img")
    mine = run(ours.argv("mkcomposefs"), *flags, src_dir, tmp_path / "ours.img")
    assert c.returncode == 0 and mine.returncode == 0, mine.stderr
    assert mine.stdout == c.stdout
    assert (tmp_path / "ours.img").read_bytes() == (tmp_path / "c.img").read_bytes()


@pytest.mark.oracle
def test_print_digest_only_and_stdout_image(oracle, ours, tmp_path):
    dump = tmp_path / "in.dump"
    dump.write_bytes(DUMP)
    c = run(oracle.argv("mkcomposefs"), "--from-file", "--print-digest-only", dump)
    mine = run(ours.argv("mkcomposefs"), "--from-file", "--print-digest-only", dump)
    assert c.returncode == mine.returncode == 0
    assert mine.stdout == c.stdout and len(mine.stdout) == 65
    c_img = run(oracle.argv("mkcomposefs"), "--from-file", dump, "-").stdout
    our_img = run(ours.argv("mkcomposefs"), "--from-file", dump, "-").stdout
    assert our_img == c_img and len(c_img) % 4096 == 0


@pytest.mark.oracle
def test_dump_from_stdin(oracle, ours, tmp_path):
    c = run(oracle.argv("mkcomposefs"), "--from-file", "--print-digest", "-", tmp_path / "c.img",
            input=DUMP, stdin=None)
    mine = run(ours.argv("mkcomposefs"), "--from-file", "--print-digest", "-", tmp_path / "o.img",
               input=DUMP, stdin=None)
    assert c.returncode == mine.returncode == 0, mine.stderr
    assert mine.stdout == c.stdout
    assert (tmp_path / "o.img").read_bytes() == (tmp_path / "c.img").read_bytes()


@pytest.mark.oracle
def test_digest_store_matches_c(oracle, ours, tmp_path, src_dir):
    c_store, our_store = tmp_path / "c-store", tmp_path / "our-store"
    assert run(oracle.argv("mkcomposefs"), "--digest-store=%s" % c_store, src_dir,
               tmp_path / "c.img").returncode == 0
    mine = run(ours.argv("mkcomposefs"), "--digest-store", our_store, "--threads=3", src_dir,
               tmp_path / "o.img")
    assert mine.returncode == 0, mine.stderr

    def listing(store):
        return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in store.rglob("*") if p.is_file()}

    assert listing(our_store) == listing(c_store)
    assert len(listing(our_store)) == 2  # big (shared by the hard link) and other
    assert (tmp_path / "o.img").read_bytes() == (tmp_path / "c.img").read_bytes()


def test_hardlinks_extension_keeps_links(ours, tmp_path, src_dir):
    from composefs_fleet.erofs_reader import read_image_file

    out = tmp_path / "h.img"
    res = run(ours.argv("mkcomposefs"), "--hardlinks", src_dir, out)
    assert res.returncode == 0, res.stderr
    root = read_image_file(str(out))
    big = root.children[b"d"].children[b"big"]
    link = root.children[b"hardlink"]
    assert (link.link_to is big) or (big.link_to is link) or (big.resolve() is link.resolve())
    assert big.resolve().nlink == 2
    plain = tmp_path / "p.img"
    assert run(ours.argv("mkcomposefs"), src_dir, plain).returncode == 0
    root = read_image_file(str(plain))
    assert root.children[b"hardlink"].link_to is None
    assert root.children[b"hardlink"].nlink == 1


def test_from_file_applies_source_options(ours, tmp_path):
    dump = tmp_path / "in.dump"
    dump.write_bytes(b"/ 0 40755 2 0 0 0 1000.0 - - - user.a=1 trusted.b=2\n"
                     b"/dev 0 20644 1 0 0 259 5.0 - - -\n")
    plain = run(ours.argv("mkcomposefs"), "--from-file", "--print-digest-only", dump).stdout
    filtered = run(ours.argv("mkcomposefs"), "--from-file", "--print-digest-only", "--use-epoch",
                   "--skip-devices", "--user-xattrs", dump).stdout
    expected_dump = tmp_path / "expected.dump"
    expected_dump.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - - user.a=1\n")
    expected = run(ours.argv("mkcomposefs"), "--from-file", "--print-digest-only", expected_dump).stdout
    assert filtered == expected != plain


def test_digest_store_with_from_file_says_it_is_ignored(ours, tmp_path):
    dump = tmp_path / "in.dump"
    dump.write_bytes(DUMP)
    res = run(ours.argv("mkcomposefs"), "--from-file", "--digest-store", tmp_path / "s", dump,
              tmp_path / "o.img")
    assert res.returncode == 0
    assert b"--digest-store is ignored" in res.stderr


def test_help_explains_and_succeeds(ours):
    res = run(ours.argv("mkcomposefs"), "--help")
    assert res.returncode == 0
    for word in (b"--digest-store", b"--from-file", b"--hardlinks", b"fs-verity", b"partial image"):
        assert word in res.stdout


def test_bad_dump_leaves_existing_image_untouched(ours, tmp_path):
    out = tmp_path / "o.img"
    out.write_bytes(b"previous image")
    dump = tmp_path / "bad.dump"
    dump.write_bytes(DUMP + b"/f 5 100644 1 0 0 0 1000.0 - again -\n")
    res = run(ours.argv("mkcomposefs"), "--from-file", dump, out)
    assert res.returncode == 1
    assert b"mkcomposefs:" in res.stderr
    assert out.read_bytes() == b"previous image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.dump", "o.img"]
