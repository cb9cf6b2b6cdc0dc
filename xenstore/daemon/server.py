"""The socket side of xenstored: accept connections, move bytes, persist.

All connections are served by one loop (like cxenstored's), run as a trio
task: the client sockets sit, level-triggered, in a private ``epoll`` set
whose own fd is what trio waits on.  Each *iteration* of the loop:

1. takes every ready socket from ``epoll.poll()`` and ``recv()``-s once from
   each, straight on the non-blocking socket;
2. runs every complete request of that connection through
   ``engine.handle`` (pipelined requests are answered in order), collecting
   replies and watch events.  The usual chunk -- one whole request from a
   client with nothing pending -- takes a short way: if its only output is
   the reply, the changes so far are journaled (a copy into the mapped
   journal file) and the reply is sent right away; with ``--fsync power``
   a reply that needs the journal waits for step 3;
3. appends the changes the iteration committed since to the journal as one
   frame (and, with ``--fsync power``, one ``fdatasync``: a group commit
   covering every reply of every connection of the iteration);
4. only then queues the replies and events and ``send()``-s each
   connection's queue in one call.  (A connection served alone gets the
   replies to the first ``early_replies`` requests of a pipelined run as
   soon as they are journaled, so that it works on them meanwhile: with
   the whole run answered in one send, client and daemon took turns.)

While no other trio task is runnable or waiting for I/O (the daemon's
usual state), the loop waits up to ``linger`` (50 ms, or less if a trio
deadline comes first) in its own epoll, since a client's next request is
usually microseconds away; only when nothing comes does it ``await`` trio
(``wait_readable`` on the epoll fd).  When other tasks need trio (in-process
clients, a hypervisor link waiting on a socket) it hands over at once.  It
also passes a trio checkpoint every millisecond while busy, so that signals and
compaction get their turn.  A sequential request thus costs three system
calls (epoll_wait, recv, send) and no task switch, instead of a task
wake-up and an epoll re-registration per request.  (The linger is long on
purpose: an epoll_wait timeout shorter than the kernel tick arms a timer
that must be reprogrammed at every wake-up, which under a hypervisor -- and
dom0 always runs under one -- cost more CPU than the request itself: a
1 ms linger measured 10-15 us per request, a 50 ms one 2-4 us.)  Nothing is ever awaited between
``engine.handle`` and the journal append, so right after an append the
store is exactly what the journals describe: that is where compaction
switches journals and snapshots the store (a worker thread writes it).

Back-pressure: a connection whose output queue holds more than
``queue_high`` bytes (or, unprivileged, as many replies as the
``outstanding`` quota) is not read until the queue drains below
``queue_low``; its socket buffer fills and the client blocks.  Watch events
for it come from *other* connections' requests and never wait: a full queue
drops them (see outqueue).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio

from ringbuf._trio_util import open_background_nursery

from ..core.memory import MemoryQuotaNotice
from ..wire import HEADER, Op, Packet, PacketReader, ProtocolError, Request
from .journal import FsyncPolicy, JournalError, StateDir
from .outqueue import OutputQueue
from .trace import Tracer

__all__ = ["ServerConfig", "XenstoreServer", "Listener", "open_listener", "default_socket_path"]

log = logging.getLogger("xenstored")

_WATCH_EVENT = int(Op.WATCH_EVENT)
_pack_header = HEADER.pack

_wait_readable = trio.lowlevel.wait_readable
_checkpoint = trio.lowlevel.checkpoint
_current_statistics = trio.lowlevel.current_statistics
_current_time = trio.current_time
_FOREVER = float("inf")
_monotonic = time.monotonic
#: Tasks trio itself keeps waiting for I/O (the run_sync_soon task).
_TRIO_OWN_READERS = 1
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLL_GONE = select.EPOLLHUP | select.EPOLLERR
#: Seconds a busy loop runs between two trio checkpoints (a checkpoint
#: costs ~10 us: every 8 iterations, as before, was 5% of a request).
_CHECKPOINT_INTERVAL = 0.001


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


def open_listener(path: str, backlog: int = 128, before_listen: Callable[[], None] | None = None) -> Listener:
    """A non-blocking listening unix socket at ``path``, mode 0600.

    Parent directories are created.  A stale socket file is replaced, but if
    something still answers on it, ``OSError(EADDRINUSE)`` is raised.
    ``before_listen`` runs once the address is ours but before anyone can
    connect (e.g. to write a pid file).
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
    listener = Listener(sock, path)
    if before_listen is not None:
        try:
            before_listen()
        except BaseException:
            listener.close()
            raise
    sock.listen(backlog)
    sock.setblocking(False)
    return listener


