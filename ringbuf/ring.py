"""Xen's generic shared request/response ring (``xen/include/public/io/ring.h``).

``define_ring_types(name, Request, Response)`` is DEFINE_RING_TYPES: from two
ctypes structures it gives a ``RingTypes`` whose entries are
``union { Request; Response; }``. Over any writable buffer (an mmap of one or
more contiguous 4 KiB pages, a memoryview, a bytearray) it opens:

* ``FrontRing`` -- produces requests, consumes responses. Only the frontend
  initialises the shared header (``init_front`` = SHARED_RING_INIT +
  FRONT_RING_INIT); ``attach_front`` re-attaches to a live ring.
* ``BackRing`` -- consumes requests, produces responses; it only ever
  attaches (BACK_RING_ATTACH at the published response index).

All indices are free-running uint32 (mod 2^32). Consumers hand out private
copies of entries (RING_COPY_REQUEST, XSA-155), never views of the shared
slot, and check every index the peer published: an impossible one raises
``RingIndexError`` instead of making us spin or read stale slots.

Memory-ordering notes: entries and indices are accessed through
``memoryview.cast("I")`` (one aligned 32-bit load/store, never torn; unlike
``struct.pack_into``, which zero-fills first). x86-64 keeps store/store and
load/load order, so only the two store->load places of ring.h (publish then
read the peer's event index; set our event index then re-read the producer
index) need a fence: ``_barrier.make_full_barrier``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from ._barrier import make_full_barrier

__all__ = [
    "RING_IDX_MASK",
    "SRING_HEADER_SIZE",
    "XEN_PAGE_SIZE",
    "SringHeader",
    "BackRing",
    "FrontRing",
    "RingFullError",
    "RingIndexError",
    "RingStatistics",
    "RingTypes",
    "SharedRing",
    "define_ring_types",
    "ring_size",
]

RING_IDX_MASK = 0xFFFFFFFF
XEN_PAGE_SIZE = 4096


class SringHeader(ctypes.Structure):
    """``struct <name>_sring`` up to ``ring[]``, which starts at offset 64."""

    _fields_ = [
        ("req_prod", ctypes.c_uint32),
        ("req_event", ctypes.c_uint32),
        ("rsp_prod", ctypes.c_uint32),
        ("rsp_event", ctypes.c_uint32),
        # union { netif.smartpoll_active; tapif_user.msg; pvt_pad[4] }: unused.
        ("pvt", ctypes.c_uint8 * 4),
        ("pad", ctypes.c_uint8 * 44),
    ]


SRING_HEADER_SIZE = ctypes.sizeof(SringHeader)

# Word positions of the four indices in the header seen as memoryview.cast("I").
_REQ_PROD = SringHeader.req_prod.offset // 4
_REQ_EVENT = SringHeader.req_event.offset // 4
_RSP_PROD = SringHeader.rsp_prod.offset // 4
_RSP_EVENT = SringHeader.rsp_event.offset // 4


Req = TypeVar("Req", bound=ctypes.Structure)
Rsp = TypeVar("Rsp", bound=ctypes.Structure)
Entry = ctypes.Structure | ctypes.Union | bytes | bytearray | memoryview


class RingIndexError(Exception):
    """The peer published an index that no correct peer could publish.

    This is a *remote* error (hostile or broken peer): disconnect it. Xen
    calls this RING_REQUEST_PROD_OVERFLOW / XENSTORE_ERROR_RINGIDX.
    """

    def __init__(self, what: str, prod: int, cons: int, limit: int) -> None:
        super().__init__(
            f"peer published impossible {what}: prod={prod:#010x} cons={cons:#010x} "
            f"(prod-cons)={(prod - cons) & RING_IDX_MASK} > {limit}"
        )
        self.what = what
        self.prod = prod
        self.cons = cons
        self.limit = limit


@dataclass(frozen=True)
class RingStatistics:
    """A snapshot of one ring end's private indices (trio-style ``statistics()``)."""

    nr_ents: int
    req_index: int  # req_prod_pvt (front) / req_cons (back)
    rsp_index: int  # rsp_cons (front) / rsp_prod_pvt (back)
    outstanding: int  # requests without a response yet, from this end's view


