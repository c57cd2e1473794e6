"""Clear messages from composefs-info and mkcomposefs for inputs that are
not what they should be: a text file or directory given as an image, a FIFO,
output into a closed pipe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

ROOT = b"/ 0 40755 2 0 0 0 0.0 - - -\n"
TEXT = b"hello world\nthis is text\n"


def big_dump(entries: int = 3000) -> bytes:
    # composefs-info prints more than a pipe holds (64 KiB) for this.
    return ROOT + b"".join(b"/file-with-a-longish-name-%06d 0 100644 1 0 0 0 0.0 - - -\n" % i
                           for i in range(entries))


def run(argv, *args, timeout=60, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(list(argv) + [str(a) for a in args], timeout=timeout, **kw)


def test_text_file_as_image_names_it(ours, tmp_path):
    for name, data in (("small.dump", ROOT), ("big.dump", big_dump())):
        path = tmp_path / name
        path.write_bytes(data)
        res = run(ours.argv("composefs-info"), "ls", path)
        assert res.returncode == 1
        assert res.stderr == (b"composefs-info: Failed to load '%s': not a composefs image: it starts like "
                              b"a composefs-dump text file (mkcomposefs --from-file makes an image of one)\n"
                              % bytes(path))


def test_mkcomposefs_names_the_dump_file(ours, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(TEXT)
    res = run(ours.argv("mkcomposefs"), "--from-file", text, tmp_path / "o.img")
    assert res.returncode == 1
    assert res.stderr == b"mkcomposefs: %s: line 1: Invalid integer  (MODE)\n" % bytes(text)
    res = run(ours.argv("mkcomposefs"), "--from-file", "-", tmp_path / "o.img", stdin=open(str(text), "rb"))
    assert res.stderr == b"mkcomposefs: standard input: line 1: Invalid integer  (MODE)\n"


@pytest.mark.oracle
def test_mkcomposefs_says_an_image_is_not_a_dump(oracle, ours, tmp_path):
    dump = tmp_path / "in.dump"
    dump.write_bytes(ROOT)
    image = tmp_path / "in.img"
    assert oracle.run("mkcomposefs", "--from-file", dump, image).returncode == 0
    res = run(ours.argv("mkcomposefs"), "--from-file", image, tmp_path / "o.img")
    assert res.returncode == 1
    assert res.stderr.startswith(b"mkcomposefs: %s: this is a composefs image, not a composefs-dump file (line 1: "
                                 % bytes(image)), res.stderr


def test_directory_as_image_says_so(ours, tmp_path):
    res = run(ours.argv("composefs-info"), "ls", tmp_path)
    assert (res.returncode, res.stdout) == (1, b"")
    assert res.stderr == b"composefs-info: Failed to load '%s': is a directory, not a composefs image\n" % bytes(tmp_path)


def test_fifo_and_device_as_image_do_not_block(ours, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    # Without a writer, opening the FIFO for reading would wait for ever.
    res = run(ours.argv("composefs-info"), "dump", fifo, timeout=30)
    assert res.returncode == 1
    assert res.stderr == (b"composefs-info: Failed to load '%s': not a regular file (a FIFO), "
                          b"so not a composefs image\n" % bytes(fifo))
    res = run(ours.argv("composefs-info"), "ls", "/dev/zero", timeout=30)
    assert res.returncode == 1
    assert b"not a regular file (a character device)" in res.stderr


def test_mkcomposefs_still_reads_a_dump_from_a_fifo(ours, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    text = big_dump()

    def feed():
        with open(str(fifo), "wb") as f:
            f.write(text)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        res = run(ours.argv("mkcomposefs"), "--from-file", fifo, tmp_path / "fifo.img", timeout=60)
    finally:
        writer.join(60)
    assert res.returncode == 0, res.stderr
    (tmp_path / "file.dump").write_bytes(text)
    assert run(ours.argv("mkcomposefs"), "--from-file", tmp_path / "file.dump", tmp_path / "file.img").returncode == 0
    assert (tmp_path / "fifo.img").read_bytes() == (tmp_path / "file.img").read_bytes()


def into_closed_pipe(argv):
    """Run with stdout a pipe whose reader is already gone: (status, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    return res.returncode, res.stderr


@pytest.mark.oracle
def test_closed_pipe_ends_quietly_like_c(oracle, ours, tmp_path):
    dump = tmp_path / "big.dump"
    dump.write_bytes(big_dump())
    image = tmp_path / "big.img"
    assert oracle.run("mkcomposefs", "--from-file", dump, image).returncode == 0
    for command in ("dump", "ls"):
        c = into_closed_pipe(oracle.argv("composefs-info") + [command, str(image)])
        assert c == (-signal.SIGPIPE, b"")
        assert into_closed_pipe(ours.argv("composefs-info") + [command, str(image)]) == c
    for args in (["--print-digest-only"], ["-"]):
        c = into_closed_pipe(oracle.argv("mkcomposefs") + ["--from-file", str(dump)] + args)
        assert c == (-signal.SIGPIPE, b"")
        assert into_closed_pipe(ours.argv("mkcomposefs") + ["--from-file", str(dump)] + args) == c


def test_store_add_of_a_text_file_names_it(tmp_path):
    store = tmp_path / "store"
    text = tmp_path / "notes.txt"
    text.write_bytes(TEXT)
    bad_dump = tmp_path / "bad.dump"
    bad_dump.write_bytes(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -\n/f 0 100644 1 0 0 0 0.0 - - -\n")
    cli = [sys.executable, "-m", "composefs_fleet_cli.composefs_store", "--repo", str(store)]
    assert run(cli, "init").returncode == 0
    res = run(cli, "add-image", "--ref", "x", text)
    assert res.returncode != 0 and b"Traceback" not in res.stderr
    assert res.stderr == (b"composefs-store: %s is neither a composefs image nor a composefs-dump file "
                          b"(line 1: Invalid integer  (MODE))\n" % bytes(text))
    res = run(cli, "add-image", "--ref", "x", bad_dump)
    assert res.stderr == (b"composefs-store: %s is not a valid dump (line 3: Can't add child: /f already exists)\n"
                          % bytes(bad_dump))


def _limit_memory():
    # Reading endless input whole must end in MemoryError, not exhaust the machine.
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_endless_dump_without_newlines_is_refused_early(ours, tmp_path):
    res = run(ours.argv("mkcomposefs"), "--from-file", "/dev/zero", tmp_path / "o.img", timeout=120,
              preexec_fn=_limit_memory)
    assert res.returncode == 1
    assert res.stderr == b"mkcomposefs: /dev/zero: line 1: Line too long: more than 1048576 bytes\n"
    assert not (tmp_path / "o.img").exists()
