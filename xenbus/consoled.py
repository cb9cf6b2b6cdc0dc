"""The console daemon (``xenconsoled``): dom0's backend of every guest console.

    uxl consoled --log-dir DIR --socket PATH      # or: python -m xenbus.consoled ...

It is a :class:`~xenbus.backend_host.BackendHost` for device type
``console`` (drivers from :mod:`xenbus.console_backend`), plus:

* a log file per console: ``<log dir>/guest-<domid>.log`` for the primary
  console, ``guest-<domid>-<devid>.log`` for the others; the guest's output
  is appended as it arrives (raw bytes, like xenconsoled's ``--log=guest``);
* a unix socket through which ``uxl console DOMAIN`` attaches: the client
  sends one line ``ATTACH <domid> [<devid>]\\n``, the daemon answers
  ``OK\\n`` (or ``ERR <reason>\\n`` and closes), then the connection is the
  console: bytes from the client go to the guest's ``in`` ring, the guest's
  output is copied to every attached client.  A client that does not keep
  up is dropped (the guest never waits for a slow reader).

Killed and restarted, the daemon maps and binds every console again; what
the guests wrote meanwhile is still in their rings and reaches the logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import BinaryIO

import trio

from ringbuf._trio_util import open_background_nursery, serve_until_signalled

from .backend_host import BackendHost
from .console_backend import console_backend_factory

__all__ = ["ConsoleSession", "ConsoleSessions", "ConsoleDaemon", "parse_attach", "ATTACH_MAX", "main"]

log = logging.getLogger("uxen-consoled")

#: Longest attach request line.
ATTACH_MAX = 64
#: Input bytes buffered per console while the guest does not read them.
INPUT_LIMIT = 4096
#: Output chunks buffered per attached client before it is dropped.
CLIENT_BACKLOG = 256


def parse_attach(line: bytes) -> tuple[int, int]:
    """``b"ATTACH 5"`` or ``b"ATTACH 5 1"`` -> ``(domid, devid)``; ValueError otherwise."""
    parts = line.strip().split()
    if len(parts) not in (2, 3) or parts[0] != b"ATTACH" or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"bad attach request {line[:ATTACH_MAX]!r}")
    domid = int(parts[1])
    devid = int(parts[2]) if len(parts) == 3 else 0
    if domid >= 0x7FF0 or devid > 0xFFFF:
        raise ValueError("domid or devid out of range")
    return domid, devid


class ConsoleSession:
    """One console as the daemon sees it: log file, input queue, attached
    clients.  It outlives backend reconnections of the same console."""

    def __init__(self, domid: int, devid: int, log_path: str) -> None:
        self.domid = domid
        self.devid = devid
        self.log_path = log_path
        self._log: BinaryIO | None = None
        self._input = bytearray()
        self._wake: Callable[[], None] | None = None
        self.clients: set[trio.MemorySendChannel[bytes]] = set()
        self.output_bytes = 0

    # -- ConsoleEndpoint ---------------------------------------------------
    def guest_output(self, data: bytes) -> None:
        self.output_bytes += len(data)
        try:
            if self._log is None:
                self._log = open(self.log_path, "ab", buffering=0)
            self._log.write(data)
        except OSError as exc:
            log.warning("%s: %s", self.log_path, exc)
        for client in list(self.clients):
            try:
                client.send_nowait(data)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.detach(client)  # too slow, or gone

    def pending_input(self) -> bytes:
        return bytes(self._input)

    def consumed_input(self, count: int) -> None:
        del self._input[:count]

    def set_wakeup(self, wake: Callable[[], None] | None) -> None:
        self._wake = wake
        if wake is not None and self._input:
            wake()

    # -- attached clients ----------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue keyboard input for the guest (beyond the limit it is dropped)."""
        room = INPUT_LIMIT - len(self._input)
        if room > 0:
            self._input += data[:room]
            if self._wake is not None:
                self._wake()

    def attach(self) -> tuple[trio.MemorySendChannel[bytes], trio.MemoryReceiveChannel[bytes]]:
        """A new client: guest output arrives on the receive channel."""
        send, receive = trio.open_memory_channel[bytes](CLIENT_BACKLOG)
        self.clients.add(send)
        return send, receive

    def detach(self, client: trio.MemorySendChannel[bytes]) -> None:
        self.clients.discard(client)
        client.close()

    def close(self) -> None:
        for client in list(self.clients):
            self.detach(client)
        if self._log is not None:
            self._log.close()
            self._log = None


