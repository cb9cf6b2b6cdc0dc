"""Per-domain memory accounting: the size rules and the ledger behind the
``memory`` quota (hard) and its soft (warning) level.

cxenstored 4.17 (``xenstored_domain.c`` ``domain_memory_add``, callers in
``xenstored_core.c``, ``xenstored_watch.c``, ``xenstored_transaction.c``)
charges a domain for:

* every node it owns: the stored record (24-byte header, 8 bytes per
  permission entry, the value, the child names each with its NUL) plus the
  database key, i.e. the path without NUL (``do_tdb_write``);
* every watch of its connections: ``strlen(path) + strlen(token)``, the path
  resolved (absolute) (``add_watch``);
* every node record of its open transactions: a transaction keeps a private
  copy of each existing node it touches (read or write) and of each node it
  creates, under the key ``"<transaction generation>/<path>"``; those are
  charged to the transaction's connection, not to the nodes' owners
  (``get_acc_domid``).  They go away at the end of the transaction; a
  commit then charges the owners for the live records it changes.

Charges move with the records: a node changing owner (``SET_PERMS``) moves
its whole charge; a parent's record grows and shrinks with its child list,
charged to the parent's owner.  Removal, unwatch, transaction end and
connection close give the memory back; when a domain is released, its
nodes, watches and transactions go, and with them its whole charge.

A charge that is checked (``domain_memory_add_chk``: writes and new nodes,
new watches) is refused when the domain's total would *reach* the hard
quota (``>=``); refunds and the copies a transaction takes while reading
are never refused, nor is a commit.  Only unprivileged domains are
checked -- the domain charged, whoever asks: dom0 writing a guest's node
is refused when the guest is at its limit.  This module
tracks the unprivileged domains (every domid but 0) incrementally; dom0 is
exempt from the quota, so its figure is only computed on request
(:func:`recompute`), which keeps dom0's requests free of accounting work.

cxenstored also charges queued replies and watch events (16-byte header +
payload) until they are sent; here the daemon owns the queues and bounds
them with the ``outstanding`` quota, so they are not accounted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Collection, Iterable, Mapping, NamedTuple

if TYPE_CHECKING:  # (memory.py is imported by store.py: no run-time import back)
    from .connection import Connection
    from .perms import Perms
    from .store import Node

__all__ = [
    "MemoryLedger",
    "MemoryQuotaNotice",
    "RECORD_HEADER",
    "PERM_ENTRY",
    "children_len",
    "record_memory",
    "node_memory",
    "watch_memory",
    "transaction_tag",
    "creation_memory",
    "recompute",
]

#: ``sizeof(struct xs_tdb_record_hdr)``: u64 generation + 3 x u32, padded.
RECORD_HEADER = 24
#: ``sizeof(struct xs_permissions)``: domid + perms.
PERM_ENTRY = 8


def children_len(path: str, children: Collection[str]) -> int:
    """Bytes of the child list of the node at ``path`` (``childlen``): each
    name with its NUL.  ``children`` are the children's full paths, each
    ``path`` + "/" + name (just "/" + name under the root)."""
    # A child's path is longer than its entry (name + NUL) by len(path),
    # except under the root.
    extra = len(path) if path != "/" else 0
    return sum(map(len, children)) - extra * len(children)


def record_memory(path_len: int, value_len: int, nperms: int, childlen: int) -> int:
    """Memory charged for one stored node: record + database key."""
    return RECORD_HEADER + PERM_ENTRY * nperms + value_len + childlen + path_len


def node_memory(path: str, node: "Node") -> int:
    """Memory charged for ``node`` at ``path`` (its record + key)."""
    return RECORD_HEADER + PERM_ENTRY * len(node.perms) + len(node.value) + children_len(path, node.children) + len(path)


def watch_memory(path: str, token: bytes) -> int:
    """Memory charged for a watch: resolved path + token, without NULs."""
    return len(path) + len(token)


def transaction_tag(generation: int) -> int:
    """Extra key bytes of a transaction's node copy: cxenstored names it
    ``"<generation>/<path>"`` (the transaction's generation at its start)."""
    return len(str(generation)) + 1


def creation_memory(missing: list[str], value_len: int, nperms: int) -> tuple[int, int]:
    """Charges of creating ``missing`` (the new node first, then its missing
    ancestors upwards, as the engine collects them) below an existing node:
    ``(bytes of the new records, growth of the existing parent's child list)``.
    Each new ancestor holds one child name; only the new node holds the value."""
    total = value_len
    below = None
    for path in missing:
        total += RECORD_HEADER + PERM_ENTRY * nperms + len(path)
        if below is not None:
            total += len(below) - len(path)  # "/" + child name = child name + NUL
        below = path
    top = missing[-1]
    return total, len(top) - top.rfind("/")


class MemoryQuotaNotice(NamedTuple):
    """Effect: a domain's memory crossed its soft or hard quota (the warnings
    cxenstored writes to syslog).  ``exceeded``: crossed upwards (or, for
    ``"hard"``, a charge was refused); False: below that level again.  The
    engine has no clock: it reports every crossing, the I/O layer may
    rate-limit (cxenstored logs at most every 10 s)."""

    domid: int
    level: str  # "soft" | "hard"
    exceeded: bool

    @property
    def message(self) -> str:
        if self.exceeded:
            return f"Domain {self.domid} exceeds {self.level} memory quota"
        return f"Domain {self.domid} below {self.level} memory quota again"


class MemoryLedger:
    """Bytes charged per unprivileged domain (domid != 0).

    The store, the watch registry and the transaction overlays post every
    change with :meth:`add`; the engine asks :meth:`exceeds` before a
    checked charge.  ``quota`` (``domid -> (hard, soft)``, 0 = unlimited)
    and ``notify`` (receives :class:`MemoryQuotaNotice`) are set by the
    engine; without them the ledger only counts (e.g. while a store is
    rebuilt from a journal)."""

    __slots__ = ("by_domain", "refusals", "quota", "notify", "_soft", "_hard")

    def __init__(self) -> None:
        self.by_domain: dict[int, int] = {}
        #: Charges refused because of the hard quota (all domains).
        self.refusals = 0
        self.quota: Callable[[int], tuple[int, int]] | None = None
        self.notify: Callable[[MemoryQuotaNotice], None] | None = None
        self._soft: set[int] = set()  # domains reported over their soft level
        self._hard: set[int] = set()  # ... over (or refused at) their hard level

    def usage(self, domid: int) -> int:
        return self.by_domain.get(domid, 0)

    def add(self, domid: int, delta: int) -> None:
        """Post a charge (``delta > 0``) or a refund; never refused."""
        total = self.by_domain.get(domid, 0) + delta
        if total:
            self.by_domain[domid] = total
        else:
            self.by_domain.pop(domid, None)
        if self.quota is not None:
            self._levels(domid, total, delta)

    def exceeds(self, domid: int, delta: int, hard: int) -> bool:
        """``domain_memory_add_chk``: would charging ``delta`` bring ``domid``
        to its ``hard`` quota?  (Checked even for a shrinking write: a domain
        at its limit cannot rewrite its nodes either.)  Records the refusal."""
        if not hard or self.by_domain.get(domid, 0) + delta < hard:
            return False
        self.refusals += 1
        if domid not in self._hard:
            self._hard.add(domid)
            self._tell(MemoryQuotaNotice(domid, "hard", True))
        return True

    # -- node records of the live store (called by Store.put/delete) ---------

    def node_created(self, path: str, value_len: int, perms: "Perms", parent_owner: int, entry_len: int) -> None:
        """A new leaf ``path`` and its parent's child list, ``entry_len``
        bytes longer (its name and NUL)."""
        if perms.owner:
            self.add(perms.owner, RECORD_HEADER + PERM_ENTRY * len(perms) + value_len + len(path))
        if parent_owner:
            self.add(parent_owner, entry_len)

    def node_updated(self, path: str, node: "Node", value_len: int, perms: "Perms") -> None:
        """``node`` (still unchanged) gets a new value and permissions."""
        old = node.perms
        if old.owner == perms.owner:
            self.add(perms.owner, value_len - len(node.value) + PERM_ENTRY * (len(perms) - len(old)))
            return
        size = node_memory(path, node)
        if old.owner:
            self.add(old.owner, -size)
        if perms.owner:
            self.add(perms.owner, size + value_len - len(node.value) + PERM_ENTRY * (len(perms) - len(old)))

    def node_removed(self, path: str, node: "Node") -> None:
        """``node`` is deleted (its children are deleted too, separately)."""
        self.add(node.perms.owner, -node_memory(path, node))

    # -- soft/hard level reports ------------------------------------------

    def _levels(self, domid: int, total: int, delta: int) -> None:
        hard, soft = self.quota(domid)
        if soft and total >= soft:
            if domid not in self._soft:
                self._soft.add(domid)
                self._tell(MemoryQuotaNotice(domid, "soft", True))
        elif domid in self._soft:
            self._soft.discard(domid)
            self._tell(MemoryQuotaNotice(domid, "soft", False))
        if hard and total >= hard:
            if domid not in self._hard:
                self._hard.add(domid)
                self._tell(MemoryQuotaNotice(domid, "hard", True))
        elif domid in self._hard and delta < 0:
            # Re-armed by a release only, so that a refusal followed by a
            # smaller successful charge does not report twice.
            self._hard.discard(domid)
            self._tell(MemoryQuotaNotice(domid, "hard", False))

    def _tell(self, notice: MemoryQuotaNotice) -> None:
        if self.notify is not None:
            self.notify(notice)


def recompute(nodes: Mapping[str, "Node"], connections: Iterable["Connection"]) -> dict[int, int]:
    """Every domain's memory (dom0 included) computed from scratch: the
    nodes each owns, the watches and open transactions of its connections.
    The reference the incremental ledger must always agree with."""
    totals: dict[int, int] = {}
    for path, node in nodes.items():
        owner = node.perms.owner
        totals[owner] = totals.get(owner, 0) + node_memory(path, node)
    for conn in connections:
        mem = sum(watch_memory(path, token) for path, token in conn.watches)
        for tx in conn.transactions.values():
            mem += sum(node_memory(p, n) + tx.tag for p, n in tx.nodes.items() if n is not None)
        if mem:
            totals[conn.domid] = totals.get(conn.domid, 0) + mem
    return totals
