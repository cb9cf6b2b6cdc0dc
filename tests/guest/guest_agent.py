"""A guest domain process for the tests: obeys JSON-line commands on stdin.

Started by the toolstack steps with ``UXEN_HYPERVISOR_FD``,
``UXEN_STORE_GFN`` and ``UXEN_STORE_PORT``; talks to xenstored through
``xenstore.open_guest_client``-style plumbing over its ring.  Each command
gets one reply line ``{"ok": result}`` or ``{"error": "EACCES"}``; watch
events are extra lines ``{"event": path, "watch": id}``.

Commands (``op``):

* ``call``      -- ``method``/``args`` of the client (values as latin-1 text)
* ``watch``     -- start watching ``path``, events tagged with ``id``
* ``tx_start``  -- open a transaction and keep it open (low level)
* ``ring``      -- the page's control fields and indices
* ``poke``      -- write ``value`` into the ring field ``field``, notify
* ``raw``       -- put ``hex`` bytes straight into ``req``, notify
* ``reconnect`` -- close the client, do the reconnection handshake, reopen
* ``reopen``    -- a new client on our ring with the new ``port`` (resume)
* ``burst``     -- ``n`` concurrent WRITE+READ pairs; the indices that came back wrong
* ``shutdown``  -- report a shutdown (``reason``) to the hypervisor
* ``bench``     -- ``n`` sequential READs of ``path``; median seconds per READ
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from contextlib import AsyncExitStack

import trio

from ringbuf.hypervisor import open_hypervisor
from xenstore.client._async import open_client
from xenstore.client.ring_transport import open_ring_transport
from xenstore.wire import XenStoreError


def encode(value):
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value if isinstance(value, (int, str, bool, type(None), float)) else str(value)


class Agent:
    def __init__(self, hv, nursery: trio.Nursery) -> None:
        self.hv = hv
        self.nursery = nursery
        self.stack: AsyncExitStack | None = None
        self.client = None
        self.transport = None

    def emit(self, obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def open(self) -> None:
        self.stack = AsyncExitStack()
        self.transport = await open_ring_transport(self.hv)
        self.client = await self.stack.enter_async_context(open_client(transport=self.transport))

    async def close(self) -> None:
        if self.stack is not None:
            await self.stack.aclose()
        self.stack = self.client = None

    async def watch(self, path: str, wid: int) -> None:
        try:
            async with self.client.watch(path) as events:
                async for event in events:
                    self.emit({"event": event, "watch": wid})
        except Exception as exc:  # the client went away
            self.emit({"watch_closed": wid, "reason": type(exc).__name__})

    async def run(self, cmd: dict):
        op = cmd["op"]
        if op == "call":
            args = [a.encode("latin-1") if isinstance(a, str) and cmd.get("bytes") else a for a in cmd.get("args", [])]
            return await getattr(self.client, cmd["method"])(*args)
        if op == "watch":
            self.nursery.start_soon(self.watch, cmd["path"], cmd["id"])
            return None
        if op == "tx_start":
            return await self.client.transaction_start()
        if op == "ring":
            ring = self.transport.ring
            return {
                "features": ring.server_features,
                "connection": ring.connection,
                "error": ring.error,
                "req_cons": ring.outgoing.cons,
                "req_prod": ring.outgoing.prod,
                "rsp_cons": ring.incoming.cons,
                "rsp_prod": ring.incoming.prod,
            }
        if op == "poke":
            page = self.hv.memory.page(int(os.environ["UXEN_STORE_GFN"]))
            offsets = {"req_cons": 2048, "req_prod": 2052, "rsp_cons": 2056, "rsp_prod": 2060}
            page[offsets[cmd["field"]] : offsets[cmd["field"]] + 4] = (cmd["value"] & 0xFFFFFFFF).to_bytes(4, "little")
            self.transport.channel.notify()
            return None
        if op == "raw":
            self.transport.ring.write(bytes.fromhex(cmd["hex"]))
            self.transport.channel.notify()
            return None
        if op == "reconnect":
            await self.close()
            transport = await open_ring_transport(self.hv)
            await transport.reconnect()
            await transport.aclose()
            await self.open()
            return None
        if op == "reopen":  # after a resume: the toolstack gave us a new port
            await self.close()
            self.stack = AsyncExitStack()
            self.transport = await open_ring_transport(self.hv, port=cmd["port"])
            self.client = await self.stack.enter_async_context(open_client(transport=self.transport))
            return None
        if op == "burst":  # n pipelined WRITE+READ pairs of ``size`` bytes
            client, size = self.client, cmd["size"]
            bad = []

            async def one(i: int) -> None:
                value = b"%d:" % i + b"v" * size
                await client.write(f"data/burst/{i}", value)
                if await client.read(f"data/burst/{i}") != value:
                    bad.append(i)

            async with trio.open_nursery() as burst:
                for i in range(cmd["n"]):
                    burst.start_soon(one, i)
            return bad
        if op == "shutdown":
            return await self.hv.shutdown(cmd["reason"])
        if op == "bench":
            read = self.client.read
            path = cmd["path"]
            for _ in range(20):
                await read(path)
            times = []
            clock = time.perf_counter
            for _ in range(cmd["n"]):
                start = clock()
                await read(path)
                times.append(clock() - start)
            return statistics.median(times)
        raise ValueError(f"unknown op {op}")


async def main() -> None:
    async with open_hypervisor() as hv:
        async with trio.open_nursery() as nursery:
            agent = Agent(hv, nursery)
            await agent.open()
            agent.emit({"ready": hv.domid})
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buf = b""
            while True:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = json.loads(line)
                    try:
                        result = await agent.run(cmd)
                    except XenStoreError as exc:
                        agent.emit({"error": exc.name})
                    except Exception as exc:
                        agent.emit({"error": type(exc).__name__, "message": str(exc)})
                    else:
                        agent.emit({"ok": encode(result)})
            nursery.cancel_scope.cancel()
            await agent.close()


if __name__ == "__main__":
    trio.run(main)
