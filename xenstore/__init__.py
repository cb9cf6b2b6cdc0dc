"""userxen's XenStore: the client library (this namespace) and the daemon.

Async (trio)::

    async with xenstore.open_client() as c:          # $XENSTORED_PATH & co.
        await c.write("/a", b"1")
        async with c.watch("/a") as events:
            async for path in events: ...
        async with c.transaction() as t:
            await t.write("/b", await t.read("/a"))
        result = await c.transact(fn)                 # retried on EAGAIN

Inside a guest domain (over its XenStore ring; see
:mod:`xenstore.client.ring_transport` for the environment it needs)::

    async with xenstore.open_guest_client() as c:
        await c.write("data/x", b"1")                 # relative to /local/domain/<domid>

Blocking (no trio import)::

    with xenstore.open_sync_client() as c:
        c.read("/a")

Names are resolved lazily (PEP 562) so that ``import xenstore.cli...`` or
the blocking client never imports trio.
"""

from __future__ import annotations

import importlib as _importlib

__all__ = [
    # async client
    "open_client",
    "Client",
    "Transaction",
    "Watch",
    "Transport",
    "StreamTransport",
    "UnixSocketTransport",
    "open_unix_transport",
    # inside a guest domain (its ring page + event channel)
    "open_guest_client",
    "RingTransport",
    "open_ring_transport",
    # blocking client
    "open_sync_client",
    "SyncClient",
    "SyncTransaction",
    "SyncWatch",
    # shared
    "Perm",
    "Backoff",
    "TransactionResult",
    "ConnectionClosed",
    "XenStoreError",
    "ProtocolError",
    "daemon_socket_path",
]

_WHERE = {
    "open_client": "xenstore.client._async",
    "Client": "xenstore.client._async",
    "Transaction": "xenstore.client._async",
    "Watch": "xenstore.client._async",
    "Transport": "xenstore.client._transport",
    "StreamTransport": "xenstore.client._transport",
    "UnixSocketTransport": "xenstore.client._transport",
    "open_unix_transport": "xenstore.client._transport",
    "open_guest_client": "xenstore.client.ring_transport",
    "RingTransport": "xenstore.client.ring_transport",
    "open_ring_transport": "xenstore.client.ring_transport",
    "open_sync_client": "xenstore.client._sync",
    "SyncClient": "xenstore.client._sync",
    "SyncTransaction": "xenstore.client._sync",
    "SyncWatch": "xenstore.client._sync",
    "Perm": "xenstore.client._ops",
    "Backoff": "xenstore.client._retry",
    "TransactionResult": "xenstore.client._retry",
    "ConnectionClosed": "xenstore.client._errors",
    "XenStoreError": "xenstore.wire",
    "ProtocolError": "xenstore.wire",
    "daemon_socket_path": "xenstore.client._paths",
}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'xenstore' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
