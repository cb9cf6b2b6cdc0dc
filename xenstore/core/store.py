"""The node tree: live store and the copy-on-write transaction overlay.

The live :class:`Store` is a flat ``dict`` path -> :class:`Node`.  A global
generation counter bumps on every modification and the modified node (and a
parent whose child list changed) takes the new value, so a node's
generation tells whether it changed since a given moment (transaction
conflicts, ``DIRECTORY_PART``).

Both layers offer the same three primitives that the operations are written
against: ``get(path)``, ``put(path, value, perms)`` (create -- the parent
must exist -- or update) and ``delete(path)`` (whole subtree).  Every live
mutation is journaled as a *change record*, a plain msgpack-able object:

    ("set", path: str, value: bytes, perms: list[str])   create or update;
                                                          children untouched
    ("rm", path: str)                                     remove the subtree
    b"path\0value"                                        a new value for the
                                                          existing node at
                                                          path, perms kept

The last is the most common change, a WRITE of an existing node, in the
form of that WRITE's own payload: journaling it takes no encoding at all.

``Store.apply(record)`` replays one record with the same primitives, so a
transaction commit, journal replay and snapshot restore share one code path.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from ..wire import XenStoreError
from .memory import PERM_ENTRY, MemoryLedger, node_memory, transaction_tag
from .perms import Perms

__all__ = ["Node", "Store", "Overlay", "Change", "record_size", "value_record", "split_value_record"]

Change = tuple | bytes  # ("set", path, value, perms) | ("rm", path) | b"path\0value"

_ROOT_PERMS = Perms.owned_by(0)

#: The ``children`` of every live leaf: most nodes are leaves, and a dict
#: each would be a third of their memory.  Read-only, so a missed
#: copy-on-first-child fails loudly instead of corrupting every leaf.
NO_CHILDREN: Mapping[str, None] = MappingProxyType({})


class Children(dict):
    """A node's child list: the children's full paths in creation order
    (the very strings that key the store's ``nodes``, so a child costs its
    parent a dict slot and no name of its own), plus ``listing``, the
    cached ``DIRECTORY`` payload (``None``: not built since the last
    change: :meth:`Node.add_child` and :meth:`Node.remove_child` reset
    it).  (It lives here, not in the node, because most nodes are leaves: a
    slot less makes every node 16 bytes smaller.)"""

    __slots__ = ("listing",)

    def __init__(self, paths: Mapping[str, None] = NO_CHILDREN, listing: bytes | None = None) -> None:
        dict.__init__(self, paths)
        self.listing = listing


class Node:
    """One node.  ``children`` is its :class:`Children`, or the shared
    read-only empty ``NO_CHILDREN`` for a live leaf (the store swaps in a
    ``Children`` when the first child comes)."""

    __slots__ = ("value", "perms", "children", "generation")

    def __init__(self, value: bytes, perms: Perms, children: Mapping[str, None], generation: int) -> None:
        self.value = value
        self.perms = perms
        self.children = children
        self.generation = generation

    def add_child(self, path: str) -> None:
        """List the child at ``path`` (in a live leaf, the first child swaps
        a ``Children`` in for ``NO_CHILDREN``)."""
        children = self.children
        if children is NO_CHILDREN:
            children = self.children = Children()
        children[path] = None
        children.listing = None

    def remove_child(self, path: str) -> None:
        """Unlist the child at ``path`` (which is listed)."""
        children = self.children
        del children[path]
        children.listing = None

    def children_bytes(self) -> bytes:
        """The ``DIRECTORY`` payload: each name followed by a NUL (cached
        until the children change: directories are listed far more often
        than they change)."""
        children = self.children
        if not children:
            return b""
        listing = children.listing
        if listing is None:
            cut = next(iter(children)).rfind("/") + 1  # (siblings share the prefix)
            listing = children.listing = ("\0".join([child[cut:] for child in children]) + "\0").encode()
        return listing

    def __repr__(self) -> str:
        return f"Node({self.value!r}, {self.perms!r}, {list(self.children)}, gen={self.generation})"


def record_size(value_len: int, perms: Perms, childlen: int) -> int:
    """cxenstored's stored record size, what the ``node-size`` quota limits:
    24-byte header + 8 bytes per permission entry + value + the child list
    (``childlen`` bytes: see :func:`~.memory.children_len`)."""
    return 24 + 8 * len(perms) + value_len + childlen


def _copy(node: Node) -> Node:
    """A transaction's private copy of a live node (a leaf keeps the shared
    read-only ``NO_CHILDREN``: whoever adds a child swaps in a ``Children``)."""
    children = node.children
    return Node(node.value, node.perms, children if children is NO_CHILDREN else Children(children, children.listing), node.generation)


def value_record(path: str, value: bytes) -> bytes:
    """The change record of a new value for the existing node at ``path``."""
    return b"%s\0%s" % (path.encode("ascii"), value)


def split_value_record(record: bytes) -> tuple[str, bytes]:
    """``(path, value)`` of a :func:`value_record`; ``ValueError`` if it
    has no NUL or the path is not ASCII."""
    i = record.index(b"\0")
    return record[:i].decode("ascii"), record[i + 1 :]


def _split(path: str) -> tuple[str, str]:
    i = path.rfind("/")
    return (path[:i] if i > 0 else "/"), path[i + 1 :]


class Store:
    """The live tree.  ``journal`` collects change records of every mutation
    until the owner (the engine) takes them."""

    __slots__ = ("nodes", "generation", "journal", "owner_counts", "memory", "_perms_cache")

    def __init__(self, *, initial: bool = True) -> None:
        self.nodes: dict[str, Node] = {"/": Node(b"", _ROOT_PERMS, Children(), 0)}
        self.generation = 0
        self.journal: list[Change] = []
        #: Nodes owned per domid (entry 0 of the perms): the ``nodes`` quota.
        self.owner_counts: dict[int, int] = {0: 1}
        #: Bytes per unprivileged domain: the ``memory`` quota (memory.py).
        #: The store posts its node records; the engine adds watches and
        #: transactions to the same ledger.
        self.memory = MemoryLedger()
        self._perms_cache: dict[tuple[str, ...], Perms] = {}
        if initial:
            # cxenstored setup_structure(); journaled like any change so that a
            # journal alone rebuilds the tree from a bare root.
            self.put("/tool", b"", _ROOT_PERMS)
            self.put("/tool/xenstored", b"", _ROOT_PERMS)

    # -- the three primitives -------------------------------------------------

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def put(self, path: str, value: bytes, perms: Perms) -> bool:
        """Create or update; returns True if the node was created."""
        gen = self.generation = self.generation + 1
        node = self.nodes.get(path)
        counts = self.owner_counts
        if node is None:
            parent_path, name = _split(path)
            parent = self.nodes[parent_path]
            parent.add_child(path)
            parent.generation = gen
            self.nodes[path] = Node(value, perms, NO_CHILDREN, gen)
            counts[perms.owner] = counts.get(perms.owner, 0) + 1
            if perms.owner or parent.perms.owner:  # memory quota: dom0 is not tracked
                self.memory.node_created(path, len(value), perms, parent.perms.owner, len(name) + 1)
            created = True
        else:
            old_owner = node.perms.owner
            if old_owner != perms.owner:
                counts[old_owner] -= 1
                counts[perms.owner] = counts.get(perms.owner, 0) + 1
            if old_owner or perms.owner:  # memory quota: dom0 is not tracked
                self.memory.node_updated(path, node, len(value), perms)
            node.value = value
            node.perms = perms
            node.generation = gen
            created = False
        self.journal.append(("set", path, value, list(perms.strings)))
        return created

    def set_value(self, path: str, node: Node, value: bytes, record: bytes | None = None) -> None:
        """``put`` of a new value into the existing ``node`` at ``path``,
        keeping its permissions (the common write, with less to do).
        ``record``: ``path`` NUL ``value``, if the caller has it at hand (a
        WRITE's payload), to journal as it is."""
        if node.perms.owner:  # memory quota: dom0 is not tracked
            self.memory.node_updated(path, node, len(value), node.perms)
        node.value = value
        node.generation = self.generation = self.generation + 1
        self.journal.append(record if record is not None else value_record(path, value))

    def delete(self, path: str) -> list[tuple[str, Node]]:
        """Remove ``path`` and its subtree (the node must exist, not ``/``).

        Returns the removed ``(path, node)`` pairs children first, the
        removed node last (the order cxenstored fires their watches in)."""
        removed = list(self.iter_subtree_postorder(path))
        nodes = self.nodes
        counts = self.owner_counts
        memory = self.memory
        for p, n in removed:
            del nodes[p]
            counts[n.perms.owner] -= 1
            if n.perms.owner:  # memory quota: dom0 is not tracked
                memory.node_removed(p, n)
        parent_path, name = _split(path)
        parent = nodes[parent_path]
        parent.remove_child(path)
        if parent.perms.owner:
            memory.add(parent.perms.owner, -len(name) - 1)
        parent.generation = self.generation = self.generation + 1
        self.journal.append(("rm", path))
        return removed

    def iter_subtree_postorder(self, path: str) -> Iterator[tuple[str, Node]]:
        """``(path, node)`` of the subtree, children before parents.
        Iterative: the depth is peer-controlled."""
        nodes = self.nodes
        stack = [(path, nodes[path], False)]
        while stack:
            p, n, expanded = stack.pop()
            if expanded or not n.children:
                yield p, n
                continue
            stack.append((p, n, True))
            for child in reversed(n.children):
                stack.append((child, nodes[child], False))

    # -- persistence ------------------------------------------------------------

    def apply(self, change: Change) -> None:
        """Replay one change record (journal replay, restore)."""
        if type(change) is bytes:
            path, value = split_value_record(change)
            node = self.nodes.get(path)
            if node is None:
                raise ValueError(f"value record for {path!r}, which does not exist")
            self.set_value(path, node, value, change)
            return
        kind = change[0]
        if kind == "set":
            _, path, value, strings = change
            key = tuple(strings)
            perms = self._perms_cache.get(key)
            if perms is None:
                perms = self._perms_cache[key] = Perms.parse(key)
            if path == "/" or path in self.nodes or _split(path)[0] in self.nodes:
                self.put(path, bytes(value), perms)
            else:
                raise ValueError(f"change record for {path!r} before its parent")
        elif kind == "rm":
            path = change[1]
            if path != "/" and path in self.nodes:
                self.delete(path)
        else:
            raise ValueError(f"unknown change record {change!r}")

    def snapshot(self) -> list[Change]:
        """The whole tree as ``set`` records, parents before children, children
        in creation order (so a restore keeps ``DIRECTORY`` order)."""
        out: list[Change] = []
        nodes = self.nodes
        stack = ["/"]
        while stack:
            p = stack.pop()
            n = nodes[p]
            out.append(("set", p, n.value, list(n.perms.strings)))
            stack.extend(reversed(n.children))
        return out

    @classmethod
    def from_changes(cls, records: Iterable[Change]) -> "Store":
        """A store rebuilt from a bare root by replaying ``records`` (a
        snapshot, a journal, or a snapshot followed by a journal)."""
        store = cls(initial=False)
        for record in records:
            store.apply(record)
        store.journal.clear()
        return store

    def owner_count(self, domid: int) -> int:
        """Nodes owned by ``domid`` (the ``nodes`` quota counts these)."""
        return self.owner_counts.get(domid, 0)

    def take_journal(self) -> list[Change]:
        journal = self.journal
        self.journal = []
        return journal

    def __len__(self) -> int:
        return len(self.nodes)


class Overlay:
    """A transaction's copy-on-write view over the live store (O(1) start).

    ``nodes`` holds the transaction's private view (``None`` = absent):
    like cxenstored, a live node is copied (or its absence noted) at the
    transaction's *first access* and the transaction sees that from then
    on; a node it has not touched yet is read from the live store.  ``seen``
    records the generation (``None`` = absent) of every live node at first
    access.  The commit fails if any recorded node changed in the live
    store since (optimistic concurrency control validated at commit: a
    committed transaction read values that were all still current when it
    committed).  A transaction whose recorded nodes changed can see a view
    mixing old and new state; it can never commit.
    """

    __slots__ = ("live", "nodes", "seen", "ops", "owner_delta", "max_seen", "charge_to", "memory", "started")

    def __init__(self, live: Store, max_seen: int = 0, charge_to: int = 0) -> None:
        self.live = live
        self.nodes: dict[str, Node | None] = {}
        self.seen: dict[str, int | None] = {}
        #: ("set", path, value, Perms, value record or None) | ("rm", path)
        self.ops: list[tuple] = []
        self.owner_delta: dict[int, int] = {}
        #: transaction-nodes quota (0 = unlimited); ENOSPC when exceeded.
        self.max_seen = max_seen
        #: Memory quota (memory.py): the domain charged for this view's node
        #: copies (cxenstored's transaction records; 0 = dom0, not tracked),
        #: the bytes charged so far, and the generation at the start (which
        #: names the copies: see ``tag``).
        self.charge_to = charge_to
        self.memory = 0
        self.started = live.generation

    @property
    def tag(self) -> int:
        """Each node copy's extra key bytes (memory.transaction_tag)."""
        return transaction_tag(self.started)

    def get(self, path: str) -> Node | None:
        nodes = self.nodes
        if path in nodes:
            return nodes[path]
        node = self.live.nodes.get(path)
        seen = self.seen
        if path not in seen:
            if self.max_seen and len(seen) >= self.max_seen:
                raise XenStoreError("ENOSPC")
            # cxenstored copies a node into the transaction at first access
            # (or notes its absence); the transaction sees that from then on.
            if node is None:
                seen[path] = nodes[path] = None
            else:
                seen[path] = node.generation
                node = nodes[path] = _copy(node)
                if self.charge_to:  # memory quota: the copy is charged, unchecked
                    self._charge(node_memory(path, node) + self.tag)
        return node

    def _own(self, path: str, node: Node | None) -> Node:
        """The transaction's private, mutable copy of a node it sees (the
        copy made at first access, or a new one for a node it created)."""
        if node is None:
            # Only reachable when the live tree moved under this transaction
            # (it will fail at commit anyway).
            raise XenStoreError("EAGAIN")
        mine = self.nodes.get(path)
        if mine is None:
            mine = self.nodes[path] = _copy(node)
            if self.charge_to:  # memory quota
                self._charge(node_memory(path, mine) + self.tag)
        return mine

    def set_value(self, path: str, node: Node, value: bytes, record: bytes | None = None) -> None:
        """``put`` of a new value into ``node``, the transaction's own copy of
        ``path`` (what ``get`` returned), keeping its permissions.
        ``record``: as for :meth:`Store.set_value` (journaled at commit)."""
        if self.charge_to:  # memory quota
            self._charge(len(value) - len(node.value))
        node.value = value
        node.generation = self.live.generation = self.live.generation + 1
        self.ops.append(("set", path, value, node.perms, record))

    def put(self, path: str, value: bytes, perms: Perms) -> bool:
        gen = self.live.generation = self.live.generation + 1
        node = self.get(path)
        delta = self.owner_delta
        if node is None:
            parent_path, name = _split(path)
            parent = self._own(parent_path, self.get(parent_path))
            if self.charge_to and path not in parent.children:  # memory quota: a longer child list
                self._charge(len(name) + 1)
            parent.add_child(path)
            parent.generation = gen
            self.nodes[path] = Node(value, perms, NO_CHILDREN, gen)
            delta[perms.owner] = delta.get(perms.owner, 0) + 1
            if self.charge_to:  # memory quota: the new record
                self._charge(node_memory(path, self.nodes[path]) + self.tag)
            created = True
        else:
            if node.perms.owner != perms.owner:
                delta[node.perms.owner] = delta.get(node.perms.owner, 0) - 1
                delta[perms.owner] = delta.get(perms.owner, 0) + 1
            # (``get`` returns the transaction's own copy of an existing node)
            if self.charge_to:  # memory quota
                self._charge(len(value) - len(node.value) + PERM_ENTRY * (len(perms) - len(node.perms)))
            node.value = value
            node.perms = perms
            node.generation = gen
            created = False
        self.ops.append(("set", path, value, perms, None))
        return created

    def delete(self, path: str) -> list[tuple[str, Node]]:
        removed = list(self.iter_subtree_postorder(path))  # records every node first
        parent_path, name = _split(path)
        parent = self._own(parent_path, self.get(parent_path))
        delta = self.owner_delta
        for p, n in removed:
            self.nodes[p] = None
            delta[n.perms.owner] = delta.get(n.perms.owner, 0) - 1
            if self.charge_to:  # memory quota: the copy goes
                self._charge(-node_memory(p, n) - self.tag)
        if path in parent.children:  # (absent only if the live tree moved under us)
            if self.charge_to:
                self._charge(-len(name) - 1)
            parent.remove_child(path)
        parent.generation = self.live.generation = self.live.generation + 1
        self.ops.append(("rm", path))
        return removed

    def iter_subtree_postorder(self, path: str) -> Iterator[tuple[str, Node]]:
        # Collect first (every get() may raise the transaction-nodes quota)
        # so that a failure leaves nothing half-done.
        out = []
        stack = [(path, self.get(path), False)]
        while stack:
            p, n, expanded = stack.pop()
            if n is None:  # the live tree moved under this transaction (it cannot commit)
                continue
            if expanded or not n.children:
                out.append((p, n))
                continue
            stack.append((p, n, True))
            for child in reversed(n.children):
                stack.append((child, self.get(child), False))
        return iter(out)

    def owner_count(self, domid: int) -> int:
        return self.live.owner_counts.get(domid, 0) + self.owner_delta.get(domid, 0)

    def _charge(self, delta: int) -> None:
        self.memory += delta
        self.live.memory.add(self.charge_to, delta)

    def release(self) -> None:
        """The transaction ended (committed, failed or dropped): give its
        records' memory back.  Idempotent."""
        if self.memory:
            self.live.memory.add(self.charge_to, -self.memory)
            self.memory = 0

    def conflicts(self) -> bool:
        """True if committing now would break isolation (-> EAGAIN)."""
        live = self.live.nodes
        for path, gen in self.seen.items():
            node = live.get(path)
            if (node.generation if node is not None else None) != gen:
                return True
        return False

    def commit(self) -> None:
        """Replay the transaction's mutations into the live store (which
        journals them).  Call only after :meth:`conflicts` said False."""
        live = self.live
        nodes = live.nodes
        for op in self.ops:
            if op[0] == "set":
                node = nodes.get(op[1])
                if node is not None and node.perms is op[3]:
                    live.set_value(op[1], node, op[2], op[4])  # (the usual: a new value)
                else:
                    live.put(op[1], op[2], op[3])
            else:
                live.delete(op[1])
