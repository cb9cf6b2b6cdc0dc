"""What a domain or toolstack process uses to talk to the hypervisor service.

How a process becomes a domain:

* **dom0** (toolstack, xenstored, backends): ``open_hypervisor(path)`` with
  the service's socket path (or ``$UXEN_HYPERVISOR_SOCKET``).
* **a guest**: dom0 calls :meth:`HypervisorClient.create_domain`, which
  returns the new domid and a connected socket fd; it starts the guest
  process with that fd (``pass_fds``, and ``UXEN_HYPERVISOR_FD=<fd>`` in its
  environment) and closes its own copy.  The guest calls
  ``open_hypervisor(fd=...)`` (or ``open_hypervisor()``, which reads the
  environment).  Closing that connection — or the process dying — destroys
  the domain.

Every connection maps its domain's memory (:attr:`HypervisorClient.memory`)
and grant table (:attr:`HypervisorClient.grant_table`) at start.  Granting is
local (write an entry in your own table); everything else is a request to the
service.  Event channels come back as :class:`ringbuf.evtchn.EventChannel`
with their eventfds; the client's background task feeds them the service's
"peer closed" notices, so a waiter never hangs on a dead peer.
"""

from __future__ import annotations

import itertools
import os
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

import trio

from .._trio_util import open_background_nursery
from ..evtchn import EventChannel
from ..grants import (GNTST_no_device_space, GNTTAB_NR_RESERVED_ENTRIES, GTF_permit_access, GTF_readonly, CopySegment,
                      GrantError, GrantRefAllocator, GrantTableView)
from ..memory import DomainMemory
from . import protocol
from .domains import DOMID_SELF, DomainInfo
from .mapping import GrantMapping
from .protocol import Notice, ProtocolError, Reply, Request
from .transport import close_fds, recv_packet, send_packet

__all__ = ["HypervisorClient", "HypervisorError", "open_hypervisor", "ENV_FD", "ENV_SOCKET"]

ENV_FD = "UXEN_HYPERVISOR_FD"
ENV_SOCKET = "UXEN_HYPERVISOR_SOCKET"


class HypervisorError(Exception):
    """The service refused a request (``code`` is an errno name) or is gone."""

    def __init__(self, code: str, message: str = "") -> None:
        self.code = code
        super().__init__(f"{code}: {message}" if message else code)


class _Pending:
    __slots__ = ("event", "reply", "fds")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: Reply | None = None
        self.fds: list[int] = []


