"""A client connection as the engine sees it: identity plus per-connection state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .paths import home_path

if TYPE_CHECKING:
    from .transactions import Transaction
    from .watches import Watch

__all__ = ["Connection"]

class Connection:
    """One client: a Unix-socket client (dom0, privileged) or a domain's ring.

    ``domid``: the domain it speaks for; ``privileged``: bypasses permission
    checks and quotas and may use privileged operations (cxenstored: socket
    connections and dom0); ``target``: the domain this one controls after
    ``SET_TARGET`` (device-model stub domains), else ``None``.
    Hashable by identity; ``id`` is unique within its engine.
    """

    __slots__ = (
        "id",
        "domid",
        "privileged",
        "target",
        "home",
        "transactions",
        "next_tx_id",
        "watches",
        "alive",
        "__weakref__",
    )

    def __init__(self, conn_id: int, domid: int, privileged: bool) -> None:
        self.id = conn_id
        self.domid = domid
        self.privileged = privileged
        self.target: int | None = None
        self.home = home_path(domid)
        self.transactions: dict[int, Transaction] = {}
        self.next_tx_id = 1
        #: (resolved path, token) -> Watch, for EEXIST/UNWATCH and cleanup.
        self.watches: dict[tuple[str, bytes], Watch] = {}
        self.alive = True

    def __repr__(self) -> str:
        kind = "privileged" if self.privileged else "unprivileged"
        return f"<Connection #{self.id} dom{self.domid} {kind}>"
