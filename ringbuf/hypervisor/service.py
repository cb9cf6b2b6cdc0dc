"""The hypervisor service: single authority over domains, memory, grants, ports.

A trio server on a ``SOCK_SEQPACKET`` unix socket.  Who a process is comes
from the connection it uses, never from what it claims:

* connecting to the service's socket path makes you **dom0** (privileged);
  the path is created mode 0600, like ``/dev/xen/privcmd``.  Many dom0
  processes (toolstack, xenstored, backends) may connect at once; each
  connection is a private set of ports and mappings, released when it closes.
* ``create_domain`` answers with a fresh socketpair end already bound to the
  new domid.  The toolstack hands it to the guest process (``pass_fds``) and
  closes its own copy.  That connection *is* the domain: when it reaches end
  of stream (the process exited or was killed), the domain dies.

When a domain dies it is marked dying, its own mappings are released, its
ports closed (peers get a ``peer_closed`` notice), ``VIRQ_DOM_EXC`` is
raised, and once no other domain maps its pages any more its memory is freed
and it disappears from the domain list.

All decisions are made by the pure tables (:mod:`.domains`, :mod:`.ports`,
:class:`ringbuf.grants.GrantAuthority`); this module moves bytes and fds.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import trio

from .._trio_util import open_background_nursery
from ..evtchn import VIRQ_DOM_EXC, new_eventfd
from ..grants import (ENTRIES_PER_FRAME, GNTST_bad_handle, CopySegment, CopySide, GrantAuthority,
                      GrantError, RefBlocks)
from ..memory import DomainMemory
from . import protocol
from .domains import DOMID_FIRST_RESERVED, DOMID_SELF, Domain, DomainTable
from .ports import Effects, PortError, PortState, PortTable
from .protocol import Notice, ProtocolError, Reply, Request
from .transport import close_fds, recv_packet, send_packet

__all__ = ["HypervisorService", "ServiceLimits", "HvError"]

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")


class HvError(Exception):
    """A request is refused with an errno name (``EPERM``, ``EINVAL``, ...)."""

    def __init__(self, err: int, message: str) -> None:
        self.err = err
        super().__init__(message)


@dataclass(frozen=True)
class ServiceLimits:
    dom0_pages: int = 256
    dom0_grant_frames: int = 16
    max_domain_pages: int = 1 << 18  # 1 GiB
    max_grant_frames: int = 64
    #: queued outgoing messages per connection before it is dropped
    max_queued: int = 256
    #: event-channel ports per domain (libxl's default max_event_channels);
    #: each port costs the service up to two eventfds
    max_ports: int = 1024
    #: live grant mappings per domain (Xen's maptrack limit)
    max_maps: int = 4096
    #: grant refs handed to a dom0 connection at a time (a guest's single
    #: connection owns its whole table)
    ref_block: int = 256


class _Connection:
    def __init__(self, sock: trio.socket.SocketType, domid: int, is_domain: bool, max_queued: int):
        self.sock = sock
        self.domid = domid
        self.is_domain = is_domain  # its end of stream kills the domain
        self.send_queue, self.recv_queue = trio.open_memory_channel[tuple[bytes, list[int]]](max_queued)
        self.lost = False

    def __repr__(self) -> str:
        return f"<connection dom{self.domid}{' (domain)' if self.is_domain else ''}>"


class _DomainFiles:
    """A domain's memory and grant-table files as the service holds them."""

    def __init__(self, memory: DomainMemory, gnttab: DomainMemory, ref_blocks: RefBlocks) -> None:
        self.memory = memory
        self.gnttab = gnttab
        self.ref_blocks = ref_blocks
        # A separate read-only open file of the memory, handed out for
        # read-only grant maps: the kernel refuses PROT_WRITE maps of it.
        self.readonly_fd = os.open(f"/proc/self/fd/{memory.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        self.memory.close()
        self.gnttab.close()
        os.close(self.readonly_fd)


class HypervisorService:
    def __init__(self, limits: ServiceLimits = ServiceLimits()) -> None:
        self.limits = limits
        self.domains = DomainTable()
        self.grants = GrantAuthority(limits.max_maps)
        self.ports = PortTable(new_eventfd, limits.max_ports)
        self._files: dict[int, _DomainFiles] = {}
        self._handles: dict[int, _Connection] = {}  # grant map handle → owner
        self._transient_fds: list[int] = []  # closed once the current reply is queued
        self._connections: set[_Connection] = set()
        self._nursery: trio.Nursery | None = None
        self._add_domain(self.domains.create_dom0(limits.dom0_pages, limits.dom0_grant_frames))
        self._ops: dict[str, Callable[[_Connection, dict], tuple[Any, list[int]]]] = {
            op: getattr(self, f"_op_{op}") for op in protocol.OPS
        }

    # -- serving -----------------------------------------------------------

    async def serve(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``path`` (replacing a stale socket) until cancelled."""
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            await listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
        try:
            async with open_background_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    self._start_connection(sock, domid=0, is_domain=False)
        finally:
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass

    def _start_connection(self, sock: trio.socket.SocketType, domid: int, is_domain: bool) -> None:
        assert self._nursery is not None
        conn = _Connection(sock, domid, is_domain, self.limits.max_queued)
        self._connections.add(conn)
        self._nursery.start_soon(self._run_connection, conn)

    async def _run_connection(self, conn: _Connection) -> None:
        try:
            async with open_background_nursery() as nursery:
                nursery.start_soon(self._write_loop, conn, nursery.cancel_scope)
                await self._read_loop(conn)
                nursery.cancel_scope.cancel()
        finally:
            try:
                self._connection_lost(conn)
            except Exception:  # a cleanup bug must not stop the service
                log.exception("%r: cleanup failed", conn)
            conn.sock.close()
            # fds still queued for this peer were dups made for it
            while True:
                try:
                    _data, fds = conn.recv_queue.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                close_fds(fds)

    async def _read_loop(self, conn: _Connection) -> None:
        while not conn.lost:
            try:
                data, fds = await recv_packet(conn.sock)
                # Clients never send descriptors; decode() rejects a request
                # that came with some, and we must not keep them either way.
                close_fds(fds)
                if not data:
                    return
                msg = protocol.decode(data, len(fds))
            except (ProtocolError, OSError) as exc:
                log.warning("%r: dropping connection: %s", conn, exc)
                return
            if not isinstance(msg, Request):
                log.warning("%r: dropping connection: expected a request", conn)
                return
            self._send(conn, *self._handle(conn, msg))
            close_fds(self._transient_fds)
            self._transient_fds.clear()

    async def _write_loop(self, conn: _Connection, cancel_scope: trio.CancelScope) -> None:
        async for data, fds in conn.recv_queue:
            try:
                await send_packet(conn.sock, data, fds)
            except OSError as exc:
                log.warning("%r: send failed: %s", conn, exc)
                cancel_scope.cancel()
                return
            finally:
                close_fds(fds)

    def _send(self, conn: _Connection, msg: Reply | Notice, fds: Sequence[int] = ()) -> None:
        if conn.lost:
            return
        try:
            data = protocol.encode(msg)
        except ValueError as exc:  # a reply too large for one packet
            if not isinstance(msg, Reply):
                raise
            data, fds = protocol.encode(Reply(msg.id, error="E2BIG", message=str(exc))), ()
        dups = [os.dup(fd) for fd in fds]  # the originals may be closed before the writer runs
        try:
            conn.send_queue.send_nowait((data, dups))
        except trio.WouldBlock:
            close_fds(dups)
            log.warning("%r: not reading its messages; dropping it", conn)
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _handle(self, conn: _Connection, req: Request) -> tuple[Reply, list[int]]:
        reason = protocol.validate_args(req.op, req.args)
        if reason is not None:
            return Reply(req.id, error="EINVAL", message=reason), []
        dom = self.domains.get(conn.domid)
        if dom is None or dom.dying:
            return Reply(req.id, error="ESRCH", message="your domain is dying"), []
        if req.op in protocol.PRIVILEGED_OPS and not dom.privileged:
            return Reply(req.id, error="EPERM", message=f"{req.op} is privileged"), []
        try:
            result, fds = self._ops[req.op](conn, req.args)
        except GrantError as exc:
            return Reply(req.id, error="EGRANT", message=exc.detail, grant_status=exc.status), []
        except (HvError, PortError) as exc:
            code = exc.err if isinstance(exc, HvError) else exc.errno
            return Reply(req.id, error=errno.errorcode.get(code, "EIO"), message=str(exc)), []
        except Exception:  # a bug must not take every domain down with the service
            log.exception("%r: %s failed", conn, req.op)
            return Reply(req.id, error="EIO", message=f"internal error in {req.op}"), []
        return Reply(req.id, result=result, nfds=len(fds)), fds

    # -- domains -------------------------------------------------------------

    def _add_domain(self, dom: Domain) -> None:
        blocks = RefBlocks(dom.grant_frames * ENTRIES_PER_FRAME, self.limits.ref_block)
        with ExitStack() as undo:
            memory = DomainMemory.create(dom.nr_pages, f"uxen-dom{dom.domid}-memory")
            undo.callback(memory.close)
            gnttab = DomainMemory.create(dom.grant_frames, f"uxen-dom{dom.domid}-gnttab")
            undo.callback(gnttab.close)
            self._files[dom.domid] = _DomainFiles(memory, gnttab, blocks)
            undo.pop_all()
        self.grants.add_domain(dom.domid, gnttab.buffer, memory.buffer)

    def _resolve_domid(self, conn: _Connection, domid: int) -> int:
        return conn.domid if domid == DOMID_SELF else domid

    def _existing(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None or dom.dying:
            raise HvError(errno.ESRCH, f"no domain {domid}")
        return dom

    def _raise_dom_exc(self) -> None:
        port = self.ports.virq_port(VIRQ_DOM_EXC)
        if port is not None:
            os.write(port.own_efd, _ONE)

    def kill_domain(self, domid: int) -> None:
        """Start tearing a guest down (idempotent)."""
        dom = self.domains.get(domid)
        if dom is None or dom.dying or dom.privileged:
            return
        dom.dying = True
        self.grants.mark_dying(domid)
        for conn in [c for c in self._connections if c.domid == domid]:
            self._drop(conn)
        for handle in self.grants.handles_of(domid):
            self._unmap(handle)
        self._apply(self.ports.close_domain(domid))
        self._raise_dom_exc()
        self._maybe_finish(domid)

    def _maybe_finish(self, domid: int) -> None:
        dom = self.domains.get(domid)
        if dom is None or not dom.dying or self.grants.foreign_maps(domid):
            return  # still mapped by someone: stays dying, like a Xen zombie
        self.grants.remove_domain(domid)
        self._files.pop(domid).close()
        self.domains.remove(domid)
        self._raise_dom_exc()

    def _connection_lost(self, conn: _Connection) -> None:
        if conn.lost:
            return
        conn.lost = True
        self._connections.discard(conn)
        conn.send_queue.close()
        for handle in [h for h, owner in self._handles.items() if owner is conn]:
            self._unmap(handle)
        self._apply(self.ports.close_owned(conn))
        files = self._files.get(conn.domid)
        if files is not None:
            # What a vanished process granted is revoked (unless mapped), and
            # its refs go back to the domain's pool.
            blocks = files.ref_blocks.release(
                conn, in_use=lambda ref: self.grants.is_mapped(conn.domid, ref))
            self.grants.revoke_unmapped(conn.domid, (r for refs in blocks for r in refs))
        if conn.is_domain:
            self.kill_domain(conn.domid)

    def _apply(self, effects: Effects) -> None:
        for notice in effects.notices:
            owner = notice.owner
            if isinstance(owner, _Connection) and not owner.lost:
                self._send(owner, Notice(notice.kind, {"port": notice.port}))
        close_fds(effects.close_fds)

    # -- ops: domains ----------------------------------------------------------

    def _op_hello(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        dom = self._existing(conn.domid)
        files = self._files[conn.domid]
        if conn.is_domain:
            refs = files.ref_blocks.claim_all(conn)
        else:
            refs = files.ref_blocks.claim(conn, self.limits.ref_block)
        result = {"domid": dom.domid, "privileged": dom.privileged, "nr_pages": dom.nr_pages,
                  "grant_frames": dom.grant_frames, "refs": [[r.start, r.stop] for r in refs]}
        return result, [files.memory.fd, files.gnttab.fd]

    def _op_create_domain(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        nr_pages, frames = args["nr_pages"], args["grant_frames"]
        if not 0 < nr_pages <= self.limits.max_domain_pages:
            raise HvError(errno.EINVAL, f"nr_pages must be 1..{self.limits.max_domain_pages}")
        if not 0 < frames <= self.limits.max_grant_frames:
            raise HvError(errno.EINVAL, f"grant_frames must be 1..{self.limits.max_grant_frames}")
        try:
            dom = self.domains.create(nr_pages, frames)
        except OSError as exc:
            raise HvError(exc.errno or errno.ENOSPC, str(exc)) from None
        try:
            self._add_domain(dom)
        except OSError as exc:
            self.domains.remove(dom.domid)
            raise HvError(exc.errno or errno.ENOMEM, f"cannot allocate memory: {exc}") from None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._start_connection(trio.socket.from_stdlib_socket(ours), dom.domid, is_domain=True)
        fd = theirs.detach()
        # The reply carries a dup; our copy must go so that the guest end
        # reaches end of stream exactly when the guest process is gone.
        self._transient_fds.append(fd)
        return {"domid": dom.domid}, [fd]

    def _op_destroy_domain(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        domid = args["domid"]
        dom = self.domains.get(domid)
        if dom is None:
            raise HvError(errno.ESRCH, f"no domain {domid}")
        if dom.privileged:
            raise HvError(errno.EINVAL, "cannot destroy dom0")
        self.kill_domain(domid)
        return None, []

    def _op_domain_info(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        domid = self._resolve_domid(conn, args["domid"])
        if domid != conn.domid and not self.domains.get(conn.domid).privileged:  # type: ignore[union-attr]
            raise HvError(errno.EPERM, "only dom0 may query other domains")
        dom = self.domains.get(domid)
        return (list(dom.info()) if dom else None), []

    def _op_list_domains(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        return [list(info) for info in self.domains.infos()], []

    def _op_shutdown(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        dom = self._existing(conn.domid)
        if dom.privileged:
            raise HvError(errno.EINVAL, "dom0 does not shut down through the service")
        if dom.shutdown_reason is None:
            dom.shutdown_reason = args["reason"]
            self._raise_dom_exc()
        return None, []

    def _op_foreign_memory(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        dom = self._existing(args["domid"])
        files = self._files[dom.domid]
        return {"nr_pages": dom.nr_pages, "grant_frames": dom.grant_frames}, [
            files.memory.fd, files.gnttab.fd]

    # -- ops: grants -----------------------------------------------------------

    def _op_seed_grant(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        """Toolstack pre-fills a reserved ref of a guest (xc_dom_gnttab_seed)."""
        dom = self._existing(args["domid"])
        self.grants.seed(dom.domid, args["ref"], args["grantee"], args["gfn"], args["readonly"])
        return None, []

    def _op_reserve_refs(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        refs = self._files[conn.domid].ref_blocks.claim(conn, args["count"])
        if not refs:
            raise HvError(errno.ENOSPC, "grant table exhausted")
        return [[r.start, r.stop] for r in refs], []

    def _op_end_access(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        self.grants.end_access(conn.domid, args["ref"])
        return None, []

    def _op_map_grants(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        granter = self._resolve_domid(conn, args["domid"])
        readonly = args["readonly"]
        handle, frames = self.grants.map(conn.domid, granter, args["refs"], readonly)
        self._handles[handle] = conn
        files = self._files[granter]
        fd = files.readonly_fd if readonly else files.memory.fd
        return {"handle": handle, "frames": frames, "readonly": readonly}, [fd]

    def _unmap(self, handle: int) -> None:
        self._handles.pop(handle, None)
        mapper = self.grants.mapper_of(handle)
        if mapper is not None:
            self._maybe_finish(self.grants.unmap(mapper, handle))

    def _op_unmap_grants(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        handle = args["handle"]
        if self._handles.get(handle) is not conn:
            raise GrantError(GNTST_bad_handle, f"handle {handle}")
        self._unmap(handle)
        return None, []

    def _op_grant_copy(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        segments = []
        for src, dst, length in args["segments"]:
            sides = []
            for domid, offset, ref, gfn in (src, dst):
                sides.append(CopySide(self._resolve_domid(conn, domid), offset, ref, gfn))
            segments.append(CopySegment(sides[0], sides[1], length))
        return self.grants.copy(conn.domid, segments), []

    # -- ops: event channels -----------------------------------------------------

    @staticmethod
    def _port_fds(port: Any) -> list[int]:
        return [port.own_efd] if port.peer_efd is None else [port.own_efd, port.peer_efd]

    def _op_alloc_unbound(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        domid = self._resolve_domid(conn, args["dom"])
        if domid != conn.domid and not self.domains.get(conn.domid).privileged:  # type: ignore[union-attr]
            raise HvError(errno.EPERM, "only dom0 may allocate ports for other domains")
        self._existing(domid)
        remote = domid if args["remote_dom"] == DOMID_SELF else args["remote_dom"]
        if remote >= DOMID_FIRST_RESERVED:
            raise HvError(errno.EINVAL, f"bad remote domain {remote}")
        self._existing(remote)
        mine = domid == conn.domid
        port = self.ports.alloc_unbound(domid, remote, conn if mine else None)
        return {"port": port.port}, self._port_fds(port) if mine else []

    def _op_bind_interdomain(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        remote = self._resolve_domid(conn, args["remote_dom"])
        self._existing(remote)
        port, effects = self.ports.bind_interdomain(conn.domid, remote, args["remote_port"], conn)
        os.write(port.own_efd, _ONE)  # Xen sets a freshly bound port pending
        self._apply(effects)
        return {"port": port.port}, self._port_fds(port)

    def _op_bind_virq(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        if args["virq"] != VIRQ_DOM_EXC:
            raise HvError(errno.EINVAL, f"VIRQ {args['virq']} is not provided")
        port = self.ports.bind_virq(conn.domid, args["virq"], conn)
        return {"port": port.port}, self._port_fds(port)

    def _op_attach_port(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        port = self.ports.attach(conn.domid, args["port"], conn)
        return {"port": port.port, "state": int(port.state)}, self._port_fds(port)

    def _op_close_port(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        self._apply(self.ports.close(conn.domid, args["port"]))
        return None, []

    def _op_port_status(self, conn: _Connection, args: dict) -> tuple[Any, list[int]]:
        domid = self._resolve_domid(conn, args["dom"])
        if domid != conn.domid and not self.domains.get(conn.domid).privileged:  # type: ignore[union-attr]
            raise HvError(errno.EPERM, "only dom0 may query other domains' ports")
        port = self.ports.get(domid, args["port"])
        if port is None:
            return {"state": int(PortState.CLOSED)}, []
        return {"state": int(port.state), "remote_dom": port.remote_dom,
                "remote_port": port.remote_port, "virq": port.virq}, []

    # -- introspection for tests ---------------------------------------------------

    def statistics(self) -> dict[str, int]:
        return {"domains": len(self.domains), "connections": len(self._connections),
                "mappings": len(self._handles), "eventfds": len(self.ports.live_eventfds())}

