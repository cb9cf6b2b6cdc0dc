"""The XenBus state machine: legality, termination, and two ends driven
against each other by an adversarial scheduler (hypothesis)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenbus.state import (
    IDLE,
    RULES,
    TRANSITIONS,
    Local,
    Role,
    Step,
    Work,
    XenbusState,
    decide,
    format_state,
    is_allowed,
    parse_state,
)

S = XenbusState
ALL_LOCALS = [
    Local(attached=a, connected=c, ready=r, closing=x, skip_initialised=k, publish_early=e)
    for a, c, r, x, k, e in itertools.product([False, True], repeat=6)
]


def test_values_are_xens():
    assert [int(s) for s in S] == list(range(9))
    assert S.Reconfiguring == 7 and S.Reconfigured == 8
    assert format_state(S.Connected) == "4"


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, S.Unknown),
        (b"4", S.Connected),
        ("6", S.Closed),
        (b"1\x00", S.Initialising),  # %d stops at the first non-digit
        (b" 3", S.Initialised),
        (b"+2", S.InitWait),
        (b"", S.Unknown),
        (b"x", S.Unknown),
        (b"9", S.Unknown),
        (b"-1", S.Unknown),
        (b"\xff\xfe", S.Unknown),
    ],
)
def test_parse_state(raw, expected):
    assert parse_state(raw) is expected


@given(st.one_of(st.none(), st.binary(max_size=20), st.text(max_size=20)))
@settings(max_examples=200, deadline=None)
def test_parse_state_never_raises(raw):
    assert isinstance(parse_state(raw), XenbusState)


@given(st.sampled_from(list(S)))
def test_parse_format_round_trip(state):
    assert parse_state(format_state(state).encode()) is state


def test_table_shape():
    for role in Role:
        assert set(TRANSITIONS[role]) == set(S)
        assert TRANSITIONS[role][S.Unknown] == frozenset()
        for src, dsts in TRANSITIONS[role].items():
            assert src not in dsts, "a same-state write is never a transition"
            assert S.Unknown not in dsts
    # The roles differ exactly where the protocol does.
    assert S.InitWait not in set().union(*TRANSITIONS[Role.FRONTEND].values())
    assert TRANSITIONS[Role.FRONTEND][S.Closed] == {S.Initialising}
    assert TRANSITIONS[Role.BACKEND][S.Closed] == {S.InitWait, S.Closing}
    assert all(rule.step != IDLE for rule in RULES)


def test_every_decision_is_a_legal_transition():
    for role, mine, peer, local in itertools.product(Role, S, S, ALL_LOCALS):
        step = decide(role, mine, peer, local)
        if step.switch_to is not None:
            assert is_allowed(role, mine, step.switch_to), (role, mine, peer, local, step)
        if mine is S.Unknown:
            assert step.switch_to is None  # never resurrect a deleted directory


def apply_work(local: Local, work: Work) -> Local:
    """What the driver's work does to the local facts (the model used below)."""
    if work is Work.PUBLISH:
        return local
    if work is Work.CONNECT:
        return replace(local, attached=True, connected=True)
    if work is Work.DISCONNECT:
        return replace(local, attached=False, connected=False)
    return local


def publish(role: Role, local: Local) -> Local:
    if role is Role.FRONTEND:
        return replace(local, attached=True, connected=False)
    return local


def settle(role: Role, mine: XenbusState, peer: XenbusState, local: Local, limit: int = 8):
    """Apply decide() until idle: returns (mine, local, steps taken, removed)."""
    steps = []
    for _ in range(limit):
        step = decide(role, mine, peer, local)
        if step.idle:
            return mine, local, steps, False
        steps.append(step)
        if step.work is Work.REMOVE:
            return mine, local, steps, True
        local = publish(role, local) if step.work is Work.PUBLISH else apply_work(local, step.work)
        if step.switch_to is not None:
            assert is_allowed(role, mine, step.switch_to)
            mine = step.switch_to
    raise AssertionError(f"no fixed point: {role} {mine} {peer} {local} {steps}")


def test_every_situation_settles_quickly():
    for role, mine, peer, local in itertools.product(Role, S, S, ALL_LOCALS):
        _, _, steps, _ = settle(role, mine, peer, local)
        assert len(steps) <= 4


