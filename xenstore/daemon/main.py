"""``xenstored``: command line, daemonising, start-up and shutdown.

Flags follow Xen's C xenstored where they make sense here; our additions are
``--state-dir``, ``--fsync`` and ``--journal-max`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import logging.handlers
import os
import signal
import sys
from typing import Any, Callable, Sequence

import trio

from ringbuf._trio_util import open_background_nursery

from .journal import FsyncPolicy, JournalError, StateDir
from .server import ServerConfig, XenstoreServer, default_socket_path, open_listener
from .trace import Tracer

__all__ = ["main", "build_parser", "limits_from_args", "config_from_args", "restore_engine"]

log = logging.getLogger("xenstored")

DEFAULT_STATE_DIR = "/var/lib/xenstored"

#: Single-value flags -> cxenstored quota names.
_QUOTA_FLAGS = {
    "entry_nb": "nodes",
    "entry_size": "node-size",
    "watch_nb": "watches",
    "transaction": "transactions",
    "perm_nb": "permissions",
    "path_max": "path-max",
}
#: Names accepted by -Q / -q (cxenstored 4.17 accepts these on the command line).
_HARD_QUOTAS = ("transaction-nodes", "memory", "outstanding")
_SOFT_QUOTAS = ("memory",)
_TIMEOUTS = ("watch-event",)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xenstored",
        add_help=False,
        formatter_class=_HelpFormatter,
        description="XenStore daemon (userxen). Serves the XenStore protocol on a unix socket:\n"
        "$XENSTORED_PATH, else $XENSTORED_RUNDIR/socket, else /var/run/xenstored/socket.\n"
        "Socket connections are privileged (dom0).",
        epilog="Persistence: unless --internal-db on, the store lives in --state-dir as an\n"
        "append-only journal (length+CRC32 framed msgpack records) plus snapshots.\n"
        "--fsync process (default): replies are sent after the change is written to\n"
        "the kernel, so a crash or kill -9 of the daemon loses nothing acknowledged.\n"
        "--fsync power: also fdatasync before replying (one sync covers all pending\n"
        "replies of all connections), so acknowledged writes survive power loss.",
    )
    p.add_argument("-h", "-H", "--help", action="help", help="show this message and exit")
    p.add_argument("-N", "--no-fork", action="store_true", help="stay in the foreground")
    p.add_argument("-F", "--pid-file", metavar="FILE", help="write the daemon's pid to FILE")
    p.add_argument("-P", "--output-pid", action="store_true", help="print the daemon's pid on stdout")
    p.add_argument("-T", "--trace-file", metavar="FILE", help="log every request and reply to FILE")
    p.add_argument("-E", "--entry-nb", type=int, metavar="NB", help="nodes per domain (quota nodes)")
    p.add_argument("-S", "--entry-size", type=int, metavar="SIZE", help="size of a node (quota node-size)")
    p.add_argument("-W", "--watch-nb", type=int, metavar="NB", help="watches per domain (quota watches)")
    p.add_argument("-t", "--transaction", type=int, metavar="NB", help="transactions per domain")
    p.add_argument("-A", "--perm-nb", type=int, metavar="NB", help="permissions per node")
    p.add_argument("-M", "--path-max", type=int, metavar="CHARS", help="node path length limit")
    # cxenstored's repeatable WHAT=VALUE options; _pairs() checks the names.
    for short, long, metavar, help_text in (
        ("-Q", "--quota", "WHAT=NB", "hard quota: " + ", ".join(_HARD_QUOTAS)),
        ("-q", "--quota-soft", "WHAT=NB", "soft (warning only) quota: " + ", ".join(_SOFT_QUOTAS)),
        ("-w", "--timeout", "WHAT=SECONDS",
         "timeouts: watch-event: seconds a guest's watch event may wait to be taken before it is dropped "
         "(default 20, 0: never; events to socket connections never expire)"),
    ):
        p.add_argument(short, long, action="append", default=[], metavar=metavar, help=help_text)
    p.add_argument(
        "-I",
        "--internal-db",
        nargs="?",
        const="on",
        default="off",
        choices=("on", "off"),
        help="on: keep the store in memory only (no state dir); off (default): persist it",
    )
    p.add_argument(
        "-R",
        "--no-recovery",
        action="store_true",
        help="refuse to start if the journal is damaged (default: drop the damaged tail, log it)",
    )
    p.add_argument(
        "-K",
        "--keep-orphans",
        action="store_true",
        help="don't delete nodes owned by a domain when the domain is deleted: dom0 takes them (this is a security risk!)",
    )
    p.add_argument("-V", "--verbose", action="count", default=0, help="log more (twice: debug)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR", help="persistence directory")
    p.add_argument(
        "--fsync",
        choices=[policy.value for policy in FsyncPolicy],
        default=FsyncPolicy.PROCESS.value,
        help="what an acknowledged write survives: process crash (default) or power loss",
    )
    p.add_argument(
        "--journal-max",
        type=int,
        default=16 << 20,
        metavar="BYTES",
        help="compact (snapshot + new journal) once the journal is this big (and 2x the snapshot)",
    )
    p.add_argument(
        "--hypervisor",
        default=os.environ.get("UXEN_HYPERVISOR_SOCKET") or None,
        metavar="PATH",
        help="hypervisor service socket (default $UXEN_HYPERVISOR_SOCKET): serve introduced guests\n"
        "over their ring page and event channel; without it INTRODUCE only updates the store",
    )
    return p


def _pairs(values: Sequence[str], allowed: Sequence[str], flag: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values:
        name, sep, number = item.partition("=")
        if not sep or name not in allowed:
            raise ValueError(f"{flag}: unknown or malformed '{item}' (allowed: {', '.join(allowed)})")
        try:
            out[name] = int(number, 0)
        except ValueError:
            raise ValueError(f"{flag}: '{number}' is not a number") from None
        if out[name] < 0:
            raise ValueError(f"{flag}: '{item}' is negative")
    return out


def limits_from_args(args: argparse.Namespace) -> Any:
    """The engine's Limits with the command line's quotas applied."""
    from ..core.limits import Limits

    limits = Limits()
    wanted: dict[str, int] = {}
    for attr, name in _QUOTA_FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            if value < 0:
                raise ValueError(f"--{attr.replace('_', '-')}: negative value")
            wanted[name] = value
    wanted.update(_pairs(args.quota, _HARD_QUOTAS, "--quota"))
    for name, value in wanted.items():
        limits.set(name, value)
    for name, value in _pairs(args.quota_soft, _SOFT_QUOTAS, "--quota-soft").items():
        limits.set(name, value, soft=True)
    return limits


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The I/O layer's tunables the command line sets (``-w``)."""
    timeouts = _pairs(args.timeout, _TIMEOUTS, "--timeout")
    config = ServerConfig()
    if "watch-event" in timeouts:
        config.watch_event_timeout = float(timeouts["watch-event"])
    return config


