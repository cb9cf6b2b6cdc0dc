"""Engine API beyond single replies: change records, effects, watch events,
domain teardown, statistics, limits, exports and the watch index's cost."""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import xenstore.core as core
from xenstore.core import Engine, Introduced, Limits, Released, Store
from xenstore.wire import Op, Packet


def req(engine, conn, op, payload: bytes, tx: int = 0):
    """Deliveries as (conn, op, payload) with "|" for NUL in the request."""
    out = engine.handle(conn, Packet(op, 1, tx, payload.replace(b"|", b"\0")))
    return [(c, int(p.op), p.payload) for c, p in out]


def events(out, conn=None):
    """Event payloads from req() triples or raw (conn, Packet) deliveries."""
    triples = [(d[0], int(d[1].op), d[1].payload) if len(d) == 2 else d for d in out]
    return [p for c, op, p in triples if op == Op.WATCH_EVENT and (conn is None or c is conn)]


def make_guest(engine, dom0, domid):
    req(engine, dom0, Op.INTRODUCE, b"%d|1|5|" % domid)
    req(engine, dom0, Op.WRITE, b"/local/domain/%d|" % domid)
    req(engine, dom0, Op.SET_PERMS, b"/local/domain/%d|n%d|" % (domid, domid))
    return engine.connect(domid, privileged=False)


# -- change records -------------------------------------------------------------


def test_change_records_exact_format(engine, dom0):
    assert engine.take_changes() == [("set", "/tool", b"", ["n0"]), ("set", "/tool/xenstored", b"", ["n0"])]
    req(engine, dom0, Op.WRITE, b"/a/b|v\x00x")
    req(engine, dom0, Op.SET_PERMS, b"/a/b|n0|r5|")
    req(engine, dom0, Op.RM, b"/a|")
    req(engine, dom0, Op.READ, b"/tool|")  # reads change nothing
    assert engine.take_changes() == [
        ("set", "/a", b"", ["n0"]),
        ("set", "/a/b", b"v\x00x", ["n0"]),
        ("set", "/a/b", b"v\x00x", ["n0", "r5"]),
        ("rm", "/a"),
    ]
    assert engine.take_changes() == []


def test_change_records_are_msgpack_plain_data(engine, dom0):
    req(engine, dom0, Op.WRITE, b"/a|\xff\x00")
    changes = engine.take_changes()
    assert msgpack.unpackb(msgpack.packb(changes), use_list=True) == [list(c) for c in changes]


def test_transaction_changes_appear_only_at_commit(engine, dom0):
    engine.take_changes()
    req(engine, dom0, Op.TRANSACTION_START, b"|")
    req(engine, dom0, Op.WRITE, b"/t/x|1", tx=1)
    req(engine, dom0, Op.RM, b"/t/x|", tx=1)
    assert engine.take_changes() == []
    req(engine, dom0, Op.TRANSACTION_END, b"T|", tx=1)
    assert engine.take_changes() == [("set", "/t", b"", ["n0"]), ("set", "/t/x", b"1", ["n0"]), ("rm", "/t/x")]
    req(engine, dom0, Op.TRANSACTION_START, b"|")
    req(engine, dom0, Op.WRITE, b"/u|1", tx=2)
    req(engine, dom0, Op.TRANSACTION_END, b"F|", tx=2)
    assert engine.take_changes() == []


def test_snapshot_restore_round_trip_keeps_order_and_perms(engine, dom0):
    for path in (b"/z", b"/a", b"/m/x", b"/m/b"):
        req(engine, dom0, Op.WRITE, path + b"|" + path)
    req(engine, dom0, Op.SET_PERMS, b"/m/b|n5|r0|")
    snap = engine.store.snapshot()
    assert snap[0] == ("set", "/", b"", ["n0"])
    restored = Engine(store=Store.from_changes(snap))
    conn = restored.connect()
    assert req(restored, conn, Op.DIRECTORY, b"/|")[-1][2] == b"tool\0z\0a\0m\0"
    assert req(restored, conn, Op.DIRECTORY, b"/m|")[-1][2] == b"x\0b\0"
    assert req(restored, conn, Op.GET_PERMS, b"/m/b|")[-1][2] == b"n5\0r0\0"
    assert restored.store.snapshot() == snap
    assert restored.store.owner_counts == engine.store.owner_counts


def test_journal_alone_rebuilds_from_a_bare_root(engine, dom0):
    req(engine, dom0, Op.WRITE, b"/a/b|1")
    req(engine, dom0, Op.RM, b"/tool|")
    assert Store.from_changes(engine.take_changes()).snapshot() == engine.store.snapshot()


