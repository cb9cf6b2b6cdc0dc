"""Generic shared ring (ring.h): unit tests, hostile indices, stateful model."""

import ctypes
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ringbuf.layouts.blkif import BLKIF_RING, BlkifRequest, BlkifResponse
from ringbuf.ring import (
    RING_IDX_MASK,
    SRING_HEADER_SIZE,
    RingFullError,
    RingIndexError,
    define_ring_types,
    ring_size,
)


class Msg(ctypes.Structure):
    _fields_ = [("seq", ctypes.c_uint32), ("value", ctypes.c_uint32)]


class Ack(ctypes.Structure):
    _fields_ = [("seq", ctypes.c_uint32)]


MSG_RING = define_ring_types("msg", Msg, Ack)
NEAR_WRAP = st.integers(min_value=0, max_value=64).map(lambda k: (0xFFFFFFF0 + k) & RING_IDX_MASK)


def ring_buffer(entries: int) -> bytearray:
    return bytearray(SRING_HEADER_SIZE + entries * MSG_RING.entry_size)


def set_word(buf: bytearray, word: int, value: int) -> None:
    memoryview(buf)[: SRING_HEADER_SIZE].cast("I")[word] = value & RING_IDX_MASK


def test_ring_size_rounds_down_to_power_of_two():
    assert ring_size(112, 4096) == 32  # 36 fit; 36 would corrupt slot indexing
    assert ring_size(64, 4096) == 32
    assert ring_size(64, 16 * 4096) == 512
    assert ring_size(8, 64 + 8) == 1
    with pytest.raises(ValueError):
        ring_size(112, 64 + 111)


def test_entry_size_is_the_union():
    assert MSG_RING.entry_size == 8
    assert BLKIF_RING.entry_size == 112


def test_readonly_buffer_rejected():
    with pytest.raises(ValueError):
        MSG_RING.init_front(bytes(4096))


def test_notify_hold_off_worked_example():
    """Fact sheet §6.4: consumer at 5 with req_event 6; push to 8 notifies, push to 9 does not."""
    buf = ring_buffer(16)
    front = MSG_RING.init_front(buf, start_index=0)
    back = MSG_RING.attach_back(buf)
    for i in range(5):
        front.put_request(Msg(i))
    front.push_requests()
    assert len(back.take_requests()) == 5
    assert back.final_check_for_requests() is False  # req_event = 6
    for i in range(3):
        front.put_request(Msg(i))
    assert front.push_requests() is True
    front.put_request(Msg(9))
    assert front.push_requests() is False
    assert back.unconsumed_requests() == 4


def test_notify_across_the_wrap():
    """old = 0xFFFFFFFE, new = 1, event = 0xFFFFFFFF -> notify."""
    buf = ring_buffer(8)
    front = MSG_RING.init_front(buf, start_index=0xFFFFFFFE)
    assert front.shared.req_event == 0xFFFFFFFF
    for i in range(3):
        front.put_request(Msg(i))
    assert front.push_requests() is True
    assert front.shared.req_prod == 1
    assert front.push_requests() is False  # nothing new: no notification


def test_full_ring_raises_for_the_local_caller():
    buf = ring_buffer(4)
    front = MSG_RING.init_front(buf)
    for i in range(4):
        front.put_request(Msg(i))
    assert front.full()
    with pytest.raises(RingFullError):
        front.put_request(Msg(99))
    back = MSG_RING.attach_back(buf)
    with pytest.raises(RingFullError):
        back.put_response(Ack(1))  # nothing consumed yet


def test_backend_request_copy_is_private():
    """RING_COPY_REQUEST: rewriting the shared slot after the copy changes nothing."""
    buf = bytearray(4096)
    front = BLKIF_RING.init_front(buf)
    back = BLKIF_RING.attach_back(buf)
    front.put_request(BlkifRequest(operation=0, nr_segments=1, id=42))
    front.push_requests()
    (req,) = back.take_requests()
    buf[SRING_HEADER_SIZE : SRING_HEADER_SIZE + 112] = b"\xff" * 112  # hostile rewrite
    assert (req.operation, req.nr_segments, req.id) == (0, 1, 42)


