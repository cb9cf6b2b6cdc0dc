"""PV console page (``io/console.h``: ``struct xencons_interface``)."""

from __future__ import annotations

import ctypes

XENCONS_IN_SIZE = 1024  # backend -> guest (keyboard input)
XENCONS_OUT_SIZE = 2048  # guest -> backend (console output)

# ``connection`` (added in Xen 4.21): written by the backend.
XENCONSOLE_CONNECTED = 0
XENCONSOLE_DISCONNECTED = 1


class XenconsInterface(ctypes.Structure):
    _fields_ = [
        ("in_", ctypes.c_uint8 * XENCONS_IN_SIZE),  # C name: in
        ("out", ctypes.c_uint8 * XENCONS_OUT_SIZE),
        ("in_cons", ctypes.c_uint32),
        ("in_prod", ctypes.c_uint32),
        ("out_cons", ctypes.c_uint32),
        ("out_prod", ctypes.c_uint32),
        ("connection", ctypes.c_uint8),
    ]
