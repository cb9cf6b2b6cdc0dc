"""The XenBus front/back state machine (``io/xenbus.h``), as data.

Each end of a split device owns a ``state`` node holding a decimal
:class:`XenbusState` and watches the other end's.  This module is pure: it
knows which state writes are legal (:data:`TRANSITIONS`) and what one end
should do next given its own state, the other end's state and a few local
facts (:class:`Local`), as a first-match table of :class:`Rule` rows
(:data:`RULES`).  Both roles use the same two tables; the trio driver layer
only reads state nodes, calls :func:`decide`, performs the :class:`Work`
and writes the state the :class:`Step` names, then calls :func:`decide`
again until the answer is :data:`IDLE`.

Design of the rules (see the docs on :data:`RULES`):

* Normal connection (blkif.h state diagrams): backend probe publishes
  features and goes ``InitWait``; a frontend in ``Initialising`` that sees
  ``InitWait`` publishes its rings and goes ``Initialised`` (block, console)
  or straight to ``Connected`` (network, ``skip_initialised``); a backend
  seeing ``Initialised`` *or* ``Connected`` (watch events coalesce) maps the
  rings and goes ``Connected``; the frontend then reads device properties.
* Teardown goes through ``Closing`` -> ``Closed``; a side that lost its ring
  resources (it restarted) but finds itself ``Initialised``/``Connected`` in
  the store resets through ``Closing`` so that the other end notices, frees
  what it holds and can re-issue in-flight I/O (Linux's frontend reset after
  kexec, fact sheet 5.7).
* Reconnection: a frontend that still wants the device and finds both ends
  ``Closed`` (or a backend back in ``InitWait``) goes back to
  ``Initialising``; a ``Closed`` backend that sees the frontend
  ``Initialising`` republishes its features and goes ``InitWait``
  (Linux "prepare for reconnect").
* An absent peer ``state`` is ``Unknown``, never ``Closed``: a frontend
  waits; a backend treats it as the device being removed (Linux blkback).

Every step changes the local facts or the own state, so repeatedly applying
:func:`decide` reaches :data:`IDLE` in a few steps (tested).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "XenbusState",
    "Role",
    "Work",
    "Guard",
    "Local",
    "Step",
    "IDLE",
    "Rule",
    "TRANSITIONS",
    "RULES",
    "is_allowed",
    "decide",
    "parse_state",
    "format_state",
]


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` of ``io/xenbus.h`` (values are Xen's)."""

    Unknown = 0  # node absent or unparsable
    Initialising = 1  # written by the toolstack when it creates the device
    InitWait = 2  # early init done, waiting for the peer / hotplug scripts
    Initialised = 3  # ring details published, waiting for the peer
    Connected = 4
    Closing = 5  # closing because of an error, an unplug or the peer closing
    Closed = 6
    Reconfiguring = 7  # PV SCSI / USB only
    Reconfigured = 8  # PV SCSI / USB only


class Role(enum.Enum):
    FRONTEND = "frontend"
    BACKEND = "backend"

    @property
    def other(self) -> Role:
        return Role.BACKEND if self is Role.FRONTEND else Role.FRONTEND


def parse_state(value: bytes | str | None) -> XenbusState:
    """Read a ``state`` node the way Linux does (``%d``); absent -> Unknown.

    Peer input: garbage and out-of-range numbers are ``Unknown`` rather than
    an exception, so a hostile peer cannot crash the reader.
    """
    if value is None:
        return XenbusState.Unknown
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = value.strip()
    # %d accepts a leading sign and stops at the first non-digit.
    digits = ""
    for i, ch in enumerate(text):
        if ch.isdigit() or (i == 0 and ch in "+-"):
            digits += ch
        else:
            break
    try:
        number = int(digits)
    except ValueError:
        return XenbusState.Unknown
    try:
        return XenbusState(number)
    except ValueError:
        return XenbusState.Unknown


def format_state(state: XenbusState) -> str:
    """The value written to a ``state`` node: the decimal number."""
    return str(int(state))


