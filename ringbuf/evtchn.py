"""Event channels: one-bit doorbells between two ports, built on Linux eventfds.

An event channel (Xen ``event_channel.h``) is an edge-style doorbell between
two ports.  Here every bound port owns one *eventfd* that it waits on; the port
notifies its peer by writing to the **peer's** eventfd.  The hypervisor
service creates the eventfds and hands them over with ``SCM_RIGHTS`` when a
port is allocated or bound, but it is never on the data path: ``notify()`` is
a single ``write(2)`` of 8 bytes straight into the peer's eventfd.

:class:`EventChannel` is the low-level, service-independent endpoint.  It can
be built from any two raw eventfds (:func:`eventfd_pair` builds a connected
pair inside one process, for tests and benchmarks; for two processes pass
the raw eventfds with ``pass_fds``, see :func:`eventfd_pair`)::

    a, b = eventfd_pair()
    a.notify()          # one syscall: write(b's eventfd, 1)
    await b.wait()      # trio.lowlevel.wait_readable + drain

Semantics (Xen's 2-level ABI, ``xen.h``):

* **Pending and coalescing.**  The kernel eventfd counter *is* the pending
  bit: N notifies before the receiver runs are drained by one read, so they
  cause one wake-up.  Never count events; drain the ring on every wake-up.
* **Receiver discipline.**  :meth:`EventChannel.wait` clears the pending bit
  as it returns (before you look at shared data), as Xen requires.
* **Mask.**  A masked port still accumulates pending (the peer's writes land
  in the eventfd), but :meth:`~EventChannel.wait` does not return while
  masked.  :meth:`~EventChannel.unmask` re-delivers: if the port is pending, a
  waiter wakes at once (like ``EVTCHNOP_unmask``).
* **Waiting** uses ``trio.lowlevel.wait_readable``: no threads, no polling.
  One task waits on a channel at a time (trio refuses a second waiter on
  the same fd with ``BusyResourceError``).
* **Ports that cannot send** (a VIRQ has no peer): :meth:`~EventChannel.notify`
  raises ``trio.BrokenResourceError``.
* **Closing.**  :meth:`~EventChannel.close` closes the local eventfds;
  a task blocked in :meth:`~EventChannel.wait` gets
  ``trio.ClosedResourceError``.
* **Peer gone.**  When the peer port is closed or its domain dies, whoever
  knows (the hypervisor client, from the service's notice; or the in-process
  peer made by :func:`eventfd_pair`) calls :meth:`~EventChannel.mark_peer_closed`.
  A blocked waiter then wakes and every :meth:`~EventChannel.wait` raises
  :class:`PeerClosedError` until the port is bound again
  (:meth:`~EventChannel.mark_peer_bound`).  :meth:`~EventChannel.notify` on a
  port whose peer is gone is silently dropped, as in Xen (the write lands in an
  eventfd nobody reads).  So neither side can hang forever on a dead peer,
  provided something delivers the "peer closed" fact.

This module is pure apart from the eventfd syscalls: no service, no sockets.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable

import trio

__all__ = [
    "EventChannel",
    "PeerClosedError",
    "PortBits",
    "eventfd_pair",
    "new_eventfd",
    "VIRQ_DOM_EXC",
]

#: Global VIRQ raised when some domain dies, shuts down or crashes [xen.h].
VIRQ_DOM_EXC = 3

# Written as-is on every notify: prebuilt so notify() allocates nothing.
_ONE = (1).to_bytes(8, "little")
_write = os.write  # bound once: notify() is the hot path


class PeerClosedError(trio.BrokenResourceError):
    """The remote port was closed (or its domain died); the port is unbound."""


def new_eventfd() -> int:
    """A fresh non-blocking, close-on-exec eventfd with counter 0."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


@dataclass
class PortBits:
    """Pure model of one port's pending/mask bits (Xen's 2-level ABI).

    Each method returns True when the operation raises an upcall (wakes the
    receiver).  This is the reference the eventfd implementation is tested
    against.
    """

    pending: bool = False
    masked: bool = False

    def send(self) -> bool:
        # A send on an already-pending port does nothing: coalescing.
        if self.pending:
            return False
        self.pending = True
        return not self.masked

    def mask(self) -> None:
        self.masked = True

    def unmask(self) -> bool:
        self.masked = False
        return self.pending

    def clear(self) -> None:
        self.pending = False

    def deliverable(self) -> bool:
        """Would a waiter wake now?"""
        return self.pending and not self.masked