def restore_engine(limits: Any, state: StateDir | None, strict: bool = False) -> Any:
    """An Engine holding the persisted store (or a fresh one).

    Afterwards the state dir has a snapshot naming an open journal: at first
    start, and after any recovery problem, the recovered store is compacted
    right away so damaged or replayed data is never looked at again.
    """
    from ..core.engine import Engine
    from ..core.store import Store

    def domain_exists(domid: int) -> bool:
        return True  # no hypervisor yet: every domain "exists"

    if state is None:
        return Engine(limits, domain_exists=domain_exists)
    recovered = state.recover(strict=strict)
    # No snapshot: a first start (or a lost snapshot): the fresh tree.
    store = Store() if recovered.snapshot is None else Store.from_changes(recovered.snapshot)
    needs_snapshot = recovered.snapshot is None or bool(recovered.problems)
    for index, batch in enumerate(recovered.batches):
        try:
            for change in batch:
                store.apply(change)
        except Exception as exc:  # a record the store rejects: treat like corruption
            message = f"journal record {index} cannot be applied ({exc!r}); replay stops there"
            if strict:
                raise JournalError(message) from None
            log.error("%s", message)
            needs_snapshot = True
            break
    store.take_journal()  # replayed changes are already on disk
    engine = Engine(limits, domain_exists=domain_exists, store=store)
    state.open_journal()
    if needs_snapshot:
        first = state.start_compaction()
        size = state.write_snapshot(engine.store.snapshot(), first)
        state.finish_compaction(first, size)
    return engine