def test_a_child_costs_its_parent_no_string_of_its_own(engine, dom0):
    """A parent's child list holds the very path strings that key the store
    (memory: no name per child), whichever way the child came."""

    def shares_keys(store):
        keys = {path: path for path in store.nodes}  # equal -> the store's own object
        return all(child is keys[child] for node in store.nodes.values() for child in node.children)

    req(engine, dom0, Op.WRITE, b"/a/b/c|1")
    tx = int(req(engine, dom0, Op.TRANSACTION_START, b"|")[-1][2][:-1])
    req(engine, dom0, Op.WRITE, b"/a/t|2", tx)
    req(engine, dom0, Op.TRANSACTION_END, b"T|", tx)
    assert list(engine.store.nodes["/a"].children) == ["/a/b", "/a/t"]
    assert shares_keys(engine.store)
    assert shares_keys(Store.from_changes(engine.store.snapshot()))
    req(engine, dom0, Op.RM, b"/a/b|")
    assert list(engine.store.nodes["/a"].children) == ["/a/t"]
    assert req(engine, dom0, Op.DIRECTORY, b"/a|")[-1][2] == b"t\0"


def test_apply_rejects_orphans_and_ignores_rm_of_missing():
    store = Store()
    with pytest.raises(ValueError):
        store.apply(("set", "/no/parent", b"", ["n0"]))
    store.apply(("rm", "/missing"))
    with pytest.raises(ValueError):
        store.apply(("bogus",))
    with pytest.raises(ValueError):
        store.apply(b"/missing\0value")  # a new value for a node that is not there
    store.apply(b"/tool\0value")
    assert store.nodes["/tool"].value == b"value" and store.nodes["/tool"].perms.strings == ("n0",)


# -- watch events -----------------------------------------------------------------


def test_events_precede_the_reply_and_initial_event_follows_ok(engine, dom0):
    out = req(engine, dom0, Op.WATCH, b"/w|tok|")
    assert [(op, p) for _, op, p in out] == [(Op.WATCH, b"OK\0"), (Op.WATCH_EVENT, b"/w\0tok\0")]
    out = req(engine, dom0, Op.WRITE, b"/w/x|1")
    assert [(op, p) for _, op, p in out] == [(Op.WATCH_EVENT, b"/w/x\0tok\0"), (Op.WRITE, b"OK\0")]
    # watch events carry req_id 0 and tx_id 0
    raw = engine.handle(dom0, Packet(Op.WRITE, 55, 0, b"/w\0"))
    assert (raw[0][1].req_id, raw[0][1].tx_id) == (0, 0)


def test_write_fires_even_if_unchanged_mkdir_only_if_new(engine, dom0):
    req(engine, dom0, Op.WRITE, b"/w|1")
    req(engine, dom0, Op.WATCH, b"/w|t|")
    assert events(req(engine, dom0, Op.WRITE, b"/w|1")) == [b"/w\0t\0"]
    assert events(req(engine, dom0, Op.MKDIR, b"/w|")) == []
    assert events(req(engine, dom0, Op.MKDIR, b"/w/new|")) == [b"/w/new\0t\0"]


def test_rm_events_follow_cxenstored(engine, dom0):
    for p in (b"/a/b/c/d", b"/a/b/x2"):
        req(engine, dom0, Op.WRITE, p + b"|")
    for w in (b"/", b"/a", b"/a/b", b"/a/b/c/d", b"/a/b/x"):
        req(engine, dom0, Op.WATCH, w + b"|" + w + b"|")
    out = req(engine, dom0, Op.RM, b"/a/b|")
    assert sorted(events(out)) == sorted(
        [b"/a/b\0/\0", b"/a/b\0/a\0", b"/a/b\0/a/b\0", b"/a/b/c/d\0/a/b/c/d\0"]  # not /a/b/x
    )


def test_relative_watch_gets_relative_paths(engine, dom0):
    guest = make_guest(engine, dom0, 5)
    out = req(engine, guest, Op.WATCH, b"dev|t|")
    assert events(out) == [b"dev\0t\0"]
    out = req(engine, guest, Op.WRITE, b"dev/x|1")
    assert events(out, guest) == [b"dev/x\0t\0"]
    out = req(engine, dom0, Op.WRITE, b"/local/domain/5/dev|")
    assert events(out, guest) == [b"dev\0t\0"]


