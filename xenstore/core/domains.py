"""The domain table: introduced domains, targets, features, quota overrides,
and the side effects the I/O layer must carry out for them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from .perms import Perms

__all__ = [
    "Domain",
    "DomainTable",
    "Introduced",
    "Released",
    "DOMID_FIRST_RESERVED",
    "DOMID_SELF",
    "FEATURE_RECONNECTION",
    "FEATURE_ERROR",
    "SUPPORTED_FEATURES",
]

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0

FEATURE_RECONNECTION = 1
FEATURE_ERROR = 2
#: Ring features this implementation offers (xs_wire.h bits 0 and 1).
SUPPORTED_FEATURES = FEATURE_RECONNECTION | FEATURE_ERROR


class Introduced(NamedTuple):
    """Effect: map the domain's ring page and bind its event channel.
    Also produced for a re-introduction (rebind after resume).

    ``pending``: for a new domain of an engine that defers introductions
    (``Engine.defer_introduce``), the opaque token the I/O layer hands back
    to ``Engine.complete_introduce`` once mapping and binding succeeded or
    failed; the INTRODUCE reply waits until then.  ``None``: nothing waits
    (the reply was sent already)."""

    domid: int
    gfn: int
    port: int
    pending: int | None = None


class Released(NamedTuple):
    """Effect: the domain is gone (RELEASE or death): drop its ring
    connection, unbind and unmap."""

    domid: int


@dataclass(slots=True)
class Domain:
    domid: int
    introduced: bool = False
    #: A deferred INTRODUCE waits for the I/O layer (not yet introduced).
    introducing: bool = False
    gfn: int | None = None
    port: int | None = None
    target: int | None = None
    features: int = SUPPORTED_FEATURES
    #: The store generation when xenstored first knew the domain (cxenstored
    #: ``domain->generation``): ACL entries naming it count only in nodes
    #: written since, so a new domain reusing a dead one's domid does not
    #: inherit its rights.
    generation: int = 0
    #: @releaseDomain already fired for the current shutdown (cleared by RESUME).
    shutdown_reported: bool = False
    #: Per-domain quota overrides (SET_QUOTA <domid> ...), Xen 4.17 names;
    #: ("memory", True) style keys for soft values.
    quotas: dict[tuple[str, bool], int] = field(default_factory=dict)


class DomainTable:
    """Domains xenstored knows.  ``domain_exists`` answers for the hypervisor
    (which domids exist at all); dom0 is introduced from the start."""

    __slots__ = ("_domains", "_exists", "introduce_perms", "release_perms")

    def __init__(self, domain_exists: Callable[[int], bool]) -> None:
        self._exists = domain_exists
        self._domains: dict[int, Domain] = {0: Domain(0, introduced=True)}
        #: Permission sets of the special watches (SET_PERMS @introduceDomain...).
        self.introduce_perms = Perms.owned_by(0)
        self.release_perms = Perms.owned_by(0)

    def exists(self, domid: int) -> bool:
        """Does the hypervisor know this domain (reserved ids never exist)?"""
        if domid in self._domains:
            return True
        return 0 <= domid < DOMID_FIRST_RESERVED and bool(self._exists(domid))

    def get(self, domid: int) -> Domain | None:
        return self._domains.get(domid)

    def find_or_alloc(self, domid: int, generation: int) -> Domain | None:
        """cxenstored ``find_or_alloc_existing_domain``; a new record is
        known from store generation ``generation`` on."""
        domain = self._domains.get(domid)
        if domain is None and self.exists(domid):
            domain = self._domains[domid] = Domain(domid, generation=generation)
        return domain

    def known_at(self, domid: int, generation: int) -> bool:
        """Was ``domid`` known when the store was at ``generation``
        (cxenstored ``chk_domain_generation``)?  An unknown domain: no."""
        domain = self._domains.get(domid)
        return domain is not None and domain.generation <= generation

    def is_introduced(self, domid: int) -> bool:
        domain = self._domains.get(domid)
        return domain is not None and domain.introduced

    def forget(self, domid: int) -> None:
        self._domains.pop(domid, None)
        self.introduce_perms = self.introduce_perms.without_domain(domid)
        self.release_perms = self.release_perms.without_domain(domid)

    def special_perms(self, name: str) -> Perms | None:
        if name == "@introduceDomain":
            return self.introduce_perms
        if name == "@releaseDomain":
            return self.release_perms
        return None

    def set_special_perms(self, name: str, perms: Perms) -> None:
        if name == "@introduceDomain":
            self.introduce_perms = perms
        else:
            self.release_perms = perms

    def __iter__(self):
        return iter(list(self._domains.values()))
