"""Deferred INTRODUCE: with ``Engine(defer_introduce=True)`` (an I/O layer
that maps rings) INTRODUCE of a new domain is answered by
``complete_introduce`` once the map and bind are done; the requesting
connection's later requests wait behind it, in order."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xenstore.core import Engine, Introduced
from xenstore.wire import Op, Packet

_req_ids = iter(range(1, 1 << 30))


def send(engine, conn, op, payload: bytes, tx: int = 0):
    """(req_id, deliveries as (conn, op, payload)); "|" stands for NUL."""
    req_id = next(_req_ids)
    out = engine.handle(conn, Packet(op, req_id, tx, payload.replace(b"|", b"\0")))
    return req_id, [(c, int(p.op), p.payload) for c, p in out]


def req(engine, conn, op, payload: bytes, tx: int = 0):
    return send(engine, conn, op, payload, tx)[1]


def triples(out):
    return [(c, int(p.op), p.payload) for c, p in out]


@pytest.fixture
def engine():
    return Engine(defer_introduce=True)


def introduce(engine, conn, domid: int, port: int = 5) -> int:
    """Send a deferred INTRODUCE; returns its token."""
    engine.take_effects()
    assert req(engine, conn, Op.INTRODUCE, b"%d|1|%d|" % (domid, port)) == []  # no reply yet
    (effect,) = engine.take_effects()
    assert effect[:3] == (domid, 1, port) and effect.pending is not None
    return effect.pending


def test_reply_waits_for_completion_then_event_before_ok(engine, dom0):
    watcher = engine.connect()
    req(engine, watcher, Op.WATCH, b"@introduceDomain|i|")
    token = introduce(engine, dom0, 5)
    assert engine.introduce_pending(token)
    assert engine.statistics()["introducing"] == 1
    # Not introduced while the ring is being mapped.
    assert req(engine, watcher, Op.IS_DOMAIN_INTRODUCED, b"5|")[-1][2] == b"F\0"
    assert req(engine, watcher, Op.RELEASE, b"5|")[-1][2] == b"ENOENT\0"
    assert engine.domain_died(5) == []  # nothing to tear down yet
    out = triples(engine.complete_introduce(token))
    assert out == [(watcher, Op.WATCH_EVENT, b"@introduceDomain\0i\0"), (dom0, Op.INTRODUCE, b"OK\0")]
    assert not engine.introduce_pending(token)
    assert engine.complete_introduce(token) == []  # once only
    assert engine.take_effects() == []  # the effect was the deferred one
    assert req(engine, watcher, Op.IS_DOMAIN_INTRODUCED, b"5|")[-1][2] == b"T\0"
    assert engine.statistics()["introducing"] == 0
    assert engine.domains.get(5).port == 5


@pytest.mark.parametrize(
    "error, wire", [("EINVAL", b"EINVAL\0"), ("ESRCH", b"EINVAL\0"), ("ENOMEM", b"ENOMEM\0"), ("bogus", b"EINVAL\0")]
)
def test_failed_map_or_bind_is_the_reply(engine, dom0, error, wire):
    watcher = engine.connect()
    req(engine, watcher, Op.WATCH, b"@introduceDomain|i|")
    req(engine, watcher, Op.WATCH, b"@releaseDomain|r|")
    token = introduce(engine, dom0, 7)
    assert triples(engine.complete_introduce(token, error)) == [(dom0, Op.ERROR, wire)]
    assert engine.domains.get(7) is None  # the record this INTRODUCE made is gone again
    assert req(engine, dom0, Op.IS_DOMAIN_INTRODUCED, b"7|")[-1][2] == b"F\0"
    assert engine.take_effects() == []  # nothing to release
    # A later attempt starts from scratch.
    token = introduce(engine, dom0, 7)
    assert triples(engine.complete_introduce(token))[-1] == (dom0, Op.INTRODUCE, b"OK\0")


def test_failure_keeps_a_domain_record_that_existed_before(engine, dom0):
    req(engine, dom0, Op.SET_QUOTA, b"7|nodes|33|")
    token = introduce(engine, dom0, 7)
    engine.complete_introduce(token, "EINVAL")
    assert engine.quota("nodes", 7) == 33


def test_later_requests_of_the_same_connection_wait_in_order(engine, dom0):
    other = engine.connect()
    token = introduce(engine, dom0, 5)
    held = [send(engine, dom0, op, payload) for op, payload in (
        (Op.WRITE, b"/a|1"),
        (Op.IS_DOMAIN_INTRODUCED, b"5|"),
        (Op.READ, b"/a|"),
        (999, b""),  # unknown type: ENOSYS, still in order
    )]
    assert all(out == [] for _, out in held)
    # Other connections are served meanwhile and do not see the held WRITE.
    assert req(engine, other, Op.READ, b"/a|")[-1][2] == b"ENOENT\0"
    out = engine.complete_introduce(token)
    replies = [(p.req_id, int(p.op), p.payload) for c, p in out if c is dom0]
    ids = [req_id for req_id, _ in held]
    assert replies[0][1:] == (Op.INTRODUCE, b"OK\0")
    assert replies[1:] == [
        (ids[0], Op.WRITE, b"OK\0"),
        (ids[1], Op.IS_DOMAIN_INTRODUCED, b"T\0"),
        (ids[2], Op.READ, b"1"),
        (ids[3], Op.ERROR, b"ENOSYS\0"),
    ]
    # Not held any more.
    assert req(engine, dom0, Op.READ, b"/a|")[-1][2] == b"1"


def test_short_way_never_answers_a_held_connection(engine, dom0):
    """The I/O layer asks ``quick_reply`` before ``handle``: while the
    connection waits for its INTRODUCE reply, it must not answer out of order."""
    req(engine, dom0, Op.WRITE, b"/a|1")
    req(engine, dom0, Op.READ, b"/a|")  # the path is remembered: a short-way candidate
    assert engine.quick_reply(dom0, Op.READ, 0, b"/a\0") == b"1"
    token = introduce(engine, dom0, 5)
    for op, payload in ((Op.READ, b"/a\0"), (Op.WRITE, b"/a\0002"), (Op.TRANSACTION_START, b"\0")):
        assert engine.quick_reply(dom0, op, 0, payload) is None
    assert engine.quick_reply(engine.connect(), Op.READ, 0, b"/a\0") == b"1"  # others are served
    engine.complete_introduce(token)
    assert engine.quick_reply(dom0, Op.READ, 0, b"/a\0") == b"1"


def test_a_held_introduce_defers_again_and_the_rest_keeps_waiting(engine, dom0):
    first = introduce(engine, dom0, 5)
    assert req(engine, dom0, Op.INTRODUCE, b"6|1|9|") == []
    rid, out = send(engine, dom0, Op.READ, b"/tool|")
    assert out == []
    out = triples(engine.complete_introduce(first))
    assert out == [(dom0, Op.INTRODUCE, b"OK\0")]  # then 6's INTRODUCE deferred
    (effect,) = engine.take_effects()
    assert effect[:3] == (6, 1, 9)
    out = engine.complete_introduce(effect.pending)
    assert [(p.op, p.payload) for _, p in out] == [(Op.INTRODUCE, b"OK\0"), (Op.READ, b"")]
    assert out[-1][1].req_id == rid


def test_held_release_runs_after_the_introduce(engine, dom0):
    token = introduce(engine, dom0, 5)
    assert req(engine, dom0, Op.RELEASE, b"5|") == []
    out = triples(engine.complete_introduce(token))
    assert [(op, p) for _, op, p in out] == [(Op.INTRODUCE, b"OK\0"), (Op.RELEASE, b"OK\0")]
    assert [type(e).__name__ for e in engine.take_effects()] == ["Released"]
    assert not engine.domains.is_introduced(5)


def test_second_introduce_from_another_connection_is_busy(engine, dom0):
    other = engine.connect()
    token = introduce(engine, dom0, 5)
    assert req(engine, other, Op.INTRODUCE, b"5|1|5|")[-1][1:] == (Op.ERROR, b"EBUSY\0")
    assert req(engine, other, Op.SET_FEATURE, b"5|1|")[-1][1:] == (Op.ERROR, b"EBUSY\0")
    assert engine.take_effects() == []
    engine.complete_introduce(token)
    # Known now: a re-introduction (resume) is answered at once.
    assert req(engine, other, Op.INTRODUCE, b"5|1|8|")[-1][1:] == (Op.INTRODUCE, b"OK\0")
    assert engine.take_effects() == [Introduced(5, 1, 8)]


def test_requesting_connection_closes_while_pending(engine, dom0):
    watcher = engine.connect()
    req(engine, watcher, Op.WATCH, b"@introduceDomain|i|")
    toolstack = engine.connect()
    token = introduce(engine, toolstack, 5)
    assert req(engine, toolstack, Op.WRITE, b"/never|") == []
    assert engine.disconnect(toolstack) == []
    # The introduction still completes (the request was made); no reply goes
    # to the closed connection and its held WRITE is dropped.
    out = triples(engine.complete_introduce(token))
    assert out == [(watcher, Op.WATCH_EVENT, b"@introduceDomain\0i\0")]
    assert engine.domains.is_introduced(5)
    assert req(engine, dom0, Op.READ, b"/never|")[-1][2] == b"ENOENT\0"
    # The same for a failing one: nothing at all.
    toolstack = engine.connect()
    token = introduce(engine, toolstack, 6)
    engine.disconnect(toolstack)
    assert engine.complete_introduce(token, "EINVAL") == []
    assert engine.statistics()["introducing"] == 0


def test_argument_errors_are_still_immediate(engine, dom0):
    for payload, error in ((b"5|1|0|", b"EINVAL\0"), (b"5|1|-3|", b"EINVAL\0"), (b"5|1|", b"EINVAL\0"),
                           (b"-1|1|5|", b"EINVAL\0"), (b"32752|1|5|", b"EINVAL\0")):
        assert req(engine, dom0, Op.INTRODUCE, payload)[-1][1:] == (Op.ERROR, error), payload
    assert req(engine, dom0, Op.INTRODUCE, b"0|1|5|")[-1][1:] == (Op.INTRODUCE, b"OK\0")  # dom0: nothing to do
    assert engine.take_effects() == []
    unknown = Engine(defer_introduce=True, domain_exists=lambda domid: False)
    conn = unknown.connect()
    assert req(unknown, conn, Op.INTRODUCE, b"5|1|5|")[-1][1:] == (Op.ERROR, b"EINVAL\0")
    assert unknown.take_effects() == []


def test_unprivileged_introduce_is_refused_before_deferring(engine, dom0):
    token = introduce(engine, dom0, 5)
    engine.complete_introduce(token)
    guest = engine.connect(5, privileged=False)
    assert req(engine, guest, Op.INTRODUCE, b"6|1|5|")[-1][1:] == (Op.ERROR, b"EACCES\0")
    assert engine.take_effects() == []


def test_without_deferral_introduce_is_answered_at_once():
    engine = Engine()
    dom0 = engine.connect()
    assert req(engine, dom0, Op.INTRODUCE, b"5|1|5|")[-1][1:] == (Op.INTRODUCE, b"OK\0")
    assert engine.take_effects() == [Introduced(5, 1, 5)]
    assert engine.domains.is_introduced(5)
    # Switching deferral on at run time affects new domains only.
    engine.defer_introduce = True
    assert req(engine, dom0, Op.INTRODUCE, b"5|1|6|")[-1][1:] == (Op.INTRODUCE, b"OK\0")
    assert req(engine, dom0, Op.INTRODUCE, b"6|1|6|") == []


def test_guest_connection_made_before_completion_starts_clean(engine, dom0):
    """The I/O layer may create the guest's connection before completing."""
    token = introduce(engine, dom0, 5)
    guest = engine.connect(5, privileged=False)
    engine.complete_introduce(token)
    req(engine, dom0, Op.WRITE, b"/local/domain/5|")
    req(engine, dom0, Op.SET_PERMS, b"/local/domain/5|n5|")
    assert req(engine, guest, Op.WRITE, b"x|1")[-1][2] == b"OK\0"


