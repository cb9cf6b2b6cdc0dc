from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbus.handshake import (
    ERROR_VALUE_MAX,
    BlkBackendDisk,
    BlkBackendFeatures,
    BlkFrontendRings,
    HandshakeError,
    NetBackendFeatures,
    NetFrontendRings,
    NetQueue,
    OtherEnd,
    Protocol,
    RingQueue,
    feature_flags,
    format_error,
    negotiate_features,
    parse_error,
    read_flag,
    read_other_end,
    read_protocol,
    read_uint,
    ring_ref_keys,
)
from xenbus.state import Role

u32 = st.integers(0, 2**32 - 1)

# ---------------------------------------------------------------------------
# Golden key sets (fact sheet 9.5, 10.5)


def test_vbd_backend_probe_keys():
    assert BlkBackendFeatures(max_indirect_segments=256, max_queues=4, max_ring_page_order=4).to_assoc() == {
        "feature-max-indirect-segments": "256",
        "multi-queue-max-queues": "4",
        "max-ring-page-order": "4",
    }
    assert set(BlkBackendFeatures().to_assoc()) == {"multi-queue-max-queues", "max-ring-page-order"}


def test_vbd_frontend_single_page_single_queue():
    rings = BlkFrontendRings((RingQueue((8,), 17),))
    assert rings.to_assoc() == {
        "ring-ref": "8",
        "event-channel": "17",
        "protocol": "x86_64-abi",
        "feature-persistent": "0",
    }


def test_vbd_frontend_two_queues_two_pages():
    # The example of blkif.h / fact sheet 9.3.2.
    rings = BlkFrontendRings((RingQueue((10, 11), 5), RingQueue((12, 13), 6)), ring_page_order=1, persistent=True)
    assert rings.to_assoc() == {
        "ring-page-order": "1",
        "multi-queue-num-queues": "2",
        "queue-0/ring-ref0": "10",
        "queue-0/ring-ref1": "11",
        "queue-0/event-channel": "5",
        "queue-1/ring-ref0": "12",
        "queue-1/ring-ref1": "13",
        "queue-1/event-channel": "6",
        "protocol": "x86_64-abi",
        "feature-persistent": "1",
    }


def test_vbd_backend_connect_keys():
    disk = BlkBackendDisk(sectors=2097152, info=0, sector_size=512)
    assert set(disk.to_assoc()) == {
        "feature-flush-cache",
        "feature-barrier",
        "feature-discard",
        "feature-persistent",
        "sectors",
        "info",
        "sector-size",
        "physical-sector-size",
    }
    with_discard = BlkBackendDisk(sectors=8, sector_size=4096, discard=True, discard_secure=True).to_assoc()
    assert with_discard["discard-granularity"] == "4096"
    assert with_discard["discard-alignment"] == "0"
    assert with_discard["discard-secure"] == "1"
    assert with_discard["physical-sector-size"] == "4096"


def test_vif_backend_probe_keys():
    assert set(NetBackendFeatures(max_queues=8).to_assoc()) == {
        "feature-sg",
        "feature-gso-tcpv4",
        "feature-gso-tcpv6",
        "feature-ipv6-csum-offload",
        "feature-rx-copy",
        "feature-rx-flip",
        "feature-multicast-control",
        "feature-dynamic-multicast-control",
        "feature-split-event-channels",
        "multi-queue-max-queues",
        "feature-ctrl-ring",
    }
    assert NetBackendFeatures().to_assoc()["feature-rx-flip"] == "0"
    assert "multi-queue-max-queues" not in NetBackendFeatures().to_assoc()


def test_vif_frontend_flat_keys():
    rings = NetFrontendRings((NetQueue(tx_ring_ref=9, rx_ring_ref=10, event_channel_tx=3),))
    assert rings.to_assoc() == {
        "tx-ring-ref": "9",
        "rx-ring-ref": "10",
        "event-channel": "3",
        "request-rx-copy": "1",
        "feature-rx-notify": "1",
        "feature-sg": "1",
        "feature-gso-tcpv4": "1",
        "feature-gso-tcpv6": "1",
        "feature-ipv6-csum-offload": "1",
    }


def test_vif_frontend_two_queues_split_channels():
    # The example of netif.h / fact sheet 10.3.2.
    rings = NetFrontendRings(
        (NetQueue(1, 2, 10, 11), NetQueue(3, 4, 12, 13)),
        multi_queue=True,
    )
    keys = rings.to_assoc()
    assert keys["multi-queue-num-queues"] == "2"
    assert {k for k in keys if k.startswith("queue-")} == {
        f"queue-{n}/{k}"
        for n in (0, 1)
        for k in ("tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx")
    }
    # Never the top-level ring/channel keys with several queues.
    assert not {"tx-ring-ref", "rx-ring-ref", "event-channel"} & set(keys)


