"""Block device ring structures (``io/blkif.h``), x86_64 ABI layout."""

from __future__ import annotations

import ctypes

from ..ring import define_ring_types

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_SEGMENTS_PER_INDIRECT_PAGE = 4096 // 8
BLKIF_DISCARD_SECURE = 0x1

BLKIF_RSP_OKAY = 0
BLKIF_RSP_ERROR = -1
BLKIF_RSP_EOPNOTSUPP = -2

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

SECTOR_SIZE = 512  # unit of sector_number, first/last_sect, nr_sectors


class BlkifRequestSegment(ctypes.Structure):
    _fields_ = [
        ("gref", ctypes.c_uint32),
        ("first_sect", ctypes.c_uint8),
        ("last_sect", ctypes.c_uint8),
    ]  # + 2 bytes tail padding from natural alignment: 8 bytes


class BlkifRequest(ctypes.Structure):
    """Read / write / barrier / flush (112 bytes: the ring entry size)."""

    _fields_ = [
        ("operation", ctypes.c_uint8),
        ("nr_segments", ctypes.c_uint8),
        ("handle", ctypes.c_uint16),
        ("id", ctypes.c_uint64),  # natural alignment puts it at 8
        ("sector_number", ctypes.c_uint64),
        ("seg", BlkifRequestSegment * BLKIF_MAX_SEGMENTS_PER_REQUEST),
    ]


class BlkifRequestDiscard(ctypes.Structure):
    _fields_ = [
        ("operation", ctypes.c_uint8),
        ("flag", ctypes.c_uint8),
        ("handle", ctypes.c_uint16),
        ("id", ctypes.c_uint64),
        ("sector_number", ctypes.c_uint64),
        ("nr_sectors", ctypes.c_uint64),
    ]


class BlkifRequestIndirect(ctypes.Structure):
    _fields_ = [
        ("operation", ctypes.c_uint8),
        ("indirect_op", ctypes.c_uint8),
        ("nr_segments", ctypes.c_uint16),
        ("id", ctypes.c_uint64),
        ("sector_number", ctypes.c_uint64),
        ("handle", ctypes.c_uint16),
        ("indirect_grefs", ctypes.c_uint32 * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
    ]


class BlkifResponse(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("operation", ctypes.c_uint8),
        ("status", ctypes.c_int16),
    ]


BlkifAnyRequest = BlkifRequest | BlkifRequestDiscard | BlkifRequestIndirect


def blkif_request_variant(request: BlkifRequest) -> BlkifAnyRequest:
    """Reinterpret a *private copy* of a ring request by its operation byte.

    The ring hands out copies (RING_COPY_REQUEST), so the operation byte read
    here cannot change underneath the variant we return.
    """
    op = request.operation
    if op == BLKIF_OP_DISCARD:
        return BlkifRequestDiscard.from_buffer_copy(request)
    if op == BLKIF_OP_INDIRECT:
        return BlkifRequestIndirect.from_buffer_copy(request)
    return request


BLKIF_RING = define_ring_types("blkif", BlkifRequest, BlkifResponse)
