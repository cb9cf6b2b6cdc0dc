"""Errors of the client side (operation errors are :class:`xenstore.wire.XenStoreError`)."""

from __future__ import annotations

__all__ = ["ConnectionClosed"]


class ConnectionClosed(ConnectionError):
    """The connection to xenstored is gone (closed, broken framing, or
    closed by us); every request waiting on it fails with this."""
