# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""Fault drills for the node agent: runs INSIDE the QEMU guest, as root.

    python3 agent_drills.py status [--boot] [--config PATH] --tree DIR
    python3 agent_drills.py drills [--config PATH] --tree DIR

The guest has been converged with the roles composefs.fleet.composefs_node (a store, an
image of DIR, a verity mount of it with a .mount unit) and composefs.fleet.composefs_agent
(composefs-fleet-agent.service running). Standard library and the guest's
commands only (journalctl, systemctl, fsverity): nothing of the project's code
is trusted to observe the project.

``status`` reports the unit (systemctl show), the newest pass summary of the
running agent, the textfile, the mount and `systemd-analyze security`; with
--boot also what this boot's journal says about the .mount unit (the mount
came back through its unit, not through the agent).

``drills`` makes one fault after the other and, for each, triggers a pass with
``systemctl reload`` (SIGHUP), waits for the next pass-summary entry after a
journal cursor taken before the fault (``journalctl -o json
--after-cursor``), and records the agent's entries of that pass, the textfile
and what the system looks like afterwards; then it undoes the fault. SIGKILL
and the watchdog stall are checked through systemctl show and systemd's own
journal entries for the unit. A final pass must be clean again.

One process for everything (Python in the guest is 15-25x slower than on the
host). It prints one JSON object; the assertions are made on the host
(tests/guest/test_guest_agent.py) and in molecule/guest/verify.yml.
"""
import argparse
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

SERVICE = "composefs-fleet-agent.service"
IDENT = "composefs-fleet-agent"
DEFAULT_CONFIG = "/etc/composefs-fleet/agent.json"
HISTORY_DIR = "/var/lib/composefs-fleet/mounts"  # composefs_fleet.mount_history.HISTORY_DIR


def run(argv, check=False, timeout=120):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (argv, p.returncode, p.stderr.strip()))
    return {"rc": p.returncode, "out": p.stdout.strip(), "err": p.stderr.strip()}


# ----------------------------------------------------------------- journal --

def _value(v):
    # journalctl -o json gives binary fields as byte arrays and repeated
    # fields as lists.
    if isinstance(v, list):
        if all(isinstance(x, int) for x in v):
            return bytes(v).decode("utf-8", "replace")
        return [_value(x) for x in v]
    return v


def journal(after=None, boot=False, matches=None):
    argv = ["journalctl", "-o", "json", "--no-pager", "-q"]
    if after:
        argv.append("--after-cursor=" + after)
    if boot:
        argv.append("-b")
    argv += matches or ["SYSLOG_IDENTIFIER=" + IDENT, "+", "UNIT=" + SERVICE, "+", "_SYSTEMD_UNIT=" + SERVICE]
    res = run(argv)
    entries = []
    for line in res["out"].splitlines():
        try:
            entries.append({k: _value(v) for k, v in json.loads(line).items()})
        except ValueError:
            continue
    return entries


def cursor():
    """The journal's newest entry: what comes after it is new."""
    out = run(["journalctl", "-o", "json", "-n", "1", "--no-pager", "-q"])["out"]
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return entries[-1]["__CURSOR"] if entries else None


KEEP = ("MESSAGE", "MESSAGE_ID", "PRIORITY", "_PID", "SYSLOG_IDENTIFIER", "UNIT", "JOB_RESULT", "__REALTIME_TIMESTAMP")


def slim(entry):
    """The fields a drill looks at (every COMPOSEFS_* field and a few others)."""
    return {k: v for k, v in entry.items() if k.startswith("COMPOSEFS_") or k in KEEP}


def agent_entries(entries):
    return [e for e in entries if e.get("SYSLOG_IDENTIFIER") == IDENT or "COMPOSEFS_FINDING" in e]


def unit_entries(entries):
    # systemd's own messages about the service (PID 1 writes UNIT=).
    return [e for e in entries if e.get("UNIT") == SERVICE and e.get("_PID") == "1"]


