"""The socket side of xenstored: accept connections, move bytes, persist.

One trio task reads each connection and one writes it.  The reader does the
whole request path without awaiting:

1. ``recv()`` straight on the non-blocking socket (only when that would
   block does it ``await wait_readable``: trio's own socket wrappers cost
   about twice as much per request);
2. parse *every* complete packet in the buffer and run each through
   ``engine.handle`` (pipelined requests are answered in order);
3. append the batch's committed changes to the journal (one ``write()``;
   with ``--fsync power`` also wait for the shared group-commit ``fsync``);
4. queue all the batch's replies and send them with one ``send()``.

Because nothing awaits between ``engine.handle`` and the journal append,
every store change is in the journal at every await point, which is what
lets compaction take a consistent snapshot at any await point.

The writer task only runs when a ``send()`` would block: it waits for the
socket to become writable and drains the connection's :class:`OutputQueue`.
Back-pressure: a reader stops processing requests while its queue holds more
than ``queue_high`` bytes (or, for an unprivileged connection, as many
replies as the ``outstanding`` quota) and resumes when the writer has
drained it.  Watch events for a connection come from *other* connections'
requests, so they never wait: a full queue drops them (see outqueue).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Callable

import trio

from ..wire import Op, Packet, PacketReader, ProtocolError
from .journal import FsyncPolicy, JournalError, StateDir
from .outqueue import OutputQueue
from .trace import Tracer

__all__ = ["ServerConfig", "XenstoreServer", "Listener", "open_listener", "default_socket_path"]

log = logging.getLogger("xenstored")

_WATCH_EVENT = int(Op.WATCH_EVENT)
# Outcomes of XenstoreServer._process.
_DONE = "done"
_THROTTLED = "throttled"
_CLOSE = "close"
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_checkpoint = trio.lowlevel.checkpoint


def default_socket_path(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket``, else Xen's default."""
    if environ.get("XENSTORED_PATH"):
        return environ["XENSTORED_PATH"]
    rundir = environ.get("XENSTORED_RUNDIR") or "/var/run/xenstored"
    return os.path.join(rundir, "socket")


