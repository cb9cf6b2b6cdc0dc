"""The engine against a simple reference model (hypothesis stateful test).

The model is a flat ``dict`` path -> (value, perms) with a per-path change
stamp, plus per-connection transactions (own overlay + the stamps of the
paths first seen) and watches.  Every request's reply and every watch event
is predicted by the model and compared.  After every step the engine's
store must survive ``snapshot() -> Store.from_changes()`` and a replay of
every journaled change record, and equal the model's live tree.

Semantics modelled (cxenstored 4.17): permission rules with privileged
dom0 and unprivileged domains 5 and 6; EACCES vs ENOENT from the nearest
existing ancestor; new nodes inherit the parent's permissions and belong to
an unprivileged creator; transactions read live nodes at first access and
fail with EAGAIN iff a node they looked at changed since (once that happened
the transaction's replies are not checked: cxenstored's own view is then
its first-access copies, which the model does not keep); watch events with
the RM / transaction / permission-filter rules; a domain's death (its
nodes, watches and transaction go) and a new domain with its domid, whose
ACL entries on nodes written before it came do not count (stale domids).
"""

from __future__ import annotations

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from xenstore.core import Engine, Store
from xenstore.wire import Op, Packet

DOMIDS = (0, 5, 6)
ABS_PATHS = ("/a", "/a/b", "/a/b/c", "/e", "/local/domain/5/x", "/local/domain/5/x/y", "/local/domain/6/z")
REL_PATHS = {5: ("x", "x/y"), 6: ("z",)}
PERM_SETS = (("n0",), ("n0", "r5"), ("r0", "w6"), ("n5", "b6"), ("r5",), ("n6", "r5"), ("b6", "n5"))
# Start from a tree where every permission rule matters at once.
INITIAL_TREE = (
    ("/local/domain/5", ("n5",)),
    ("/local/domain/6", ("n6",)),
    ("/a", ("n0", "r5")),
    ("/a/b", ("r0", "w6")),
    ("/e", ("n6", "r5")),
    ("/local/domain/5/x", ("n5", "b6")),
)
INITIAL_WATCHES = ((0, "/", b"t1"), (5, "/a", b"t1"), (5, "x", b"t2"), (6, "/e", b"t1"), (6, "/a/b/c", b"t2"))
VALUES = (b"", b"v", b"\x00bin\x00", b"longer value")
TOKENS = (b"t1", b"t2")
USE_TX = st.booleans()

READ, WRITE, OWNER = 1, 2, 8
BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}


def parent(path: str) -> str:
    i = path.rfind("/")
    return path[:i] if i > 0 else "/"


def ancestors(path: str):
    while path != "/":
        path = parent(path)
        yield path


def access(perms: tuple[str, ...], domid: int, stale: bool = False) -> int:
    """``stale``: the caller's entries do not count (its domain was not
    known when the node was last written)."""
    if domid == 0 or int(perms[0][1:]) == domid:
        return READ | WRITE | OWNER
    for entry in perms[1:]:
        if int(entry[1:]) == domid and not stale:
            return BITS[entry[0]]
    return BITS[perms[0][0]]


def resolve(domid: int, raw: str) -> str:
    return raw if raw.startswith("/") else f"/local/domain/{domid}/{raw}"


class Tx:
    def __init__(self, tx_id: int) -> None:
        self.id = tx_id
        self.own: dict[str, tuple[bytes, tuple[str, ...]] | None] = {}
        self.seen: dict[str, int | None] = {}
        self.ops: list[tuple] = []
        self.firings: list[tuple[str, bool, tuple]] = []


