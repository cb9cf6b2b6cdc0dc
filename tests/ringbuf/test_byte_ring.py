"""XenStore / console byte rings: algorithm, roles, wrap, hostile indices."""

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringbuf.byte_ring import CONSOLE_LAYOUT, XENSTORE_LAYOUT, ByteRingRole, ConsoleRing, XenstoreRing
from ringbuf.layouts.console import XENCONSOLE_CONNECTED, XENCONSOLE_DISCONNECTED, XenconsInterface
from ringbuf.layouts.xenstore import (
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_RECONNECT,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XenstoreDomainInterface as XS,
)
from ringbuf.ring import RING_IDX_MASK, RingIndexError

GUEST, SERVER = ByteRingRole.GUEST, ByteRingRole.SERVER


def put_word(page: bytearray, offset: int, value: int) -> None:
    memoryview(page)[offset : offset + 4].cast("I")[0] = value & RING_IDX_MASK


def word(page: bytearray, offset: int) -> int:
    return memoryview(page)[offset : offset + 4].cast("I")[0]


def start_at(page: bytearray, layout, start: int) -> None:
    """Set every index of a byte-ring page to ``start`` (peers must not assume 0)."""
    for queue in (layout.guest_to_server, layout.server_to_guest):
        for name in (queue.cons, queue.prod):
            put_word(page, getattr(layout.interface, name).offset, start)


def start_xenstore_at(page: bytearray, start: int) -> None:
    start_at(page, XENSTORE_LAYOUT, start)


def test_guest_writes_req_server_reads_it_and_indices_move():
    page = bytearray(4096)
    guest, server = XenstoreRing(page, GUEST), XenstoreRing(page, SERVER)
    assert guest.write(b"abc") == 3
    assert page[:3] == b"abc" and word(page, XS.req_prod.offset) == 3
    assert server.read() == b"abc" and word(page, XS.req_cons.offset) == 3
    assert server.write(b"reply") == 5
    assert page[1024:1029] == b"reply"
    assert guest.read(2) == b"re" and guest.read() == b"ply"
    assert word(page, XS.rsp_cons.offset) == 5


def test_full_is_1024_not_empty():
    page = bytearray(4096)
    guest, server = XenstoreRing(page, GUEST), XenstoreRing(page, SERVER)
    assert guest.write(bytes(range(256)) * 5) == 1024
    assert guest.writable() == 0 and server.readable() == 1024
    assert guest.write(b"x") == 0