def test_tokens_are_echoed_bytewise_and_distinct(engine, dom0):
    req(engine, dom0, Op.WATCH, b"/w|\xfftok 1|")
    req(engine, dom0, Op.WATCH, b"/w|tok2|")
    assert sorted(events(req(engine, dom0, Op.WRITE, b"/w|"))) == [b"/w\0tok2\0", b"/w\0\xfftok 1\0"]


def test_unprivileged_watcher_needs_read_on_node_or_parent(engine, dom0):
    guest = make_guest(engine, dom0, 5)
    req(engine, guest, Op.WATCH, b"/secret|t|")
    req(engine, dom0, Op.WRITE, b"/secret/x|1")  # / and /secret are n0
    assert events(req(engine, dom0, Op.WRITE, b"/secret/x|2"), guest) == []
    req(engine, dom0, Op.SET_PERMS, b"/secret|n0|r5|")
    assert events(req(engine, dom0, Op.WRITE, b"/secret/x|3"), guest) == [b"/secret/x\0t\0"]  # parent readable
    # SET_PERMS taking read access away still notifies (old perms count)
    req(engine, dom0, Op.SET_PERMS, b"/secret/x|n0|r5|")
    out = req(engine, dom0, Op.SET_PERMS, b"/secret|n0|")
    assert events(out, guest) == [b"/secret\0t\0"]
    out = req(engine, dom0, Op.SET_PERMS, b"/secret/x|n0|")
    assert events(out, guest) == [b"/secret/x\0t\0"]
    assert events(req(engine, dom0, Op.WRITE, b"/secret/x|4"), guest) == []


def test_transaction_events_fire_at_commit_only(engine, dom0):
    req(engine, dom0, Op.WATCH, b"/t|w|")
    req(engine, dom0, Op.TRANSACTION_START, b"|")
    assert events(req(engine, dom0, Op.WRITE, b"/t/a|1", tx=1)) == []
    assert events(req(engine, dom0, Op.WRITE, b"/t/a|2", tx=1)) == []
    out = req(engine, dom0, Op.TRANSACTION_END, b"T|", tx=1)
    assert events(out) == [b"/t/a\0w\0"]  # once per node
    assert out[-1][1:] == (Op.TRANSACTION_END, b"OK\0")
    req(engine, dom0, Op.TRANSACTION_START, b"|")
    req(engine, dom0, Op.WRITE, b"/t/b|1", tx=2)
    assert events(req(engine, dom0, Op.TRANSACTION_END, b"F|", tx=2)) == []


def test_special_watches(engine, dom0):
    guest = make_guest(engine, dom0, 5)
    for conn in (dom0, guest):
        req(engine, conn, Op.WATCH, b"@introduceDomain|i|")
        req(engine, conn, Op.WATCH, b"@releaseDomain|r|")
    req(engine, dom0, Op.WATCH, b"@releaseDomain/7|r7|")  # never fires (no depth feature)
    out = req(engine, dom0, Op.INTRODUCE, b"7|1|5|")
    assert events(out, dom0) == [b"@introduceDomain\0i\0"]
    assert events(out, guest) == []  # default permission set n0
    assert events(req(engine, dom0, Op.INTRODUCE, b"7|1|6|")) == []  # not new
    req(engine, dom0, Op.SET_PERMS, b"@releaseDomain|n0|r5|")
    out = req(engine, dom0, Op.RELEASE, b"7|")
    assert [op for _, op, _ in out] == [Op.RELEASE, Op.WATCH_EVENT, Op.WATCH_EVENT]  # after the OK
    assert sorted(events(out)) == [b"@releaseDomain\0r\0", b"@releaseDomain\0r\0"]


def test_events_over_the_payload_limit_are_dropped(engine, dom0):
    token = b"t" * 3000
    req(engine, dom0, Op.WATCH, b"/|" + token + b"|")
    path = b"/" + b"p" * 1200
    assert events(req(engine, dom0, Op.WRITE, path + b"|")) == []


# -- domains and effects ------------------------------------------------------------


