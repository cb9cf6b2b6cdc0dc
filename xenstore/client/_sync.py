"""A blocking XenStore client for scripts and the ``xenstore-*`` tools.

No trio, no ``socket``/``typing`` modules: the tools start in a few
milliseconds.  One request at a time (like libxenstore); watch events that
arrive while waiting for a reply are queued and handed out by
:meth:`SyncClient.wait_event` or a :class:`SyncWatch`.
"""

from __future__ import annotations

import os
import select
import stat as _stat
from collections import deque

import _socket

from ..wire import Op, PacketReader, Packet, XenStoreError, split_strings
from ._api import Operations
from ._errors import ConnectionClosed
from ._ops import DirectoryPartAssembler, Request, parse_reply, to_bytes, to_str
from ._paths import daemon_socket_path, domain_device_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["SyncClient", "SyncTransaction", "SyncWatch", "ConnectionClosed", "open_sync_client"]

_RECV_SIZE = 65536


class FdTransport:
    """Bytes over a blocking file descriptor: a unix socket or xenbus device."""

    __slots__ = ("_sock", "_fd")

    def __init__(self, sock: "_socket.socket | None" = None, fd: int | None = None) -> None:
        self._sock = sock
        self._fd = sock.fileno() if sock is not None else fd

    @classmethod
    def connect_unix(cls, path: str) -> "FdTransport":
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock=sock)

    @classmethod
    def open_device(cls, path: str) -> "FdTransport":
        return cls(fd=os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def fileno(self) -> int:
        return self._fd

    def send_all(self, data: bytes) -> None:
        if self._sock is not None:
            self._sock.sendall(data, _socket.MSG_NOSIGNAL)  # EPIPE, not SIGPIPE
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def receive_some(self, timeout: float | None = None) -> bytes | None:
        """Up to 64 KiB; ``b""`` at EOF; ``None`` if ``timeout`` expired."""
        if timeout is not None:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            if not poller.poll(max(0.0, timeout) * 1000):
                return None
        if self._sock is not None:
            return self._sock.recv(_RECV_SIZE)
        return os.read(self._fd, _RECV_SIZE)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


def _open_path(path: str) -> FdTransport:
    """libxenstore's ``get_handle``: a socket if it is one, else a device."""
    mode = os.stat(path).st_mode
    if _stat.S_ISSOCK(mode):
        return FdTransport.connect_unix(path)
    return FdTransport.open_device(path)


def open_transport(path: str | None = None) -> FdTransport:
    """Connect like ``xs_open(0)``: ``path``, or the daemon socket then the
    xenbus device.  Raises :class:`OSError` with the last failure's errno."""
    if path is not None:
        return _open_path(path)
    try:
        return _open_path(daemon_socket_path())
    except OSError:
        return _open_path(domain_device_path())


class _SyncOperations(Operations):
    __slots__ = ()

    def directory(self, path: str | bytes) -> "list[str]":
        """Child names; falls back to ``DIRECTORY_PART`` on ``E2BIG``."""
        try:
            return self._run(Request.directory(path))
        except XenStoreError as exc:
            if exc.name != "E2BIG":
                raise
        parts = DirectoryPartAssembler()
        while True:
            try:
                reply = self._run(Request.directory_part(path, parts.offset))
            except XenStoreError as exc:
                if exc.name == "ENOSYS":  # old daemon: the original error stands
                    raise XenStoreError("E2BIG") from None
                raise
            names = parts.feed(reply)
            if names is not None:
                return names

    def exists(self, path: str | bytes) -> bool:
        """``True`` if the node can be read (what ``xenstore-exists`` checks)."""
        try:
            self.read(path)
        except XenStoreError:
            return False
        return True


class SyncClient(_SyncOperations):
    """A blocking connection to xenstored.  Use as a context manager."""

    __slots__ = ("_transport", "_reader", "_req_id", "_events", "_tokens")

    def __init__(self, transport: FdTransport) -> None:
        self._transport = transport
        self._reader = PacketReader()
        self._req_id = 0
        #: (path, token) of events not handed out yet, oldest first.
        self._events: deque[tuple[bytes, bytes]] = deque()
        self._tokens = 0

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    def fileno(self) -> int:
        return self._transport.fileno()

    # -- the request/reply loop ------------------------------------------

    def _next_packet(self, timeout: float | None = None) -> Packet | None:
        while True:
            packet = self._reader.next_packet()  # ProtocolError propagates
            if packet is not None:
                return packet
            data = self._transport.receive_some(timeout)
            if data is None:
                return None
            if not data:
                raise ConnectionClosed("xenstored closed the connection")
            self._reader.feed(data)

    def _queue_event(self, packet: Packet) -> None:
        parts = split_strings(packet.payload)
        if len(parts) >= 2:
            self._events.append((parts[0], parts[1]))

    def _run(self, request: Request, tx_id: int | None = None) -> "Any":
        self._req_id = (self._req_id + 1) & 0xFFFFFFFF
        req_id = self._req_id
        tx = tx_id if (tx_id and request.transactional) else 0
        self._transport.send_all(Packet(request.op, req_id, tx, request.payload).encode())
        while True:
            packet = self._next_packet()
            if packet.op == Op.WATCH_EVENT:
                self._queue_event(packet)
            elif packet.req_id == req_id:
                return parse_reply(request, packet.op, packet.payload)
            # else: a stale reply (cannot happen with one request in flight)

    # -- watches ---------------------------------------------------------

    def wait_event(self, timeout: float | None = None) -> "tuple[bytes, bytes] | None":
        """The next ``(path, token)`` watch event; ``None`` on timeout."""
        while not self._events:
            packet = self._next_packet(timeout)
            if packet is None:
                return None
            if packet.op == Op.WATCH_EVENT:
                self._queue_event(packet)
        return self._events.popleft()

    def _take_event(self, token: bytes, timeout: float | None) -> bytes | None:
        """The next event for ``token`` (others stay queued, in order)."""
        for i, (path, tok) in enumerate(self._events):
            if tok == token:
                del self._events[i]
                return path
        while True:
            packet = self._next_packet(timeout)
            if packet is None:
                return None
            if packet.op != Op.WATCH_EVENT:
                continue
            parts = split_strings(packet.payload)
            if len(parts) >= 2 and parts[1] == token:
                return parts[0]
            self._queue_event(packet)

    def new_token(self) -> str:
        """A token no other watch of this client uses."""
        self._tokens += 1
        return f"userxen-sync:{os.getpid()}:{self._tokens}"

    def watch(self, path: str | bytes, depth: int | None = None) -> "SyncWatch":
        """``with client.watch(p) as w: for path in w: ...``"""
        return SyncWatch(self, path, depth)

    # -- transactions ----------------------------------------------------

    def transaction(self) -> "SyncTransaction":
        """``with client.transaction() as t:`` commits on exit, aborts on error."""
        return SyncTransaction(self)

    def transact(self, fn: "Callable[[SyncTransaction], Any]", backoff: "Any" = None) -> "Any":
        """Run ``fn(t)`` in a transaction until it commits without ``EAGAIN``.

        Returns a :class:`~xenstore.client._retry.TransactionResult` (the
        value and the number of retries).  Raises the last ``EAGAIN`` once
        ``backoff.attempts`` are used up.
        """
        import time

        from ._retry import Backoff, TransactionResult

        policy = backoff if backoff is not None else Backoff()
        retries = 0
        while True:
            try:
                with self.transaction() as t:
                    value = fn(t)
                return TransactionResult(value, retries)
            except XenStoreError as exc:
                if exc.name != "EAGAIN" or retries + 1 >= policy.attempts:
                    raise
            retries += 1
            time.sleep(policy.delay(retries))


class SyncTransaction(_SyncOperations):
    """The operations of a client, inside one transaction."""

    __slots__ = ("client", "tx_id", "_done")

    def __init__(self, client: SyncClient, tx_id: int = 0) -> None:
        self.client = client
        #: Set by ``__enter__``; pass an existing id to reuse its operations.
        self.tx_id = tx_id
        self._done = False

    def _run(self, request: Request, tx_id: int | None = None) -> "Any":
        return self.client._run(request, self.tx_id if tx_id is None else tx_id)

    def __enter__(self) -> "SyncTransaction":
        self.tx_id = self.client.transaction_start()
        return self

    def commit(self) -> None:
        """Commit now (``EAGAIN`` on conflict); the ``with`` exit then does nothing."""
        self._done = True
        self.client.transaction_end(self.tx_id, True)

    def abort(self) -> None:
        self._done = True
        self.client.transaction_end(self.tx_id, False)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self._done = True
            try:
                self.client.transaction_end(self.tx_id, False)
            except (XenStoreError, OSError):
                pass  # the original exception matters more


class SyncWatch:
    """A registered watch; iterate for event paths (``str``)."""

    __slots__ = ("client", "path", "token", "depth", "_active")

    def __init__(self, client: SyncClient, path: str | bytes, depth: int | None) -> None:
        self.client = client
        self.path = path
        self.depth = depth
        self.token = client.new_token()
        self._active = False

    def __enter__(self) -> "SyncWatch":
        self.client.add_watch(self.path, self.token, self.depth)
        self._active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._active:
            self._active = False
            try:
                self.client.unwatch(self.path, self.token)
            except (XenStoreError, OSError):
                pass

    def wait(self, timeout: float | None = None) -> str | None:
        """The next event path; ``None`` on timeout."""
        path = self.client._take_event(to_bytes(self.token), timeout)
        return None if path is None else to_str(path)

    def __iter__(self) -> "SyncWatch":
        return self

    def __next__(self) -> str:
        path = self.wait()
        assert path is not None  # no timeout: wait() blocks until an event
        return path

    def values(self) -> "Any":
        """Iterate the watched node's value (``bytes``, ``None`` if absent),
        re-read after each event — a watch is only a hint to look again."""
        for _ in self:
            try:
                yield self.client.read(self.path)
            except XenStoreError as exc:
                if exc.name not in ("ENOENT", "EACCES"):
                    raise
                yield None


def open_sync_client(path: str | None = None) -> SyncClient:
    """Connect like libxenstore's ``xs_open`` (see :mod:`._paths`)."""
    return SyncClient(open_transport(path))
