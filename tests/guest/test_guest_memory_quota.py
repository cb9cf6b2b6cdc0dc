"""The per-domain memory quota across processes: a guest writing over its
ring to our xenstored, dom0 watching the figure with ``quota <domid>``."""

from __future__ import annotations

import re

import pytest

import xenstore

pytestmark = pytest.mark.timeout(60)


async def usage(xs, domid: int) -> int:
    text = (await xs.control("quota", str(domid))).decode()
    return int(re.search(r"memory\s*:\s*(\d+)", text).group(1))


async def test_guest_memory_is_accounted_and_limited(toolstack):
    xs = toolstack.xs
    guest = await toolstack.start_guest("memq")
    start = await usage(xs, guest.domid)
    await guest.call("write", "data/v", "x" * 100)
    grown = await usage(xs, guest.domid)
    # The new node (24 + 8 per permission + value + path), its parent's
    # longer child list, maybe a new "data" directory.
    assert grown - start >= 24 + 8 + 100 + len(f"{guest.home}/data/v") + 2
    try:
        await xs.control("quota", "set", "memory", str(grown + 120))
        with pytest.raises(xenstore.XenStoreError, match="EIO"):
            await guest.call("write", "data/w", "y" * 100)
        with pytest.raises(xenstore.XenStoreError, match="EIO"):  # dom0 writing the guest's node
            await xs.write(f"{guest.home}/data/v", "z" * 300)
        assert await usage(xs, guest.domid) == grown
        await guest.call("rm", "data/v")  # removal is never refused, and frees
        await guest.call("write", "data/w", "y" * 100)
    finally:
        await xs.control("quota", "set", "memory", str(2621440))
    assert await usage(xs, guest.domid) < grown + 120