def wait_summary(after, pid=None, min_pass=None, timeout=120.0):
    """Entries after ``after`` up to and including the first pass summary
    (of process ``pid`` when given, with COMPOSEFS_PASS >= min_pass)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = journal(after=after)
        for i, e in enumerate(entries):
            if e.get("COMPOSEFS_FINDING") != "pass-summary":
                continue
            if pid is not None and str(e.get("_PID")) != str(pid):
                continue
            if min_pass is not None and int(e.get("COMPOSEFS_PASS", "0")) < min_pass:
                continue
            return entries[:i + 1], e
        if time.monotonic() > deadline:
            return entries, None
        time.sleep(0.3)


# ---------------------------------------------------------------- systemd --

def show(unit=SERVICE, props=("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "Result",
                               "WatchdogUSec", "ExecMainStatus", "ExecMainCode", "Type")):
    res = run(["systemctl", "show", unit] + ["-p" + p for p in props])
    return dict(line.split("=", 1) for line in res["out"].splitlines() if "=" in line)


def wait_active(timeout=90.0, not_pid=None):
    """Wait until the service is active (READY=1 arrived) with a main PID other
    than ``not_pid``."""
    deadline = time.monotonic() + timeout
    while True:
        s = show()
        if s.get("ActiveState") == "active" and s.get("MainPID", "0") not in ("0", str(not_pid)):
            return s
        if time.monotonic() > deadline:
            return s
        time.sleep(0.3)


def timespan(text):
    """Seconds in a systemctl show time span ("15s", "1min 30s", "500ms")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    return sum(float(n) * units.get(u, 0.0) for n, u in re.findall(r"([0-9.]+)\s*([a-z]+)", text))


def security():
    res = run(["systemd-analyze", "security", "--no-pager", SERVICE], timeout=300)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", res["out"])
    flagged = [line.strip() for line in res["out"].splitlines() if line.lstrip().startswith("\u2717")]
    return {"rc": res["rc"], "exposure": float(m.group(1)) if m else None, "rating": m.group(2) if m else None,
            "flagged": flagged, "err": res["err"][-2000:]}


# ------------------------------------------------------------------- state --

def textfile(path):
    """The node_exporter textfile as {'name{labels}': float}, None if absent."""
    if not path:
        return None
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        return {"_error": errno.errorcode.get(exc.errno, str(exc.errno))}
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_lines(where):
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.rstrip("\n").split(" - ", 1)
            fields = left.split(" ")
            fstype, source, sopts = right.split(" ", 2)
            if unescape(fields[4]) == where:
                found.append({"fstype": fstype, "source": unescape(source), "super": sopts.split(",")})
    return found


def read_through(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno, str(exc.errno))}
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def drop_caches():
    # The overlay keeps the lower dentry it looked up: forget it, so the next
    # read looks at the object file as it is now.
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def measure(path):
    res = run(["fsverity", "measure", path])
    return res["out"].split(" ")[0] if res["rc"] == 0 else "error: " + (res["err"] or res["out"])


def digest(path):
    res = run(["fsverity", "digest", path], check=True)
    return res["out"].split(" ")[0].split(":", 1)[1]