@given(
    ring=st.sampled_from([(XenstoreRing, XENSTORE_LAYOUT), (ConsoleRing, CONSOLE_LAYOUT)]),
    start=st.integers(0, 64).map(lambda k: (0xFFFFFC00 + k * 37) & RING_IDX_MASK),
    data=st.binary(min_size=0, max_size=5000),
    write_sizes=st.lists(st.integers(1, 2500), min_size=1, max_size=40),
    read_sizes=st.lists(st.integers(1, 2500), min_size=1, max_size=40),
    guest_writes=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_stream_survives_any_chunking_across_the_wrap(ring, start, data, write_sizes, read_sizes, guest_writes):
    cls, layout = ring
    page = bytearray(4096)
    start_at(page, layout, start)
    guest, server = cls(page, GUEST), cls(page, SERVER)
    writer, reader = (guest, server) if guest_writes else (server, guest)
    sent = received = 0
    out = bytearray()
    i = 0
    while received < len(data):
        w = write_sizes[i % len(write_sizes)]
        sent += writer.write(data[sent : sent + w])
        assert 0 <= reader.readable() <= writer.outgoing.size
        chunk = reader.read(read_sizes[i % len(read_sizes)])
        out += chunk
        received += len(chunk)
        i += 1
    assert bytes(out) == data
    assert (writer.outgoing.prod - start) & RING_IDX_MASK == len(data) & RING_IDX_MASK
    assert writer.outgoing.cons == writer.outgoing.prod


@given(start=st.integers(0, RING_IDX_MASK), data=st.binary(min_size=1, max_size=1024))
@settings(max_examples=60, deadline=None)
def test_one_byte_at_a_time_equals_whole(start, data):
    whole_page, bytewise_page = bytearray(4096), bytearray(4096)
    for page in (whole_page, bytewise_page):
        start_xenstore_at(page, start)
    XenstoreRing(whole_page, SERVER).write(data)
    server = XenstoreRing(bytewise_page, SERVER)
    for b in data:
        assert server.write(bytes([b])) == 1
    assert whole_page == bytewise_page
    guest = XenstoreRing(bytewise_page, GUEST)
    assert b"".join(guest.read(1) for _ in data) == XenstoreRing(whole_page, GUEST).read()


@pytest.mark.parametrize("prod_delta", [1025, 0x80000000, RING_IDX_MASK])
def test_hostile_indices_raise_ringidx(prod_delta):
    page = bytearray(4096)
    start_xenstore_at(page, 0xFFFFFFF0)
    put_word(page, XS.req_prod.offset, 0xFFFFFFF0 + prod_delta)  # guest scribbles req_prod
    server = XenstoreRing(page, SERVER)
    with pytest.raises(RingIndexError) as exc:
        server.read()
    assert exc.value.limit == 1024
    with pytest.raises(RingIndexError):
        server.readable()
    server.set_error(XENSTORE_ERROR_RINGIDX)  # what the daemon does next
    assert word(page, XS.error.offset) == XENSTORE_ERROR_RINGIDX
    # The server's own direction is still sane, but a hostile rsp_cons is caught too.
    put_word(page, XS.rsp_cons.offset, 0xFFFFFFF0 + 5)
    with pytest.raises(RingIndexError):
        server.write(b"x")


def test_reconnection_handshake():
    page = bytearray(4096)
    guest, server = XenstoreRing(page, GUEST), XenstoreRing(page, SERVER)
    with pytest.raises(RuntimeError):
        guest.request_reconnect()  # feature not offered
    with pytest.raises(RuntimeError):
        guest.advertise_features(1)  # only the server may
    server.advertise_features(XENSTORE_SERVER_FEATURE_RECONNECTION)
    server.advertise_features(XENSTORE_SERVER_FEATURE_ERROR)
    assert guest.server_features == 3
    guest.write(b"half a packet")
    server.write(b"stale reply")
    guest.request_reconnect()
    assert server.reconnect_requested() and guest.connection == XENSTORE_RECONNECT
    server.complete_reconnect()
    assert guest.connection == XENSTORE_CONNECTED
    assert [word(page, f.offset) for f in (XS.req_cons, XS.req_prod, XS.rsp_cons, XS.rsp_prod)] == [0] * 4
    assert page[:2048] == b"\xff" * 2048
    assert guest.readable() == 0 and server.readable() == 0


def test_console_directions_and_sizes():
    page = bytearray(4096)
    guest, backend = ConsoleRing(page, GUEST), ConsoleRing(page, SERVER)
    assert guest.outgoing.size == 2048 and guest.incoming.size == 1024
    assert guest.write(b"boot log\n" * 300) == 2048  # out[] holds 2048
    out_off = XenconsInterface.out.offset
    assert page[out_off : out_off + 9] == b"boot log\n"
    assert len(backend.read()) == 2048
    assert backend.write(b"k" * 2000) == 1024  # in[] holds 1024
    assert page[:4] == b"kkkk"
    assert guest.read() == b"k" * 1024
    assert guest.connected  # zero page: Xen's historic default means connected
    backend.set_connection(XENCONSOLE_DISCONNECTED)
    assert not guest.connected and page[XenconsInterface.connection.offset] == 1
    backend.set_connection(XENCONSOLE_CONNECTED)
    assert guest.connected
    with pytest.raises(RuntimeError):
        guest.set_connection(XENCONSOLE_CONNECTED)


def test_console_hostile_out_prod():
    page = bytearray(4096)
    put_word(page, XenconsInterface.out_prod.offset, 2049)
    with pytest.raises(RingIndexError):
        ConsoleRing(page, SERVER).read()


def test_works_over_mmap_and_releases_it():
    m = mmap.mmap(-1, 4096)
    guest, server = XenstoreRing(m, GUEST), XenstoreRing(m, SERVER)
    guest.write(b"hello")
    assert server.read() == b"hello"
    guest.release()
    server.release()
    m.close()  # would raise BufferError if a view were left exported


def test_page_too_small_rejected():
    with pytest.raises(ValueError):
        XenstoreRing(bytearray(2000), GUEST)
    with pytest.raises(ValueError):
        ConsoleRing(bytes(4096), GUEST)
