"""The async (trio) XenStore client: pipelined requests, watches, transactions.

One connection, any number of tasks: every request gets a fresh ``req_id``
and waits for the reply with that id, so many requests are in flight at
once.  Two background tasks live in the nursery of :func:`open_client` —
a reader that routes replies to their callers and watch events to their
watches, and a writer that sends queued requests (queueing never blocks,
so a cancelled caller can never leave half a packet on the stream).
"""

from __future__ import annotations

import itertools
import math
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from ringbuf._trio_util import open_background_nursery

from ..wire import Op, Packet, PacketReader, ProtocolError, XenStoreError, split_strings
from ._api import Operations
from ._errors import ConnectionClosed
from ._events import EventQueue
from ._ops import DirectoryPartAssembler, Request, parse_reply, to_bytes, to_str
from ._retry import Backoff, TransactionResult
from ._transport import Transport, open_unix_transport

__all__ = ["Client", "Transaction", "Watch", "open_client"]

#: How long cleanup (UNWATCH, transaction abort) may take once cancelled.
_CLEANUP_TIMEOUT = 5.0


class _Reply:
    """A caller waiting for one reply: woken directly with trio's low-level
    reschedule (an Event plus its ParkingLot would cost more per request)."""

    __slots__ = ("task", "done", "op", "payload", "error")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None  # set while parked
        self.done = False
        self.op = 0
        self.payload = b""
        self.error: BaseException | None = None

    def complete(self) -> None:
        self.done = True
        if self.task is not None:
            task, self.task = self.task, None
            trio.lowlevel.reschedule(task)


class _AsyncOperations(Operations):
    """``directory`` (with its ``E2BIG`` fallback), ``exists`` and friends."""

    __slots__ = ()

    async def directory(self, path: str | bytes) -> list[str]:
        """Child names; falls back to ``DIRECTORY_PART`` on ``E2BIG``
        (a directory too big for one 4 KiB reply), like libxenstore."""
        try:
            return await self._run(Request.directory(path))
        except XenStoreError as exc:
            if exc.name != "E2BIG":
                raise
        parts = DirectoryPartAssembler()
        while True:
            try:
                reply = await self._run(Request.directory_part(path, parts.offset))
            except XenStoreError as exc:
                if exc.name == "ENOSYS":  # an old daemon: the original error stands
                    raise XenStoreError("E2BIG") from None
                raise
            names = parts.feed(reply)
            if names is not None:
                return names

    async def exists(self, path: str | bytes) -> bool:
        try:
            await self.read(path)
        except XenStoreError:
            return False
        return True

    async def read_str(self, path: str | bytes) -> str:
        """The value decoded as UTF-8 (convenience)."""
        return (await self.read(path)).decode()