@dataclass
class ServerConfig:
    """Tunables of the I/O layer (the protocol limits live in the engine's Limits)."""

    #: Stop reading a connection while this many bytes wait to be sent to it.
    queue_high: int = 64 << 10
    #: Resume reading when the writer has drained the queue below this.
    queue_low: int = 16 << 10
    #: Watch events to a connection are dropped above this many queued bytes.
    event_limit: int = 1 << 20
    #: Seconds a guest's watch event may wait for the guest to take it
    #: before it is dropped (cxenstored ``-w watch-event=``; 0: never).
    #: Events to socket connections (dom0) never expire, as in cxenstored.
    watch_event_timeout: float = 20.0
    #: Bytes per recv() call (so at most this much is parsed per connection
    #: and iteration).
    recv_size: int = 64 << 10
    #: At most this many new connections are accepted per iteration.
    accept_batch: int = 64
    #: A connection served alone in an iteration gets the replies to its
    #: first this-many pipelined requests as soon as they are ready, so
    #: that it works on them while the daemon answers the rest.
    early_replies: int = 16
    #: Seconds the loop waits for the next request in its own epoll before
    #: handing control back to trio (which then waits as long as needed);
    #: only while no other task needs trio, and never past a trio deadline.
    linger: float = 0.05


_tuple_new = tuple.__new__


def _lone_reply(conn: Any, deliveries: list) -> bytes | None:
    """The encoded reply if a request's whole output is its reply (the
    usual; the engine keeps replies within PAYLOAD_MAX), else ``None``."""
    if len(deliveries) == 1:
        target, out = deliveries[0]
        if target is conn and out[0] != _WATCH_EVENT:
            payload = out[3]
            return _pack_header(out[0], out[1], out[2], len(payload)) + payload
    return None


class _Client:
    """I/O state of one socket connection."""

    __slots__ = (
        "sock",
        "fd",
        "conn",
        "reader",
        "queue",
        "mask",
        "throttled",
        "stalled",
        "closed",
        "touched",
        "replies",
        "reply_bytes",
        "own_events",
    )

    def __init__(self, sock: socket.socket, conn: Any, queue: OutputQueue) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.reader = PacketReader()
        self.queue = queue
        self.mask = _EPOLLIN  # what epoll watches for
        self.throttled = False  # not read until its queue drains
        self.stalled = False  # complete requests left unprocessed at the limit
        self.closed = False
        self.touched = False  # listed in the iteration's output list
        # This iteration's output, queued once the journal has it.
        self.replies: list[bytes] = []
        self.reply_bytes = 0
        self.own_events: list[tuple[int, bytes]] | None = None  # (replies before it, event)