S = XenbusState
_ANY = frozenset(S)
_LIVE = frozenset({S.Initialising, S.InitWait, S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured})
_UP = frozenset({S.Initialised, S.Connected, S.Reconfiguring, S.Reconfigured})  # has (had) a ring
_EARLY = frozenset({S.Initialising, S.InitWait})
_WAITING = frozenset({S.InitWait, S.Initialised})  # backend waiting for the frontend's ring
_TEARDOWN = frozenset({S.Closing, S.Closed})


#: Legal writes of an end's own ``state``: ``TRANSITIONS[role][from]`` is the
#: set of states that end may switch to.  One table for both roles; the rows
#: differ where the protocol does (only backends use ``InitWait``; a closed
#: frontend restarts at ``Initialising``, a closed backend at ``InitWait``).
#: ``Unknown`` means the directory is gone: nothing may be written.
TRANSITIONS: Mapping[Role, Mapping[XenbusState, frozenset[XenbusState]]] = {
    Role.FRONTEND: {
        S.Unknown: frozenset(),
        S.Initialising: frozenset({S.Initialised, S.Connected, S.Closing, S.Closed}),
        S.InitWait: frozenset({S.Initialised, S.Connected, S.Closing, S.Closed}),
        S.Initialised: frozenset({S.Connected, S.Closing, S.Closed}),
        S.Connected: frozenset({S.Closing, S.Closed, S.Reconfiguring}),
        S.Closing: frozenset({S.Closed}),
        S.Closed: frozenset({S.Initialising}),
        S.Reconfiguring: frozenset({S.Reconfigured, S.Connected, S.Closing, S.Closed}),
        S.Reconfigured: frozenset({S.Connected, S.Reconfiguring, S.Closing, S.Closed}),
    },
    Role.BACKEND: {
        S.Unknown: frozenset(),
        S.Initialising: frozenset({S.InitWait, S.Initialised, S.Closing, S.Closed}),
        S.InitWait: frozenset({S.Initialised, S.Connected, S.Closing, S.Closed}),
        S.Initialised: frozenset({S.Connected, S.Closing, S.Closed}),
        S.Connected: frozenset({S.Closing, S.Closed, S.Reconfiguring}),
        S.Closing: frozenset({S.Closed}),
        S.Closed: frozenset({S.InitWait, S.Closing}),
        S.Reconfiguring: frozenset({S.Reconfigured, S.Connected, S.Closing, S.Closed}),
        S.Reconfigured: frozenset({S.Connected, S.Reconfiguring, S.Closing, S.Closed}),
    },
}


def is_allowed(role: Role, current: XenbusState, new: XenbusState) -> bool:
    """May an end of ``role`` in ``current`` write ``new`` to its own state?"""
    return new in TRANSITIONS[role][current]


class Work(enum.Enum):
    """Device-specific work the driver performs before writing the new state.

    ``PUBLISH``: backend: write its features / transport limits; frontend:
    allocate and grant rings, allocate event channels, write their keys.
    ``CONNECT``: backend: read the frontend's keys, map rings, bind event
    channels, write device properties; frontend: read device properties and
    start using the device.  ``DISCONNECT``: stop using and release the
    rings (idempotent).  ``REMOVE``: the device is gone for good; the
    driver stops.
    """

    NOTHING = "nothing"
    PUBLISH = "publish"
    CONNECT = "connect"
    DISCONNECT = "disconnect"
    REMOVE = "remove"


@dataclass(frozen=True)
class Local:
    """What one end knows about itself besides its ``state`` node.

    attached: it holds live ring resources (frontend: rings granted and
        published; backend: rings mapped, channels bound).
    connected: CONNECT work is done for the current attachment.
    ready: device-specific readiness for the next forward step (backend:
        backing device open / hotplug done; frontend: able to allocate).
    closing: this end wants the device closed (unplug, shutdown, backend
        ``online = 0``); it will not reconnect.
    skip_initialised: frontend goes straight to ``Connected`` after
        publishing its rings (netfront) instead of ``Initialised``.
    publish_early: frontend publishes its rings as soon as it starts,
        before the backend reached ``InitWait`` (the shortcut blkif.h
        permits, used by the Linux console frontend); it can then only use
        default transport parameters.
    """

    attached: bool = False
    connected: bool = False
    ready: bool = True
    closing: bool = False
    skip_initialised: bool = False
    publish_early: bool = False


