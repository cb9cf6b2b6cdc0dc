"""Shared-memory rings, grant tables, event channels and the hypervisor service.

Each Xen domain is an ordinary Linux process; the ``uxen-hypervisor`` service
is the single authority for domains, their memory, grant tables and event
channels.  See the submodules for details.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names, by the submodule that defines them.  They are imported
# on first use (PEP 562): a process that needs one corner of the package
# -- xenstored without guests needs only ``_trio_util`` -- does not load
# ctypes, the hypervisor client and the ring layouts (2.4 MiB, 40 ms).
_EXPORTS: dict[str, tuple[str, ...]] = {
    # Event channels
    "evtchn": ("VIRQ_DOM_EXC", "EventChannel", "PeerClosedError", "eventfd_pair"),
    # Domain memory
    "memory": ("PAGE_SIZE", "DomainMemory", "FrameAllocator"),
    # Grant tables
    "grants": ("CopySegment", "CopySide", "GrantEntry", "GrantError", "GrantTableView"),
    # Hypervisor service client
    "hypervisor": (
        "DOMID_SELF",
        "DomainInfo",
        "GrantMapping",
        "HypervisorClient",
        "HypervisorError",
        "open_hypervisor",
    ),
    # Generic shared rings (ring.h)
    "ring": (
        "RING_IDX_MASK",
        "BackRing",
        "FrontRing",
        "RingFullError",
        "RingIndexError",
        "RingStatistics",
        "RingTypes",
        "SharedRing",
        "define_ring_types",
        "ring_size",
    ),
    # Byte rings (xenstore and console pages)
    "byte_ring": ("ByteQueue", "ByteRing", "ByteRingRole", "ConsoleRing", "XenstoreRing"),
    # Ring types of the split drivers
    "layouts": ("BLKIF_RING", "NETIF_CTRL_RING", "NETIF_RX_RING", "NETIF_TX_RING"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:  # a submodule not imported yet, as an eager package offers it
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # (the next lookup is a plain one)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