class EventChannel:
    """One bound local port.

    ``wait_fd`` is the eventfd this port waits on (its pending bit);
    ``notify_fd`` is the peer port's eventfd (``None`` for a port that cannot
    send, e.g. a VIRQ).  Both must be non-blocking eventfds
    (:func:`new_eventfd`).  The channel owns both fds and closes them in
    :meth:`close` unless ``close_fds=False``.  ``on_close`` is called once,
    after the fds are closed (the hypervisor client uses it to tell the
    service).
    """

    __slots__ = (
        "port",
        "_wait_fd",
        "_notify_fd",
        "_close_fds",
        "_on_close",
        "_pending",
        "_masked",
        "_peer_closed",
        "_closed",
        "_unmasked",
    )

    def __init__(
        self,
        port: int,
        wait_fd: int,
        notify_fd: int | None,
        *,
        close_fds: bool = True,
        on_close: Callable[["EventChannel"], None] | None = None,
    ) -> None:
        self.port = port
        self._wait_fd = wait_fd
        self._notify_fd = -1 if notify_fd is None else notify_fd
        self._close_fds = close_fds
        self._on_close = on_close
        self._pending = False  # latched: an event drained by `pending`/`clear` checks
        self._masked = False
        self._peer_closed = False
        self._closed = False
        self._unmasked = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "peer-closed" if self._peer_closed else "open"
        return f"<EventChannel port={self.port} {state}{' masked' if self._masked else ''}>"

    # -- sending -------------------------------------------------------------

    def notify(self) -> None:
        """Set the peer port pending: exactly one ``write(2)``, never blocks."""
        try:
            _write(self._notify_fd, _ONE)
        except OSError as exc:
            if self._closed:
                raise trio.ClosedResourceError("event channel is closed") from None
            if exc.errno == errno.EBADF and self._notify_fd == -1:
                raise trio.BrokenResourceError(f"port {self.port} cannot send") from None
            raise

    # -- receiving -----------------------------------------------------------

    def _drain(self) -> bool:
        """Read the eventfd counter (non-blocking); True if it was non-zero."""
        try:
            os.read(self._wait_fd, 8)
        except BlockingIOError:
            return False
        return True

    @property
    def pending(self) -> bool:
        """Is the port pending?  Does not clear it."""
        self._check_open()
        if not self._pending:
            self._pending = self._drain()
        return self._pending

    def clear(self) -> None:
        """Clear the pending bit (drains the eventfd)."""
        self._check_open()
        self._drain()
        self._pending = False

    def consume_nowait(self) -> bool:
        """If pending and unmasked, clear pending and return True; never blocks."""
        self._check_open()
        if self._masked:
            return False
        if self._drain() or self._pending:
            self._pending = False
            return True
        return False

    async def wait(self) -> None:
        """Wait until the port is pending and unmasked, then clear pending.

        Raises :class:`PeerClosedError` if the peer is gone and
        ``trio.ClosedResourceError`` if this channel is closed meanwhile.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        slept = False
        while True:
            self._check_open()
            if self._peer_closed:
                raise PeerClosedError(f"peer of port {self.port} closed")
            if self._masked:
                await self._unmasked.park()
                slept = True
                continue
            # Drain first: the latch and the eventfd counter together are the
            # pending bit, and both must be cleared.
            if self._drain() or self._pending:
                self._pending = False
                if not slept:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            await trio.lowlevel.wait_readable(self._wait_fd)
            slept = True

    # -- mask ----------------------------------------------------------------

    @property
    def masked(self) -> bool:
        return self._masked

    def mask(self) -> None:
        """Stop deliveries; pending still accumulates."""
        self._check_open()
        self._masked = True

    def unmask(self) -> None:
        """Allow deliveries; a pending event wakes a waiter immediately."""
        self._check_open()
        self._masked = False
        self._unmasked.unpark_all()

    # -- peer state (fed by whoever knows about the peer) ----------------------

    @property
    def peer_closed(self) -> bool:
        return self._peer_closed

    def mark_peer_closed(self) -> None:
        """The peer port went away: wake waiters, make :meth:`wait` raise."""
        if self._closed or self._peer_closed:
            return
        self._peer_closed = True
        self._unmasked.unpark_all()
        # Wake a task blocked in wait_readable; it re-checks and raises.
        os.write(self._wait_fd, _ONE)

    def mark_peer_bound(self, notify_fd: int | None = None) -> None:
        """A (new) peer bound this port; optionally switch the notify target."""
        if self._closed:
            return
        if notify_fd is not None and notify_fd != self._notify_fd:
            if self._close_fds and self._notify_fd >= 0:
                os.close(self._notify_fd)
            self._notify_fd = notify_fd
        self._peer_closed = False

    # -- lifetime ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def wait_fd(self) -> int:
        return self._wait_fd

    @property
    def notify_fd(self) -> int | None:
        return None if self._notify_fd < 0 else self._notify_fd

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("event channel is closed")

    def close(self) -> None:
        """Close the port (idempotent).  Blocked waiters get ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        try:
            trio.lowlevel.notify_closing(self._wait_fd)
        except RuntimeError:
            pass  # not inside trio.run: nobody can be waiting on it
        self._unmasked.unpark_all()
        if self._close_fds:
            os.close(self._wait_fd)
            if self._notify_fd >= 0:
                os.close(self._notify_fd)
        self._notify_fd = -1
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

    def __enter__(self) -> "EventChannel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eventfd_pair(port_a: int = 1, port_b: int = 2) -> tuple[EventChannel, EventChannel]:
    """Two connected channels in one process (for tests and benchmarks).

    Each side owns its own copies of the fds (duplicated), so either can be
    closed independently; closing one marks the other peer-closed, which is
    what the hypervisor service does for ports of different processes.
    For two processes, build the channels from raw eventfds instead: create
    ``efd_a, efd_b = new_eventfd(), new_eventfd()``, keep
    ``EventChannel(1, efd_a, efd_b)`` and give the child ``efd_b, efd_a``
    (``pass_fds``) to build ``EventChannel(2, efd_b, efd_a)``.
    """
    efd_a = new_eventfd()
    efd_b = new_eventfd()
    chan_a = EventChannel(port_a, efd_a, os.dup(efd_b))
    chan_b = EventChannel(port_b, efd_b, os.dup(efd_a))
    chan_a._on_close = lambda _c: chan_b.mark_peer_closed()
    chan_b._on_close = lambda _c: chan_a.mark_peer_closed()
    return chan_a, chan_b
