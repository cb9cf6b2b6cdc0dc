"""In-process server tests: journal-before-reply ordering and group commit."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import pytest
import trio

from xenstore.core.engine import Engine
from xenstore.core.limits import Limits
from xenstore.daemon import FsyncPolicy, StateDir, XenstoreServer, open_listener
from xenstore.wire import Op, Packet, PacketReader


class RecordingState(StateDir):
    """A StateDir that checks, at every append, that no reply of the
    appended writes has reached a client yet, and counts syncs."""

    def __init__(self, path, clients, **kw):
        super().__init__(path, **kw)
        self.clients = clients
        self.syncs = 0
        self.appended_paths: list[str] = []

    def append(self, changes):
        for sock, acked in self.clients:
            try:
                data = sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = b""
            reader = PacketReader()
            reader.feed(data)
            replied = {p.req_id for p in reader} | acked
            leaves = [c[1] for c in changes if c[1].count("/") == 3]  # /gc/cN/<req_id>; parents too
            for leaf in leaves:
                assert int(leaf.rsplit("/", 1)[1]) not in replied, "reply sent before its journal write"
        self.appended_paths += [c[1] for c in changes if c[1].count("/") == 3]
        super().append(changes)

    def sync(self):
        self.syncs += 1
        super().sync()


@pytest.mark.parametrize(
    "policy, n_conns",
    [
        (FsyncPolicy.POWER, 4),
        # (one connection: the replies to a run's first requests leave early)
        (FsyncPolicy.PROCESS, 1),
        (FsyncPolicy.PROCESS, 4),
    ],
)
async def test_replies_leave_only_after_their_journal_write_and_syncs_are_shared(policy, n_conns):
    tmp = tempfile.mkdtemp(prefix="xsd-gc-", dir="/tmp")
    path = os.path.join(tmp, "sock")
    clients: list = []
    state = RecordingState(os.path.join(tmp, "state"), clients, policy=policy)
    state.recover()
    state.open_journal()
    server = XenstoreServer(Engine(Limits()), state=state)
    listener = open_listener(path)
    n_writes = 60
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listener)
                socks = []
                for c in range(n_conns):
                    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    await s.connect(path)
                    socks.append(s)
                    clients.append((s._sock, set()))  # raw socket for MSG_PEEK checks

                async def run(index, s):
                    acked = clients[index][1]
                    base = 1000 * (index + 1)
                    batch = b"".join(
                        Packet(Op.WRITE, base + i, 0, b"/gc/c%d/%d\0v" % (index, base + i)).encode() for i in range(n_writes)
                    )
                    await s.send(batch)
                    reader = PacketReader()
                    while len(acked) < n_writes:
                        reader.feed(await s.recv(65536))
                        for p in reader:
                            assert p.payload == b"OK\0"
                            acked.add(p.req_id)

                async with trio.open_nursery() as clients_nursery:
                    for i, s in enumerate(socks):
                        clients_nursery.start_soon(run, i, s)
                nursery.cancel_scope.cancel()
        assert len(state.appended_paths) == n_conns * n_writes
        if policy is FsyncPolicy.POWER:  # group commit: far fewer fsyncs than acknowledged writes
            assert 1 <= state.syncs <= n_conns * n_writes // 4
        recovered = StateDir(os.path.join(tmp, "state")).recover()
        assert sum(1 for b in recovered.batches for c in b if c[1].count("/") == 3) == n_conns * n_writes
    finally:
        listener.close()
        state.close()
        shutil.rmtree(tmp, ignore_errors=True)
