"""The service's event-channel port table.  Pure: eventfds are opaque ints.

Every port waits on its own eventfd (``own_efd``) and notifies through
``peer_efd``.  An *unbound* port already owns a ``peer_efd``: the eventfd
reserved for whichever port will bind to it.  Binding hands that reserved
eventfd to the new port as its ``own_efd``, so the allocator never needs to be
told anything to start notifying: sends before the bind just leave the binder
pending (Xen sets a newly bound port pending anyway).

Closing one side of an interdomain channel turns the other side back into an
unbound port that the same remote domain may bind again; its ``peer_efd``
(the closed port's old eventfd) is kept as the reserved one, so a rebinding
port is reachable through the fd the survivor already holds.  Eventfds are
reference counted by the ports naming them; the table tells its caller which
ones to close.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Hashable

__all__ = ["PortState", "Port", "PortNotice", "PortTable", "PortError", "Effects", "NR_PORTS"]

#: 2-level ABI limit for 64-bit guests (64 × 64 ports).
NR_PORTS = 4096


class PortError(OSError):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class PortState(IntEnum):
    """``EVTCHNSTAT_*`` [event_channel.h]"""

    CLOSED = 0
    UNBOUND = 1
    INTERDOMAIN = 2
    VIRQ = 4


@dataclass
class Port:
    domid: int
    port: int
    state: PortState
    own_efd: int
    peer_efd: int | None
    remote_dom: int = 0
    remote_port: int = 0
    virq: int | None = None
    #: the connection holding this port's fds (its closing closes the port);
    #: None for a port allocated on a domain's behalf and not yet attached.
    owner: Hashable | None = None


@dataclass(frozen=True)
class PortNotice:
    """Tell ``owner`` that port ``port`` of ``domid`` changed: ``kind`` is
    ``"peer_closed"`` or ``"peer_bound"``."""

    owner: Hashable
    domid: int
    port: int
    kind: str


@dataclass
class Effects:
    notices: list[PortNotice] = field(default_factory=list)
    close_fds: list[int] = field(default_factory=list)


class PortTable:
    def __init__(self, new_eventfd: Callable[[], int], nr_ports: int = NR_PORTS) -> None:
        self._new_eventfd = new_eventfd
        self._nr_ports = nr_ports
        self._ports: dict[int, dict[int, Port]] = {}
        self._virqs: dict[int, Port] = {}  # global VIRQs: one binder each
        self._efd_refs: dict[int, int] = {}

    # -- queries -----------------------------------------------------------

    def get(self, domid: int, port: int) -> Port | None:
        return self._ports.get(domid, {}).get(port)

    def ports_of(self, domid: int) -> list[Port]:
        return list(self._ports.get(domid, {}).values())

    def virq_port(self, virq: int) -> Port | None:
        return self._virqs.get(virq)

    def live_eventfds(self) -> set[int]:
        return set(self._efd_refs)

    # -- helpers -----------------------------------------------------------

    def _ref(self, efd: int | None) -> None:
        if efd is not None:
            self._efd_refs[efd] = self._efd_refs.get(efd, 0) + 1

    def _unref(self, efd: int | None, effects: Effects) -> None:
        if efd is None:
            return
        self._efd_refs[efd] -= 1
        if self._efd_refs[efd] == 0:
            del self._efd_refs[efd]
            effects.close_fds.append(efd)

    def _new_port(self, domid: int, state: PortState, own_efd: int, peer_efd: int | None,
                  owner: Hashable | None) -> Port:
        ports = self._ports.setdefault(domid, {})
        for number in range(1, self._nr_ports):  # port 0 is never allocated
            if number not in ports:
                break
        else:
            raise PortError(errno.ENOSPC, f"domain {domid} has no free ports")
        port = Port(domid, number, state, own_efd, peer_efd, owner=owner)
        ports[number] = port
        self._ref(own_efd)
        self._ref(peer_efd)
        return port

    def _lookup(self, domid: int, number: int) -> Port:
        port = self.get(domid, number)
        if port is None:
            raise PortError(errno.EINVAL, f"port {number} of domain {domid} is not open")
        return port

    # -- operations ----------------------------------------------------------

    def alloc_unbound(self, domid: int, remote_dom: int, owner: Hashable | None) -> Port:
        """A port of ``domid`` that only ``remote_dom`` may bind to."""
        own, reserved = self._new_eventfd(), self._new_eventfd()
        port = self._new_port(domid, PortState.UNBOUND, own, reserved, owner)
        port.remote_dom = remote_dom
        return port

    def bind_interdomain(self, domid: int, remote_dom: int, remote_port: int,
                         owner: Hashable | None) -> tuple[Port, Effects]:
        """Bind a new port of ``domid`` to an unbound port of ``remote_dom``
        that was allocated for ``domid``.  The caller sets the new port pending."""
        remote = self.get(remote_dom, remote_port)
        if remote is None or remote.state != PortState.UNBOUND or remote.remote_dom != domid:
            raise PortError(errno.EINVAL, f"port {remote_port} of domain {remote_dom} is not "
                                          f"unbound for domain {domid}")
        assert remote.peer_efd is not None  # unbound ports always reserve one
        port = self._new_port(domid, PortState.INTERDOMAIN, remote.peer_efd, remote.own_efd, owner)
        port.remote_dom, port.remote_port = remote_dom, remote_port
        remote.state = PortState.INTERDOMAIN
        remote.remote_port = port.port
        effects = Effects()
        if remote.owner is not None:
            effects.notices.append(PortNotice(remote.owner, remote_dom, remote_port, "peer_bound"))
        return port, effects

    def bind_virq(self, domid: int, virq: int, owner: Hashable | None) -> Port:
        if virq in self._virqs:
            raise PortError(errno.EEXIST, f"VIRQ {virq} is already bound")
        port = self._new_port(domid, PortState.VIRQ, self._new_eventfd(), None, owner)
        port.virq = virq
        self._virqs[virq] = port
        return port

    def attach(self, domid: int, number: int, owner: Hashable) -> Port:
        """Give ``owner`` the port's fds; an unowned port becomes owned."""
        port = self._lookup(domid, number)
        if port.owner is None:
            port.owner = owner
        return port

    def close(self, domid: int, number: int) -> Effects:
        port = self._lookup(domid, number)
        effects = Effects()
        del self._ports[domid][number]
        if port.state == PortState.VIRQ:
            del self._virqs[port.virq]  # type: ignore[arg-type]
        elif port.state == PortState.INTERDOMAIN:
            peer = self.get(port.remote_dom, port.remote_port)
            if peer is not None:
                # The survivor becomes unbound, bindable again by our domain; it
                # keeps notifying our old eventfd, which it now reserves.
                peer.state = PortState.UNBOUND
                peer.remote_dom = domid
                peer.remote_port = 0
                if peer.owner is not None:
                    effects.notices.append(PortNotice(peer.owner, peer.domid, peer.port, "peer_closed"))
        self._unref(port.own_efd, effects)
        self._unref(port.peer_efd, effects)
        return effects

    def close_domain(self, domid: int) -> Effects:
        """Close every port of a dying domain."""
        effects = Effects()
        for number in sorted(self._ports.get(domid, {})):
            more = self.close(domid, number)
            effects.notices.extend(n for n in more.notices if n.domid != domid)
            effects.close_fds.extend(more.close_fds)
        self._ports.pop(domid, None)
        return effects

    def close_owned(self, owner: Hashable) -> Effects:
        """Close every port held by a connection that went away."""
        effects = Effects()
        for domid, ports in list(self._ports.items()):
            for number in sorted(n for n, p in ports.items() if p.owner == owner):
                if self.get(domid, number) is None:
                    continue
                more = self.close(domid, number)
                effects.notices.extend(n for n in more.notices if n.owner != owner)
                effects.close_fds.extend(more.close_fds)
        return effects