class RingFullError(RuntimeError):
    """Local caller bug: queued more entries than the ring has free slots."""


def ring_size(entry_size: int, nbytes: int) -> int:
    """``__RING_SIZE``: the largest power of two of entries that fit after the header."""
    if entry_size <= 0:
        raise ValueError(f"entry size must be positive, got {entry_size}")
    fit = (nbytes - SRING_HEADER_SIZE) // entry_size
    if fit < 1:
        raise ValueError(f"{nbytes} bytes cannot hold a ring of {entry_size}-byte entries")
    return 1 << (fit.bit_length() - 1)


def _writable_bytes(buf: object) -> memoryview:
    view = memoryview(buf)  # type: ignore[arg-type]
    if view.readonly:
        raise ValueError("shared ring buffer must be writable")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _entry_bytes(entry: Entry) -> memoryview:
    view = memoryview(entry)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class SharedRing:
    """The shared page(s): header indices and slot storage. No policy here."""

    def __init__(self, buf: object, entry_size: int) -> None:
        raw = _writable_bytes(buf)
        self.entry_size = entry_size
        self.nr_ents = ring_size(entry_size, raw.nbytes)
        self.mask = self.nr_ents - 1
        self.mem = raw[: SRING_HEADER_SIZE + self.nr_ents * entry_size]
        # One aligned 32-bit access per index read or write.
        self.idx = self.mem[:16].cast("I")
        self._raw = raw

    def init(self, start_index: int = 0) -> None:
        """SHARED_RING_INIT (frontend only), optionally at a non-zero index."""
        start = start_index & RING_IDX_MASK
        self.mem[16:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE - 16)
        self.idx[_REQ_EVENT] = (start + 1) & RING_IDX_MASK
        self.idx[_RSP_EVENT] = (start + 1) & RING_IDX_MASK
        self.idx[_RSP_PROD] = start
        self.idx[_REQ_PROD] = start

    def slot_offset(self, index: int) -> int:
        return SRING_HEADER_SIZE + (index & self.mask) * self.entry_size

    @property
    def req_prod(self) -> int:
        return self.idx[_REQ_PROD]

    @property
    def req_event(self) -> int:
        return self.idx[_REQ_EVENT]

    @property
    def rsp_prod(self) -> int:
        return self.idx[_RSP_PROD]

    @property
    def rsp_event(self) -> int:
        return self.idx[_RSP_EVENT]

    def release(self) -> None:
        """Drop our views so the underlying mmap can be closed."""
        self.idx.release()
        self.mem.release()
        self._raw.release()