class Model:
    def __init__(self, nodes: dict[str, tuple[bytes, tuple[str, ...]]]) -> None:
        self.live = dict(nodes)
        self.stamp: dict[str, int] = {p: 0 for p in nodes}
        self.clock = 0
        #: domid -> clock when xenstored last came to know it (a new domain
        #: reusing a dead one's domid): older nodes' entries naming it are stale.
        self.known: dict[int, int] = {}

    def version(self, path: str) -> int | None:
        return self.stamp[path] if path in self.live else None

    def bump(self, path: str) -> None:
        self.clock += 1
        self.stamp[path] = self.clock

    # -- views: live, or a transaction's overlay over live ------------------

    def get(self, tx: Tx | None, path: str):
        if tx is None:
            return self.live.get(path)
        if path in tx.own:
            return tx.own[path]
        if path not in tx.seen:
            tx.seen[path] = self.version(path)
        return self.live.get(path)

    def children(self, tx: Tx | None, path: str) -> list[str]:
        prefix = path if path != "/" else ""
        names = []
        keys = list(self.live) + ([p for p in tx.own if p not in self.live] if tx else [])
        for p in keys:
            if p != "/" and parent(p) == path:
                if tx is not None and p in tx.own and tx.own[p] is None:
                    continue
                names.append(p[len(prefix) + 1 :])
        return names

    def subtree_postorder(self, tx: Tx | None, path: str) -> list[str]:
        out = []
        for name in self.children(tx, path):
            child = f"{path if path != '/' else ''}/{name}"
            self.get(tx, child)
            out += self.subtree_postorder(tx, child)
        out.append(path)
        return out

    def put(self, tx: Tx | None, path: str, value: bytes, perms) -> None:
        if tx is None:
            if path not in self.live:
                self.bump(parent(path))
            self.live[path] = (value, perms)
            self.bump(path)
        else:
            self.get(tx, path)
            tx.own[path] = (value, perms)
            tx.ops.append(("set", path, value, perms))

    def delete(self, tx: Tx | None, path: str) -> list[str]:
        removed = self.subtree_postorder(tx, path)
        if tx is None:
            for p in removed:
                del self.live[p]
            self.bump(parent(path))
        else:
            for p in removed:
                tx.own[p] = None
            tx.ops.append(("rm", path))
        return removed

    def conflicts(self, tx: Tx) -> bool:
        return any(self.version(p) != v for p, v in tx.seen.items())

    def stale(self, tx: Tx | None, domid: int, path: str) -> bool:
        """Are ``domid``'s entries on ``path`` (as ``tx`` sees it) stale?"""
        if tx is not None and path in tx.own:
            return False  # written by this transaction, after the domain came
        return self.stamp.get(path, 0) < self.known.get(domid, 0)

    def find(self, tx, domid: int, path: str, perm: int):
        """(node or None, error name or None) like cxenstored get_node."""
        node = self.get(tx, path)
        if node is not None:
            if (access(node[1], domid, self.stale(tx, domid, path)) & perm) == perm:
                return node, None
            if path != "/":
                self.get(tx, parent(path))  # cxenstored looks at the parent too
            return None, "EACCES"
        anc = None
        for a in ancestors(path):
            anc = self.get(tx, a)
            if anc is not None:
                break
        if domid == 0 or access(anc[1], domid, self.stale(tx, domid, a)) & perm:
            return None, None
        return None, "EACCES"


class EngineVsModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.engine = Engine()
        self.conns = {d: self.engine.connect(d, privileged=(d == 0)) for d in DOMIDS}
        c0 = self.conns[0]
        for d in DOMIDS[1:]:  # introduced: they can die (domain_dies_and_comes_back)
            self.engine.handle(c0, Packet(Op.INTRODUCE, 1, 0, b"%d\x001\x005\x00" % d))
        for path, perms in INITIAL_TREE:
            self.engine.handle(c0, Packet(Op.WRITE, 1, 0, path.encode() + b"\0"))
            payload = path.encode() + b"\0" + "".join(p + "\0" for p in perms).encode()
            self.engine.handle(c0, Packet(Op.SET_PERMS, 1, 0, payload))
        self.journal = self.engine.take_changes()
        self.model = Model({p: (v, tuple(perms)) for _, p, v, perms in self.engine.store.snapshot()})
        self.txs: dict[int, Tx | None] = {d: None for d in DOMIDS}
        self.watches: dict[int, list[tuple[str, bytes, bool]]] = {d: [] for d in DOMIDS}
        self.events: list[tuple[int, bytes]] = []
        for d in DOMIDS:
            self._start(d)
        for d, raw, token in INITIAL_WATCHES:
            self.watch_path(d, raw, token)

    # -- helpers -------------------------------------------------------------

    def call(self, domid: int, op: int, payload: bytes, use_tx: bool):
        tx = self.txs[domid] if use_tx else None
        out = self.engine.handle(self.conns[domid], Packet(op, 9, tx.id if tx else 0, payload))
        replies = [p for c, p in out if c is self.conns[domid] and p.op != Op.WATCH_EVENT]
        assert len(replies) == 1, out
        by_id = {c.id: d for d, c in self.conns.items()}
        self.events = sorted((by_id[c.id], p.payload) for c, p in out if p.op == Op.WATCH_EVENT)
        return replies[0], tx

    def expect(self, reply, op, payload):
        if isinstance(payload, str):
            assert (reply.op, reply.payload) == (Op.ERROR, payload.encode() + b"\0"), reply
        else:
            assert (reply.op, reply.payload) == (op, payload), reply

    def expect_events(self, expected: list[tuple[int, bytes]]):
        assert self.events == sorted(expected)

    def fire(self, path: str, exact: bool, extras: tuple) -> list[tuple[int, bytes]]:
        """Events for a change at ``path`` in the live model (after the change)."""
        visible = list(extras)
        if path in self.model.live:
            visible.append(self.model.live[path][1])
        if path != "/" and parent(path) in self.model.live:
            visible.append(self.model.live[parent(path)][1])
        out = []
        for d, watches in self.watches.items():
            for wpath, token, relative in watches:
                if not (path == wpath or (not exact and (wpath == "/" or path.startswith(wpath + "/")))):
                    continue
                if d != 0 and not any(access(perms, d) & READ for perms in visible):
                    continue
                epath = path[len(f"/local/domain/{d}/") :] if relative else path
                out.append((d, epath.encode() + b"\0" + token + b"\0"))
        return out

    def change(self, tx: Tx | None, path: str, exact: bool = False, extras: tuple = ()):
        if tx is not None:
            tx.firings.append((path, exact, extras))
            return []
        return self.fire(path, exact, extras)

    def doomed(self, tx: "Tx | None") -> bool:
        return tx is not None and self.model.conflicts(tx)

    # -- rules -----------------------------------------------------------------

    paths = st.sampled_from(ABS_PATHS)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, use_tx=USE_TX)
    def read(self, domid, path, use_tx):
        reply, tx = self.call(domid, Op.READ, path.encode() + b"\0", use_tx)
        if self.doomed(tx):
            return  # its view may mix old and new state; it cannot commit
        node, err = self.model.find(tx, domid, path, READ)
        self.expect(reply, Op.READ, err or (node[0] if node else "ENOENT"))

    @rule(domid=st.sampled_from(DOMIDS), path=paths, use_tx=USE_TX)
    def directory_and_perms(self, domid, path, use_tx):
        reply, tx = self.call(domid, Op.DIRECTORY, path.encode() + b"\0", use_tx)
        if self.doomed(tx):
            return
        node, err = self.model.find(tx, domid, path, READ)
        if err or node is None:
            self.expect(reply, Op.DIRECTORY, err or "ENOENT")
        else:
            names = self.model.children(tx, path)
            got = reply.payload.split(b"\0")[:-1]
            expected = [n.encode() for n in names]
            # Creation order outside transactions; as a set inside.
            assert (got if tx is None else sorted(got)) == (expected if tx is None else sorted(expected))
        reply, tx = self.call(domid, Op.GET_PERMS, path.encode() + b"\0", use_tx)
        if node is not None:
            self.expect(reply, Op.GET_PERMS, "".join(p + "\0" for p in node[1]).encode())

    def _write_like(self, domid, path, value, use_tx, op):
        tx = self.txs[domid] if use_tx else None
        payload = path.encode() + b"\0" + (value if op == Op.WRITE else b"")
        if self.doomed(tx):
            self.call(domid, op, payload, use_tx)  # it will fail at commit
            return
        node, err = self.model.find(tx, domid, path, WRITE)
        reply, _ = self.call(domid, op, payload, use_tx)
        expected_events = []
        if err:
            self.expect(reply, op, err)
        elif node is not None:
            if op == Op.WRITE:
                self.model.put(tx, path, value, node[1])
                expected_events = self.change(tx, path)
            self.expect(reply, op, b"OK\0")
        else:
            missing = [path]
            for a in ancestors(path):
                top = self.model.get(tx, a)
                if top is not None:
                    break
                missing.append(a)
            perms = top[1] if domid == 0 else (f"{top[1][0][0]}{domid}",) + top[1][1:]
            for p in reversed(missing[1:]):
                self.model.put(tx, p, b"", perms)
            self.model.put(tx, path, value if op == Op.WRITE else b"", perms)
            expected_events = self.change(tx, path)
            self.expect(reply, op, b"OK\0")
        self.expect_events(expected_events)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, value=st.sampled_from(VALUES), use_tx=USE_TX)
    def write(self, domid, path, value, use_tx):
        self._write_like(domid, path, value, use_tx, Op.WRITE)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, use_tx=USE_TX)
    def mkdir(self, domid, path, use_tx):
        self._write_like(domid, path, b"", use_tx, Op.MKDIR)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, use_tx=USE_TX)
    def rm(self, domid, path, use_tx):
        tx = self.txs[domid] if use_tx else None
        if self.doomed(tx):
            self.call(domid, Op.RM, path.encode() + b"\0", use_tx)  # it will fail at commit
            return
        node, err = self.model.find(tx, domid, path, WRITE)
        reply, _ = self.call(domid, Op.RM, path.encode() + b"\0", use_tx)
        events = []
        if err:
            expected = err
        elif node is None:
            expected = b"OK\0" if self.model.get(tx, parent(path)) is not None else "ENOENT"
        else:
            parent_node = self.model.get(tx, parent(path))
            view = {}
            for p in self.model.subtree_postorder(tx, path):
                view[p] = self.model.get(tx, p)
            view[parent(path)] = parent_node
            removed = self.model.delete(tx, path)
            for p in removed:
                extras = (view[p][1], view[parent(p)][1])
                events += self.change(tx, p, p != path, extras)
            expected = b"OK\0"
        self.expect(reply, Op.RM, expected)
        self.expect_events(events)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, perms=st.sampled_from(PERM_SETS), use_tx=USE_TX)
    def set_perms(self, domid, path, perms, use_tx):
        tx = self.txs[domid] if use_tx else None
        payload = path.encode() + b"\0" + "".join(p + "\0" for p in perms).encode()
        if self.doomed(tx):
            self.call(domid, Op.SET_PERMS, payload, use_tx)  # it will fail at commit
            return
        node, err = self.model.find(tx, domid, path, WRITE | OWNER)
        reply, _ = self.call(domid, Op.SET_PERMS, payload, use_tx)
        events = []
        if err or node is None:
            expected = err or "ENOENT"
        elif domid != 0 and perms[0][1:] != node[1][0][1:]:
            expected = "EPERM"
        else:
            self.model.put(tx, path, node[0], perms)
            events = self.change(tx, path, False, (node[1],))
            expected = b"OK\0"
        self.expect(reply, Op.SET_PERMS, expected)
        self.expect_events(events)

    def _start(self, domid):
        reply, _ = self.call(domid, Op.TRANSACTION_START, b"\0", False)
        assert reply.op == Op.TRANSACTION_START, reply
        self.txs[domid] = Tx(int(reply.payload[:-1]))

    @rule(domid=st.sampled_from(DOMIDS), commit=st.booleans())
    def transaction_end(self, domid, commit):
        """End the connection's transaction (one is always open) and start
        the next one."""
        tx = self.txs[domid]
        reply, _ = self.call(domid, Op.TRANSACTION_END, b"T\0" if commit else b"F\0", True)
        # The reply's events are checked below; starting the next one sends none.
        events_of_end = self.events
        self._start(domid)
        self.events = events_of_end
        if not commit:
            self.expect(reply, Op.TRANSACTION_END, b"OK\0")
            self.expect_events([])
            return
        event(f"commit: changes={bool(tx.ops)} conflict={self.model.conflicts(tx)}")
        if self.model.conflicts(tx):
            self.expect(reply, Op.TRANSACTION_END, "EAGAIN")
            self.expect_events([])
            return
        self.expect(reply, Op.TRANSACTION_END, b"OK\0")
        merged: dict[str, list] = {}
        for path, exact, extras in tx.firings:
            if path in merged:
                merged[path][0] = merged[path][0] and exact
                merged[path][1] = merged[path][1] + extras
            else:
                merged[path] = [exact, extras]
        existed = {p for p in merged if p in self.model.live}
        for op in tx.ops:
            if op[0] == "set":
                self.model.put(None, op[1], op[2], op[3])
            else:
                self.model.delete(None, op[1])
        events = []
        for path, (exact, extras) in merged.items():
            if path in existed or path in self.model.live:
                events += self.fire(path, exact, extras)
        self.expect_events(events)

    @rule(domid=st.sampled_from(DOMIDS), data=st.data(), token=st.sampled_from(TOKENS))
    def watch(self, domid, data, token):
        self.watch_path(domid, data.draw(st.sampled_from(ABS_PATHS + ("/",) + REL_PATHS.get(domid, ()))), token)

    def watch_path(self, domid, raw, token):
        path = resolve(domid, raw)
        reply, _ = self.call(domid, Op.WATCH, raw.encode() + b"\0" + token + b"\0", False)
        if any(w[:2] == (path, token) for w in self.watches[domid]):
            self.expect(reply, Op.WATCH, "EEXIST")
            return
        self.expect(reply, Op.WATCH, b"OK\0")
        self.watches[domid].append((path, token, not raw.startswith("/")))
        self.expect_events([(domid, raw.encode() + b"\0" + token + b"\0")])

    @rule(domid=st.sampled_from(DOMIDS), data=st.data(), token=st.sampled_from(TOKENS))
    def unwatch(self, domid, data, token):
        raw = data.draw(st.sampled_from(ABS_PATHS + ("/",) + REL_PATHS.get(domid, ())))
        path = resolve(domid, raw)
        reply, _ = self.call(domid, Op.UNWATCH, raw.encode() + b"\0" + token + b"\0", False)
        for w in self.watches[domid]:
            if w[:2] == (path, token):
                self.watches[domid].remove(w)
                self.expect(reply, Op.UNWATCH, b"OK\0")
                break
        else:
            self.expect(reply, Op.UNWATCH, "ENOENT")

    @rule(domid=st.sampled_from((5, 6)))
    def domain_dies_and_comes_back(self, domid):
        """The domain dies (its watches, transaction and owned nodes go,
        RM-style events for the nodes) and a new one with the same domid is
        introduced after some other write: ACL entries naming the old one
        are stale on every node written before."""
        self._write_like(0, "/unrelated", b"", False, Op.WRITE)
        self.txs[domid] = None
        self.watches[domid] = []
        events = []
        model = self.model
        stack = ["/"]
        while stack:
            p = stack.pop()
            node = model.live.get(p)
            if node is None:
                continue
            if p != "/" and int(node[1][0][1:]) == domid:
                view = {q: model.live[q] for q in model.subtree_postorder(None, p)}
                view[parent(p)] = model.live[parent(p)]
                for q in model.delete(None, p):
                    events += self.fire(q, q != p, (view[q][1], view[parent(q)][1]))
                continue
            prefix = p if p != "/" else ""
            stack.extend(f"{prefix}/{name}" for name in reversed(model.children(None, p)))
        out = self.engine.domain_died(domid)
        by_id = {c.id: d for d, c in self.conns.items()}
        self.events = sorted((by_id[c.id], p.payload) for c, p in out if p.op == Op.WATCH_EVENT and c.id in by_id)
        self.expect_events(events)
        reply = self.engine.handle(self.conns[0], Packet(Op.INTRODUCE, 1, 0, b"%d\x001\x005\x00" % domid))
        assert [p.payload for c, p in reply if c is self.conns[0]] == [b"OK\0"], reply
        model.known[domid] = model.clock
        self._start(domid)

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def no_internal_errors(self):
        assert self.engine.internal_errors == 0, self.engine.last_internal_error

    @invariant()
    def store_round_trips(self):
        store = self.engine.store
        snap = store.snapshot()
        assert Store.from_changes(snap).snapshot() == snap
        self.journal += self.engine.take_changes()
        assert Store.from_changes(self.journal).snapshot() == snap
        assert {p: (v, tuple(perms)) for _, p, v, perms in snap} == self.model.live
        # Node-count accounting matches the tree.
        counts: dict[int, int] = {}
        for _, _, _, perms in snap:
            owner = int(perms[0][1:])
            counts[owner] = counts.get(owner, 0) + 1
        assert {d: n for d, n in store.owner_counts.items() if n} == counts


EngineVsModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_engine_against_model = EngineVsModel.TestCase
