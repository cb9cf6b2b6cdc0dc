"""Nothing acknowledged is lost: restarts, kill -9 under load, torn journal tails."""

from __future__ import annotations

import os
import threading
import time

import pytest

from xenstore.daemon.journal import JOURNAL_MAGIC, decode_frames
from xenstore.wire import Op, Packet

pytestmark = pytest.mark.timeout(90)


def dump(conn, path="/"):
    """{path: (value, perms)} of the whole subtree, children in DIRECTORY order."""
    out = {}
    stack = [path]
    while stack:
        p = stack.pop()
        value = conn.call(Op.READ, p.encode() + b"\0")
        perms = conn.call(Op.GET_PERMS, p.encode() + b"\0")
        op, children = conn.call(Op.DIRECTORY, p.encode() + b"\0")
        names = [n.decode() for n in children.split(b"\0")[:-1]]
        out[p] = (value[1], perms[1], names)
        prefix = p if p != "/" else ""
        stack.extend(f"{prefix}/{n}" for n in reversed(names))
    return out


def journals(state_dir):
    return sorted(n for n in os.listdir(state_dir) if n.startswith("journal.") and n[8:].isdigit())


def data_end(journal):
    """Where a journal's frames end (a journal left by a killed daemon goes
    on with zero-filled room, allocated ahead)."""
    with open(journal, "rb") as f:
        data = f.read()
    _, end, _ = decode_frames(data, len(JOURNAL_MAGIC))
    return end


def test_a_killed_daemons_journal_ends_in_room_that_recovery_ignores(xenstored_factory):
    d = xenstored_factory.start()
    d.connect().write("/room/a", b"1")
    d.kill()
    journal = os.path.join(d.state_dir, journals(d.state_dir)[-1])
    assert os.path.getsize(journal) > data_end(journal)  # the room allocated ahead
    d2 = xenstored_factory.start(state_dir=d.state_dir)
    assert d2.connect().read("/room/a") == b"1"
    d2.stop()
    assert "journal" not in d2.stderr()  # nothing to report: zeros are the clean end
    assert os.path.getsize(journal) == data_end(journal)  # a clean stop cuts the room off


def test_restart_keeps_values_perms_and_order(xenstored_factory):
    d = xenstored_factory.start()
    c = d.connect()
    for name in ["zeta", "alpha", "mid"]:  # creation order, not sorted
        c.write(f"/order/{name}", name.encode())
    c.write("/bin", b"\x00\xff\x01 binary")
    assert c.call(Op.SET_PERMS, b"/order/mid\0n5\0r7\0b0\0") == (Op.SET_PERMS, b"OK\0")
    assert c.call(Op.MKDIR, b"/empty\0") == (Op.MKDIR, b"OK\0")
    c.write("/gone/x", b"1")
    assert c.call(Op.RM, b"/gone\0") == (Op.RM, b"OK\0")
    # A committed transaction persists, an aborted one does not.
    _, tx = c.call(Op.TRANSACTION_START, b"\0")
    tx = int(tx[:-1])
    c.write("/tx/committed", b"yes", tx)
    assert c.call(Op.TRANSACTION_END, b"T\0", tx) == (Op.TRANSACTION_END, b"OK\0")
    _, tx = c.call(Op.TRANSACTION_START, b"\0")
    tx = int(tx[:-1])
    c.write("/tx/aborted", b"no", tx)
    assert c.call(Op.TRANSACTION_END, b"F\0", tx) == (Op.TRANSACTION_END, b"OK\0")
    before = dump(c)
    assert d.stop() == 0
    d2 = xenstored_factory.start(state_dir=d.state_dir)
    after = dump(d2.connect())
    assert after == before
    assert after["/order"][2] == ["zeta", "alpha", "mid"]
    assert after["/order/mid"][1] == b"n5\0r7\0b0\0"
    assert "/gone" not in after and "/tx/aborted" not in after and after["/tx/committed"][0] == b"yes"


def _writer(daemon, w, acked, stop):
    """Pipelines WRITE + SET_PERMS pairs; records the ones fully acknowledged."""
    try:
        c = daemon.connect(timeout=5)
        i = 0
        while not stop.is_set():
            batch = []
            for j in range(i, i + 8):
                path = b"/crash/c%d/k%d" % (w, j)
                batch.append(Packet(Op.WRITE, 2 * j, 0, path + b"\0" + b"value-%d-%d" % (w, j)).encode())
                batch.append(Packet(Op.SET_PERMS, 2 * j + 1, 0, path + b"\0n%d\0r%d\0" % (w + 1, j % 50)).encode())
            c.send_raw(b"".join(batch))
            for j in range(i, i + 8):
                assert c.read_reply() == Packet(Op.WRITE, 2 * j, 0, b"OK\0")
                assert c.read_reply() == Packet(Op.SET_PERMS, 2 * j + 1, 0, b"OK\0")
                acked.append(j)
            i += 8
    except (ConnectionError, OSError):
        pass  # the daemon was killed


