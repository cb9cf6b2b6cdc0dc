"""OutputQueue against a simple model (hypothesis state machine)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from xenstore.daemon.outqueue import OutputQueue
from xenstore.wire import Op, Packet


def event(path: bytes, token: bytes) -> bytes:
    return Packet(Op.WATCH_EVENT, 0, 0, path + b"\0" + token + b"\0").encode()


def reply(n: int) -> bytes:
    return Packet(Op.READ, n, 0, b"v" * (n % 50)).encode()


def test_identical_unstarted_event_is_dropped_but_special_ones_are_not():
    q = OutputQueue()
    assert q.push_event(event(b"/a", b"t"))
    assert not q.push_event(event(b"/a", b"t"))
    assert q.push_event(event(b"/a", b"u"))
    assert q.push_event(event(b"@releaseDomain", b"t"))
    assert q.push_event(event(b"@releaseDomain", b"t"))
    q.consume(1)  # the first event started: an identical one may queue again
    assert q.push_event(event(b"/a", b"t"))
    assert q.dropped_events == 1


def test_events_over_the_limit_or_too_long_are_dropped_replies_never():
    q = OutputQueue(event_limit=100)
    big = event(b"/a", b"x" * 60)
    assert q.push_event(big)
    assert not q.push_event(event(b"/b", b"x" * 60))
    q.push_replies(b"r" * 1000, 3)
    assert q.size == len(big) + 1000 and q.replies == 3
    assert not OutputQueue().push_event(Packet(Op.WATCH_EVENT, 0, 0, b"x" * 4096).encode() + b"x")


def test_events_past_their_deadline_go_unless_started():
    q = OutputQueue()
    q.push_replies(reply(1))
    first = event(b"/a", b"t")
    assert q.push_event(first, deadline=10.0)
    assert q.push_event(event(b"/b", b"t"), deadline=12.0)
    assert q.push_event(event(b"/c", b"t"))  # no deadline: stays
    assert q.next_expiry == 10.0
    assert q.drop_expired(9.9) == 0
    q.consume(len(reply(1)) + 1)  # the reply went, the first event started
    assert q.drop_expired(11.0) == 0 and q.next_expiry == 12.0  # started: goes out whole
    assert q.drop_expired(12.0) == 1 and q.next_expiry is None
    assert bytes(q.peek()) == first[1:]
    q.consume(len(first) - 1)
    assert bytes(q.peek()) == event(b"/c", b"t")
    assert q.push_event(event(b"/b", b"t"), deadline=20.0)  # the dropped one no longer blocks its twin
    assert q.dropped_events == 1 and q.replies == 0


class QueueMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.q = OutputQueue(event_limit=600)
        # (data, replies, unstarted event key, deadline while unstarted)
        self.model: list[tuple[bytes, int, bytes | None, float | None]] = []
        self.head_sent = 0
        self.now = 0.0
        self.sent = bytearray()
        self.expected = bytearray()

    @rule(n=st.integers(0, 200), count=st.integers(1, 3))
    def push_replies(self, n, count):
        data = b"".join(reply(n + i) for i in range(count))
        self.q.push_replies(data, count)
        self.model.append((data, count, None, None))
        self.expected += data

    @rule(
        path=st.sampled_from([b"/a", b"/b", b"@introduceDomain"]),
        token=st.sampled_from([b"t", b"u"]),
        ttl=st.sampled_from([None, 1.0, 5.0]),
    )
    def push_event(self, path, token, ttl):
        data = event(path, token)
        size = sum(len(m[0]) for m in self.model) - self.head_sent
        duplicate = not path.startswith(b"@") and any(m[2] == data for m in self.model)
        accept = size + len(data) <= 600 and not duplicate
        deadline = None if ttl is None else self.now + ttl
        assert self.q.push_event(data, deadline) == accept
        if accept:
            self.model.append((data, 0, None if path.startswith(b"@") else data, deadline))
            self.expected += data

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0]))
    def time_passes(self, dt):
        self.now += dt
        kept = [m for m in self.model if m[3] is None or m[3] > self.now]
        assert self.q.drop_expired(self.now) == len(self.model) - len(kept)
        self.model = kept
        self.expected = self.sent + b"".join(m[0] for m in kept)[self.head_sent :]

    @rule(limit=st.integers(1, 700), fraction=st.floats(0, 1))
    def send(self, limit, fraction):
        chunk = bytes(self.q.peek(limit))
        if not self.model:
            assert chunk == b""
            return
        assert chunk
        n = max(1, int(len(chunk) * fraction))
        self.q.consume(n)
        self.sent += chunk[:n]
        pos = self.head_sent + n
        while pos and self.model:
            data, count, key, deadline = self.model[0]
            self.model[0] = (data, count, None, None)  # started
            if pos < len(data):
                break
            pos -= len(data)
            self.model.pop(0)
        self.head_sent = pos if self.model else 0

    @invariant()
    def matches_model(self):
        assert bytes(self.sent) == bytes(self.expected[: len(self.sent)])
        assert self.q.size == len(self.expected) - len(self.sent)
        assert self.q.replies == sum(m[1] for m in self.model)
        assert bool(self.q) == bool(self.model)


QueueMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestQueue = QueueMachine.TestCase
