"""The hypervisor service in its own process, used by dom0 and guest domains.

Guests are either separate processes (spawn_guest) or a second connection
from the test process (``open_hypervisor(fd=...)``): both are real domains,
the service only knows them by their connection.
"""

from __future__ import annotations

import mmap
import os
import socket
import sys
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from ringbuf import (PAGE_SIZE, VIRQ_DOM_EXC, CopySegment, CopySide, GrantError, HypervisorError,
                     PeerClosedError, open_hypervisor)
from ringbuf.grants import (GNTST_bad_domain, GNTST_bad_gntref, GNTST_eagain, GNTST_general_error,
                            GNTST_okay, GTF_permit_access, GTF_reading, GTF_writing)
from ringbuf.hypervisor.domains import SHUTDOWN_poweroff

GUEST = """
    import sys, trio
    from ringbuf import open_hypervisor

    async def main():
        async with open_hypervisor() as hv:
            hv.memory.page(5)[:11] = b"from guest!"
            ref = hv.grant_access(0, 5)
            ro_ref = hv.grant_access(0, 6, readonly=True)
            chan = await hv.alloc_unbound(0)
            print(hv.domid, ref, ro_ref, chan.port, flush=True)
            for _ in range(int(sys.argv[1])):
                await chan.wait()
                chan.notify()
            await chan.wait()
            print(bytes(hv.memory.page(5)[:11]).decode(), flush=True)
            await trio.sleep_forever()

    trio.run(main)
"""


async def _readline(proc) -> str:
    return (await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)).strip()


async def _wait_gone(dom0, domid):
    while await dom0.domain_info(domid) is not None:
        await trio.sleep(0.01)


@asynccontextmanager
async def _wakes_with_peer_closed(chan) -> AsyncIterator[None]:
    """The block must wake a task blocked in ``chan.wait()`` with PeerClosedError."""

    async def expect_peer_closed():
        with pytest.raises(PeerClosedError):
            await chan.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(expect_peer_closed)
        await trio.testing.wait_all_tasks_blocked()
        yield


async def test_guest_process_memory_grants_evtchn_and_death(hypervisor_socket, spawn_guest):
    rounds = 50
    async with open_hypervisor(hypervisor_socket) as dom0:
        assert (dom0.domid, dom0.privileged) == (0, True)
        virq = await dom0.bind_virq(VIRQ_DOM_EXC)
        domid, fd = await dom0.create_domain(nr_pages=32)
        proc = spawn_guest(fd, GUEST, str(rounds))
        os.close(fd)
        with trio.fail_after(30):
            gdomid, ref, ro_ref, port = map(int, (await _readline(proc)).split())
            assert gdomid == domid >= 1

            # the same physical memory, seen through dom0's foreign mapping
            memory, gnttab = await dom0.foreign_memory(domid)
            assert bytes(memory.page(5)[:11]) == b"from guest!"
            memory.close()
            gnttab.close()

            # grant map: read-write and read-only
            rw = await dom0.map_grants(domid, [ref])
            assert bytes(rw.buffer[:11]) == b"from guest!"
            ro = await dom0.map_grants(domid, [ro_ref], readonly=True)
            with pytest.raises(TypeError):
                ro.buffer[0] = 1  # writing through a read-only grant fails
            with pytest.raises(GrantError) as err:
                await dom0.map_grants(domid, [ro_ref], readonly=False)
            assert err.value.status == GNTST_general_error
            await dom0.unmap_grants(ro)

            # event channel ping-pong, the service not on the path
            chan = await dom0.bind_interdomain(domid, port)
            await chan.wait()  # a freshly bound port starts pending
            for _ in range(rounds):
                chan.notify()
                await chan.wait()

            rw.buffer[:11] = b"from dom0!!"
            chan.notify()
            assert await _readline(proc) == "from dom0!!"

            # kill the guest: a blocked waiter wakes with PeerClosedError,
            # VIRQ_DOM_EXC fires, the domain stays dying while we map its page
            async with _wakes_with_peer_closed(chan):
                proc.kill()
                await virq.wait()
            info = await dom0.domain_info(domid)
            assert info is not None and info.dying
            await dom0.unmap_grants(rw)
            await _wait_gone(dom0, domid)
            assert [d.domid for d in await dom0.list_domains()] == [0]


async def test_read_only_grant_fd_refuses_writable_mmap(hypervisor_socket):
    with trio.fail_after(20):
        await _read_only_fd_check(hypervisor_socket)


