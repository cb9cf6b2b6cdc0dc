"""``uxl``: the userxen toolstack command (an ``xl`` subset).

    uxl create NAME [-m MiB] [--consoles N] [-- CMD...]
                                           start a guest running CMD (default: the demo guest)
    uxl create CONFIG                      ... described by an xl.cfg-style file
    uxl list                               domains, like `xl list`
    uxl shutdown [-w] [-R] DOMAIN          ask the guest to power off (reboot with -R); -w waits
    uxl destroy DOMAIN                     kill it now and clean up
    uxl console [-n N] DOMAIN              attach to its console (Ctrl-] detaches)
    uxl consoled [--log-dir D] ...         run the console daemon
    uxl domid NAME / uxl domname ID

DOMAIN is a name or an id.  Global options (before the command):
``--xenstore`` (xenstored socket; default ``$XENSTORED_PATH`` rules),
``--hypervisor`` (default ``$UXEN_HYPERVISOR_SOCKET``), ``--console-socket``
(default ``$UXEN_CONSOLED_SOCKET``), ``--run-dir`` (guest output and monitor
logs; default ``$UXL_RUN_DIR`` or /var/run/uxen).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import termios
import tty
from contextlib import asynccontextmanager

import trio

from .. import consoled as consoled_mod
from .config import ConfigError, DomainConfig, default_guest_command, parse_config

__all__ = ["main", "attach_console", "ESCAPE"]

#: Ctrl-]: detaches from a console, as in xl.
ESCAPE = 0x1D
ENV_RUN_DIR = "UXL_RUN_DIR"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uxl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xenstore", default=None, help="xenstored socket")
    p.add_argument("--hypervisor", default=None, help="hypervisor service socket")
    p.add_argument("--console-socket", default=None, help="console daemon socket")
    p.add_argument("--run-dir", default=None, help="guest output and monitor logs")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("create", help="create a domain", usage="uxl create [-m MiB] [--consoles N] [-c] (CONFIG | NAME [-- CMD...])")
    c.add_argument("target", help="a config file, or the new domain's name")
    c.add_argument("-m", "--memory", type=int, default=None, help="MiB (with a name)")
    c.add_argument("-c", "--console", action="store_true", help="attach to its console afterwards")
    c.add_argument("--consoles", type=int, default=0, help="secondary PV consoles (with a name)")

    sub.add_parser("list", help="list domains")

    s = sub.add_parser("shutdown", help="ask a domain to shut down")
    s.add_argument("-w", "--wait", action="store_true", help="wait until it is gone")
    s.add_argument("-R", "--reboot", action="store_true", help="reboot instead of poweroff")
    s.add_argument("-t", "--timeout", type=float, default=30.0, help="seconds to wait with -w")
    s.add_argument("domain")

    d = sub.add_parser("destroy", help="destroy a domain now")
    d.add_argument("domain")

    k = sub.add_parser("console", help="attach to a domain's console (Ctrl-] detaches)")
    k.add_argument("-n", "--num", type=int, default=0, help="console number (default 0)")
    k.add_argument("domain")

    cd = sub.add_parser("consoled", help="run the console daemon")
    consoled_mod.add_arguments(cd, connections=False)

    i = sub.add_parser("domid", help="a domain's id")
    i.add_argument("domain")
    n = sub.add_parser("domname", help="a domain's name")
    n.add_argument("domain")
    return p


@asynccontextmanager
async def _connections(args: argparse.Namespace, *, hypervisor: bool = True):
    import xenstore
    from ringbuf.hypervisor import open_hypervisor

    async with xenstore.open_client(args.xenstore) as xs:
        if not hypervisor:
            yield None, xs
            return
        async with open_hypervisor(args.hypervisor) as hv:
            yield hv, xs


def _config(args: argparse.Namespace) -> DomainConfig:
    command = args.guest_command
    if os.path.isfile(args.target):
        if command or args.memory is not None or args.consoles:
            raise ConfigError("a config file takes no -m, --consoles or command")
        with open(args.target) as f:
            return parse_config(f.read(), source=args.target)
    return DomainConfig(name=args.target, command=command or default_guest_command(),
                        memory_mib=args.memory if args.memory is not None else 1, consoles=args.consoles)


async def _create(args: argparse.Namespace) -> int:
    from .domains import create_domain

    config = _config(args)
    run_dir = args.run_dir or os.environ.get(ENV_RUN_DIR) or "/var/run/uxen"
    async with _connections(args) as (hv, xs):
        created = await create_domain(hv, xs, config, run_dir=run_dir, xenstore_path=args.xenstore)
    print(f"Created domain {created.name} (id {created.domid})")
    return created.domid


async def _list(args: argparse.Namespace) -> int:
    from .domains import format_rows, list_domains

    async with _connections(args) as (hv, xs):
        print(format_rows(await list_domains(hv, xs)))
    return 0


async def _find(args: argparse.Namespace) -> int:
    from .domains import find_domain

    async with _connections(args, hypervisor=False) as (_, xs):
        return await find_domain(xs, args.domain)


async def _shutdown(args: argparse.Namespace) -> int:
    from .domains import find_domain, request_shutdown, wait_domain_gone

    async with _connections(args) as (hv, xs):
        domid = await find_domain(xs, args.domain)
        await request_shutdown(xs, domid, "reboot" if args.reboot else "poweroff")
        if args.wait:
            with trio.move_on_after(args.timeout):
                await wait_domain_gone(hv, xs, domid)
                return 0
            print(f"uxl: domain {domid} did not shut down within {args.timeout:g} s", file=sys.stderr)
            return 1
    return 0


async def _destroy(args: argparse.Namespace) -> int:
    from .domains import destroy_domain, find_domain

    async with _connections(args) as (hv, xs):
        try:
            domid = await find_domain(xs, args.domain)
        except LookupError:
            # An id the hypervisor still knows (e.g. half-built) can be destroyed too.
            if not args.domain.isdigit() or await hv.domain_info(int(args.domain)) is None:
                raise
            domid = int(args.domain)
        await destroy_domain(hv, xs, domid)
    return 0


async def _domname(args: argparse.Namespace) -> str:
    from .domains import find_domain

    async with _connections(args, hypervisor=False) as (_, xs):
        domid = await find_domain(xs, args.domain)
        return "Domain-0" if domid == 0 else (await xs.read(f"/local/domain/{domid}/name")).decode()


def attach_console(socket_path: str, domid: int, devid: int = 0, *, stdin: int = 0, stdout: int = 1) -> int:
    """Attach ``stdin``/``stdout`` to a console through the console daemon
    until Ctrl-] is typed (or the console goes away).  Returns an exit status."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        sock.sendall(f"ATTACH {domid} {devid}\n".encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                break
            reply += chunk
        if reply != b"OK\n":
            print(f"uxl: console: {reply.decode(errors='replace').strip() or 'refused'}", file=sys.stderr)
            return 1
        saved = None
        if os.isatty(stdin):
            saved = termios.tcgetattr(stdin)
            tty.setraw(stdin)
        try:
            while True:
                readable, _, _ = select.select([sock, stdin], [], [])
                if stdin in readable:
                    data = os.read(stdin, 4096)
                    if not data:
                        return 0  # end of input: detach
                    cut = data.find(bytes([ESCAPE]))
                    if cut >= 0:
                        sock.sendall(data[:cut])
                        return 0
                    sock.sendall(data)
                if sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return 0  # the console went away
                    os.write(stdout, data)
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    except OSError as exc:
        print(f"uxl: console: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the guest's command line.
    guest_command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, guest_command = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    args.guest_command = guest_command
    if guest_command and args.command != "create":
        print("uxl: only create takes -- CMD...", file=sys.stderr)
        return 2
    if args.command == "consoled":
        if args.socket is None and args.console_socket is not None:
            args.socket = args.console_socket
        return consoled_mod.run_from_args(args)
    try:
        if args.command == "create":
            domid = trio.run(_create, args)
            if args.console:
                return attach_console(args.console_socket or consoled_mod.default_socket_path(), domid)
            return 0
        if args.command == "list":
            return trio.run(_list, args)
        if args.command == "shutdown":
            return trio.run(_shutdown, args)
        if args.command == "destroy":
            return trio.run(_destroy, args)
        if args.command == "domid":
            print(trio.run(_find, args))
            return 0
        if args.command == "domname":
            print(trio.run(_domname, args))
            return 0
        if args.command == "console":
            domid = trio.run(_find, args)
            return attach_console(args.console_socket or consoled_mod.default_socket_path(), domid, args.num)
    except (ConfigError, ValueError, LookupError, OSError, trio.TooSlowError) as exc:
        print(f"uxl: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    except Exception as exc:  # the services' own errors (XenStoreError, HypervisorError)
        print(f"uxl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