def _setup_logging(verbose: int, foreground: bool) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger("xenstored")
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"xenstored[{os.getpid()}]: %(levelname)s: %(message)s"))
    else:
        handler = logging.handlers.SysLogHandler(address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"xenstored[{os.getpid()}]: %(message)s"))
    root.addHandler(handler)


def _daemonize() -> int:
    """Fork into the background; returns (in the daemon) the fd to report readiness on.

    The original process waits on a pipe and exits 0 once the daemon reports
    that it listens (so ``xenstored && xenstore-read ...`` works), or 1 with
    the daemon's error message.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        report = b"".join(chunks).decode(errors="replace")
        status, _, rest = report.partition(" ")
        if status == "ok":
            if rest.strip():
                print(rest.strip(), flush=True)  # --output-pid
            os._exit(0)
        sys.stderr.write(rest or "xenstored: daemon exited during start-up\n")
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_end


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    foreground = args.no_fork
    report_fd = None if foreground else _daemonize()
    _setup_logging(args.verbose, foreground)

    def report(message: str) -> None:
        """Tell the waiting parent (fork mode) how start-up went."""
        nonlocal report_fd
        if report_fd is not None:
            os.write(report_fd, message.encode())
            os.close(report_fd)
            report_fd = None

    pid_written = False

    def write_pid() -> None:
        nonlocal pid_written
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
            pid_written = True

    def ready() -> None:
        pid = os.getpid()
        if foreground and args.output_pid:
            print(pid, flush=True)
        report(f"ok {pid if args.output_pid else ''}\n")
        log.info("serving %s (%s)", socket_path, "in memory" if state is None else f"state in {state.path}")

    socket_path = default_socket_path()
    state: StateDir | None = None
    tracer: Tracer | None = None
    status = 0
    try:
        limits = limits_from_args(args)
        config = config_from_args(args)
        if args.internal_db == "off":
            state = StateDir(args.state_dir, FsyncPolicy(args.fsync), compact_bytes=args.journal_max)
        # The restored tree is hundreds of thousands of long-lived objects:
        # the cyclic GC would rescan them over and over while they are built
        # (half the start-up time) and at every full collection after.
        gc.disable()
        try:
            engine = restore_engine(limits, state, strict=args.no_recovery)
        finally:
            gc.enable()
        gc.freeze()
        engine.keep_orphans = args.keep_orphans
        tracer = Tracer(args.trace_file) if args.trace_file else None
        server = XenstoreServer(
            engine,
            state=state,
            tracer=tracer,
            config=config,
            outstanding_limit=lambda: _outstanding(limits),
        )
        link = None
        if args.hypervisor:
            from .hypervisor_link import HypervisorLink

            link = HypervisorLink(server, args.hypervisor)
        trio.run(_run, server, socket_path, tracer, write_pid, ready, link)
    except (OSError, ValueError, JournalError) as exc:
        log.error("%s", exc)
        report(f"error xenstored: {exc}\n")
        status = 1
    finally:
        if state is not None:
            state.close()
        if tracer is not None:
            tracer.close()
        if pid_written:
            try:
                os.unlink(args.pid_file)
            except OSError:
                pass
    log.info("stopped")
    return status


def _outstanding(limits: Any) -> int:
    value = limits.outstanding
    return value if value > 0 else 1 << 30  # 0 disables the check


async def _run(
    server: XenstoreServer,
    socket_path: str,
    tracer: Tracer | None,
    write_pid: Callable[[], None],
    ready: Callable[[], None],
    link: Any = None,
) -> None:
    # Signals are caught, and the pid file is written, before the socket
    # exists: whoever sees the socket can find and stop the daemon cleanly.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        listener = open_listener(socket_path, before_listen=write_pid)
        try:
            async with open_background_nursery() as nursery:
                await nursery.start(server.serve, listener)
                if link is not None:  # guests' rings (--hypervisor)
                    await nursery.start(link.serve)
                ready()

                async def watch_signals() -> None:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            if tracer is not None:
                                tracer.reopen()
                            continue
                        log.info("signal %d: shutting down", signum)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch_signals)
        except BaseExceptionGroup as group:
            # The server's task failed; it recorded why (raised below).
            if server.fatal_error is None or group.subgroup(lambda exc: exc is server.fatal_error) is None:
                raise
        finally:
            listener.close()
    if server.fatal_error is not None:
        raise server.fatal_error


if __name__ == "__main__":
    sys.exit(main())
