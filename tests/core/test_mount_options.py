"""mount.composefs option strings and command line (no mounting here).

The option syntax follows tools/mountcomposefs.c of composefs 1.0.8: items
split on unescaped commas, a backslash escapes the next character, the first
``=`` separates key and value, ``basedir`` splits on ``:``.  Our additions:
``\\:`` keeps a colon inside a basedir, fstab/systemd userspace options are
accepted and ignored, VFS flags become mount attributes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from composefs_fleet import mount_api as api
from composefs_fleet.mount_options import (
    MountOptionError,
    escape,
    format_options,
    parse_options,
    split_basedirs,
    split_options,
    unescape,
)
from composefs_fleet_cli.mount_composefs import _Usage, parse_args


def test_split_like_c():
    assert split_options("basedir=/a,verity,digest=ab") == [("basedir", "/a"), ("verity", None), ("digest", "ab")]
    # First '=' splits; later ones belong to the value.
    assert split_options("upperdir=/x=y") == [("upperdir", "/x=y")]
    # Escaped comma stays inside the value (backslash kept until unescape).
    assert split_options("upperdir=/a\\,b,ro") == [("upperdir", "/a\\,b"), ("ro", None)]
    assert split_options("") == [("", None)]


def test_unescape_and_escape_round_trip():
    assert unescape("/a\\,b\\\\c") == "/a,b\\c"
    for s in ["plain", "a,b", "back\\slash", "x\\", "a:b", "sp ace", "new\nline"]:
        assert unescape(escape(s)) == s


def test_basedir_lists():
    assert split_basedirs("/a:/b:/c") == ["/a", "/b", "/c"]
    assert split_basedirs("/with\\:colon:/b") == ["/with:colon", "/b"]
    assert split_basedirs("/a\\,b") == ["/a,b"]
    for bad in ["/a::/b", ":/a", "/a:", ""]:
        with pytest.raises(MountOptionError, match="incorrect format"):
            split_basedirs(bad)


def test_full_option_set():
    opts = parse_options("basedir=/o1:/o2,digest=" + "ab" * 32 + ",verity,tryverity,idmap=/proc/1/ns/user,"
                         "upperdir=/u,workdir=/w,ro")
    assert opts.basedirs == ["/o1", "/o2"]
    assert opts.digest == "ab" * 32
    assert opts.verity and opts.tryverity and opts.readonly
    assert (opts.idmap, opts.upperdir, opts.workdir) == ("/proc/1/ns/user", "/u", "/w")


def test_ro_rw_last_wins():
    assert parse_options("basedir=/a,ro,rw").readonly is False
    assert parse_options("basedir=/a,rw,ro").readonly is True


@pytest.mark.parametrize("key", ["basedir", "digest", "idmap", "upperdir", "workdir"])
def test_value_required(key):
    with pytest.raises(MountOptionError, match="No value specified for %s option" % key):
        parse_options("%s,basedir=/a" % key)


def test_unknown_option_refused_unless_sloppy():
    with pytest.raises(MountOptionError, match="Unsupported option frobnicate"):
        parse_options("basedir=/a,frobnicate")
    with pytest.raises(MountOptionError, match="Unsupported option verity=yes"):
        parse_options("basedir=/a,verity=yes")
    opts = parse_options("basedir=/a,frobnicate,size=3", sloppy=True)
    assert opts.ignored == ["frobnicate", "size=3"]


def test_fstab_and_systemd_options_ignored():
    text = "defaults,auto,noauto,nofail,_netdev,user,nouser,users,owner,group,x-systemd.requires=/x,x-foo,comment=hi,basedir=/a"
    opts = parse_options(text)
    assert opts.basedirs == ["/a"]
    assert opts.ignored == ["defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users",
                            "owner", "group", "x-systemd.requires=/x", "x-foo", "comment=hi"]


def test_vfs_flags_become_attributes():
    opts = parse_options("basedir=/a,nosuid,nodev,noexec,noatime")
    assert opts.attr_set == api.MOUNT_ATTR_NOSUID | api.MOUNT_ATTR_NODEV | api.MOUNT_ATTR_NOEXEC | api.MOUNT_ATTR_NOATIME
    # The later opposite cancels.
    opts = parse_options("basedir=/a,nosuid,suid,noatime,strictatime")
    assert opts.attr_set == api.MOUNT_ATTR_STRICTATIME


paths = st.text(alphabet=st.sampled_from(list("ab/ ,:=\\\nx")), min_size=1, max_size=12)


@given(st.lists(paths, min_size=1, max_size=3), st.one_of(st.none(), paths), st.booleans())
def test_format_then_parse_gives_the_same_mount(basedirs, upper, ro):
    text = format_options(basedirs, upperdir=upper, workdir=upper, readonly=ro, verity=True)
    opts = parse_options(text)
    assert opts.basedirs == basedirs
    assert opts.upperdir == upper and opts.workdir == upper
    assert opts.readonly is ro and opts.verity


# -- command line ---------------------------------------------------------------

def test_c_style_command_line():
    opts, operands = parse_args(["-o", "basedir=/a", "img", "/mnt"])
    assert opts["o"] == "basedir=/a" and operands == ["img", "/mnt"]


def test_mount8_helper_command_line():
    # mount(8): mount.TYPE SOURCE TARGET [-sfnv] [-N ns] [-o opts] [-t type]
    opts, operands = parse_args(["/img", "/mnt", "-sfnv", "-N", "/proc/1/ns/mnt", "-o", "ro,basedir=/a",
                                 "-t", "composefs"])
    assert operands == ["/img", "/mnt"]
    assert opts["s"] and opts["f"] and opts["n"] and opts["v"]
    assert (opts["N"], opts["o"], opts["t"]) == ("/proc/1/ns/mnt", "ro,basedir=/a", "composefs")
    opts, _ = parse_args(["-obasedir=/x", "-tcomposefs", "a", "b"])
    assert (opts["o"], opts["t"]) == ("basedir=/x", "composefs")


def test_double_dash_and_long_options():
    opts, operands = parse_args(["--write-systemd-unit", "/etc/x", "--", "-img", "/mnt"])
    assert opts["write_unit"] == "/etc/x" and operands == ["-img", "/mnt"]
    opts, _ = parse_args(["--print-systemd-unit", "--write-systemd-unit=/d", "a", "b"])
    assert opts["print_unit"] and opts["write_unit"] == "/d"


@pytest.mark.parametrize("argv,message", [
    (["-x", "a", "b"], "invalid option -- 'x'"),
    (["a", "b", "-o"], "option requires an argument -- 'o'"),
    (["--bogus", "a", "b"], "unrecognized option '--bogus'"),
    (["--write-systemd-unit"], "option '--write-systemd-unit' requires an argument"),
])
def test_bad_command_lines(argv, message):
    with pytest.raises(_Usage, match=message):
        parse_args(argv)


@pytest.mark.parametrize("argv,code,message", [
    ([], 1, "No source path specified"),
    (["img"], 1, "No mount path specified"),
    (["-o", "ro", "img", "/mnt"], 1, "No object dirs specified"),
    (["-t", "ext4", "-o", "basedir=/a", "img", "/mnt"], 1, "Unsupported fs type 'ext4'"),
    (["-o", "basedir=/a,upperdir=/u", "img", "/mnt"], 1, "Both workdir and upperdir must be specified if used"),
    (["-o", "basedir=/a,bogus", "img", "/mnt"], 1, "Unsupported option bogus"),
    (["-o", "basedir=/a::/b", "img", "/mnt"], 1, "Value for basedir option has incorrect format"),
    (["-o", "basedir=/a", "img", "/mnt", "extra"], 1, "too many arguments: extra"),
    (["-q", "img", "/mnt"], 1, "invalid option -- 'q'"),
])
def test_cli_usage_errors(ours, argv, code, message):
    res = ours.run("mount.composefs", *argv)
    assert res.returncode == code
    assert message in res.stderr.decode()


def test_cli_help(ours):
    res = ours.run("mount.composefs", "--help")
    assert res.returncode == 0
    out = res.stdout.decode()
    for word in ("basedir=PATH[:PATH]", "digest=DIGEST", "idmap=PATH", "tryverity", "upperdir", "workdir",
                 "nofail", "--print-systemd-unit", "--write-systemd-unit=DIR", "-N NS"):
        assert word in out


@pytest.mark.oracle
@pytest.mark.parametrize("argv", [
    [],
    ["img"],
    ["-o", "ro", "img", "/mnt"],
    ["-o", "basedir=/a,bogus", "img", "/mnt"],
    ["-o", "basedir=/a,upperdir=/u", "img", "/mnt"],
    ["-t", "ext4", "img", "/mnt"],
    ["-o", "digest,basedir=/a", "img", "/mnt"],
])
def test_usage_errors_exit_like_c(oracle, ours, argv):
    c = oracle.run("mount.composefs", *argv)
    py = ours.run("mount.composefs", *argv)
    assert c.returncode == py.returncode == 1
    # The C message (without errx' program prefix) appears in ours.
    first = c.stderr.decode().splitlines()[0]
    first = first.split(": ", 1)[1] if first.startswith(("mount.composefs:", "ld-linux")) else first
    assert first.strip() in py.stderr.decode(), (c.stderr, py.stderr)