def test_vif_queues_need_advertised_multi_queue():
    with pytest.raises(ValueError):
        NetFrontendRings((NetQueue(1, 2, 3), NetQueue(4, 5, 6)))
    # One queue with an advertising backend writes num-queues = 1.
    assert NetFrontendRings((NetQueue(1, 2, 3),), multi_queue=True).to_assoc()["multi-queue-num-queues"] == "1"


# ---------------------------------------------------------------------------
# Round trips


@st.composite
def blk_rings(draw):
    order = draw(st.integers(0, 3))
    n = draw(st.integers(1, 4))
    queues = tuple(
        RingQueue(tuple(draw(st.lists(u32, min_size=1 << order, max_size=1 << order))), draw(u32))
        for _ in range(n)
    )
    return BlkFrontendRings(queues, order, draw(st.sampled_from(list(Protocol))), draw(st.booleans()))


@given(blk_rings())
@settings(max_examples=200, deadline=None)
def test_blk_rings_round_trip(rings):
    limits = BlkBackendFeatures(max_queues=4, max_ring_page_order=3)
    assert BlkFrontendRings.of_assoc(rings.to_assoc(), limits) == rings


@given(st.builds(BlkBackendFeatures, st.integers(0, 4096), st.integers(1, 64), st.integers(0, 8)))
def test_blk_features_round_trip(features):
    assert BlkBackendFeatures.of_assoc(features.to_assoc()) == features


@st.composite
def blk_disks(draw):
    sector_size = 1 << draw(st.integers(9, 16))
    discard = draw(st.booleans())
    return BlkBackendDisk(
        sectors=draw(st.integers(0, 2**64 - 1)),
        info=draw(st.integers(0, 7)),
        sector_size=sector_size,
        physical_sector_size=sector_size << draw(st.integers(0, 3)),
        flush_cache=draw(st.booleans()),
        barrier=draw(st.booleans()),
        discard=discard,
        discard_granularity=draw(st.integers(1, 2**20)) if discard else None,
        discard_alignment=draw(st.integers(0, 2**20)) if discard else 0,
        discard_secure=draw(st.booleans()) if discard else False,
        persistent=draw(st.booleans()),
    )


@given(blk_disks())
@settings(max_examples=200, deadline=None)
def test_blk_disk_round_trip(disk):
    assert BlkBackendDisk.of_assoc(disk.to_assoc()) == disk


net_backends = st.builds(
    NetBackendFeatures,
    sg=st.booleans(),
    gso_tcpv4=st.booleans(),
    gso_tcpv6=st.booleans(),
    ipv6_csum_offload=st.booleans(),
    multicast_control=st.booleans(),
    dynamic_multicast_control=st.booleans(),
    split_event_channels=st.booleans(),
    max_queues=st.one_of(st.none(), st.integers(1, 16)),
    ctrl_ring=st.booleans(),
)


@given(net_backends)
def test_net_backend_round_trip(features):
    assert NetBackendFeatures.of_assoc(features.to_assoc()) == features


@st.composite
def net_rings(draw):
    multi = draw(st.booleans())
    n = draw(st.integers(1, 4)) if multi else 1
    split = draw(st.booleans())
    queues = tuple(NetQueue(draw(u32), draw(u32), draw(u32), draw(u32) if split else None) for _ in range(n))
    ctrl = draw(st.booleans())
    return NetFrontendRings(
        queues,
        sg=draw(st.booleans()),
        no_csum_offload=draw(st.booleans()),
        request_multicast_control=draw(st.booleans()),
        ctrl_ring_ref=draw(u32) if ctrl else None,
        ctrl_event_channel=draw(u32) if ctrl else None,
        multi_queue=multi,
    )


@given(net_rings())
@settings(max_examples=200, deadline=None)
def test_net_rings_round_trip(rings):
    assert NetFrontendRings.of_assoc(rings.to_assoc(), NetBackendFeatures(max_queues=4)) == rings


# ---------------------------------------------------------------------------
# Validation of peer input


def test_backend_rejects_too_many_queues_and_pages():
    limits = BlkBackendFeatures(max_queues=2, max_ring_page_order=1)
    three = BlkFrontendRings(tuple(RingQueue((1,), 1) for _ in range(3))).to_assoc()
    with pytest.raises(HandshakeError) as info:
        BlkFrontendRings.of_assoc(three, limits)
    assert info.value.key == "multi-queue-num-queues" and info.value.errno == errno.EINVAL
    big = BlkFrontendRings((RingQueue((1, 2, 3, 4), 1),), ring_page_order=2).to_assoc()
    with pytest.raises(HandshakeError) as info:
        BlkFrontendRings.of_assoc(big, limits)
    assert info.value.key == "ring-page-order"
    with pytest.raises(HandshakeError):
        BlkFrontendRings.of_assoc({"multi-queue-num-queues": "0", "ring-ref": "1", "event-channel": "2"}, limits)