def test_effects_and_domain_teardown(engine, dom0):
    engine.take_effects()
    guest = make_guest(engine, dom0, 5)
    assert engine.take_effects() == [Introduced(5, 1, 5)]
    req(engine, guest, Op.WRITE, b"/local/domain/5/dev/x|1")
    req(engine, dom0, Op.WRITE, b"/keep|")
    req(engine, dom0, Op.SET_PERMS, b"/keep|n0|b5|")
    req(engine, guest, Op.WRITE, b"/keep/mine|1")  # owned by 5: goes too
    req(engine, guest, Op.WATCH, b"/|g|")
    req(engine, guest, Op.TRANSACTION_START, b"|")
    req(engine, dom0, Op.WATCH, b"/keep|k|")
    req(engine, dom0, Op.WATCH, b"@releaseDomain|r|")
    out = engine.domain_died(5)
    assert sorted(events(out)) == [b"/keep/mine\0k\0", b"@releaseDomain\0r\0"]
    assert engine.take_effects() == [Released(5)]
    assert req(engine, dom0, Op.READ, b"/local/domain/5|")[-1][2] == b"ENOENT\0"
    assert req(engine, dom0, Op.DIRECTORY, b"/keep|")[-1][2] == b""
    assert guest.watches == {} and guest.transactions == {}
    assert engine.domain_died(5) == []  # idempotent
    assert req(engine, dom0, Op.IS_DOMAIN_INTRODUCED, b"5|")[-1][2] == b"F\0"
    assert engine.store.owner_counts.get(5, 0) == 0


def test_a_new_domain_with_a_dead_ones_domid_inherits_no_rights(engine, dom0):
    """cxenstored's stale-domid rule (checked against the C daemon): an ACL
    entry counts only if its domain was known when the node was last
    written.  GET_PERMS still lists the entry; a rewrite of the node makes
    it count again."""
    def read(conn, path):
        return req(engine, conn, Op.READ, path + b"|")[-1][2]

    req(engine, dom0, Op.WRITE, b"/keep|x")
    req(engine, dom0, Op.SET_PERMS, b"/keep|n0|b5|")
    req(engine, dom0, Op.WRITE, b"/keep/sub|y")  # inherits n0 b5
    req(engine, dom0, Op.WRITE, b"/other|q")
    req(engine, dom0, Op.SET_PERMS, b"/other|n0|r5|")
    first = make_guest(engine, dom0, 5)
    assert [read(first, p) for p in (b"/keep", b"/keep/sub", b"/other")] == [b"x", b"y", b"q"]
    req(engine, dom0, Op.RELEASE, b"5|")
    req(engine, dom0, Op.WRITE, b"/unrelated|1")
    second = make_guest(engine, dom0, 5)
    assert [read(second, p) for p in (b"/keep", b"/keep/sub", b"/other")] == [b"EACCES\0"] * 3
    assert req(engine, dom0, Op.GET_PERMS, b"/keep|")[-1][2] == b"n0\0b5\0"
    req(engine, dom0, Op.WRITE, b"/keep|z")  # written while the new domain 5 is known
    assert [read(second, p) for p in (b"/keep", b"/keep/sub")] == [b"z", b"EACCES\0"]
    # The toolstack writes a guest's nodes before introducing it: naming
    # the domain in SET_PERMS makes it known from then on.
    req(engine, dom0, Op.WRITE, b"/later|w")
    req(engine, dom0, Op.SET_PERMS, b"/later|n0|r6|")
    req(engine, dom0, Op.WRITE, b"/unrelated|2")
    assert read(make_guest(engine, dom0, 6), b"/later") == b"w"
    # A store restored from disk: every entry counts (who was known then is not kept).
    restored = Engine(store=Store.from_changes(engine.store.snapshot()))
    rdom0 = restored.connect(0, privileged=True)
    again = make_guest(restored, rdom0, 5)
    assert req(restored, again, Op.READ, b"/keep/sub|")[-1][2] == b"y"


def test_keep_orphans_gives_a_dead_domains_nodes_to_dom0_silently(engine, dom0):
    """cxenstored -K: the nodes a dead domain owned stay, owned by dom0 with
    the rest of their ACL, and their watches see nothing; a later domain
    with the same id gets no access from the old ownership."""
    engine.keep_orphans = True
    guest = make_guest(engine, dom0, 5)
    req(engine, dom0, Op.WRITE, b"/keep|")
    req(engine, dom0, Op.SET_PERMS, b"/keep|n0|b5|")
    req(engine, guest, Op.WRITE, b"/keep/mine/sub|1")  # both owned by 5
    req(engine, guest, Op.SET_PERMS, b"/keep/mine|n5|r7|")
    req(engine, dom0, Op.WATCH, b"/keep|k|")
    req(engine, dom0, Op.WATCH, b"@releaseDomain|r|")
    out = engine.domain_died(5)
    assert events(out) == [b"@releaseDomain\0r\0"]
    assert req(engine, dom0, Op.GET_PERMS, b"/keep/mine|")[-1][2] == b"n0\0r7\0"
    assert req(engine, dom0, Op.GET_PERMS, b"/keep/mine/sub|")[-1][2] == b"n0\0b5\0"  # (its inherited b5 stays)
    assert req(engine, dom0, Op.READ, b"/keep/mine/sub|")[-1][2] == b"1"
    assert engine.store.owner_counts.get(5, 0) == 0
    assert 5 not in engine.memory.by_domain
    # The adoption is journaled: a replay gives the same tree.
    assert Store.from_changes(engine.store.snapshot()).snapshot() == engine.store.snapshot()
    req(engine, dom0, Op.WRITE, b"/unrelated|1")
    again = make_guest(engine, dom0, 5)  # a new domain 5: the old one's ACL entries are stale
    assert req(engine, again, Op.READ, b"/keep/mine/sub|")[-1][2] == b"EACCES\0"


