"""The bounded queue of bytes waiting to be written to one connection.

Sans-IO: the server pushes encoded replies and watch events, asks for the
bytes to send with :meth:`OutputQueue.peek`, and reports what the socket
took with :meth:`OutputQueue.consume`.

Bounds: replies are never dropped (the server stops *reading* a connection
whose queue is over its high-water mark, so replies cannot pile up), but
watch events are pushed by other connections' writes, which must not block
on a client that stopped reading; so an event is dropped when

* it is longer than a message may be (cxenstored drops it too),
* an identical event (same path and token) is queued and not yet started
  (cxenstored's rule; not for ``@`` special events),
* or the queue already holds ``event_limit`` bytes (our bound: a client
  that never reads cannot grow the daemon's memory);

and an event pushed with a deadline is dropped if it has not started to
be sent by then (cxenstored ``-w watch-event=``: a guest's events go
after 20 s): :meth:`OutputQueue.drop_expired`.
"""

from __future__ import annotations

from collections import deque

from ..wire import HEADER, PAYLOAD_MAX

__all__ = ["OutputQueue"]

_MAX_MESSAGE = HEADER.size + PAYLOAD_MAX


class OutputQueue:
    """Bytes queued for one connection, in the order they must be sent."""

    __slots__ = (
        "_chunks",
        "_head_sent",
        "_unstarted_events",
        "size",
        "replies",
        "event_limit",
        "dropped_events",
        "next_expiry",
    )

    def __init__(self, event_limit: int = 1 << 20) -> None:
        # Each entry: [data, number of replies in it, event dedup key or
        # None, deadline or None]; the last two go once sending starts.
        self._chunks: deque[list] = deque()
        self._head_sent = 0
        self._unstarted_events: set[bytes] = set()
        #: Bytes queued and not yet sent.
        self.size = 0
        #: Replies queued and not yet completely sent ("outstanding").
        self.replies = 0
        self.event_limit = event_limit
        self.dropped_events = 0
        #: The earliest deadline of a queued event not yet started (None: none).
        self.next_expiry: float | None = None

    def __bool__(self) -> bool:
        return self.size > 0

    def push_replies(self, data: bytes, count: int = 1) -> None:
        """Queue ``count`` encoded replies (concatenated in ``data``)."""
        if data:
            self._chunks.append([data, count, None, None])
            self.size += len(data)
            self.replies += count

    def push_event(self, data: bytes, deadline: float | None = None) -> bool:
        """Queue one encoded ``WATCH_EVENT``; ``False`` if it was dropped.
        ``deadline``: drop it if it has not started to be sent by then
        (see :meth:`drop_expired`)."""
        if len(data) > _MAX_MESSAGE or self.size + len(data) > self.event_limit:
            self.dropped_events += 1
            return False
        special = data[HEADER.size : HEADER.size + 1] == b"@"
        if not special:
            if data in self._unstarted_events:
                self.dropped_events += 1
                return False
            self._unstarted_events.add(data)
        self._chunks.append([data, 0, None if special else data, deadline])
        self.size += len(data)
        if deadline is not None and (self.next_expiry is None or deadline < self.next_expiry):
            self.next_expiry = deadline
        return True

    def drop_expired(self, now: float) -> int:
        """Drop the events whose deadline is ``now`` or earlier and that
        have not started to be sent; returns how many went."""
        if self.next_expiry is None or now < self.next_expiry:
            return 0
        kept: deque[list] = deque()
        dropped = 0
        next_expiry = None
        for entry in self._chunks:
            deadline = entry[3]
            if deadline is not None:
                if deadline <= now:
                    dropped += 1
                    self.size -= len(entry[0])
                    if entry[2] is not None:
                        self._unstarted_events.discard(entry[2])
                    continue
                if next_expiry is None or deadline < next_expiry:
                    next_expiry = deadline
            kept.append(entry)
        self._chunks = kept
        self.next_expiry = next_expiry
        self.dropped_events += dropped
        return dropped

    def peek(self, max_bytes: int = 1 << 18) -> bytes | memoryview:
        """The next bytes to send (at least one byte if the queue is not empty)."""
        chunks = self._chunks
        if not chunks:
            return b""
        head = chunks[0][0]
        if self._head_sent:
            return memoryview(head)[self._head_sent :]
        if len(chunks) == 1 or len(head) >= max_bytes:
            return head
        parts = []
        total = 0
        for entry in chunks:
            if total and total + len(entry[0]) > max_bytes:
                break
            parts.append(entry[0])
            total += len(entry[0])
        return b"".join(parts)

    def consume(self, sent: int) -> None:
        """Forget the first ``sent`` bytes (the socket took them)."""
        if sent <= 0:
            return
        chunks = self._chunks
        self.size -= sent
        pos = self._head_sent + sent
        while pos and chunks:
            entry = chunks[0]
            if entry[2] is not None:
                # Started being written: an identical event may queue again.
                self._unstarted_events.discard(entry[2])
                entry[2] = None
            entry[3] = None  # started: it goes out whole, however late
            length = len(entry[0])
            if pos < length:
                self._head_sent = pos
                return
            pos -= length
            self.replies -= entry[1]
            chunks.popleft()
        self._head_sent = 0

    def clear(self) -> None:
        self._chunks.clear()
        self._unstarted_events.clear()
        self._head_sent = 0
        self.size = 0
        self.replies = 0
        self.next_expiry = None

    def statistics(self) -> dict[str, int]:
        return {
            "queued_bytes": self.size,
            "queued_replies": self.replies,
            "queued_chunks": len(self._chunks),
            "dropped_events": self.dropped_events,
        }
