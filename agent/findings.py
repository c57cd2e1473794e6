# -*- coding: utf-8 -*-
# Copyright: composefs-fleet contributors
# SPDX-License-Identifier: Apache-2.0
"""What the agent can find, and what it records about each finding.

Every kind has a fixed journal ``MESSAGE_ID`` (never change one: fleet
tooling filters on them, e.g. ``journalctl MESSAGE_ID=...``) and a syslog
priority.  Kinds marked as repairs are actions the agent took; they resolve
the finding they follow.  agent/README.md lists the same table.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

# syslog priorities (journal PRIORITY=)
CRIT, ERR, WARNING, NOTICE, INFO = 2, 3, 4, 5, 6


class Kind(NamedTuple):
    message_id: str
    priority: int
    repair: bool
    summary: str


KINDS: Dict[str, Kind] = {
    "pass-summary": Kind("24a7814eec2845ca8142b4718db5cd49", INFO, False, "one pass is over (counts)"),
    "agent-started": Kind("cd20dbc086664d7b8d4864f8045252a3", INFO, False, "the agent started"),
    "config-loaded": Kind("8f90b7ef3ad347e5b0e871405082b534", INFO, False, "a configuration was loaded"),
    "config-invalid": Kind("026b5d9017014431a186584485363c8c", ERR, False,
                           "a configuration was rejected (the last good one stays)"),
    "store-unreadable": Kind("f6307ff076094ab0b4bff46061eb30c3", ERR, False, "a store cannot be read"),
    "mount-missing": Kind("2fa84fb03c7444348ccb368fb3395fb3", ERR, False, "no composefs mount where one belongs"),
    "mount-remounted": Kind("e18148e91ec140deb9e3e1ce8c2c5182", NOTICE, True, "a missing mount was mounted again"),
    "mount-remount-failed": Kind("7479c9f51bfe46ba99c1d5c0a9193ed8", ERR, False, "mounting again failed"),
    "mount-wrong-image": Kind("840d84966e7c4a9abd64e312224cdfc6", CRIT, False, "a mount shows another image"),
    "mount-image-unknown": Kind("fe8992c2ca7e4b3699f4225089b1768e", WARNING, False,
                                "a composefs mount without a record: its image cannot be told"),
    "mount-history-missing": Kind("bb6a22b235a74af0b711ab9edd48f097", ERR, False,
                                  "neither a mount history nor the configuration says what a mount should show"),
    "mount-options-differ": Kind("a0d271ea1d474c25bf269e019ebfcee7", WARNING, False,
                                 "a mount's basedirs, upper/work directories or verity differ"),
    "image-missing": Kind("4f68d3bc625245188affb55c8374df5b", ERR, False, "an image file is missing"),
    "image-digest-mismatch": Kind("317d3ccb407b4f77831416eb6682b464", CRIT, False,
                                  "an image file's fs-verity digest is not the expected one"),
    "image-unreadable": Kind("0e381fcbc0244246bdbef5e3e8c7d94a", ERR, False, "an image file cannot be read"),
    "object-missing": Kind("3e7a332e72b443b79908bdacc301e7a7", ERR, False,
                           "an object a mounted image needs is in no basedir"),
    "object-unreadable": Kind("6b818e06b26547198d5d90ba16242692", ERR, False, "an object cannot be read"),
    "object-verity-missing": Kind("604f41696efb4e54b34b7c0ea6e996da", WARNING, False,
                                  "an object lacks fs-verity and it could not be enabled"),
    "object-verity-enabled": Kind("257ff05c071749318b0046dedb547005", NOTICE, True,
                                  "fs-verity was enabled on an object whose content matches its name"),
    "object-digest-mismatch": Kind("9127679380fa452286d88619f723bf75", CRIT, False,
                                   "an object's content does not match its name"),
    "object-quarantined": Kind("61d5bd90567347d18803e309f58b319d", NOTICE, True,
                               "a mismatching object was moved aside"),
    "signature-invalid": Kind("c84562bc059b477e82f2d8968bd1f313", ERR, False,
                              "a mounted ref's signature does not vouch for its image (COMPOSEFS_REASON says why)"),
    "signature-expired": Kind("f8e870bf92d749589c7286171ca9c198", WARNING, False,
                              "a mounted ref's signed statement has expired: sign it again"),
    "check-failed": Kind("b7d347472b264d03826045308170c77b", ERR, False, "a check failed unexpectedly"),
}

# Kinds that report a problem (counted per pass, in the textfile and the exit code).
PROBLEMS: List[str] = [k for k, v in KINDS.items()
                       if not v.repair and k not in ("pass-summary", "agent-started", "config-loaded")]
REPAIRS: List[str] = [k for k, v in KINDS.items() if v.repair]


class Finding:
    """One entry: a problem (``resolved`` once a repair followed) or a repair."""

    __slots__ = ("kind", "message", "fields", "resolved")

    def __init__(self, kind: str, message: str, fields: Optional[Dict[str, object]] = None) -> None:
        if kind not in KINDS:
            raise KeyError("unknown finding kind %r" % kind)
        self.kind = kind
        self.message = message
        self.fields = dict(fields or {})
        self.resolved = False

    @property
    def priority(self) -> int:
        return KINDS[self.kind].priority

    @property
    def message_id(self) -> str:
        return KINDS[self.kind].message_id

    def as_dict(self) -> Dict[str, object]:
        return {"kind": self.kind, "message": self.message, "resolved": self.resolved,
                "fields": dict(self.fields)}