class Guard(enum.Enum):
    """Conditions on :class:`Local` a :class:`Rule` can require (all must hold)."""

    WANTED = "wanted"  # not closing
    CLOSING = "closing"
    ATTACHED = "attached"
    DETACHED = "detached"
    NOT_CONNECTED = "not-connected"
    READY = "ready"
    VIA_INITIALISED = "via-initialised"
    SKIP_INITIALISED = "skip-initialised"
    PUBLISH_EARLY = "publish-early"

    def holds(self, local: Local) -> bool:
        return _GUARD_TESTS[self](local)


_GUARD_TESTS = {
    Guard.WANTED: lambda l: not l.closing,
    Guard.CLOSING: lambda l: l.closing,
    Guard.ATTACHED: lambda l: l.attached,
    Guard.DETACHED: lambda l: not l.attached,
    Guard.NOT_CONNECTED: lambda l: not l.connected,
    Guard.READY: lambda l: l.ready,
    Guard.VIA_INITIALISED: lambda l: not l.skip_initialised,
    Guard.SKIP_INITIALISED: lambda l: l.skip_initialised,
    Guard.PUBLISH_EARLY: lambda l: l.publish_early,
}


@dataclass(frozen=True)
class Step:
    """Do ``work``, then (if not None) switch the own state to ``switch_to``."""

    work: Work = Work.NOTHING
    switch_to: XenbusState | None = None

    @property
    def idle(self) -> bool:
        return self.work is Work.NOTHING and self.switch_to is None


IDLE = Step()


@dataclass(frozen=True)
class Rule:
    """One row: when ``role`` is in one of ``mine``, the peer in one of
    ``peer`` and every guard holds, take ``step``.  ``why`` is for humans."""

    role: Role
    mine: frozenset[XenbusState]
    peer: frozenset[XenbusState]
    guards: frozenset[Guard]
    step: Step
    why: str

    def matches(self, role: Role, mine: XenbusState, peer: XenbusState, local: Local) -> bool:
        return (
            role is self.role
            and mine in self.mine
            and peer in self.peer
            and all(g.holds(local) for g in self.guards)
        )


def _r(role: Role, mine, peer, guards, work: Work, switch_to: XenbusState | None, why: str) -> Rule:
    return Rule(role, frozenset(mine), frozenset(peer), frozenset(guards), Step(work, switch_to), why)


F, B = Role.FRONTEND, Role.BACKEND
G = Guard
W = Work