class _Producer:
    """One producing direction: private index, slot writes, publish with hold-off."""

    def __init__(self, shared: SharedRing, prod_word: int, event_word: int, start: int) -> None:
        self.shared = shared
        self.prod_word = prod_word
        self.event_word = event_word
        self.pvt = start  # next index to fill (req_prod_pvt / rsp_prod_pvt)
        self.published = start  # what we last stored in the shared producer index
        self.barrier = make_full_barrier()
        self._idx = shared.idx

    def put(self, entry: Entry) -> None:
        data = entry if type(entry) is bytes else _entry_bytes(entry)
        shared = self.shared
        if len(data) > shared.entry_size:
            raise ValueError(f"entry of {len(data)} bytes does not fit a {shared.entry_size}-byte slot")
        off = SRING_HEADER_SIZE + (self.pvt & shared.mask) * shared.entry_size
        shared.mem[off : off + len(data)] = data
        self.pvt = (self.pvt + 1) & RING_IDX_MASK

    def put_many(self, entries: Sequence[Entry]) -> int:
        """Fill consecutive slots, one copy per entry, with the loop kept tight."""
        shared = self.shared
        mem = shared.mem
        size = shared.entry_size
        mask = shared.mask
        index = self.pvt
        for entry in entries:
            data = entry if type(entry) is bytes else _entry_bytes(entry)
            if len(data) > size:
                raise ValueError(f"entry of {len(data)} bytes does not fit a {size}-byte slot")
            off = SRING_HEADER_SIZE + (index & mask) * size
            mem[off : off + len(data)] = data
            index += 1
        self.pvt = index & RING_IDX_MASK
        return len(entries)

    def put_raw(self, data: bytes | bytearray | memoryview) -> int:
        """Fill ``len(data) // entry_size`` consecutive slots with at most two copies."""
        view = _entry_bytes(data)
        size = self.shared.entry_size
        count, rest = divmod(view.nbytes, size)
        if rest:
            raise ValueError(f"raw data of {view.nbytes} bytes is not a whole number of {size}-byte entries")
        first = min(count, self.shared.nr_ents - (self.pvt & self.shared.mask))
        off = self.shared.slot_offset(self.pvt)
        mem = self.shared.mem
        mem[off : off + first * size] = view[: first * size]
        if count > first:
            mem[SRING_HEADER_SIZE : SRING_HEADER_SIZE + (count - first) * size] = view[first * size :]
        self.pvt = (self.pvt + count) & RING_IDX_MASK
        return count

    def push(self) -> bool:
        """RING_PUSH_*_AND_CHECK_NOTIFY: publish, return whether to notify the peer."""
        old, new = self.publish()
        if old == new:
            return False
        self.barrier()  # index visible before we read the peer's event index
        return self.peer_wants_notify(old, new)

    # push() in two steps, so tests can interleave the peer between them.
    def publish(self) -> tuple[int, int]:
        old = self.published
        new = self.pvt
        if old != new:
            # Entries were stored before the index: x86 keeps store order.
            self._idx[self.prod_word] = new
            self.published = new
        return old, new

    def peer_wants_notify(self, old: int, new: int) -> bool:
        # Notify iff the peer's event index lies in (old, new].
        event = self._idx[self.event_word]
        return ((new - event) & RING_IDX_MASK) < ((new - old) & RING_IDX_MASK)


class _Consumer:
    """One consuming direction: bounded view of the peer's producer index, copy-out."""

    def __init__(
        self,
        shared: SharedRing,
        prod_word: int,
        event_word: int,
        start: int,
        what: str,
        limit: Callable[[int], int],
    ) -> None:
        self.shared = shared
        self.prod_word = prod_word
        self.event_word = event_word
        self.cons = start
        self.what = what
        self.limit = limit  # cons -> most entries a correct peer can have pending
        self.barrier = make_full_barrier()
        self._idx = shared.idx  # hot path: fewer attribute hops

    def unconsumed(self) -> int:
        cons = self.cons
        prod = self._idx[self.prod_word]  # read once
        avail = (prod - cons) & RING_IDX_MASK
        if avail:
            limit = self.limit(cons)
            if avail > limit:
                raise RingIndexError(self.what, prod, cons, limit)
        return avail

    def take(self, kind: type, max_count: int | None) -> list:
        count = self.unconsumed()
        if max_count is not None:
            count = min(count, max_count)
        shared = self.shared
        mem, mask, size = shared.mem, shared.mask, shared.entry_size
        cons = self.cons
        # Private copies: the peer may rewrite a slot while we validate it.
        out = [kind.from_buffer_copy(mem, SRING_HEADER_SIZE + ((cons + i) & mask) * size) for i in range(count)]
        self.cons = (cons + count) & RING_IDX_MASK
        return out

    def take_raw(self, max_count: int | None) -> bytes:
        """Copy out up to ``max_count`` consecutive entries as one bytes object."""
        count = self.unconsumed()
        if max_count is not None:
            count = min(count, max_count)
        shared = self.shared
        size = shared.entry_size
        first = min(count, shared.nr_ents - (self.cons & shared.mask))
        off = shared.slot_offset(self.cons)
        data = bytes(shared.mem[off : off + first * size])
        if count > first:
            data += bytes(shared.mem[SRING_HEADER_SIZE : SRING_HEADER_SIZE + (count - first) * size])
        self.cons = (self.cons + count) & RING_IDX_MASK
        return data

    def final_check(self) -> bool:
        """RING_FINAL_CHECK_FOR_*: True if work is pending; else arm the event index."""
        if self.unconsumed():
            return True
        self.arm()
        self.barrier()  # event index visible before we re-read the producer index
        return self.unconsumed() > 0

    def arm(self) -> None:
        """Ask to be notified when the next entry is published."""
        self._idx[self.event_word] = (self.cons + 1) & RING_IDX_MASK