class Listener:
    """The listening unix socket and the file it is bound to."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        st = os.stat(path)
        self._file_id = (st.st_dev, st.st_ino)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        return self.sock.accept()

    def close(self) -> None:
        """Close the socket and remove its file (unless someone replaced it)."""
        self.sock.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._file_id:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def open_listener(path: str, backlog: int = 128) -> Listener:
    """A non-blocking listening unix socket at ``path``, mode 0600.

    Parent directories are created.  A stale socket file is replaced, but if
    something still answers on it, ``OSError(EADDRINUSE)`` is raised.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens any more
        else:
            raise OSError(errno.EADDRINUSE, f"another daemon is serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)  # born 0600: no window where others may connect
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return Listener(sock, path)


@dataclass
class ServerConfig:
    """Tunables of the I/O layer (the protocol limits live in the engine's Limits)."""

    #: Stop reading a connection while this many bytes wait to be sent to it.
    queue_high: int = 64 << 10
    #: Resume reading when the writer has drained the queue below this.
    queue_low: int = 16 << 10
    #: Watch events to a connection are dropped above this many queued bytes.
    event_limit: int = 1 << 20
    #: Bytes per recv() call.
    recv_size: int = 64 << 10


class _Client:
    """I/O state of one socket connection."""

    __slots__ = ("sock", "conn", "queue", "output_ready", "drained", "cancel_scope", "broken", "throttled")

    def __init__(self, sock: socket.socket, conn: Any, queue: OutputQueue) -> None:
        self.sock = sock
        self.conn = conn
        self.queue = queue
        self.output_ready = trio.lowlevel.ParkingLot()  # the writer parks here
        self.drained = trio.lowlevel.ParkingLot()  # a throttled reader parks here
        self.cancel_scope: trio.CancelScope | None = None
        self.broken = False
        self.throttled = False

    def flush_nowait(self) -> None:
        """Send what the socket takes now; leave the rest to the writer task."""
        queue = self.queue
        sock = self.sock
        while queue.size:
            try:
                sent = sock.send(queue.peek())
            except BlockingIOError:
                self.output_ready.unpark_all()
                return
            except OSError:
                self.fail()
                return
            queue.consume(sent)
        if self.throttled:
            self.drained.unpark_all()

    def fail(self) -> None:
        """The peer is gone: drop its output and end its tasks."""
        self.broken = True
        self.queue.clear()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    async def write_loop(self) -> None:
        queue = self.queue
        sock = self.sock
        while True:
            if not queue.size:
                await self.output_ready.park()
                continue
            try:
                sent = sock.send(queue.peek())
            except BlockingIOError:
                await _wait_writable(sock)
                continue
            except OSError:
                self.fail()
                return
            queue.consume(sent)
            if self.throttled:
                self.drained.unpark_all()  # the reader re-checks its limits


class XenstoreServer:
    """Serves an :class:`~xenstore.core.Engine` on a listening socket."""

    def __init__(
        self,
        engine: Any,
        *,
        state: StateDir | None = None,
        tracer: Tracer | None = None,
        config: ServerConfig | None = None,
        outstanding_limit: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.state = state
        self.tracer = tracer
        self.config = config or ServerConfig()
        #: Outstanding-replies quota for unprivileged connections, read live
        #: because the limits can change at run time.
        self._outstanding_limit = outstanding_limit or (lambda: 20)
        self._clients: dict[Any, _Client] = {}
        self._power = state is not None and state.policy is FsyncPolicy.POWER
        self._synced_frames = 0
        self._sync_wanted = trio.lowlevel.ParkingLot()
        self._sync_done = trio.lowlevel.ParkingLot()
        self._journal_lock = trio.Lock()
        self._compacting = False
        self._nursery: trio.Nursery | None = None
        #: Set when persisting failed: the daemon must stop (see ``serve``).
        self.fatal_error: BaseException | None = None

    # -- public ----------------------------------------------------------

    async def serve(self, listener: Listener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections until cancelled or a fatal error.

        Raises :class:`JournalError` if persisting a change failed: the
        daemon cannot acknowledge anything any more.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._power:
                nursery.start_soon(self._group_commit_loop)
            task_status.started()
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    await _wait_readable(listener)
                    continue
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                sock.setblocking(False)
                nursery.start_soon(self._serve_client, sock)
        if self.fatal_error is not None:
            raise self.fatal_error

    def statistics(self) -> dict[str, int]:
        return {
            "clients": len(self._clients),
            "queued_bytes": sum(c.queue.size for c in self._clients.values()),
            "dropped_events": sum(c.queue.dropped_events for c in self._clients.values()),
        }

    # -- one connection ----------------------------------------------------

    async def _serve_client(self, sock: socket.socket) -> None:
        conn = self.engine.connect(domid=0, privileged=True)
        client = _Client(sock, conn, OutputQueue(self.config.event_limit))
        self._clients[conn] = client
        if self.tracer:
            self.tracer.connection("CREATE", conn.id)
        try:
            with trio.CancelScope() as scope:
                client.cancel_scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.write_loop)
                    await self._read_loop(client)
                    nursery.cancel_scope.cancel()
        finally:
            del self._clients[conn]
            client.queue.clear()
            sock.close()
            deliveries = self.engine.disconnect(conn)
            if self._commit_changes() and deliveries:
                self._deliver(deliveries)
            if self.tracer:
                self.tracer.connection("DESTROY", conn.id)

    async def _read_loop(self, client: _Client) -> None:
        sock = client.sock
        reader = PacketReader()
        recv_size = self.config.recv_size
        high, low = self.config.queue_high, self.config.queue_low
        busy = 0  # recv() calls in a row that did not have to wait
        while True:
            if reader.buffered >= 16:
                status = await self._process(client, reader)
                if status is _CLOSE or client.broken:
                    return
                if status is _THROTTLED:
                    if self._must_wait(client, high):
                        client.throttled = True
                        while self._must_wait(client, low):
                            await client.drained.park()
                        client.throttled = False
                    else:
                        await _checkpoint()  # let other connections run
                    continue  # complete requests are still buffered
            try:
                data = sock.recv(recv_size)
            except BlockingIOError:
                await _wait_readable(sock)
                busy = 0
                continue
            except OSError:
                return
            if not data:
                return
            reader.feed(data)
            busy += 1
            if busy >= 8:  # a client that always has more: be fair to the others
                busy = 0
                await _checkpoint()

    def _must_wait(self, client: _Client, threshold: int) -> bool:
        queue = client.queue
        if queue.size >= threshold:
            return True
        return not client.conn.privileged and queue.replies >= self._outstanding_limit()

    async def _process(self, client: _Client, reader: PacketReader) -> object:
        """Handle every complete packet the reader holds, or until throttled.

        Returns ``_DONE`` (need more bytes), ``_THROTTLED`` (stopped at the
        queue limit; requests remain) or ``_CLOSE`` (the peer broke the
        framing, or persisting failed: close the connection).
        """
        conn = client.conn
        queue = client.queue
        handle = self.engine.handle
        tracer = self.tracer
        high = self.config.queue_high
        privileged = conn.privileged
        outstanding = 0 if privileged else self._outstanding_limit()
        replies: list[bytes] = []
        reply_bytes = 0
        own_events: list[tuple[int, bytes]] | None = None  # (replies before it, event)
        others: list[tuple[Any, Packet]] = []
        framing_error: ProtocolError | None = None
        status = _DONE
        while True:
            if queue.size + reply_bytes >= high or (not privileged and queue.replies + len(replies) >= outstanding):
                status = _THROTTLED
                break
            try:
                packet = reader.next_packet()
            except ProtocolError as exc:  # len > 4096: answer what came before, then hang up
                framing_error = exc
                break
            if packet is None:
                break
            if tracer:
                tracer.packet("IN", conn.id, packet)
            try:
                deliveries = handle(conn, packet)
            except Exception:  # an engine bug must not take the daemon down
                log.exception("engine failed on %r", packet)
                deliveries = [(conn, packet.error_reply("EIO"))]
            for target, out in deliveries:
                if target is not conn:
                    others.append((target, out))
                    continue
                if tracer:
                    tracer.packet("OUT", conn.id, out)
                try:
                    data = out.encode()
                except ValueError:  # over 4096 bytes
                    if out.op == _WATCH_EVENT:
                        continue  # dropped, as cxenstored does
                    data = packet.error_reply("E2BIG").encode()
                if out.op == _WATCH_EVENT:
                    if own_events is None:
                        own_events = []
                    own_events.append((len(replies), data))
                else:
                    replies.append(data)
                    reply_bytes += len(data)
        # Persist before anything of this batch can be sent (nothing awaited
        # since the engine changed the store, see the module docstring).
        if not self._commit_changes():
            return _CLOSE
        if self._power and self.state is not None and self._synced_frames < self.state.frames_written:
            await self._wait_durable(self.state.frames_written)
        if own_events is None:
            queue.push_replies(b"".join(replies) if len(replies) > 1 else (replies[0] if replies else b""), len(replies))
        else:
            done = 0
            for before, event in own_events:
                if before > done:
                    queue.push_replies(b"".join(replies[done:before]), before - done)
                    done = before
                queue.push_event(event)
            if len(replies) > done:
                queue.push_replies(b"".join(replies[done:]), len(replies) - done)
        if others:
            self._deliver(others)
        if tracer:
            tracer.flush()
        client.flush_nowait()
        if framing_error is not None:
            log.info("connection %d: %s; closing it", conn.id, framing_error)
            return _CLOSE
        return status

    # -- delivery and persistence ------------------------------------------

    def _deliver(self, deliveries: list[tuple[Any, Packet]]) -> None:
        """Queue packets for other connections (watch events) and send them."""
        touched: dict[_Client, None] = {}
        tracer = self.tracer
        for target, packet in deliveries:
            client = self._clients.get(target)
            if client is None or client.broken:
                continue  # e.g. a guest connection that has no socket here
            if tracer:
                tracer.packet("OUT", target.id, packet)
            try:
                data = packet.encode()
            except ValueError:
                continue
            if packet.op == _WATCH_EVENT:
                client.queue.push_event(data)
            else:
                client.queue.push_replies(data)
            touched[client] = None
        for client in touched:
            client.flush_nowait()

    def _commit_changes(self) -> bool:
        """Journal the engine's committed changes; ``False`` if that failed."""
        engine = self.engine
        changes = engine.take_changes()
        effects = engine.take_effects()
        if effects:
            log.debug("ignoring engine effects %r", effects)
        if not changes or self.state is None:
            return True
        try:
            self.state.append(changes)
        except JournalError as exc:
            self._die(exc)
            return False
        if self.state.wants_compaction and not self._compacting and self._nursery is not None:
            self._compacting = True
            self._nursery.start_soon(self._compact)
        return True

    def _die(self, exc: BaseException) -> None:
        log.critical("%s; shutting down", exc)
        if self.fatal_error is None:
            self.fatal_error = exc
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _wait_durable(self, frames: int) -> None:
        """Group commit: wait until a sync covered the first ``frames`` frames."""
        while self._synced_frames < frames:
            self._sync_wanted.unpark_all()
            await self._sync_done.park()

    async def _group_commit_loop(self) -> None:
        state = self.state
        assert state is not None
        while True:
            if self._synced_frames >= state.frames_written:
                await self._sync_wanted.park()
                continue
            target = state.frames_written
            async with self._journal_lock:
                try:
                    await trio.to_thread.run_sync(state.sync)
                except JournalError as exc:
                    self._die(exc)
                    return
            self._synced_frames = target
            self._sync_done.unpark_all()

    async def _compact(self) -> None:
        """Snapshot the store and start a new journal, off the request path."""
        state = self.state
        assert state is not None
        try:
            async with self._journal_lock:
                # No await between these two: the snapshot is exactly the
                # state that the journals before ``first`` describe.
                first = state.start_compaction()
                snapshot = self.engine.store.snapshot()
            size = await trio.to_thread.run_sync(state.write_snapshot, snapshot, first)
            state.finish_compaction(first, size)
            log.info("compacted: snapshot of %d nodes, journal %d", len(snapshot), first)
        except (OSError, JournalError) as exc:
            self._die(JournalError(f"compaction failed: {exc}"))
        finally:
            self._compacting = False