@given(
    role=st.sampled_from(list(Role)),
    start=st.sampled_from(list(S)),
    local=st.sampled_from(ALL_LOCALS),
    peers=st.lists(st.sampled_from(list(S)), max_size=30),
)
@settings(max_examples=300, deadline=None)
def test_random_peer_sequences_never_break_the_rules(role, start, local, peers):
    mine = start
    for peer in peers:
        mine, local, _, removed = settle(role, mine, peer, local)
        if removed:
            break
        # Invariants the driver relies on.
        if mine in (S.Closed, S.Initialising, S.InitWait) and role is Role.FRONTEND:
            assert not local.attached
        if mine is S.Closed and role is Role.BACKEND:
            assert not local.attached


@given(
    role=st.sampled_from(list(Role)),
    start=st.sampled_from([s for s in S if s is not S.Unknown]),
    local=st.sampled_from(ALL_LOCALS),
    peers=st.lists(st.sampled_from(list(S)), max_size=10),
)
@settings(max_examples=300, deadline=None)
def test_close_request_ends_closed_once_peer_closes(role, start, local, peers):
    local = replace(local, closing=True)
    mine = start
    removed = False
    for peer in [*peers, S.Closing, S.Closed]:
        mine, local, _, removed = settle(role, mine, peer, local)
        if removed:
            break
    assert mine is S.Closed
    assert not local.attached
    if role is Role.BACKEND:
        assert removed


# ---------------------------------------------------------------------------
# Two ends against each other.  The store holds both state nodes and the
# frontend's published ring "generation"; watch events coalesce to "the peer
# changed" (one pending flag per end, as the XSA-349 rule requires).


@dataclass
class World:
    skip_initialised: bool
    backend_ready: bool
    publish_early: bool = False
    state: dict = field(default_factory=lambda: {Role.FRONTEND: S.Initialising, Role.BACKEND: S.Initialising})
    local: dict = field(default_factory=dict)
    pending: dict = field(default_factory=lambda: {Role.FRONTEND: True, Role.BACKEND: True})
    published_gen: int | None = None  # frontend's ring keys in the store
    live_gen: int | None = None  # the frontend's actually granted ring
    mapped_gen: int | None = None  # what the backend mapped
    next_gen: int = 1
    removed: bool = False
    fatal_errors: int = 0

    def __post_init__(self):
        self.local = {
            Role.FRONTEND: Local(skip_initialised=self.skip_initialised, publish_early=self.publish_early),
            Role.BACKEND: Local(ready=self.backend_ready),
        }

    def run(self, role: Role) -> None:
        if role is Role.BACKEND and self.removed:
            self.pending[role] = False
            return
        self.pending[role] = False
        for _ in range(8):
            mine, peer = self.state[role], self.state[role.other]
            local = self.local[role]
            if role is Role.BACKEND:
                local = replace(local, ready=self.backend_ready)
            step = decide(role, mine, peer, local)
            if step.idle:
                return
            switch_to = step.switch_to
            if not self.work(role, step):
                # The work failed (peer input was stale): fatal -> Closing.
                self.fatal_errors += 1
                switch_to = S.Closing
            if role is Role.BACKEND and self.removed:
                return
            if switch_to is not None and switch_to != self.state[role]:
                assert is_allowed(role, self.state[role], switch_to), (role, self.state[role], switch_to)
                self.state[role] = switch_to
                self.pending[role.other] = True
        raise AssertionError("decision chain did not settle")

    def work(self, role: Role, step: Step) -> bool:
        local = self.local[role]
        work = step.work
        if role is Role.FRONTEND:
            if work is Work.PUBLISH:
                self.live_gen = self.published_gen = self.next_gen
                self.next_gen += 1
                local = replace(local, attached=True, connected=False)
            elif work is Work.CONNECT:
                assert self.state[Role.BACKEND] is S.Connected
                local = replace(local, connected=True)
            elif work is Work.DISCONNECT:
                self.live_gen = None  # grants revoked; stale keys stay in the store
                local = replace(local, attached=False, connected=False)
        else:
            if work is Work.CONNECT:
                if self.published_gen is None or self.published_gen != self.live_gen:
                    return False  # mapping a revoked grant fails
                self.mapped_gen = self.published_gen
                local = replace(local, attached=True, connected=True)
            elif work is Work.DISCONNECT:
                self.mapped_gen = None
                local = replace(local, attached=False, connected=False)
            elif work is Work.REMOVE:
                self.removed = True
        self.local[role] = local
        return True

    def restart(self, role: Role) -> None:
        """The end's process dies and comes back: its resources are gone,
        its state node is whatever it last wrote; its watch fires once."""
        self.local[role] = replace(self.local[role], attached=False, connected=False)
        if role is Role.FRONTEND:
            self.live_gen = None
        else:
            self.mapped_gen = None
        self.pending[role] = True

    def settle(self, rounds: int = 60) -> None:
        for _ in range(rounds):
            if not any(self.pending.values()):
                return
            for role in Role:
                if self.pending[role]:
                    self.run(role)
        raise AssertionError(f"no quiescence: {self.state} {self.local}")


