"""libxenstore's calling convention over :class:`SyncClient`, for the tools.

Xen's tools call ``xs_read()`` & co., test for ``NULL`` and print
``strerror(errno)``.  Porting them line by line is the surest way to get
their output and exit codes right, so this adapter gives the same shape:
each method returns ``None``/``False`` on failure and leaves the Linux
errno in :attr:`Xs.errno`.
"""

from __future__ import annotations

import errno as _errno

from ..client._sync import ConnectionClosed, SyncClient, SyncTransaction, open_transport
from ..wire import ProtocolError, XenStoreError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from ..client._ops import Perm

__all__ = ["Xs", "xs_open"]

#: What a failed call returns (``None`` can be a successful result).
FAILED = object()


class Xs:
    """A connection with libxenstore-style results (``None`` + errno)."""

    __slots__ = ("client", "errno")

    def __init__(self, client: SyncClient) -> None:
        self.client = client
        self.errno = 0

    def _in(self, tx_id: int) -> "SyncClient | SyncTransaction":
        return self.client if not tx_id else SyncTransaction(self.client, tx_id)

    def _call(self, fn: "Callable[..., Any]", *args: "Any") -> "Any":
        """``fn(*args)``, or :data:`FAILED` with :attr:`errno` set."""
        try:
            return fn(*args)
        except XenStoreError as exc:
            self.errno = exc.errno
        except (ConnectionClosed, ProtocolError):
            self.errno = _errno.EBADF  # what read_all() reports at EOF
        except OSError as exc:
            self.errno = exc.errno or _errno.EIO
        return FAILED

    def _value(self, fn: "Callable[..., Any]", *args: "Any") -> "Any":
        result = self._call(fn, *args)
        return None if result is FAILED else result

    def _ok(self, fn: "Callable[..., Any]", *args: "Any") -> bool:
        return self._call(fn, *args) is not FAILED

    def read(self, path: bytes, tx_id: int = 0) -> bytes | None:
        return self._value(self._in(tx_id).read, path)

    def write(self, path: bytes, value: bytes, tx_id: int = 0) -> bool:
        return self._ok(self._in(tx_id).write, path, value)

    def rm(self, path: bytes, tx_id: int = 0) -> bool:
        return self._ok(self._in(tx_id).rm, path)

    def directory(self, path: bytes, tx_id: int = 0) -> "list[str] | None":
        return self._value(self._in(tx_id).directory, path)

    def get_perms(self, path: bytes, tx_id: int = 0) -> "list[Perm] | None":
        return self._value(self._in(tx_id).get_perms, path)

    def set_perms(self, path: bytes, perms: list[str], tx_id: int = 0) -> bool:
        return self._ok(self._in(tx_id).set_perms, path, perms)

    def watch(self, path: bytes, token: bytes, depth: int | None = None) -> bool:
        return self._ok(self.client.add_watch, path, token, depth)

    def read_watch(self) -> "tuple[bytes, bytes] | None":
        return self._value(self.client.wait_event)

    def transaction_start(self) -> int:
        """0 (``XBT_NULL``) on failure."""
        return self._value(self.client.transaction_start) or 0

    def transaction_end(self, tx_id: int, abort: bool) -> bool:
        return self._ok(self.client.transaction_end, tx_id, not abort)

    def control(self, command: bytes, args: list[bytes]) -> bytes | None:
        return self._value(self.client.control, command, *args)

    def close(self) -> None:
        self.client.close()


def xs_open() -> Xs:
    """``xs_open(0)``; raises :class:`OSError` (its errno is what C prints)."""
    return Xs(SyncClient(open_transport()))