class ConsoleSessions:
    """The sessions by ``(domid, devid)`` (the drivers' ``ConsoleEndpoints``)."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.sessions: dict[tuple[int, int], ConsoleSession] = {}

    def log_path(self, domid: int, devid: int) -> str:
        name = f"guest-{domid}.log" if devid == 0 else f"guest-{domid}-{devid}.log"
        return os.path.join(self.log_dir, name)

    def endpoint(self, domid: int, devid: int) -> ConsoleSession:
        session = self.sessions.get((domid, devid))
        if session is None:
            session = ConsoleSession(domid, devid, self.log_path(domid, devid))
            self.sessions[(domid, devid)] = session
        return session

    def release(self, domid: int, devid: int) -> None:
        session = self.sessions.pop((domid, devid), None)
        if session is not None:
            session.close()  # attached clients see the console go away

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


class ConsoleDaemon:
    """Backend host + attach socket.  ``store`` is a privileged XenStore
    client (``xenbus.driver.Store``), ``hypervisor`` a dom0 connection."""

    def __init__(self, store, hypervisor, log_dir: str, socket_path: str, *, domid: int = 0) -> None:
        self.sessions = ConsoleSessions(log_dir)
        self.socket_path = socket_path
        self.host = BackendHost(store, domid, {"console": console_backend_factory(hypervisor, self.sessions)})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)  # dom0 only, like the pty it stands for
        try:
            await listener.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        listener.listen(16)
        try:
            async with open_background_nursery() as nursery:
                await nursery.start(self.host.run)
                nursery.start_soon(trio.serve_listeners, self._handle_client, [trio.SocketListener(listener)])
                task_status.started()
        finally:
            self.sessions.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    @staticmethod
    async def _read_line(stream: trio.SocketStream) -> tuple[bytes, bytes]:
        """The request line, and whatever the client sent after it."""
        line = b""
        with trio.fail_after(5):
            while b"\n" not in line:
                chunk = await stream.receive_some(ATTACH_MAX)
                if not chunk:
                    break
                line += chunk
                if len(line) > ATTACH_MAX:
                    raise ValueError("attach request too long")
        head, _, rest = line.partition(b"\n")
        return head, rest

    async def _handle_client(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                line, extra = await self._read_line(stream)
                domid, devid = parse_attach(line)
            except (ValueError, trio.TooSlowError) as exc:
                await self._refuse(stream, str(exc))
                return
            session = self.sessions.sessions.get((domid, devid))
            if session is None:
                await self._refuse(stream, f"no console {devid} for domain {domid}")
                return
            send, receive = session.attach()
            try:
                await stream.send_all(b"OK\n")
                if extra:
                    session.feed(extra)
                async with open_background_nursery() as nursery:
                    nursery.start_soon(self._to_client, stream, receive, nursery.cancel_scope)
                    while True:
                        data = await stream.receive_some(4096)
                        if not data:
                            break
                        session.feed(data)
                    nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client went away
            finally:
                session.detach(send)

    @staticmethod
    async def _to_client(stream: trio.SocketStream, receive: trio.MemoryReceiveChannel[bytes], scope: trio.CancelScope) -> None:
        try:
            async for chunk in receive:
                await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()  # detached (slow, or the console went away)

    @staticmethod
    async def _refuse(stream: trio.SocketStream, reason: str) -> None:
        try:
            await stream.send_all(b"ERR " + reason.encode(errors="replace")[:200] + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


# ---- command line -----------------------------------------------------------

DEFAULT_SOCKET = "/var/run/uxen/consoled.sock"
DEFAULT_LOG_DIR = "/var/log/uxen/console"
ENV_SOCKET = "UXEN_CONSOLED_SOCKET"


def default_socket_path() -> str:
    return os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET


def build_parser(prog: str = "uxen-consoled") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Console daemon: logs every guest console, lets `uxl console` attach.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser, *, connections: bool = True) -> None:
    """The daemon's options; ``connections=False`` leaves out ``--xenstore``
    and ``--hypervisor`` (``uxl`` has them as global options)."""
    p.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="where guest-<domid>.log files go (default %(default)s)")
    p.add_argument("--socket", default=None, help=f"attach socket (default ${ENV_SOCKET} or {DEFAULT_SOCKET})")
    if connections:
        p.add_argument("--xenstore", default=None, help="xenstored socket (default: $XENSTORED_PATH rules)")
        p.add_argument("--hypervisor", default=None, help="hypervisor service socket (default $UXEN_HYPERVISOR_SOCKET)")
    p.add_argument("--ready-fd", type=int, default=None, help="write one byte to this fd once serving")
    p.add_argument("-v", "--verbose", action="store_true")


async def serve(args: argparse.Namespace) -> None:
    import xenstore
    from ringbuf.hypervisor import open_hypervisor

    socket_path = args.socket or default_socket_path()
    os.makedirs(args.log_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    async with open_hypervisor(args.hypervisor) as hv, xenstore.open_client(args.xenstore) as xs:
        daemon = ConsoleDaemon(xs, hv, args.log_dir, socket_path)
        await serve_until_signalled(daemon.run, ready_fd=args.ready_fd)


def run_from_args(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="uxen-consoled: %(levelname)s %(message)s")
    try:
        trio.run(serve, args)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
