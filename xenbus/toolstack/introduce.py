"""Introducing a guest to xenstored: the toolstack's half of fact sheet §3.9.2.

    async with open_hypervisor(hv_path) as hv, xenstore.open_client(xs_path) as xs:
        domid, fd = await hv.create_domain(nr_pages=64)
        store = await introduce_guest(hv, xs, domid, name="guest1")
        env = dict(os.environ, UXEN_HYPERVISOR_FD=str(fd), **store.environment())
        proc = subprocess.Popen([...], pass_fds=[fd], env=env)   # "unpause"
        os.close(fd)
        ...
        await release_guest(xs, domid)        # after the domain is gone (or to detach it)

The guest then finds its ring with ``xenstore.open_guest_client()``.

Steps (libxl ``libxl__build_post`` / ``libxl__domain_make``):

1. pick the store page: a frame of the guest's memory (default: its last);
2. allocate an unbound event channel in the guest for the xenstore domain;
3. seed grant ref 1 (``GNTTAB_RESERVED_XENSTORE``) of the guest's table with
   that frame for the xenstore domain (xenstored maps ref 1, not the gfn);
4. write the guest's XenStore tree (§4.1) in one transaction;
5. ``INTRODUCE <domid> <gfn> <port>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ringbuf.grants import GNTTAB_RESERVED_XENSTORE
from xenstore.client.ring_transport import ENV_STORE_GFN, ENV_STORE_PORT
from xenstore.wire import XenStoreError

if TYPE_CHECKING:
    from ringbuf.hypervisor import HypervisorClient
    from xenstore.client._async import Client, Transaction

__all__ = ["GuestStore", "introduce_guest", "release_guest", "write_domain_tree", "GUEST_WRITABLE"]

#: Keys under ``~`` the guest owns (libxl writes them ``n<domid>``); the
#: rest of the home is ``n0 r<domid>``.
GUEST_WRITABLE = ("data", "drivers", "feature", "attr", "error", "control/shutdown",
                  "control/feature-poweroff", "control/feature-reboot", "control/feature-suspend",
                  "control/sysrq")


@dataclass(frozen=True)
class GuestStore:
    """Where a guest finds xenstored (``start_info.store_mfn``/``store_evtchn``)."""

    domid: int
    gfn: int
    port: int

    def environment(self) -> dict[str, str]:
        """The variables to start the guest process with (plus its
        ``UXEN_HYPERVISOR_FD``)."""
        return {ENV_STORE_GFN: str(self.gfn), ENV_STORE_PORT: str(self.port)}


async def write_domain_tree(
    t: "Transaction | Client",
    domid: int,
    gfn: int,
    port: int,
    *,
    name: str | None = None,
    memory_kib: int | None = None,
) -> None:
    """The guest's home ``/local/domain/<domid>`` (§4.1) with libxl's
    permissions: readable by the guest, writable only where listed in
    :data:`GUEST_WRITABLE`."""
    home = f"/local/domain/{domid}"
    readable = ["n0", f"r{domid}"]
    for path in (home, f"{home}/device", f"{home}/control", f"{home}/memory", f"{home}/store"):
        await t.mkdir(path)
        await t.set_perms(path, readable)
    values = {"domid": str(domid), "store/port": str(port), "store/ring-ref": str(gfn),
              "control/platform-feature-xs_reset_watches": "1"}
    if name is not None:
        values["name"] = name
    if memory_kib is not None:
        values["memory/static-max"] = values["memory/target"] = str(memory_kib)
    for key, value in values.items():
        await t.write(f"{home}/{key}", value)
        await t.set_perms(f"{home}/{key}", readable)
    for key in GUEST_WRITABLE:
        await t.write(f"{home}/{key}", "")
        await t.set_perms(f"{home}/{key}", [f"n{domid}"])


async def introduce_guest(
    hypervisor: "HypervisorClient",
    store: "Client",
    domid: int,
    *,
    gfn: int | None = None,
    name: str | None = None,
    memory_kib: int | None = None,
    xenstore_domid: int = 0,
) -> GuestStore:
    """Give domain ``domid`` (created, not yet running) its XenStore ring and
    introduce it to xenstored.  ``hypervisor`` is a dom0 connection,
    ``store`` a privileged XenStore client.  Returns what the guest process
    must be told (:meth:`GuestStore.environment`)."""
    if gfn is None:
        info = await hypervisor.domain_info(domid)
        if info is None:
            raise ValueError(f"no domain {domid}")
        gfn = info.nr_pages - 1
    port = await hypervisor.alloc_unbound_for(domid, xenstore_domid)
    await hypervisor.seed_grant(domid, GNTTAB_RESERVED_XENSTORE, xenstore_domid, gfn)

    async def make_tree(t: "Transaction") -> None:
        await write_domain_tree(t, domid, gfn, port, name=name, memory_kib=memory_kib)

    await store.transact(make_tree)
    await store.introduce(domid, gfn, port)
    return GuestStore(domid, gfn, port)


async def release_guest(store: "Client", domid: int, *, remove_home: bool = True) -> bool:
    """The toolstack's side of destroying a domain: ``RELEASE`` (if
    xenstored still knows it; it removes the nodes the guest owns) and the
    removal of its home.  Returns ``True`` if a RELEASE was needed."""
    released = True
    try:
        await store.release(domid)
    except XenStoreError as exc:
        if exc.name != "ENOENT":
            raise
        released = False
    if remove_home:
        try:
            await store.rm(f"/local/domain/{domid}")
        except XenStoreError as exc:
            if exc.name != "ENOENT":
                raise
    return released