#: The decision table; the first matching row wins, no match means IDLE.
RULES: tuple[Rule, ...] = (
    # ---- frontend -------------------------------------------------------
    _r(F, {S.Closed, S.Initialising, S.InitWait}, _ANY, {G.ATTACHED}, W.DISCONNECT, None,
       "no ring may outlive a reset to these states"),
    _r(F, _LIVE, _ANY, {G.CLOSING}, W.NOTHING, S.Closing,
       "local unplug/shutdown: announce Closing, keep the ring until the backend stops"),
    _r(F, {S.Closing}, _TEARDOWN, set(), W.DISCONNECT, S.Closed,
       "backend stopped using the ring: free it"),
    _r(F, {S.Closed}, {S.Initialising, S.InitWait, S.Initialised, S.Closed}, {G.WANTED}, W.NOTHING,
       S.Initialising, "still want the device: start over (5.7 reset step 4 / backend back)"),
    _r(F, _UP, _ANY, {G.DETACHED}, W.NOTHING, S.Closing,
       "restarted without our ring: reset through Closing so the backend lets go"),
    _r(F, _UP, _TEARDOWN, set(), W.DISCONNECT, S.Closed,
       "backend closing (or missed its Closing): free the ring"),
    _r(F, _EARLY, {S.Closing}, set(), W.NOTHING, S.Closed,
       "backend closing before we connected: let it finish"),
    _r(F, _EARLY, {S.Connected}, set(), W.NOTHING, S.Closing,
       "backend attached to a ring we no longer have (5.7 reset step 2)"),
    _r(F, _EARLY, _WAITING, {G.READY, G.VIA_INITIALISED}, W.PUBLISH, S.Initialised,
       "backend waits for our ring (blkfront, console)"),
    _r(F, _EARLY, _WAITING, {G.READY, G.SKIP_INITIALISED}, W.PUBLISH, S.Connected,
       "backend waits for our ring (netfront goes straight to Connected)"),
    _r(F, _EARLY, {S.Initialising}, {G.READY, G.PUBLISH_EARLY, G.VIA_INITIALISED}, W.PUBLISH, S.Initialised,
       "publish before the backend's InitWait, with default parameters (hvc_xen)"),
    _r(F, {S.Initialised}, {S.Connected}, {G.READY}, W.CONNECT, S.Connected,
       "backend connected: read device properties"),
    _r(F, {S.Connected}, {S.Connected}, {G.READY, G.NOT_CONNECTED}, W.CONNECT, None,
       "backend connected after we did (netfront)"),
    # ---- backend --------------------------------------------------------
    _r(B, _LIVE, _ANY, {G.CLOSING}, W.NOTHING, S.Closing,
       "toolstack unplug (online = 0): announce Closing"),
    _r(B, {S.Closed}, _ANY, {G.ATTACHED}, W.DISCONNECT, None,
       "no mapping may outlive Closed"),
    _r(B, {S.Closed}, {S.Unknown}, set(), W.REMOVE, None,
       "frontend directory gone: remove the device"),
    _r(B, {S.Closed}, {S.Closed}, {G.CLOSING}, W.REMOVE, None,
       "closed on both sides and offline: remove the device"),
    _r(B, _LIVE | {S.Closing}, {S.Unknown}, set(), W.DISCONNECT, S.Closed,
       "frontend directory gone: stop, then remove"),
    _r(B, {S.Initialising}, _ANY, {G.WANTED}, W.PUBLISH, S.InitWait,
       "probe: publish features and transport limits"),
    _r(B, {S.Connected, S.Reconfiguring, S.Reconfigured}, _ANY, {G.DETACHED}, W.NOTHING, S.Closing,
       "restarted without our mapping: reset through Closing so the frontend recovers"),
    _r(B, _LIVE, {S.Closing}, set(), W.NOTHING, S.Closing,
       "frontend closing: follow it"),
    _r(B, _LIVE | {S.Closing}, {S.Closed}, set(), W.DISCONNECT, S.Closed,
       "frontend closed: unmap and close"),
    _r(B, {S.Closed}, _EARLY, {G.WANTED}, W.PUBLISH, S.InitWait,
       "frontend starting over: prepare for reconnect (republish features)"),
    _r(B, _LIVE, _EARLY, {G.ATTACHED}, W.DISCONNECT, S.Closed,
       "frontend reset under our mapping: drop it, then wait for it again"),
    _r(B, _WAITING, {S.Initialised, S.Connected}, {G.ATTACHED}, W.NOTHING, S.Connected,
       "already mapped: just say so"),
    _r(B, _WAITING, {S.Initialised, S.Connected}, {G.READY}, W.CONNECT, S.Connected,
       "frontend published its ring (Initialised and Connected are treated alike)"),
)


def decide(role: Role, mine: XenbusState, peer: XenbusState, local: Local = Local()) -> Step:
    """The next step for an end of ``role`` in state ``mine`` seeing ``peer``.

    Pure; never raises for any combination.  The returned ``switch_to`` is
    always allowed by :data:`TRANSITIONS` (tested exhaustively).
    """
    for rule in RULES:
        if rule.matches(role, mine, peer, local):
            return rule.step
    return IDLE