def tree_objects(tree):
    """{relative path: object digest} for the files of the source tree that
    became objects (composefs inlines files of 64 bytes or less)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or os.path.getsize(path) <= 64:
                continue
            out[os.path.relpath(path, tree)] = digest(path)
    return out


def object_path(basedir, hexdigest):
    return os.path.join(basedir, hexdigest[:2], hexdigest[2:])


def replace_file(path, data, verity):
    """Put ``data`` at ``path`` by rename (fs-verity files cannot be written),
    with fs-verity enabled first when asked."""
    tmp = path + ".drill-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if verity:
        run(["fsverity", "enable", tmp], check=True)
    os.rename(tmp, path)


class Context:
    def __init__(self, config_path, tree):
        with open(config_path) as f:
            self.config = json.load(f)
        self.config_path = config_path
        self.tree = tree
        m = self.config["mounts"][0]
        self.where = m["where"]
        self.unit = run(["systemd-escape", "--path", "--suffix=mount", self.where], check=True)["out"]
        # A mount by ref names no image in the configuration: the agent reads the mount history, so do we.
        with open(os.path.join(HISTORY_DIR, self.unit + ".json")) as f:
            self.history = json.load(f)
        self.image = self.history["image"]
        self.image_digest = self.history["image_digest"]
        self.basedir = self.history["basedirs"][0]
        self.textfile = self.config.get("textfile") or None
        self.objects = tree_objects(tree)

    def snapshot(self):
        return {"mount": mount_lines(self.where), "mount_unit": show(self.unit, ("ActiveState",))["ActiveState"],
                "textfile": textfile(self.textfile), "service": show()}

    def trigger(self, fault=None, pid=None):
        """Cursor, fault, reload, wait for the pass summary. Returns the record."""
        before = show()
        c = cursor()
        t0 = time.monotonic()
        if fault:
            fault()
        reload = run(["systemctl", "reload", SERVICE])
        entries, summary = wait_summary(c, pid=pid or before.get("MainPID"))
        rec = {"reload": reload, "seconds": round(time.monotonic() - t0, 2), "summary": summary and slim(summary),
               "entries": [slim(e) for e in agent_entries(entries) if e is not summary]}
        rec["kinds"] = sorted({e.get("COMPOSEFS_FINDING") for e in rec["entries"]} - {None})
        rec.update(self.snapshot())
        return rec


# -------------------------------------------------------------- commands --

def cmd_status(ctx, boot):
    out = {"config": ctx.config, "history": ctx.history, "unit": ctx.unit, "objects": ctx.objects}
    out["service"] = wait_active()
    pid = out["service"].get("MainPID")
    # The newest pass summary of the running process (it passes once at start).
    deadline = time.monotonic() + 120
    summary = None
    while summary is None and time.monotonic() < deadline:
        entries = journal(boot=True, matches=["_PID=%s" % pid, "COMPOSEFS_FINDING=pass-summary"])
        summary = entries[-1] if entries else None
        if summary is None:
            time.sleep(0.5)
    out["summary"] = summary and slim(summary)
    out["service"] = show()
    out.update({k: v for k, v in ctx.snapshot().items() if k != "service"})
    name = sorted(ctx.objects)[0]
    out["read"] = {"path": name, "through_mount": read_through(os.path.join(ctx.where, name)),
                   "source": read_through(os.path.join(ctx.tree, name))}
    out["measure_objects"] = {d: measure(object_path(ctx.basedir, d)) for d in ctx.objects.values()}
    out["security"] = security()
    if boot:
        out["boots"] = len(run(["journalctl", "--list-boots", "--no-pager", "-q"])["out"].splitlines())
        out["mount_unit_journal"] = [slim(e) for e in journal(boot=True, matches=["UNIT=" + ctx.unit])]
        out["agent_this_boot"] = [slim(e) for e in journal(boot=True, matches=["SYSLOG_IDENTIFIER=" + IDENT])
                                  if e.get("COMPOSEFS_FINDING") not in (None, "pass-summary")]
    return out


def cmd_drills(ctx):
    out = {"objects": ctx.objects, "where": ctx.where, "unit": ctx.unit, "image": ctx.image,
           "image_digest": ctx.image_digest}
    names = sorted(ctx.objects)
    if len(names) < 3:
        raise SystemExit("the tree needs at least 3 files larger than 64 bytes, found %d" % len(names))
    out["baseline"] = ctx.trigger()

    # 1. Object copied without fs-verity (same bytes): the agent enables it.
    d1 = ctx.objects[names[0]]
    p1 = object_path(ctx.basedir, d1)
    with open(p1, "rb") as f:
        data1 = f.read()
    rec = ctx.trigger(lambda: replace_file(p1, data1, verity=False))
    rec.update(object=d1, measure_after=measure(p1))
    out["verity_missing"] = rec

    # 2. Object content changed (a changed copy renamed over it, no
    # fs-verity): never enabled, reported, reads through the mount fail.
    d2 = ctx.objects[names[1]]
    p2 = object_path(ctx.basedir, d2)
    with open(p2, "rb") as f:
        data2 = f.read()
    bad = bytes([data2[0] ^ 0xFF]) + data2[1:]
    rec = ctx.trigger(lambda: replace_file(p2, bad, verity=False))
    drop_caches()
    rec.update(object=d2, tampered_digest=digest(p2), measure_after=measure(p2),
               read=read_through(os.path.join(ctx.where, names[1])),
               dmesg=[line for line in run(["dmesg"])["out"].splitlines() if "overlayfs" in line][-3:])
    with open(p2, "rb") as f:
        rec["content_kept"] = f.read() == bad
    replace_file(p2, data2, verity=True)
    drop_caches()
    rec["read_restored"] = read_through(os.path.join(ctx.where, names[1]))
    out["content_changed"] = rec

    # 3. Object deleted.
    d3 = ctx.objects[names[2]]
    p3 = object_path(ctx.basedir, d3)
    with open(p3, "rb") as f:
        data3 = f.read()
    rec = ctx.trigger(lambda: os.unlink(p3))
    rec.update(object=d3, exists_after=os.path.exists(p3))
    # journalctl -x adds the catalog's explanation (the role installs it) under the entry, fields filled in.
    ids = sorted({e.get("MESSAGE_ID") for e in rec["entries"] if e.get("COMPOSEFS_FINDING") == "object-missing"} - {None})
    rec["explained"] = run(["journalctl", "-x", "--no-pager", "-q", "-n", "1", "-o", "short"]
                           + ["MESSAGE_ID=" + i for i in ids[:1]] + ["COMPOSEFS_OBJECT=" + d3])
    replace_file(p3, data3, verity=True)
    out["object_deleted"] = rec

    # 4. Mount unmounted by hand: remounted (the config says remount: true).
    rec = ctx.trigger(lambda: run(["umount", ctx.where], check=True))
    name = names[0]
    rec["read"] = read_through(os.path.join(ctx.where, name))
    rec["source"] = read_through(os.path.join(ctx.tree, name))
    out["unmounted"] = rec

    # 5. Image file replaced by another image (and the mount gone, so the
    # agent would remount): the digest mismatch is reported, nothing mounted.
    images_dir = os.path.dirname(ctx.image)
    others = sorted(os.path.join(images_dir, n) for n in os.listdir(images_dir)
                    if os.path.join(images_dir, n) != ctx.image and not n.startswith("."))
    rec = {"other_images": others}
    if others:
        with open(others[0], "rb") as f:
            other = f.read()
        # Kept aside by a hard link on the same filesystem, put back by rename.
        saved = "/var/tmp/agent-drill-image.saved"
        if os.path.exists(saved):
            os.unlink(saved)

        def fault():
            os.link(ctx.image, saved)
            replace_file(ctx.image, other, verity=True)
            run(["umount", ctx.where], check=True)

        rec.update(ctx.trigger(fault))
        rec["image_file_digest"] = measure(ctx.image)
        os.rename(saved, ctx.image)
        rec["restore_start"] = run(["systemctl", "start", ctx.unit])
        rec["restored_mount"] = mount_lines(ctx.where)
    out["image_replaced"] = rec

    # 6. Agent killed with SIGKILL: systemd restarts it.
    before = show()
    c = cursor()
    os.kill(int(before["MainPID"]), signal.SIGKILL)
    after = wait_active(not_pid=before["MainPID"])
    entries, summary = wait_summary(c, pid=after.get("MainPID"))
    out["sigkill"] = {"before": before, "after": after, "summary": summary and slim(summary),
                      "unit_entries": [slim(e) for e in unit_entries(entries)]}

    # 7. Watchdog stall: SIGSTOP, so no WATCHDOG=1 comes; systemd kills it
    # (watchdog signal, then SIGCONT so it dies) and restarts it.
    before = show()
    c = cursor()
    t0 = time.monotonic()
    os.kill(int(before["MainPID"]), signal.SIGSTOP)
    after = wait_active(timeout=max(90.0, 3 * timespan(before.get("WatchdogUSec", "")) + 60),
                        not_pid=before["MainPID"])
    restarted = time.monotonic() - t0
    entries, summary = wait_summary(c, pid=after.get("MainPID"))
    out["watchdog"] = {"before": before, "after": after, "restarted_after_seconds": round(restarted, 1),
                       "summary": summary and slim(summary),
                       "unit_entries": [slim(e) for e in unit_entries(entries)]}

    # Everything undone: a clean pass again.
    out["final"] = ctx.trigger()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("status", "drills"))
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--tree", required=True, help="the source tree of the mounted image")
    p.add_argument("--boot", action="store_true", help="status after a reboot: also the .mount unit's journal")
    args = p.parse_args(argv)
    ctx = Context(args.config, args.tree)
    t0 = time.monotonic()
    out = cmd_status(ctx, args.boot) if args.mode == "status" else cmd_drills(ctx)
    out["seconds"] = round(time.monotonic() - t0, 1)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
