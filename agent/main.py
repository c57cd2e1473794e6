# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""composefs-fleet-agent: keep verifying a node's composefs mounts and objects.

Run by systemd (Type=notify) it checks every ``interval`` seconds; SIGHUP
reloads the configuration and checks at once.  ``--once`` checks once and
exits 0 (healthy), 1 (problems remain) or 2 (bad configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from typing import Dict, List, Optional

from composefs_fleet import mount_history

from . import config as config_mod
from . import object_cache
from .checks import Checker, PassResult, StopPass
from .findings import KINDS
from .journal_log import Journal
from .sd_notify import Watchdog, notify
from .textfile import render, write

EXIT_HEALTHY, EXIT_FINDINGS, EXIT_CONFIG = 0, 1, 2
KIND_TABLE = "\n".join("  %-24s %s  %s" % (k, v.message_id, v.summary) for k, v in KINDS.items())


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="composefs-fleet-agent",
        description=__doc__.split("\n\n", maxsplit=1)[0].split(": ", 1)[1].capitalize(),
        epilog="Findings go to the journal with these MESSAGE_IDs (COMPOSEFS_FINDING=kind):\n" + KIND_TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config_mod.DEFAULT_PATH,
                        help="configuration file (JSON; default %(default)s)")
    parser.add_argument("--once", action="store_true",
                        help="check once and exit: 0 healthy, 1 problems remain, 2 bad configuration")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit (0 or 2)")
    parser.add_argument("--quarantine", action="store_true",
                        help="move objects whose content does not match their name aside (also: config)")
    parser.add_argument("--textfile", help="node_exporter textfile to write after each pass (overrides the config)")
    parser.add_argument("--interval", type=float, help="seconds between passes (overrides the config)")
    parser.add_argument("--history-dir", default=mount_history.HISTORY_DIR,
                        help="the mount history: what our mount code last mounted at each mount point, which is "
                             "what a watched mount should show (default %(default)s)")
    parser.add_argument("--cache-dir", default=object_cache.CACHE_DIR,
                        help="where the object list of each mounted image is kept between runs, so that --once lists "
                             "an image only once like the service; root's own directory (default %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="keep no object lists on disk (--cache-dir ignored)")
    parser.add_argument("--json", action="store_true", help="with --once: print the pass as JSON on stdout")
    parser.add_argument("--no-journal", action="store_true", help="log plain lines to stderr, not to the journal")
    return parser.parse_args(argv)


class Agent:
    def __init__(self, args: argparse.Namespace, journal: Journal) -> None:
        self.args = args
        self.journal = journal
        self.config: Optional[config_mod.Config] = None
        self.config_valid = False
        self.passes = 0
        self.stopping = False
        self.reload_requested = False
        self.watchdog = Watchdog()
        self.checker = Checker(self.journal.finding, self._tick, history_dir=args.history_dir,
                               cache_dir=None if args.no_cache else args.cache_dir)

    # -- configuration --------------------------------------------------------------
    def load_config(self) -> bool:
        try:
            config = _load(self.args.config)
        except config_mod.ConfigError as exc:
            self.config_valid = False
            kept = " (keeping the configuration loaded before)" if self.config is not None else ""
            self.journal.entry("config-invalid", "configuration %s rejected: %s%s"
                               % (exc.path, "; ".join(exc.problems), kept),
                               {"path": exc.path, "actual": "; ".join(exc.problems)})
            return False
        if self.args.interval is not None:
            config.interval = max(1.0, self.args.interval)
        if self.args.textfile is not None:
            config.textfile = self.args.textfile
        self.config = config
        self.config_valid = True
        self.journal.entry("config-loaded", "configuration %s loaded: %d stores, %d mounts, every %gs%s"
                           % (config.path, len(config.stores), len(config.mounts), config.interval,
                              _signatures_note(config)),
                           {"path": config.path})
        return True

    # -- one pass -------------------------------------------------------------------
    def _tick(self) -> None:
        self.watchdog.ping()
        if self.stopping:
            raise StopPass()

    def run_pass(self) -> Optional[PassResult]:
        config = self.config
        if config is None:
            raise RuntimeError("no configuration loaded")
        self.passes += 1
        try:
            result = self.checker.run(config, self.passes, self.args.quarantine or config.quarantine)
        except StopPass:
            return None
        self._summarize(result, config)
        return result

    def _summarize(self, result: PassResult, config: config_mod.Config) -> None:
        problems, repairs = result.counts()
        unresolved = result.unresolved
        if unresolved:
            kinds = sorted({f.kind for f in unresolved})
            status = "pass %d: %d problem(s) (%s); %d mounts, %d objects, %.2fs" % (
                result.number, len(unresolved), ", ".join(kinds), result.mounts, result.objects, result.duration)
        else:
            status = "pass %d: healthy; %d mounts, %d objects, %d repaired, %.2fs" % (
                result.number, result.mounts, result.objects, sum(repairs.values()), result.duration)
        fields: Dict[str, object] = {
            "pass": result.number, "healthy": 1 if result.healthy else 0, "findings": len(unresolved),
            "repairs": sum(repairs.values()), "objects": result.objects, "mounts": result.mounts,
            "signatures": result.signatures, "duration": "%.6f" % result.duration,
        }
        if config.textfile:
            text = render(problems, repairs, result.healthy, result.duration, time.time(), result.objects,
                          result.mounts, self.passes, self.config_valid, result.signatures, result.expiries)
            try:
                write(config.textfile, text)
            except OSError as exc:
                self.journal.entry("check-failed", "cannot write the textfile %s: %s" % (config.textfile, exc),
                                   {"path": config.textfile, "pass": result.number})
        # Last: whoever waits for the summary (or STATUS=) finds the textfile up to date.
        self.journal.entry("pass-summary", status, fields)
        notify("STATUS=" + status)

    # -- the service loop -----------------------------------------------------------
    def serve(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)

        def on_signal(signum: int, _frame: object) -> None:
            if signum == signal.SIGHUP:
                self.reload_requested = True
            else:
                self.stopping = True

        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        if not self.load_config():
            notify("STATUS=configuration %s is invalid; waiting for a valid one (SIGHUP)" % self.args.config)
        notify("READY=1")
        self.watchdog.ping(force=True)
        while not self.stopping:
            if self.config is not None:
                self.run_pass()
            interval = self.config.interval if self.config is not None else 3600.0
            deadline = time.monotonic() + interval
            while not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                limit = self.watchdog.sleep_limit()
                try:
                    select.select([wake_r], [], [], min(left, limit) if limit else left)
                except InterruptedError:
                    pass
                _drain(wake_r)
                self.watchdog.ping()
                if self.reload_requested:
                    self.reload_requested = False
                    notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
                    self.load_config()
                    notify("READY=1")
                    break
        notify("STOPPING=1")
        return 0


def _signatures_note(config: config_mod.Config) -> str:
    """What the config-loaded entry says about signed refs (nothing when none is configured)."""
    signed = config.signed_mounts
    if not signed:
        return ""
    try:
        empty = config_mod.load_policy(config).empty
    except Exception:  # pylint: disable=broad-except  # each pass reports unusable keys as a finding
        empty = False
    if empty:
        return "; signatures of %d refs NOT checked: no public key in %s" % (len(signed), ", ".join(config.trusted_keys))
    return "; signatures of %d refs checked" % len(signed)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _load(path: str) -> config_mod.Config:
    """config.load(), with any failure a ConfigError.

    A reload must keep the running configuration whatever is wrong with the
    new file, and --check-config must exit 2, never with a traceback: an
    error that validation did not foresee is still an invalid configuration.
    """
    try:
        return config_mod.load(path)
    except config_mod.ConfigError:
        raise
    except Exception as exc:  # any failure: see above
        raise config_mod.ConfigError(path, ["cannot validate it: %s: %s" % (type(exc).__name__, exc)]) from None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.check_config:
        try:
            config = _load(args.config)
        except config_mod.ConfigError as exc:
            print("composefs-fleet-agent: invalid configuration %s:" % exc.path, file=sys.stderr)
            for problem in exc.problems:
                print("  " + problem, file=sys.stderr)
            return EXIT_CONFIG
        print("%s: valid (%d stores, %d mounts, every %gs)"
              % (config.path, len(config.stores), len(config.mounts), config.interval))
        return EXIT_HEALTHY
    journal = Journal(echo=args.once and not args.json, use_journal=not args.no_journal)
    agent = Agent(args, journal)
    if not args.once:
        journal.entry("agent-started", "composefs-fleet-agent started (pid %d)" % os.getpid(), {"path": args.config})
        return agent.serve()
    if not agent.load_config():
        return EXIT_CONFIG
    result = agent.run_pass()
    if result is None:
        return EXIT_FINDINGS
    if args.json:
        json.dump({"pass": result.number, "healthy": result.healthy, "objects": result.objects,
                   "mounts": result.mounts, "signatures": result.signatures, "duration": result.duration,
                   "expected": result.expected, "findings": [f.as_dict() for f in result.findings]}, sys.stdout, indent=1, sort_keys=True)
        print()
    return EXIT_HEALTHY if result.healthy else EXIT_FINDINGS
