"""Quota configuration with cxenstored's names, defaults and texts.

One :class:`Limits` object per daemon, passed to the engine; it is mutable at
run time (``CONTROL quota set``, ``SET_QUOTA``).  Per-domain overrides
(``SET_QUOTA <domid> ...``) live in the domain table, not here.

Quotas bind unprivileged connections only (privileged ones are exempt, as
in Xen).  A value of 0 disables a check.  Counting quotas are checked as
"current count >= quota -> refuse" *before* adding, so a domain gets at most
``quota`` watches/transactions/nodes; cxenstored 4.17 checks ``>`` and lets
one more through (documented off-by-one we deliberately do not copy).

``outstanding`` is enforced by the daemon's per-connection queues; the
engine only carries the value.  ``memory`` (hard) and its soft level are
the engine's: memory.py accounts every unprivileged domain's nodes, watches
and transactions as cxenstored 4.17 does; a charge that would bring such
a domain to the hard value is refused -- whoever asks: dom0 writing a node
a guest owns charges the guest -- while crossing the soft value is only
reported (``MemoryQuotaNotice`` effect).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "QUOTA_NAMES", "WIRE_QUOTA_NAMES"]

# name: (attribute, default, description) in `xenstore-control quota` order.
_HARD = {
    "nodes": ("nodes", 1000, "Nodes per domain"),
    "watches": ("watches", 128, "Watches per domain"),
    "transactions": ("transactions", 10, "Transactions per domain"),
    "outstanding": ("outstanding", 20, "Outstanding requests per domain"),
    "transaction-nodes": ("transaction_nodes", 1024, "Max. number of accessed nodes per transaction"),
    "memory": ("memory", 2621440, "Total Xenstore memory per domain (error level)"),
    "node-size": ("node_size", 2048, "Max. size of a node"),
    "path-max": ("path_max", 2048, "Max. length of a node path"),
    "permissions": ("permissions", 5, "Max. number of permissions per node"),
}
_SOFT = {
    "memory": ("memory_soft", 2097152, "Total Xenstore memory per domain (warning level)"),
}

#: The names ``CONTROL quota set`` accepts (cxenstored 4.17).
QUOTA_NAMES: tuple[str, ...] = tuple(_HARD)

# GET_QUOTA/SET_QUOTA (cxenstored >= 4.22) names -> (4.17 name, soft?).
_WIRE = {
    "nodes": ("nodes", False),
    "watches": ("watches", False),
    "outstanding": ("outstanding", False),
    "memory": ("memory", False),
    "soft-memory": ("memory", True),
    "transactions": ("transactions", False),
    "transaction-nodes": ("transaction-nodes", False),
    "node-permissions": ("permissions", False),
    "path-max": ("path-max", False),
    "node-size": ("node-size", False),
}
#: The names ``GET_QUOTA`` lists, in its order.
WIRE_QUOTA_NAMES: tuple[str, ...] = tuple(_WIRE)


@dataclass(slots=True)
class Limits:
    """cxenstored quotas (hard values, plus the soft memory level)."""

    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    outstanding: int = 20
    transaction_nodes: int = 1024
    memory: int = 2621440
    node_size: int = 2048
    path_max: int = 2048
    permissions: int = 5
    memory_soft: int = 2097152

    # -- access by Xen name -------------------------------------------------

    def get(self, name: str, soft: bool = False) -> int:
        """Value by cxenstored name (``"transaction-nodes"``...); KeyError if unknown."""
        return getattr(self, (_SOFT if soft else _HARD)[name][0])

    def set(self, name: str, value: int, soft: bool = False) -> None:
        """Set by cxenstored name, as ``-Q name=value`` / ``quota set`` do."""
        if value < 0:
            raise ValueError(f"quota {name} must be >= 0")
        setattr(self, (_SOFT if soft else _HARD)[name][0], value)

    @staticmethod
    def is_name(name: str, soft: bool = False) -> bool:
        return name in (_SOFT if soft else _HARD)

    @staticmethod
    def from_wire_name(name: str) -> tuple[str, bool] | None:
        """``(cxenstored 4.17 name, soft?)`` for a GET/SET_QUOTA name (accepts
        the 4.17 spelling ``permissions`` too), ``None`` if unknown."""
        if name == "permissions":
            return ("permissions", False)
        return _WIRE.get(name)

    # -- texts of `xenstore-control quota` / `quota-soft` -----------------------

    def describe(self, soft: bool = False) -> str:
        table = _SOFT if soft else _HARD
        lines = ["Quota settings:\n"]
        for name, (attr, _, text) in table.items():
            lines.append(f"{name:<17}: {getattr(self, attr):8d} {text}\n")
        return "".join(lines)
