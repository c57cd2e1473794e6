"""composefs.fleet.mount on this machine's kernel: real mounts, units in a temp dir.

Every state change runs four times (check, apply, idempotent, idempotent in
check mode) and the effect is checked on disk, in /proc/self/mountinfo and by
reading through the mount.  The ``env`` fixture unmounts whatever a test left
mounted under its temp dir and then fails the test if there was anything.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from composefs_fleet import mount_record, mountinfo
from composefs_fleet.fsverity_ioctl import _kernel_has_fsverity
from composefs_fleet.mount import verity_problem
from composefs_fleet.store import Store
from composefs_fleet.store_add import add_image
from composefs_fleet.systemd_unit import unit_name

AWKWARD = ["plain", "with space", "comma,name", "colon:name", "eq=name", "all of, them:=x"]


def write_source(root, seed, shared=True):
    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True)
    files = {
        "small": b"small %d\n" % seed,
        "sub/big": rng.randbytes(70000),
        "sub/page": rng.randbytes(4096),
    }
    if shared:
        files["common"] = random.Random(0).randbytes(50000)
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return files


def composefs_mounts_under(base):
    prefix = os.path.realpath(str(base)) + "/"
    return [e for e in mountinfo.read_mountinfo() if e.where.startswith(prefix)]


class Env:
    def __init__(self, base):
        self.base = base
        self.store = base / "store"
        self.units = base / "units"
        store, _ = Store.init(self.store, notice=None)
        self.src = {}
        self.files = {}
        for i, name in enumerate(("one", "two")):
            src = base / ("src-" + name)
            self.files[name] = write_source(src, i + 1)
            self.src[name] = src
            add_image(store, src, "app/" + name)
        self.digest = {n: store.read_ref("app/" + n) for n in ("one", "two")}
        self.image_file = {n: os.fsdecode(store.image_path(d)) for n, d in self.digest.items()}

    def target(self, name="mnt"):
        return str(self.base / name)

    def args(self, target, state, image="app/one", **extra):
        args = dict(path=target, store=str(self.store), image=image, state=state, unit_dir=str(self.units))
        args.update(extra)
        return args

    def unit_file(self, target):
        return os.path.join(str(self.units), unit_name(os.path.realpath(target)))

    def wants_link(self, target):
        return os.path.join(str(self.units), "local-fs.target.wants", unit_name(os.path.realpath(target)))

    def assert_reads(self, target, name):
        for rel, data in self.files[name].items():
            with open(os.path.join(target, rel), "rb") as f:
                assert f.read() == data, rel


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    left = composefs_mounts_under(tmp_path)
    for entry in reversed(left):
        if subprocess.run(["umount", entry.where], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", entry.where], capture_output=True)
    assert not left, "test left mounted: %s" % [m.where for m in left]


def four(run, args, expect_changed=True):
    """check -> apply -> idempotent -> idempotent check; returns the four results."""
    results = []
    for check, changed in ((True, expect_changed), (False, expect_changed), (False, False), (True, False)):
        res = run("mount", args, check=check, diff=True)
        assert not res.get("failed"), res.get("msg")
        assert res["changed"] is changed, (check, res)
        results.append(res)
    return results


def warning_texts(res):
    """Warnings of a result: strings, or (ansible-core 2.19) WarningSummary dicts."""
    out = []
    for w in res.get("warnings", []):
        out.append(w if isinstance(w, str) else w.get("event", {}).get("msg", ""))
    return out


def mounted_here(target):
    top = mountinfo.top_mount(target)
    return top is not None and top.is_composefs()


# -- argument and input errors (no mount) -----------------------------------------------

def test_relative_path_is_refused(module_runner, env):
    res = module_runner("mount", env.args("rel/mnt", "mounted"))
    assert res["failed"] and "path must be an absolute path" in res["msg"]


def test_ref_without_store(module_runner, env):
    res = module_runner("mount", dict(path=env.target(), image="app/one", state="mounted", unit_dir=str(env.units)))
    assert res["failed"] and "store is required" in res["msg"]


def test_missing_ref_and_digest(module_runner, env):
    res = module_runner("mount", env.args(env.target(), "mounted", image="app/none"))
    assert res["failed"] and "no ref app/none" in res["msg"]
    res = module_runner("mount", env.args(env.target(), "mounted", image="0" * 64))
    assert res["failed"] and "is not in the store" in res["msg"]
    assert not os.path.exists(env.target()) and not os.path.exists(str(env.units))


def test_image_required_for_mounted(module_runner, env):
    res = module_runner("mount", dict(path=env.target(), state="mounted"))
    assert res["failed"] and "image" in res["msg"]


def test_digest_mismatch_fails_before_mounting(module_runner, env):
    res = module_runner("mount", env.args(env.target(), "mounted", digest=env.digest["two"]))
    assert res["failed"] and "does not match the image" in res["msg"]
    assert not os.path.exists(env.target())


def test_bad_digest_and_exclusive_pins(module_runner, env):
    res = module_runner("mount", env.args(env.target(), "mounted", digest="xyz"))
    assert res["failed"] and "64 hex digits" in res["msg"]
    res = module_runner("mount", env.args(env.target(), "mounted", digest=env.digest["one"], pin_digest=True))
    assert res["failed"] and "mutually exclusive" in res["msg"]


def test_upperdir_needs_workdir(module_runner, env):
    res = module_runner("mount", env.args(env.target(), "mounted", upperdir=str(env.base / "up")))
    assert res["failed"] and "workdir" in res["msg"]


def test_basedir_with_comma_cannot_go_into_a_unit(module_runner, env):
    odd = env.base / "objs,x"
    shutil.copytree(str(env.store / "objects"), str(odd))
    res = module_runner("mount", env.args(env.target(), "mounted", basedir=[str(odd)]))
    assert res["failed"] and "comma" in res["msg"]
    assert not os.path.exists(env.target())


def test_verity_require_fails_clearly_without_fsverity(module_runner, env):
    problem = verity_problem(str(env.store / "objects"))
    if problem is None:
        pytest.skip("the filesystem of %s has fs-verity: the refusal cannot happen here" % env.store)
    for state in ("mounted", "present"):
        res = module_runner("mount", env.args(env.target(), state, verity="require"))
        assert res["failed"]
        assert "verity=require, but the filesystem of basedir %s has no fs-verity" % (env.store / "objects") \
            in res["msg"]
        assert problem in res["msg"]
    assert not os.path.exists(env.target()) and not os.path.exists(str(env.units))


# -- the states, for real --------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("name", AWKWARD)
def test_mounted_then_absent(module_runner, env, name):
    target = env.target("mnt " + name if name != "plain" else "mnt")
    args = env.args(target, "mounted")
    check, real, again, again_check = four(module_runner, args)
    for res in (check, real):
        assert res["actions"] == ["mounted", "wrote unit", "enabled unit"]
        assert res["diff"]["before"]["mounted"] is False and res["diff"]["before"]["unit"] is None
        assert res["diff"]["after"]["mounted"] is True
        assert res["diff"]["after"]["image_digest"] == env.digest["one"]
        assert "Where=%s" % target in res["diff"]["after"]["unit"]
    assert again["action"] == "none" and again["differences"] == []
    assert again["diff"]["before"] == again["diff"]["after"] == real["diff"]["after"]
    info = again["mount"]
    assert info["where"] == target and info["mounted"] is True
    assert info["image_digest"] == env.digest["one"] and info["image_file"] == env.image_file["one"]
    assert info["basedirs"] == [str(env.store / "objects")]
    assert info["verity"] == ("off" if verity_problem(str(env.store / "objects")) else "require")
    # Real effects: mountinfo, reads, unit and wants link, record.
    top = mountinfo.top_mount(target)
    assert top.is_composefs() and top.layout()["basedirs"] == [str(env.store / "objects")]
    env.assert_reads(target, "one")
    with open(env.unit_file(target)) as f:
        unit = f.read()
    assert unit.splitlines() == real["diff"]["after"]["unit"]
    assert "What=%s\n" % env.image_file["one"] in unit
    assert os.readlink(env.wants_link(target)) == env.unit_file(target)
    record = mount_record.live_record(target)
    assert record is not None and record["image_digest"] == env.digest["one"]
    assert info["record"] == mount_record.record_path(target)

    check, real, again, again_check = four(module_runner, env.args(target, "absent"))
    for res in (check, real):
        assert res["actions"] == ["unmounted", "disabled unit", "removed unit", "forgot history"]
        assert res["diff"]["after"]["mounted"] is False and res["diff"]["after"]["unit"] is None
    assert not mounted_here(target)
    assert not os.path.exists(target)  # the empty mount point went with it
    assert not os.path.exists(env.unit_file(target)) and not os.path.lexists(env.wants_link(target))
    assert not os.path.exists(mount_record.record_path(target))


@pytest.mark.kernel
def test_present_unmounted_and_mounted(module_runner, env):
    target = env.target()
    check, real, _, _ = four(module_runner, env.args(target, "present"))
    assert real["actions"] == ["wrote unit", "enabled unit"]
    assert real["diff"]["after"]["mounted"] is False and real["mount"]["mounted"] is False
    assert os.path.isfile(env.unit_file(target)) and not mounted_here(target)
    # mounted on top of present: only the mount is missing.
    check, real, _, _ = four(module_runner, env.args(target, "mounted"))
    assert real["actions"] == ["mounted"]
    assert real["diff"]["before"]["unit"] == real["diff"]["after"]["unit"]
    env.assert_reads(target, "one")
    # unmounted: the unit stays.
    check, real, _, _ = four(module_runner, env.args(target, "unmounted"))
    assert real["actions"] == ["unmounted"]
    assert not mounted_here(target) and os.path.isfile(env.unit_file(target))
    assert os.path.isdir(target)  # unmounted keeps the mount point
    assert not os.path.exists(mount_record.record_path(target))
    four(module_runner, env.args(target, "absent"))
    assert not os.path.exists(env.unit_file(target))


@pytest.mark.kernel
def test_remounted_always_changes(module_runner, env):
    target = env.target()
    args = env.args(target, "remounted")
    for check in (True, False, False, True):
        res = module_runner("mount", args, check=check, diff=True)
        assert not res.get("failed"), res.get("msg")
        assert res["changed"] is True
    assert res["actions"][:1] == ["remounted"]
    assert len([e for e in mountinfo.mounts_at(target)]) == 1  # replaced, not stacked
    env.assert_reads(target, "one")
    four(module_runner, env.args(target, "absent"))


@pytest.mark.kernel
def test_other_image_is_switched_while_a_file_is_held_and_rolled_back(module_runner, env):
    target = env.target("mnt a,b:c=d")
    four(module_runner, env.args(target, "mounted", image="app/one"))
    held = open(os.path.join(target, "sub/big"), "rb")
    head = held.read(1000)
    try:
        args = env.args(target, "mounted", image="app/two")
        check = module_runner("mount", args, check=True, diff=True)
        assert check["changed"] is True and check["actions"] == ["switched", "updated unit"]
        env.assert_reads(target, "one")  # check mode changed nothing
        res = module_runner("mount", args, diff=True)
        assert not res.get("failed"), res.get("msg")
        assert res["changed"] is True and res["actions"] == ["switched", "updated unit"]
        assert len(res["differences"]) == 1
        assert res["differences"][0].startswith("image: %s is mounted" % env.digest["one"])
        assert res["diff"]["before"]["image_digest"] == env.digest["one"]
        assert res["diff"]["after"]["image_digest"] == env.digest["two"]
        assert res["mount"]["image_digest"] == env.digest["two"]
        assert res["mount"]["previous"] == {"image_file": env.image_file["one"], "image_digest": env.digest["one"],
                                            "ref": "app/one"}
        assert res["mount"]["switch"] == "beneath"
        assert not any("left alone" in w for w in warning_texts(res))
        # The open file still reads the old image to its end; new opens see the new one.
        assert head + held.read() == env.files["one"]["sub/big"]
    finally:
        held.close()
    env.assert_reads(target, "two")
    assert len(mountinfo.mounts_at(target)) == 1
    with open(env.unit_file(target)) as f:
        assert "What=%s\n" % env.image_file["two"] in f.read()  # a reboot brings up the new image
    four(module_runner, args, expect_changed=False)
    assert module_runner("mount", args)["mount"]["previous"]["image_digest"] == env.digest["one"]
    # Roll back by the digest the result named.
    back = env.args(target, "mounted", image="sha256:" + res["mount"]["previous"]["image_digest"])
    res = module_runner("mount", back, diff=True)
    assert res["changed"] is True and res["actions"][0] == "switched"
    assert res["mount"]["previous"]["image_digest"] == env.digest["two"]
    env.assert_reads(target, "one")
    four(module_runner, back, expect_changed=False)
    four(module_runner, env.args(target, "absent"))


@pytest.mark.kernel
def test_other_basedirs_are_switched(module_runner, env):
    target = env.target()
    four(module_runner, env.args(target, "mounted"))
    extra = env.base / "more-objects"
    extra.mkdir()
    args = env.args(target, "mounted", basedir=[str(env.store / "objects"), str(extra)])
    res = module_runner("mount", args)
    assert [d.split(":")[0] for d in res["differences"]] == ["basedirs"]
    assert res["changed"] and mountinfo.top_mount(target).layout()["basedirs"] == [
        str(env.store / "objects"), str(extra)]
    assert res["mount"]["previous"] is None  # the same image: nothing to roll back to
    four(module_runner, args, expect_changed=False)
    four(module_runner, env.args(target, "absent"))


@pytest.mark.kernel
def test_mount_without_record_is_switched(module_runner, env, ours):
    """A mount made by another tool (here: the record removed) cannot be identified: it is replaced."""
    target = env.target()
    four(module_runner, env.args(target, "mounted"))
    os.unlink(mount_record.record_path(target))
    res = module_runner("mount", env.args(target, "mounted"))
    assert res["changed"] is True and res["actions"] == ["switched"]
    assert [d.split(":")[0] for d in res["differences"]] == ["image"]
    assert "no valid mount record" in res["differences"][0]
    assert module_runner("mount", env.args(target, "mounted"))["differences"] == []
    assert len(mountinfo.mounts_at(target)) == 1
    four(module_runner, env.args(target, "absent"))


@pytest.mark.kernel
def test_ephemeral_mounts_without_a_unit(module_runner, env):
    target = env.target()
    four(module_runner, env.args(target, "ephemeral"))
    env.assert_reads(target, "one")
    assert not os.path.exists(env.unit_file(target))
    res = module_runner("mount", env.args(target, "ephemeral", image="app/two"))
    assert res["changed"] and res["actions"] == ["switched"]
    env.assert_reads(target, "two")
    assert not os.path.exists(env.unit_file(target))
    four(module_runner, env.args(target, "unmounted"))


@pytest.mark.kernel
def test_image_file_and_upperdir(module_runner, env):
    target = env.target("rw mnt")
    up, work = env.base / "up", env.base / "work"
    up.mkdir()
    work.mkdir()
    args = dict(path=target, image=env.image_file["two"], basedir=[str(env.store / "objects")],
                upperdir=str(up), workdir=str(work), state="mounted", unit_dir=str(env.units))
    _, real, _, _ = four(module_runner, args)
    assert real["mount"]["image_digest"] == env.digest["two"]
    layout = mountinfo.top_mount(target).layout()
    assert (layout["upperdir"], layout["workdir"]) == (str(up), str(work))
    env.assert_reads(target, "two")
    with open(os.path.join(target, "written"), "wb") as f:
        f.write(b"upper")
    assert (up / "written").read_bytes() == b"upper"
    # Without the upper layer, the read-only request differs: a writable mount is switched only when unused.
    readonly = dict(args, upperdir=None, workdir=None)
    with open(os.path.join(target, "written"), "rb") as held:
        res = module_runner("mount", readonly)
        assert res["failed"] and "in use" in res["msg"] and "nothing was changed" in res["msg"]
        assert held.read() == b"upper"
    assert mountinfo.top_mount(target).layout()["upperdir"] == str(up)
    res = module_runner("mount", readonly)
    assert sorted(d.split(":")[0] for d in res["differences"]) == ["upperdir", "workdir"]
    assert res["changed"] and res["mount"]["switch"] == "unmount-attach"
    assert mountinfo.top_mount(target).layout()["upperdir"] is None
    assert not os.path.exists(os.path.join(target, "written"))
    four(module_runner, dict(args, state="absent"))


@pytest.mark.kernel
def test_pin_digest_without_fsverity_fails_and_leaves_nothing(module_runner, env):
    if _kernel_has_fsverity() and verity_problem(env.image_file["one"].rsplit("/", 1)[0]) is None:
        pytest.skip("fs-verity works here: pinning succeeds (tested in the guest)")
    target = env.target()
    res = module_runner("mount", env.args(target, "mounted", pin_digest=True))
    assert res["failed"] and "fs-verity" in res["msg"]
    assert not os.path.exists(target) and not os.path.exists(env.unit_file(target))


@pytest.mark.kernel
def test_foreign_mount_is_not_touched(module_runner, env):
    target = env.target()
    os.mkdir(target)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    try:
        for state in ("mounted", "unmounted", "absent", "remounted"):
            res = module_runner("mount", env.args(target, state))
            assert res["failed"] and "something other than a composefs image is mounted" in res["msg"], state
        assert mountinfo.top_mount(target).fstype == "tmpfs"
    finally:
        subprocess.run(["umount", target], check=True)


@pytest.mark.kernel
def test_absent_keeps_a_non_empty_mount_point(module_runner, env):
    target = env.target()
    four(module_runner, env.args(target, "present"))
    os.mkdir(target)
    (env.base / "mnt" / "keep").write_bytes(b"")
    four(module_runner, env.args(target, "absent"))
    assert os.path.exists(os.path.join(target, "keep"))


@pytest.mark.kernel
def test_busy_mount_is_reported_not_detached(module_runner, env):
    target = env.target()
    four(module_runner, env.args(target, "mounted"))
    held = open(os.path.join(target, "small"), "rb")
    try:
        res = module_runner("mount", env.args(target, "unmounted"))
        assert res["failed"] and "in use" in res["msg"]
        assert mounted_here(target)
    finally:
        held.close()
    four(module_runner, env.args(target, "absent"))


@pytest.mark.kernel
def test_failed_mount_leaves_nothing(module_runner, env):
    target = env.target("new dir")
    res = module_runner("mount", env.args(target, "mounted", basedir=[str(env.base / "no-objects")]))
    assert res["failed"] and "basedir %s does not exist" % (env.base / "no-objects") in res["msg"]
    assert not os.path.exists(target)  # the mount point it created is gone again
    assert not os.path.exists(env.unit_file(target)) and not os.path.exists(mount_record.record_path(target))


@pytest.mark.kernel
def test_unwritable_record_dir_mounts_and_says_so(module_runner, env, monkeypatch):
    """The mount must not fail for want of a record; the result says what is missing."""
    import importlib

    core = importlib.import_module("ansible_collections.composefs.fleet.plugins.module_utils.composefs.mount_record")
    blocker = env.base / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(core, "RECORD_DIR", str(blocker / "mounts"))
    target = env.target()
    res = module_runner("mount", env.args(target, "mounted"))
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] and res["actions"][0] == "mounted" and res["mount"]["record"] is None
    assert any("no mount record was written" in w and "cannot write the mount record" in w
               for w in warning_texts(res))
    env.assert_reads(target, "one")
    monkeypatch.undo()
    # Without a record a later run cannot tell the image: it says so and switches to a recorded mount.
    res = module_runner("mount", env.args(target, "mounted"))
    assert res["changed"] is True and "no valid mount record" in res["differences"][0]
    assert res["actions"] == ["switched"] and res["mount"]["record"] is not None
    four(module_runner, env.args(target, "absent"))


@pytest.mark.kernel
def test_newline_mount_point_mounted_by_core_is_unmounted(module_runner, env):
    """A unit cannot name it, but unmounted/absent still find and remove the mount (mountinfo \\012)."""
    from composefs_fleet.mount import mount_composefs

    target = env.target("new\nline, x:y=z")
    os.mkdir(target)
    mount_composefs(env.image_file["one"], target, [str(env.store / "objects")])
    record = mount_record.record_path(target)
    assert mount_record.live_record(target)["image_digest"] == env.digest["one"]
    res = module_runner("mount", env.args(target, "mounted"))
    assert res["failed"] and "newline" in res["msg"]
    assert mounted_here(target)
    check, real, _, _ = four(module_runner, env.args(target, "unmounted"))
    assert real["actions"] == ["unmounted"] and real["diff"]["before"]["image_digest"] == env.digest["one"]
    assert not mounted_here(target) and not os.path.exists(record)
    os.rmdir(target)


@pytest.mark.parametrize("has_verity", [True, False], ids=["verity-fs", "no-verity-fs"])
@pytest.mark.parametrize("mode", ["require", "on", "off", "auto"])
def test_module_and_agent_resolve_a_request_alike(monkeypatch, tmp_path, mode, has_verity):
    """One meaning of each verity mode: the module's request and the agent's remount
    ask mount.composefs for the same thing (auto: verity where the basedirs have it)."""
    import importlib

    from composefs_fleet import mount_state
    from composefs_fleet_agent.config import MountSpec
    from composefs_fleet_agent.remount import request_for

    module = importlib.import_module("ansible_collections.composefs.fleet.plugins.modules.mount")
    module_state = importlib.import_module("ansible_collections.composefs.fleet.plugins.module_utils.composefs.mount_state")

    def problem(basedir):
        return None if has_verity else "no fs-verity on %s" % basedir

    for state_module in (mount_state, module_state):
        monkeypatch.setattr(state_module, "verity_problem", problem)
    image = tmp_path / "image.cfs"
    image.write_bytes(b"not parsed here")
    basedir = str(tmp_path / "objects")
    where = str(tmp_path / "mnt")
    params = dict(image=str(image), store=None, basedir=[basedir], digest=None, pin_digest=False, upperdir=None,
                  workdir=None, verity=mode)
    spec = MountSpec(where, str(image), "0" * 64, [basedir], mode, True, None, None)
    agent = request_for(spec, pin=False)
    want = {"require": "verity", "on": "tryverity", "off": "", "auto": "verity" if has_verity else ""}[mode]
    assert agent.verity.option == want
    if mode == "require" and not has_verity:
        with pytest.raises(module.Fail, match="verity=require, but the filesystem of basedir"):
            module.resolve(params, where, True)
        return
    req = module.resolve(params, where, True)
    assert req.mount_args() == agent.mount_args()
    assert req.options() == agent.options()
    effective = "require" if mode == "require" or (mode in ("on", "auto") and has_verity) else "off"
    assert req.verity.effective == agent.verity.effective == effective


def test_agent_pins_only_a_verity_mount():
    """A pinned digest implies verity=require: the agent's remount never pins a verity: off mount."""
    from composefs_fleet_agent.config import MountSpec
    from composefs_fleet_agent.remount import request_for

    off = MountSpec("/srv/x", "/i", "a" * 64, ["/nonexistent-objects"], "off", True, None, None)
    assert request_for(off, pin=True).mount_args()["digest"] is None
    req = MountSpec("/srv/x", "/i", "a" * 64, ["/nonexistent-objects"], "require", True, None, None)
    assert request_for(req, pin=True).mount_args()["digest"] == "a" * 64


