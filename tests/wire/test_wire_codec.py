"""xenstore.wire: golden bytes per operation, round trips, incremental parsing, limits."""

from __future__ import annotations

import errno
import pickle
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from xenstore.client._ops import Perm, Request
from xenstore.wire import (
    ERROR_NAMES,
    HEADER,
    OK,
    PAYLOAD_MAX,
    Op,
    Packet,
    PacketReader,
    ProtocolError,
    XenStoreError,
    join_strings,
    split_strings,
)


def header(op: int, req_id: int, tx_id: int, length: int) -> bytes:
    return struct.pack("<IIII", op, req_id, tx_id, length)


# (request as the client builds it, tx_id, exact bytes on the wire)
GOLDEN = [
    (Request.read("/a"), 0, bytes.fromhex("02000000 07000000 00000000 03000000") + b"/a\0"),
    (Request.write("/a", b"v\0x"), 5, bytes.fromhex("0b000000 07000000 05000000 06000000") + b"/a\0v\0x"),
    (Request.write("/a", b""), 0, header(11, 7, 0, 3) + b"/a\0"),
    (Request.mkdir("/d"), 0, header(12, 7, 0, 3) + b"/d\0"),
    (Request.rm("/d"), 0, header(13, 7, 0, 3) + b"/d\0"),
    (Request.directory("/"), 0, header(1, 7, 0, 2) + b"/\0"),
    (Request.directory_part("/big", 4090), 0, header(22, 7, 0, 10) + b"/big\x004090\0"),
    (Request.get_perms("/p"), 0, header(3, 7, 0, 3) + b"/p\0"),
    (Request.set_perms("/p", [Perm("n", 0), "r5"]), 0, header(14, 7, 0, 9) + b"/p\0n0\0r5\0"),
    (Request.watch("/w", "tok"), 0, header(4, 7, 0, 7) + b"/w\0tok\0"),
    (Request.watch("/w", "tok", depth=2), 0, header(4, 7, 0, 9) + b"/w\0tok\x002\0"),
    (Request.unwatch("/w", "tok"), 0, header(5, 7, 0, 7) + b"/w\0tok\0"),
    (Request.reset_watches(), 0, header(21, 7, 0, 1) + b"\0"),
    (Request.transaction_start(), 0, header(6, 7, 0, 1) + b"\0"),
    (Request.transaction_end(True), 9, header(7, 7, 9, 2) + b"T\0"),
    (Request.transaction_end(False), 9, header(7, 7, 9, 2) + b"F\0"),
    (Request.get_domain_path(3), 0, header(10, 7, 0, 2) + b"3\0"),
    (Request.introduce(5, 1234, 7), 0, header(8, 7, 0, 9) + b"5\x001234\x007\0"),
    (Request.release(5), 0, header(9, 7, 0, 2) + b"5\0"),
    (Request.is_domain_introduced(5), 0, header(17, 7, 0, 2) + b"5\0"),
    (Request.resume(5), 0, header(18, 7, 0, 2) + b"5\0"),
    (Request.set_target(5, 6), 0, header(19, 7, 0, 4) + b"5\x006\0"),
    (Request.control("print", "hi"), 0, header(0, 7, 0, 9) + b"print\0hi\0"),
    (Request.get_feature(), 0, header(23, 7, 0, 0)),
    (Request.get_feature(5), 0, header(23, 7, 0, 2) + b"5\0"),
    (Request.set_feature(5, 3), 0, header(24, 7, 0, 4) + b"5\x003\0"),
    (Request.get_quota(), 0, header(25, 7, 0, 0)),
    (Request.get_quota("nodes"), 0, header(25, 7, 0, 6) + b"nodes\0"),
    (Request.get_quota("nodes", 5), 0, header(25, 7, 0, 8) + b"5\0nodes\0"),
    (Request.set_quota("nodes", 10), 0, header(26, 7, 0, 9) + b"nodes\x0010\0"),
    (Request.set_quota("nodes", 10, 5), 0, header(26, 7, 0, 11) + b"5\0nodes\x0010\0"),
]


@pytest.mark.parametrize("request_, tx_id, wire", GOLDEN, ids=[f"{Op(r.op).name}-{i}" for i, (r, _, _) in enumerate(GOLDEN)])
def test_golden_bytes(request_, tx_id, wire):
    packet = Packet(request_.op, 7, tx_id, request_.payload)
    assert packet.encode() == wire
    reader = PacketReader()
    reader.feed(wire)
    assert reader.next_packet() == packet
    assert reader.buffered == 0


def test_replies_golden():
    """Server-to-client messages the clients parse."""
    event = header(15, 0, 0, 9) + b"/a/b\0tok\0"
    err = header(16, 7, 0, 7) + b"ENOENT\0"
    reader = PacketReader()
    reader.feed(event + err)
    first, second = reader.next_packet(), reader.next_packet()
    assert (first.op, first.args) == (Op.WATCH_EVENT, [b"/a/b", b"tok"])
    assert second == Packet(Op.ERROR, 7, 0, b"ENOENT\0") == Packet(Op.READ, 7).error_reply("ENOENT")
    assert Packet(Op.READ, 7, 3, b"/a\0").reply(Op.READ, b"v") == Packet(Op.READ, 7, 3, b"v")
    assert OK == b"OK\0"


packets = st.builds(
    Packet,
    op=st.sampled_from(list(Op)) | st.integers(0, 2**32 - 1),
    req_id=st.integers(0, 2**32 - 1),
    tx_id=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=PAYLOAD_MAX),
)


