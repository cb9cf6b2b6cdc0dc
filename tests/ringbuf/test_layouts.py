"""Sizes, offsets and golden bytes of the shared-page layouts (x86_64 ABI).

Expected values are the tables of the Xen fact sheet (§2.1, §6, §9.2, §10.2,
§11.2) and console.h.
"""

import ctypes
import struct

import pytest

from ringbuf.layouts import blkif, console, netif, sring, xenstore


def offsets(structure: type) -> dict[str, int]:
    return {name: getattr(structure, name).offset for name, *_ in structure._fields_}


@pytest.mark.parametrize(
    "structure, size, expected",
    [
        (sring.SringHeader, 64, {"req_prod": 0, "req_event": 4, "rsp_prod": 8, "rsp_event": 12, "pvt": 16, "pad": 20}),
        (blkif.BlkifRequestSegment, 8, {"gref": 0, "first_sect": 4, "last_sect": 5}),
        (
            blkif.BlkifRequest,
            112,
            {"operation": 0, "nr_segments": 1, "handle": 2, "id": 8, "sector_number": 16, "seg": 24},
        ),
        (
            blkif.BlkifRequestDiscard,
            32,
            {"operation": 0, "flag": 1, "handle": 2, "id": 8, "sector_number": 16, "nr_sectors": 24},
        ),
        (
            blkif.BlkifRequestIndirect,
            64,
            {
                "operation": 0,
                "indirect_op": 1,
                "nr_segments": 2,
                "id": 8,
                "sector_number": 16,
                "handle": 24,
                "indirect_grefs": 28,
            },
        ),
        (blkif.BlkifResponse, 16, {"id": 0, "operation": 8, "status": 10}),
        (netif.NetifTxRequest, 12, {"gref": 0, "offset": 4, "flags": 6, "id": 8, "size": 10}),
        (netif.NetifTxResponse, 4, {"id": 0, "status": 2}),
        (netif.NetifRxRequest, 8, {"id": 0, "pad": 2, "gref": 4}),
        (netif.NetifRxResponse, 8, {"id": 0, "offset": 2, "flags": 4, "status": 6}),
        (netif.NetifExtraInfo, 8, {"type": 0, "flags": 1, "u": 2}),
        (netif.NetifCtrlRequest, 16, {"id": 0, "type": 2, "data": 4}),
        (netif.NetifCtrlResponse, 12, {"id": 0, "type": 2, "status": 4, "data": 8}),
        (netif.NetifGref, 8, {"ref": 0, "flags": 4, "status": 6}),
        (
            xenstore.XenstoreDomainInterface,
            2080,
            {
                "req": 0,
                "rsp": 1024,
                "req_cons": 2048,
                "req_prod": 2052,
                "rsp_cons": 2056,
                "rsp_prod": 2060,
                "server_features": 2064,
                "connection": 2068,
                "error": 2072,
                "evtchn_port": 2076,
            },
        ),
        (
            console.XenconsInterface,
            3092,
            {"in_": 0, "out": 1024, "in_cons": 3072, "in_prod": 3076, "out_cons": 3080, "out_prod": 3084, "connection": 3088},
        ),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_size_and_offsets(structure, size, expected):
    assert ctypes.sizeof(structure) == size
    assert offsets(structure) == expected


def test_extra_info_union_members():
    gso = netif.NetifExtraInfoGso
    hash_ = netif.NetifExtraInfoHash
    base = netif.NetifExtraInfo.u.offset
    assert [base + gso.size.offset, base + gso.type.offset, base + gso.features.offset] == [2, 4, 6]
    assert [base + hash_.type.offset, base + hash_.algorithm.offset, base + hash_.value.offset] == [2, 3, 4]
    assert base + netif.NetifExtraInfoMcast.addr.offset == 2


@pytest.mark.parametrize(
    "types, entry_size, entries",
    [
        (blkif.BLKIF_RING, 112, [32, 64, 128, 256, 512]),
        (netif.NETIF_TX_RING, 12, [256, 512, 1024, 2048, 4096]),
        (netif.NETIF_RX_RING, 8, [256, 512, 1024, 2048, 4096]),
        (netif.NETIF_CTRL_RING, 16, [128, 256, 512, 1024, 2048]),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_ring_entry_size_and_entries_per_page_count(types, entry_size, entries):
    assert types.entry_size == entry_size
    assert [types.ring_size(4096 * pages) for pages in (1, 2, 4, 8, 16)] == entries


def test_blkif_request_golden_bytes():
    req = blkif.BlkifRequest(
        operation=blkif.BLKIF_OP_WRITE, nr_segments=2, handle=51712, id=0x1122334455667788, sector_number=2048
    )
    req.seg[0] = blkif.BlkifRequestSegment(gref=9, first_sect=0, last_sect=7)
    req.seg[1] = blkif.BlkifRequestSegment(gref=10, first_sect=1, last_sect=3)
    segs = struct.pack("<IBBxx", 9, 0, 7) + struct.pack("<IBBxx", 10, 1, 3) + bytes(8 * 9)
    assert bytes(req) == struct.pack("<BBH4xQQ", 1, 2, 51712, 0x1122334455667788, 2048) + segs


def test_blkif_variants_golden_bytes():
    d = blkif.BlkifRequestDiscard(
        operation=blkif.BLKIF_OP_DISCARD, flag=blkif.BLKIF_DISCARD_SECURE, handle=3, id=7, sector_number=8, nr_sectors=16
    )
    assert bytes(d) == struct.pack("<BBH4xQQQ", 5, 1, 3, 7, 8, 16)
    ind = blkif.BlkifRequestIndirect(
        operation=blkif.BLKIF_OP_INDIRECT, indirect_op=blkif.BLKIF_OP_READ, nr_segments=600, id=1, sector_number=2, handle=3
    )
    ind.indirect_grefs[:] = list(range(100, 108))
    assert bytes(ind) == struct.pack("<BBH4xQQH2x8I4x", 6, 0, 600, 1, 2, 3, *range(100, 108))
    rsp = blkif.BlkifResponse(id=5, operation=1, status=blkif.BLKIF_RSP_EOPNOTSUPP)
    assert bytes(rsp) == struct.pack("<QBxh4x", 5, 1, -2)


def test_blkif_request_variant_reads_the_copy():
    ind = blkif.BlkifRequestIndirect(operation=blkif.BLKIF_OP_INDIRECT, nr_segments=513, handle=4)
    slot = blkif.BlkifRequest.from_buffer_copy(bytes(ind) + bytes(112 - 64))
    variant = blkif.blkif_request_variant(slot)
    assert isinstance(variant, blkif.BlkifRequestIndirect) and variant.nr_segments == 513
    disc = blkif.BlkifRequestDiscard(operation=blkif.BLKIF_OP_DISCARD, nr_sectors=99)
    slot = blkif.BlkifRequest.from_buffer_copy(bytes(disc) + bytes(112 - 32))
    assert blkif.blkif_request_variant(slot).nr_sectors == 99
    rw = blkif.BlkifRequest(operation=blkif.BLKIF_OP_READ)
    assert blkif.blkif_request_variant(rw) is rw


def test_netif_golden_bytes():
    assert bytes(netif.NetifTxRequest(gref=1, offset=2, flags=netif.NETTXF_more_data, id=4, size=1500)) == struct.pack(
        "<IHHHH", 1, 2, 4, 4, 1500
    )
    assert bytes(netif.NetifTxResponse(id=3, status=netif.NETIF_RSP_DROPPED)) == struct.pack("<Hh", 3, -2)
    assert bytes(netif.NetifRxRequest(id=7, gref=8)) == struct.pack("<HHI", 7, 0, 8)
    assert bytes(netif.NetifRxResponse(id=1, offset=2, flags=3, status=-1)) == struct.pack("<HHHh", 1, 2, 3, -1)
    extra = netif.NetifExtraInfo(type=netif.XEN_NETIF_EXTRA_TYPE_GSO, flags=netif.XEN_NETIF_EXTRA_FLAG_MORE)
    extra.u.gso.size = 1448
    extra.u.gso.type = netif.XEN_NETIF_GSO_TYPE_TCPV4
    assert bytes(extra) == struct.pack("<BBHBBH", 1, 1, 1448, 1, 0, 0)
    assert bytes(netif.NetifCtrlRequest(id=1, type=2, data=(3, 4, 5))) == struct.pack("<HHIII", 1, 2, 3, 4, 5)
    assert bytes(netif.NetifCtrlResponse(id=1, type=2, status=3, data=4)) == struct.pack("<HHII", 1, 2, 3, 4)


def test_sring_header_golden_bytes_after_init():
    buf = bytearray(b"\xaa" * 4096)
    blkif.BLKIF_RING.init_front(buf).release()
    assert bytes(buf[:64]) == struct.pack("<IIII4x44x", 0, 1, 0, 1)
    assert buf[64:] == b"\xaa" * (4096 - 64)  # entries are not touched by SHARED_RING_INIT