# -- a model: every request gets exactly one reply, in request order -------------

DOMIDS = (1, 2, 3, 4, 5, 6)


class DeferredIntroduceMachine(RuleBasedStateMachine):
    """Random requests on two toolstack connections, completions (OK or
    error) in any order, disconnections; checked against a model that
    answers each connection's requests strictly in order."""

    @initialize()
    def setup(self) -> None:
        self.engine = Engine(defer_introduce=True)
        self.watcher = self.engine.connect()
        self.engine.handle(self.watcher, Packet(Op.WATCH, 0, 0, b"@introduceDomain\0i\0"))
        self.conns = [self.engine.connect(), self.engine.connect()]
        self.next_id = 1
        # model
        self.introduced: set[int] = set()
        self.introducing: dict[int, int] = {}  # domid -> token
        self.pending: dict[int, tuple] = {}  # token -> (conn, req_id, domid)
        self.held: dict = {}  # conn -> [(req_id, kind, domid)]
        self.expected: dict = {c: [] for c in self.conns}  # conn -> [(req_id, payload)]
        self.got: dict = {c: [] for c in self.conns}
        self.events_expected = 0
        self.events_got = 0

    # model ------------------------------------------------------------------

    def _model_process(self, conn, req_id: int, kind: str, domid: int) -> bool:
        """Answer one request in the model; False if it was deferred."""
        if kind == "introduce":
            if domid in self.introducing:
                self.expected[conn].append((req_id, b"EBUSY\0"))
            elif domid in self.introduced:
                self.expected[conn].append((req_id, b"OK\0"))
            else:
                return False
        elif kind == "release":
            if domid in self.introduced:
                self.introduced.discard(domid)
                self.expected[conn].append((req_id, b"OK\0"))
            else:
                self.expected[conn].append((req_id, b"ENOENT\0"))
        else:
            self.expected[conn].append((req_id, b"T\0" if domid in self.introduced else b"F\0"))
        return True

    def _collect(self, out) -> None:
        for conn, packet in out:
            if packet.op == Op.WATCH_EVENT:
                assert conn is self.watcher
                self.events_got += 1
            else:
                assert conn in self.got and conn.alive
                self.got[conn].append((packet.req_id, packet.payload))
        for effect in self.engine.take_effects():
            if isinstance(effect, Introduced) and effect.pending is not None:
                token = effect.pending
                assert token not in self.pending
                conn, req_id, domid = self._deferring
                self.pending[token] = (conn, req_id, domid)
                self.introducing[domid] = token

    # rules --------------------------------------------------------------------

    @rule(which=st.integers(0, 1), kind=st.sampled_from(["introduce", "introduce", "release", "is"]), domid=st.sampled_from(DOMIDS))
    def request(self, which: int, kind: str, domid: int) -> None:
        conn = self.conns[which]
        req_id, self.next_id = self.next_id, self.next_id + 1
        op, payload = {
            "introduce": (Op.INTRODUCE, b"%d\x001\x005\x00" % domid),
            "release": (Op.RELEASE, b"%d\x00" % domid),
            "is": (Op.IS_DOMAIN_INTRODUCED, b"%d\x00" % domid),
        }[kind]
        if conn in self.held:
            self.held[conn].append((req_id, kind, domid))
        elif not self._model_process(conn, req_id, kind, domid):
            self.held[conn] = []
            self._deferring = (conn, req_id, domid)
        self._collect(self.engine.handle(conn, Packet(op, req_id, 0, payload)))

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def complete(self, data, ok: bool) -> None:
        token = data.draw(st.sampled_from(sorted(self.pending)))
        conn, req_id, domid = self.pending.pop(token)
        del self.introducing[domid]
        if ok:
            self.introduced.add(domid)
            self.events_expected += 1
        if conn.alive:
            self.expected[conn].append((req_id, b"OK\0" if ok else b"EINVAL\0"))
        held = self.held.pop(conn, [])
        deferred_now = None
        for i, (rid, kind, d) in enumerate(held):
            if not conn.alive:
                break
            if not self._model_process(conn, rid, kind, d):
                self.held[conn] = held[i + 1 :]
                deferred_now = (conn, rid, d)
                break
        if deferred_now is not None:
            self._deferring = deferred_now
        self._collect(self.engine.complete_introduce(token, None if ok else "EINVAL"))

    @rule(which=st.integers(0, 1))
    def reconnect(self, which: int) -> None:
        """The connection closes (its held requests die); a new one takes its place."""
        old = self.conns[which]
        self.held.pop(old, None)
        self._collect(self.engine.disconnect(old))
        new = self.conns[which] = self.engine.connect()
        self.expected[new], self.got[new] = [], []

    @invariant()
    def replies_match_the_model(self) -> None:
        for conn in self.conns:
            assert self.got[conn] == self.expected[conn]
        assert self.events_got == self.events_expected
        for domid in DOMIDS:
            assert self.engine.domains.is_introduced(domid) == (domid in self.introduced)
        assert self.engine.statistics()["introducing"] == len(self.pending)


TestDeferredIntroduce = DeferredIntroduceMachine.TestCase
TestDeferredIntroduce.settings = settings(max_examples=150, stateful_step_count=40, deadline=None, database=None)