class HypervisorClient:
    """A connection to the service, as one domain.  Use :func:`open_hypervisor`."""

    domid: int
    privileged: bool
    memory: DomainMemory
    grant_table: GrantTableView

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._channels: dict[int, EventChannel] = {}
        self._mappings: dict[int, GrantMapping] = {}
        self._nursery: trio.Nursery | None = None
        self._broken: str | None = None
        self._gnttab: DomainMemory | None = None
        self._refs: GrantRefAllocator | None = None

    # -- plumbing ----------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._read_loop)
        result, fds = await self._call("hello")
        try:
            self.domid = result["domid"]
            self.privileged = result["privileged"]
            self.memory = DomainMemory(fds[0], result["nr_pages"])
            self._gnttab = DomainMemory(fds[1], result["grant_frames"])
        except BaseException:
            close_fds(fds)
            raise
        self.grant_table = GrantTableView(self._gnttab.buffer)
        self._refs = GrantRefAllocator(range(start, stop) for start, stop in result["refs"])

    async def _read_loop(self) -> None:
        reason = "connection to the hypervisor service closed"
        try:
            while True:
                data, fds = await recv_packet(self._sock)
                if not data:
                    close_fds(fds)
                    break
                msg = protocol.decode(data, len(fds))
                if isinstance(msg, Reply):
                    slot = self._pending.pop(msg.id, None)
                    if slot is None:
                        close_fds(fds)  # the caller gave up (cancelled)
                        continue
                    slot.reply, slot.fds = msg, fds
                    slot.event.set()
                elif isinstance(msg, Notice):
                    self._on_notice(msg)
                else:
                    raise ProtocolError("the service sent a request")
        except (OSError, ProtocolError) as exc:
            reason = f"hypervisor service connection broken: {exc}"
        finally:
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        """The service is gone: fail pending calls, wake every port's waiters."""
        if self._broken is None:
            self._broken = reason
        for slot in self._pending.values():
            slot.event.set()
        self._pending.clear()
        for channel in list(self._channels.values()):
            channel.mark_peer_closed()

    def _on_notice(self, notice: Notice) -> None:
        port = notice.args.get("port")
        channel = self._channels.get(port) if isinstance(port, int) else None
        if channel is None:
            return
        if notice.kind == "peer_closed":
            channel.mark_peer_closed()
        elif notice.kind == "peer_bound":
            channel.mark_peer_bound()

    async def _call(self, op: str, **args: Any) -> tuple[Any, list[int]]:
        if self._broken is not None:
            raise HypervisorError("EPIPE", self._broken)
        rid = next(self._ids)
        slot = _Pending()
        self._pending[rid] = slot
        try:
            async with self._send_lock:
                try:
                    await send_packet(self._sock, protocol.encode(Request(rid, op, args)))
                except OSError as exc:
                    raise HypervisorError("EPIPE", f"hypervisor service gone: {exc}") from None
            await slot.event.wait()
        except BaseException:
            self._pending.pop(rid, None)
            close_fds(slot.fds)
            raise
        reply = slot.reply
        if reply is None:
            raise HypervisorError("EPIPE", self._broken or "no reply")
        if reply.error is not None:
            if reply.grant_status is not None:
                raise GrantError(reply.grant_status, reply.message)
            raise HypervisorError(reply.error, reply.message)
        return reply.result, slot.fds

    async def _call_no_fds(self, op: str, **args: Any) -> Any:
        result, fds = await self._call(op, **args)
        close_fds(fds)
        return result

    async def _aclose(self) -> None:
        for channel in list(self._channels.values()):
            channel.close()
        self._channels.clear()
        for mapping in list(self._mappings.values()):
            try:
                mapping.close()
            except BufferError:
                pass  # views still alive: the memory stays mapped until they go
        self._mappings.clear()
        self.grant_table.release()
        for mem in (self.memory, self._gnttab):
            try:
                mem.close()  # type: ignore[union-attr]
            except BufferError:
                pass
        self._sock.close()

    @property
    def nr_pages(self) -> int:
        return self.memory.nr_pages

    # -- domains -------------------------------------------------------------

    async def create_domain(self, nr_pages: int, grant_frames: int = 4) -> tuple[int, int]:
        """Create a guest (privileged).  Returns ``(domid, fd)``: hand ``fd`` to
        the guest process and close your copy."""
        result, fds = await self._call("create_domain", nr_pages=nr_pages, grant_frames=grant_frames)
        return result["domid"], fds[0]

    async def destroy_domain(self, domid: int) -> None:
        await self._call_no_fds("destroy_domain", domid=domid)

    async def domain_info(self, domid: int = DOMID_SELF) -> DomainInfo | None:
        """Like ``xc_domain_getinfo`` for one domain; None if it does not exist."""
        info = await self._call_no_fds("domain_info", domid=domid)
        return None if info is None else DomainInfo(*info)

    async def list_domains(self) -> list[DomainInfo]:
        return [DomainInfo(*info) for info in await self._call_no_fds("list_domains")]

    async def shutdown(self, reason: int) -> None:
        """Report this domain shut down (``SHUTDOWN_*``); raises VIRQ_DOM_EXC."""
        await self._call_no_fds("shutdown", reason=reason)

    async def foreign_memory(self, domid: int) -> tuple[DomainMemory, DomainMemory]:
        """Map another domain's memory and grant table (privileged, like privcmd)."""
        result, fds = await self._call("foreign_memory", domid=domid)
        try:
            return (DomainMemory(fds[0], result["nr_pages"]),
                    DomainMemory(fds[1], result["grant_frames"]))
        except BaseException:
            close_fds(fds)
            raise

    # -- grants ----------------------------------------------------------------

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        """Grant ``domid`` access to our frame ``gfn``; returns the ref.

        Local only: the entry is written into our own grant table, with a ref
        from the ones this connection owns (GrantError if none is left: see
        :meth:`reserve_grant_refs`)."""
        if not 0 <= gfn < self.memory.nr_pages:
            raise ValueError(f"frame {gfn} outside our memory")
        ref = self._refs.alloc()  # type: ignore[union-attr]
        self.grant_table.write(ref, domid, gfn, GTF_permit_access | (GTF_readonly if readonly else 0))
        return ref

    @property
    def free_grant_refs(self) -> int:
        """Refs :meth:`grant_access` can still hand out without :meth:`reserve_grant_refs`."""
        return self._refs.available  # type: ignore[union-attr]

    async def reserve_grant_refs(self, count: int) -> None:
        """Make sure at least ``count`` refs are free for :meth:`grant_access`.

        The service splits a domain's refs between its connections (several
        dom0 processes share dom0's table); a guest's own connection already
        owns its whole table."""
        missing = count - self._refs.available  # type: ignore[union-attr]
        if missing > 0:
            for start, stop in await self._call_no_fds("reserve_refs", count=missing):
                self._refs.add(range(start, stop))  # type: ignore[union-attr]
            if self._refs.available < count:  # type: ignore[union-attr]
                raise GrantError(GNTST_no_device_space, "grant table exhausted")

    async def end_access(self, ref: int) -> None:
        """Revoke a grant; GrantError(GNTST_eagain) while it is mapped."""
        await self._call_no_fds("end_access", ref=ref)
        if ref >= GNTTAB_NR_RESERVED_ENTRIES:
            try:
                self._refs.free(ref)  # type: ignore[union-attr]
            except ValueError:
                pass  # written by hand, not from our allocator

    async def seed_grant(self, domid: int, ref: int, grantee: int, gfn: int, readonly: bool = False) -> None:
        """Fill a (reserved) entry of a guest's table (privileged toolstack op)."""
        await self._call_no_fds("seed_grant", domid=domid, ref=ref, grantee=grantee, gfn=gfn,
                                readonly=readonly)

    async def map_grants(self, domid: int, refs: Sequence[int], readonly: bool = False) -> GrantMapping:
        """Map refs of ``domid`` (all or nothing) as one contiguous buffer."""
        refs = list(refs)
        result, fds = await self._call("map_grants", domid=domid, refs=refs, readonly=readonly)
        try:
            mapping = GrantMapping(domid, refs, result["handle"], result["frames"], readonly, fds[0])
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._call_no_fds("unmap_grants", handle=result["handle"])
            raise
        finally:
            close_fds(fds)
        self._mappings[mapping.handle] = mapping
        return mapping

    async def unmap_grants(self, mapping: GrantMapping) -> None:
        """Unmap locally (views must be released), then tell the service."""
        mapping.close()
        self._mappings.pop(mapping.handle, None)
        await self._call_no_fds("unmap_grants", handle=mapping.handle)

    async def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Hypervisor-mediated copies; one ``GNTST_*`` status per segment."""
        wire = [[[s.domid, s.offset, s.ref, s.gfn] for s in (seg.source, seg.dest)] + [seg.length]
                for seg in segments]
        return await self._call_no_fds("grant_copy", segments=wire)

    # -- event channels --------------------------------------------------------

    def _channel(self, port: int, fds: list[int]) -> EventChannel:
        channel = EventChannel(port, fds[0], fds[1] if len(fds) > 1 else None,
                               on_close=self._on_channel_close)
        old = self._channels.get(port)
        if old is not None:
            self._channels.pop(port)
            old.close()
        self._channels[port] = channel
        return channel

    def _on_channel_close(self, channel: EventChannel) -> None:
        if self._channels.get(channel.port) is not channel:
            return
        del self._channels[channel.port]
        if self._broken is None and self._nursery is not None:
            try:
                self._nursery.start_soon(self._close_port_quietly, channel.port)
            except RuntimeError:
                pass  # shutting down: the service closes it with the connection

    async def _close_port_quietly(self, port: int) -> None:
        try:
            await self._call_no_fds("close_port", port=port)
        except HypervisorError:
            pass

    async def alloc_unbound(self, remote_dom: int) -> EventChannel:
        """A new port of ours that ``remote_dom`` may bind (``EVTCHNOP_alloc_unbound``)."""
        result, fds = await self._call("alloc_unbound", dom=DOMID_SELF, remote_dom=remote_dom)
        return self._channel(result["port"], fds)

    async def alloc_unbound_for(self, dom: int, remote_dom: int) -> int:
        """Allocate a port in another domain (privileged); it gets it with :meth:`attach_port`."""
        return (await self._call_no_fds("alloc_unbound", dom=dom, remote_dom=remote_dom))["port"]

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> EventChannel:
        """Bind to an unbound port of ``remote_dom``; the new port starts pending."""
        result, fds = await self._call("bind_interdomain", remote_dom=remote_dom, remote_port=remote_port)
        return self._channel(result["port"], fds)

    async def bind_virq(self, virq: int) -> EventChannel:
        """Bind a global VIRQ (``VIRQ_DOM_EXC``), privileged; notify() is refused."""
        result, fds = await self._call("bind_virq", virq=virq)
        return self._channel(result["port"], fds)

    async def attach_port(self, port: int) -> EventChannel:
        """Get the endpoint of an existing port of our domain (e.g. one the
        toolstack allocated for us)."""
        result, fds = await self._call("attach_port", port=port)
        return self._channel(result["port"], fds)

    async def close_port(self, channel: EventChannel) -> None:
        """Close a port and wait until the service has done so."""
        if self._channels.get(channel.port) is channel:
            del self._channels[channel.port]
        channel.close()
        await self._call_no_fds("close_port", port=channel.port)

    async def port_status(self, port: int, dom: int = DOMID_SELF) -> dict[str, Any]:
        """``EVTCHNOP_status``: ``state`` (``PortState``), remote end, virq."""
        return await self._call_no_fds("port_status", dom=dom, port=port)


@asynccontextmanager
async def open_hypervisor(path: str | None = None, *, fd: int | None = None) -> AsyncIterator[HypervisorClient]:
    """Connect as dom0 (``path``) or as the domain owning connection ``fd``.

    With neither, ``$UXEN_HYPERVISOR_FD`` then ``$UXEN_HYPERVISOR_SOCKET`` are
    used.  The connection (and so, for a guest, the domain) ends with the block.
    """
    if path is None and fd is None:
        if os.environ.get(ENV_FD):
            fd = int(os.environ[ENV_FD])
        elif os.environ.get(ENV_SOCKET):
            path = os.environ[ENV_SOCKET]
        else:
            raise HypervisorError("EINVAL", f"no socket path, fd, ${ENV_FD} or ${ENV_SOCKET}")
    if fd is not None:
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    else:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
    client = HypervisorClient(sock)
    try:
        async with open_background_nursery() as nursery:
            await client._start(nursery)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if hasattr(client, "memory"):
            await client._aclose()
        else:
            sock.close()