def test_multi_page_ring_entries_cross_page_boundaries():
    buf = bytearray(4 * 4096)
    front = BLKIF_RING.init_front(buf, start_index=0xFFFFFF00)
    back = BLKIF_RING.attach_back(buf)
    assert front.nr_ents == 128
    seen = []
    for round_ in range(5):
        for i in range(100):
            front.put_request(BlkifRequest(id=round_ * 1000 + i, sector_number=i))
        front.push_requests()
        reqs = back.take_requests()
        seen += [r.id for r in reqs]
        for r in reqs:
            back.put_response(BlkifResponse(id=r.id))
        back.push_responses()
        assert [r.id for r in front.take_responses()] == [r.id for r in reqs]
    assert seen == [r * 1000 + i for r in range(5) for i in range(100)]


@given(start=NEAR_WRAP, entries=st.sampled_from([1, 2, 4, 8]), batches=st.lists(st.integers(1, 8), max_size=20))
@settings(max_examples=60, deadline=None)
def test_raw_batches_round_trip_across_the_wrap(start, entries, batches):
    buf = ring_buffer(entries)
    front = MSG_RING.init_front(buf, start_index=start)
    back = MSG_RING.attach_back(buf)
    sent, got, seq = [], [], 0
    for batch in batches:
        n = min(batch, front.free_requests())
        data = b"".join(bytes(Msg(seq + i, 7)) for i in range(n))
        seq += n
        assert front.put_raw_requests(data) == n
        sent.append(data)
        front.push_requests()
        raw = back.take_raw_requests()
        got.append(raw)
        acks = b"".join(bytes(Ack(Msg.from_buffer_copy(raw, o).seq)) + bytes(4) for o in range(0, len(raw), 8))
        back.put_raw_responses(acks)
        back.push_responses()
        assert [a.seq for a in front.take_responses()] == [
            Msg.from_buffer_copy(raw, o).seq for o in range(0, len(raw), 8)
        ]
    assert b"".join(got) == b"".join(sent)


# -- hostile peers -----------------------------------------------------------


@pytest.mark.parametrize("delta", [9, 0x80000000, -1, RING_IDX_MASK])
def test_backend_detects_impossible_request_producer(delta):
    buf = ring_buffer(8)
    start = 0xFFFFFFFC
    MSG_RING.init_front(buf, start_index=start)
    back = MSG_RING.attach_back(buf)
    set_word(buf, 0, start + delta)  # req_prod: beyond the ring, or behind req_cons
    with pytest.raises(RingIndexError) as exc:
        back.take_requests()
    assert "request producer index" in str(exc.value)
    with pytest.raises(RingIndexError):
        back.final_check_for_requests()


def test_backend_counts_unanswered_requests_against_the_ring():
    """8 requests consumed but unanswered: a 9th published request is impossible."""
    buf = ring_buffer(8)
    front = MSG_RING.init_front(buf)
    back = MSG_RING.attach_back(buf)
    for i in range(8):
        front.put_request(Msg(i))
    front.push_requests()
    assert len(back.take_requests()) == 8
    set_word(buf, 0, 9)
    with pytest.raises(RingIndexError):
        back.unconsumed_requests()


@pytest.mark.parametrize("delta", [3, 100, -1])
def test_frontend_detects_responses_to_requests_never_sent(delta):
    buf = ring_buffer(8)
    front = MSG_RING.init_front(buf, start_index=0xFFFFFFFF)
    for i in range(2):
        front.put_request(Msg(i))
    front.push_requests()
    set_word(buf, 2, 0xFFFFFFFF + delta)  # rsp_prod
    with pytest.raises(RingIndexError):
        front.take_responses()


def test_frontend_attach_rejects_corrupt_header():
    buf = ring_buffer(8)
    MSG_RING.init_front(buf)
    set_word(buf, 0, 50)
    with pytest.raises(RingIndexError):
        MSG_RING.attach_front(buf)


def test_reattached_frontend_keeps_outstanding_requests():
    buf = ring_buffer(8)
    front = MSG_RING.init_front(buf, start_index=0xFFFFFFFE)
    for i in range(3):
        front.put_request(Msg(i))
    front.push_requests()
    back = MSG_RING.attach_back(buf)
    again = MSG_RING.attach_front(buf)  # frontend restarted
    assert again.free_requests() == 5
    for r in back.take_requests():
        back.put_response(Ack(r.seq))
    back.push_responses()
    assert [a.seq for a in again.take_responses()] == [0, 1, 2]


# -- stateful model: front/back ring vs a queue, with sleeping ends ----------


