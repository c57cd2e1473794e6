"""systemd .mount units for composefs mounts: names, text, refusals, verify."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from composefs_fleet.mount_options import parse_options
from composefs_fleet.systemd_unit import UnitError, path_escape, unit_name, unit_text, write_unit

ESCAPE_CASES = [
    ("/", "-"),
    ("/mnt/image", "mnt-image"),
    ("/mnt/my image", "mnt-my\\x20image"),
    ("/mnt/a-b", "mnt-a\\x2db"),
    ("/mnt/.hidden", "mnt-.hidden"),
    ("/.dot", "\\x2edot"),
    ("//mnt//x/", "mnt-x"),
    ("/mnt/./x", "mnt-x"),
    ("/mnt/ä", "mnt-\\xc3\\xa4"),
    ("/a,b:c=d\\e", "a\\x2cb:c\\x3dd\\x5ce"),
    ("/x_y.z", "x_y.z"),
]


@pytest.mark.parametrize("path,expected", ESCAPE_CASES)
def test_path_escape(path, expected):
    assert path_escape(path) == expected


def _systemd_escape(path: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(["systemd-escape", "--path", "--suffix=mount", "--", path],
                          capture_output=True, text=True)


def test_path_escape_matches_systemd_escape():
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape not installed (Debian package systemd)")
    for path, _ in ESCAPE_CASES:
        res = _systemd_escape(path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == unit_name(path), path


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
                        min_size=1, max_size=8), min_size=1, max_size=4))
def test_path_escape_matches_systemd_escape_generated(parts):
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape not installed (Debian package systemd)")
    parts = [p for p in parts if p not in (".", "..")] or ["x"]
    path = "/" + "/".join(parts)
    res = _systemd_escape(path)
    assert res.returncode == 0, res.stderr
    if len(res.stdout.strip()) > 255:
        # systemd-escape prints it, but systemd refuses unit names of 256+ characters.
        with pytest.raises(UnitError, match="systemd allows 255"):
            unit_name(path)
    else:
        assert res.stdout.strip() == unit_name(path)


def test_unnormalized_and_long_paths_refused():
    with pytest.raises(UnitError, match="not normalized"):
        path_escape("/mnt/../etc")
    with pytest.raises(UnitError, match="systemd allows 255"):
        unit_name("/" + "x" * 300)


OPTS = "basedir=/srv/objects,ro,nofail"


def test_unit_text():
    text = unit_text("/srv/images/app.cfs", "/run/app", OPTS, requires_mounts_for=["/srv/objects"])
    lines = text.splitlines()
    assert lines[1:4] == ["[Unit]", "Description=composefs image /srv/images/app.cfs",
                          'RequiresMountsFor="/srv/images" "/srv/objects"']
    mount = lines[lines.index("[Mount]") + 1:lines.index("[Mount]") + 5]
    assert mount == ["What=/srv/images/app.cfs", "Where=/run/app", "Type=composefs", "Options=" + OPTS]
    assert lines[-2:] == ["[Install]", "WantedBy=local-fs.target"]
    assert text.endswith("\n")


def test_percent_is_doubled_and_options_round_trip():
    text = unit_text("/srv/100%.cfs", "/mnt/50%", "basedir=/o%d,ro")
    assert "What=/srv/100%%.cfs" in text and "Where=/mnt/50%%" in text and "Options=basedir=/o%%d,ro" in text
    options = [l for l in text.splitlines() if l.startswith("Options=")][0][len("Options="):]
    assert parse_options(options.replace("%%", "%")).basedirs == ["/o%d"]


@pytest.mark.parametrize("image,where,options,message", [
    ("rel.cfs", "/mnt", OPTS, "What= must be an absolute path"),
    ("/a.cfs", "mnt", OPTS, "Where= must be an absolute path"),
    ("/a\n.cfs", "/mnt", OPTS, "newline"),
    ("/a.cfs ", "/mnt", OPTS, "whitespace"),
    ("/a.cfs\\", "/mnt", OPTS, "backslash"),
    ("/a.cfs", "/mnt/../x", OPTS, "not normalized"),
    ("/a.cfs", "/mnt", "basedir=/a\\,b", "escaped comma"),
    ("/a.cfs", "/mnt", 'basedir="/a"', "double quote"),
])
def test_refusals(image, where, options, message):
    with pytest.raises(UnitError, match=message):
        unit_text(image, where, options)


def test_write_unit_is_atomic_and_named(tmp_path):
    path = write_unit(tmp_path, "/srv/a.cfs", "/mnt/my app", OPTS)
    assert os.path.basename(path) == "mnt-my\\x20app.mount"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert open(path).read() == unit_text("/srv/a.cfs", "/mnt/my app", OPTS)
    assert sorted(os.listdir(tmp_path)) == ["mnt-my\\x20app.mount"]  # no temp file left
    # A refused unit writes nothing.
    with pytest.raises(UnitError):
        write_unit(tmp_path, "/srv/a.cfs", "/mnt/other", "basedir=/a\\,b")
    assert sorted(os.listdir(tmp_path)) == ["mnt-my\\x20app.mount"]


def _verify(unit_path):
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_path)], capture_output=True,
                          text=True, timeout=120)


def _need_systemd_analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    _need_systemd_analyze()
    path = write_unit(tmp_path, "/srv/images/app.cfs", "/mnt/composefs app", OPTS,
                      requires_mounts_for=["/srv/objects"])
    res = _verify(path)
    assert res.returncode == 0, res.stderr
    # The check is real: a unit whose name does not match Where= is refused.
    wrong = tmp_path / "wrong.mount"
    wrong.write_text(open(path).read())
    res = _verify(wrong)
    assert res.returncode != 0 and "doesn't match unit name" in res.stderr


def test_cli_prints_and_writes_the_unit(ours, tmp_path):
    img = tmp_path / "img.cfs"
    where = tmp_path / "mnt, dir"  # a comma in Where= is fine: it is not an option
    res = ours.run("mount.composefs", "--print-systemd-unit", "-o", "basedir=%s:/b,nofail,nodev" % (tmp_path / "o"),
                   img, where)
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    assert "What=%s\n" % img in text and "Where=%s\n" % where in text
    assert "Options=basedir=%s:/b,rw,nofail,nodev\n" % (tmp_path / "o") in text
    res = ours.run("mount.composefs", "--write-systemd-unit=%s" % tmp_path, "-o", "basedir=/o", img, where)
    assert res.returncode == 0, res.stderr
    written = res.stdout.decode().strip()
    assert os.path.dirname(written) == str(tmp_path) and written.endswith(".mount")
    assert open(written).read().count("Type=composefs") == 1
    # A basedir holding a comma cannot pass through mount(8): refused, nothing written.
    res = ours.run("mount.composefs", "--print-systemd-unit", "-o", "basedir=/o\\,x", img, where)
    assert res.returncode == 1 and b"escaped comma" in res.stderr


def test_systemctl_helpers_run_through_the_given_runner():
    """The module passes Ansible's run_command, the agent uses subprocess: one set of helpers."""
    from composefs_fleet import systemd_unit

    calls = []

    def run(argv):
        calls.append(argv)
        if argv[1] == "show":
            return 0, "loaded\n", ""
        if argv[1] == "start":
            return 1, "", "Job for srv-app.mount failed.\n"
        return 0, "", ""

    assert systemd_unit.unit_loaded("srv-app.mount", run, "/bin/systemctl")
    systemd_unit.enable_unit("srv-app.mount", run)
    systemd_unit.daemon_reload(run)
    with pytest.raises(systemd_unit.SystemctlError, match=r"systemctl start -- srv-app.mount failed \(rc 1\): Job for"):
        systemd_unit.start_unit("srv-app.mount", run)
    assert calls == [["/bin/systemctl", "show", "--property=LoadState", "--value", "--", "srv-app.mount"],
                     ["systemctl", "enable", "--", "srv-app.mount"], ["systemctl", "daemon-reload"],
                     ["systemctl", "start", "--", "srv-app.mount"]]
    assert not systemd_unit.unit_loaded("x.mount", lambda argv: (0, "not-found\n", ""))
