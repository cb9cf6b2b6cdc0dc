"""The PV console: XenStore keys and ring semantics (``io/console.h``,
``docs/misc/console.txt``, libxl ``libxl_console.c``, Linux ``hvc_xen.c``).

Two kinds of console share one page format:

* the *primary* console (device 0): the domain builder allocates the page
  and an event channel; the toolstack writes ``ring-ref`` (a page frame
  number, **not** a grant reference) and ``port`` into the read-only
  frontend directory ``/local/domain/<F>/console``; there is no XenBus
  negotiation on the frontend side;
* secondary consoles / channels (``device/console/<n>``, n >= 1): a normal
  XenBus device.  The frontend allocates a zeroed page, grants it to the
  backend, allocates an unbound event channel, writes ``ring-ref`` and
  ``port`` (the console uses ``port``, not ``event-channel``) in one
  transaction and switches to ``Initialised`` without waiting for the
  backend's ``InitWait`` (the shortcut blkif.h permits); it switches to
  ``Connected`` when the backend is ``Connected``.

The page is ``struct xencons_interface``: ``in[1024]`` (backend -> guest,
keyboard input), ``out[2048]`` (guest -> backend, console output), the four
``uint32`` indices ``in_cons, in_prod, out_cons, out_prod`` and, since Xen
4.21, a ``connection`` byte the backend sets to ``XENCONSOLE_CONNECTED`` (0)
once it services the page.  The byte-ring transfer itself (free-running
indices, masking, the corrupt-index check) lives in
:mod:`ringbuf.byte_ring` (``ConsoleRing``); this module re-exports its
layout constants so console users need one import, and adds the helpers
that do not touch shared memory.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

from ringbuf.layouts.console import (
    XENCONS_IN_SIZE,
    XENCONS_OUT_SIZE,
    XENCONSOLE_CONNECTED,
    XENCONSOLE_DISCONNECTED,
    XenconsInterface,
)

from .handshake import HandshakeError, Values, read_uint
from .paths import DeviceId

__all__ = [
    "XENCONS_IN_SIZE",
    "XENCONS_OUT_SIZE",
    "XENCONSOLE_CONNECTED",
    "XENCONSOLE_DISCONNECTED",
    "XenconsInterface",
    "CONSOLE_PROTOCOL",
    "CONSOLE_LIMIT",
    "ConsoleBackendType",
    "mask_index",
    "ConsoleRingInfo",
    "console_frontend_entries",
    "console_backend_entries",
]

#: ``LIBXL_XENCONSOLE_PROTOCOL``: the only console protocol.
CONSOLE_PROTOCOL = "vt100"
#: ``LIBXL_XENCONSOLE_LIMIT``: bytes xenconsoled buffers per console.
CONSOLE_LIMIT = 1048576


class ConsoleBackendType:
    """Values of the frontend's ``type`` key: which daemon serves it."""

    XENCONSOLED = "xenconsoled"
    IOEMU = "ioemu"


def mask_index(index: int, size: int) -> int:
    """``MASK_XENCONS_IDX``: the slot of free-running ``index`` in a ring of
    ``size`` (a power of two) bytes."""
    if size <= 0 or size & (size - 1):
        raise ValueError(f"ring size must be a power of two, got {size}")
    return index & (size - 1)


@dataclass(frozen=True)
class ConsoleRingInfo:
    """``ring-ref`` and ``port`` of a console's frontend directory.

    For the primary console the toolstack writes them and ``ring_ref`` is a
    frame number; for secondary consoles the frontend writes them and
    ``ring_ref`` is a grant reference.  Either way the backend parses them
    with :meth:`of_assoc`.
    """

    ring_ref: int
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.ring_ref <= 0xFFFFFFFFFFFFFFFF or not 0 <= self.port <= 0xFFFFFFFF:
            raise ValueError(f"invalid console ring info {self!r}")

    def to_assoc(self) -> dict[str, str]:
        return {"ring-ref": str(self.ring_ref), "port": str(self.port)}

    @classmethod
    def of_assoc(cls, values: Values) -> ConsoleRingInfo:
        ring_ref = read_uint(values, "ring-ref", maximum=0xFFFFFFFFFFFFFFFF)
        port = read_uint(values, "port")
        if port == 0:
            # Port 0 is never a valid event channel.
            raise HandshakeError(_errno.EINVAL, "console port 0", "port")
        return cls(ring_ref, port)


def console_frontend_entries(
    device: DeviceId,
    *,
    backend_type: str = ConsoleBackendType.XENCONSOLED,
    output: str = "pty",
    name: str | None = None,
    tty: str = "",
    ring: ConsoleRingInfo | None = None,
) -> dict[str, str]:
    """What the toolstack writes into a console's frontend directory.

    ``ring`` is given for the primary console (built by the domain
    builder); secondary consoles get ``state = 1`` and ``protocol``
    instead and publish their ring themselves.
    """
    if device.kind != "console":
        raise ValueError(f"not a console: {device!r}")
    out = dict(device.frontend_links())
    if name is not None:
        out["name"] = name
    out["limit"] = str(CONSOLE_LIMIT)
    out["type"] = backend_type
    out["output"] = output
    out["tty"] = tty
    if ring is not None:
        out.update(ring.to_assoc())
    else:
        out["protocol"] = CONSOLE_PROTOCOL
    return out


def console_backend_entries(
    device: DeviceId,
    *,
    name: str | None = None,
    connection: str | None = None,
    path: str | None = None,
) -> dict[str, str]:
    """What the toolstack writes into a console's backend directory."""
    if device.kind != "console":
        raise ValueError(f"not a console: {device!r}")
    out = dict(device.backend_links())
    out["protocol"] = CONSOLE_PROTOCOL
    if name is not None:
        out["name"] = name
    if connection is not None:
        out["connection"] = connection
    if path is not None:
        out["path"] = path
    return out
