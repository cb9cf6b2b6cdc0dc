"""Guests talk to xenstored over their ring page + event channel, as an
unprivileged connection with their domid (cross-process: hypervisor
service, xenstored, dom0 toolstack, guest processes)."""

from __future__ import annotations

import pytest
import trio

import xenstore

pytestmark = pytest.mark.timeout(60)


async def test_guest_reads_and_writes_relative_paths(toolstack):
    guest = await toolstack.start_guest("g1")
    assert await guest.call("read", "domid") == str(guest.domid)
    assert await guest.call("read", "name") == "g1"
    assert await guest.call("get_domain_path", guest.domid) == guest.home
    await guest.call("write", "data/hello", "world")
    assert await toolstack.xs.read(f"{guest.home}/data/hello") == b"world"
    assert await guest.call("read", f"{guest.home}/data/hello") == "world"
    assert sorted(await guest.call("directory", "data")) == ["hello"]


async def test_guest_is_unprivileged(toolstack):
    guest = await toolstack.start_guest()
    with pytest.raises(xenstore.XenStoreError, match="EACCES"):
        await guest.call("read", "/tool")
    with pytest.raises(xenstore.XenStoreError, match="EACCES"):
        await guest.call("write", "/tool/mine", "x")
    with pytest.raises(xenstore.XenStoreError, match="EACCES"):
        await guest.call("write", "domid", "0")  # n0 r<domid>: read-only for the guest
    with pytest.raises(xenstore.XenStoreError, match="EACCES"):
        await guest.call("is_domain_introduced", guest.domid)  # privileged operation
    assert await toolstack.xs.read(f"{guest.home}/domid") == str(guest.domid).encode()


async def test_guest_owns_what_it_creates_and_quotas_apply(toolstack):
    guest = await toolstack.start_guest()
    await guest.call("write", "data/a/b", "1")
    for node in ("data/a", "data/a/b"):
        perms = await toolstack.xs.get_perms(f"{guest.home}/{node}")
        assert [str(p) for p in perms] == [f"n{guest.domid}"]
    with pytest.raises(xenstore.XenStoreError, match="ENOSPC"):
        await guest.call("write", "data/big", "x" * 2100)  # node-size quota 2048
    await toolstack.xs.write(f"{guest.home}/data/dom0-big", "y" * 2100)  # dom0 is not limited


async def test_replies_larger_than_the_ring(toolstack):
    guest = await toolstack.start_guest()
    xs = toolstack.xs
    big = bytes(range(256)) * 15 + b"end"  # 3843 bytes: ~4 rings' worth
    await xs.write(f"{guest.home}/data/big", big)
    for i in range(150):
        await xs.write(f"{guest.home}/data/dir/child-with-a-long-name-{i:04d}", "")
    got = await guest.call("read", "data/big")
    assert got.encode("latin-1") == big
    names = await guest.call("directory", "data/dir")
    assert len(names) == 150 and sum(len(n) + 1 for n in names) > 1024


async def test_watch_events_arrive_over_the_ring(toolstack):
    guest = await toolstack.start_guest()
    await guest.command(op="watch", path="data/w", id=1)  # relative watch
    assert await guest.next_event(1) == "data/w"  # the initial event
    await toolstack.xs.write(f"{guest.home}/data/w/x", "1")
    assert await guest.next_event(1) == "data/w/x"  # relative again
    await guest.command(op="watch", path="@releaseDomain", id=2)
    with pytest.raises(xenstore.XenStoreError, match="EACCES"):
        await guest.call("read", "/local/domain/0")  # sanity: still unprivileged


async def test_introduce_and_release_fire_special_watches(toolstack):
    xs = toolstack.xs
    async with xs.watch("@introduceDomain") as introduced, xs.watch("@releaseDomain") as released:
        with trio.fail_after(10):
            assert await introduced.receive() == "@introduceDomain"  # initial events
            assert await released.receive() == "@releaseDomain"
            guest = await toolstack.start_guest()
            assert await introduced.receive() == "@introduceDomain"
            assert await xs.is_domain_introduced(guest.domid)
            await xs.release(guest.domid)
            assert await released.receive() == "@releaseDomain"
    assert not await xs.is_domain_introduced(guest.domid)


