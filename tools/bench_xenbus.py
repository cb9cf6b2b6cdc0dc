#!/usr/bin/env python3
"""The guest side of the stack: XenStore over a guest's ring page, and the PV console.

Starts its own hypervisor service, xenstored (``-I on --hypervisor``) and
console daemon in a temp dir, creates one guest the way ``uxl create``
does (:func:`xenbus.toolstack.domains.create_domain`; the guest is this
script with ``--guest``) and prints one table, each figure next to a
baseline measured in the same run, against the same daemons:

* READ round trip, sequential: guest over its ring (``open_guest_client``)
  vs a dom0 client over the unix socket (median µs and ops/s);
* READs with 32 in flight on one connection: ring vs socket;
* console output: bytes a guest writes through ``GuestConsole`` until the
  console daemon has them in its log file, vs the same bytes through a pipe
  into a second process that writes them to a file the same way;
* XenBus handshake: a plain frontend and backend (``xenbus.driver``, no
  device work) from start to both Connected, vs the store requests they
  sent, one after another at the socket READ latency (there is no
  handshake-free way to connect a device, so this is the floor the
  framework's own logic adds to).

    python3 tools/bench_xenbus.py [--quick]

The guest reports its figures through its own XenStore home
(``data/bench-result``).  The last line printed is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

import xenstore
from ringbuf.hypervisor import open_hypervisor
from xenbus.console_frontend import open_guest_console
from xenbus.driver import Backend, Frontend
from xenbus.paths import DeviceId
from xenbus.start_info import ConsoleStart
from xenbus.toolstack.config import DomainConfig
from xenbus.toolstack.domains import create_domain, destroy_domain, write_device
from xenbus.toolstack.localhost import LocalHost

VALUE = b"v" * 16
CHUNK = 4096  # what the console writer and the pipe writer hand over per call
DEPTH = 32
DOMID_HANDSHAKE = 4000  # a frontend domid no domain of this run has


# -- the measurements, shared by guest and dom0 -------------------------------


async def sequential_reads(client: xenstore.Client, path: str, n: int) -> list[float]:
    """Seconds per READ, one at a time (after a short warm-up)."""
    read, clock = client.read, time.perf_counter
    for _ in range(50):
        await read(path)
    times = []
    for _ in range(n):
        t0 = clock()
        await read(path)
        times.append(clock() - t0)
    return times


async def pipelined_reads(client: xenstore.Client, path: str, total: int, depth: int = DEPTH) -> float:
    """READs per second with ``depth`` tasks sharing the connection."""
    per_task = max(1, total // depth)

    async def reader() -> None:
        for _ in range(per_task):
            await client.read(path)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(reader)
    return per_task * depth / (time.perf_counter() - t0)


def read_figures(times: list[float], rate: float) -> dict[str, float]:
    median = statistics.median(times)
    return {"read_us": median * 1e6, "read_ops": 1 / median, "pipelined_ops": rate}


# -- a XenBus handshake -----------------------------------------------------------


class CountingStore:
    """A :class:`xenbus.driver.Store` that counts the requests it sends
    (a transaction: START + its requests + END)."""

    def __init__(self, target, parent: CountingStore | None = None) -> None:
        self.target = target
        self.root = parent or self
        self.requests = 0

    def _count(self, n: int = 1) -> None:
        self.root.requests += n

    async def read(self, path: str) -> bytes:
        self._count()
        return await self.target.read(path)

    async def write(self, path: str, value: bytes) -> None:
        self._count()
        await self.target.write(path, value)

    async def mkdir(self, path: str) -> None:
        self._count()
        await self.target.mkdir(path)

    async def rm(self, path: str) -> None:
        self._count()
        await self.target.rm(path)

    async def directory(self, path: str) -> list[str]:
        self._count()
        return await self.target.directory(path)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[CountingStore]:
        self._count(2)
        async with self.target.transaction() as tx:
            yield CountingStore(tx, self)

    def watch(self, path: str):
        self._count()  # WATCH (its UNWATCH comes after the timed part)
        return self.target.watch(path)


async def handshakes(xs_path: str, n: int) -> tuple[list[float], int]:
    """Seconds from starting a plain frontend and backend (hooks do nothing;
    each end on its own dom0 connection, as two domains would be) until both
    are Connected, for ``n`` fresh devices; and the store requests of one."""
    times, requests = [], 0
    async with xenstore.open_client(xs_path) as toolstack, xenstore.open_client(xs_path) as fe_xs, \
            xenstore.open_client(xs_path) as be_xs:
        for devid in range(n):
            dev = DeviceId("vif", frontend_domid=DOMID_HANDSHAKE, backend_domid=0, devid=devid)
            await toolstack.transact(lambda t: write_device(t, dev, DeviceId.frontend_links, DeviceId.backend_links))
            fe_store, be_store = CountingStore(fe_xs), CountingStore(be_xs)
            frontend = Frontend.for_device(fe_store, dev)
            backend = Backend.for_device(be_store, dev)
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    t0 = time.perf_counter()
                    await nursery.start(frontend.run)
                    await nursery.start(backend.run)
                    await frontend.wait_connected()
                    await backend.wait_connected()
                    times.append(time.perf_counter() - t0)
                    requests = fe_store.requests + be_store.requests
                    nursery.cancel_scope.cancel()
        for path in (f"/local/domain/{DOMID_HANDSHAKE}", "/local/domain/0/backend/vif", f"/libxl/{DOMID_HANDSHAKE}"):
            await toolstack.rm(path)
    return times, requests


# -- the guest (this script, started by the toolstack) ------------------------


async def guest_main(args: argparse.Namespace) -> None:
    start = ConsoleStart.from_env()
    assert start is not None, "no primary console"
    async with open_hypervisor() as hv, xenstore.open_guest_client(hypervisor=hv) as xs:
        # Console first, while dom0 only watches the log file.  perf_counter is
        # CLOCK_MONOTONIC, so the host can compare our start with its end.
        console = await open_guest_console(hv, start)
        async with trio.open_nursery() as nursery:
            await nursery.start(console.run)
            block = b"c" * CHUNK
            t0 = time.perf_counter()
            for _ in range(args.console_bytes // CHUNK):
                await console.write(block)
            nursery.cancel_scope.cancel()
        await xs.write("data/bench-console-start", repr(t0).encode())
        await trio.sleep(0.3)  # let the console daemon drain before timing reads
        await xs.write("data/bench", VALUE)
        times = await sequential_reads(xs, "data/bench", args.reads)
        rate = await pipelined_reads(xs, "data/bench", args.pipelined)
        await xs.write("data/bench-result", json.dumps(read_figures(times, rate)).encode())
        # Our exit ends the domain and its home: stay until dom0 took the result.
        async with xs.watch("data/bench-result") as events:
            async for _ in events:
                try:
                    await xs.read("data/bench-result")
                except xenstore.XenStoreError:
                    break


# -- the pipe baseline's reader -------------------------------------------------


def pipe_reader(path: str) -> None:
    """Copy stdin to ``path`` unbuffered, as the console daemon logs; say
    ``1`` when ready and ``2`` when done."""
    with open(path, "ab", buffering=0) as log:
        os.write(1, b"1")
        while chunk := os.read(0, 65536):
            log.write(chunk)
    os.write(1, b"2")


# -- dom0: the host -----------------------------------------------------------


def start_daemons() -> LocalHost:
    """Hypervisor service, xenstored and console daemon in a temp dir."""
    host = LocalHost(tempfile.mkdtemp(prefix="uxb-", dir="/tmp"))  # short: AF_UNIX path limit
    try:
        host.start()
    except BaseException:
        shutil.rmtree(host.dir, ignore_errors=True)
        raise
    return host


async def wait_file_size(path: str, size: int, timeout: float) -> float:
    """perf_counter() when ``path`` first holds ``size`` bytes (2 ms polls)."""
    with trio.fail_after(timeout):
        while True:
            try:
                if os.stat(path).st_size >= size:
                    return time.perf_counter()
            except FileNotFoundError:
                pass
            await trio.sleep(0.002)


async def wait_node(xs: xenstore.Client, path: str, timeout: float) -> bytes:
    with trio.fail_after(timeout):
        while True:
            try:
                return await xs.read(path)
            except xenstore.XenStoreError:
                await trio.sleep(0.05)


def pipe_throughput(nbytes: int, path: str) -> float:
    """Bytes/s from this process through a pipe into a reader process's file
    (until the reader has written the last byte and says so)."""
    proc = subprocess.Popen([sys.executable, __file__, "--pipe-reader", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.read(1) == b"1"
        block = b"c" * CHUNK
        fd = proc.stdin.fileno()
        t0 = time.perf_counter()
        for _ in range(nbytes // CHUNK):
            os.write(fd, block)  # blocking, like GuestConsole.write waiting for room
        proc.stdin.close()
        assert proc.stdout.read(1) == b"2"
        elapsed = time.perf_counter() - t0
        assert os.stat(path).st_size == nbytes
        return nbytes / elapsed
    finally:
        proc.wait(10)


async def host_main(args: argparse.Namespace, daemons: LocalHost) -> dict[str, float]:
    nbytes = args.console_bytes // CHUNK * CHUNK
    guest_cmd = [sys.executable, os.path.abspath(__file__), "--guest", "--reads", str(args.reads),
                 "--pipelined", str(args.pipelined), "--console-bytes", str(nbytes)]
    async with open_hypervisor(daemons.hv_path) as hv, xenstore.open_client(daemons.xs_path) as xs:
        # The socket baseline half before and half after the guest's run, so
        # that a change in the machine's load hits both sides alike.
        await xs.write("/bench-xenbus/node", VALUE)
        times = await sequential_reads(xs, "/bench-xenbus/node", args.reads // 2)
        rates = [await pipelined_reads(xs, "/bench-xenbus/node", args.pipelined // 2)]
        dom = await create_domain(hv, xs, DomainConfig(name="bench", command=guest_cmd),
                                  run_dir=daemons.run_dir, xenstore_path=daemons.xs_path)
        try:
            home = f"/local/domain/{dom.domid}"
            log = os.path.join(daemons.log_dir, f"guest-{dom.domid}.log")
            t1 = await wait_file_size(log, nbytes, 120)
            t0 = float(await wait_node(xs, f"{home}/data/bench-console-start", 30))
            guest = json.loads(await wait_node(xs, f"{home}/data/bench-result", 120))
            await xs.rm(f"{home}/data/bench-result")  # the guest may go
            guest["console_Bps"] = nbytes / (t1 - t0)
        finally:
            with trio.CancelScope(shield=True):
                await destroy_domain(hv, xs, dom.domid)

        times += await sequential_reads(xs, "/bench-xenbus/node", args.reads - args.reads // 2)
        rates.append(await pipelined_reads(xs, "/bench-xenbus/node", args.pipelined - args.pipelined // 2))
        await xs.rm("/bench-xenbus")
    dom0 = read_figures(times, len(rates) / sum(1 / r for r in rates))  # harmonic mean: total ops / total time
    dom0["console_Bps"] = pipe_throughput(nbytes, os.path.join(daemons.dir, "pipe.log"))
    hs_times, requests = await handshakes(daemons.xs_path, args.handshakes)
    guest["handshake_ms"] = statistics.median(hs_times) * 1e3
    dom0["handshake_ms"] = requests * statistics.median(times) * 1e3
    return {**{f"guest_{k}": v for k, v in guest.items()}, **{f"base_{k}": v for k, v in dom0.items()},
            "handshake_requests": requests}


ROWS = [  # key, label, unit scale, unit, baseline label, lower is better
    ("read_us", "READ round trip, sequential (median)", 1, "µs", "dom0 socket", True),
    ("read_ops", "READ, sequential", 1, "ops/s", "dom0 socket", False),
    ("pipelined_ops", f"READ, {DEPTH} in flight", 1, "ops/s", "dom0 socket", False),
    ("console_Bps", "console out: guest -> consoled -> log", 1 / 2**20, "MiB/s", "pipe -> proc -> file", False),
    ("handshake_ms", "XenBus handshake to Connected (median)", 1, "ms", "requests x socket READ", True),
]


def print_table(fig: dict[str, float]) -> None:
    print(f"{'measure':<40} {'ours':>10} {'baseline':>10} {'unit':<6} {'ratio':>6}  baseline is")
    print("-" * 98)
    for key, label, scale, unit, base_label, lower_better in ROWS:
        ours, base = fig[f"guest_{key}"], fig[f"base_{key}"]
        # ratio > 1: ours is slower / worse than the baseline
        ratio = ours / base if lower_better else base / ours
        print(f"{label:<40} {ours * scale:>10,.1f} {base * scale:>10,.1f} {unit:<6} {ratio:>5.2f}x  {base_label}")
    print("ratio: how many times slower ours is than the baseline (1.00 = as fast)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (well under a minute)")
    parser.add_argument("--reads", type=int, help="sequential READs per side")
    parser.add_argument("--pipelined", type=int, help="pipelined READs per side")
    parser.add_argument("--console-bytes", type=int, help="console bytes per side")
    parser.add_argument("--handshakes", type=int, help="XenBus device pairs to connect")
    parser.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipe-reader", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipe_reader:
        pipe_reader(args.pipe_reader)
        return 0
    if args.guest:
        trio.run(guest_main, args)
        return 0
    args.reads = args.reads or (5000 if args.quick else 20000)
    args.pipelined = args.pipelined or (20000 if args.quick else 100000)
    args.console_bytes = args.console_bytes or (8 if args.quick else 32) * 2**20
    args.handshakes = args.handshakes or (20 if args.quick else 100)
    daemons = start_daemons()
    try:
        figures = trio.run(host_main, args, daemons)
    finally:
        daemons.close()
        shutil.rmtree(daemons.dir, ignore_errors=True)
    print(f"guest (ring) vs dom0 (socket), same xenstored -I on; {args.reads} sequential, "
          f"{args.pipelined} pipelined READs of {len(VALUE)} bytes; {args.console_bytes} console bytes")
    print_table(figures)
    print(f"handshake: a plain frontend + backend (no device work), {figures['handshake_requests']} store requests "
          "in all; the baseline is those requests one after another at the socket READ median")
    print(json.dumps({k: round(v, 1) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