class Client(_AsyncOperations):
    """A connection to xenstored; get one from :func:`open_client`."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._pending: dict[int, _Reply] = {}
        self._watches: dict[bytes, Watch] = {}
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._outbox_send, self._outbox_receive = trio.open_memory_channel[bytes](math.inf)
        #: Bytes handed to the writer task and not yet sent; while > 0, new
        #: requests queue behind them (keeps the stream in order).
        self._backlog = 0
        self._closed: BaseException | None = None
        self._sent = 0
        self._events = 0

    # -- plumbing --------------------------------------------------------

    def _new_req_id(self) -> int:
        while True:
            req_id = next(self._req_ids) & 0xFFFFFFFF
            if req_id not in self._pending:
                return req_id

    async def _run(self, request: Request, tx_id: int | None = None) -> Any:
        if self._closed is not None:
            raise ConnectionClosed(str(self._closed))
        req_id = self._new_req_id()
        reply = _Reply()
        self._pending[req_id] = reply
        tx = tx_id if (tx_id and request.transactional) else 0
        self._send(Packet(request.op, req_id, tx, request.payload).encode())
        if reply.done:  # failed while sending
            self._pending.pop(req_id, None)
            await trio.lowlevel.checkpoint()
        else:
            reply.task = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                # Cancelled before the reply: forget it; the reader drops it.
                reply.task = None
                self._pending.pop(req_id, None)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            self._pending.pop(req_id, None)
        if reply.error is not None:
            raise ConnectionClosed(str(reply.error)) from reply.error
        return parse_reply(request, reply.op, reply.payload)

    def _send(self, data: bytes) -> None:
        """Queue one packet; never blocks, never awaits (cancellation-safe).

        Fast path: a lone request (nothing queued, no other reply awaited)
        goes straight to the transport, sparing a task switch.  Under load
        requests go to the writer task, which sends them in batches: one
        system call (and one wake-up of the daemon) for many requests.
        """
        self._sent += 1
        if not self._backlog and len(self._pending) <= 1:
            try:
                sent = self._transport.send_nowait(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._backlog += len(data)
        try:
            self._outbox_send.send_nowait(data)
        except trio.ClosedResourceError:  # closed meanwhile: _fail woke the caller
            pass

    async def _write_loop(self) -> None:
        try:
            async for data in self._outbox_receive:
                batch = [data]
                while True:  # coalesce whatever else is queued into one send
                    try:
                        batch.append(self._outbox_receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                chunk = b"".join(batch)
                await self._transport.send_all(chunk)
                self._backlog -= len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(exc)

    async def _read_loop(self) -> None:
        reader = PacketReader()
        try:
            while True:
                data = await self._transport.receive_some()
                if not data:
                    raise ConnectionClosed("xenstored closed the connection")
                reader.feed(data)
                for packet in reader:
                    self._dispatch(packet)
        except (ConnectionClosed, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(exc)

    def _dispatch(self, packet: Packet) -> None:
        if packet.op == Op.WATCH_EVENT:
            # Events may precede the reply that caused them: they go to
            # their watch's queue whatever replies are outstanding.
            parts = split_strings(packet.payload)
            if len(parts) >= 2:
                watch = self._watches.get(parts[1])
                if watch is not None:
                    self._events += 1
                    watch._deliver(to_str(parts[0]))
            return
        reply = self._pending.pop(packet.req_id, None)
        if reply is None or reply.done:
            return  # its caller was cancelled; nothing to do
        reply.op = packet.op
        reply.payload = packet.payload
        reply.complete()

    def _fail(self, exc: BaseException) -> None:
        """The connection is dead: wake everybody with the reason."""
        if self._closed is not None:
            return
        self._closed = exc
        for reply in list(self._pending.values()):
            if not reply.done:
                reply.error = exc
                reply.complete()
        for watch in list(self._watches.values()):
            watch._close(exc)
        self._outbox_send.close()

    # -- public API ------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def statistics(self) -> dict[str, int]:
        """Requests in flight, live watches, totals sent / events routed."""
        return {
            "requests_in_flight": len(self._pending),
            "watches": len(self._watches),
            "requests_sent": self._sent,
            "events_received": self._events,
        }

    def new_token(self) -> str:
        """A watch token unique within this process's connections."""
        return f"userxen:{os.getpid()}:{id(self):x}:{next(self._tokens)}"

    def watch(self, path: str | bytes, depth: int | None = None) -> "Watch":
        """``async with client.watch(path) as events: async for p in events:``"""
        return Watch(self, path, depth)

    def transaction(self) -> "Transaction":
        """``async with client.transaction() as t:`` — commit on exit
        (``XenStoreError("EAGAIN")`` on conflict), abort on exception."""
        return Transaction(self)

    async def transact(
        self,
        fn: Callable[["Transaction"], Awaitable[Any]],
        backoff: Backoff | None = None,
    ) -> TransactionResult:
        """Run ``await fn(t)`` in a transaction until it commits.

        On ``EAGAIN`` the whole function runs again in a new transaction
        after a jittered, exponentially growing pause.  Returns the value
        and the number of retries; raises the last ``EAGAIN`` once
        ``backoff.attempts`` are used up.
        """
        policy = backoff if backoff is not None else Backoff()
        retries = 0
        while True:
            try:
                async with self.transaction() as t:
                    value = await fn(t)
                return TransactionResult(value, retries)
            except XenStoreError as exc:
                if exc.name != "EAGAIN" or retries + 1 >= policy.attempts:
                    raise
            retries += 1
            await trio.sleep(policy.delay(retries))

    async def aclose(self) -> None:
        self._fail(ConnectionClosed("client closed"))
        with trio.CancelScope(shield=True):
            await self._transport.aclose()