def test_backend_reports_missing_and_bad_keys():
    limits = BlkBackendFeatures()
    with pytest.raises(HandshakeError) as info:
        BlkFrontendRings.of_assoc({"event-channel": "3"}, limits)
    assert (info.value.errno, info.value.key) == (errno.ENOENT, "ring-ref")
    with pytest.raises(HandshakeError) as info:
        BlkFrontendRings.of_assoc({"ring-ref": "0x10", "event-channel": "3"}, limits)
    assert (info.value.errno, info.value.key) == (errno.EINVAL, "ring-ref")
    with pytest.raises(HandshakeError) as info:
        BlkFrontendRings.of_assoc({"ring-ref": "1", "event-channel": "3", "protocol": "vax-abi"}, limits)
    assert (info.value.errno, info.value.key) == (errno.ENOSYS, "protocol")
    with pytest.raises(HandshakeError):
        BlkFrontendRings.of_assoc({"ring-ref": "4294967296", "event-channel": "3"}, limits)


def test_ring_ref_naming():
    assert ring_ref_keys(0) == ["ring-ref"]
    assert ring_ref_keys(2) == ["ring-ref0", "ring-ref1", "ring-ref2", "ring-ref3"]
    # A one-page ring is read from ring-ref only (not ring-ref0).
    with pytest.raises(HandshakeError):
        BlkFrontendRings.of_assoc({"ring-ref0": "1", "event-channel": "2"}, BlkBackendFeatures())


def test_frontend_rejects_bad_disk():
    good = BlkBackendDisk(sectors=100).to_assoc()
    for key, value in [("sector-size", "1000"), ("sector-size", "256"), ("physical-sector-size", "768")]:
        with pytest.raises(HandshakeError):
            BlkBackendDisk.of_assoc({**good, key: value})
    missing = dict(good)
    del missing["info"]
    with pytest.raises(HandshakeError) as info:
        BlkBackendDisk.of_assoc(missing)
    assert info.value.key == "info"
    assert BlkBackendDisk.of_assoc({k: good[k] for k in ("sectors", "info", "sector-size")}).physical_sector_size == 512


def test_net_validation():
    with pytest.raises(HandshakeError) as info:
        NetBackendFeatures.of_assoc({"feature-sg": "1"})
    assert info.value.errno == errno.EOPNOTSUPP
    flat = NetFrontendRings((NetQueue(1, 2, 3),)).to_assoc()
    no_copy = dict(flat, **{"request-rx-copy": "0"})
    with pytest.raises(HandshakeError) as info:
        NetFrontendRings.of_assoc(no_copy, NetBackendFeatures())
    assert info.value.key == "request-rx-copy"
    too_many = NetFrontendRings((NetQueue(1, 2, 3), NetQueue(4, 5, 6)), multi_queue=True).to_assoc()
    with pytest.raises(HandshakeError):
        NetFrontendRings.of_assoc(too_many, NetBackendFeatures())  # never advertised
    no_channel = {k: v for k, v in flat.items() if k != "event-channel"}
    with pytest.raises(HandshakeError) as info:
        NetFrontendRings.of_assoc(no_channel, NetBackendFeatures())
    assert info.value.key == "event-channel"


def test_flags_are_lenient_like_xenbus_read_unsigned():
    assert read_flag({"f": "1"}, "f") is True
    assert read_flag({"f": "0"}, "f", default=True) is False
    assert read_flag({"f": "2xyz"}, "f") is True  # %u stops at the first non-digit
    assert read_flag({"f": "yes"}, "f", default=True) is True
    assert read_flag({}, "f") is False
    assert read_flag({"f": b"1"}, "f") is True
    assert feature_flags({"feature-sg": "1", "feature-x": "0", "mac": "aa"}) == {"feature-sg": True, "feature-x": False}
    assert negotiate_features({"feature-sg": True, "feature-y": False}, {"feature-sg": True, "feature-y": True}) == {
        "feature-sg"
    }


def test_read_uint_strict():
    assert read_uint({"k": "42"}, "k") == 42
    assert read_uint({}, "k", default=7) == 7
    for bad in ["", "-1", " 1", "1 ", "1e3", "٣"]:
        with pytest.raises(HandshakeError):
            read_uint({"k": bad}, "k")


def test_protocol():
    assert read_protocol({}) is Protocol.X86_64
    assert read_protocol({"protocol": ""}) is Protocol.X86_64
    assert read_protocol({"protocol": "x86_32-abi"}) is Protocol.X86_32