class FrontRing(Generic[Req, Rsp]):
    """Frontend end of a ring: queue/push requests, collect responses."""

    def __init__(
        self, types: RingTypes[Req, Rsp], shared: SharedRing, req_start: int, rsp_start: int
    ) -> None:
        self.types = types
        self.shared = shared
        self.nr_ents = shared.nr_ents
        self._requests = _Producer(shared, _REQ_PROD, _REQ_EVENT, req_start)
        self._responses = _Consumer(
            shared, _RSP_PROD, _RSP_EVENT, rsp_start, "response producer index", self._outstanding_from
        )

    def _outstanding_from(self, rsp_cons: int) -> int:
        # A correct backend answers only requests we actually published.
        return (self._requests.published - rsp_cons) & RING_IDX_MASK

    @property
    def req_prod_pvt(self) -> int:
        return self._requests.pvt

    @property
    def rsp_cons(self) -> int:
        return self._responses.cons

    def statistics(self) -> RingStatistics:
        req, rsp = self._requests.pvt, self._responses.cons
        return RingStatistics(self.nr_ents, req, rsp, (req - rsp) & RING_IDX_MASK)

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.nr_ents - ((self._requests.pvt - self._responses.cons) & RING_IDX_MASK)

    def full(self) -> bool:
        return self.free_requests() == 0

    def put_request(self, request: Entry) -> None:
        """Queue one request (not yet visible to the backend until push)."""
        requests = self._requests
        if (requests.pvt - self._responses.cons) & RING_IDX_MASK >= self.nr_ents:
            raise RingFullError(f"{self.types.name} ring full: {self.nr_ents} requests outstanding")
        requests.put(request)

    def put_requests(self, requests: Sequence[Entry]) -> int:
        """Queue several requests (each copied into its slot); cheaper than a loop of put_request."""
        if len(requests) > self.free_requests():
            raise RingFullError(f"{self.types.name} ring: {len(requests)} requests, {self.free_requests()} free slots")
        return self._requests.put_many(requests)

    def put_raw_requests(self, data: bytes | bytearray | memoryview) -> int:
        """Queue ``len(data) // entry_size`` requests given as packed entries."""
        if len(data) > self.free_requests() * self.shared.entry_size:
            raise RingFullError(f"{self.types.name} ring: not enough free slots")
        return self._requests.put_raw(data)

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: True means notify the backend."""
        return self._requests.push()

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES; raises RingIndexError on a hostile index."""
        return self._responses.unconsumed()

    def take_responses(self, max_count: int | None = None) -> list[Rsp]:
        """Copy out (and consume) the pending responses."""
        return self._responses.take(self.types.response, max_count)

    def take_raw_responses(self, max_count: int | None = None) -> bytes:
        return self._responses.take_raw(max_count)

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: call before sleeping; True = keep working."""
        return self._responses.final_check()

    def release(self) -> None:
        self.shared.release()


class BackRing(Generic[Req, Rsp]):
    """Backend end of a ring: collect requests (as private copies), push responses."""

    def __init__(self, types: RingTypes[Req, Rsp], shared: SharedRing, start: int) -> None:
        self.types = types
        self.shared = shared
        self.nr_ents = shared.nr_ents
        self._responses = _Producer(shared, _RSP_PROD, _RSP_EVENT, start)
        self._requests = _Consumer(
            shared, _REQ_PROD, _REQ_EVENT, start, "request producer index", self._request_room_from
        )

    def _request_room_from(self, req_cons: int) -> int:
        # RING_REQUEST_PROD_OVERFLOW: a frontend can never have more than
        # nr_ents requests without a response slot.
        return self.nr_ents - ((req_cons - self._responses.pvt) & RING_IDX_MASK)

    @property
    def req_cons(self) -> int:
        return self._requests.cons

    @property
    def rsp_prod_pvt(self) -> int:
        return self._responses.pvt

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS; raises RingIndexError on a hostile index."""
        return self._requests.unconsumed()

    def take_requests(self, max_count: int | None = None) -> list[Req]:
        """RING_COPY_REQUEST for each pending request: private copies, then consumed."""
        return self._requests.take(self.types.request, max_count)

    def take_raw_requests(self, max_count: int | None = None) -> bytes:
        return self._requests.take_raw(max_count)

    def statistics(self) -> RingStatistics:
        req, rsp = self._requests.cons, self._responses.pvt
        return RingStatistics(self.nr_ents, req, rsp, (req - rsp) & RING_IDX_MASK)

    def pending_responses(self) -> int:
        """Requests consumed but not yet answered."""
        return (self._requests.cons - self._responses.pvt) & RING_IDX_MASK

    def put_response(self, response: Entry) -> None:
        if self.pending_responses() == 0:
            raise RingFullError(f"{self.types.name} ring: response without a consumed request")
        self._responses.put(response)

    def put_responses(self, responses: Sequence[Entry]) -> int:
        if len(responses) > self.pending_responses():
            raise RingFullError(f"{self.types.name} ring: more responses than consumed requests")
        return self._responses.put_many(responses)

    def put_raw_responses(self, data: bytes | bytearray | memoryview) -> int:
        if len(data) > self.pending_responses() * self.shared.entry_size:
            raise RingFullError(f"{self.types.name} ring: more responses than consumed requests")
        return self._responses.put_raw(data)

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: True means notify the frontend."""
        return self._responses.push()

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: call before sleeping; True = keep working."""
        return self._requests.final_check()

    def release(self) -> None:
        self.shared.release()


