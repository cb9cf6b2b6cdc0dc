"""EventChannel: eventfd doorbells, mask/pending/coalescing, closing, cross-process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ringbuf.evtchn import EventChannel, PeerClosedError, PortBits, eventfd_pair, new_eventfd


async def test_notify_wakes_waiter_and_clears_pending():
    a, b = eventfd_pair()
    with a, b:
        assert not b.pending
        a.notify()
        assert b.pending
        with trio.fail_after(2):
            await b.wait()
        assert not b.pending


async def test_many_notifies_coalesce_into_one_wakeup():
    a, b = eventfd_pair()
    with a, b:
        for _ in range(100):
            a.notify()
        with trio.fail_after(2):
            await b.wait()
        assert not b.consume_nowait()
        with trio.move_on_after(0.05) as scope:
            await b.wait()
        assert scope.cancelled_caught


async def test_blocked_waiter_is_woken_by_notify():
    a, b = eventfd_pair()
    woke = trio.Event()

    async def waiter():
        await b.wait()
        woke.set()

    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            a.notify()
            with trio.fail_after(2):
                await woke.wait()


async def test_mask_holds_delivery_and_unmask_redelivers():
    a, b = eventfd_pair()
    woke = trio.Event()

    async def waiter():
        await b.wait()
        woke.set()

    with a, b:
        b.mask()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            a.notify()
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.02)
            assert not woke.is_set() and b.pending  # pending accumulates while masked
            b.unmask()
            with trio.fail_after(2):
                await woke.wait()
        assert not b.pending


async def test_close_wakes_blocked_waiter_with_closed_error():
    a, b = eventfd_pair()

    async def waiter():
        with pytest.raises(trio.ClosedResourceError):
            await b.wait()

    with a:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            b.close()
        b.close()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            b.notify()


async def test_peer_close_wakes_waiter_and_notify_is_dropped():
    a, b = eventfd_pair()
    with b:
        async with trio.open_nursery() as nursery:
            async def waiter():
                with trio.fail_after(2), pytest.raises(PeerClosedError):
                    await b.wait()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            a.close()
        assert b.peer_closed
        b.notify()  # silently dropped, as in Xen
        with pytest.raises(PeerClosedError):
            await b.wait()


async def test_wait_cancelled_does_not_lose_the_event():
    a, b = eventfd_pair()
    with a, b:
        with trio.move_on_after(0.01):
            await b.wait()
        a.notify()
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await b.wait()
        assert b.pending  # a cancelled wait did not consume it
        with trio.fail_after(2):
            await b.wait()


async def test_virq_style_port_cannot_send():
    chan = EventChannel(5, new_eventfd(), None)
    with chan, pytest.raises(trio.BrokenResourceError):
        chan.notify()


class PortModelMachine(RuleBasedStateMachine):
    """The eventfd channel behaves like Xen's pending/mask bits (PortBits)."""

    def __init__(self):
        super().__init__()
        self.sender, self.receiver = eventfd_pair()
        self.model = PortBits()

    def teardown(self):
        self.sender.close()
        self.receiver.close()

    @rule(times=st.integers(1, 5))
    def notify(self, times):
        for _ in range(times):
            self.sender.notify()
            self.model.send()

    @rule()
    def mask(self):
        self.receiver.mask()
        self.model.mask()

    @rule()
    def unmask(self):
        self.receiver.unmask()
        self.model.unmask()

    @rule()
    def clear(self):
        self.receiver.clear()
        self.model.clear()

    @rule()
    def consume(self):
        deliverable = self.model.deliverable()
        assert self.receiver.consume_nowait() == deliverable
        if deliverable:
            self.model.clear()

    @rule()
    def wait_briefly(self):
        deliverable = self.model.deliverable()

        async def attempt():
            with trio.move_on_after(0.002 if not deliverable else 2) as scope:
                await self.receiver.wait()
            return not scope.cancelled_caught

        assert trio.run(attempt) == deliverable
        if deliverable:
            self.model.clear()

    @invariant()
    def same_bits(self):
        assert self.receiver.pending == self.model.pending
        assert self.receiver.masked == self.model.masked


PortModelMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestPortModel = PortModelMachine.TestCase


def test_port_bits_model_coalesces():
    bits = PortBits()
    assert bits.send() is True
    assert bits.send() is False  # already pending: nothing more happens
    bits.clear()
    bits.mask()
    assert bits.send() is False  # masked: pending but no upcall
    assert bits.unmask() is True  # unmask re-delivers


_CHILD = textwrap.dedent("""
    import sys, trio
    from ringbuf.evtchn import EventChannel
    chan = EventChannel(2, int(sys.argv[1]), int(sys.argv[2]))
    async def main():
        for _ in range(int(sys.argv[3])):
            await chan.wait()
            chan.notify()
    trio.run(main)
""")


async def test_pingpong_across_processes():
    efd_a, efd_b = new_eventfd(), new_eventfd()
    a = EventChannel(1, efd_a, efd_b, close_fds=False)
    rounds = 200
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(efd_b), str(efd_a), str(rounds)],
                            pass_fds=[efd_a, efd_b])
    try:
        with a, trio.fail_after(20):
            for _ in range(rounds):
                a.notify()
                await a.wait()
        assert await trio.to_thread.run_sync(proc.wait) == 0
    finally:
        os.close(efd_a)
        os.close(efd_b)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