class Transaction(_AsyncOperations):
    """A client's operations inside one transaction (an async context manager)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.tx_id = 0
        self._done = False

    async def _run(self, request: Request, tx_id: int | None = None) -> Any:
        return await self.client._run(request, self.tx_id if tx_id is None else tx_id)

    async def __aenter__(self) -> "Transaction":
        self.tx_id = await self.client.transaction_start()
        return self

    async def commit(self) -> None:
        """Commit now (``EAGAIN`` on conflict); leaving the block then does nothing."""
        self._done = True
        await self.client.transaction_end(self.tx_id, True)

    async def abort(self) -> None:
        self._done = True
        await self.client.transaction_end(self.tx_id, False)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._done:
            return
        if exc_type is None:
            await self.commit()
            return
        self._done = True
        # Abort even when cancelled, but never hang on a dead daemon.
        with trio.move_on_after(_CLEANUP_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.client.transaction_end(self.tx_id, False)
            except (XenStoreError, ConnectionClosed):
                pass  # the original exception matters more


class Watch:
    """A registered watch: ``async for path in watch`` yields event paths.

    A watch is a hint that something under ``path`` may have changed, not
    a change log: repeated events for the same path that have not been
    consumed yet are merged (the daemon may merge them too), and the first
    event arrives right after registration.  :meth:`values` turns events
    into fresh reads of the watched node.
    """

    def __init__(self, client: Client, path: str | bytes, depth: int | None) -> None:
        self.client = client
        self.path = path
        self.depth = depth
        self.token = client.new_token()
        self._token_bytes = to_bytes(self.token)
        self._queue = EventQueue()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed: BaseException | None = None

    async def __aenter__(self) -> "Watch":
        # Registered before WATCH is sent: its first event may beat the OK.
        self.client._watches[self._token_bytes] = self
        try:
            await self.client.add_watch(self.path, self.token, self.depth)
        except BaseException:
            self.client._watches.pop(self._token_bytes, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.client._watches.pop(self._token_bytes, None)
        self._close(ConnectionClosed("watch removed"))
        if self.client.closed:
            return
        with trio.move_on_after(_CLEANUP_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.client.unwatch(self.path, self.token)
            except ConnectionClosed:
                pass

    def _deliver(self, path: str) -> None:
        self._queue.push(path)
        self._lot.unpark_all()

    def _close(self, reason: BaseException) -> None:
        if self._closed is None:
            self._closed = reason
            self._lot.unpark_all()

    def receive_nowait(self) -> str:
        """The oldest pending event path; :class:`trio.WouldBlock` if none."""
        path = self._queue.pop()
        if path is None:
            if self._closed is not None:
                raise ConnectionClosed(str(self._closed))
            raise trio.WouldBlock
        return path

    async def receive(self) -> str:
        """Wait for the next event path."""
        while True:
            try:
                path = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                continue
            await trio.lowlevel.checkpoint()
            return path

    def __aiter__(self) -> "Watch":
        return self

    async def __anext__(self) -> str:
        try:
            return await self.receive()
        except ConnectionClosed:
            if self.client.closed:
                raise
            raise StopAsyncIteration from None

    def statistics(self) -> dict[str, int]:
        return {"pending_events": len(self._queue)}

    def values(self) -> AsyncIterator[bytes | None]:
        """Re-read the watched node after each batch of events.

        ``async for value in watch.values():`` gets the current value
        (``None`` while the node does not exist), starting with the value
        at registration time.
        """
        return _Values(self)


class _Values:
    """Async iterator behind :meth:`Watch.values` (no async generator:
    trio-friendly cancellation, nothing left suspended)."""

    def __init__(self, watch: Watch) -> None:
        self._watch = watch

    def __aiter__(self) -> "_Values":
        return self

    async def __anext__(self) -> bytes | None:
        watch = self._watch
        await watch.__anext__()
        # Everything already queued is covered by this one read.
        while True:
            try:
                watch.receive_nowait()
            except (trio.WouldBlock, ConnectionClosed):
                break
        try:
            return await watch.client.read(watch.path)
        except XenStoreError as exc:
            if exc.name in ("ENOENT", "EACCES"):
                return None
            raise


@asynccontextmanager
async def open_client(path: str | None = None, *, transport: Transport | None = None) -> AsyncIterator[Client]:
    """Connect to xenstored (``path`` or libxenstore's socket rules) and
    yield a :class:`Client`; closing it cancels its background tasks."""
    if transport is None:
        transport = await open_unix_transport(path)
    client = Client(transport)
    try:
        async with open_background_nursery() as nursery:
            nursery.start_soon(client._read_loop)
            nursery.start_soon(client._write_loop)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await client.aclose()
