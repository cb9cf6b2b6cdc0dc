"""The XenStore engine: ``(connection, request) -> replies and watch events``.

Pure: no I/O, no clock.  The daemon feeds it requests and queues what comes
back, journals :meth:`Engine.take_changes` and carries out
:meth:`Engine.take_effects`.

Processing order (cxenstored 4.17, fact sheet §3.5): unknown type ->
ENOSYS; privileged-only type from an unprivileged caller -> EACCES; a
``tx_id`` naming no open transaction of this connection -> ENOENT (not for
WATCH/UNWATCH); then the handler: argument format -> EINVAL, path -> EINVAL,
node lookup/permissions -> EACCES/ENOENT, quotas -> ENOSPC/E2BIG.  The
dispatch table in ``Engine.__init__`` maps each type to its handler and
flags (privileged-only, ignores tx_id).

Deferred introductions: with ``defer_introduce`` set (by an I/O layer
that maps rings, e.g. the daemon's hypervisor link), INTRODUCE of a new
domain is validated, then answered later: the engine emits
``Introduced(domid, gfn, port, pending=token)`` and no reply, and holds the
requesting connection's later requests (replies stay in request order, as
cxenstored serves one request per connection at a time).  The I/O layer
maps and binds, then calls :meth:`Engine.complete_introduce` with the
token, which returns the OK (after ``@introduceDomain``) or the ERROR reply
followed by the replies to the held requests.  Meanwhile the domain is
"introducing": IS_DOMAIN_INTRODUCED says ``F``, another INTRODUCE of it is
refused with EBUSY (from the same connection it simply waits its turn).
If the requesting connection closes meanwhile its held requests are
dropped; the introduction still completes (the request was made), only
its reply goes nowhere.  Re-introducing a known domain (resume) is
answered at once, as before.  Only replies wait: watch events for the
waiting connection are delivered as they happen.  The held requests are
not bounded here (INTRODUCE is privileged: only dom0's connections wait,
and the I/O layer completes within one map and bind).

Beyond XENSTORE_API.md the engine offers ``domain_shutdown(domid)``
(@releaseDomain once per shutdown), ``domain_usage(domid)``,
``quota(name, domid)`` (effective quota incl. per-domain overrides),
``domains`` (the DomainTable), ``features``, ``control_state`` (what
CONTROL log/logfile/memreport asked for) and ``internal_errors``.

Per-domain memory (the ``memory`` quota, rules in memory.py) is accounted
like cxenstored 4.17 for nodes, watches and transactions; a charge that
would bring an unprivileged domain to its hard limit is refused (EIO for
node writes, ENOMEM for WATCH, as cxenstored answers); crossing the soft
or hard level yields a ``MemoryQuotaNotice`` effect.

Deliberate differences from cxenstored 4.17: quotas are checked with ">="
(no off-by-one); ACL entries of since-recreated domains are not ignored
(no per-domain generation); queued replies and watch events are not
charged to the memory quota (the daemon owns the queues and bounds them
with ``outstanding``), so a domain at its limit is not stalled and still
gets large replies and its events; GET/SET_FEATURE and GET/SET_QUOTA
follow 4.21/4.22.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..wire import ERROR_NAMES, OK, PAYLOAD_MAX, Op, Packet, XenStoreError
from .connection import Connection
from .control import ControlState, c_atoi, run_control
from .domains import (
    DOMID_SELF,
    SUPPORTED_FEATURES,
    Domain,
    DomainTable,
    Introduced,
    Released,
)
from .limits import WIRE_QUOTA_NAMES, Limits
from .memory import PERM_ENTRY, children_len, creation_memory, node_memory, recompute, watch_memory
from .paths import ArgumentPaths, ancestors, parent_of, resolve, resolve_watch_path
from .perms import OWNER, READ, WRITE, Perms, parse_domid
from .store import Change, Node, Overlay, Store, record_size
from .transactions import Transaction, allocate_id
from .watches import WatchRegistry

__all__ = ["Engine", "Delivery"]

Delivery = tuple[Connection, Packet]

# Dispatch flags.
PRIV = 1  # privileged callers only (EACCES otherwise)
NO_TX = 2  # tx_id is ignored entirely (WATCH, UNWATCH)

_EINVAL = "EINVAL"
_tuple_new = tuple.__new__
_READ = int(Op.READ)
_DIRECTORY = int(Op.DIRECTORY)
_WRITE = int(Op.WRITE)
_TRANSACTION_START = int(Op.TRANSACTION_START)
_TRANSACTION_END = int(Op.TRANSACTION_END)
#: Paths remembered as covered by no watch (then the memo starts afresh).
_UNWATCHED_MEMO = 4096


def _err(name: str) -> XenStoreError:
    return XenStoreError(name)


def _strings(payload: bytes) -> list[str]:
    """The NUL-terminated strings of a payload (a trailing fragment without
    NUL is not a string: cxenstored get_strings / xs_count_strings)."""
    parts = payload.decode("latin-1").split("\0")
    parts.pop()  # the fragment after the last NUL ("" if the payload ends in NUL)
    return parts


class _Deferred(Exception):
    """A handler's way of saying "no reply now" (deferred INTRODUCE)."""


class _PendingIntroduce:
    """An INTRODUCE waiting for the I/O layer to map and bind."""

    __slots__ = ("conn", "packet", "domid", "gfn", "port", "created")

    def __init__(self, conn: Connection, packet: Packet, domid: int, gfn: int, port: int, created: bool) -> None:
        self.conn = conn
        self.packet = packet
        self.domid = domid
        self.gfn = gfn
        self.port = port
        #: The domain table got its record from this INTRODUCE (dropped again on failure).
        self.created = created