@dataclass(frozen=True)
class RingTypes(Generic[Req, Rsp]):
    """DEFINE_RING_TYPES(name, request, response)."""

    name: str
    request: type[Req]
    response: type[Rsp]
    entry_size: int = field(init=False)

    def __post_init__(self) -> None:
        size = max(ctypes.sizeof(self.request), ctypes.sizeof(self.response))
        object.__setattr__(self, "entry_size", size)

    def ring_size(self, nbytes: int) -> int:
        """Entries in a ring over ``nbytes`` (4096 x number of pages)."""
        return ring_size(self.entry_size, nbytes)

    def shared(self, buf: object) -> SharedRing:
        return SharedRing(buf, self.entry_size)

    def init_front(self, buf: object, start_index: int = 0) -> FrontRing[Req, Rsp]:
        """SHARED_RING_INIT + FRONT_RING_INIT. Indices may start anywhere (tests use
        values just below 2^32); a fresh Xen ring starts at 0."""
        shared = self.shared(buf)
        shared.init(start_index)
        start = start_index & RING_IDX_MASK
        return FrontRing(self, shared, start, start)

    def attach_front(self, buf: object) -> FrontRing[Req, Rsp]:
        """FRONT_RING_ATTACH for a frontend resuming a live ring: requests already
        published stay outstanding; responses already published count as read."""
        shared = self.shared(buf)
        req_prod, rsp_prod = shared.req_prod, shared.rsp_prod
        if (req_prod - rsp_prod) & RING_IDX_MASK > shared.nr_ents:
            shared.release()
            raise RingIndexError("request producer index", req_prod, rsp_prod, shared.nr_ents)
        return FrontRing(self, shared, req_prod, rsp_prod)

    def attach_back(self, buf: object) -> BackRing[Req, Rsp]:
        """BACK_RING_ATTACH at the published response index; never touches the header."""
        shared = self.shared(buf)
        return BackRing(self, shared, shared.rsp_prod)


def define_ring_types(name: str, request: type[Req], response: type[Rsp]) -> RingTypes[Req, Rsp]:
    """Ring types whose slots are ``union { request; response; }``."""
    return RingTypes(name, request, response)