async def test_release_removes_the_guests_nodes_and_connection(toolstack):
    xs = toolstack.xs
    await xs.write("/shared", "")
    guest = await toolstack.start_guest()
    await xs.set_perms("/shared", ["n0", f"b{guest.domid}"])
    await guest.call("write", "data/mine/x", "1")
    await guest.call("write", f"/shared/orphan{guest.domid}", "1")  # outside its home
    await guest.command(op="watch", path="data", id=1)
    assert await guest.next_event(1) == "data"
    await xs.release(guest.domid)
    assert not await xs.exists(f"{guest.home}/data/mine")
    assert not await xs.exists(f"/shared/orphan{guest.domid}")
    assert not await xs.exists(f"{guest.home}/data")  # guest-owned too (libxl's n<domid>)
    assert await xs.read(f"{guest.home}/domid") == str(guest.domid).encode()  # dom0's stays
    # The daemon unbound the channel: the guest's client is cut off.
    assert await guest.next_event(1) is None  # its watch died with the connection
    reply = await guest.command(op="call", method="read", args=["domid"])
    assert reply.get("error") == "ConnectionClosed", reply
    with pytest.raises(xenstore.XenStoreError, match="ENOENT"):
        await xs.release(guest.domid)


async def test_killed_guest_is_torn_down(toolstack):
    xs = toolstack.xs
    await xs.write("/shared2", "")
    survivor = await toolstack.start_guest("survivor")
    guest = await toolstack.start_guest("victim")
    await xs.set_perms("/shared2", ["n0", f"b{guest.domid}"])
    await guest.call("write", "data/x", "1")
    await guest.call("write", "/shared2/orphan", "1")
    await guest.command(op="watch", path="/shared2", id=1)
    await guest.next_event(1)
    await guest.command(op="tx_start")
    usage = (await xs.control("quota", str(guest.domid))).decode()
    assert "watches         :        1" in usage and "transactions    :        1" in usage
    async with xs.watch("@releaseDomain") as released:
        with trio.fail_after(10):
            await released.receive()  # initial event
            guest.kill()  # kill -9: nobody says goodbye
            assert await released.receive() == "@releaseDomain"
    await toolstack.wait_released(guest.domid)
    assert not await xs.exists("/shared2/orphan")
    assert not await xs.exists(f"{guest.home}/data/x")
    with pytest.raises(xenstore.XenStoreError, match="ENOENT"):
        await xs.control("quota", str(guest.domid))  # connection, watches, transactions gone
    await toolstack.wait_gone(guest.domid)  # xenstored unmapped the page
    assert await survivor.call("read", "name") == "survivor"


async def test_set_target_lets_a_stub_domain_act_for_its_target(toolstack):
    target = await toolstack.start_guest("target")
    stub = await toolstack.start_guest("stub")
    with pytest.raises(xenstore.XenStoreError, match="EACCES"):
        await stub.call("read", f"{target.home}/name")
    await toolstack.xs.set_target(stub.domid, target.domid)
    assert await stub.call("read", f"{target.home}/name") == "target"
    await stub.call("write", f"{target.home}/data/from-stub", "1")  # target's n<target> node


async def test_shutdown_is_reported_once_until_resume(toolstack):
    xs = toolstack.xs
    guest = await toolstack.start_guest()
    async with xs.watch("@releaseDomain") as released:
        with trio.fail_after(10):
            await released.receive()
            await guest.command(op="shutdown", reason=2)  # SHUTDOWN_suspend
            assert await released.receive() == "@releaseDomain"
    assert await xs.is_domain_introduced(guest.domid)  # shut down is not dead
    await xs.resume(guest.domid)
    assert await guest.call("read", "name") == "guest"


async def test_guests_in_parallel_with_pipelined_bursts(toolstack):
    """Three guests pipeline 150 WRITE+READ pairs each (far over the
    outstanding quota of 20; one guest limited to 1) while dom0 watches."""
    xs = toolstack.xs
    guests = [await toolstack.start_guest(f"p{i}") for i in range(3)]
    await xs.set_quota("outstanding", 1, guests[2].domid)
    async with xs.watch("/local/domain") as events:
        with trio.fail_after(30):
            await events.receive()
            results = {}

            async def burst(guest) -> None:
                results[guest.domid] = await guest.command(op="burst", n=150, size=900)

            async with trio.open_nursery() as nursery:
                for guest in guests:
                    nursery.start_soon(burst, guest)
            assert events.receive_nowait().startswith("/local/domain/")
    for guest in guests:
        assert results[guest.domid] == {"ok": []}
        assert len(await xs.directory(f"{guest.home}/data/burst")) == 150
