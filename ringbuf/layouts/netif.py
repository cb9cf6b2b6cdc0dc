"""Network device ring structures (``io/netif.h``); identical for every ABI."""

from __future__ import annotations

import ctypes

from ..ring import define_ring_types

NETTXF_csum_blank = 0x01
NETTXF_data_validated = 0x02
NETTXF_more_data = 0x04
NETTXF_extra_info = 0x08

# RX bits 0 and 1 are swapped relative to TX.
NETRXF_data_validated = 0x01
NETRXF_csum_blank = 0x02
NETRXF_more_data = 0x04
NETRXF_extra_info = 0x08
NETRXF_gso_prefix = 0x10

XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5
XEN_NETIF_EXTRA_FLAG_MORE = 0x01

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1

XEN_NETIF_MAX_TX_SIZE = 0xFFFF
XEN_NETIF_NR_SLOTS_MIN = 18


class NetifTxRequest(ctypes.Structure):
    _fields_ = [
        ("gref", ctypes.c_uint32),
        ("offset", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("id", ctypes.c_uint16),
        ("size", ctypes.c_uint16),  # first slot: whole packet length
    ]


class NetifTxResponse(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("status", ctypes.c_int16)]


class NetifRxRequest(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("pad", ctypes.c_uint16), ("gref", ctypes.c_uint32)]


class NetifRxResponse(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint16),
        ("offset", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),  # > 0: bytes of data; <= 0: NETIF_RSP_*
    ]


class NetifExtraInfoGso(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("features", ctypes.c_uint16),
    ]


class NetifExtraInfoMcast(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 6)]


class NetifExtraInfoHash(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("algorithm", ctypes.c_uint8),
        ("value", ctypes.c_uint8 * 4),
    ]


class NetifExtraInfoUnion(ctypes.Union):
    _fields_ = [
        ("gso", NetifExtraInfoGso),
        ("mcast", NetifExtraInfoMcast),
        ("hash", NetifExtraInfoHash),
        ("pad", ctypes.c_uint16 * 3),
    ]


class NetifExtraInfo(ctypes.Structure):
    """Occupies a TX request slot (12 bytes, last 4 unused) or an RX response slot."""

    _fields_ = [
        ("type", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("u", NetifExtraInfoUnion),
    ]


class NetifCtrlRequest(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("type", ctypes.c_uint16), ("data", ctypes.c_uint32 * 3)]


class NetifCtrlResponse(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint16),
        ("type", ctypes.c_uint16),
        ("status", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
    ]


class NetifGref(ctypes.Structure):
    _fields_ = [("ref", ctypes.c_uint32), ("flags", ctypes.c_uint16), ("status", ctypes.c_uint16)]


NETIF_TX_RING = define_ring_types("netif_tx", NetifTxRequest, NetifTxResponse)
NETIF_RX_RING = define_ring_types("netif_rx", NetifRxRequest, NetifRxResponse)
NETIF_CTRL_RING = define_ring_types("xen_netif_ctrl", NetifCtrlRequest, NetifCtrlResponse)
