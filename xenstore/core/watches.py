"""Watch registry indexed by path, and event generation.

A watch on ``W`` fires for a change at ``P`` if ``P == W`` or ``P`` is below
``W`` (``W == "/"`` covers everything).  Firing looks up the changed path and
each of its ancestors in a dict, so the cost of a change depends on the depth
of the path, never on the number of unrelated watches.  ``exact`` firings
(watches inside a removed subtree, special ``@`` events) look up one path.
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..wire import PAYLOAD_MAX, Op, Packet
from .connection import Connection
from .memory import MemoryLedger, watch_memory
from .paths import ancestors
from .perms import READ, Perms

__all__ = ["Watch", "WatchRegistry"]

_WATCH_EVENT = Op.WATCH_EVENT


def _order(watch: "Watch") -> tuple[int, int]:
    return watch.order


class Watch:
    __slots__ = ("conn", "path", "token", "strip", "order")

    def __init__(self, conn: Connection, path: str, token: bytes, relative: bool, seq: int = 0) -> None:
        self.conn = conn
        #: cxenstored fires by connection (oldest first), then by watch age.
        self.order = (conn.id, seq)
        self.path = path
        self.token = token
        #: characters to strip from event paths of a relative watch
        #: ("/local/domain/<domid>/"), 0 for absolute and @ watches.
        self.strip = len(conn.home) + 1 if relative else 0

    def event(self, path: str) -> Packet | None:
        """The WATCH_EVENT packet for a change at ``path`` (None if too big:
        cxenstored drops events over the payload limit)."""
        if self.strip:
            path = path[self.strip :]
        payload = path.encode("latin-1") + b"\0" + self.token + b"\0"
        if len(payload) > PAYLOAD_MAX:
            return None
        return Packet(_WATCH_EVENT, 0, 0, payload)

    def __repr__(self) -> str:
        return f"Watch({self.path!r}, {self.token!r}, conn={self.conn.id})"


class WatchRegistry:
    """All watches of all connections, by resolved path."""

    __slots__ = ("by_path", "version", "_count", "_seq", "memory")

    def __init__(self, memory: MemoryLedger | None = None) -> None:
        #: resolved path -> watches on it (read-only outside this class; an
        #: empty dict means "nothing to fire", checked on the hot path).
        self.by_path: dict[str, list[Watch]] = {}
        #: Bumped whenever a watch comes or goes (what :meth:`covers` said
        #: of a path holds while this stays the same).
        self.version = 0
        self._count = 0
        self._seq = 0
        #: Memory quota: each watch is charged to its connection's domain.
        self.memory = memory

    def __len__(self) -> int:
        return self._count

    def add(self, conn: Connection, path: str, token: bytes, relative: bool) -> Watch:
        """Register (caller checked EEXIST and quota)."""
        self._seq += 1
        self.version += 1
        watch = Watch(conn, path, token, relative, self._seq)
        self.by_path.setdefault(path, []).append(watch)
        conn.watches[(path, token)] = watch
        self._count += 1
        if conn.domid and self.memory is not None:  # memory quota: dom0 is not tracked
            self.memory.add(conn.domid, watch_memory(path, token))
        return watch

    def remove(self, watch: Watch) -> None:
        lst = self.by_path.get(watch.path)
        if lst is None or watch not in lst:
            return  # idempotent
        lst.remove(watch)
        self.version += 1
        if not lst:
            del self.by_path[watch.path]
        watch.conn.watches.pop((watch.path, watch.token), None)
        self._count -= 1
        if watch.conn.domid and self.memory is not None:  # memory quota
            self.memory.add(watch.conn.domid, -watch_memory(watch.path, watch.token))

    def remove_all(self, conn: Connection) -> None:
        for watch in list(conn.watches.values()):
            self.remove(watch)

    def is_watched(self, path: str) -> bool:
        return path in self.by_path

    def covers(self, path: str) -> bool:
        """Is there a watch on ``path`` or on one of its ancestors (one that
        a change at ``path``, or its removal, may fire)?"""
        by_path = self.by_path
        return path in by_path or any(p in by_path for p in ancestors(path))

    def fire(
        self,
        path: str,
        exact: bool,
        visible_perms: Callable[[], Iterable[Perms]],
        out: list,
    ) -> None:
        """Append ``(conn, WATCH_EVENT)`` for every watch matching a change at
        ``path``.  Unprivileged watchers only get it if one of the permission
        lists returned by ``visible_perms()`` (computed once, lazily) lets them
        read: the node's, its parent's, and e.g. the old perms of SET_PERMS."""
        by_path = self.by_path
        if not by_path:
            return
        matched: list[Watch] = []
        p = path
        while True:
            watches = by_path.get(p)
            if watches:
                matched += watches
            if exact or p == "/":
                break
            i = p.rfind("/")
            p = p[:i] if i > 0 else "/"
        if len(matched) > 1:
            matched.sort(key=_order)
        perms: tuple[Perms, ...] | None = None
        for w in matched:
            conn = w.conn
            if not conn.privileged:
                if perms is None:
                    perms = tuple(visible_perms())
                domid, target = conn.domid, conn.target
                if not any(ps.access(domid, target) & READ for ps in perms):
                    continue
            packet = w.event(path)
            if packet is not None:
                out.append((conn, packet))

    def fire_special(self, name: str, perms: Perms, out: list) -> None:
        """``@introduceDomain`` / ``@releaseDomain``: exact-name watches only;
        unprivileged watchers need read access in that name's permission set."""
        for w in self.by_path.get(name, ()):
            conn = w.conn
            if conn.privileged or perms.access(conn.domid, conn.target) & READ:
                packet = w.event(name)
                if packet is not None:
                    out.append((conn, packet))
