"""The blocking client against our daemon, plus the pure helpers it uses."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xenstore
from xenstore import Backoff, Perm, XenStoreError
from xenstore.client._events import EventQueue
from xenstore.client._ops import DirectoryPartAssembler, Request, parse_reply
from xenstore.client._paths import daemon_socket_path, domain_device_path
from xenstore.wire import Op

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def socket_path(xenstored_module_factory):
    return xenstored_module_factory.start("-I", "on").socket_path


def test_operations(socket_path):
    with xenstore.open_sync_client(socket_path) as c:
        c.write("/sync/a", b"1")
        assert c.read("/sync/a") == b"1"
        assert c.directory("/sync") == ["a"]
        c.set_perms("/sync/a", ["n0", Perm("b", 3)])
        assert c.get_perms("/sync/a") == [Perm("n", 0), Perm("b", 3)]
        assert c.exists("/sync/a") and not c.exists("/sync/b")
        with pytest.raises(XenStoreError) as info:
            c.read("/sync/b")
        assert info.value.name == "ENOENT" and info.value.errno == 2
        assert c.unwatch("/sync", "unknown") is False
        c.rm("/sync")


def test_environment_selects_the_socket(socket_path, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", socket_path)
    with xenstore.open_sync_client() as c:
        c.write("/env", b"yes")
    monkeypatch.delenv("XENSTORED_PATH")
    monkeypatch.setenv("XENSTORED_RUNDIR", os.path.dirname(socket_path))
    with xenstore.open_sync_client() as c:
        assert c.read("/env") == b"yes"


def test_path_rules():
    assert daemon_socket_path({"XENSTORED_PATH": "/x/s"}) == "/x/s"
    assert daemon_socket_path({"XENSTORED_PATH": ""}) == ""  # set-but-empty counts, like getenv()
    assert daemon_socket_path({"XENSTORED_RUNDIR": "/run/xs"}) == "/run/xs/socket"
    assert daemon_socket_path({}) == "/var/run/xenstored/socket"
    assert domain_device_path({"XENSTORED_PATH": "/x/s"}) == "/x/s"
    assert domain_device_path({}) in ("/dev/xen/xenbus", "/proc/xen/xenbus")


def test_no_daemon_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        xenstore.open_sync_client(str(tmp_path / "nothing"))


def test_watch_and_events_during_requests(socket_path):
    with xenstore.open_sync_client(socket_path) as c, xenstore.open_sync_client(socket_path) as other:
        with c.watch("/sw") as w:
            assert w.wait(5) == "/sw"
            other.write("/sw/a", b"1")
            c.write("/sw/b", b"2")  # our own write: its event is queued while we wait for OK
            assert {w.wait(5), w.wait(5)} == {"/sw/a", "/sw/b"}
            assert w.wait(0.05) is None
        with c.watch("/sv") as w:
            values = w.values()
            assert next(values) is None
            other.write("/sv", b"x")
            assert next(values) == b"x"


def test_transaction_and_retry(socket_path):
    with xenstore.open_sync_client(socket_path) as c, xenstore.open_sync_client(socket_path) as rival:
        c.write("/st/n", b"0")
        with c.transaction() as t:
            t.write("/st/n", b"1")
            assert rival.read("/st/n") == b"0"
        assert c.read("/st/n") == b"1"
        with pytest.raises(ValueError):
            with c.transaction() as t:
                t.write("/st/n", b"2")
                raise ValueError
        assert c.read("/st/n") == b"1"

        conflicts = [True, True, False]

        def bump(t):
            value = int(t.read("/st/n"))
            if conflicts.pop(0):
                rival.write("/st/n", b"100")
            t.write("/st/n", str(value + 1))
            return value + 1

        result = c.transact(bump, backoff=Backoff(base=0.0))
        assert (result.value, result.retries) == (101, 2)
        assert c.read("/st/n") == b"101"


def test_directory_part_fallback(socket_path):
    with xenstore.open_sync_client(socket_path) as c:
        names = [f"n{i:03d}-" + "x" * 40 for i in range(120)]
        for name in names:
            c.write(f"/sbig/{name}", b"")
        assert c.directory("/sbig") == names
        c.rm("/sbig")


def test_device_transport_speaks_the_same_protocol(socket_path):
    """The plain-fd transport (os.read/os.write, as on /dev/xen/xenbus) works;
    here the 'device' is one end of a socketpair relayed to the daemon."""
    left, right = socket.socketpair()
    try:
        relay = threading.Thread(target=_relay, args=(right, socket_path), daemon=True)
        relay.start()
        from xenstore.client._sync import FdTransport, SyncClient

        with SyncClient(FdTransport(fd=os.dup(left.fileno()))) as c:
            c.write("/dev/x", b"via fd")
            assert c.read("/dev/x") == b"via fd"
    finally:
        left.close()


def _relay(sock: socket.socket, socket_path: str) -> None:
    """Forward bytes between ``sock`` and the daemon until either side closes."""
    upstream = socket.socket(socket.AF_UNIX)
    upstream.connect(socket_path)

    def pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    threading.Thread(target=pump, args=(upstream, sock), daemon=True).start()
    pump(sock, upstream)


# -- pure pieces --------------------------------------------------------------


def test_parse_reply_errors():
    with pytest.raises(XenStoreError) as info:
        parse_reply(Request.read("/a"), Op.ERROR, b"EACCES\0")
    assert info.value.name == "EACCES"
    with pytest.raises(XenStoreError):
        parse_reply(Request.read("/a"), Op.WRITE, b"OK\0")  # a reply of the wrong type
    assert parse_reply(Request.unwatch("/a", "t"), Op.ERROR, b"ENOENT\0") is False
    assert parse_reply(Request.is_domain_introduced(1), Op.IS_DOMAIN_INTRODUCED, b"F\0") is False
    assert parse_reply(Request.get_quota(), Op.GET_QUOTA, b"nodes watches\0") == ["nodes", "watches"]
    assert parse_reply(Request.transaction_start(), Op.TRANSACTION_START, b"17\0") == 17


@settings(max_examples=100, deadline=None)
@given(
    names=st.lists(st.text("abcdefghij-_0123456789", min_size=1, max_size=30), max_size=60),
    budget=st.integers(20, 200),
    restart_at=st.integers(0, 5),
)
def test_directory_part_assembler(names, budget, restart_at):
    """Replies cut at any whole-name boundary reassemble the list; a
    generation change restarts from offset 0."""
    blob = b"".join(n.encode() + b"\0" for n in names)

    def reply(gen: bytes, offset: int) -> bytes:
        if offset >= len(blob):
            return gen + b"\0\0"
        end = offset
        while end < len(blob):
            nxt = blob.index(b"\0", end) + 1
            if nxt - offset > budget and end > offset:
                break
            end = nxt
        return gen + b"\0" + blob[offset:end] + (b"\0" if end == len(blob) else b"")

    parts = DirectoryPartAssembler()
    gen, calls = b"1", 0
    while True:
        calls += 1
        if calls == restart_at:
            gen = b"2"  # the directory changed under us
        result = parts.feed(reply(gen, parts.offset))
        if result is not None:
            break
        assert calls < 1000
    assert result == names


def test_event_queue_merges_and_keeps_order():
    q = EventQueue()
    assert q.push("/a") and q.push("/b") and not q.push("/a")
    assert len(q) == 2 and q.pop() == "/a" and q.push("/a")
    assert [q.pop(), q.pop(), q.pop()] == ["/b", "/a", None]


def test_backoff_is_bounded_and_jittered():
    b = Backoff(attempts=5, base=0.001, cap=0.01, random_fn=lambda: 1.0)
    assert [b.delay(n) for n in range(1, 6)] == [0.001, 0.002, 0.004, 0.008, 0.01]
    assert Backoff(random_fn=lambda: 0.0).delay(3) == 0.0
    with pytest.raises(ValueError):
        Backoff(attempts=0)


def test_perm():
    assert str(Perm("r", 5)) == "r5" and Perm.parse("b12") == Perm("b", 12)
    for bad in ("x1", "r", "", "r-1", "rz"):
        with pytest.raises(ValueError):
            Perm.parse(bad)