def test_shutdown_fires_release_once_until_resume(engine, dom0):
    make_guest(engine, dom0, 5)
    req(engine, dom0, Op.WATCH, b"@releaseDomain|r|")
    assert events(engine.domain_shutdown(5)) == [b"@releaseDomain\0r\0"]
    assert engine.domain_shutdown(5) == []
    req(engine, dom0, Op.RESUME, b"5|")
    assert events(engine.domain_shutdown(5)) == [b"@releaseDomain\0r\0"]
    assert engine.domain_shutdown(9) == []


def test_reintroduce_resets_the_guest_connection(engine, dom0):
    guest = make_guest(engine, dom0, 5)
    req(engine, guest, Op.WATCH, b"x|t|")
    req(engine, guest, Op.TRANSACTION_START, b"|")
    req(engine, dom0, Op.INTRODUCE, b"5|1|9|")
    assert guest.watches == {} and guest.transactions == {}
    assert engine.take_effects()[-1] == Introduced(5, 1, 9)


def test_disconnect_drops_watches_and_transactions(engine, dom0):
    other = engine.connect()
    req(engine, other, Op.WATCH, b"/w|t|")
    req(engine, other, Op.TRANSACTION_START, b"|")
    assert engine.statistics()["watches"] == 1
    assert engine.disconnect(other) == []
    assert engine.disconnect(other) == []
    stats = engine.statistics()
    assert (stats["watches"], stats["transactions"], stats["connections"]) == (0, 0, 1)
    assert events(req(engine, dom0, Op.WRITE, b"/w|")) == []


def test_statistics(engine, dom0):
    stats = engine.statistics()
    assert stats["nodes"] == 3 and stats["connections"] == 1 and stats["domains"] == 1


def test_directory_reply_over_the_limit_is_e2big(engine, dom0):
    for i in range(300):
        req(engine, dom0, Op.WRITE, b"/big/child-number-%04d|" % i)
    assert req(engine, dom0, Op.DIRECTORY, b"/big|")[-1][2] == b"E2BIG\0"
    # DIRECTORY_PART pages through it
    names, offset, gen = b"", 0, None
    while True:
        payload = req(engine, dom0, Op.DIRECTORY_PART, b"/big|%d|" % offset)[-1][2]
        assert len(payload) <= 4096
        g, _, chunk = payload.partition(b"\0")
        assert gen in (None, g)
        gen = g
        names += chunk
        if names.endswith(b"\0\0") or names == b"\0":
            break
        offset += len(chunk)
    assert names[:-1].split(b"\0")[:-1] == [b"child-number-%04d" % i for i in range(300)]


def test_a_peer_cannot_crash_the_engine(engine, dom0):
    guest = make_guest(engine, dom0, 5)
    for op in list(range(0, 30)) + [0xFFFF, 2**32 - 1]:
        for payload in (b"", b"\0", b"\0\0\0", b"/a", b"\xff\xfe\0", b"x" * 4096, b"/a\0b\0c\0d\0"):
            for tx in (0, 1, 2**32 - 1):
                for conn in (dom0, guest):
                    out = engine.handle(conn, Packet(op, 1, tx, payload))
                    assert out and all(p.op != Op.ERROR or p.payload != b"EIO\0" for _, p in out)
    assert engine.internal_errors == 0


# -- limits -------------------------------------------------------------------------


def test_limits_names_defaults_and_runtime_changes():
    limits = Limits()
    assert [limits.get(n) for n in core.limits.QUOTA_NAMES] == [1000, 128, 10, 20, 1024, 2621440, 2048, 2048, 5]
    assert limits.get("memory", soft=True) == 2097152
    limits.set("transaction-nodes", 7)
    assert limits.transaction_nodes == 7
    with pytest.raises(KeyError):
        limits.set("bogus", 1)
    with pytest.raises(ValueError):
        limits.set("nodes", -1)
    engine = Engine(Limits(watches=1))
    dom0 = engine.connect()
    guest = make_guest(engine, dom0, 5)
    req(engine, guest, Op.WATCH, b"a|1|")
    assert req(engine, guest, Op.WATCH, b"a|2|")[-1][2] == b"E2BIG\0"
    req(engine, dom0, Op.SET_QUOTA, b"watches|2|")
    assert engine.limits.watches == 2
    assert req(engine, guest, Op.WATCH, b"a|2|")[0][1:] == (Op.WATCH, b"OK\0")