def test_other_end():
    assert read_other_end(Role.FRONTEND, {"backend": "/local/domain/0/backend/vbd/5/51712", "backend-id": "0"}) == (
        OtherEnd("/local/domain/0/backend/vbd/5/51712", 0)
    )
    assert read_other_end(Role.BACKEND, {"frontend": "/local/domain/5/device/vif/0", "frontend-id": "5"}).state_path == (
        "/local/domain/5/device/vif/0/state"
    )
    for values in [
        {},
        {"backend": "relative/path", "backend-id": "0"},
        {"backend": "/a//b", "backend-id": "0"},
        {"backend": "/a/b", "backend-id": "32752"},
        {"backend": "/a/b"},
    ]:
        with pytest.raises(HandshakeError):
            read_other_end(Role.FRONTEND, values)


# ---------------------------------------------------------------------------
# Error nodes


def test_error_format_like_linux():
    assert format_error(errno.ENOMEM, "allocating device memory") == "12 allocating device memory"
    assert format_error(-errno.EINVAL, "bad ring") == "22 bad ring"
    long = format_error(5, "é" * 5000)
    assert len(long.encode()) <= ERROR_VALUE_MAX
    assert long.startswith("5 é")
    assert parse_error("12 allocating device memory") == (12, "allocating device memory")
    assert parse_error(b"22 ") == (22, "")
    with pytest.raises(ValueError):
        parse_error("oops")


@given(st.integers(-4095, 4095), st.text(max_size=100))
def test_error_round_trip(code, message):
    assert parse_error(format_error(code, message)) == (abs(code), message)


# ---------------------------------------------------------------------------
# Hostile peers: arbitrary maps only ever raise HandshakeError.

hostile_values = st.dictionaries(
    st.sampled_from(
        [
            "ring-ref",
            "ring-ref0",
            "ring-ref1",
            "event-channel",
            "protocol",
            "ring-page-order",
            "multi-queue-num-queues",
            "queue-0/ring-ref",
            "queue-0/event-channel",
            "queue-1/ring-ref",
            "queue-1/event-channel",
            "feature-persistent",
            "sectors",
            "info",
            "sector-size",
            "physical-sector-size",
            "feature-discard",
            "discard-granularity",
            "tx-ring-ref",
            "rx-ring-ref",
            "event-channel-tx",
            "event-channel-rx",
            "request-rx-copy",
            "feature-rx-copy",
            "multi-queue-max-queues",
            "ctrl-ring-ref",
            "event-channel-ctrl",
            "queue-0/tx-ring-ref",
            "queue-0/rx-ring-ref",
            "backend",
            "backend-id",
        ]
    ),
    st.one_of(
        st.sampled_from(["0", "1", "2", "3", "4096", "512", "x86_64-abi", "4294967296", "", "-1", "/a"]),
        st.text(max_size=8),
        st.binary(max_size=8),
    ),
    max_size=12,
)


@given(hostile_values)
@settings(max_examples=400, deadline=None)
def test_parsers_never_crash_on_peer_input(values):
    parsers = [
        lambda v: BlkFrontendRings.of_assoc(v, BlkBackendFeatures(max_queues=2, max_ring_page_order=1)),
        BlkBackendFeatures.of_assoc,
        BlkBackendDisk.of_assoc,
        NetBackendFeatures.of_assoc,
        lambda v: NetFrontendRings.of_assoc(v, NetBackendFeatures(max_queues=2)),
        lambda v: read_other_end(Role.FRONTEND, v),
    ]
    for parse in parsers:
        try:
            parse(values)
        except HandshakeError as exc:
            assert exc.errno > 0


def test_frontend_choices_stay_within_backend_limits():
    limits = BlkBackendFeatures(max_queues=4, max_ring_page_order=2)
    assert limits.choose(queues=8, ring_page_order=5) == (4, 2)
    assert limits.choose(queues=2, ring_page_order=0) == (2, 0)
    assert BlkBackendFeatures.of_assoc({}).choose(queues=8, ring_page_order=4) == (1, 0)
    assert NetBackendFeatures().choose_queues(8) == 1
    assert NetBackendFeatures(max_queues=4).choose_queues(8) == 4


@given(st.integers(0, 64), st.integers(0, 8), st.integers(1, 64), st.integers(0, 8))
def test_choices_are_accepted_by_the_backend(max_q, max_o, want_q, want_o):
    limits = BlkBackendFeatures(max_queues=max(1, max_q), max_ring_page_order=max_o)
    queues, order = limits.choose(queues=want_q, ring_page_order=want_o)
    rings = BlkFrontendRings(tuple(RingQueue(tuple(range(1 << order)), 1) for _ in range(queues)), order)
    assert BlkFrontendRings.of_assoc(rings.to_assoc(), limits) == rings
