"""In-process server tests: the early replies to a pipelined run of a
connection served alone (``ServerConfig.early_replies``)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import trio

from xenstore.core.engine import Engine
from xenstore.core.limits import Limits
from xenstore.daemon import XenstoreServer, open_listener
from xenstore.wire import Op, Packet


async def test_a_client_gone_before_its_early_replies_gets_nothing_more_done():
    """The peer hangs up right after sending a long run: the early send
    fails, the connection goes, and the rest of its run (here a WATCH) is
    not carried out for a connection that no longer exists."""
    tmp = tempfile.mkdtemp(prefix="xsd-early-", dir="/tmp")
    path = os.path.join(tmp, "sock")
    engine = Engine(Limits())
    server = XenstoreServer(engine)
    listener = open_listener(path)
    early = server.config.early_replies
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listener)
                run = [Packet(Op.WRITE, i, 0, b"/early/k%d\0v" % i) for i in range(early)]
                run += [Packet(Op.WATCH, early, 0, b"/early\0tok\0"), Packet(Op.WRITE, early + 1, 0, b"/early/last\0v")]
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)  # (blocking: the server accepts when trio runs it)
                s.sendall(b"".join(p.encode() for p in run))
                s.close()
                while not ("/early/k0" in engine.store.nodes and server.statistics()["clients"] == 0):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert len(engine.watches) == 0
        assert "/early/last" not in engine.store.nodes
        assert all(f"/early/k{i}" in engine.store.nodes for i in range(early))
    finally:
        listener.close()
        shutil.rmtree(tmp, ignore_errors=True)