def test_transaction_nodes_quota():
    engine = Engine(Limits(transaction_nodes=3))
    dom0 = engine.connect()
    guest = make_guest(engine, dom0, 5)
    req(engine, guest, Op.TRANSACTION_START, b"|")
    for name in (b"a", b"b"):
        assert req(engine, guest, Op.READ, name + b"|", tx=1)[-1][2] == b"ENOENT\0"
    assert req(engine, guest, Op.READ, b"c|", tx=1)[-1][2] == b"ENOSPC\0"


# -- structure ------------------------------------------------------------------------


def test_exports():
    for name in core.__all__:
        assert getattr(core, name).__module__.startswith("xenstore.core.")


def test_write_cost_does_not_grow_with_unrelated_watches():
    def cost(n_watches: int) -> float:
        engine = Engine()
        dom0 = engine.connect()
        for i in range(n_watches):
            engine.handle(dom0, Packet(Op.WATCH, 1, 0, b"/other/w%d\0t\0" % i))
        engine.handle(dom0, Packet(Op.WATCH, 1, 0, b"/hot\0t\0"))
        packet = Packet(Op.WRITE, 1, 0, b"/hot/x\0v")
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(2000):
                engine.handle(dom0, packet)
            best = min(best, time.perf_counter() - t)
        return best

    assert cost(20000) < 3 * cost(0)


# -- fuzz ------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    [b"", b"/", b"/a", b"/a/b", b"x", b"@releaseDomain", b"n0", b"r5", b"b6", b"T", b"F", b"5", b"0",
     b"-1", b"quota", b"set", b"nodes", b"\xff", b"a//b", b"7", b"1", b"print", b"check"]
)
_PAYLOADS = st.one_of(
    st.lists(_PIECES, max_size=5).map(lambda parts: b"\0".join(parts) + b"\0"),
    st.lists(_PIECES, max_size=5).map(b"\0".join),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 5, 6]), st.sampled_from(list(range(27)) + [0xFFFF]),
                          st.sampled_from([0, 0, 1, 2, 3]), _PAYLOADS), max_size=40))
def test_random_requests_never_break_the_engine(requests):
    engine = Engine()
    dom0 = engine.connect()
    conns = {0: dom0, 5: make_guest(engine, dom0, 5), 6: engine.connect(6, privileged=False)}
    for i, (who, op, tx, payload) in enumerate(requests):
        out = engine.handle(conns[who], Packet(op, i, tx, payload))
        replies = [p for c, p in out if c is conns[who] and p.op != Op.WATCH_EVENT]
        assert len(replies) == 1 and replies[0].req_id == i and replies[0].tx_id == tx
        assert all(len(p.payload) <= 4096 for _, p in out)
    assert engine.internal_errors == 0, engine.last_internal_error
    snap = engine.store.snapshot()
    assert Store.from_changes(snap).snapshot() == snap


def test_event_order_is_connection_then_registration_order(engine, dom0):
    """As cxenstored: connections oldest first, each one's watches in the
    order they were registered (not by path depth)."""
    other = engine.connect()
    req(engine, other, Op.WATCH, b"/w/x|o-deep|")
    req(engine, dom0, Op.WATCH, b"/w/x|deep|")
    req(engine, dom0, Op.WATCH, b"/|root|")
    req(engine, dom0, Op.WATCH, b"/w|mid|")
    out = req(engine, other, Op.WRITE, b"/w/x/y|v")
    assert [(c, p) for c, op, p in out if op == Op.WATCH_EVENT] == [
        (dom0, b"/w/x/y\0deep\0"),
        (dom0, b"/w/x/y\0root\0"),
        (dom0, b"/w/x/y\0mid\0"),
        (other, b"/w/x/y\0o-deep\0"),
    ]


# -- dom0's short way (remembered paths) ------------------------------------------