async def _read_only_fd_check(hypervisor_socket):
    async with open_hypervisor(hypervisor_socket) as dom0:
        ref = dom0.grant_access(0, 3, readonly=True)  # a grant to ourselves
        result, fds = await dom0._call("map_grants", domid=0, refs=[ref], readonly=True)
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(fds[0], PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=result["frames"][0] * PAGE_SIZE)
        finally:
            for fd in fds:
                os.close(fd)
        await dom0._call_no_fds("unmap_grants", handle=result["handle"])
        await dom0.end_access(ref)


async def test_map_refusals_and_end_access_while_mapped(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            domid, fd = await dom0.create_domain(nr_pages=16)
            async with open_hypervisor(fd=fd) as guest:
                assert guest.domid == domid and not guest.privileged
                not_ours = guest.grant_access(7, 1)  # granted to another domain
                ours = guest.grant_access(0, 2)
                with pytest.raises(GrantError) as err:
                    await dom0.map_grants(domid, [not_ours])
                assert err.value.status == GNTST_general_error
                with pytest.raises(GrantError) as err:
                    await dom0.map_grants(domid, [guest.grant_table.nr_entries])
                assert err.value.status == GNTST_bad_gntref
                with pytest.raises(GrantError) as err:
                    await dom0.map_grants(999, [ours])
                assert err.value.status == GNTST_bad_domain
                # a guest cannot use dom0's identity to map
                with pytest.raises(GrantError):
                    await guest.map_grants(domid, [ours])

                mapping = await dom0.map_grants(domid, [ours])
                assert guest.grant_table.flags(ours) == GTF_permit_access | GTF_reading | GTF_writing
                with pytest.raises(GrantError) as err:
                    await guest.end_access(ours)
                assert err.value.status == GNTST_eagain
                guest.memory.page(2)[:3] = b"abc"
                assert bytes(mapping.pages[0][:3]) == b"abc"
                await dom0.unmap_grants(mapping)
                assert guest.grant_table.flags(ours) == GTF_permit_access
                await guest.end_access(ours)
                assert guest.grant_table.flags(ours) == 0


async def test_dead_guest_mappings_and_ports_are_cleaned_up(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            virq = await dom0.bind_virq(VIRQ_DOM_EXC)
            domid, fd = await dom0.create_domain(nr_pages=16)
            ref = dom0.grant_access(domid, 10)
            dom0_chan = await dom0.alloc_unbound(domid)
            async with open_hypervisor(fd=fd) as guest:
                mapping = await guest.map_grants(0, [ref])
                mapping.buffer[:4] = b"ping"
                await guest.bind_interdomain(0, dom0_chan.port)
                assert dom0.grant_table.flags(ref) & GTF_writing
                with pytest.raises(GrantError):
                    await dom0.end_access(ref)
                del mapping  # the guest dies with it mapped
            # connection closed = domain died
            await virq.wait()
            with pytest.raises(PeerClosedError):
                await dom0_chan.wait()
            await _wait_gone(dom0, domid)
            assert bytes(dom0.memory.page(10)[:4]) == b"ping"
            assert dom0.grant_table.flags(ref) == GTF_permit_access  # its mapping was released
            await dom0.end_access(ref)
            status = await dom0.port_status(dom0_chan.port)
            assert status["state"] == 1  # unbound again, as in Xen


async def test_guests_are_not_privileged(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            domid, fd = await dom0.create_domain(nr_pages=8)
            async with open_hypervisor(fd=fd) as guest:
                for call in (guest.create_domain(4), guest.bind_virq(VIRQ_DOM_EXC),
                             guest.foreign_memory(0), guest.domain_info(0), guest.list_domains(),
                             guest.destroy_domain(0)):
                    with pytest.raises(HypervisorError) as err:
                        await call
                    assert err.value.code == "EPERM"
                own = await guest.domain_info()
                assert own.domid == domid and not own.privileged


async def test_malformed_messages_drop_only_that_connection(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            for garbage in (b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1t\xa3rep"):
                raw = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with raw:
                    await raw.connect(hypervisor_socket)
                    await raw.send(garbage)
                    assert await raw.recv(100) == b""  # disconnected
            # a well-formed request with bad arguments gets an error reply
            with pytest.raises(HypervisorError) as err:
                await dom0._call("map_grants", domid="x", refs=[], readonly=False)
            assert err.value.code == "EINVAL"
            assert (await dom0.domain_info(0)).privileged


async def test_destroy_and_shutdown(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            virq = await dom0.bind_virq(VIRQ_DOM_EXC)
            domid, fd = await dom0.create_domain(nr_pages=8)
            async with open_hypervisor(fd=fd) as guest:
                chan = await guest.alloc_unbound(0)
                await guest.shutdown(SHUTDOWN_poweroff)
                await virq.wait()
                info = await dom0.domain_info(domid)
                assert info.shutdown and info.shutdown_reason == SHUTDOWN_poweroff and not info.dying
                await dom0.destroy_domain(domid)
                await virq.wait()
                with pytest.raises(PeerClosedError):  # the service hung up on the guest
                    await chan.wait()
                with pytest.raises(HypervisorError):
                    await guest.domain_info()
            await _wait_gone(dom0, domid)


async def test_grant_copy_and_scattered_multi_page_map(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            domid, fd = await dom0.create_domain(nr_pages=16)
            async with open_hypervisor(fd=fd) as guest:
                frames = [3, 7, 4]
                refs = [guest.grant_access(0, f) for f in frames]
                for f in frames:
                    guest.memory.page(f)[:2] = bytes([f, f])
                mapping = await dom0.map_grants(domid, refs)
                assert [bytes(mapping.buffer[i * PAGE_SIZE:i * PAGE_SIZE + 2]) for i in range(3)] == [
                    b"\x03\x03", b"\x07\x07", b"\x04\x04"]
                mapping.buffer[PAGE_SIZE + 100] = 0x55  # lands in frame 7
                assert guest.memory.page(7)[100] == 0x55
                await dom0.unmap_grants(mapping)

                dom0.memory.page(1)[:5] = b"copy!"
                ro = guest.grant_access(0, 9, readonly=True)
                statuses = await dom0.grant_copy([
                    CopySegment(CopySide(0, 0, gfn=1), CopySide(domid, 20, ref=refs[0]), 5),
                    CopySegment(CopySide(0, 0, gfn=1), CopySide(domid, 0, ref=ro), 5),
                ])
                assert statuses == [GNTST_okay, GNTST_general_error]
                assert bytes(guest.memory.page(3)[20:25]) == b"copy!"


async def test_toolstack_seeds_xenstore_grant_and_port(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            domid, fd = await dom0.create_domain(nr_pages=16)
            store_gfn = 15
            await dom0.seed_grant(domid, ref=1, grantee=0, gfn=store_gfn)
            port = await dom0.alloc_unbound_for(domid, 0)
            async with open_hypervisor(fd=fd) as guest:
                guest_chan = await guest.attach_port(port)
                store = await dom0.map_grants(domid, [1])  # like xenstored, ref 1 rw
                dom0_chan = await dom0.bind_interdomain(domid, port)
                guest.memory.page(store_gfn)[:4] = b"ring"
                guest_chan.notify()
                await dom0_chan.wait()
                assert bytes(store.buffer[:4]) == b"ring"
                dom0_chan.notify()
                await guest_chan.wait()
                await dom0.unmap_grants(store)


async def test_service_death_does_not_leave_waiters_hanging(tmp_path):
    path = str(tmp_path / "hv.sock")
    ready_r, ready_w = os.pipe()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ringbuf.hypervisor.main", "--socket", path, "--ready-fd", str(ready_w)],
        pass_fds=[ready_w])
    os.close(ready_w)
    try:
        with trio.fail_after(20):
            assert await trio.to_thread.run_sync(os.read, ready_r, 1) == b"1"
            async with open_hypervisor(path) as dom0:
                chan = await dom0.alloc_unbound(0)

                async with _wakes_with_peer_closed(chan):
                    proc.kill()
                with pytest.raises(HypervisorError) as err:
                    await dom0.domain_info()
                assert err.value.code == "EPIPE"
    finally:
        os.close(ready_r)
        proc.kill()
        await proc.wait()


async def test_dom0_processes_get_disjoint_refs_and_grants_die_with_them(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as toolstack:
            async with open_hypervisor(hypervisor_socket) as backend:
                refs_a = {toolstack.grant_access(0, 1) for _ in range(10)}
                refs_b = {backend.grant_access(0, 2) for _ in range(10)}
                assert not refs_a & refs_b
                await backend.reserve_grant_refs(backend.free_grant_refs + 5)
                assert backend.free_grant_refs >= 5
                kept = next(iter(refs_b))
                mapping = await toolstack.map_grants(0, [kept])
            # the backend process is gone: its unmapped grants are revoked,
            # the mapped one stays until unmapped
            for _ in range(100):
                if all(toolstack.grant_table.flags(r) == 0 for r in refs_b - {kept}):
                    break
                await trio.sleep(0.01)
            assert all(toolstack.grant_table.flags(r) == 0 for r in refs_b - {kept})
            assert toolstack.grant_table.flags(kept) & GTF_permit_access
            assert all(toolstack.grant_table.flags(r) == GTF_permit_access for r in refs_a)
            await toolstack.unmap_grants(mapping)


FRONTEND = """
    import sys, trio
    from ringbuf import open_hypervisor

    async def main():
        backend = int(sys.argv[1])
        async with open_hypervisor() as hv:
            page = hv.memory.page(4)
            page[:7] = b"request"
            ref = hv.grant_access(backend, 4)
            chan = await hv.alloc_unbound(backend)
            print(hv.domid, ref, chan.port, flush=True)
            await chan.wait()
            print(bytes(page[:8]).decode(), flush=True)

    trio.run(main)
"""

BACKEND = """
    import sys, trio
    from ringbuf import open_hypervisor

    async def main():
        front, ref, port = map(int, sys.argv[1:4])
        async with open_hypervisor() as hv:
            mapping = await hv.map_grants(front, [ref])
            chan = await hv.bind_interdomain(front, port)
            assert bytes(mapping.buffer[:7]) == b"request"
            mapping.buffer[:8] = b"response"
            chan.notify()
            await hv.unmap_grants(mapping)
            print("done", flush=True)
            await trio.sleep_forever()

    trio.run(main)
"""


async def test_two_guest_processes_share_a_granted_page_and_a_channel(hypervisor_socket, spawn_guest):
    with trio.fail_after(30):
        async with open_hypervisor(hypervisor_socket) as dom0:
            front_id, front_fd = await dom0.create_domain(nr_pages=8)
            back_id, back_fd = await dom0.create_domain(nr_pages=8)
            front = spawn_guest(front_fd, FRONTEND, str(back_id))
            os.close(front_fd)
            domid, ref, port = map(int, (await _readline(front)).split())
            assert domid == front_id
            back = spawn_guest(back_fd, BACKEND, str(front_id), str(ref), str(port))
            os.close(back_fd)
            assert await _readline(back) == "done"
            assert await _readline(front) == "response"
            # the frontend exits by itself: its domain goes away; the backend is killed
            await trio.to_thread.run_sync(front.wait)
            back.kill()
            await _wait_gone(dom0, front_id)
            await _wait_gone(dom0, back_id)


async def test_domain_life_cycles_leak_no_descriptors(tmp_path):
    """In-process service, so its descriptors can be counted too."""
    from ringbuf.hypervisor import HypervisorService

    service = HypervisorService()
    path = str(tmp_path / "hv.sock")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve, path)
            async with open_hypervisor(path) as dom0:
                virq = await dom0.bind_virq(VIRQ_DOM_EXC)

                async def cycle():
                    domid, fd = await dom0.create_domain(nr_pages=8)
                    async with open_hypervisor(fd=fd) as guest:
                        chan = await guest.alloc_unbound(0)
                        peer = await dom0.bind_interdomain(domid, chan.port)
                        ref = guest.grant_access(0, 1)
                        mapping = await dom0.map_grants(domid, [ref])
                        await dom0.unmap_grants(mapping)
                    await virq.wait()
                    await _wait_gone(dom0, domid)
                    await dom0.close_port(peer)

                await cycle()  # warm up lazily created state
                before = len(os.listdir("/proc/self/fd"))
                stats = service.statistics()
                for _ in range(5):
                    await cycle()
                assert len(os.listdir("/proc/self/fd")) == before
                assert service.statistics() == stats
            nursery.cancel_scope.cancel()


async def test_closing_a_port_wakes_the_peer_and_the_port_can_be_bound_again(hypervisor_socket):
    with trio.fail_after(20):
        async with open_hypervisor(hypervisor_socket) as dom0:
            domid, fd = await dom0.create_domain(nr_pages=8)
            async with open_hypervisor(fd=fd) as guest:
                chan = await guest.alloc_unbound(0)
                backend = await dom0.bind_interdomain(domid, chan.port)

                async with _wakes_with_peer_closed(chan):
                    await dom0.close_port(backend)
                assert (await guest.port_status(chan.port))["state"] == 1  # unbound
                chan.notify()  # dropped silently, as in Xen

                # the backend reconnects (same domain): the channel works again
                backend = await dom0.bind_interdomain(domid, chan.port)
                while chan.peer_closed:  # the peer_bound notice is on its way
                    await trio.sleep(0.001)
                await backend.wait()  # pending from the bind
                chan.clear()  # spurious wake-up left by the close
                assert not chan.pending and not backend.pending
                backend.notify()
                await chan.wait()
                chan.notify()
                await backend.wait()
