"""Guests talk to xenstored over their ring: smoke."""

from __future__ import annotations

import pytest
import trio

import xenstore

pytestmark = pytest.mark.timeout(60)


async def test_guest_reads_and_writes_relative_paths(toolstack):
    guest = await toolstack.start_guest("g1")
    assert await guest.call("read", "domid") == str(guest.domid)
    assert await guest.call("read", "name") == "g1"
    await guest.call("write", "data/hello", "world")
    assert await toolstack.xs.read(f"{guest.home}/data/hello") == b"world"