class XenstoreServer:
    """Serves an :class:`~xenstore.core.engine.Engine` on a listening socket."""

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
        self._power = state is not None and state.policy is FsyncPolicy.POWER
        self._clients: dict[Any, _Client] = {}  # engine Connection -> client
        self._by_fd: dict[int, _Client] = {}
        self._epoll: Any = None
        self._touched: list[_Client] = []  # clients with output this iteration
        self._one_ready = False  # this iteration serves a single socket
        #: Lone requests' replies that wait for the iteration's journal write.
        self._after_journal: list[tuple[_Client, bytes]] = []
        self._others: list[tuple[Any, Packet]] = []  # deliveries to other connections
        self._runnable: list[_Client] = []  # unthrottled clients with buffered requests
        #: Trio time up to which the loop may linger in its own epoll (None:
        #: ask trio again); see _linger_timeout.
        self._linger_until: float | None = None
        self._compacting = False
        self._accept_paused_until = 0.0  # trio time; 0 = accepting
        self._nursery: trio.Nursery | None = None
        #: Set when persisting failed: the daemon must stop (see ``serve``).
        self.fatal_error: BaseException | None = None
        #: Connections without a socket here (guest rings): the engine's
        #: packets for them go to ``external_sink(conn, packet)``, and the
        #: engine's effects (Introduced, Released) to ``effects_handler``,
        #: which runs while a batch is being journaled and so must not call
        #: ``commit_and_deliver``.
        self.external_sink: Callable[[Any, Packet], None] | None = None
        self.effects_handler: Callable[[list], None] | None = None
        self._readers: dict[int, Callable[[], None]] = {}  # see add_reader
        self._queue_high = self.config.queue_high
        self._recv_size = self.config.recv_size
        self._early_replies = self.config.early_replies

    # -- public ----------------------------------------------------------

    async def serve(self, listener: Listener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections until cancelled.

        Raises :class:`JournalError` if persisting a change failed: the
        daemon cannot acknowledge anything any more.
        """
        self._epoll = select.epoll()
        self._epoll.register(listener.fileno(), _EPOLLIN)
        try:
            async with open_background_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._loop(listener)
        finally:
            self._nursery = None
            for client in list(self._clients.values()):
                self._close(client)
            try:
                self._persist()
            except JournalError:
                pass
            self._others.clear()
            self._epoll.close()
        if self.fatal_error is not None:
            raise self.fatal_error

    def statistics(self) -> dict[str, int]:
        clients = self._clients.values()
        return {
            "clients": len(self._clients),
            "throttled": sum(c.throttled for c in clients),
            "queued_bytes": sum(c.queue.size for c in clients),
            "dropped_events": sum(c.queue.dropped_events for c in clients),
        }

    # -- the loop ----------------------------------------------------------

    async def _loop(self, listener: Listener) -> None:
        poll = self._epoll.poll
        epoll_fd = self._epoll.fileno()
        listener_fd = listener.fileno()
        by_fd = self._by_fd
        linger = self.config.linger
        next_checkpoint = _monotonic() + _CHECKPOINT_INTERVAL
        while True:
            # Wait in epoll itself: a chatty client's next request usually
            # comes within microseconds, and waking up through trio costs
            # several times more.  Idle longer: trio waits.
            until = self._linger_until
            if self._runnable:
                events = poll(0)
            elif until is None:  # ask trio, but only if nothing is waiting already
                events = poll(0)
                if not events:
                    timeout = self._linger_timeout(linger)
                    if timeout:
                        events = poll(timeout)
            elif until == _FOREVER:
                events = poll(linger)
            else:
                events = poll(max(0.0, min(linger, until - _current_time())))
            if self._accept_paused_until and trio.current_time() >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                self._epoll.modify(listener_fd, _EPOLLIN)
            if not events and not self._runnable:
                self._linger_until = None  # other tasks run meanwhile
                if self._accept_paused_until:
                    with trio.move_on_at(self._accept_paused_until):
                        await _wait_readable(epoll_fd)
                else:
                    await _wait_readable(epoll_fd)
                next_checkpoint = _monotonic() + _CHECKPOINT_INTERVAL
                continue
            runnable = self._runnable
            self._one_ready = len(events) == 1 and not runnable
            if runnable:
                self._runnable = []
                for client in runnable:
                    if not client.closed and not client.throttled:
                        self._process(client)
            for fd, mask in events:
                if fd == listener_fd:
                    self._accept(listener)
                    continue
                client = by_fd.get(fd)
                if client is None:
                    reader = self._readers.get(fd)
                    if reader is not None:
                        self._linger_until = None  # (it may wake tasks)
                        reader()
                    continue
                if mask & _EPOLLOUT:
                    self._flush(client)
                if client.throttled:
                    if mask & _EPOLL_GONE:
                        self._close(client)  # the peer is gone for good
                elif mask & (_EPOLLIN | _EPOLL_GONE):
                    self._receive(client)
            self._finish_iteration()
            if _monotonic() >= next_checkpoint:
                self._linger_until = None
                await _checkpoint()  # signals, compaction, cancellation
                next_checkpoint = _monotonic() + _CHECKPOINT_INTERVAL

    def _linger_timeout(self, linger: float) -> float:
        """How long the loop may wait in its own epoll without keeping trio
        from anything: ``linger``, cut to the next trio deadline, and 0 while
        another task is runnable or waits for I/O (only trio's epoll would
        see that ready).  Trio's own run_sync_soon task always waits on its
        wake-up socket: signals and thread results wait at most ``linger``.

        Asking trio costs microseconds, so the answer is kept (as the time
        up to which lingering is fine) until something could change it:
        every ``await`` of the loop, and every call out of it that may wake
        a task (``_linger_until = None`` there).
        """
        stats = _current_statistics()
        io = stats.io_statistics
        if stats.tasks_runnable or io.tasks_waiting_read > _TRIO_OWN_READERS or io.tasks_waiting_write:
            self._linger_until = _current_time()  # no lingering until re-checked
            return 0.0
        timeout = max(0.0, min(linger, stats.seconds_to_next_deadline))
        self._linger_until = _current_time() + stats.seconds_to_next_deadline
        return timeout

    def _accept(self, listener: Listener) -> None:
        for _ in range(self.config.accept_batch):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and friends: serve the others, retry later
                log.warning("accept failed: %s; pausing new connections", exc)
                self._accept_paused_until = trio.current_time() + 0.1
                self._epoll.modify(listener.fileno(), 0)
                return
            sock.setblocking(False)
            conn = self.engine.connect(domid=0, privileged=True)
            client = _Client(sock, conn, OutputQueue(self.config.event_limit))
            self._clients[conn] = client
            self._by_fd[client.fd] = client
            self._epoll.register(client.fd, _EPOLLIN)
            if self.tracer:
                self.tracer.connection("CREATE", conn.id)

    def _receive(self, client: _Client) -> None:
        """Read and answer what the client sent.

        The usual case is kept short: a client with nothing pending sent one
        whole request.  If its only output is the reply, that goes out at
        once, after journaling what the request changed (with ``--fsync
        power``: after the iteration's group commit); other output, and
        every other chunk, takes the way of ``_process``.
        """
        try:
            chunk = client.sock.recv(self._recv_size)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(client)
            return
        if not client.touched and not client.queue.size and not self.tracer:
            request = client.reader.whole_request(chunk)
            if request is not None:
                engine = self.engine
                data, deliveries = self._answer(client.conn, request, True)
                if data is not None and not engine.pending_effects:
                    if engine.store.journal:
                        if self._power:  # sent after the iteration's group commit
                            self._after_journal.append((client, data))
                            return
                        self._journal(engine.take_changes())  # (a copy into the mapped journal: cheap)
                    self._send_direct(client, data, (data,))
                    return
                client.touched = True
                self._touched.append(client)
                if data is None:
                    self._route(client, request, deliveries)
                else:
                    client.replies.append(data)
                    client.reply_bytes += len(data)
                return
        client.reader.feed(chunk)
        self._process(client)

    def _process(self, client: _Client) -> None:
        """Run the client's complete requests through the engine (up to its limits)."""
        if not client.touched:
            client.touched = True
            self._touched.append(client)
        conn = client.conn
        next_request = client.reader.next_request
        tracer = self.tracer
        answer = self._answer
        quick = conn.privileged and not tracer  # (with a tracer, every request goes the traced way)
        early = self._early_replies if quick else 0
        replies = client.replies
        # Queue room before the high mark, and replies allowed (unprivileged).
        room = self._queue_high - client.queue.size - client.reply_bytes
        allowed = (self._outstanding_limit() - client.queue.replies - len(replies)) if not conn.privileged else -1
        while True:
            if room <= 0 or allowed == 0:
                client.stalled = True
                break
            try:
                request = next_request()
            except ProtocolError as exc:  # len > 4096: answer what came before, then hang up
                log.info("connection %d: %s; closing it", conn.id, exc)
                self._close(client, flush_first=True)
                return
            if request is None:
                client.stalled = False
                break
            if tracer:
                tracer.packet("IN", conn.id, _tuple_new(Packet, request))
            data, deliveries = answer(conn, request, quick)
            if data is not None:
                replies.append(data)
                room -= len(data)
                allowed -= 1
                if len(replies) == early and self._one_ready and self._send_early(client):
                    if client.closed:  # (the send failed: the rest goes unanswered)
                        return
                    replies = client.replies
                    room = self._queue_high - client.queue.size
                continue
            before = len(replies)
            room -= self._route(client, request, deliveries)
            allowed -= len(replies) - before
        client.reply_bytes = self._queue_high - client.queue.size - room

    def _answer(self, conn: Any, request: Request, quick: bool) -> tuple[bytes | None, list | None]:
        """Run one request through the engine (its short way first if
        ``quick``): ``(encoded reply, None)`` if the reply is its whole
        output, else ``(None, deliveries)`` (always with a tracer, which
        logs every delivery).  A Packet is made only for the full way."""
        engine = self.engine
        op, req_id, tx_id, payload = request
        try:
            reply = engine.quick_reply(conn, op, tx_id, payload) if quick else None
            if reply is not None:
                return _pack_header(op, req_id, tx_id, len(reply)) + reply, None
            deliveries = engine.handle(conn, _tuple_new(Packet, request))
        except Exception:  # an engine bug must not take the daemon down
            log.exception("engine failed on %r", request)
            deliveries = [(conn, _tuple_new(Packet, request).error_reply("EIO"))]
        return (None if self.tracer else _lone_reply(conn, deliveries)), deliveries

    def _send_early(self, client: _Client) -> bool:
        """Send the client's replies so far in the middle of its pipelined
        run (journaling first), if nothing else waits to go out in order
        before or alongside them; True if sent."""
        engine = self.engine
        if client.own_events is not None or client.queue.size or self._others or engine.pending_effects or self._power:
            return False
        if engine.store.journal:
            self._journal(engine.take_changes())
        self._send_output(client)
        return True

    def _route(self, client: _Client, request: Request, deliveries: list) -> int:
        """Sort a request's output: replies and own events to the client's
        iteration output, the rest to other connections.  Returns the bytes
        added to the client's replies."""
        conn = client.conn
        tracer = self.tracer
        replies = client.replies
        added = 0
        for target, out in deliveries:
            if target is not conn:
                self._others.append((target, out))
                continue
            if tracer:
                tracer.packet("OUT", conn.id, out)
            try:
                data = out.encode()
            except ValueError:  # over 4096 bytes
                if out.op == _WATCH_EVENT:
                    continue  # dropped, as cxenstored does
                data = _tuple_new(Packet, request).error_reply("E2BIG").encode()
            if out.op == _WATCH_EVENT:
                if client.own_events is None:
                    client.own_events = []
                client.own_events.append((len(replies), data))
            else:
                replies.append(data)
                added += len(data)
        return added

    def _finish_iteration(self) -> None:
        """Persist the iteration's changes, then queue and send its output."""
        engine = self.engine
        if engine.store.journal or engine.pending_effects:
            self._persist()
        if self._after_journal:
            waiting = self._after_journal
            self._after_journal = []
            for client, data in waiting:
                if not client.closed:
                    self._send_direct(client, data, (data,))
        touched = self._touched
        self._touched = []
        for client in touched:
            client.touched = False
            if client.closed:
                continue
            if client.replies or client.own_events is not None:
                self._send_output(client)
            elif client.queue.size:
                self._flush(client)
            if client.stalled and not client.throttled and not client.closed:
                if self._must_wait(client, self._queue_high):
                    client.throttled = True
                    self._update_interest(client)
                else:
                    self._runnable.append(client)
        while self._others:  # (a failed send may disconnect a client, which may deliver more)
            self._persist()
            for client in self._deliver():
                if client.queue.size and not client.closed:
                    self._flush(client)
        if self.tracer:
            self.tracer.flush()

    def _send_output(self, client: _Client) -> None:
        """Send the iteration's replies and own events.  With nothing queued
        before them and no events among them (the usual case) they go
        straight to the socket and only what it does not take is queued;
        otherwise through the queue."""
        replies = client.replies
        if client.own_events is not None or client.queue.size:
            self._queue_output(client)
            self._flush(client)
            return
        client.replies = []
        client.reply_bytes = 0
        self._send_direct(client, replies[0] if len(replies) == 1 else b"".join(replies), replies)

    def _send_direct(self, client: _Client, data: bytes, replies: list[bytes] | tuple[bytes, ...]) -> None:
        """Send ``data``, the concatenated ``replies``, straight to the socket
        (nothing is queued before them); what it does not take is queued."""
        try:
            sent = client.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(client)
            return
        if sent < len(data):
            # The replies not completely sent stay outstanding in the queue.
            complete = end = 0
            for reply in replies:
                end += len(reply)
                if end > sent:
                    break
                complete += 1
            client.queue.push_replies(data[sent:], len(replies) - complete)
            self._update_interest(client)

    def _queue_output(self, client: _Client) -> None:
        """Move the iteration's replies (and own events, in order) to the queue."""
        queue = client.queue
        replies = client.replies
        events = client.own_events
        if events is None:
            if len(replies) == 1:
                queue.push_replies(replies[0])
            else:
                queue.push_replies(b"".join(replies), len(replies))
        else:
            done = 0
            for before, event in events:
                if before > done:
                    queue.push_replies(b"".join(replies[done:before]), before - done)
                    done = before
                queue.push_event(event)
            if len(replies) > done:
                queue.push_replies(b"".join(replies[done:]), len(replies) - done)
            client.own_events = None
        client.replies = []
        client.reply_bytes = 0

    def _deliver(self) -> list[_Client]:
        """Queue packets for other connections (watch events); returns their clients."""
        deliveries = self._others
        self._others = []
        touched: list[_Client] = []
        clients = self._clients
        tracer = self.tracer
        for target, packet in deliveries:
            client = clients.get(target)
            if client is None:
                if self.external_sink is not None:
                    self._linger_until = None  # (it may wake tasks)
                    self.external_sink(target, packet)
                continue
            if client.closed:
                continue
            if tracer:
                tracer.packet("OUT", target.id, packet)
            try:
                data = packet.encode()
            except ValueError:
                continue  # over 4096 bytes: dropped, as cxenstored does
            if packet.op == _WATCH_EVENT:
                if not client.queue.push_event(data):
                    continue
            else:
                client.queue.push_replies(data)
            touched.append(client)
        return touched

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` from the loop whenever ``fd`` is readable
        (level-triggered: the callback drains it).  Guest rings' event
        channels are served this way, in the same loop and linger as the
        sockets, so neither kind of client waits for the other."""
        self._readers[fd] = callback
        self._epoll.register(fd, _EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed); idempotent."""
        if self._readers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):  # the loop has ended
                pass

    def commit_and_deliver(self, deliveries: list[tuple[Any, Packet]]) -> None:
        """Engine output produced outside the socket loop (guest rings,
        domain deaths): journal the committed changes first, then queue
        ``deliveries`` to their connections and send."""
        self._others.extend(deliveries)
        self._persist()
        for client in self._deliver():
            if client.queue.size and not client.closed:
                self._flush(client)

    # -- output ------------------------------------------------------------

    def _flush(self, client: _Client) -> None:
        """Send what the socket takes now; epoll tells when it takes more."""
        queue = client.queue
        sock = client.sock
        while queue.size:
            try:
                sent = sock.send(queue.peek())
            except BlockingIOError:
                break
            except OSError:
                self._close(client)
                return
            queue.consume(sent)
        if client.throttled and not self._must_wait(client, self.config.queue_low):
            client.throttled = False
            self._runnable.append(client)  # its buffered requests go first
        self._update_interest(client)

    def _must_wait(self, client: _Client, threshold: int) -> bool:
        queue = client.queue
        if queue.size >= threshold:
            return True
        return not client.conn.privileged and queue.replies >= self._outstanding_limit()

    def _update_interest(self, client: _Client) -> None:
        mask = (0 if client.throttled else _EPOLLIN) | (_EPOLLOUT if client.queue.size else 0)
        if mask != client.mask and not client.closed:
            self._epoll.modify(client.fd, mask)
            client.mask = mask

    def _close(self, client: _Client, flush_first: bool = False) -> None:
        """Forget a connection (idempotent); its watches and transactions go."""
        if client.closed:
            return
        if flush_first:
            # Replies to the requests before a framing error are still sent
            # (what the socket takes right now).
            self._finish_iteration_for(client)
        client.closed = True
        del self._clients[client.conn]
        del self._by_fd[client.fd]
        try:
            self._epoll.unregister(client.fd)
        except (OSError, ValueError):
            pass
        client.sock.close()
        client.queue.clear()
        self._others.extend(self.engine.disconnect(client.conn))
        if self.tracer:
            self.tracer.connection("DESTROY", client.conn.id)

    def _finish_iteration_for(self, client: _Client) -> None:
        """Persist now and send this one client's pending replies, best effort."""
        self._persist()
        if client.replies or client.own_events is not None:
            self._queue_output(client)
        queue = client.queue
        while queue.size:
            try:
                queue.consume(client.sock.send(queue.peek()))
            except OSError:
                return

    # -- persistence ---------------------------------------------------------

    def _persist(self) -> None:
        """Journal the engine's committed changes (before any reply leaves)."""
        engine = self.engine
        changes = engine.take_changes()
        if engine.pending_effects:
            self._carry_out(engine.take_effects())
        if changes:
            self._journal(changes)

    def _journal(self, changes: list) -> None:
        """Append ``changes`` to the journal (and sync, with --fsync power)."""
        state = self.state
        if state is None:
            return
        try:
            compact = state.append(changes)
            if self._power:
                state.sync()
        except JournalError as exc:
            log.critical("%s; shutting down", exc)
            self.fatal_error = exc
            raise
        if compact and not self._compacting and self._nursery is not None:
            self._start_compaction()

    def _carry_out(self, effects: list) -> None:
        """The engine's effects: quota notices are logged, the rest goes to
        ``effects_handler`` (guest rings) if there is one."""
        for item in effects:
            if isinstance(item, MemoryQuotaNotice):  # cxenstored's syslog lines
                log.warning("%s", item.message)
        if self.effects_handler is not None:
            self._linger_until = None  # (it may wake tasks)
            self.effects_handler(effects)
        else:
            log.debug("ignoring engine effects %r", effects)

    def _start_compaction(self) -> None:
        """Switch to a new journal and snapshot the store, right now.

        Right after an append, so the snapshot is exactly the state that the
        journals before the new one describe; only writing the snapshot
        file happens later, in a worker thread.
        """
        state = self.state
        assert state is not None and self._nursery is not None
        self._compacting = True
        try:
            first = state.start_compaction()
            snapshot = self.engine.store.snapshot()
        except OSError as exc:
            self._compacting = False
            error = JournalError(f"compaction failed: {exc}")
            log.critical("%s; shutting down", error)
            self.fatal_error = error
            raise error from None
        self._linger_until = None
        self._nursery.start_soon(self._write_snapshot, first, snapshot)

    async def _write_snapshot(self, first: int, snapshot: list) -> None:
        state = self.state
        assert state is not None
        try:
            size = await trio.to_thread.run_sync(state.write_snapshot, snapshot, first)
            state.finish_compaction(first, size)
            log.info("compacted: snapshot of %d nodes, journal %d", len(snapshot), first)
        except (OSError, JournalError) as exc:
            log.critical("compaction failed: %s; shutting down", exc)
            self.fatal_error = JournalError(f"compaction failed: {exc}")
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        finally:
            self._compacting = False
        # The journal may have outgrown the threshold again meanwhile; this
        # task only runs while the loop awaits, i.e. with every change
        # journaled, so it may switch journals here too.
        if state.wants_compaction and self.fatal_error is None and self._nursery is not None:
            self._start_compaction()