OPS = st.sampled_from(["F", "B", "F", "B", "restart F", "restart B", "ready"])


def play(world: World, ops: list[str]) -> None:
    for op in ops:
        if op == "F":
            world.run(Role.FRONTEND)
        elif op == "B":
            world.run(Role.BACKEND)
        elif op == "restart F":
            world.restart(Role.FRONTEND)
        elif op == "restart B":
            world.restart(Role.BACKEND)
        elif op == "ready":
            world.backend_ready = True
            world.pending[Role.BACKEND] = True
        elif op == "close F":
            world.local[Role.FRONTEND] = replace(world.local[Role.FRONTEND], closing=True)
            world.pending[Role.FRONTEND] = True
        elif op == "unplug B":
            world.local[Role.BACKEND] = replace(world.local[Role.BACKEND], closing=True)
            world.pending[Role.BACKEND] = True


@given(
    skip=st.booleans(),
    early=st.booleans(),
    ready=st.booleans(),
    ops=st.lists(OPS, max_size=60),
)
@settings(max_examples=400, deadline=None)
def test_two_ends_always_connect_when_ready(skip, early, ready, ops):
    world = World(skip_initialised=skip, backend_ready=ready, publish_early=early)
    play(world, ops)
    world.backend_ready = True
    world.pending[Role.BACKEND] = True
    world.settle()
    assert world.state == {Role.FRONTEND: S.Connected, Role.BACKEND: S.Connected}
    assert world.local[Role.FRONTEND].attached and world.local[Role.FRONTEND].connected
    assert world.local[Role.BACKEND].attached
    # The backend is mapped to the ring the frontend actually has.
    assert world.mapped_gen is not None and world.mapped_gen == world.live_gen


def test_plain_handshake_sequence():
    world = World(skip_initialised=False, backend_ready=True)
    trace = []
    for role in [Role.BACKEND, Role.FRONTEND, Role.BACKEND, Role.FRONTEND]:
        world.run(role)
        trace.append((world.state[Role.FRONTEND], world.state[Role.BACKEND]))
    assert trace == [
        (S.Initialising, S.InitWait),
        (S.Initialised, S.InitWait),
        (S.Initialised, S.Connected),
        (S.Connected, S.Connected),
    ]


@given(
    skip=st.booleans(),
    early=st.booleans(),
    closer=st.sampled_from(["close F", "unplug B"]),
    before=st.lists(OPS, max_size=30),
    after=st.lists(OPS, max_size=30),
)
@settings(max_examples=300, deadline=None)
def test_two_ends_always_close(skip, early, closer, before, after):
    world = World(skip_initialised=skip, backend_ready=True, publish_early=early)
    play(world, before)
    play(world, [closer])
    play(world, after)
    world.backend_ready = True
    world.settle()
    front, back = world.local[Role.FRONTEND], world.local[Role.BACKEND]
    assert not front.attached and not back.attached
    assert world.mapped_gen is None
    assert world.state[Role.BACKEND] is S.Closed
    if closer == "close F":
        assert world.state[Role.FRONTEND] is S.Closed
    else:
        # The frontend still wants the device and waits at Initialising for
        # a backend that will not come back; the toolstack removes both.
        assert world.state[Role.FRONTEND] in (S.Closed, S.Initialising)


def test_early_publishing_frontend_sequence():
    """hvc_xen publishes at probe; the backend's probe then finds it Initialised."""
    world = World(skip_initialised=False, backend_ready=True, publish_early=True)
    trace = []
    for role in [Role.FRONTEND, Role.BACKEND, Role.FRONTEND]:
        world.run(role)
        trace.append((world.state[Role.FRONTEND], world.state[Role.BACKEND]))
    assert trace == [
        (S.Initialised, S.Initialising),
        (S.Initialised, S.Connected),
        (S.Connected, S.Connected),
    ]
