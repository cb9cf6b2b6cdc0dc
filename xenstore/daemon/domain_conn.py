"""One introduced guest's connection: its XenStore ring page and event channel.

xenstored's side of xenstore-ring.txt.  :meth:`DomainConnection.service` is
one pump step, run whenever the event channel fires:

1. a reconnection request (``connection == 1``, feature bit 0) resets the
   connection: partial packets, queued output, watches and transactions
   go, both queues restart at index 0, ``connection`` goes back to 0;
2. queued output (replies, watch events) is copied into ``rsp``; events
   the guest left there longer than ``event_timeout`` (not yet started)
   are dropped first, as cxenstored's ``-w watch-event=`` does;
3. request bytes are taken from ``req`` and parsed, and complete requests
   are submitted to the daemon in one batch, but only while fewer than the
   ``outstanding`` quota of replies wait undelivered (back-pressure: a guest
   that does not read its replies is not read either, cxenstored
   ``domain_can_read``);
4. if any byte moved in either direction, the guest is notified (there is
   no event-index hold-off on this ring: always notify).

Replies and events come back through :meth:`deliver` (the daemon routes the
engine's output for this connection there), which queues and writes them.

A guest that publishes impossible indices gets ``error = RINGIDX``, one
announcing a payload over 4096 bytes ``error = PROTO`` (when the ERROR
feature is offered to it), a notification, and is no longer served: its
engine connection goes, the domain stays introduced until RELEASE or death,
as cxenstored's ``ignore_connection``.  Other guests are not affected.

No waiting here: the daemon's loop calls :meth:`DomainConnection.on_event`
when the channel's eventfd is readable.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import trio

from ringbuf.byte_ring import XenstoreRing
from ringbuf.evtchn import EventChannel
from ringbuf.layouts.xenstore import (
    XENSTORE_ERROR_COMM,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_SERVER_FEATURE_ERROR,
)
from ringbuf.ring import RingIndexError

from ..wire import Op, Packet, PacketReader, ProtocolError
from .outqueue import OutputQueue

__all__ = ["DomainConnection"]

log = logging.getLogger("xenstored")

_WATCH_EVENT = int(Op.WATCH_EVENT)
#: Request bytes taken from one ring per service pass (a guest that keeps
#: the ring full must not monopolise the daemon's loop).
_READ_BUDGET = 16 << 10
#: Written to our own eventfd to make the channel pending again.
_ONE = (1).to_bytes(8, "little")
_monotonic = time.monotonic


class DomainConnection:
    """The daemon's end of one guest's ring.

    ``conn`` is the guest's (unprivileged) engine connection; callbacks:
    ``submit(conn, packets)`` runs requests through the engine, journals,
    and routes the output (this connection's comes back via
    :meth:`deliver`); ``reset(conn) -> conn`` replaces the engine connection
    by a fresh one (reconnection); ``drop(conn)`` forgets it (after an
    error).  ``outstanding_limit()`` is read live (quotas change at run time).
    """

    def __init__(
        self,
        domid: int,
        conn: Any,
        ring: XenstoreRing,
        channel: EventChannel,
        *,
        submit: Callable[[Any, list[Packet]], None],
        reset: Callable[[Any], Any],
        drop: Callable[[Any], None],
        outstanding_limit: Callable[[], int],
        event_limit: int = 1 << 20,
        event_timeout: float = 20.0,
    ) -> None:
        self.domid = domid
        self.conn = conn
        self.ring = ring
        self.channel = channel
        self._submit = submit
        self._reset = reset
        self._drop = drop
        self._outstanding_limit = outstanding_limit
        self.reader = PacketReader()
        self.queue = OutputQueue(event_limit)
        #: cxenstored ``-w watch-event=``: seconds an event may wait for the
        #: guest to take it before it is dropped (0: never).
        self.event_timeout = event_timeout
        #: False once the guest misbehaved (until re-introduced) or we closed.
        self.serving = True
        self.closed = False
        #: XENSTORE_ERROR_* this connection was dropped with (0 = none).
        self.error = 0
        self.requests = 0
        self._in_service = False

    # -- output ----------------------------------------------------------------

    def deliver(self, packet: Packet) -> None:
        """Queue a reply or watch event for the guest and write what fits."""
        if not self.serving:
            return
        try:
            data = packet.encode()
        except ValueError:  # over 4096 bytes
            if packet.op == _WATCH_EVENT:
                return  # dropped, as cxenstored does
            data = Packet(Op.ERROR, packet.req_id, packet.tx_id, b"E2BIG\0").encode()
        if packet.op == _WATCH_EVENT:
            timeout = self.event_timeout
            self.queue.push_event(data, _monotonic() + timeout if timeout else None)
        else:
            self.queue.push_replies(data)
        if self._in_service:
            return  # written, with one notification, when service() ends
        try:
            if self._write_output():
                self.channel.notify()
        except RingIndexError as exc:
            self._fail(XENSTORE_ERROR_RINGIDX, str(exc))

    def _write_output(self) -> bool:
        """Copy queued output into ``rsp``; True if any byte moved."""
        queue = self.queue
        if queue.next_expiry is not None:
            queue.drop_expired(_monotonic())
        moved = False
        while queue.size:
            sent = self.ring.write(queue.peek(1024))
            if not sent:
                break
            queue.consume(sent)
            moved = True
        return moved

    # -- the pump step -----------------------------------------------------------

    def service(self) -> None:
        """Move bytes both ways and serve complete requests (see module doc)."""
        if not self.serving:
            return
        moved = False
        batch: list[Packet] = []
        self._in_service = True
        try:
            if self.ring.reconnect_requested():
                self._reconnect()
                return
            self.ring.writable()  # validates rsp indices even with nothing to send
            moved = self._write_output()
            limit = self._outstanding_limit()
            reader = self.reader
            budget = _READ_BUDGET
            while True:
                while self.queue.replies + len(batch) < limit:
                    packet = reader.next_packet()
                    if packet is not None:
                        batch.append(packet)
                        continue
                    if budget <= 0:
                        # Fairness: others get the loop; come back next iteration.
                        os.write(self.channel.wait_fd, _ONE)
                        break
                    data = self.ring.read()
                    if not data:
                        break
                    moved = True
                    budget -= len(data)
                    reader.feed(data)
                if not batch:
                    break
                self.requests += len(batch)
                submitted, batch = batch, []
                self._submit(self.conn, submitted)  # replies are queued via deliver()
                if not self.serving:
                    return
                moved = self._write_output() or moved
        except RingIndexError as exc:
            self._fail(XENSTORE_ERROR_RINGIDX, str(exc))
        except ProtocolError as exc:
            if batch:  # the requests before the bad header are answered
                self._submit(self.conn, batch)
                try:
                    self._write_output()
                except RingIndexError:
                    pass
            self._fail(XENSTORE_ERROR_PROTO, str(exc))
        else:
            if moved:
                self.channel.notify()
        finally:
            self._in_service = False

    def _reconnect(self) -> None:
        """Server side of the guest-initiated reconnection handshake."""
        log.info("domain %d: ring reconnection", self.domid)
        self.reader = PacketReader()
        self.queue.clear()
        self.conn = self._reset(self.conn)
        self.ring.complete_reconnect()
        self.channel.notify()

    def restart(self, conn: Any) -> None:
        """Re-introduction: start over on the same page with ``conn`` (the
        engine already dropped the old one's watches and transactions);
        indices restart at 0 like cxenstored's ``domain_conn_reset``."""
        self.conn = conn
        self.reader = PacketReader()
        self.queue.clear()
        self.ring.outgoing.reset(0)
        self.ring.incoming.reset(0)
        self.error = 0
        self.serving = not self.closed

    def _fail(self, code: int, reason: str) -> None:
        """The guest broke the protocol: tell it (error field) and stop serving it."""
        log.warning("domain %d: %s; no longer serving its ring", self.domid, reason)
        self.serving = False
        self.error = code
        self.queue.clear()
        if self.ring.server_features & XENSTORE_SERVER_FEATURE_ERROR:
            self.ring.set_error(code)
        try:
            self.channel.notify()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self._drop(self.conn)

    # -- wake-ups ------------------------------------------------------------------

    def on_event(self) -> None:
        """The event channel fired: clear it, then look at the page (the
        daemon's loop calls this when the channel's eventfd is readable)."""
        if self.closed:
            return
        try:
            self.channel.consume_nowait()
        except trio.ClosedResourceError:
            return
        try:
            self.service()
        except Exception:  # a bug must not take the daemon down: drop this guest
            log.exception("domain %d: ring service failed", self.domid)
            if self.serving:
                self._fail(XENSTORE_ERROR_COMM, "internal error")

    def close(self) -> None:
        """Stop serving (idempotent); the owner unmaps and unbinds."""
        self.closed = True
        self.serving = False
        self.queue.clear()

    def statistics(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "queued_bytes": self.queue.size,
            "queued_replies": self.queue.replies,
            "dropped_events": self.queue.dropped_events,
            "error": self.error,
        }