def test_remembered_paths_answer_like_the_full_way(engine, dom0):
    """Second sight of a path takes the engine's short way for dom0 READ,
    DIRECTORY and WRITE; the answers, the change records and the checks must
    be those of the first (full) way."""
    first = [req(engine, dom0, Op.WRITE, b"/s/a|1"), req(engine, dom0, Op.READ, b"/s/a|"), req(engine, dom0, Op.DIRECTORY, b"/s|")]
    engine.take_changes()
    again = [req(engine, dom0, Op.WRITE, b"/s/a|1"), req(engine, dom0, Op.READ, b"/s/a|"), req(engine, dom0, Op.DIRECTORY, b"/s|")]
    assert again == first == [[(dom0, Op.WRITE, b"OK\0")], [(dom0, Op.READ, b"1")], [(dom0, Op.DIRECTORY, b"a\0")]]
    assert engine.take_changes() == [b"/s/a\x001"]  # (the full way's record of a new value, too)
    generation = engine.store.nodes["/s/a"].generation
    req(engine, dom0, Op.WRITE, b"/s/a|2")
    assert engine.store.nodes["/s/a"].generation > generation
    # A watch covering it: the full way again, which fires it.
    req(engine, dom0, Op.WATCH, b"/s|tok|")
    assert events(req(engine, dom0, Op.WRITE, b"/s/a|3")) == [b"/s/a\0tok\0"]
    # path-max shrinks at run time: a remembered path is checked again.
    engine.limits.path_max = 3
    assert req(engine, dom0, Op.READ, b"/s/a|") == [(dom0, Op.ERROR, b"EINVAL\0")]
    assert req(engine, dom0, Op.DIRECTORY, b"/s/a|") == [(dom0, Op.ERROR, b"EINVAL\0")]
    engine.limits.path_max = 2048
    req(engine, dom0, Op.UNWATCH, b"/s|tok|")
    assert req(engine, dom0, Op.WRITE, b"/s/a|4") == [(dom0, Op.WRITE, b"OK\0")]
    engine.limits.path_max = 3
    assert req(engine, dom0, Op.WRITE, b"/s/a|5") == [(dom0, Op.ERROR, b"EINVAL\0")]
    # Removed since: ENOENT, as the full way says.
    engine.limits.path_max = 2048
    req(engine, dom0, Op.RM, b"/s/a|")
    assert req(engine, dom0, Op.READ, b"/s/a|") == [(dom0, Op.ERROR, b"ENOENT\0")]


def test_remembered_paths_in_dom0_transactions(engine, dom0):
    """dom0's short ways inside a transaction (READ, DIRECTORY, WRITE) and
    for TRANSACTION_START/END give the full way's answers: isolation, the
    commit's change records, EAGAIN after a conflicting outside write."""
    req(engine, dom0, Op.WRITE, b"/t/a|1")
    req(engine, dom0, Op.READ, b"/t/a|")  # remembered from here on
    engine.take_changes()

    def start():
        [(_, op, payload)] = req(engine, dom0, Op.TRANSACTION_START, b"|")
        assert op == Op.TRANSACTION_START
        return int(payload.rstrip(b"\0"))

    tx = start()
    assert req(engine, dom0, Op.WRITE, b"/t/a|2", tx) == [(dom0, Op.WRITE, b"OK\0")]
    assert req(engine, dom0, Op.READ, b"/t/a|", tx) == [(dom0, Op.READ, b"2")]
    assert req(engine, dom0, Op.DIRECTORY, b"/t|", tx) == [(dom0, Op.DIRECTORY, b"a\0")]
    assert req(engine, dom0, Op.READ, b"/t/a|") == [(dom0, Op.READ, b"1")]  # isolated
    assert engine.take_changes() == []
    assert req(engine, dom0, Op.TRANSACTION_END, b"T|", tx) == [(dom0, Op.TRANSACTION_END, b"OK\0")]
    assert engine.take_changes() == [b"/t/a\x002"]
    assert req(engine, dom0, Op.READ, b"/t/a|") == [(dom0, Op.READ, b"2")]

    # A conflicting outside write: EAGAIN, nothing committed.
    tx = start()
    req(engine, dom0, Op.WRITE, b"/t/a|3", tx)
    req(engine, dom0, Op.WRITE, b"/t/a|outside")
    engine.take_changes()
    assert req(engine, dom0, Op.TRANSACTION_END, b"T|", tx) == [(dom0, Op.ERROR, b"EAGAIN\0")]
    assert engine.take_changes() == []
    # Unknown transaction, bad argument: the full way's errors.
    assert req(engine, dom0, Op.TRANSACTION_END, b"T|", 999) == [(dom0, Op.ERROR, b"ENOENT\0")]
    tx = start()
    assert req(engine, dom0, Op.TRANSACTION_END, b"X|", tx) == [(dom0, Op.ERROR, b"EINVAL\0")]
    # With a watch covering a change the commit fires it (the full way).
    tx = start()
    req(engine, dom0, Op.WATCH, b"/t|w|")
    req(engine, dom0, Op.WRITE, b"/t/a|4", tx)
    assert events(req(engine, dom0, Op.TRANSACTION_END, b"T|", tx)) == [b"/t/a\0w\0"]


