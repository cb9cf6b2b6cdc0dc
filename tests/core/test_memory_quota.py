"""Per-domain memory accounting and the ``memory`` quota (xenstore/core/memory.py).

The figures in the engine-level tests were measured on the real C xenstored
4.17 (``xenstore-control quota <domid>`` after each request, the guest
talking over its ring), so they pin the size rules to cxenstored's."""

from __future__ import annotations

import re

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xenstore.core import Engine, Limits, MemoryQuotaNotice, Perms, Store
from xenstore.core.memory import (
    MemoryLedger,
    children_len,
    creation_memory,
    node_memory,
    record_memory,
    recompute,
    transaction_tag,
    watch_memory,
)
from xenstore.core.store import Node
from xenstore.wire import Op, Packet


def call(engine, conn, op, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
    """The reply to ``conn`` as (op, payload); "|" stands for NUL."""
    out = engine.handle(conn, Packet(op, 1, tx, payload.replace(b"|", b"\0")))
    (reply,) = [p for c, p in out if c is conn and p.op != Op.WATCH_EVENT]
    return int(reply.op), reply.payload


def ok(engine, conn, op, payload: bytes, tx: int = 0) -> bytes:
    rop, body = call(engine, conn, op, payload, tx)
    assert rop == op, body
    return body


def err(engine, conn, op, payload: bytes, tx: int = 0) -> str:
    rop, body = call(engine, conn, op, payload, tx)
    assert rop == Op.ERROR, body
    return body.rstrip(b"\0").decode()


def memory(engine, domid: int) -> int:
    """What ``xenstore-control quota <domid>`` reports."""
    text = ok(engine, engine.connect(), Op.CONTROL, b"quota|%d|" % domid).decode()
    return int(re.search(r"memory\s*:\s*(-?\d+)", text).group(1))


def guest(engine, dom0, domid: int):
    ok(engine, dom0, Op.WRITE, b"/local/domain/%d|" % domid)
    ok(engine, dom0, Op.SET_PERMS, b"/local/domain/%d|n%d|" % (domid, domid))
    ok(engine, dom0, Op.INTRODUCE, b"%d|1|5|" % domid)
    return engine.connect(domid, privileged=False)


def assert_ledger_exact(engine) -> None:
    """The incremental ledger equals the figures recomputed from scratch."""
    full = recompute(engine.store.nodes, list(engine._conns.values()))
    assert engine.memory.by_domain == {d: v for d, v in full.items() if d and v}
    assert memory(engine, 0) == full.get(0, 0)


# -- size rules ---------------------------------------------------------------------


def test_record_and_node_memory():
    # /local/domain/5 owned by dom5, no value, no children: 24 + 8 + 15.
    assert record_memory(len("/local/domain/5"), 0, 1, 0) == 47
    node = Node(b"xyz", Perms.parse(["n5", "r0"]), {"/x/y/ab": None, "/x/y/c": None}, 0)
    assert node_memory("/x/y", node) == 24 + 2 * 8 + 3 + (3 + 2) + 4
    top = Node(b"", Perms.parse(["n0"]), {"/local": None, "/tool": None}, 0)
    assert children_len("/", top.children) == len("local\0tool\0")


def test_watch_and_transaction_rules():
    assert watch_memory("/local/domain", b"tok") == 16  # no NULs counted
    assert transaction_tag(7) == 2  # "7/" before the path
    assert transaction_tag(12345) == 6


def test_creation_memory_matches_the_store():
    store = Store()
    store.put("/d", b"", Perms.owned_by(5))
    before = store.memory.usage(5)
    missing = ["/d/a/bb/ccc", "/d/a/bb", "/d/a"]
    records, grown = creation_memory(missing, 4, 1)
    for path in reversed(missing[1:]):
        store.put(path, b"", Perms.owned_by(5))
    store.put(missing[0], b"vvvv", Perms.owned_by(5))
    assert store.memory.usage(5) - before == records + grown
    assert grown == len("a") + 1


def test_store_ledger_follows_owner_changes_and_removal():
    store = Store()
    store.put("/p", b"", Perms.owned_by(5))
    store.put("/p/q", b"12", Perms.owned_by(6))
    store.put("/p/q/r", b"", Perms.owned_by(6))
    assert store.memory.by_domain == {d: v for d, v in recompute(store.nodes, []).items() if d}
    store.put("/p/q", b"12", Perms.parse(["n5", "r6"]))  # the whole record moves to dom5
    assert store.memory.by_domain == {d: v for d, v in recompute(store.nodes, []).items() if d}
    store.delete("/p/q")
    assert store.memory.by_domain == {5: node_memory("/p", store.nodes["/p"])}
    store.delete("/p")
    assert store.memory.by_domain == {}


def test_restore_rebuilds_the_ledger(engine, dom0):
    g = guest(engine, dom0, 5)
    ok(engine, g, Op.WRITE, b"a/b|value")
    ok(engine, dom0, Op.WRITE, b"/local/domain/5/c|x")
    restored = Engine(store=Store.from_changes(engine.store.snapshot()))
    assert restored.memory.by_domain == engine.memory.by_domain == {5: memory(engine, 5)}


# -- the ledger ---------------------------------------------------------------------


def test_ledger_counts_and_forgets_zero():
    ledger = MemoryLedger()
    ledger.add(5, 10)
    ledger.add(5, -10)
    assert ledger.by_domain == {} and ledger.usage(5) == 0


def test_ledger_hard_check_is_reach_not_exceed():
    ledger = MemoryLedger()
    ledger.add(5, 90)
    assert not ledger.exceeds(5, 9, 100)
    assert ledger.exceeds(5, 10, 100)  # 90 + 10 >= 100
    assert ledger.exceeds(5, -1, 80)  # even shrinking, once over the limit
    assert not ledger.exceeds(5, 10**9, 0)  # 0 disables the quota
    assert ledger.refusals == 2


def test_ledger_notices():
    ledger = MemoryLedger()
    seen: list[MemoryQuotaNotice] = []
    ledger.quota = lambda domid: (100, 50)
    ledger.notify = seen.append
    ledger.add(5, 49)
    assert seen == []
    ledger.add(5, 1)
    ledger.add(5, 10)  # reported once
    assert seen == [MemoryQuotaNotice(5, "soft", True)]
    assert seen[0].message == "Domain 5 exceeds soft memory quota"
    assert ledger.exceeds(5, 40, 100) and ledger.exceeds(5, 40, 100)
    ledger.add(5, 10)  # a smaller charge that fits does not re-arm the hard report
    assert seen[1:] == [MemoryQuotaNotice(5, "hard", True)]
    ledger.add(5, -5)
    ledger.add(5, -60)
    assert seen[2:] == [MemoryQuotaNotice(5, "hard", False), MemoryQuotaNotice(5, "soft", False)]
    assert seen[-1].message == "Domain 5 below soft memory quota again"


# -- figures of cxenstored 4.17 -------------------------------------------------------------


def test_figures_match_cxenstored(engine, dom0):
    g = guest(engine, dom0, 5)
    assert memory(engine, 5) == 47
    steps = [
        (g, Op.WRITE, b"a|x", 99),  # 24 + 8 + 1 + 17, and "a\0" in the parent
        (g, Op.WRITE, b"a|xyz", 101),
        (g, Op.WRITE, b"b/c/d|", 260),
        (g, Op.MKDIR, b"e|", 311),
        (g, Op.SET_PERMS, b"a|n5|r0|", 319),
        (g, Op.RM, b"b|", 160),
        (g, Op.WATCH, b"/local/domain|tok|", 176),
        (g, Op.WATCH, b"a|tok2|", 197),  # relative: the resolved path counts
        (g, Op.UNWATCH, b"/local/domain|tok|", 181),
        (g, Op.READ, b"a|", 181),
    ]
    for conn, op, payload, expected in steps:
        ok(engine, conn, op, payload)
        assert memory(engine, 5) == expected, payload
    # A transaction: its copies and new records are charged to the guest,
    # with "<generation>/" in front of each key (2 digits here, as there).
    tx = int(ok(engine, g, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    assert len(str(engine.store.generation)) == 2
    for op, payload, expected in [
        (Op.READ, b"a|", 244),
        (Op.WRITE, b"a|12345", 246),
        (Op.WRITE, b"e|hello", 303),
        (Op.WRITE, b"f|new", 414),
        (Op.RM, b"e|", 355),
        (Op.TRANSACTION_END, b"T|", 186),
    ]:
        ok(engine, g, op, payload, tx)
        assert memory(engine, 5) == expected, payload
    tx = int(ok(engine, g, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    ok(engine, g, Op.WRITE, b"g|1", tx)
    assert memory(engine, 5) == 295
    ok(engine, g, Op.TRANSACTION_END, b"F|", tx)
    assert memory(engine, 5) == 186
    # dom0 writing the guest's nodes: the owner pays.
    for op, payload, expected in [
        (Op.WRITE, b"/local/domain/5/a|0123456789", 191),
        (Op.WRITE, b"/local/domain/5/h|v", 243),  # inherits owner 5
        (Op.SET_PERMS, b"/local/domain/5/h|n0|", 193),  # the record moves to dom0
        (Op.SET_PERMS, b"/local/domain/5/h|n5|", 243),
    ]:
        ok(engine, dom0, op, payload)
        assert memory(engine, 5) == expected, payload
    assert_ledger_exact(engine)


def test_dom0_figure_is_computed_on_request(engine, dom0):
    # A fresh store: /, /tool, /tool/xenstored: 38 + 47 + 47.
    assert memory(engine, 0) == 132
    tx = int(ok(engine, dom0, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    ok(engine, dom0, Op.WRITE, b"/x|abc", tx)
    ok(engine, dom0, Op.WATCH, b"/x|tok|")
    assert engine.memory.by_domain == {}  # dom0 is not tracked ...
    assert_ledger_exact(engine)  # ... but reported exactly
    ok(engine, dom0, Op.TRANSACTION_END, b"T|", tx)
    assert memory(engine, 0) == 132 + (24 + 8 + 3 + 2) + len("x") + 1 + len("/x") + len("tok")


# -- the hard quota ---------------------------------------------------------------------


def test_hard_quota_refusals_as_cxenstored(engine, dom0):
    """The errors and figures of cxenstored 4.17 with ``quota set memory 400``."""
    g = guest(engine, dom0, 7)
    ok(engine, dom0, Op.WRITE, b"/shared|")
    ok(engine, dom0, Op.SET_PERMS, b"/shared|n0|b7|")
    ok(engine, dom0, Op.CONTROL, b"quota|set|memory|400|")
    ok(engine, g, Op.WRITE, b"a|" + b"x" * 100)
    ok(engine, g, Op.WRITE, b"b|" + b"x" * 100)
    assert memory(engine, 7) == 349
    assert err(engine, g, Op.WRITE, b"c|" + b"x" * 100) == "EIO"  # a new node
    assert memory(engine, 7) == 349
    ok(engine, g, Op.WRITE, b"a|" + b"x" * 150)  # 399: just below
    ok(engine, g, Op.WRITE, b"a|" + b"x" * 50)
    ok(engine, g, Op.MKDIR, b"m|")
    assert memory(engine, 7) == 350
    assert err(engine, g, Op.WATCH, b"a|" + b"t" * 40 + b"|") == "ENOMEM"
    ok(engine, g, Op.WATCH, b"a|" + b"t" * 10 + b"|")
    assert memory(engine, 7) == 377
    # dom0 is refused too when the guest owns what would grow.
    assert err(engine, dom0, Op.WRITE, b"/local/domain/7/new|y") == "EIO"
    assert err(engine, g, Op.SET_PERMS, b"b|n7|r0|r1|r2|") == "EIO"  # cxenstored: a stale errno
    ok(engine, g, Op.SET_PERMS, b"b|n7|r0|")
    assert err(engine, g, Op.WRITE, b"/shared/q|1") == "EIO"  # the guest would own it
    assert memory(engine, 7) == 385
    # Copies taken while reading in a transaction are never refused; then
    # even a shrinking write is.
    tx = int(ok(engine, g, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    assert err(engine, g, Op.WRITE, b"b|1", tx) == "EIO"
    assert memory(engine, 7) == 545
    ok(engine, g, Op.TRANSACTION_END, b"F|", tx)
    assert memory(engine, 7) == 385
    # Lowered at run time below the usage: nothing may grow, removal works.
    ok(engine, dom0, Op.CONTROL, b"quota|set|memory|300|")
    assert err(engine, g, Op.WRITE, b"a|" + b"x" * 10) == "EIO"
    ok(engine, g, Op.RM, b"b|")
    ok(engine, g, Op.WRITE, b"a|" + b"x" * 10)
    assert memory(engine, 7) == 186
    assert_ledger_exact(engine)


# Each scenario: setup requests, then one checked request; who: 0 = dom0, 5 = the guest.
_SETUP = [(0, Op.WRITE, b"/local/domain/5/dir/leaf|v"), (0, Op.SET_PERMS, b"/local/domain/5/dir|n5|"),
          (0, Op.WRITE, b"/d0|"), (0, Op.WRITE, b"/d0/kid|kv")]
BOUNDARY = {
    "guest creates a path": [(5, Op.WRITE, b"x/y/z|abc")],
    "guest grows a value": [(5, Op.WRITE, b"dir|" + b"v" * 30)],
    "guest adds permissions": [(5, Op.SET_PERMS, b"dir|n5|r0|r1|")],
    "guest watches": [(5, Op.WATCH, b"dir|token|")],
    "dom0 creates below a guest node": [(0, Op.WRITE, b"/local/domain/5/dir/new/deeper|xy")],
    "dom0 gives a subtree root to the guest": [(0, Op.SET_PERMS, b"/d0|n5|r0|")],
    "guest creates in a transaction": [(5, Op.TRANSACTION_START, b"|"), (5, Op.WRITE, b"dir/t/u|12", 1)],
    "guest grows a value in a transaction": [(5, Op.TRANSACTION_START, b"|"), (5, Op.READ, b"dir|", 1), (5, Op.WRITE, b"dir|" + b"w" * 9, 1)],
    "guest writes unread in a transaction": [(5, Op.TRANSACTION_START, b"|"), (5, Op.WRITE, b"dir/leaf|" + b"w" * 9, 1)],
    "guest sets permissions in a transaction": [(5, Op.TRANSACTION_START, b"|"), (5, Op.SET_PERMS, b"dir/leaf|n5|r0|", 1)],
}


def _scenario(requests, hard: int):
    engine = Engine(Limits(memory=0))
    dom0 = engine.connect()
    conns = {0: dom0, 5: guest(engine, dom0, 5)}
    for who, op, payload in _SETUP:
        ok(engine, conns[who], op, payload)
    for who, op, payload, *tx in requests[:-1]:
        ok(engine, conns[who], op, payload, *tx)
    engine.limits.memory = hard
    before = engine.memory.usage(5)
    who, op, payload, *tx = requests[-1]
    return call(engine, conns[who], op, payload, *tx), before, engine.memory.usage(5)


@pytest.mark.parametrize("name", sorted(BOUNDARY))
def test_refusal_boundary_is_the_real_charge(name):
    """The engine's prediction of a charge equals what the ledger books: with
    the hard quota at exactly "usage after the request" the request is
    refused (the limit is reached), one byte more and it passes."""
    requests = BOUNDARY[name]
    (rop, _), before, after = _scenario(requests, 0)
    assert rop == requests[-1][1] and after > before
    (rop, body), _, _ = _scenario(requests, after)
    assert rop == Op.ERROR and body in (b"EIO\x00", b"ENOMEM\x00")
    (rop, _), _, got = _scenario(requests, after + 1)
    assert rop == requests[-1][1] and got == after


def test_dom0_is_exempt(engine, dom0):
    ok(engine, dom0, Op.CONTROL, b"quota|set|memory|1|")
    ok(engine, dom0, Op.WRITE, b"/big|" + b"x" * 3000)
    ok(engine, dom0, Op.WATCH, b"/big|tok|")
    tx = int(ok(engine, dom0, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    ok(engine, dom0, Op.WRITE, b"/big2|" + b"x" * 3000, tx)
    ok(engine, dom0, Op.TRANSACTION_END, b"T|", tx)
    assert engine.memory.refusals == 0


def test_zero_disables_and_per_domain_override(engine, dom0):
    g = guest(engine, dom0, 5)
    h = guest(engine, dom0, 6)
    ok(engine, dom0, Op.CONTROL, b"quota|set|memory|0|")
    ok(engine, g, Op.WRITE, b"a|" + b"x" * 2000)
    ok(engine, dom0, Op.SET_QUOTA, b"5|memory|100|")  # dom5 only
    assert err(engine, g, Op.WRITE, b"b|x") == "EIO"
    ok(engine, h, Op.WRITE, b"b|" + b"x" * 2000)
    ok(engine, dom0, Op.SET_QUOTA, b"5|memory|0|")
    ok(engine, g, Op.WRITE, b"b|x")


def test_transaction_charges_the_transaction_owner(engine, dom0):
    """In a transaction the guest pays for its records, whoever owns the
    nodes; the commit then charges the owners, unchecked."""
    g = guest(engine, dom0, 5)
    ok(engine, dom0, Op.WRITE, b"/shared|")
    ok(engine, dom0, Op.SET_PERMS, b"/shared|n0|b5|")
    before = memory(engine, 5)
    tx = int(ok(engine, g, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    ok(engine, g, Op.WRITE, b"/shared/x|" + b"v" * 100, tx)
    during = memory(engine, 5)
    assert during > before + 100
    ok(engine, dom0, Op.CONTROL, b"quota|set|memory|%d|" % (before + 10))
    ok(engine, g, Op.TRANSACTION_END, b"T|", tx)  # never refused
    assert memory(engine, 5) == before + 24 + 16 + 100 + len("/shared/x")
    assert_ledger_exact(engine)


# -- giving memory back ------------------------------------------------------------------


def test_release_paths(engine, dom0):
    g = guest(engine, dom0, 5)
    base = memory(engine, 5)
    ok(engine, g, Op.WRITE, b"a/b/c|value")
    ok(engine, g, Op.RM, b"a|")
    assert memory(engine, 5) == base  # rm
    ok(engine, g, Op.WATCH, b"x|t|")
    ok(engine, g, Op.UNWATCH, b"x|t|")
    assert memory(engine, 5) == base  # unwatch
    ok(engine, g, Op.WATCH, b"x|t|")
    ok(engine, g, Op.RESET_WATCHES, b"")
    assert memory(engine, 5) == base  # reset
    tx = int(ok(engine, g, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    ok(engine, g, Op.WRITE, b"t|1", tx)
    ok(engine, g, Op.WRITE, b"t|2")  # conflicts with the transaction
    assert err(engine, g, Op.TRANSACTION_END, b"T|", tx) == "EAGAIN"
    ok(engine, g, Op.RM, b"t|")
    assert memory(engine, 5) == base  # a failed commit
    ok(engine, g, Op.WATCH, b"x|t|")
    tx = int(ok(engine, g, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    ok(engine, g, Op.WRITE, b"q|1", tx)
    assert memory(engine, 5) > base
    engine.disconnect(g)
    assert memory(engine, 5) == base  # connection close
    g = engine.connect(5, privileged=False)
    ok(engine, g, Op.WRITE, b"y|" + b"z" * 500)
    ok(engine, g, Op.WATCH, b"y|t|")
    tx = int(ok(engine, g, Op.TRANSACTION_START, b"|").rstrip(b"\0"))
    ok(engine, g, Op.READ, b"y|", tx)
    ok(engine, dom0, Op.RELEASE, b"5|")
    assert 5 not in engine.memory.by_domain  # RELEASE: nodes, watches, transactions
    assert_ledger_exact(engine)


def test_domain_death_and_reintroduction_release(engine, dom0):
    g = guest(engine, dom0, 5)
    ok(engine, g, Op.WRITE, b"y|1")
    ok(engine, g, Op.WATCH, b"y|t|")
    ok(engine, g, Op.TRANSACTION_START, b"|")
    ok(engine, dom0, Op.INTRODUCE, b"5|1|5|")  # re-introduction resets its connections
    assert memory(engine, 5) == 47 + 24 + 8 + 1 + 17 + 2
    engine.domain_died(5)
    assert engine.memory.by_domain == {}


def test_soft_quota_notice_is_an_effect(engine, dom0):
    g = guest(engine, dom0, 5)
    ok(engine, dom0, Op.CONTROL, b"quota-soft|set|memory|200|")
    engine.take_effects()
    ok(engine, g, Op.WRITE, b"a|" + b"x" * 100)
    assert engine.take_effects() == []
    ok(engine, g, Op.WRITE, b"b|" + b"x" * 100)
    ok(engine, g, Op.WRITE, b"c|x")
    assert engine.take_effects() == [MemoryQuotaNotice(5, "soft", True)]
    ok(engine, g, Op.RM, b"b|")  # 249: still over
    ok(engine, g, Op.RM, b"a|")
    assert engine.take_effects() == [MemoryQuotaNotice(5, "soft", False)]
    ok(engine, dom0, Op.CONTROL, b"quota|set|memory|140|")
    err(engine, g, Op.WRITE, b"d|x")
    assert engine.take_effects() == [MemoryQuotaNotice(5, "hard", True)]


# -- a random unprivileged domain vs the ledger recomputed from scratch ---------------------

NAMES = st.sampled_from(["a", "b", "a/b", "a/b/c", "b/x", "/shared/s", "/shared/s/t", "/local/domain/6/o"])
VALUES = st.binary(max_size=120)


class LedgerMachine(RuleBasedStateMachine):
    """Random requests of guests 5 and 6 (and dom0) with a small hard quota:
    the ledger always equals the figures recomputed from the store, the
    watches and the open transactions, and a domain's checked charge never
    takes it to its hard quota."""

    @initialize(quota=st.sampled_from([0, 400, 900, 2000]))
    def setup(self, quota):
        self.engine = Engine(Limits(memory=quota, memory_soft=quota // 2))
        self.dom0 = self.engine.connect()
        ok(self.engine, self.dom0, Op.WRITE, b"/shared|")
        ok(self.engine, self.dom0, Op.SET_PERMS, b"/shared|n0|b5|b6|")
        self.guests = {5: guest(self.engine, self.dom0, 5), 6: guest(self.engine, self.dom0, 6)}
        ok(self.engine, self.dom0, Op.SET_PERMS, b"/local/domain/6|n6|b5|")
        self.txs: dict[int, list[int]] = {5: [], 6: []}

    def _conn(self, who):
        return self.dom0 if who == 0 else self.guests[who]

    def _tx(self, who, data):
        if who and self.txs[who] and data.draw(st.booleans()):
            return data.draw(st.sampled_from(self.txs[who]))
        return 0

    def _request(self, who, op, payload, tx=0):
        before = dict(self.engine.memory.by_domain)
        rop, body = call(self.engine, self._conn(who), op, payload, tx)
        if rop == Op.ERROR and body in (b"EIO\x00", b"ENOMEM\x00"):
            event("memory quota refusal")
            assert self.engine.memory.by_domain == before or tx  # refused: nothing charged
        return rop

    @rule(who=st.sampled_from([0, 5, 6]), name=NAMES, value=VALUES, data=st.data())
    def write(self, who, name, value, data):
        self._request(who, Op.WRITE, name.encode() + b"|" + value, self._tx(who, data))

    @rule(who=st.sampled_from([0, 5, 6]), name=NAMES, data=st.data())
    def mkdir(self, who, name, data):
        self._request(who, Op.MKDIR, name.encode() + b"|", self._tx(who, data))

    @rule(who=st.sampled_from([0, 5, 6]), name=NAMES, data=st.data())
    def rm(self, who, name, data):
        self._request(who, Op.RM, name.encode() + b"|", self._tx(who, data))

    @rule(who=st.sampled_from([0, 5, 6]), name=NAMES, owner=st.sampled_from([0, 5, 6]), extra=st.integers(0, 3), data=st.data())
    def set_perms(self, who, name, owner, extra, data):
        perms = b"|".join(b"r%d" % d for d in range(extra))
        payload = name.encode() + b"|n%d|" % owner + (perms + b"|" if perms else b"")
        self._request(who, Op.SET_PERMS, payload, self._tx(who, data))

    @rule(who=st.sampled_from([5, 6]), name=NAMES, token=st.sampled_from([b"t", b"token" * 8]))
    def watch(self, who, name, token):
        self._request(who, Op.WATCH, name.encode() + b"|" + token + b"|")

    @rule(who=st.sampled_from([5, 6]), data=st.data())
    def unwatch(self, who, data):
        conn = self.guests[who]
        if conn.watches:
            path, token = data.draw(st.sampled_from(sorted(conn.watches)))
            ok(self.engine, conn, Op.UNWATCH, path.encode() + b"|" + token + b"|")

    @rule(who=st.sampled_from([5, 6]))
    def transaction_start(self, who):
        rop, body = call(self.engine, self.guests[who], Op.TRANSACTION_START, b"|")
        if rop == Op.TRANSACTION_START:
            self.txs[who].append(int(body.rstrip(b"\0")))

    @precondition(lambda self: self.txs[5] or self.txs[6])
    @rule(data=st.data(), commit=st.booleans())
    def transaction_end(self, data, commit):
        who = data.draw(st.sampled_from([w for w in (5, 6) if self.txs[w]]))
        tx = self.txs[who].pop(data.draw(st.integers(0, len(self.txs[who]) - 1)))
        call(self.engine, self.guests[who], Op.TRANSACTION_END, b"T|" if commit else b"F|", tx)

    @rule(who=st.sampled_from([5, 6]))
    def reconnect(self, who):
        self.engine.disconnect(self.guests[who])
        self.guests[who] = self.engine.connect(who, privileged=False)
        self.txs[who] = []

    @rule(quota=st.sampled_from([0, 300, 600, 5000]))
    def change_quota(self, quota):
        ok(self.engine, self.dom0, Op.CONTROL, b"quota|set|memory|%d|" % quota)

    @invariant()
    def ledger_equals_recomputation(self):
        assert_ledger_exact(self.engine)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
