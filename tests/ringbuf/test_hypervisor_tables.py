"""Pure service tables: control-protocol codec, domain table, port table."""

from __future__ import annotations

import itertools

import msgpack
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ringbuf.hypervisor import protocol
from ringbuf.hypervisor.domains import DOMID_FIRST_RESERVED, DomainTable
from ringbuf.hypervisor.ports import PortError, PortState, PortTable
from ringbuf.hypervisor.protocol import Notice, ProtocolError, Reply, Request

# -- protocol ------------------------------------------------------------------------


def test_golden_request_bytes():
    data = protocol.encode(Request(7, "close_port", {"port": 3}))
    assert data == bytes.fromhex("84a174a3726571a26964 07a26f70aa636c6f73655f706f7274a16181a4706f727403".replace(" ", ""))
    assert protocol.decode(data) == Request(7, "close_port", {"port": 3})


@pytest.mark.parametrize("msg, nfds", [
    (Reply(1, {"port": 5}, nfds=2), 2),
    (Reply(2, error="EPERM", message="no"), 0),
    (Reply(3, error="EGRANT", message="x", grant_status=-1), 0),
    (Notice("peer_closed", {"port": 4}), 0),
])
def test_roundtrip(msg, nfds):
    assert protocol.decode(protocol.encode(msg), nfds) == msg


def test_fd_count_must_match_announcement():
    data = protocol.encode(Reply(1, None, nfds=1))
    with pytest.raises(ProtocolError):
        protocol.decode(data, 0)
    with pytest.raises(ProtocolError):
        protocol.decode(protocol.encode(Request(1, "hello", {})), 1)


@pytest.mark.parametrize("op, args, ok", [
    ("hello", {}, True),
    ("nonsense", {}, False),
    ("map_grants", {"domid": 1, "refs": [8, 9], "readonly": True}, True),
    ("map_grants", {"domid": 1, "refs": [], "readonly": True}, False),
    ("map_grants", {"domid": 1, "refs": [-1], "readonly": True}, False),
    ("map_grants", {"domid": 1, "refs": [8], "readonly": 1}, False),
    ("map_grants", {"domid": 1, "refs": [8]}, False),
    ("close_port", {"port": True}, False),
    ("close_port", {"port": 2, "extra": 1}, False),
    ("grant_copy", {"segments": [[[1, 0, 8, None], [0, 0, None, 3], 10]]}, True),
    ("grant_copy", {"segments": [[[1, 0, 8, 3], [0, 0, None, 3], 10]]}, False),  # both ref and gfn
])
def test_argument_validation(op, args, ok):
    assert (protocol.validate_args(op, args) is None) == ok


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8)
_message_like = st.fixed_dictionaries(
    {"t": st.sampled_from(["req", "rep", "ntc", "x"])},
    optional={"id": _values, "op": st.sampled_from(sorted(protocol.OPS)) | _values, "a": _values,
              "r": _values, "nfds": _values, "err": _values, "msg": _values, "gnt": _values,
              "kind": _values})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.builds(msgpack.packb, _values),
                 st.builds(msgpack.packb, _message_like)),
       st.integers(0, 2))
def test_decode_never_crashes_on_garbage(data, nfds):
    try:
        msg = protocol.decode(data, nfds)
    except ProtocolError:
        return
    if isinstance(msg, Request):
        protocol.validate_args(msg.op, msg.args)  # must not raise either


# -- domains ----------------------------------------------------------------------


def test_domids_come_from_a_rover_and_skip_reserved():
    table = DomainTable()
    table.create_dom0(16, 1)
    ids = [table.create(1, 1).domid for _ in range(3)]
    assert ids == [1, 2, 3]
    table.remove(2)
    assert table.create(1, 1).domid == 4  # not reused at once, like Xen
    table._rover = DOMID_FIRST_RESERVED - 2
    assert table.create(1, 1).domid == DOMID_FIRST_RESERVED - 1
    assert table.create(1, 1).domid == 2  # wrapped, skipping dom0 and live ids


def test_domain_info_reports_shutdown_and_dying():
    table = DomainTable()
    dom = table.create(8, 2)
    dom.shutdown_reason = 3
    info = table.get(dom.domid).info()
    assert info.shutdown and info.shutdown_reason == 3 and not info.dying