def test_short_ways_skip_only_changes_no_watch_covers(engine, dom0):
    """Real stores always hold watches (@introduceDomain, backends' own):
    a WRITE or a commit takes the short way when no watch covers the
    changed path, and the full way -- firing -- as soon as one does, also
    when the watch came after the path was found uncovered."""
    watcher = engine.connect()
    req(engine, watcher, Op.WATCH, b"@introduceDomain|i|")
    req(engine, watcher, Op.WATCH, b"/other|o|")
    req(engine, watcher, Op.WATCH, b"/w/a/deeper|d|")  # below, not above: a write to /w/a does not fire it
    req(engine, dom0, Op.WRITE, b"/w/a|1")
    req(engine, dom0, Op.READ, b"/w/a|")  # remembered
    assert engine.quick_reply(dom0, Op.WRITE, 0, b"/w/a\x002") == b"OK\0"
    assert engine.store.nodes["/w/a"].value == b"2"

    def commit_one(value: bytes):
        [(_, _, tx)] = req(engine, dom0, Op.TRANSACTION_START, b"|")
        tx = int(tx.rstrip(b"\0"))
        assert engine.quick_reply(dom0, Op.WRITE, tx, b"/w/a\0" + value) == b"OK\0"
        return engine.quick_reply(dom0, Op.TRANSACTION_END, tx, b"T\0"), tx

    assert commit_one(b"3")[0] == b"OK\0"
    assert engine.store.nodes["/w/a"].value == b"3"
    # A watch on an ancestor now: the short ways step aside, the full way fires.
    req(engine, watcher, Op.WATCH, b"/w|w|")
    assert engine.quick_reply(dom0, Op.WRITE, 0, b"/w/a\x004") is None
    assert engine.store.nodes["/w/a"].value == b"3"  # (nothing done)
    assert events(req(engine, dom0, Op.WRITE, b"/w/a|4"), watcher) == [b"/w/a\0w\0"]
    answer, tx = commit_one(b"5")
    assert answer is None and tx in dom0.transactions  # (nothing done)
    assert events(req(engine, dom0, Op.TRANSACTION_END, b"T|", tx), watcher) == [b"/w/a\0w\0"]
    assert engine.quick_reply(dom0, Op.TRANSACTION_START, 0, b"\0") is not None  # aborts never fire
    [tx] = [t for t in dom0.transactions]
    assert engine.quick_reply(dom0, Op.TRANSACTION_END, tx, b"F\0") == b"OK\0"
    # The watch goes: short ways again.
    req(engine, watcher, Op.UNWATCH, b"/w|w|")
    assert engine.quick_reply(dom0, Op.WRITE, 0, b"/w/a\x006") == b"OK\0"
    assert commit_one(b"7")[0] == b"OK\0"
    assert engine.store.nodes["/w/a"].value == b"7"


def test_quick_reply_answers_only_what_handle_would_answer_alone(engine, dom0):
    """``quick_reply`` gives the reply payload of a short-way request, and
    ``None`` -- having done nothing -- for everything else."""
    assert engine.quick_reply(dom0, Op.READ, 0, b"/q/a\0") is None  # unknown path: nothing done
    req(engine, dom0, Op.WRITE, b"/q/a|1")
    req(engine, dom0, Op.DIRECTORY, b"/q|")  # (a path is remembered once it was an argument)
    engine.take_changes()
    assert engine.quick_reply(dom0, Op.READ, 0, b"/q/a\0") == b"1"
    assert engine.quick_reply(dom0, Op.DIRECTORY, 0, b"/q\0") == b"a\0"
    assert engine.quick_reply(dom0, Op.WRITE, 0, b"/q/a\0" + b"2") == b"OK\0"
    assert engine.take_changes() == [b"/q/a\x002"]
    assert engine.quick_reply(dom0, Op.GET_PERMS, 0, b"/q/a\0") is None
    assert engine.quick_reply(dom0, Op.READ, 77, b"/q/a\0") is None  # no such transaction
    guest = engine.connect(5, privileged=False)
    assert engine.quick_reply(guest, Op.READ, 0, b"/q/a\0") is None
    assert engine.take_changes() == []