# -- store ownership (sshd StrictModes) -------------------------------------------------

@pytest.mark.kernel
def test_group_writable_store_needs_allow_foreign_owner(module_runner, env):
    target = env.target()
    os.chmod(env.store, 0o770)
    for state, check in (("mounted", True), ("mounted", False), ("present", False)):
        res = module_runner("mount", env.args(target, state), check=check)
        assert res.get("failed") and "is writable by its group (mode 0770)" in res["msg"], res
        assert "allow_foreign_owner" in res["msg"] and "Traceback" not in res["msg"]
    assert not os.path.exists(target) and not os.path.exists(str(env.units))
    four(module_runner, env.args(target, "mounted", allow_foreign_owner=True))
    assert mounted_here(target)
    env.assert_reads(target, "one")
    # Unmounting opens no store: the flag is not needed to take the mount away.
    four(module_runner, env.args(target, "absent"))
    assert not mounted_here(target) and not os.path.exists(env.unit_file(target))


@pytest.mark.parametrize("image", ["app/one", "0" * 64, "/nonexistent/image.cfs"])
@pytest.mark.parametrize("state", ["mounted", "ephemeral", "present", "remounted"])
def test_check_mode_on_a_fresh_node_says_what_would_be(module_runner, tmp_path, state, image):
    """Before the store task has run (check mode of a whole play), nothing exists yet: no failure, nothing made."""
    store = tmp_path / "store-to-be"
    units = tmp_path / "units"
    target = tmp_path / "mnt"
    args = dict(path=str(target), store=str(store), image=image, state=state, unit_dir=str(units))
    res = module_runner("mount", args, check=True, diff=True)
    assert not res.get("failed"), res.get("msg")
    assert res["changed"] is True
    expected = {"mounted": ["mounted", "wrote unit", "enabled unit"], "ephemeral": ["mounted"],
                "present": ["wrote unit", "enabled unit"], "remounted": ["mounted", "wrote unit", "enabled unit"]}
    assert res["actions"] == expected[state]
    assert res["mount"]["image_digest"] is None
    assert res["mount"]["ref"] == ("app/one" if image == "app/one" else None)
    assert res["diff"]["before"]["mounted"] is False
    assert sorted(os.listdir(tmp_path)) == []  # nothing created
    # Outside check mode the same request fails, naming what is missing.
    real = module_runner("mount", args)
    assert real["failed"]
    assert str(store) in real["msg"] or "/nonexistent/image.cfs" in real["msg"]


@pytest.mark.kernel
def test_verity_boot_is_the_new_name_of_on(module_runner, env):
    target = env.target()
    res = module_runner("mount", env.args(target, "present", verity="boot"))
    with open(env.unit_file(target)) as f:
        unit = f.read()
    assert "tryverity" in unit and not res.get("failed")
    res = module_runner("mount", env.args(target, "present", verity="on"))
    assert res["changed"] is False  # the old name means the same
    four(module_runner, env.args(target, "absent"))
