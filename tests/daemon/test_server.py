"""The daemon's socket behaviour: pipelining, hostile input, back-pressure, watches."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenstore.wire import HEADER, Op, Packet

pytestmark = pytest.mark.timeout(60)


def test_pipelined_requests_are_answered_in_order(xenstored):
    c = xenstored.connect()
    n = 300
    batch = b"".join(
        Packet(Op.WRITE, 1000 + i, 0, b"/pipe/k%d\0v%d" % (i % 7, i)).encode()
        + Packet(Op.READ, 5000 + i, 0, b"/pipe/k%d\0" % (i % 7)).encode()
        for i in range(n)
    )
    c.send_raw(batch)
    for i in range(n):
        w = c.read_reply()
        r = c.read_reply()
        assert (w.op, w.req_id, w.payload) == (Op.WRITE, 1000 + i, b"OK\0")
        assert (r.op, r.req_id, r.payload) == (Op.READ, 5000 + i, b"v%d" % i)


def test_a_pipelined_run_gets_what_one_request_at_a_time_gets(xenstored):
    """The daemon answers the first replies of a long pipelined run early
    (while it works on the rest); own watch events set up midway must still
    come in order: the run as one chunk gives exactly the packets that the
    same requests one at a time give."""
    def run(prefix: bytes) -> list:
        requests = [Packet(Op.WRITE, i, 0, prefix + b"/k%d\0v%d" % (i % 5, i)) for i in range(20)]
        requests.append(Packet(Op.WATCH, 20, 0, prefix + b"\0tok\0"))
        # (each to a node of its own: an event identical to one still queued
        # is dropped, as cxenstored does, and a run is queued as a whole)
        requests += [Packet(Op.WRITE, 21 + i, 0, prefix + b"/new%d\0w%d" % (i, i)) for i in range(30)]
        requests.append(Packet(Op.UNWATCH, 51, 0, prefix + b"\0tok\0"))
        requests += [Packet(Op.READ, 52 + i, 0, prefix + b"/k%d\0" % (i % 5)) for i in range(20)]
        return requests

    def packets(c, until: int) -> list:
        out = []
        while not out or out[-1].req_id != until or out[-1].op == Op.WATCH_EVENT:
            out.append(c.read_packet())
        return out

    one_by_one = xenstored.connect()
    expected = []
    for request in run(b"/alone"):
        one_by_one.send_raw(request.encode())
        expected += packets(one_by_one, request.req_id)
    c = xenstored.connect()
    c.send_raw(b"".join(request.encode() for request in run(b"/piped")))
    got = packets(c, 71)
    assert [(p.op, p.req_id, p.payload.replace(b"/piped", b"/alone")) for p in got] == [
        (p.op, p.req_id, p.payload) for p in expected
    ]
    assert sum(p.op == Op.WATCH_EVENT for p in got) == 31  # the initial event, then one per write


def test_requests_split_at_every_byte_boundary(xenstored):
    c = xenstored.connect()
    data = Packet(Op.WRITE, 7, 0, b"/split\0value").encode() + Packet(Op.READ, 8, 0, b"/split\0").encode()
    for b in data:
        c.send_raw(bytes([b]))
        time.sleep(0.0005)
    assert c.read_reply() == Packet(Op.WRITE, 7, 0, b"OK\0")
    assert c.read_reply() == Packet(Op.READ, 8, 0, b"value")


def test_oversized_length_disconnects_only_that_connection(xenstored):
    good = xenstored.connect()
    good.write("/keep", b"1")
    bad = xenstored.connect()
    # A valid request first: it is answered before the hang-up.
    bad.send_raw(Packet(Op.READ, 1, 0, b"/keep\0").encode() + HEADER.pack(Op.WRITE, 2, 0, 4097) + b"x" * 100)
    assert bad.read_reply() == Packet(Op.READ, 1, 0, b"1")
    with pytest.raises((ConnectionError, OSError)):
        bad.read_reply()
    assert good.read("/keep") == b"1"
    assert xenstored.alive()


@pytest.mark.parametrize(
    "payload_op, payload, error",
    [
        (Op.READ, b"/no-nul", b"EINVAL\0"),
        (Op.READ, b"bad//path\0", b"EINVAL\0"),
        (Op.WRITE, b"/a b\0v", b"EINVAL\0"),
        (9999, b"", b"ENOSYS\0"),
        (Op.ERROR, b"", b"ENOSYS\0"),
        (Op.READ, b"/nope\0", b"ENOENT\0"),
    ],
)
def test_bad_requests_get_error_replies(xenstored, payload_op, payload, error):
    c = xenstored.connect()
    assert c.call(payload_op, payload) == (Op.ERROR, error)
    assert c.call(Op.READ, b"/tool\0") == (Op.READ, b"")


garbage_messages = st.one_of(
    st.binary(max_size=40),  # short or random headers
    st.builds(
        lambda op, rid, tx, payload: HEADER.pack(op, rid, tx, len(payload)) + payload,
        st.integers(0, 30) | st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 3) | st.integers(0, 2**32 - 1),
        st.binary(max_size=64) | st.lists(st.sampled_from([b"/", b"a", b"\0", b"@", b"..", b"/x/"]), max_size=12).map(b"".join),
    ),
    st.builds(lambda n: HEADER.pack(Op.WRITE, 1, 0, n), st.integers(4097, 2**32 - 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(garbage_messages, min_size=1, max_size=5))
def test_fuzzed_garbage_never_hurts_the_daemon(xenstored_shared, messages):
    daemon, observer = xenstored_shared
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(daemon.socket_path)
    try:
        s.sendall(b"".join(messages))
        s.shutdown(socket.SHUT_WR)
        # Whatever the daemon answers must be well-formed packets (or a hang-up).
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
        pos = 0
        while pos + 16 <= len(data):
            op, _, _, length = HEADER.unpack_from(data, pos)
            assert length <= 4096 and op in (*[int(o) for o in Op],)
            pos += 16 + length
        assert pos == len(data)
    finally:
        s.close()
    assert daemon.alive()
    assert observer.read("/fuzz/sentinel") == b"intact"
    assert observer.call(Op.DIRECTORY, b"/fuzz\0") == (Op.DIRECTORY, b"sentinel\0")


@pytest.fixture(scope="module")
def xenstored_shared(xenstored_module_factory):
    daemon = xenstored_module_factory.start()
    observer = daemon.connect()
    observer.write("/fuzz/sentinel", b"intact")
    return daemon, observer


def test_watch_events_reach_other_connections(xenstored):
    watcher = xenstored.connect()
    writer = xenstored.connect()
    assert watcher.call(Op.WATCH, b"/w\0tok\0") == (Op.WATCH, b"OK\0")
    assert watcher.wait_event() == (b"/w", b"tok")  # the initial event
    writer.write("/w/x", b"1")
    assert watcher.wait_event() == (b"/w/x", b"tok")


def test_client_that_never_reads_is_bounded_and_others_are_served(xenstored):
    """A client pipelining big replies without reading: the daemon stops reading
    it (its socket buffers fill) instead of queueing megabytes."""
    writer = xenstored.connect()
    writer.write("/big", b"x" * 4000)
    hog = xenstored.connect()
    # Also make it a watcher of busy paths, so events pile up for it as well.
    hog.send(Op.WATCH, b"/busy\0hog\0")
    hog.sock.setblocking(False)
    request = Packet(Op.READ, 1, 0, b"/big\0").encode()
    sent = 0
    deadline = time.monotonic() + 10
    rss_before = xenstored.rss_kib()
    while time.monotonic() < deadline:
        try:
            sent += hog.sock.send(request * 64)
        except BlockingIOError:
            break  # the daemon stopped reading us: back-pressure reached the socket
    else:
        pytest.fail("the daemon kept reading a client that never reads")
    assert sent > 0
    for i in range(300):  # events for the hog: dropped once its queue is full
        writer.write(f"/busy/{i % 50}", b"y" * 1000)
    other = xenstored.connect()
    for i in range(50):
        other.write(f"/other/{i}", b"z")
        assert other.read(f"/other/{i}") == b"z"
    # Replies the hog did not read were never produced beyond the queue bound.
    assert xenstored.rss_kib() - rss_before < 20_000
    assert xenstored.alive()


def test_reply_order_survives_back_pressure(xenstored):
    """Pipeline far more reply bytes than the queue holds, then read them all."""
    c = xenstored.connect()
    c.write("/bp", b"q" * 4000)
    n = 2000  # ~8 MB of replies
    c.sock.settimeout(30)
    def sender():
        c.send_raw(b"".join(Packet(Op.READ, i, 0, b"/bp\0").encode() for i in range(n)))

    t = threading.Thread(target=sender)
    t.start()
    for i in range(n):
        reply = c.read_reply()
        assert (reply.req_id, len(reply.payload)) == (i, 4000)
    t.join()


def test_trace_file(xenstored_factory, tmp_path):
    trace = tmp_path / "trace.log"
    d = xenstored_factory.start("-T", str(trace))
    c = d.connect()
    c.write("/traced", b"bar")
    c.read("/traced")
    # SIGHUP reopens the file (log rotation).
    trace.rename(tmp_path / "trace.old")
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while not trace.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    c.read("/traced")
    c.close()
    d.stop()
    assert " READ (/traced )" in trace.read_text()
    text = (tmp_path / "trace.old").read_text() + trace.read_text()
    assert "CREATE connection 0x" in text and "DESTROY connection 0x" in text
    assert " WRITE (/traced bar)" in text and " WRITE (OK )" in text
    assert " READ (/traced )" in text and " READ (bar)" in text



def test_running_out_of_file_descriptors_pauses_accept_only(xenstored_factory):
    """At the fd limit new connections wait; existing ones are still served."""
    import resource

    d = xenstored_factory.start()
    first = d.connect()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Lower the daemon's own limit to just above what it has open now.
    open_fds = len(os.listdir(f"/proc/{d.pid}/fd"))
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (open_fds + 2, hard))
    extra = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(6)]
    try:
        for s in extra:
            s.setblocking(False)
            try:
                s.connect(d.socket_path)
            except BlockingIOError:
                pass
        time.sleep(0.3)
        first.write("/fd/still", b"served")
        assert first.read("/fd/still") == b"served"
        cpu_before = sum(int(x) for x in open(f"/proc/{d.pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
        time.sleep(0.5)
        cpu_after = sum(int(x) for x in open(f"/proc/{d.pid}/stat").read().rsplit(")", 1)[1].split()[11:13])
        assert cpu_after - cpu_before < 25  # not spinning on the listener (ticks of 10 ms)
    finally:
        for s in extra:
            s.close()
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
    late = d.connect()
    assert late.read("/fd/still") == b"served"
    assert "pausing new connections" in d.stderr()


def test_many_concurrent_connections(xenstored):
    conns = [xenstored.connect() for _ in range(200)]
    for i, c in enumerate(conns):  # every connection has a request in flight at once
        c.send(Op.WRITE, b"/many/%d\0v%d" % (i, i))
    for i, c in enumerate(conns):
        assert c.read_reply().payload == b"OK\0"
    for i, c in enumerate(conns):
        c.send(Op.READ, b"/many/%d\0" % ((i + 1) % 200))
    for i, c in enumerate(conns):
        assert c.read_reply().payload == b"v%d" % ((i + 1) % 200)
    op, names = conns[0].call(Op.DIRECTORY, b"/many\0")
    assert len(names.split(b"\0")) - 1 == 200
