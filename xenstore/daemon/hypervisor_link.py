"""xenstored's link to the hypervisor service: guests' rings, their life cycle.

Started when the daemon has a hypervisor socket (``--hypervisor PATH``).
It carries out the engine's effects (fact sheet §3.9.2 step 6, §3.9.4):

* ``Introduced(domid, gfn, port, pending)`` of a new domain: map the
  guest's grant ref 1 (``GNTTAB_RESERVED_XENSTORE``, like cxenstored, not
  the gfn) and bind an interdomain event channel to ``(domid, port)``.  If
  either fails, the INTRODUCE is answered with that call's errno
  (``Engine.complete_introduce(pending, error)``; a domain the hypervisor
  does not know, or a grant that does not map, gives EINVAL, like
  cxenstored on Linux) and nothing else happens.  On success: offer the
  ring features (RECONNECTION and ERROR, as far as the domain's feature set
  allows), create the guest's unprivileged engine connection, complete the
  INTRODUCE in the engine (``@introduceDomain``), zero the ring indices and,
  if the guest waits with ``connection == 1``, set it to 0 and notify
  (cxenstored 4.17.3+ order), start serving the ring
  (:class:`~xenstore.daemon.domain_conn.DomainConnection`), and only then
  send the OK.  So a guest may use its ring as soon as the toolstack got
  the OK.  Of a known domain (resume): rebind the channel to the new port
  and restart the ring (that INTRODUCE was answered at once).
* ``Released(domid)`` (RELEASE or death): stop serving, drop the engine
  connection, unbind the channel, unmap the page.

and it binds ``VIRQ_DOM_EXC``: on each one it lists the hypervisor's
domains (cxenstored ``check_domains``): an introduced domain that is dying
or gone is destroyed in the engine (its connection, watches, transactions
and owned nodes go, ``@releaseDomain`` fires); one that shut down fires
``@releaseDomain`` once.

From its construction until :meth:`HypervisorLink.serve` ends, the engine
defers introductions (``engine.defer_introduce``): the toolstack's
connection gets no reply, and none to its later requests, until the map
and bind are done; other connections are served meanwhile (so, unlike in
cxenstored, whose loop blocks in the map, watch events caused by them may
reach the toolstack before its OK).  Introductions are carried out one at
a time, in order, with the other effects; one still waiting when the link
stops fails with EIO.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from ringbuf.byte_ring import ByteRingRole, XenstoreRing
from ringbuf.evtchn import VIRQ_DOM_EXC, EventChannel
from ringbuf.grants import GNTTAB_RESERVED_XENSTORE, GrantError
from ringbuf.hypervisor import GrantMapping, HypervisorClient, HypervisorError, open_hypervisor

from ..core.domains import Introduced, Released
from ..wire import ERROR_NAMES, Packet
from .domain_conn import DomainConnection

__all__ = ["HypervisorLink", "ENV_HYPERVISOR_PATH"]

log = logging.getLogger("xenstored")

#: Environment default of ``--hypervisor``.
ENV_HYPERVISOR_PATH = "UXEN_HYPERVISOR_SOCKET"


class _Guest:
    """A served domain: its ring connection and the resources behind it."""

    __slots__ = ("domain", "mapping")

    def __init__(self, domain: DomainConnection, mapping: GrantMapping) -> None:
        self.domain = domain
        self.mapping = mapping


class HypervisorLink:
    """Connects ``server`` (a :class:`~xenstore.daemon.server.XenstoreServer`)
    to the hypervisor service at ``path``; run :meth:`serve` in the daemon's
    nursery."""

    def __init__(self, server: Any, path: str) -> None:
        self.server = server
        self.engine = server.engine
        self.path = path
        self._guests: dict[int, _Guest] = {}
        self._by_conn: dict[Any, DomainConnection] = {}
        self._effects_send, self._effects_receive = trio.open_memory_channel[Any](math.inf)
        self._hv: HypervisorClient | None = None
        #: Tokens of deferred INTRODUCEs handed to us and not yet completed.
        self._introducing: set[int] = set()
        # Hooked up right away, not in serve(): the server accepts clients
        # before serve() has reached the service, and an INTRODUCE coming in
        # between must wait for its ring too (its effect waits in the queue).
        server.external_sink = self._route
        server.effects_handler = self._on_effects
        self.engine.defer_introduce = True

    # -- public --------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, bind VIRQ_DOM_EXC, then serve until cancelled."""
        try:
            async with open_hypervisor(self.path) as hv:
                self._hv = hv
                try:
                    virq = await hv.bind_virq(VIRQ_DOM_EXC)
                except HypervisorError as exc:  # e.g. another xenstored holds it
                    raise OSError(f"hypervisor service {self.path}: cannot bind VIRQ_DOM_EXC: {exc}") from None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._carry_out_effects)
                    nursery.start_soon(self._watch_domains, virq)
                    task_status.started()
        finally:
            self.engine.defer_introduce = False
            self._abort_introductions()
            self.server.external_sink = None
            self.server.effects_handler = None
            for domid in list(self._guests):
                self._forget(domid)

    def domain(self, domid: int) -> DomainConnection | None:
        guest = self._guests.get(domid)
        return None if guest is None else guest.domain

    def statistics(self) -> dict[str, int]:
        return {"guests": len(self._guests), "serving": sum(g.domain.serving for g in self._guests.values())}

    # -- engine output and effects ----------------------------------------------

    def _route(self, conn: Any, packet: Packet) -> None:
        domain = self._by_conn.get(conn)
        if domain is not None:
            if self.server.tracer:
                self.server.tracer.packet("OUT", conn.id, packet)
            domain.deliver(packet)

    def _submit(self, conn: Any, packets: list[Packet]) -> None:
        handle = self.engine.handle
        tracer = self.server.tracer
        deliveries = []
        for packet in packets:
            if tracer:
                tracer.packet("IN", conn.id, packet)
            try:
                deliveries += handle(conn, packet)
            except Exception:  # an engine bug must not take the daemon down
                log.exception("engine failed on %r", packet)
                deliveries.append((conn, packet.error_reply("EIO")))
        self.server.commit_and_deliver(deliveries)

    def _connect(self, domain: DomainConnection) -> Any:
        """A fresh unprivileged engine connection for the guest."""
        conn = self.engine.connect(domain.domid, privileged=False)
        self._by_conn[conn] = domain
        if self.server.tracer:
            self.server.tracer.connection("CREATE", conn.id)
        return conn

    def _disconnect(self, conn: Any) -> None:
        """Forget an engine connection (idempotent)."""
        self.server.commit_and_deliver(self._disconnect_nowait(conn))

    def _disconnect_nowait(self, conn: Any) -> list:
        """Forget an engine connection; returns the engine's deliveries
        (normally none) for the caller to send."""
        if self._by_conn.pop(conn, None) is not None and self.server.tracer:
            self.server.tracer.connection("DESTROY", conn.id)
        return self.engine.disconnect(conn)

    def _reset_conn(self, conn: Any) -> Any:
        domain = self._by_conn[conn]
        self._disconnect(conn)
        return self._connect(domain)

    def _on_effects(self, effects: list) -> None:
        """Called as the engine's changes are journaled, before any reply
        leaves: a released domain stops being served right now (its next
        request must not be answered); mapping, binding and unbinding are
        requests to the service, done in order by :meth:`_carry_out_effects`."""
        for item in effects:
            if isinstance(item, Released):
                guest = self._forget(item.domid)
                if guest is not None:
                    self._effects_send.send_nowait(guest)
            elif isinstance(item, Introduced):
                if item.pending is not None:
                    self._introducing.add(item.pending)
                self._effects_send.send_nowait(item)

    async def _carry_out_effects(self) -> None:
        async for item in self._effects_receive:
            try:
                if isinstance(item, Introduced):
                    await self._introduced(item)
                elif isinstance(item, _Guest):
                    await self._unbind(item)
                else:  # engine deliveries put off by _forget
                    self.server.commit_and_deliver(item)
            except (HypervisorError, GrantError, OSError) as exc:
                log.error("%r failed: %s", item, exc)
                if isinstance(item, Introduced):  # its INTRODUCE must not wait forever
                    self._finish_introduce(item, getattr(exc, "code", "EIO"))

    # -- introduce / release ---------------------------------------------------------

    async def _introduced(self, item: Introduced) -> None:
        hv = self._hv
        assert hv is not None
        domid = item.domid
        guest = self._guests.get(domid)
        if guest is not None and item.pending is None:
            await self._rebind(guest, item.port)
            return
        if not self._still_wanted(item):
            self._introducing.discard(item.pending)  # type: ignore[arg-type]
            return  # released again (or given up) before we got here
        try:
            mapping = await hv.map_grants(domid, [GNTTAB_RESERVED_XENSTORE])
        except (HypervisorError, GrantError) as exc:
            log.error("domain %d: cannot map its xenstore page: %s", domid, exc)
            # Linux's gntdev reports a grant that does not map as EINVAL.
            self._finish_introduce(item, exc.code if isinstance(exc, HypervisorError) else "EINVAL")
            return
        try:
            channel = await hv.bind_interdomain(domid, item.port)
        except HypervisorError as exc:
            log.error("domain %d: cannot bind port %d: %s", domid, item.port, exc)
            await hv.unmap_grants(mapping)
            self._finish_introduce(item, exc.code)
            return
        if not self._still_wanted(item):  # released meanwhile
            await hv.close_port(channel)
            await hv.unmap_grants(mapping)
            return
        self._serve_new(item, mapping, channel)

    def _still_wanted(self, item: Introduced) -> bool:
        if item.pending is not None:
            return self.engine.introduce_pending(item.pending)
        return self.engine.domains.is_introduced(item.domid)

    def _finish_introduce(self, item: Introduced, error: str) -> None:
        """Mapping or binding failed: the INTRODUCE fails with ``error``
        (idempotent).  An introduction answered before we served (no
        token) is undone instead."""
        if item.pending is None:
            self._destroy(item.domid)
        elif item.pending in self._introducing:
            self._introducing.discard(item.pending)
            if error not in ERROR_NAMES:
                log.info("domain %d: %s has no XenStore name: INTRODUCE fails with EINVAL", item.domid, error)
            self.server.commit_and_deliver(self.engine.complete_introduce(item.pending, error))

    def _abort_introductions(self) -> None:
        """We stop serving: introductions still waiting fail (EIO)."""
        tokens, self._introducing = self._introducing, set()
        for token in tokens:
            try:
                self.server.commit_and_deliver(self.engine.complete_introduce(token, "EIO"))
            except Exception:  # the daemon is going down anyway
                log.exception("cannot answer a pending INTRODUCE")

    def _serve_new(self, item: Introduced, mapping: GrantMapping, channel: EventChannel) -> None:
        """Mapped and bound: complete the INTRODUCE and serve the ring; the
        OK leaves last, once the ring is live (no awaits in here)."""
        domid = item.domid
        deliveries: list = []
        if item.pending is not None:
            self._introducing.discard(item.pending)
            # @introduceDomain + OK, then the replies to the toolstack's
            # requests held behind it (a RELEASE among them is carried out
            # through the effects handler by commit_and_deliver below).
            deliveries = self.engine.complete_introduce(item.pending)
        ring = XenstoreRing(mapping.pages[0], ByteRingRole.SERVER)
        ring.advertise_features(self._features(domid))
        domain = DomainConnection(
            domid,
            None,
            ring,
            channel,
            submit=self._submit,
            reset=self._reset_conn,
            drop=self._disconnect,
            outstanding_limit=lambda: self._outstanding(domid),
            event_limit=self.server.config.event_limit,
            event_timeout=self.server.config.watch_event_timeout,
        )
        domain.conn = self._connect(domain)
        self._guests[domid] = _Guest(domain, mapping)
        # cxenstored >= 4.17.3: zero the four indices, then tell a guest
        # waiting for xenstore (connection == 1, dom0less style) it is there.
        ring.outgoing.reset(0)
        ring.incoming.reset(0)
        if ring.reconnect_requested():
            ring.complete_reconnect()
            channel.notify()
        self.server.add_reader(channel.wait_fd, domain.on_event)
        log.info("domain %d: serving its ring (port %d)", domid, channel.port)
        self.server.commit_and_deliver(deliveries)
        if not domain.closed:
            domain.on_event()

    def _outstanding(self, domid: int) -> int:
        """The domain's ``outstanding`` quota, read live (CONTROL / SET_QUOTA
        may change it); 0 disables the check."""
        value = self.engine.quota("outstanding", domid)
        return value if value > 0 else 1 << 30

    def _features(self, domid: int) -> int:
        domain = self.engine.domains.get(domid)
        return self.engine.features if domain is None else domain.features & self.engine.features

    async def _rebind(self, guest: _Guest, port: int) -> None:
        """Re-introduction: a new binding and a fresh start on the same page."""
        hv = self._hv
        assert hv is not None
        domain = guest.domain
        self.server.remove_reader(domain.channel.wait_fd)
        await hv.close_port(domain.channel)
        domain.channel = await hv.bind_interdomain(domain.domid, port)
        self._disconnect(domain.conn)
        domain.restart(self._connect(domain))
        if not domain.closed:
            self.server.add_reader(domain.channel.wait_fd, domain.on_event)
            domain.on_event()

    async def _unbind(self, guest: _Guest) -> None:
        """The service's half of releasing a domain we no longer serve."""
        hv = self._hv
        assert hv is not None
        try:
            await hv.close_port(guest.domain.channel)
        except HypervisorError:
            pass  # the guest's death closed it already
        await hv.unmap_grants(guest.mapping)  # lets the service free a dead domain
        log.info("domain %d: released", guest.domain.domid)

    def _forget(self, domid: int) -> _Guest | None:
        """Stop serving a domain locally (no awaits): the rest is unbinding."""
        guest = self._guests.pop(domid, None)
        if guest is None:
            return None
        domain = guest.domain
        self.server.remove_reader(domain.channel.wait_fd)
        domain.close()
        # We may be inside the server's journaling step (effects handler):
        # whatever the engine has to send goes out later, from our task.
        deliveries = self._disconnect_nowait(domain.conn)
        if deliveries:
            self._effects_send.send_nowait(deliveries)
        domain.ring.release()
        return guest

    def _destroy(self, domid: int) -> None:
        """Tear a domain down in the engine (nodes, watches, @releaseDomain)."""
        self.server.commit_and_deliver(self.engine.domain_died(domid))

    # -- VIRQ_DOM_EXC ---------------------------------------------------------------

    async def _watch_domains(self, virq: EventChannel) -> None:
        try:
            while True:
                await virq.wait()
                await self.check_domains()
        except (trio.BrokenResourceError, HypervisorError) as exc:
            # Cannot happen with a real hypervisor; keep serving the sockets.
            log.error("lost the hypervisor service (%s): guests are no longer served", exc)

    async def check_domains(self) -> None:
        """cxenstored ``check_domains``: destroy introduced domains that are
        dying or gone, report those that shut down."""
        hv = self._hv
        assert hv is not None
        infos = {info.domid: info for info in await hv.list_domains()}
        for domain in list(self.engine.domains):
            if not domain.introduced or domain.domid == 0:
                continue
            info = infos.get(domain.domid)
            if info is None or info.dying:
                self._destroy(domain.domid)
            elif info.shutdown:
                self.server.commit_and_deliver(self.engine.domain_shutdown(domain.domid))