class RingMachine(RuleBasedStateMachine):
    """Both ends driven step by step; an end that found no work "sleeps" and
    only a notification wakes it. Invariant: nobody sleeps on pending work."""

    @rule(start=NEAR_WRAP, entries=st.sampled_from([1, 2, 4, 8]))
    @precondition(lambda self: not hasattr(self, "front"))
    def setup(self, start, entries):
        self.buf = ring_buffer(entries)
        self.front = MSG_RING.init_front(self.buf, start_index=start)
        self.back = MSG_RING.attach_back(self.buf)
        self.queued = deque()  # put, not pushed
        self.in_flight = deque()  # pushed, not taken by the back
        self.taken = deque()  # taken by the back, not answered
        self.answered = deque()  # responses queued, not pushed
        self.responses = deque()  # pushed responses, not taken by the front
        self.seq = 0
        self.back_asleep = self.front_asleep = False
        self.back_notified = self.front_notified = False
        self.front_awaits = False

    def ready(self):
        return hasattr(self, "front")

    @precondition(lambda self: self.ready())
    @rule(n=st.integers(1, 8))
    def put_requests(self, n):
        n = min(n, self.front.free_requests())
        for _ in range(n):
            self.front.put_request(Msg(self.seq, self.seq * 3))
            self.queued.append(self.seq)
            self.seq += 1

    @precondition(lambda self: self.ready())
    @rule()
    def push_requests(self):
        if self.front.push_requests():
            self.back_notified = True
        self.in_flight.extend(self.queued)
        self.queued.clear()

    @precondition(lambda self: self.ready() and not self.back_asleep)
    @rule(max_count=st.integers(1, 8))
    def back_takes(self, max_count):
        reqs = self.back.take_requests(max_count)
        for r in reqs:
            assert r.seq == self.in_flight.popleft() and r.value == r.seq * 3
            self.taken.append(r.seq)

    @precondition(lambda self: self.ready() and not self.back_asleep and self.taken)
    @rule(n=st.integers(1, 8))
    def back_answers(self, n):
        for _ in range(min(n, len(self.taken))):
            seq = self.taken.popleft()
            self.back.put_response(Ack(seq))
            self.answered.append(seq)

    @precondition(lambda self: self.ready() and not self.back_asleep)
    @rule()
    def back_pushes(self):
        if self.back.push_responses():
            self.front_notified = True
        self.responses.extend(self.answered)
        self.answered.clear()

    @precondition(lambda self: self.ready() and not self.back_asleep and not self.taken and not self.answered)
    @rule()
    def back_tries_to_sleep(self):
        if not self.back.final_check_for_requests():
            self.back_asleep = True
            self.back_notified = False  # a notification already consumed does not count

    @precondition(lambda self: self.ready() and self.back_asleep and self.back_notified)
    @rule()
    def back_wakes(self):
        self.back_asleep = self.back_notified = False

    @precondition(lambda self: self.ready() and not self.front_asleep)
    @rule(max_count=st.integers(1, 8))
    def front_takes(self, max_count):
        for a in self.front.take_responses(max_count):
            assert a.seq == self.responses.popleft()

    @precondition(lambda self: self.ready() and not self.front_asleep)
    @rule()
    def front_tries_to_sleep(self):
        if not self.front.final_check_for_responses():
            self.front_asleep = True
            self.front_notified = False

    @precondition(lambda self: self.ready() and self.front_asleep and self.front_notified)
    @rule()
    def front_wakes(self):
        self.front_asleep = self.front_notified = False

    @invariant()
    def no_sleep_on_pending_work(self):
        if not self.ready():
            return
        if self.back_asleep and not self.back_notified:
            assert self.back.unconsumed_requests() == 0, "backend asleep with requests pending"
        if self.front_asleep and not self.front_notified:
            assert self.front.unconsumed_responses() == 0, "frontend asleep with responses pending"

    @invariant()
    def counts_match_the_model(self):
        if not self.ready():
            return
        assert self.front.unconsumed_responses() == len(self.responses)
        outstanding = len(self.in_flight) + len(self.taken) + len(self.answered) + len(self.responses)
        assert self.front.free_requests() == self.front.nr_ents - outstanding - len(self.queued)


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


