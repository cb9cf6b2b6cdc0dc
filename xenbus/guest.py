"""A demo guest domain: ``python -m xenbus.guest`` (what ``uxl create`` runs
by default).

Inside the guest process started by the toolstack it

* opens its domain's hypervisor connection (``$UXEN_HYPERVISOR_FD``),
* talks to XenStore over its ring page + event channel
  (:func:`xenstore.client.ring_transport.open_guest_client`),
* writes to its primary PV console (:mod:`xenbus.console_frontend`): a
  boot banner, then a ``tick <n>`` line every ``--interval`` seconds, and
  echoes whatever is typed on the console (``uxl console``),
* runs a :class:`~xenbus.frontend_host.FrontendHost` for its secondary
  consoles (``device/console/<n>``, XenBus devices the toolstack adds with
  ``--consoles``): on each it announces itself and echoes input, again
  after every reconnection of the backend,
* advertises ``control/feature-poweroff`` / ``-reboot`` and reacts to
  ``control/shutdown`` (fact sheet 4.3: read and acknowledge in one
  transaction, then act): it says goodbye on the console, reports the
  shutdown to the hypervisor and exits (which ends the domain).
"""

from __future__ import annotations

import argparse
import sys

import trio

from ringbuf._trio_util import open_background_nursery
from ringbuf.hypervisor import open_hypervisor
from ringbuf.memory import FrameAllocator
from ringbuf.hypervisor.domains import SHUTDOWN_poweroff, SHUTDOWN_reboot
from xenstore.client.ring_transport import open_guest_client
from xenstore.wire import XenStoreError

from .console_frontend import ConsoleFrontend, GuestConsole, open_guest_console
from .frontend_host import FrontendHost
from .paths import domain_path
from .start_info import ConsoleStart, magic_frames

__all__ = ["main", "wait_for_shutdown", "SHUTDOWN_REASONS"]

#: Commands the guest understands, with the hypervisor shutdown code each maps to.
SHUTDOWN_REASONS = {"poweroff": SHUTDOWN_poweroff, "halt": SHUTDOWN_poweroff, "reboot": SHUTDOWN_reboot}


async def wait_for_shutdown(xs, domid: int) -> str:
    """Watch ``control/shutdown`` until a known command arrives; acknowledge
    it (write ``""`` in the transaction that read it) and return it."""
    path = f"{domain_path(domid)}/control/shutdown"

    async def take(t) -> str:
        try:
            command = (await t.read(path)).decode(errors="replace")
        except XenStoreError:
            return ""
        if command not in SHUTDOWN_REASONS:
            return ""  # empty, or unknown: ignored and left unacknowledged (like Linux)
        await t.write(path, b"")
        return command

    async with xs.watch(path) as events:
        async for _ in events:
            command = (await xs.transact(take)).value
            if command:
                return command
    raise RuntimeError("XenStore connection closed")


async def _advertise(xs, domid: int) -> None:
    for feature in ("poweroff", "reboot"):
        try:
            await xs.write(f"{domain_path(domid)}/control/feature-{feature}", b"1")
        except XenStoreError:
            pass  # the toolstack may not have created it (4.3 rule 3)


async def _ticks(console: GuestConsole, interval: float, count: int | None) -> None:
    n = 0
    while count is None or n < count:
        await trio.sleep(interval)
        n += 1
        await console.write(f"tick {n}\r\n")


async def _echo(console: GuestConsole) -> None:
    while True:
        data = await console.read()
        await console.write(data.replace(b"\r", b"\r\n"))


def _secondary_console_session(name: str, devid: int):
    async def session(console: GuestConsole, connection: int) -> None:
        await console.write(f"{name}: console {devid} connected (#{connection})\r\n")
        await _echo(console)

    return session


async def run_guest(args: argparse.Namespace) -> int:
    start = ConsoleStart.from_env()
    async with open_hypervisor() as hv, open_guest_client(hypervisor=hv) as xs:
        domid = hv.domid
        try:
            name = (await xs.read(f"{domain_path(domid)}/name")).decode(errors="replace")
        except XenStoreError:
            name = "?"
        async with open_background_nursery() as nursery:
            console = None
            if start is not None:
                console = await open_guest_console(hv, start)
                await nursery.start(console.run)
                await console.write(f"userxen guest {name} (domid {domid}) booted. {args.message}\r\n")
                nursery.start_soon(_ticks, console, args.interval, args.ticks)
                nursery.start_soon(_echo, console)
            # Frames below the two magic pages are ours to grant.
            frames = FrameAllocator(0, min(magic_frames(hv.nr_pages)))

            def console_frontend(store, device):
                return ConsoleFrontend.for_device(store, device, hv=hv, frames=frames,
                                                  session=_secondary_console_session(name, device.devid))

            await nursery.start(FrontendHost(xs, domid, {"console": console_frontend}).run)
            await _advertise(xs, domid)
            command = await wait_for_shutdown(xs, domid)
            if console is not None:
                await console.write(f"{name}: {command} requested, shutting down\r\n", timeout=1.0)
            await hv.shutdown(SHUTDOWN_REASONS[command])
            nursery.cancel_scope.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xenbus.guest", description="userxen demo guest")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between tick lines")
    p.add_argument("--ticks", type=int, default=None, help="stop ticking after N lines (default: never)")
    p.add_argument("--message", default="Hello from a userxen domain!", help="banner text")
    return trio.run(run_guest, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