def test_kill_9_under_load_loses_nothing_acknowledged(xenstored_factory):
    d = xenstored_factory.start("--journal-max", "200000")  # compactions happen during the run too
    stop = threading.Event()
    acked: list[list[int]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=_writer, args=(d, w, acked[w], stop)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    d.kill()  # SIGKILL mid-stream
    stop.set()
    for t in threads:
        t.join(10)
    assert all(len(a) > 50 for a in acked), [len(a) for a in acked]
    d2 = xenstored_factory.start(state_dir=d.state_dir)
    c = d2.connect()
    for w, done in enumerate(acked):
        for j in done:
            path = b"/crash/c%d/k%d\0" % (w, j)
            assert c.call(Op.READ, path) == (Op.READ, b"value-%d-%d" % (w, j)), (w, j)
            assert c.call(Op.GET_PERMS, path) == (Op.GET_PERMS, b"n%d\0r%d\0" % (w + 1, j % 50)), (w, j)


def test_torn_last_record_is_dropped_and_logged(xenstored_factory):
    d = xenstored_factory.start()
    c = d.connect()
    c.write("/torn/first", b"1")
    c.write("/torn/second", b"2")
    c.write("/torn/last", b"3")
    d.kill()
    journal = os.path.join(d.state_dir, journals(d.state_dir)[-1])
    os.truncate(journal, data_end(journal) - 5)  # cut the last record in half
    d2 = xenstored_factory.start(state_dir=d.state_dir)
    c2 = d2.connect()
    assert c2.read("/torn/first") == b"1" and c2.read("/torn/second") == b"2"
    assert c2.read("/torn/last") is None
    assert "truncated frame" in d2.stderr()
    # The damage was repaired: new writes survive the next restart.
    c2.write("/torn/after", b"4")
    d2.stop()
    d3 = xenstored_factory.start(state_dir=d.state_dir)
    c3 = d3.connect()
    assert c3.read("/torn/after") == b"4" and c3.read("/torn/second") == b"2"
    assert "truncated" not in d3.stderr()


def test_no_recovery_flag_refuses_a_damaged_journal(xenstored_factory):
    d = xenstored_factory.start()
    d.connect().write("/x", b"1")
    d.kill()
    journal = os.path.join(d.state_dir, journals(d.state_dir)[-1])
    os.truncate(journal, data_end(journal) - 1)
    with pytest.raises(RuntimeError, match="truncated"):
        xenstored_factory.start("-R", state_dir=d.state_dir)


def test_compaction_keeps_the_store_and_bounds_the_journal(xenstored_factory):
    d = xenstored_factory.start("--journal-max", "20000")
    c = d.connect()
    for round_ in range(20):
        batch = b"".join(Packet(Op.WRITE, i, 0, b"/compact/k%d\0%s" % (i, b"r%d" % round_ * 20)).encode() for i in range(50))
        c.send_raw(batch)
        for i in range(50):
            assert c.read_reply().op == Op.WRITE
    deadline = time.monotonic() + 15  # the snapshot is written off the request path
    while len(journals(d.state_dir)) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    names = os.listdir(d.state_dir)
    assert "snapshot" in names and len(journals(d.state_dir)) == 1
    assert data_end(os.path.join(d.state_dir, journals(d.state_dir)[0])) < 60000
    expected = dump(c, "/compact")
    d.kill()
    d2 = xenstored_factory.start(state_dir=d.state_dir)
    assert dump(d2.connect(), "/compact") == expected


def test_fsync_power_policy_persists(xenstored_factory):
    d = xenstored_factory.start("--fsync", "power")
    conns = [d.connect() for _ in range(3)]
    for i in range(30):
        for k, c in enumerate(conns):
            c.write(f"/power/c{k}/{i}", b"%d" % i)
    d.kill()
    c = xenstored_factory.start(state_dir=d.state_dir).connect()
    for i in range(30):
        for k in range(3):
            assert c.read(f"/power/c{k}/{i}") == b"%d" % i


def test_internal_db_keeps_nothing_on_disk(xenstored_factory):
    d = xenstored_factory.start("-I", "on")
    d.connect().write("/mem", b"1")
    assert not os.path.exists(d.state_dir)
    d.stop()
    d2 = xenstored_factory.start("--internal-db", "on", state_dir=d.state_dir)
    assert d2.connect().read("/mem") is None