def _onearg(payload: bytes) -> str:
    """cxenstored ``onearg``: exactly one NUL, as the last byte."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise _err(_EINVAL)
    return payload[:-1].decode("latin-1")


class Engine:
    """See XENSTORE_API.md.  One per daemon."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        domain_exists: Callable[[int], bool] = lambda domid: True,
        store: Store | None = None,
        features: int = SUPPORTED_FEATURES,
        defer_introduce: bool = False,
        keep_orphans: bool = False,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        self.store = store if store is not None else Store()
        self.domains = DomainTable(domain_exists)
        #: Per-domain memory (memory.py): the store's ledger, which the watch
        #: registry and the transactions charge too.
        self.memory = self.store.memory
        self.memory.quota = self._memory_levels
        self.memory.notify = lambda notice: self.pending_effects.append(notice)
        self.watches = WatchRegistry(self.memory)
        self.control_state = ControlState()
        self.features = features
        self._conns: dict[int, Connection] = {}
        self._next_conn_id = 0
        #: Requests answered EIO because of an engine bug (should stay 0).
        self.internal_errors = 0
        self.last_internal_error: Exception | None = None
        #: Effects not yet taken (read-only outside: the I/O layer checks it
        #: is empty before paying for a take_effects() call).
        self.pending_effects: list = []
        #: INTRODUCE of a new domain waits for :meth:`complete_introduce`
        #: (settable at run time: the I/O layer that maps rings turns it on).
        self.defer_introduce = defer_introduce
        #: cxenstored ``-K``: a dead domain's nodes are adopted by dom0 instead
        #: of deleted (a security risk: its data outlives it).
        self.keep_orphans = keep_orphans
        #: Nodes of this generation or older were restored from disk (see _access).
        self._restored_generation = self.store.generation
        self._introductions: dict[int, _PendingIntroduce] = {}  # token -> request
        self._next_token = 0
        #: Connections waiting for their INTRODUCE reply -> their later requests.
        self._held: dict[Connection, list[Packet]] = {}
        # Per-request scratch: deliveries queued before the reply / after it.
        self._out: list[Delivery] = []
        self._after: list[Delivery] = []
        self._arg_paths = ArgumentPaths()
        #: Paths no watch covers -> the watch registry's version then.
        self._unwatched_at: dict[str, int] = {}
        self._dispatch: dict[int, tuple[Callable, int]] = {
            Op.CONTROL: (self._control, PRIV),
            Op.DIRECTORY: (self._directory, 0),
            Op.READ: (self._read, 0),
            Op.GET_PERMS: (self._get_perms, 0),
            Op.WATCH: (self._watch, NO_TX),
            Op.UNWATCH: (self._unwatch, NO_TX),
            Op.TRANSACTION_START: (self._transaction_start, 0),
            Op.TRANSACTION_END: (self._transaction_end, 0),
            Op.INTRODUCE: (self._introduce, PRIV),
            Op.RELEASE: (self._release, PRIV),
            Op.GET_DOMAIN_PATH: (self._get_domain_path, 0),
            Op.WRITE: (self._write, 0),
            Op.MKDIR: (self._mkdir, 0),
            Op.RM: (self._rm, 0),
            Op.SET_PERMS: (self._set_perms, 0),
            Op.IS_DOMAIN_INTRODUCED: (self._is_domain_introduced, PRIV),
            Op.RESUME: (self._resume, PRIV),
            Op.SET_TARGET: (self._set_target, PRIV),
            Op.RESET_WATCHES: (self._reset_watches, 0),
            Op.DIRECTORY_PART: (self._directory_part, 0),
            Op.GET_FEATURE: (self._get_feature, PRIV),
            Op.SET_FEATURE: (self._set_feature, PRIV),
            Op.GET_QUOTA: (self._get_quota, PRIV),
            Op.SET_QUOTA: (self._set_quota, PRIV),
        }

    # ------------------------------------------------------------------ API

    def connect(self, domid: int = 0, privileged: bool = True) -> Connection:
        """A new client connection (socket: dom0 privileged; ring: the guest)."""
        self._next_conn_id += 1
        conn = Connection(self._next_conn_id, domid, privileged)
        domain = self.domains.get(domid)
        if domain is not None:
            conn.target = domain.target
        self._conns[conn.id] = conn
        return conn

    def disconnect(self, conn: Connection) -> list[Delivery]:
        """Forget a connection: its watches and open transactions go.  Idempotent.
        Requests held behind its pending INTRODUCE are dropped (unanswered)."""
        if self._held:
            self._held.pop(conn, None)
        self._reset_connection(conn)
        conn.alive = False
        self._conns.pop(conn.id, None)
        return []

    def handle(self, conn: Connection, packet: Packet) -> list[Delivery]:
        """Process one request.  Returns the deliveries in queueing order:
        watch events caused by the request (for any connection), then the
        reply to ``conn``, then (WATCH only) the initial event.  Nothing while
        ``conn`` waits for a deferred INTRODUCE: the request is held and
        answered, in order, by :meth:`complete_introduce`."""
        if self._held:
            held = self._held.get(conn)
            if held is not None:
                held.append(packet)
                return []
        op = packet[0]
        if conn.privileged:
            answer = self.quick_reply(conn, op, packet[2], packet[3])
            if answer is not None:
                return [(conn, _tuple_new(Packet, (op, packet[1], packet[2], answer)))]
        entry = self._dispatch.get(op)
        if entry is None:
            return [(conn, packet.error_reply("ENOSYS"))]
        handler, flags = entry
        out = self._out = []
        try:
            tx = None
            if flags or packet[2]:
                if flags & PRIV and not conn.privileged:
                    raise _err("EACCES")
                if packet[2] and not flags & NO_TX:
                    tx = conn.transactions.get(packet[2])
                    if tx is None:
                        raise _err("ENOENT")
            payload = handler(conn, packet, tx)
            if len(payload) > PAYLOAD_MAX:
                raise _err("E2BIG")
        except _Deferred:
            return out
        except XenStoreError as e:
            out.append((conn, packet.error_reply(e.name)))
            if self._after:
                self._after = []
            return out
        except Exception as exc:  # a bug must not take the daemon down with it
            self.internal_errors += 1
            self.last_internal_error = exc  # for the daemon to log
            out.append((conn, packet.error_reply("EIO")))
            self._after = []
            return out
        out.append((conn, _tuple_new(Packet, (op, packet[1], packet[2], payload))))  # packet.reply, inline
        if self._after:
            out += self._after
            self._after = []
        return out

    def quick_reply(self, conn: Connection, op: int, tx_id: int, payload: bytes) -> bytes | None:
        """The reply payload of a request whose only output is its reply and
        that takes the short way, else ``None`` -- and then nothing happened:
        :meth:`handle` it.  (``handle`` tries this first itself; the I/O
        layer may call it directly to save building packets.)

        The short ways: most requests are dom0 reading or writing a node,
        done from a remembered path and one lookup, and dom0's transactions.
        Anything else (first sight of the path, a missing node, a change a
        watch would see, a conflict...) goes the full way, to the same
        outcome.
        """
        if not conn.privileged or (self._held and conn in self._held):
            return None
        if op == _READ or op == _DIRECTORY:
            if tx_id:
                answer = self._dom0_in_transaction(conn, op, tx_id, payload)
            else:
                path = self._arg_paths.remembered(payload, self.limits.path_max)
                node = None if path is None else self.store.nodes.get(path)
                answer = None if node is None else node.value if op == _READ else node.children_bytes()
            return answer if answer is not None and len(answer) <= PAYLOAD_MAX else None
        if op == _WRITE:
            if tx_id:
                return self._dom0_in_transaction(conn, op, tx_id, payload)
            # To an existing dom0-owned node whose path was seen before and
            # that no watch covers (a guest's node: its memory quota has a say).
            i = payload.find(b"\0")
            path = self._arg_paths.remembered(payload[: i + 1], self.limits.path_max) if i >= 0 else None
            node = None if path is None else self.store.nodes.get(path)
            if node is None or node.perms.owner or not self._unwatched(path):
                return None
            self.store.set_value(path, node, payload[i + 1 :], payload)  # (a remembered path is absolute: the payload is its record)
            return OK
        if op == _TRANSACTION_START:
            return None if tx_id else self._open_transaction(conn, 0)  # (dom0 has no quota: cannot fail)
        if op == _TRANSACTION_END:
            tx = conn.transactions.get(tx_id)
            if tx is None or (payload != b"F\0" and (payload != b"T\0" or tx.conflicts() or not self._fires_nothing(tx))):
                return None  # an error reply or watch events: the full way
            return self._end_transaction(conn, tx, payload, checked=True)
        return None

    def _unwatched(self, path: str) -> bool:
        """No watch covers ``path``: a change there fires nothing.  (The
        answer is remembered per path while the watches stay the same.)"""
        watches = self.watches
        if not watches.by_path:
            return True
        known = self._unwatched_at
        if known.get(path) == watches.version:
            return True
        if watches.covers(path):
            return False
        if len(known) >= _UNWATCHED_MEMO:
            known.clear()
        known[path] = watches.version
        return True

    def _fires_nothing(self, tx: Transaction) -> bool:
        """Committing ``tx`` fires no watch."""
        if self.watches.by_path:
            for path, _, _ in tx.firings:
                if not self._unwatched(path):
                    return False
        return True

    def _dom0_in_transaction(self, conn: Connection, op: int, tx_id: int, payload: bytes) -> bytes | None:
        """The short way of a privileged READ, DIRECTORY or WRITE inside a
        transaction, on a node the transaction sees and whose path was seen
        before: its reply payload; ``None``: take the full way (the access
        recorded here is the one the full way records)."""
        tx = conn.transactions.get(tx_id)
        if tx is None:
            return None
        if op == _WRITE:
            i = payload.find(b"\0")
            if i < 0:
                return None
            arg = payload[: i + 1]
        else:
            arg = payload
        path = self._arg_paths.remembered(arg, self.limits.path_max)
        if path is None:
            return None
        node = tx.get(path)
        if node is None:
            return None
        if op == _WRITE:
            tx.set_value(path, node, payload[i + 1 :], payload)  # (a remembered path is absolute: the payload is its record)
            tx.firings.append((path, False, ()))  # fired at commit
            return OK
        return node.value if op == _READ else node.children_bytes()

    def complete_introduce(self, token: int, error: str | None = None) -> list[Delivery]:
        """Finish a deferred INTRODUCE (``Introduced.pending == token``).

        ``error is None``: the ring is mapped and the channel bound, so the
        domain is introduced now (``@introduceDomain`` fires, its guest
        connections start afresh) and OK is the reply.  Otherwise ``error``
        (an errno name, e.g. from the failed map or bind; names without a
        XenStore wire name, like ESRCH, go out as EINVAL, as cxenstored's
        ``send_error`` does) is the reply and the domain stays unknown.
        Returns the deliveries: events, the reply (unless its connection
        closed meanwhile), then the output of the connection's held
        requests, which are processed now.  An unknown or already completed
        token: ``[]``."""
        pending = self._introductions.pop(token, None)
        if pending is None:
            return []
        conn, packet = pending.conn, pending.packet
        domain = self.domains.get(pending.domid)
        out: list[Delivery] = []
        if domain is not None:
            domain.introducing = False
        if error is None and domain is not None:
            self._out = out
            self._set_introduced(domain, pending.gfn, pending.port)
            reply = Packet(packet.op, packet.req_id, packet.tx_id, OK)
        else:
            if pending.created and domain is not None and not domain.introduced:
                self.domains.forget(pending.domid)
            reply = packet.error_reply(error if error in ERROR_NAMES else _EINVAL)
        if conn.alive:
            out.append((conn, reply))
        held = self._held.pop(conn, None)
        if held and conn.alive:
            for i, later in enumerate(held):
                out += self.handle(conn, later)
                waiting = self._held.get(conn)
                if waiting is not None:  # another deferred INTRODUCE: the rest waits again
                    waiting += held[i + 1 :]
                    break
        return out

    def introduce_pending(self, token: int) -> bool:
        """Does a deferred INTRODUCE wait for ``complete_introduce(token)``?"""
        return token in self._introductions

    def take_changes(self) -> list[Change]:
        """Committed store mutations since the last call (to journal)."""
        return self.store.take_journal()

    def take_effects(self) -> list:
        """Side effects for the I/O layer (:class:`Introduced`, :class:`Released`)."""
        effects = self.pending_effects
        self.pending_effects = []
        return effects

    def domain_died(self, domid: int) -> list[Delivery]:
        """The hypervisor says ``domid`` is dying or gone: tear it down like
        RELEASE (nodes it owns are deleted with RM-style events, then
        @releaseDomain).  Returns the watch events."""
        out = self._out = []
        if domid != 0 and self.domains.is_introduced(domid):
            self._destroy_domain(domid)
        return out

    def domain_shutdown(self, domid: int) -> list[Delivery]:
        """The domain shut down or crashed (not yet dead): fire @releaseDomain
        once per shutdown (RESUME re-arms it)."""
        out = self._out = []
        domain = self.domains.get(domid)
        if domain is not None and domain.introduced and not domain.shutdown_reported:
            domain.shutdown_reported = True
            self.watches.fire_special("@releaseDomain", self.domains.release_perms, out)
        return out

    def statistics(self) -> dict[str, int]:
        return {
            "nodes": len(self.store.nodes),
            "watches": len(self.watches),
            "transactions": sum(len(c.transactions) for c in self._conns.values()),
            "connections": len(self._conns),
            "domains": sum(1 for d in self.domains if d.introduced),
            "introducing": len(self._introductions),
            "generation": self.store.generation,
            "internal_errors": self.internal_errors,
        }

    def domain_usage(self, domid: int) -> dict[str, int]:
        """Per-domain resource counts (``xenstore-control quota <domid>``).
        ``outstanding`` is the daemon's, reported as 0 here.  ``memory`` of
        dom0 (not tracked: exempt) is computed from scratch."""
        conns = [c for c in self._conns.values() if c.domid == domid]
        if domid:
            memory = self.memory.usage(domid)
        else:
            memory = recompute({p: n for p, n in self.store.nodes.items() if not n.perms.owner}, conns).get(0, 0)
        return {
            "nodes": self.store.owner_counts.get(domid, 0),
            "watches": sum(len(c.watches) for c in conns),
            "transactions": sum(len(c.transactions) for c in conns),
            "outstanding": 0,
            "memory": memory,
        }

    def quota(self, name: str, domid: int, soft: bool = False) -> int:
        """Effective quota (4.17 name) for a domain: its override or the global value."""
        domain = self.domains.get(domid)
        if domain is not None and domain.quotas:
            value = domain.quotas.get((name, soft))
            if value is not None:
                return value
        return self.limits.get(name, soft)

    def _memory_levels(self, domid: int) -> tuple[int, int]:
        """(hard, soft) memory quota of a domain, for the ledger's reports."""
        domain = self.domains.get(domid)
        if domain is not None and domain.quotas:
            return self.quota("memory", domid), self.quota("memory", domid, True)
        return self.limits.memory, self.limits.memory_soft

    # --------------------------------------------------------- node lookup

    def _layer(self, tx: Transaction | None) -> Store | Overlay:
        return self.store if tx is None else tx

    def _path(self, conn: Connection, raw: str) -> str:
        return resolve(raw, conn.home, self.limits.path_max)

    def _node_arg(self, conn: Connection, arg: bytes) -> str:
        """The node path named by ``arg``, one NUL-terminated string (``onearg``)."""
        return self._arg_paths.resolve(arg, conn.home, self.limits.path_max)

    def _find(self, conn: Connection, layer: Store | Overlay, path: str, perm: int) -> Node | None:
        """cxenstored ``get_node``: the node if the caller has ``perm`` on it;
        ``None`` if it is missing and the nearest existing ancestor grants
        ``perm`` (ENOENT for reads, "may create" for writes); else EACCES."""
        node = layer.get(path)
        if node is not None:
            if conn.privileged or (self._access(conn, node) & perm) == perm:
                return node
            if layer is not self.store and path != "/":
                layer.get(parent_of(path))  # cxenstored asks the parent too: a transaction records it
            raise _err("EACCES")
        if conn.privileged and layer is self.store:
            return None
        # Walk up (in a transaction this also records the ancestors read).
        for anc in ancestors(path):
            node = layer.get(anc)
            if node is not None:
                break
        if conn.privileged or node is None or self._access(conn, node) & perm:
            return None
        raise _err("EACCES")

    def _access(self, conn: Connection, node: Node) -> int:
        """An unprivileged caller's access bits on ``node``.  As cxenstored
        (``domain_adjust_node_perms``), an entry naming the caller or its
        target counts only if that domain was known when the node was last
        written: a new domain reusing a dead one's domid does not inherit
        its rights.  Nodes restored from disk count every entry (the domain
        table is not persisted, so who was known then is not either)."""
        generation = node.generation
        if generation <= self._restored_generation:
            return node.perms.access(conn.domid, conn.target)
        known_at = self.domains.known_at
        ignored = tuple(d for d in (conn.domid, conn.target) if d is not None and not known_at(d, generation))
        return node.perms.access(conn.domid, conn.target, ignored)

    def _get(self, conn: Connection, tx: Transaction | None, path: str, perm: int) -> Node:
        if tx is None and conn.privileged:  # the common case: one dict lookup
            node = self.store.nodes.get(path)
        else:
            node = self._find(conn, self._layer(tx), path, perm)
        if node is None:
            raise _err("ENOENT")
        return node

    # -------------------------------------------------------------- firing

    def _fire(self, tx: Transaction | None, path: str, exact: bool = False, extra: tuple = ()) -> None:
        """A change at ``path``: fire now, or at commit inside a transaction."""
        if tx is not None:
            tx.firings.append((path, exact, extra))
        elif self.watches.by_path:
            self.watches.fire(path, exact, lambda: self._visible_perms(path, extra), self._out)

    def _visible_perms(self, path: str, extra: tuple) -> Iterable[Perms]:
        """Permission lists that let a watcher see an event (watch_permitted):
        the extra ones (old perms, perms of a deleted node), the node's, its
        parent's."""
        yield from extra
        nodes = self.store.nodes
        node = nodes.get(path)
        if node is not None:
            yield node.perms
        if path != "/":
            parent = nodes.get(parent_of(path))
            if parent is not None:
                yield parent.perms

    # ------------------------------------------------------------- quotas

    def _check_create(self, conn: Connection, layer, top_path: str, top: Node, entry_len: int, new: int, leaf_len: int, perms: Perms) -> None:
        """Quotas of an unprivileged caller creating ``new`` nodes under
        ``top`` (at ``top_path``), whose child list grows by ``entry_len``
        bytes."""
        domid = conn.domid
        limit = self.quota("nodes", domid)
        if limit and layer.owner_count(domid) + new > limit:
            raise _err("ENOSPC")
        limit = self.quota("node-size", domid)
        if limit and (
            record_size(leaf_len, perms, 0) >= limit
            or record_size(len(top.value), top.perms, children_len(top_path, top.children) + entry_len) >= limit
        ):
            raise _err("ENOSPC")

    def _check_memory(self, layer, domid: int, delta: int, error: str = "EIO") -> None:
        """Memory quota (memory.py, cxenstored domain_memory_add_chk): refuse
        a charge that would bring an unprivileged domain to its hard limit.
        In a transaction the transaction's domain pays for its records."""
        if layer is not self.store:
            domid = layer.charge_to
        if domid and self.memory.exceeds(domid, delta, self._memory_levels(domid)[0]):
            raise _err(error)

    # ------------------------------------------------------------ handlers
    # Each takes (conn, packet, tx) and returns the reply payload or raises
    # XenStoreError.

    def _read(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        path = self._node_arg(conn, packet[3])
        return self._get(conn, tx, path, READ).value

    def _write(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        payload = packet.payload
        i = payload.find(b"\0")
        if i < 0:
            raise _err(_EINVAL)
        path = self._node_arg(conn, payload[: i + 1])
        value = payload[i + 1 :]
        if tx is None:
            layer = self.store
            # dom0 outside a transaction (most writes): one lookup, as _find would do.
            node = layer.nodes.get(path) if conn.privileged else self._find(conn, layer, path, WRITE)
        else:
            layer = tx
            node = self._find(conn, layer, path, WRITE)
        if node is None:
            self._create(conn, layer, path, value)
        else:
            if not conn.privileged:
                limit = self.quota("node-size", conn.domid)
                if limit and record_size(len(value), node.perms, children_len(path, node.children)) >= limit:
                    raise _err("ENOSPC")
            if node.perms.owner if tx is None else layer.charge_to:  # memory quota (dom0 is exempt)
                self._check_memory(layer, node.perms.owner, len(value) - len(node.value))
            layer.set_value(path, node, value)
        self._fire(tx, path)
        return OK

    def _create(self, conn: Connection, layer, path: str, value: bytes) -> None:
        """Create ``path`` and its missing ancestors; each new node copies its
        parent's permissions, owned by an unprivileged creator (cxenstored)."""
        missing = [path]
        p = path
        while True:
            p = parent_of(p)
            top = layer.get(p)
            if top is not None:
                break
            missing.append(p)
        perms = top.perms
        if not conn.privileged:
            perms = perms.with_owner(conn.domid)
            first = missing[-1]
            self._check_create(conn, layer, p, top, len(first) - first.rfind("/"), len(missing), len(value), perms)
        if (perms.owner or top.perms.owner) if layer is self.store else layer.charge_to:  # memory quota (dom0 is exempt)
            records, grown = creation_memory(missing, len(value), len(perms))
            if layer is not self.store:
                self._check_memory(layer, 0, records + len(missing) * layer.tag + grown)
            elif perms.owner == top.perms.owner:
                self._check_memory(layer, perms.owner, records + grown)
            else:
                self._check_memory(layer, perms.owner, records)
                self._check_memory(layer, top.perms.owner, grown)
        for p in reversed(missing[1:]):
            layer.put(p, b"", perms)
        layer.put(path, value, perms)

    def _mkdir(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        path = self._node_arg(conn, packet[3])
        layer = self._layer(tx)
        if self._find(conn, layer, path, WRITE) is None:
            self._create(conn, layer, path, b"")
            self._fire(tx, path)
        return OK

    def _rm(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        path = self._node_arg(conn, packet[3])
        layer = self._layer(tx)
        node = self._find(conn, layer, path, WRITE)
        if node is None:
            # Missing is fine if the parent exists.
            if path != "/" and layer.get(parent_of(path)) is not None:
                return OK
            raise _err("ENOENT")
        if path == "/":
            raise _err(_EINVAL)
        self._remove(tx, layer, path)
        return OK

    def _remove(self, tx: Transaction | None, layer, path: str) -> None:
        """Delete a subtree; fire like cxenstored: watches on each removed node
        below ``path`` with their own path (exact), then ``path`` itself for
        its own and its ancestors' watches."""
        parent = layer.get(parent_of(path))
        if parent is None:  # a transaction whose view the live tree broke
            raise _err("EAGAIN")
        removed = layer.delete(path)
        if tx is None and not self.watches.by_path:
            return
        perms_of = {p: n.perms for p, n in removed}
        perms_of[parent_of(path)] = parent.perms
        for p, n in removed:
            extra = (n.perms, perms_of[parent_of(p)])
            if p != path:
                if tx is not None or self.watches.is_watched(p):
                    self._fire(tx, p, True, extra)
            else:
                self._fire(tx, p, False, extra)

    def _directory(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        path = self._node_arg(conn, packet[3])
        return self._get(conn, tx, path, READ).children_bytes()

    def _directory_part(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        payload = packet.payload
        if payload.count(b"\0") != 2:
            raise _err(_EINVAL)
        raw, offset_text = _strings(payload)
        node = self._get(conn, tx, self._path(conn, raw), READ)
        offset = c_atoi(offset_text) & 0xFFFFFFFF
        gen = str(node.generation).encode() + b"\0"
        children = node.children_bytes()
        if offset >= len(children):
            return gen + b"\0"
        maxlen = PAYLOAD_MAX - len(gen) - 1
        end = offset
        total = len(children)
        # Whole names only, as many as fit (cxenstored send_directory_part).
        while True:
            nul = children.find(b"\0", end)
            if (nul - offset) >= maxlen:  # len + strlen(child) < maxlen fails
                break
            end = nul + 1
            if end == total:
                break
        part = children[offset:end]
        if end == total:
            part += b"\0"
        return gen + part

    def _get_perms(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        path = self._node_arg(conn, packet[3])
        return self._get(conn, tx, path, READ).perms.wire

    def _set_perms(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        payload = packet.payload
        count = payload.count(b"\0")
        if count < 2:
            raise _err(_EINVAL)
        nperms = count - 1
        if not conn.privileged:
            limit = self.quota("permissions", conn.domid)
            if limit and nperms > limit:
                raise _err("ENOSPC")
        strings = _strings(payload)
        perms = Perms.parse(strings[1 : 1 + nperms])
        if not self.domains.exists(perms.owner):
            raise _err("ENOENT")
        for domid in perms.domids():  # cxenstored domain_alloc_permrefs (unknown domids: ignored entries)
            self.domains.find_or_alloc(domid, self.store.generation)
        raw = strings[0]
        if raw[:1] == "@":
            current = self.domains.special_perms(raw)
            if current is None:
                raise _err(_EINVAL)
            if not conn.privileged and (current.access(conn.domid, conn.target) & (WRITE | OWNER)) != (WRITE | OWNER):
                raise _err("EACCES")
            self.domains.set_special_perms(raw, perms)
            return OK
        path = self._path(conn, raw)
        layer = self._layer(tx)
        node = self._get(conn, tx, path, WRITE | OWNER)
        old = node.perms
        if not conn.privileged:
            if perms.owner != old.owner:
                raise _err("EPERM")
            limit = self.quota("node-size", conn.domid)
            if limit and record_size(len(node.value), perms, children_len(path, node.children)) >= limit:
                raise _err("ENOSPC")
        if perms.owner if tx is None else layer.charge_to:  # memory quota: the (new) owner pays; dom0 is exempt
            grown = PERM_ENTRY * (len(perms) - len(old))
            if perms.owner != old.owner and layer is self.store:
                grown = node_memory(path, node) + grown
            self._check_memory(layer, perms.owner, grown)
        layer.put(path, node.value, perms)
        self._fire(tx, path, False, (old,))
        return OK

    def _watch(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        payload = packet.payload
        if payload.count(b"\0") != 2:
            raise _err(_EINVAL)
        raw, token_text = _strings(payload)
        path, relative = resolve_watch_path(raw, conn.home, self.limits.path_max)
        token = token_text.encode("latin-1")
        if (path, token) in conn.watches:
            raise _err("EEXIST")
        if not conn.privileged:
            limit = self.quota("watches", conn.domid)
            if limit and self.domain_usage(conn.domid)["watches"] >= limit:
                raise _err("E2BIG")  # cxenstored 4.17 (newer: ENOSPC)
        if conn.domid:  # memory quota
            self._check_memory(self.store, conn.domid, watch_memory(path, token), "ENOMEM")
        watch = self.watches.add(conn, path, token, relative)
        event = watch.event(path)
        if event is not None:
            self._after = [(conn, event)]
        return OK

    def _unwatch(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        payload = packet.payload
        if payload.count(b"\0") != 2:
            raise _err(_EINVAL)
        raw, token_text = _strings(payload)
        # Resolved like canonicalize(), not validated (cxenstored).
        path = raw if raw[:1] in ("/", "@") else f"{conn.home}/{raw}"
        watch = conn.watches.get((path, token_text.encode("latin-1")))
        if watch is None:
            raise _err("ENOENT")
        self.watches.remove(watch)
        return OK

    def _reset_watches(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        self._reset_connection(conn)
        return OK

    def _reset_connection(self, conn: Connection) -> None:
        self.watches.remove_all(conn)
        for tx in conn.transactions.values():
            tx.close()  # memory quota
        conn.transactions.clear()

    def _transaction_start(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        if tx is not None:
            raise _err("EBUSY")
        max_nodes = 0
        if not conn.privileged:
            limit = self.quota("transactions", conn.domid)
            if limit and len(conn.transactions) >= limit:
                raise _err("ENOSPC")
            max_nodes = self.quota("transaction-nodes", conn.domid)
        return self._open_transaction(conn, max_nodes)

    def _open_transaction(self, conn: Connection, max_nodes: int) -> bytes:
        """Start a transaction (the caller checked the quotas); the reply payload."""
        tx_id = allocate_id(conn)
        conn.transactions[tx_id] = Transaction(tx_id, conn, self.store, max_nodes)
        return b"%d\0" % tx_id

    def _transaction_end(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        arg = packet[3]  # onearg "T" (commit) or "F" (abort)
        if arg != b"T\0" and arg != b"F\0":
            raise _err(_EINVAL)
        if tx is None:
            raise _err("ENOENT")
        return self._end_transaction(conn, tx, arg)

    def _end_transaction(self, conn: Connection, tx: Transaction, arg: bytes, *, checked: bool = False) -> bytes:
        """Commit (``arg`` b"T\\0") or abort ``tx``; it is gone either way.
        ``checked``: the caller has just found it free of conflicts and of
        watches to fire."""
        del conn.transactions[tx.id]
        tx.close()  # memory quota: its records go; a commit charges the owners
        if arg == b"F\0":
            return OK
        if not checked and tx.conflicts():
            raise _err("EAGAIN")
        if not conn.privileged and tx.owner_delta.get(conn.domid, 0) > 0:
            limit = self.quota("nodes", conn.domid)
            if limit and tx.owner_count(conn.domid) > limit:
                raise _err("ENOSPC")
        if checked or not (tx.firings and self.watches.by_path):
            tx.commit()
            return OK
        # cxenstored fires once per node the transaction changed, in order
        # of first change; "exact" (subtree-removal) only if every change of
        # that node was; nothing for a node that neither existed before nor
        # exists after the commit.
        merged: dict[str, list] = {}
        for path, exact, extra in tx.firings:
            m = merged.get(path)
            if m is None:
                merged[path] = [exact, extra]
            else:
                m[0] = m[0] and exact
                m[1] = m[1] + extra
        nodes = self.store.nodes
        existed = {path for path in merged if path in nodes}
        tx.commit()
        fire = self.watches.fire
        out = self._out
        for path, (exact, extra) in merged.items():
            if path in existed or path in nodes:
                fire(path, exact, lambda: self._visible_perms(path, extra), out)
        return OK

    # ------------------------------------------------------- domain ops

    def _get_domain_path(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        domid = c_atoi(_onearg(packet.payload)) & 0xFFFFFFFF
        return b"/local/domain/%d\0" % domid

    def _introduce(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        args = _strings(packet.payload)
        if len(args) < 3:
            raise _err(_EINVAL)
        domid = c_atoi(args[0])
        gfn = c_atoi(args[1])
        port = c_atoi(args[2])
        if port <= 0:
            raise _err(_EINVAL)
        if domid == 0:
            return OK  # the master domain is introduced at start-up
        if domid < 0 or not self.domains.exists(domid):
            raise _err(_EINVAL)  # cxenstored: ESRCH, which has no wire name
        created = self.domains.get(domid) is None
        domain = self.domains.find_or_alloc(domid, self.store.generation)
        if domain.introducing:
            raise _err("EBUSY")  # another connection's INTRODUCE of it is under way
        if not domain.introduced and self.defer_introduce:
            # The I/O layer maps and binds first; the reply waits (see module doc).
            self._next_token += 1
            token = self._next_token
            domain.introducing = True
            self._introductions[token] = _PendingIntroduce(conn, packet, domid, gfn, port, created)
            self._held[conn] = []
            self.pending_effects.append(Introduced(domid, gfn, port, token))
            raise _Deferred
        self.pending_effects.append(Introduced(domid, gfn, port))
        self._set_introduced(domain, gfn, port)
        return OK

    def _set_introduced(self, domain: Domain, gfn: int, port: int) -> None:
        """cxenstored introduce_domain after the map and bind: the guest's
        connections start afresh; @introduceDomain fires for a new domain."""
        new = not domain.introduced
        domain.introduced = True
        domain.gfn, domain.port = gfn, port
        domain.shutdown_reported = False
        for c in list(self._conns.values()):
            if c.domid == domain.domid and not c.privileged:
                self._reset_connection(c)
        if new:
            self.watches.fire_special("@introduceDomain", self.domains.introduce_perms, self._out)

    def _domain_arg(self, packet: Packet) -> int:
        """RELEASE/RESUME argument: a connected, non-zero domain."""
        domid = c_atoi(_onearg(packet.payload))
        if domid == 0:
            raise _err(_EINVAL)
        if not self.domains.is_introduced(domid):
            raise _err("ENOENT")
        return domid

    def _release(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        domid = self._domain_arg(packet)
        # cxenstored fires @releaseDomain from the domain's destructor, which
        # runs after the OK is queued; the node removal events come before.
        self._destroy_domain(domid, self._after)
        return OK

    def _destroy_domain(self, domid: int, release_out: list | None = None) -> None:
        """cxenstored destroy_domain: drop the domain's connections' watches
        and transactions, delete every node it owns (RM-style events) or,
        with ``keep_orphans``, give it to dom0 (silently, as cxenstored's
        raw node write), forget the domain, fire @releaseDomain."""
        for c in list(self._conns.values()):
            if c.domid == domid:
                self._reset_connection(c)
        store = self.store
        if store.owner_counts.get(domid, 0):
            nodes = store.nodes
            stack = ["/"]
            while stack:
                p = stack.pop()
                node = nodes.get(p)
                if node is None:
                    continue
                if p != "/" and node.perms.owner == domid:
                    if not self.keep_orphans:
                        self._remove(None, store, p)
                        continue
                    store.put(p, node.value, node.perms.with_owner(0))
                stack.extend(reversed(node.children))
        self.domains.forget(domid)
        for c in self._conns.values():
            if c.target == domid:
                c.target = None
        self.pending_effects.append(Released(domid))
        out = self._out if release_out is None else release_out
        self.watches.fire_special("@releaseDomain", self.domains.release_perms, out)

    def _is_domain_introduced(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        domid = c_atoi(_onearg(packet.payload))
        return b"T\0" if domid == DOMID_SELF or self.domains.is_introduced(domid) else b"F\0"

    def _resume(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        self.domains.get(self._domain_arg(packet)).shutdown_reported = False
        return OK

    def _set_target(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        args = _strings(packet.payload)
        if len(args) < 2:
            raise _err(_EINVAL)
        domid, target = c_atoi(args[0]), c_atoi(args[1])
        if not self.domains.is_introduced(domid) or not self.domains.is_introduced(target):
            raise _err("ENOENT")
        self.domains.get(domid).target = target
        for c in self._conns.values():
            if c.domid == domid:
                c.target = target
        return OK

    def _control(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        return run_control(
            _strings(packet.payload), self.limits, self.domains, self.domain_usage, self.control_state
        )

    def _get_feature(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        args = _strings(packet.payload)
        if not args:
            return b"%d\0" % self.features
        domain = self.domains.find_or_alloc(c_atoi(args[0]), self.store.generation)
        if domain is None:
            raise _err("ENOENT")
        return b"%d\0" % (domain.features & 0xFFFFFFFF)

    def _set_feature(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        args = _strings(packet.payload)
        if len(args) < 2:
            raise _err(_EINVAL)
        features = c_atoi(args[1]) & 0xFFFFFFFF
        domain = self.domains.find_or_alloc(c_atoi(args[0]), self.store.generation)
        if domain is None:
            raise _err("ENOENT")
        if domain.introduced or domain.introducing:
            raise _err("EBUSY")
        if features & ~self.features:
            raise _err(_EINVAL)
        domain.features = features
        return OK

    def _quota_domain(self, text: str):
        domid = parse_domid(text)
        if domid is None or text[:1] in ("-", "+", " "):
            raise _err(_EINVAL)
        domain = self.domains.find_or_alloc(domid, self.store.generation)
        if domain is None:
            raise _err("ENOENT")
        return domain

    def _get_quota(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        args = _strings(packet.payload)[:2]
        if not args:
            return " ".join(WIRE_QUOTA_NAMES).encode() + b"\0"
        domain = self._quota_domain(args[0]) if len(args) == 2 else None
        key = Limits.from_wire_name(args[-1])
        if key is None:
            raise _err(_EINVAL)
        if domain is None:
            return b"%d\0" % self.limits.get(*key)
        return b"%d\0" % self.quota(key[0], domain.domid, key[1])

    def _set_quota(self, conn: Connection, packet: Packet, tx: Transaction | None) -> bytes:
        args = _strings(packet.payload)[:3]
        if len(args) < 2:
            raise _err(_EINVAL)
        domain = self._quota_domain(args[0]) if len(args) == 3 else None
        key = Limits.from_wire_name(args[-2])
        value = c_atoi(args[-1])
        if key is None or value < 0:
            raise _err(_EINVAL)
        if domain is None:
            self.limits.set(key[0], value, key[1])
        else:
            domain.quotas[key] = value
        return OK
