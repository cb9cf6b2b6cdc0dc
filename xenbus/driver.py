"""Trio driver layer: one end of a split device driven by :mod:`xenbus.state`.

This is the thin I/O shell around the pure parts.  A :class:`Frontend` or
:class:`Backend` subclass supplies the device-specific work as hooks
(``publish`` / ``connect`` / ``disconnect`` / ``remove``); the base class

* finds the other end through its own ``backend``/``backend-id`` (frontend)
  or ``frontend``/``frontend-id`` (backend) keys,
* watches the other end's ``state`` (and its own ``state``, plus ``online``
  for a backend: the toolstack writes those),
* on every change reads both states, asks :func:`xenbus.state.decide` what
  to do, does it, and switches its own state in a transaction that first
  checks the node still exists (fact sheet 5.4: never resurrect a deleted
  directory), writing the hook's keys in the same transaction,
* reports errors the Xen way (``error/<nodename>/error`` = ``"<errno> <msg>"``)
  and, for fatal ones, switches to ``Closing``,
* keeps **one** "something changed" flag for all watch events, however many
  arrive (XSA-349: a frontend flooding its ``state`` node must not grow the
  backend's memory); events are drained by a task that does nothing else.

It is written against :class:`Store`, a small async protocol, so that it does
not depend on the concrete XenStore client.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import trio

from ringbuf._trio_util import open_background_nursery
from xenstore.wire import XenStoreError

from .handshake import HandshakeError, OtherEnd, format_error, read_other_end
from .paths import DeviceId, error_path, is_under
from .state import Local, Role, Work, XenbusState, decide, format_state, is_allowed, parse_state

__all__ = [
    "StoreOps",
    "Store",
    "ChangeFlag",
    "DriverStatistics",
    "Driver",
    "Frontend",
    "Backend",
    "read_directory",
    "transact",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoreOps(Protocol):
    """The XenStore operations a driver needs, inside or outside a transaction.

    ``read`` and ``directory`` raise ``XenStoreError("ENOENT")`` for a
    missing node; values are bytes.
    """

    async def read(self, path: str) -> bytes: ...

    async def write(self, path: str, value: bytes) -> None: ...

    async def mkdir(self, path: str) -> None: ...

    async def rm(self, path: str) -> None: ...

    async def directory(self, path: str) -> list[str]: ...


class Store(StoreOps, Protocol):
    """A XenStore connection as the driver layer uses it.

    ``transaction()`` commits when the block exits normally and raises
    ``XenStoreError("EAGAIN")`` on conflict.  ``watch(path)`` yields the
    paths of events at or below ``path`` (one on registration, as Xen does)
    until the context exits.
    """

    def transaction(self) -> AbstractAsyncContextManager[StoreOps]: ...

    def watch(self, path: str) -> AbstractAsyncContextManager[AsyncIterator[str]]: ...


async def transact(store: Store, body: Callable[[StoreOps], Awaitable[T]], *, attempts: int = 64) -> T:
    """Run ``body`` in a transaction, retrying from scratch on ``EAGAIN``."""
    for _ in range(attempts - 1):
        try:
            async with store.transaction() as tx:
                result = await body(tx)
            return result
        except XenStoreError as exc:
            if exc.name != "EAGAIN":
                raise
    async with store.transaction() as tx:
        return await body(tx)


async def read_directory(ops: StoreOps, path: str, *, depth: int = 2, limit: int = 512) -> dict[str, bytes]:
    """The values below ``path`` as ``{"key": v, "queue-0/ring-ref": v, ...}``.

    Bounded in depth and number of keys because the directory may belong to
    the other end (a hostile guest could make it huge); nodes that vanish
    while reading are skipped.
    """
    out: dict[str, bytes] = {}
    pending = [("", depth)]
    while pending:
        rel, left = pending.pop()
        base = f"{path}/{rel}" if rel else path
        try:
            children = await ops.directory(base)
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                continue
            raise
        for child in children:
            if len(out) >= limit:
                return out
            key = f"{rel}/{child}" if rel else child
            try:
                out[key] = await ops.read(f"{path}/{key}")
            except XenStoreError as exc:
                if exc.name != "ENOENT":
                    raise
                continue
            if left > 1:
                pending.append((key, left - 1))
    return out


class ChangeFlag:
    """At most one pending "something changed" notification.

    ``set()`` any number of times; ``wait()`` returns once per burst and
    clears the flag.  Memory does not depend on how many events arrive.
    """

    def __init__(self) -> None:
        self._event = trio.Event()
        self.raised = 0  # statistics: how many set() calls
        self.consumed = 0  # statistics: how many wait() returns

    def set(self) -> None:
        self.raised += 1
        self._event.set()

    @property
    def pending(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()
        self.consumed += 1


@dataclass(frozen=True)
class DriverStatistics:
    state: XenbusState
    peer_state: XenbusState
    events_seen: int  # watch events drained
    wakeups: int  # times the decision loop ran (<= events_seen + local changes)
    pending: int  # 0 or 1, by construction
    steps: int  # decisions that did something
    errors: int  # error nodes written


class Driver:
    """Common machinery of both ends; use :class:`Frontend` / :class:`Backend`."""

    role: Role
    #: Frontends that go straight to Connected after publishing (netfront).
    skip_initialised = False
    #: Frontends that publish before the backend's InitWait (hvc_xen).
    publish_early = False
    #: Bound on decisions per wake-up (a few suffice; see xenbus.state).
    max_chain = 16
    #: Frontend: reconnections (Closed -> Initialising) allowed without ever
    #: reaching Connected before giving up; None = no limit.
    max_reconnects: int | None = 8

    def __init__(self, store: Store, nodename: str, own_domid: int) -> None:
        self.store = store
        self.nodename = nodename  # absolute path of our own device directory
        self.own_domid = own_domid
        self.other: OtherEnd | None = None
        self.local = Local(skip_initialised=self.skip_initialised, publish_early=self.publish_early)
        self._changed = ChangeFlag()
        self._state = XenbusState.Unknown
        self._peer = XenbusState.Unknown
        self._steps = 0
        self._errors = 0
        self._progress = trio.Event()  # set and replaced on every step
        self._stopped = trio.Event()
        self._attempts = 0  # frontend: reconnections since last Connected
        self._removed = False

    # ---- hooks -----------------------------------------------------------

    async def publish(self, peer_values: dict[str, bytes]) -> dict[str, str]:
        """PUBLISH work; returns keys to write with the state switch."""
        return {}

    async def connect(self, peer_values: dict[str, bytes]) -> dict[str, str]:
        """CONNECT work; returns keys to write with the state switch."""
        return {}

    async def disconnect(self) -> None:
        """DISCONNECT work (must be idempotent)."""

    async def remove(self) -> None:
        """The device is gone for good (REMOVE decision, or our directory was
        removed); called once, after ``disconnect``."""

    # ---- public surface --------------------------------------------------

    @property
    def state(self) -> XenbusState:
        return self._state

    @property
    def peer_state(self) -> XenbusState:
        return self._peer

    def statistics(self) -> DriverStatistics:
        return DriverStatistics(
            state=self._state,
            peer_state=self._peer,
            events_seen=self._changed.raised,
            wakeups=self._changed.consumed,
            pending=int(self._changed.pending),
            steps=self._steps,
            errors=self._errors,
        )

    def set_ready(self, ready: bool = True) -> None:
        """Device-specific readiness changed (e.g. the hotplug script finished)."""
        self._set_local(ready=ready)

    def request_close(self) -> None:
        """Close the device (unplug / shutdown); it will not reconnect."""
        self._set_local(closing=True)

    @property
    def connected(self) -> bool:
        """This end is ``Connected`` with its CONNECT work done."""
        return self._state is XenbusState.Connected and self.local.connected

    async def wait_connected(self) -> None:
        """Wait until :attr:`connected` (returns at once if it already is)."""
        while not self.connected:
            await self._progress.wait()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def report_error(self, errno: int, message: str, *, fatal: bool = False) -> None:
        """Write ``"<errno> <message>"`` to our error node; a fatal error also
        switches to ``Closing`` (Linux ``xenbus_dev_fatal``)."""
        self._errors += 1
        path = error_path(self.own_domid, self.nodename)
        log.warning("%s: %s", self.nodename, format_error(errno, message))
        try:
            await self.store.write(path, format_error(errno, message).encode())
        except XenStoreError as exc:  # the error directory may not exist/be writable
            log.warning("%s: cannot write %s: %s", self.nodename, path, exc)
        if fatal:
            self._on_fatal()
            await self._switch(XenbusState.Closing, {})

    def _on_fatal(self) -> None:
        """Frontends give up after a fatal error; backends wait to be re-initialised."""

    def _set_local(self, **changes: bool) -> None:
        self.local = replace(self.local, **changes)
        self._changed.set()

    # ---- the loop --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the device until it is removed (or the task is cancelled).

        ``started`` once the watches are registered.  Cancelling the task
        is a crash: nothing is released or written (the next incarnation
        resets the device, see :mod:`xenbus.state`)."""
        try:
            self.other = await self._find_other_end()
            if self.other is None:
                task_status.started()
                return
            async with open_background_nursery() as nursery:
                for path in self._watched_paths():
                    await nursery.start(self._drain_watch, path)
                task_status.started()
                await self._loop()
                nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()

    async def _find_other_end(self) -> OtherEnd | None:
        own = await read_directory(self.store, self.nodename, depth=1)
        if not own:
            return None  # the device is already gone
        try:
            return read_other_end(self.role, own)
        except HandshakeError as exc:
            # The toolstack's cross reference is unusable: report and stop.
            await self.report_error(exc.errno, exc.message)
            return None

    def _watched_paths(self) -> list[str]:
        assert self.other is not None
        return [self.other.state_path, f"{self.nodename}/state"]

    async def _drain_watch(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.store.watch(path) as events:
            task_status.started()
            async for event_path in events:
                # Only events about what we watch count (the other end's
                # directory may change on resume); an event on an ancestor
                # (its removal) counts too: an event only means "look again".
                if is_under(event_path, path) or is_under(path, event_path):
                    self._changed.set()

    async def _loop(self) -> None:
        while True:
            await self._changed.wait()
            if not await self._settle():
                return

    async def _read_states(self) -> tuple[XenbusState, XenbusState]:
        assert self.other is not None
        try:
            mine = parse_state(await self.store.read(f"{self.nodename}/state"))
        except XenStoreError:
            mine = XenbusState.Unknown
        try:
            peer = parse_state(await self.store.read(self.other.state_path))
        except XenStoreError:
            peer = XenbusState.Unknown
        return mine, peer

    async def _refresh_local(self) -> None:
        """Re-read whatever else feeds :class:`Local` (backend: ``online``)."""

    async def _settle(self) -> bool:
        """Apply decisions until idle; False once the device is gone."""
        for _ in range(self.max_chain):
            mine, peer = await self._read_states()
            self._state, self._peer = mine, peer
            if mine is XenbusState.Unknown:
                await self._gone()  # the toolstack removed our directory
                return False
            await self._refresh_local()
            step = decide(self.role, mine, peer, self.local)
            if step.idle:
                return True
            if step.switch_to is XenbusState.Initialising and mine is XenbusState.Closed:
                self._attempts += 1
                if self.max_reconnects is not None and self._attempts > self.max_reconnects:
                    # The other end keeps failing us: stop trying (no livelock).
                    await self.report_error(
                        _errno.ECONNREFUSED, f"giving up after {self.max_reconnects} reconnection attempts"
                    )
                    self.local = replace(self.local, closing=True)
                    continue
            self._steps += 1
            try:
                keys = await self._do(step.work)
            except HandshakeError as exc:
                await self.report_error(exc.errno, exc.message, fatal=True)
                continue
            except XenStoreError as exc:
                # The other end's directory vanished or became unreadable
                # under us: that is the peer's doing, so report, not crash.
                where = self.other.path if self.other else "?"
                await self.report_error(_errno.EIO, f"reading {where}: {exc}", fatal=True)
                continue
            if step.work is Work.REMOVE:
                return False
            if step.switch_to is not None and not await self._switch(step.switch_to, keys):
                await self._gone()
                return False
            self._update_connected()
        log.error("%s: decision chain did not settle", self.nodename)
        return True

    def _update_connected(self) -> None:
        if self.connected:
            self._attempts = 0
        self._progress.set()
        self._progress = trio.Event()

    async def _do(self, work: Work) -> dict[str, str]:
        if work is Work.NOTHING:
            return {}
        if work is Work.DISCONNECT:
            await self._release()
            return {}
        if work is Work.REMOVE:
            await self._gone()
            return {}
        assert self.other is not None
        peer_values = await read_directory(self.store, self.other.path)
        if work is Work.PUBLISH:
            keys = await self.publish(peer_values)
            if self.role is Role.FRONTEND:
                self.local = replace(self.local, attached=True, connected=False)
            return keys
        keys = await self.connect(peer_values)
        self.local = replace(self.local, attached=True, connected=True)
        return keys

    async def _gone(self) -> None:
        """The device is gone for good: release, then the ``remove`` hook (once)."""
        await self._release()
        if not self._removed:
            self._removed = True
            await self.remove()

    async def _release(self) -> None:
        """DISCONNECT work; idempotent (also run when the device vanishes)."""
        await self.disconnect()
        self.local = replace(self.local, attached=False, connected=False)
        self._update_connected()

    async def _switch(self, new: XenbusState, keys: dict[str, str]) -> bool:
        """Fact sheet 5.4: in a transaction, check our ``state`` node still
        exists, write ``keys`` and the new state.  False if the device is
        gone.  If someone else (the toolstack) changed our state since the
        decision and ``new`` is no longer a legal next state, nothing is
        written and the loop decides again."""
        state_path = f"{self.nodename}/state"

        async def body(tx: StoreOps) -> XenbusState | None:
            try:
                current = parse_state(await tx.read(state_path))
            except XenStoreError as exc:
                if exc.name == "ENOENT":
                    return None
                raise
            if current is not new and not is_allowed(self.role, current, new):
                return current
            for key, value in keys.items():
                await tx.write(f"{self.nodename}/{key}", value.encode())
            if current is not new:
                await tx.write(state_path, format_state(new).encode())
            return new

        result = await transact(self.store, body)
        if result is None:
            return False
        if result is not new:
            self._changed.set()  # decide again from the state actually there
        self._state = result
        return True


class ConnectionTask:
    """The task serving a device while it is connected (a console's ring pump
    or session), run beside the driver so that a disconnect can cancel it.

    A driver wraps its ``run`` in :meth:`open`, calls :meth:`start` from
    ``connect`` and :meth:`cancel` from ``disconnect``."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def is_open(self) -> bool:
        return self._nursery is not None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        """Where tasks started meanwhile run; they are cancelled when the block ends."""
        try:
            async with open_background_nursery() as nursery:
                self._nursery = nursery
                yield
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None

    def start(self, serve: Callable[[], Awaitable[None]]) -> None:
        """Run ``serve()`` until it returns or :meth:`cancel` is called."""
        assert self._nursery is not None, "start() outside open()"
        scope = self._scope = trio.CancelScope()

        async def task() -> None:
            with scope:
                await serve()

        self._nursery.start_soon(task)

    def cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None


class Frontend(Driver):
    """The guest end.  Subclasses implement ``publish`` (grant rings, return
    their keys), ``connect`` (read device properties) and ``disconnect``.
    Set ``skip_initialised = True`` for devices that go straight to
    ``Connected`` after publishing (netfront).  After a fatal error a
    frontend stays closed (as Linux frontends do) instead of retrying."""

    role = Role.FRONTEND

    @classmethod
    def for_device(cls, store: Store, device: DeviceId, **kwargs):
        return cls(store, device.frontend, device.frontend_domid, **kwargs)

    def _on_fatal(self) -> None:
        self.local = replace(self.local, closing=True)


class Backend(Driver):
    """The driver-domain end.  Subclasses implement ``publish`` (features),
    ``connect`` (map rings, return device properties), ``disconnect`` and
    ``remove``.  ``online`` other than ``1`` in the backend directory means
    "close and do not reconnect" (toolstack unplug); so does
    :meth:`request_close`."""

    role = Role.BACKEND

    def __init__(self, store: Store, nodename: str, own_domid: int) -> None:
        super().__init__(store, nodename, own_domid)
        self._close_requested = False

    @classmethod
    def for_device(cls, store: Store, device: DeviceId, **kwargs):
        return cls(store, device.backend, device.backend_domid, **kwargs)

    def request_close(self) -> None:
        self._close_requested = True
        super().request_close()

    def _watched_paths(self) -> list[str]:
        return [*super()._watched_paths(), f"{self.nodename}/online"]

    async def _refresh_local(self) -> None:
        try:
            online = (await self.store.read(f"{self.nodename}/online")).strip() == b"1"
        except XenStoreError:
            online = False
        closing = self._close_requested or not online
        if closing != self.local.closing:
            self.local = replace(self.local, closing=closing)
