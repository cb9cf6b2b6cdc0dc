"""Fixtures: a hypervisor service and a xenstored serving guests (both
subprocesses, one pair per test module), and a toolstack that starts guest
processes (``guest_agent.py``) the way ``uxl`` would.

    async def test_x(toolstack):
        guest = await toolstack.start_guest()       # create + introduce + spawn
        assert await guest.call("read", "domid") == str(guest.domid)
        await toolstack.xs.read(...)                # dom0's client (socket)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator

import pytest
import trio

import xenstore
from ringbuf.hypervisor import open_hypervisor
from xenbus.toolstack import introduce_guest, release_guest

from hypervisor_service import hypervisor_service

AGENT = os.path.join(os.path.dirname(__file__), "guest_agent.py")
#: Every wait in these tests; generous for 2 busy cores.
STEP_TIMEOUT = 15


@pytest.fixture(scope="module")
def hypervisor_path(xenstored_module_factory) -> Iterator[str]:
    path = os.path.join(xenstored_module_factory.tmpdir, "hv.sock")
    with hypervisor_service(path):
        yield path


@pytest.fixture(scope="module")
def guest_xenstored(xenstored_module_factory, hypervisor_path):
    """A xenstored (persistent store, the default) connected to the hypervisor service."""
    return xenstored_module_factory.start("--hypervisor", hypervisor_path)


class GuestProcess:
    """A running guest agent: send commands, read replies and watch events."""

    def __init__(self, domid: int, store: Any, proc: trio.Process) -> None:
        self.domid = domid
        self.store = store
        self.proc = proc
        self.home = f"/local/domain/{domid}"
        self._replies_send, self._replies = trio.open_memory_channel[dict](math.inf)
        self._events_send, self.events = trio.open_memory_channel[tuple[int, str | None]](math.inf)

    async def read_loop(self) -> None:
        buf = b""
        async for chunk in self.proc.stdout:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "event" in msg:
                    self._events_send.send_nowait((msg["watch"], msg["event"]))
                elif "watch_closed" in msg:  # the client died under the watch
                    self._events_send.send_nowait((msg["watch_closed"], None))
                else:
                    self._replies_send.send_nowait(msg)
        self._replies_send.close()
        self._events_send.close()

    async def command(self, **cmd: Any) -> dict:
        with trio.fail_after(STEP_TIMEOUT):
            await self.proc.stdin.send_all(json.dumps(cmd).encode() + b"\n")
            return await self._replies.receive()

    async def call(self, method: str, *args: Any) -> Any:
        """A client method; returns the result or raises XenStoreError."""
        reply = await self.command(op="call", method=method, args=list(args))
        if "error" in reply:
            raise xenstore.XenStoreError(reply["error"]) if "message" not in reply else AssertionError(reply)
        return reply["ok"]

    async def next_event(self, watch_id: int) -> str | None:
        """The next event path of watch ``watch_id`` (None: the watch died)."""
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                wid, path = await self.events.receive()
                if wid == watch_id:
                    return path

    async def ring(self) -> dict:
        return (await self.command(op="ring"))["ok"]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)


class Toolstack:
    """dom0: a hypervisor connection, a XenStore client, guest processes."""

    def __init__(self, hv: Any, xs: Any, nursery: trio.Nursery) -> None:
        self.hv = hv
        self.xs = xs
        self.nursery = nursery
        self.guests: list[GuestProcess] = []

    async def start_guest(self, name: str = "guest", nr_pages: int = 16) -> GuestProcess:
        domid, fd = await self.hv.create_domain(nr_pages)
        try:
            store = await introduce_guest(self.hv, self.xs, domid, name=name)
        except BaseException:
            os.close(fd)
            raise
        return await self.spawn_guest(store, fd)

    async def spawn_guest(self, store: Any, fd: int) -> GuestProcess:
        """Start the agent of a created and introduced domain (``fd``: its
        hypervisor connection, closed here)."""
        domid = store.domid
        try:
            env = dict(os.environ, UXEN_HYPERVISOR_FD=str(fd), **store.environment())
            proc = await trio.lowlevel.open_process(
                [sys.executable, AGENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=[fd]
            )
        finally:
            os.close(fd)
        guest = GuestProcess(domid, store, proc)
        self.guests.append(guest)
        self.nursery.start_soon(guest.read_loop)
        with trio.fail_after(STEP_TIMEOUT):
            hello = await guest._replies.receive()
        assert hello == {"ready": domid}, hello
        return guest

    async def wait_gone(self, domid: int) -> None:
        """Until the hypervisor has forgotten the domain (xenstored unmapped it)."""
        with trio.fail_after(STEP_TIMEOUT):
            while any(info.domid == domid for info in await self.hv.list_domains()):
                await trio.sleep(0.02)

    async def wait_released(self, domid: int) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            while await self.xs.is_domain_introduced(domid):
                await trio.sleep(0.02)


@asynccontextmanager
async def open_toolstack(hypervisor_path: str, socket_path: str) -> AsyncIterator[Toolstack]:
    async with open_hypervisor(hypervisor_path) as hv, xenstore.open_client(socket_path) as xs:
        async with trio.open_nursery() as nursery:
            toolstack = Toolstack(hv, xs, nursery)
            try:
                yield toolstack
            finally:
                with trio.CancelScope(shield=True):
                    for guest in toolstack.guests:
                        guest.kill()
                        await guest.proc.wait()
                        with trio.move_on_after(5):
                            await release_guest(xs, guest.domid)
                nursery.cancel_scope.cancel()


@pytest.fixture
async def toolstack(hypervisor_path, guest_xenstored) -> AsyncIterator[Toolstack]:
    async with open_toolstack(hypervisor_path, guest_xenstored.socket_path) as ts:
        yield ts
    assert guest_xenstored.alive(), guest_xenstored.stderr()
