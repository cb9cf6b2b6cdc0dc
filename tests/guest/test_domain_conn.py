"""xenstored's ring pump (DomainConnection) against a real engine, in one
process: a page shared by a guest end and the server end, a counting
fake event channel.  Back-pressure, hostile indices, oversized packets,
reconnection, and a hypothesis run over random chunking and limits."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringbuf.byte_ring import ByteRingRole, XenstoreRing
from ringbuf.layouts.xenstore import (
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
)
from xenstore.core import Engine
from xenstore.daemon import domain_conn
from xenstore.daemon.domain_conn import DomainConnection
from xenstore.wire import HEADER, Op, Packet, PacketReader

DOMID = 5
HOME = f"/local/domain/{DOMID}"


class FakeChannel:
    def __init__(self) -> None:
        self.notified = 0
        self.wait_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def notify(self) -> None:
        self.notified += 1

    def pending(self) -> bool:
        try:
            return bool(os.read(self.wait_fd, 8))
        except BlockingIOError:
            return False


class Harness:
    """Engine + server end + guest end of one ring page."""

    def __init__(self, limit: int = 20, features: int = 3) -> None:
        self.page = bytearray(4096)
        self.engine = Engine()
        dom0 = self.engine.connect(0, True)
        assert self.engine.handle(dom0, Packet(Op.INTRODUCE, 1, 0, b"%d\x0099\x001\x00" % DOMID))[0][1].payload == b"OK\0"
        self.engine.handle(dom0, Packet(Op.WRITE, 2, 0, HOME.encode() + b"\0"))
        self.engine.handle(dom0, Packet(Op.SET_PERMS, 3, 0, HOME.encode() + b"\0n%d\0" % DOMID))
        self.server = XenstoreRing(self.page, ByteRingRole.SERVER)
        self.server.advertise_features(features)
        self.guest = XenstoreRing(self.page, ByteRingRole.GUEST)
        self.channel = FakeChannel()
        self.limit = limit
        self.dropped: list = []
        self.conn = DomainConnection(
            DOMID,
            self.engine.connect(DOMID, privileged=False),
            self.server,
            self.channel,  # type: ignore[arg-type]
            submit=self._submit,
            reset=self._reset,
            drop=self._drop,
            outstanding_limit=lambda: self.limit,
        )
        self.reader = PacketReader()
        self.events: list[Packet] = []
        self.max_queued_replies = 0

    def _submit(self, conn, packets) -> None:
        for packet in packets:
            for target, out in self.engine.handle(conn, packet):
                if target is self.conn.conn:
                    self.conn.deliver(out)
        self.max_queued_replies = max(self.max_queued_replies, self.conn.queue.replies)

    def _reset(self, conn):
        self.engine.disconnect(conn)
        return self.engine.connect(DOMID, privileged=False)

    def _drop(self, conn) -> None:
        self.dropped.append(conn)
        self.engine.disconnect(conn)

    def send(self, data: bytes) -> int:
        return self.guest.write(data)

    def receive(self, max_bytes: int | None = None) -> list[Packet]:
        self.reader.feed(self.guest.read(max_bytes))
        return list(self.reader)

    def roundtrip(self, op: int, payload: bytes, req_id: int = 1) -> Packet:
        """Send one request (in pieces if need be) and return its reply."""
        data = Packet(op, req_id, 0, payload).encode()
        got: list[Packet] = []
        for _ in range(100):
            data = data[self.send(data) :]
            self.conn.service()
            for packet in self.receive():
                if packet.op == Op.WATCH_EVENT:
                    self.events.append(packet)
                else:
                    got.append(packet)
            if got:
                (reply,) = got
                return reply
        raise AssertionError("no reply")


def test_requests_are_served_and_the_guest_notified():
    h = Harness()
    assert h.roundtrip(Op.WRITE, b"data/x\x00hello") == Packet(Op.WRITE, 1, 0, b"OK\0")
    assert h.roundtrip(Op.READ, b"data/x\x00", 2) == Packet(Op.READ, 2, 0, b"hello")
    assert h.roundtrip(Op.READ, b"/tool\x00", 3).payload == b"EACCES\0"  # unprivileged
    assert h.channel.notified >= 3


def test_back_pressure_stops_reading_at_the_outstanding_quota():
    h = Harness(limit=2)
    big = b"v" * 1500
    h.roundtrip(Op.WRITE, b"big\x00" + big)
    requests = b"".join(Packet(Op.READ, 10 + i, 0, b"big\x00").encode() for i in range(8))
    assert h.send(requests) == len(requests)
    h.conn.service()
    # rsp holds 1024 bytes of the first reply; two replies wait, the rest is unread.
    assert h.conn.queue.replies == 2
    assert h.conn.requests == 1 + 2
    got: list[Packet] = []
    for _ in range(100):
        got += h.receive()
        h.conn.service()
        assert h.conn.queue.replies <= 2
        if len(got) == 8:
            break
    assert [p.req_id for p in got] == list(range(10, 18))
    assert all(p.payload == big for p in got)


def test_events_the_guest_leaves_unread_too_long_are_dropped(monkeypatch):
    """cxenstored -w watch-event=: a guest's events not started within the
    timeout go; the one being written and replies stay."""
    clock = [100.0]
    monkeypatch.setattr(domain_conn, "_monotonic", lambda: clock[0])
    h = Harness()
    h.conn.event_timeout = 20.0
    h.roundtrip(Op.WATCH, b"w\x00tok\x00")
    dom0 = h.engine.connect(0, True)

    def dom0_writes(first, count):
        for i in range(first, first + count):
            for target, out in h.engine.handle(dom0, Packet(Op.WRITE, 1, 0, b"%s/w/k%03d\0" % (HOME.encode(), i))):
                if target is h.conn.conn:
                    h.conn.deliver(out)

    dom0_writes(0, 200)  # far more than the ring holds; the guest reads nothing
    queued = h.conn.queue.size
    assert queued > 1024
    clock[0] += 19.0
    dom0_writes(200, 5)
    clock[0] += 1.5  # the first 200 are 20.5 s old, the last 5 only 1.5 s
    got = []
    for _ in range(200):
        got += h.receive()
        h.conn.service()
    paths = [p.payload.split(b"\0")[0].decode() for p in got]
    assert paths[-5:] == [f"w/k{i:03d}" for i in range(200, 205)]
    assert 0 < len(paths) - 5 < 200  # what was in the ring or being written, not the rest
    assert paths[: len(paths) - 5] == [f"w/k{i:03d}" for i in range(len(paths) - 5)]
    assert h.conn.queue.dropped_events == 200 - (len(paths) - 5)
    assert h.roundtrip(Op.READ, b"domid\x00", 9).op == Op.ERROR  # (the guest is served as before)


def test_a_guest_that_keeps_the_ring_full_yields_the_loop():
    h = Harness()
    request = Packet(Op.READ, 1, 0, b"domid\x00").encode()
    submit = h.conn._submit

    def refill(conn, packets):  # the guest writes as fast as we read
        submit(conn, packets)
        h.receive()
        h.send(request * (h.guest.writable() // len(request)))  # whole packets only

    h.conn._submit = refill
    h.send(request * 10)
    assert not h.channel.pending()
    h.conn.service()
    assert h.channel.pending()  # comes back next loop iteration
    assert 16 << 10 <= h.conn.requests * len(request) < (16 << 10) + 2048


@pytest.mark.parametrize("field", ["req_prod", "rsp_cons"])
def test_impossible_indices_set_ringidx_and_stop_service(field):
    h = Harness()
    h.roundtrip(Op.WATCH, b"data\x00tok\x00")  # reply + initial event
    offset = {"req_prod": 2052, "rsp_cons": 2056}[field]
    h.page[offset : offset + 4] = (5000).to_bytes(4, "little")
    notified = h.channel.notified
    h.conn.service()
    assert h.server.error == XENSTORE_ERROR_RINGIDX
    assert not h.conn.serving and h.channel.notified == notified + 1
    assert h.dropped and h.engine.statistics()["watches"] == 0
    h.conn.deliver(Packet(Op.WATCH_EVENT, 0, 0, b"data\0tok\0"))  # ignored from now on
    h.conn.service()
    assert h.server.error == XENSTORE_ERROR_RINGIDX


def test_oversized_length_sets_proto_after_answering_what_came_before():
    h = Harness()
    h.send(Packet(Op.READ, 1, 0, b"/local\x00").encode() + HEADER.pack(Op.WRITE, 2, 0, 4097))
    h.conn.service()
    assert h.server.error == XENSTORE_ERROR_PROTO and not h.conn.serving
    (reply,) = h.receive()
    assert reply.req_id == 1


def test_error_field_untouched_without_the_error_feature():
    h = Harness(features=XENSTORE_SERVER_FEATURE_RECONNECTION)
    h.send(HEADER.pack(Op.WRITE, 2, 0, 5000))
    h.conn.service()
    assert h.server.error == 0 and not h.conn.serving


def test_reconnection_resets_the_connection():
    h = Harness()
    h.roundtrip(Op.WATCH, b"data\x00tok\x00")
    h.roundtrip(Op.TRANSACTION_START, b"\x00", 2)
    assert h.engine.statistics()["watches"] == 1 and h.engine.statistics()["transactions"] == 1
    h.send(Packet(Op.READ, 3, 0, b"data\x00").encode()[:10])  # half a header
    old = h.conn.conn
    h.guest.request_reconnect()
    h.conn.service()
    assert h.guest.connection == XENSTORE_CONNECTED
    assert (h.server.outgoing.prod, h.server.incoming.cons) == (0, 0)
    assert h.conn.conn is not old and not old.alive
    assert h.engine.statistics()["watches"] == 0 and h.engine.statistics()["transactions"] == 0
    h.reader = PacketReader()
    assert h.roundtrip(Op.READ, b"domid\x00", 4).payload == b"ENOENT\0"  # framing restarted


def test_restart_zeroes_the_indices_and_serves_again():
    h = Harness()
    h.send(HEADER.pack(Op.WRITE, 2, 0, 5000))
    h.conn.service()
    assert not h.conn.serving
    h.conn.restart(h.engine.connect(DOMID, privileged=False))
    assert (h.guest.outgoing.prod, h.guest.incoming.prod) == (0, 0)
    h.reader = PacketReader()
    assert h.roundtrip(Op.WRITE, b"a\x00b").payload == b"OK\0"


@settings(max_examples=40, deadline=None)
@given(
    limit=st.integers(1, 5),
    values=st.lists(st.integers(0, 1900), min_size=1, max_size=25),
    start=st.integers(0, 2**32 - 1),
    guest_chunks=st.lists(st.integers(1, 1024), min_size=1, max_size=10),
    read_chunks=st.lists(st.integers(1, 1024), min_size=1, max_size=10),
)
def test_random_chunking_and_limits_keep_replies_complete_and_in_order(limit, values, start, guest_chunks, read_chunks):
    h = Harness(limit=limit)
    for ring_queue in (h.guest.outgoing, h.guest.incoming):  # indices need not start at 0
        ring_queue._cons[0] = ring_queue._prod[0] = start
    stream = b""
    expected: list[tuple[int, bytes]] = []
    model: dict[bytes, bytes] = {}
    for i, size in enumerate(values):
        key = b"data/k%d" % (i % 3)
        if i % 2 == 0:
            model[key] = bytes([65 + i % 26]) * size
            stream += Packet(Op.WRITE, i, 0, key + b"\0" + model[key]).encode()
            expected.append((i, b"OK\0"))
        else:
            stream += Packet(Op.READ, i, 0, key + b"\0").encode()
            expected.append((i, model[key] if key in model else b"ENOENT\0"))
    got: list[tuple[int, bytes]] = []
    step = 0
    # With 1-byte chunks every byte each way may take a step of its own.
    max_steps = 10_000 + 2 * (len(stream) + sum(16 + len(payload) for _, payload in expected))
    while len(got) < len(expected):
        step += 1
        assert step < max_steps, "no progress"
        if stream:
            stream = stream[h.send(stream[: guest_chunks[step % len(guest_chunks)]]) :]
        h.conn.service()
        got += [(p.req_id, p.payload) for p in h.receive(read_chunks[step % len(read_chunks)])]
        h.conn.service()
    assert got == expected
    assert h.max_queued_replies <= limit
    assert h.conn.serving and h.server.error == 0
