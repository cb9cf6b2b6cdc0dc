from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringbuf.byte_ring import ByteRingRole, ConsoleRing
from xenbus.console import (
    CONSOLE_LIMIT,
    XENCONS_IN_SIZE,
    XENCONS_OUT_SIZE,
    XENCONSOLE_CONNECTED,
    XENCONSOLE_DISCONNECTED,
    ConsoleRingInfo,
    XenconsInterface,
    console_backend_entries,
    console_frontend_entries,
    mask_index,
)
from xenbus.handshake import HandshakeError
from xenbus.paths import DeviceId


def test_page_layout_matches_console_h():
    assert (XENCONS_IN_SIZE, XENCONS_OUT_SIZE) == (1024, 2048)
    assert XenconsInterface.in_.offset == 0
    assert XenconsInterface.out.offset == 1024
    assert [getattr(XenconsInterface, f).offset for f in ("in_cons", "in_prod", "out_cons", "out_prod")] == [
        3072,
        3076,
        3080,
        3084,
    ]
    assert XenconsInterface.connection.offset == 3088
    assert (XENCONSOLE_CONNECTED, XENCONSOLE_DISCONNECTED) == (0, 1)


def test_mask_index():
    assert mask_index(2**32 - 1, 1024) == 1023
    assert mask_index(1024 + 5, 1024) == 5
    with pytest.raises(ValueError):
        mask_index(1, 1000)


def test_primary_console_golden_keys():
    con = DeviceId("console", frontend_domid=3, backend_domid=0, devid=0)
    front = console_frontend_entries(con, ring=ConsoleRingInfo(ring_ref=0xFEFFF, port=2))
    assert front == {
        "backend": "/local/domain/0/backend/console/3/0",
        "backend-id": "0",
        "limit": str(CONSOLE_LIMIT),
        "type": "xenconsoled",
        "output": "pty",
        "tty": "",
        "ring-ref": str(0xFEFFF),
        "port": "2",
    }
    assert console_backend_entries(con) == {
        "frontend": "/local/domain/3/console",
        "frontend-id": "3",
        "online": "1",
        "state": "1",
        "protocol": "vt100",
    }


def test_secondary_console_golden_keys():
    chan = DeviceId("console", frontend_domid=3, backend_domid=0, devid=1)
    front = console_frontend_entries(chan, backend_type="ioemu", output="chardev:libxl-channel1", name="org.qemu.guest_agent.0")
    assert set(front) == {"backend", "backend-id", "state", "protocol", "name", "limit", "type", "output", "tty"}
    assert front["state"] == "1" and front["protocol"] == "vt100"
    back = console_backend_entries(chan, name="org.qemu.guest_agent.0", connection="socket", path="/run/x.sock")
    assert set(back) == {"frontend", "frontend-id", "online", "state", "protocol", "name", "connection", "path"}
    # The frontend publishes its ring with "port", not "event-channel".
    assert ConsoleRingInfo(ring_ref=8, port=5).to_assoc() == {"ring-ref": "8", "port": "5"}
    with pytest.raises(ValueError):
        console_frontend_entries(DeviceId("vif", 3, 0, 0))


@given(st.integers(0, 2**64 - 1), st.integers(1, 2**32 - 1))
def test_ring_info_round_trip(ref, port):
    info = ConsoleRingInfo(ref, port)
    assert ConsoleRingInfo.of_assoc(info.to_assoc()) == info


@pytest.mark.parametrize(
    "values", [{}, {"ring-ref": "1"}, {"ring-ref": "1", "port": "0"}, {"ring-ref": "x", "port": "1"}]
)
def test_ring_info_rejects(values):
    with pytest.raises(HandshakeError):
        ConsoleRingInfo.of_assoc(values)


@given(st.lists(st.binary(min_size=0, max_size=700), max_size=12))
def test_console_page_carries_guest_output(chunks):
    """The page semantics through ringbuf's ConsoleRing: guest writes ``out``,
    backend reads it, across index wrap-around."""
    page = bytearray(4096)
    iface = XenconsInterface.from_buffer(page)
    start = 2**32 - 100  # start near the wrap of the free-running indices
    iface.out_cons = iface.out_prod = start
    iface.in_cons = iface.in_prod = start
    del iface
    guest = ConsoleRing(page, ByteRingRole.GUEST)
    backend = ConsoleRing(page, ByteRingRole.SERVER)
    sent = bytearray()
    received = bytearray()
    for chunk in chunks:
        n = guest.write(chunk)
        sent += chunk[:n]
        received += backend.read()
    assert bytes(received) == bytes(sent)
    backend.write(b"keys")
    assert guest.read() == b"keys"
    for ring in (guest, backend):
        ring.release()
