"""The service's table of domains: domid allocation and life cycle.  Pure.

Life cycle (like Xen): *running* → optionally *shutdown* (the domain asked,
with a reason) → *dying* (killed, or its process went away; its resources
are being torn down) → gone (removed from the table once nobody maps its
pages any more).  Domain 0 is created with the service and never dies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "DOMID_FIRST_RESERVED", "DOMID_SELF", "DOMID_INVALID",
    "SHUTDOWN_poweroff", "SHUTDOWN_reboot", "SHUTDOWN_suspend", "SHUTDOWN_crash",
    "SHUTDOWN_watchdog", "DomainInfo", "Domain", "DomainTable",
]

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_INVALID = 0x7FF4

SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4


class DomainInfo(NamedTuple):
    """What ``xc_domain_getinfo`` tells: enough for xenstored's scan."""

    domid: int
    dying: bool
    shutdown: bool
    shutdown_reason: int | None
    nr_pages: int
    grant_frames: int
    privileged: bool


@dataclass
class Domain:
    domid: int
    nr_pages: int
    grant_frames: int
    privileged: bool = False
    dying: bool = False
    shutdown_reason: int | None = None

    def info(self) -> DomainInfo:
        return DomainInfo(self.domid, self.dying, self.shutdown_reason is not None,
                          self.shutdown_reason, self.nr_pages, self.grant_frames, self.privileged)


class DomainTable:
    """Domains by id.  New ids come from a rover, like Xen, so a recently
    destroyed domain's id is not handed out again at once."""

    def __init__(self) -> None:
        self._domains: dict[int, Domain] = {}
        self._rover = 0

    def __contains__(self, domid: int) -> bool:
        return domid in self._domains

    def __len__(self) -> int:
        return len(self._domains)

    def get(self, domid: int) -> Domain | None:
        return self._domains.get(domid)

    def create_dom0(self, nr_pages: int, grant_frames: int) -> Domain:
        if 0 in self._domains:
            raise ValueError("dom0 exists")
        dom = Domain(0, nr_pages, grant_frames, privileged=True)
        self._domains[0] = dom
        return dom

    def create(self, nr_pages: int, grant_frames: int) -> Domain:
        """A new guest with the next free id in 1..0x7FEF (ENOSPC if none)."""
        domid = self._rover
        for _ in range(DOMID_FIRST_RESERVED - 1):
            domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if domid not in self._domains:
                self._rover = domid
                dom = Domain(domid, nr_pages, grant_frames)
                self._domains[domid] = dom
                return dom
        raise OSError(28, "no free domain ids")  # ENOSPC

    def remove(self, domid: int) -> None:
        del self._domains[domid]

    def infos(self) -> list[DomainInfo]:
        return [self._domains[d].info() for d in sorted(self._domains)]