@settings(max_examples=200, deadline=None)
@given(packets)
def test_round_trip(packet):
    wire = packet.encode()
    assert len(wire) == 16 + len(packet.payload)
    assert HEADER.unpack_from(wire) == (packet.op, packet.req_id, packet.tx_id, len(packet.payload))
    reader = PacketReader()
    reader.feed(wire)
    assert reader.next_packet() == packet
    assert reader.next_packet() is None


@settings(max_examples=100, deadline=None)
@given(st.lists(packets, max_size=6), st.lists(st.integers(1, 64), min_size=1))
def test_byte_at_a_time_equals_whole(stream, chunk_sizes):
    wire = b"".join(p.encode() for p in stream)
    whole = PacketReader()
    whole.feed(wire)
    assert list(whole) == stream

    one = PacketReader()
    got = []
    for i in range(len(wire)):
        one.feed(wire[i : i + 1])
        got.extend(one)
    assert got == stream

    # Arbitrary chunking gives the same too.
    chunked = PacketReader()
    got, pos, k = [], 0, 0
    while pos < len(wire):
        size = chunk_sizes[k % len(chunk_sizes)]
        chunked.feed(wire[pos : pos + size])
        got.extend(chunked)
        pos, k = pos + size, k + 1
    assert got == stream and chunked.buffered == 0


@settings(max_examples=150, deadline=None)
@given(st.lists(packets, max_size=3), st.binary(max_size=40), st.integers(0, 40))
# The chunk after a buffered byte completes one packet (header read across both).
@example(stream=[Packet(Op.CONTROL, 0, 1 << 24, b"")], garbage=b"", cut=0)
def test_whole_request_is_feed_plus_next_packet_for_a_lone_packet(stream, garbage, cut):
    """``whole_request`` takes exactly the chunks that hold one complete,
    well-formed packet and nothing else; otherwise it leaves the reader
    alone and feeding the chunk gives what it always gave."""
    wire = b"".join(p.encode() for p in stream) + garbage
    for chunk, buffered in ((wire, b""), (wire[:cut], b""), (wire, b"\x02")):
        reader = PacketReader()
        if buffered:
            reader.feed(buffered)
        got = reader.whole_request(chunk)
        reference = PacketReader()
        reference.feed(buffered + chunk)
        try:
            expected = list(reference)
        except ProtocolError:
            expected = None
        # (With bytes buffered before it, even a chunk that completes exactly
        # one packet is not a lone request: that packet starts in the buffer.)
        lone = not buffered and expected is not None and len(expected) == 1 and reference.buffered == 0
        if lone:
            assert type(got) is tuple and got == tuple(expected[0])  # the Packet's fields
            assert reader.buffered == 0
        else:
            assert got is None
            assert reader.buffered == len(buffered)


def test_partial_header_and_payload_wait():
    reader = PacketReader()
    wire = Packet(Op.WRITE, 1, 0, b"/a\0xyz").encode()
    reader.feed(wire[:15])
    assert reader.next_packet() is None
    reader.feed(wire[15:-1])
    assert reader.next_packet() is None
    reader.feed(wire[-1:])
    assert reader.next_packet() == Packet(Op.WRITE, 1, 0, b"/a\0xyz")


def test_oversized_length_is_a_protocol_error():
    reader = PacketReader()
    reader.feed(header(Op.READ, 1, 0, PAYLOAD_MAX + 1))  # the header alone is enough
    with pytest.raises(ProtocolError):
        reader.next_packet()
    exact = PacketReader()
    exact.feed(header(Op.READ, 1, 0, PAYLOAD_MAX) + b"x" * PAYLOAD_MAX)
    assert len(exact.next_packet().payload) == PAYLOAD_MAX
    small = PacketReader(max_payload=10)
    small.feed(header(Op.READ, 1, 0, 11))
    with pytest.raises(ProtocolError):
        small.next_packet()


def test_encoding_an_oversized_payload_is_the_callers_bug():
    with pytest.raises(ValueError):
        Packet(Op.WRITE, 1, 0, b"x" * (PAYLOAD_MAX + 1)).encode()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary().map(lambda b: b.replace(b"\0", b"")), max_size=8))
def test_strings_round_trip(strings):
    payload = join_strings(*strings)
    assert payload.count(b"\0") == len(strings)
    assert split_strings(payload) == strings


def test_split_strings_keeps_an_unterminated_tail():
    assert split_strings(b"a\0b") == [b"a", b"b"]
    assert split_strings(b"") == []
    assert join_strings("a", b"b") == b"a\0b\0"


def test_packet_is_an_immutable_value():
    p = Packet(Op.READ, 1, 0, b"/a\0")
    assert p == Packet(2, 1, 0, b"/a\0") and hash(p) == hash(Packet(2, 1, 0, b"/a\0"))
    assert p != Packet(Op.READ, 2, 0, b"/a\0") and p != (2, 1, 0, b"/a\0")
    assert repr(Packet(2, 1, 0, b"/a\0")) == "Packet(op=2, req_id=1, tx_id=0, payload=b'/a\\x00')"
    assert Packet(Op.READ) == Packet(Op.READ, 0, 0, b"")
    with pytest.raises(AttributeError):
        p.op = 3
    assert pickle.loads(pickle.dumps(p)) == p
    match p:
        case Packet(Op.READ, req_id):
            assert req_id == 1
        case _:
            pytest.fail("match_args")


def test_error_names_and_errno():
    assert ERROR_NAMES[0] == "EINVAL" and ERROR_NAMES[-1] == "EPERM" and len(ERROR_NAMES) == 16
    assert XenStoreError("ENOENT").errno == errno.ENOENT
    assert XenStoreError("EQUOTA").errno == errno.EINVAL  # unknown names count as EINVAL
    assert XenStoreError("EAGAIN").name == "EAGAIN"