class HoldOffRaceMachine(RuleBasedStateMachine):
    """The lost-wake-up race at the granularity where it lives.

    Producer push = [store prod index] .. [read event index, decide notify];
    consumer final check = [check] .. [arm event index] .. [re-check] .. sleep.
    Hypothesis interleaves the two sides' sub-steps arbitrarily (the full
    barriers make the shared memory sequentially consistent, which is what this
    in-process model assumes). Invariant: a sleeping consumer without a pending
    notification has nothing to consume.
    """

    @rule(start=NEAR_WRAP, entries=st.sampled_from([1, 2, 4]))
    @precondition(lambda self: not hasattr(self, "front"))
    def setup(self, start, entries):
        buf = ring_buffer(entries)
        self.front = MSG_RING.init_front(buf, start_index=start)
        self.back = MSG_RING.attach_back(buf)
        self.producer = self.front._requests
        self.consumer = self.back._requests
        self.publishing = None  # (old, new) between the two push steps
        self.consumer_state = "awake"  # awake | armed | checked | asleep
        self.notified = False
        self.expected = deque()
        self.seq = 0

    def ready(self):
        return hasattr(self, "front")

    @precondition(lambda self: self.ready() and self.publishing is None)
    @rule(n=st.integers(1, 4))
    def put(self, n):
        for _ in range(min(n, self.front.free_requests())):
            self.front.put_request(Msg(self.seq))
            self.expected.append(self.seq)
            self.seq += 1

    @precondition(lambda self: self.ready() and self.publishing is None)
    @rule()
    def publish(self):
        self.publishing = self.producer.publish()

    @precondition(lambda self: self.ready() and self.publishing is not None)
    @rule()
    def decide_notify(self):
        old, new = self.publishing
        self.publishing = None
        if old != new and self.producer.peer_wants_notify(old, new):
            self.notified = True

    @precondition(lambda self: self.ready() and self.consumer_state == "awake")
    @rule(max_count=st.integers(1, 4))
    def consume_and_answer(self, max_count):
        for r in self.back.take_requests(max_count):
            assert r.seq == self.expected.popleft()
            self.back.put_response(Ack(r.seq))
        self.back.push_responses()
        self.front.take_responses()

    @precondition(lambda self: self.ready() and self.consumer_state == "awake")
    @rule()
    def check(self):
        if self.consumer.unconsumed() == 0:
            self.consumer_state = "checked"

    @precondition(lambda self: self.ready() and self.consumer_state == "checked")
    @rule()
    def arm(self):
        self.consumer.arm()
        self.consumer_state = "armed"

    @precondition(lambda self: self.ready() and self.consumer_state == "armed")
    @rule()
    def recheck_then_sleep(self):
        if self.consumer.unconsumed():
            self.consumer_state = "awake"
        else:
            self.consumer_state = "asleep"
            self.notified = False  # only a notification sent from now on wakes us

    @precondition(lambda self: self.ready() and self.consumer_state == "asleep" and self.notified)
    @rule()
    def wake(self):
        self.consumer_state = "awake"
        self.notified = False

    @invariant()
    def asleep_only_when_idle(self):
        if self.ready() and self.consumer_state == "asleep" and not self.notified and self.publishing is None:
            assert self.consumer.unconsumed() == 0, "consumer sleeps while requests are pending"


TestHoldOffRace = HoldOffRaceMachine.TestCase
TestHoldOffRace.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


def test_restarted_backend_attaches_without_touching_the_header():
    """A reconnecting backend re-serves every unanswered request; nothing is reset."""
    buf = ring_buffer(8)
    front = MSG_RING.init_front(buf, start_index=0xFFFFFFFD)
    for i in range(5):
        front.put_request(Msg(i))
    front.push_requests()
    old_back = MSG_RING.attach_back(buf)
    taken = old_back.take_requests()
    old_back.put_responses([Ack(r.seq) for r in taken[:2]])  # answered 2, then "crashed"
    old_back.push_responses()
    header = bytes(buf[:SRING_HEADER_SIZE])
    new_back = MSG_RING.attach_back(buf)
    assert bytes(buf[:SRING_HEADER_SIZE]) == header
    assert [r.seq for r in new_back.take_requests()] == [2, 3, 4]
    assert new_back.statistics().outstanding == 3
    assert front.statistics().outstanding == 5
    assert [a.seq for a in front.take_responses()] == [0, 1]
    assert front.statistics().outstanding == 3