# -- ports --------------------------------------------------------------------------


def _table():
    counter = itertools.count(100)
    return PortTable(lambda: next(counter))


def test_bind_uses_reserved_eventfd_and_close_makes_peer_unbound():
    table = _table()
    a = table.alloc_unbound(1, 0, owner="guest")
    assert a.port == 1 and a.state == PortState.UNBOUND
    b, effects = table.bind_interdomain(0, 1, a.port, owner="dom0")
    assert (b.own_efd, b.peer_efd) == (a.peer_efd, a.own_efd)
    assert [(n.owner, n.kind) for n in effects.notices] == [("guest", "peer_bound")]
    effects = table.close(0, b.port)
    assert [(n.owner, n.port, n.kind) for n in effects.notices] == [("guest", a.port, "peer_closed")]
    assert effects.close_fds == []  # the survivor still names both eventfds
    assert a.state == PortState.UNBOUND and a.remote_dom == 0
    # the same domain may bind again and lands on the same eventfd pair
    b2, _ = table.bind_interdomain(0, 1, a.port, owner="dom0")
    assert (b2.own_efd, b2.peer_efd) == (b.own_efd, b.peer_efd)
    effects = table.close_domain(1)
    assert [(n.owner, n.kind) for n in effects.notices] == [("dom0", "peer_closed")]
    effects = table.close_owned("dom0")
    assert sorted(effects.close_fds) == sorted([a.own_efd, a.peer_efd])
    assert table.live_eventfds() == set()


def test_bind_refuses_wrong_domain_and_bound_ports():
    table = _table()
    a = table.alloc_unbound(1, 0, owner=None)
    with pytest.raises(PortError):
        table.bind_interdomain(2, 1, a.port, owner=None)  # allocated for dom0, not dom2
    table.bind_interdomain(0, 1, a.port, owner=None)
    with pytest.raises(PortError):
        table.bind_interdomain(0, 1, a.port, owner=None)  # no longer unbound
    with pytest.raises(PortError):
        table.close(1, 99)


def test_virq_has_one_binder():
    table = _table()
    port = table.bind_virq(0, 3, owner="xenstored")
    assert port.peer_efd is None
    with pytest.raises(PortError):
        table.bind_virq(0, 3, owner="other")
    table.close_owned("xenstored")
    assert table.bind_virq(0, 3, owner="other").virq == 3


class PortTableMachine(RuleBasedStateMachine):
    """Random alloc/bind/close/die: eventfd refcounts never leak or dangle."""

    def __init__(self):
        super().__init__()
        self.table = _table()
        self.closed: set[int] = set()

    @rule(dom=st.integers(0, 2), remote=st.integers(0, 2))
    def alloc(self, dom, remote):
        self.table.alloc_unbound(dom, remote, owner=dom)

    @rule(dom=st.integers(0, 2), remote=st.integers(0, 2), port=st.integers(1, 6))
    def bind(self, dom, remote, port):
        try:
            self.table.bind_interdomain(dom, remote, port, owner=dom)
        except PortError:
            target = self.table.get(remote, port)
            assert target is None or target.state != PortState.UNBOUND or target.remote_dom != dom

    @rule(dom=st.integers(0, 2), port=st.integers(1, 6))
    def close(self, dom, port):
        try:
            self.closed.update(self.table.close(dom, port).close_fds)
        except PortError:
            assert self.table.get(dom, port) is None

    @rule(dom=st.integers(1, 2))
    def die(self, dom):
        self.closed.update(self.table.close_domain(dom).close_fds)

    @invariant()
    def eventfds_consistent(self):
        named = set()
        for dom in range(3):
            for port in self.table.ports_of(dom):
                named.add(port.own_efd)
                if port.peer_efd is not None:
                    named.add(port.peer_efd)
                if port.state == PortState.INTERDOMAIN:
                    peer = self.table.get(port.remote_dom, port.remote_port)
                    assert peer is not None and peer.state == PortState.INTERDOMAIN
                    assert (peer.remote_dom, peer.remote_port) == (port.domid, port.port)
                    assert (peer.own_efd, peer.peer_efd) == (port.peer_efd, port.own_efd)
        assert named == self.table.live_eventfds()
        assert not named & self.closed


PortTableMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestPortTable = PortTableMachine.TestCase
