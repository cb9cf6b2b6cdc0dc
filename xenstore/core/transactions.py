"""Transactions: an overlay view with an id, and the watch firings it defers.

Isolation and conflict detection are the overlay's job (store.Overlay): the
commit fails with EAGAIN iff a node the transaction read or wrote -- or the
parent whose child list it changed -- was modified in the live store since
the transaction started.  Unrelated live writes never abort it.  Watch
events are recorded while the transaction runs and fired only at a
successful commit.
"""

from __future__ import annotations

from .connection import Connection
from .perms import Perms
from .store import Overlay, Store

__all__ = ["Transaction", "allocate_id"]


class Transaction(Overlay):
    """A transaction *is* its overlay view of the store (one object: a
    transaction is started for a single write more often than not), plus
    its id, its connection and the watch firings it defers."""

    __slots__ = ("id", "conn", "firings")

    def __init__(self, tx_id: int, conn: Connection, store: Store, max_nodes: int) -> None:
        #: Its node copies are charged to the connection's domain (memory quota).
        Overlay.__init__(self, store, max_nodes, conn.domid)  # (not super(): one lookup less, per transaction)
        self.id = tx_id
        self.conn = conn
        #: Deferred watch firings: (path, exact, extra perms visible at the time).
        self.firings: list[tuple[str, bool, tuple[Perms, ...]]] = []

    #: The transaction ended or was dropped: release its memory charge.
    close = Overlay.release


def allocate_id(conn: Connection) -> int:
    """cxenstored: a per-connection counter from 1, skipping 0 and ids still
    open, wrapping at 2**32."""
    tx_id = conn.next_tx_id
    while tx_id == 0 or tx_id in conn.transactions:
        tx_id = (tx_id + 1) & 0xFFFFFFFF
    conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
    return tx_id
