"""XenStore ring page (``io/xs_wire.h``: ``struct xenstore_domain_interface``)."""

from __future__ import annotations

import ctypes

XENSTORE_RING_SIZE = 1024

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_SERVER_FEATURE_WATCHDEPTH = 4
XENSTORE_SERVER_FEATURE_DOMID_ANY = 8

XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1

XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3


class XenstoreDomainInterface(ctypes.Structure):
    _fields_ = [
        ("req", ctypes.c_uint8 * XENSTORE_RING_SIZE),  # guest -> server
        ("rsp", ctypes.c_uint8 * XENSTORE_RING_SIZE),  # server -> guest
        ("req_cons", ctypes.c_uint32),
        ("req_prod", ctypes.c_uint32),
        ("rsp_cons", ctypes.c_uint32),
        ("rsp_prod", ctypes.c_uint32),
        ("server_features", ctypes.c_uint32),
        ("connection", ctypes.c_uint32),
        ("error", ctypes.c_uint32),
        ("evtchn_port", ctypes.c_uint32),  # Xen 4.21+, 0 = use INTRODUCE's port
    ]
