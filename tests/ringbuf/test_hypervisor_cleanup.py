"""Random sequences of grant and event-channel operations by dom0 and two
guests, then the guests die: everything they held must be released."""

from __future__ import annotations

import gc
import os

import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from ringbuf import VIRQ_DOM_EXC, GrantError, HypervisorError, PeerClosedError, open_hypervisor
from ringbuf.grants import GTF_permit_access
from ringbuf.hypervisor import HypervisorService

WHO = st.sampled_from(["dom0", "g1", "g2"])
OPS = st.lists(st.one_of(
    st.tuples(st.just("grant"), WHO, WHO, st.integers(0, 7), st.booleans()),
    st.tuples(st.just("map"), WHO, st.integers(0, 20), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, 20)),
    st.tuples(st.just("end"), st.integers(0, 20)),
    st.tuples(st.just("alloc"), WHO, WHO),
    st.tuples(st.just("bind"), WHO, st.integers(0, 20)),
    st.tuples(st.just("close"), st.integers(0, 20)),
    st.tuples(st.just("notify"), st.integers(0, 20)),
    st.tuples(st.just("kill"), st.sampled_from(["g1", "g2"])),
), max_size=25)


class _Kill:
    """Ends a guest's connection (its domain dies) and waits until it has."""

    def __init__(self):
        self.request, self.done = trio.Event(), trio.Event()

    async def __call__(self):
        self.request.set()
        await self.done.wait()


async def _run_guest(fd, kill, task_status=trio.TASK_STATUS_IGNORED):
    try:
        async with open_hypervisor(fd=fd) as guest:
            task_status.started(guest)
            await kill.request.wait()
    finally:
        kill.done.set()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_random_operations_then_death_release_everything(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("hv") / "hv.sock")
    service = HypervisorService()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve, path)
            async with open_hypervisor(path) as dom0, trio.open_nursery() as guest_tasks:
                virq = await dom0.bind_virq(VIRQ_DOM_EXC)
                gc.collect()  # earlier examples' garbage may still hold descriptors
                fds_before = len(os.listdir("/proc/self/fd"))
                stats_before = service.statistics()
                clients = {"dom0": dom0}
                kills = {}
                for name in ("g1", "g2"):
                    domid, fd = await dom0.create_domain(nr_pages=8)
                    kills[name] = _Kill()
                    clients[name] = await guest_tasks.start(_run_guest, fd, kills[name])
                alive = {"dom0", "g1", "g2"}
                grants, maps, chans = [], [], []  # (owner, ...) records

                def pick(items, i):
                    return items[i % len(items)] if items else None

                for op in ops:
                    kind = op[0]
                    try:
                        if kind == "grant" and op[1] in alive:
                            who, to, gfn, ro = op[1:]
                            ref = clients[who].grant_access(clients[to].domid, gfn, ro)
                            grants.append((who, ref, to))
                        elif kind == "map" and op[1] in alive and grants:
                            granter, ref, _ = pick(grants, op[2])
                            mapping = await clients[op[1]].map_grants(clients[granter].domid, [ref], op[3])
                            maps.append((op[1], mapping))
                        elif kind == "unmap" and maps:
                            who, mapping = pick(maps, op[1])
                            maps.remove((who, mapping))
                            if who in alive:
                                await clients[who].unmap_grants(mapping)
                        elif kind == "end" and grants:
                            who, ref, _ = pick(grants, op[1])
                            if who in alive:
                                await clients[who].end_access(ref)
                                grants.remove((who, ref, _))
                        elif kind == "alloc" and op[1] in alive:
                            chan = await clients[op[1]].alloc_unbound(clients[op[2]].domid)
                            chans.append((op[1], chan, op[2]))
                        elif kind == "bind" and op[1] in alive and chans:
                            owner, chan, _ = pick(chans, op[2])
                            new = await clients[op[1]].bind_interdomain(clients[owner].domid, chan.port)
                            chans.append((op[1], new, owner))
                        elif kind == "close" and chans:
                            who, chan, _ = pick(chans, op[1])
                            if who in alive and not chan.closed:
                                await clients[who].close_port(chan)
                        elif kind == "notify" and chans:
                            who, chan, _ = pick(chans, op[1])
                            if not chan.closed:
                                chan.notify()
                        elif kind == "kill" and op[1] in alive:
                            alive.discard(op[1])
                            maps = [(w, m) for w, m in maps if w != op[1]]
                            await kills[op[1]]()
                    except (GrantError, HypervisorError):
                        pass  # refusals are fine; leaks are not

                for name in ("g1", "g2"):
                    alive.discard(name)
                    await kills[name]()
                # a dead guest whose page dom0 still maps stays dying until unmapped
                for who, mapping in maps:
                    if who == "dom0":
                        await dom0.unmap_grants(mapping)
                for name in ("g1", "g2"):
                    while await dom0.domain_info(clients[name].domid) is not None:
                        await virq.wait()
                # dom0's own leftovers: its ports and grants
                for who, chan, _ in chans:
                    if who == "dom0" and not chan.closed:
                        if chan.peer_closed:
                            try:
                                await chan.wait()
                            except PeerClosedError:
                                pass
                        await dom0.close_port(chan)
                for who, ref, _ in grants:
                    if who == "dom0":
                        assert dom0.grant_table.flags(ref) & ~GTF_permit_access & 0x1F in (0, 4)
                        await dom0.end_access(ref)
                assert service.statistics() == stats_before
                del clients, maps, chans
                gc.collect()
                assert len(os.listdir("/proc/self/fd")) == fds_before
            nursery.cancel_scope.cancel()
