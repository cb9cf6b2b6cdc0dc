#!/usr/bin/env python3
"""Client-side XenStore latency, in the manner of Xen's ``test-xenstore``.

For each daemon socket given (``--socket``, repeatable: daemons side by
side) and for both flavours of our client library (blocking and trio), it
times the same twelve tests as Xen's test-xenstore — read/write of 1 and
2000 bytes, directory, rm of a node and of a directory, empty /
read-modify-write transactions (committed and aborted) and a conflicting
transaction — and prints min/avg/max per operation.  Each iteration first
recreates the test node and runs the untimed set-up, like test-xenstore.
A pipelined row measures many requests in flight on one connection.

With ``--cli N`` it also compares the start-up cost of the command-line
tools: N calls of Debian's ``/usr/bin/xenstore-read`` and of ours.

    python tools/bench_client.py --socket /tmp/a/socket --socket /tmp/b/socket -i 1000 --cli 50

The tests are written once, as generators that yield operations; a small
driver per flavour performs them (the sans-IO idea applied to a bench).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Generator, Iterator

import trio

import xenstore
from xenstore import XenStoreError

Op = tuple  # ("read", path) / ("write", path, value) / ("tx_start",) / ...
Test = Callable[[str], "Steps"]
Steps = Generator[Op, object, None]

BUFFERS = 10
PAYLOAD = 4000


def node(base: str, i: int = 0) -> str:
    return f"{base}/{chr(ord('a') + i)}"


def data(i: int, size: int) -> bytes:
    return bytes([ord("a") + i]) * size


# -- the tests: (init, run, check) generators over a per-run base path ---------


def read_test(size: int):
    def init(base: str) -> Steps:
        yield ("write", node(base), data(0, size), 0)

    def run(base: str) -> Steps:
        yield ("read", node(base), 0)

    return init, run, None


def write_test(size: int):
    def run(base: str) -> Steps:
        yield ("write", node(base), data(0, size), 0)

    def check(base: str) -> Steps:
        value = yield ("read", node(base), 0)
        assert value == data(0, size), "write not visible"

    return None, run, check


def dir_test():
    def init(base: str) -> Steps:
        for i in range(BUFFERS):
            yield ("write", node(base, i), data(i, 1), 0)

    def run(base: str) -> Steps:
        yield ("directory", base, 0)

    def check(base: str) -> Steps:
        names = yield ("directory", base, 0)
        assert sorted(names) == [chr(ord("a") + i) for i in range(BUFFERS)]

    return init, run, check


def rm_test(children: int):
    def init(base: str) -> Steps:
        for i in range(children):
            yield ("write", node(base, i), data(i, 1), 0)

    def run(base: str) -> Steps:
        yield ("rm", base, 0)

    return init, run, None


def empty_transaction(abort: bool):
    def run(base: str) -> Steps:
        for _ in range(100):
            tx = yield ("tx_start",)
            try:
                yield ("tx_end", tx, not abort)
                return
            except XenStoreError as exc:
                if exc.name != "EAGAIN":
                    raise

    return None, run, None


def rmw_transaction(abort: bool):
    def init(base: str) -> Steps:
        yield ("write", node(base), b"a", 0)

    def run(base: str) -> Steps:
        for _ in range(100):
            tx = yield ("tx_start",)
            yield ("read", node(base), tx)
            yield ("write", node(base), b"b", tx)
            assert (yield ("read", node(base), tx)) == b"b"
            assert (yield ("read", node(base), 0)) == b"a"  # isolation
            try:
                yield ("tx_end", tx, not abort)
                return
            except XenStoreError as exc:
                if exc.name != "EAGAIN":
                    raise

    def check(base: str) -> Steps:
        assert (yield ("read", node(base), 0)) == (b"a" if abort else b"b")

    return init, run, check


def conflict_transaction():
    def init(base: str) -> Steps:
        yield ("write", node(base), b"a", 0)

    def run(base: str) -> Steps:
        tx = yield ("tx_start",)
        yield ("read", node(base), tx)
        yield ("write", node(base), b"b", 0)  # someone else (here: us, outside)
        assert (yield ("read", node(base), tx)) == b"a"
        yield ("write", node(base), b"c", tx)
        try:
            yield ("tx_end", tx, True)
        except XenStoreError as exc:
            assert exc.name == "EAGAIN", exc
        else:
            raise AssertionError("conflicting transaction committed")

    def check(base: str) -> Steps:
        assert (yield ("read", node(base), 0)) == b"b"

    return init, run, check


TESTS: dict[str, tuple] = {
    "read 1": read_test(1),
    "read 2000": read_test(2000),
    "write 1": write_test(1),
    "write 2000": write_test(2000),
    "dir": dir_test(),
    "rm node": rm_test(0),
    "rm dir": rm_test(BUFFERS),
    "ta empty": empty_transaction(False),
    "ta empty x": empty_transaction(True),
    "ta rmw": rmw_transaction(False),
    "ta rmw x": rmw_transaction(True),
    "ta err": conflict_transaction(),
}


# -- drivers ------------------------------------------------------------------


def _sync_do(client: xenstore.SyncClient, op: Op) -> object:
    kind = op[0]
    if kind == "tx_start":
        return client.transaction_start()
    if kind == "tx_end":
        return client.transaction_end(op[1], op[2])
    target = client if not op[-1] else xenstore.SyncTransaction(client, op[-1])
    return getattr(target, kind)(*op[1:-1])


async def _async_do(client: xenstore.Client, op: Op) -> object:
    kind = op[0]
    if kind == "tx_start":
        return await client.transaction_start()
    if kind == "tx_end":
        return await client.transaction_end(op[1], op[2])
    target = client if not op[-1] else _bound(client, op[-1])
    return await getattr(target, kind)(*op[1:-1])


def _bound(client: xenstore.Client, tx_id: int) -> xenstore.Transaction:
    t = xenstore.Transaction(client)
    t.tx_id = tx_id
    return t


def _advance(steps: Steps, value: object, error: BaseException | None) -> Op | None:
    """The script's next operation, given the outcome of the last one (None once it has finished)."""
    try:
        return steps.throw(error) if error is not None else steps.send(value)
    except StopIteration:
        return None


def drive_sync(client: xenstore.SyncClient, steps: Steps | None) -> None:
    if steps is None:
        return
    value: object = None
    error: BaseException | None = None
    while (op := _advance(steps, value, error)) is not None:
        value, error = None, None
        try:
            value = _sync_do(client, op)
        except XenStoreError as exc:
            error = exc


async def drive_async(client: xenstore.Client, steps: Steps | None) -> None:
    if steps is None:
        return
    value: object = None
    error: BaseException | None = None
    while (op := _advance(steps, value, error)) is not None:
        value, error = None, None
        try:
            value = await _async_do(client, op)
        except XenStoreError as exc:
            error = exc


def _prepare(base: str) -> Iterator[Op]:
    yield ("rm", base, 0)
    yield ("write", base, b"", 0)


def run_sync(socket: str, name: str, iterations: int, base: str) -> list[int]:
    init, run, check = TESTS[name]
    times = []
    with xenstore.open_sync_client(socket) as client:
        for _ in range(iterations):
            for op in _prepare(base):
                _sync_do(client, op)
            drive_sync(client, init(base) if init else None)
            t0 = time.perf_counter_ns()
            drive_sync(client, run(base))
            times.append(time.perf_counter_ns() - t0)
            drive_sync(client, check(base) if check else None)
        client.rm(base)
    return times


def run_async(socket: str, name: str, iterations: int, base: str) -> list[int]:
    init, run, check = TESTS[name]
    times: list[int] = []

    async def main() -> None:
        async with xenstore.open_client(socket) as client:
            for _ in range(iterations):
                for op in _prepare(base):
                    await _async_do(client, op)
                await drive_async(client, init(base) if init else None)
                t0 = time.perf_counter_ns()
                await drive_async(client, run(base))
                times.append(time.perf_counter_ns() - t0)
                await drive_async(client, check(base) if check else None)
            await client.rm(base)

    trio.run(main)
    return times


def run_pipelined(socket: str, total: int, depth: int, base: str) -> float:
    """Reads per second with ``depth`` tasks sharing one async connection."""

    async def main() -> float:
        async with xenstore.open_client(socket) as client:
            await client.write(node(base), b"x")
            per_task = max(1, total // depth)

            async def reader() -> None:
                for _ in range(per_task):
                    await client.read(node(base))

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(depth):
                    nursery.start_soon(reader)
            elapsed = time.perf_counter() - t0
            await client.rm(base)
            return per_task * depth / elapsed

    return trio.run(main)


# -- CLI start-up ---------------------------------------------------------------


def cli_per_call_ms(argv: list[str], socket: str, calls: int) -> tuple[float, float]:
    """(median, min) wall time of one call, in ms."""
    env = dict(os.environ, XENSTORED_PATH=socket)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measure with bytecode, as installed
    for _ in range(2):  # warm the page cache (and write .pyc files)
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), min(times)


def cli_comparison(socket: str, calls: int) -> list[tuple[str, tuple[float, float]]]:
    with xenstore.open_sync_client(socket) as c:
        c.write("/bench-cli", b"value")
    rows = []
    ours = shutil.which("xenstore-read", path=os.path.dirname(sys.executable)) or shutil.which("xenstore-read")
    candidates = [
        ("C /usr/bin/xenstore-read", ["/usr/bin/xenstore-read", "/bench-cli"]),
        (f"ours ({ours})", [ours, "/bench-cli"] if ours else None),
        (
            "ours, python -S (no site hooks)",
            [sys.executable, "-S", "-c", "import sys; sys.path[:0] = sys.argv[1:2]; del sys.argv[1]; "
             "from xenstore.cli.main import main_read; sys.exit(main_read())",
             os.path.dirname(os.path.dirname(os.path.abspath(xenstore.__file__))), "/bench-cli"],
        ),
        ("python -S -c pass (interpreter floor)", [sys.executable, "-S", "-c", "pass"]),
        ("python -c pass (interpreter + site)", [sys.executable, "-c", "pass"]),
    ]
    for label, argv in candidates:
        if argv is None or not os.path.exists(argv[0]):
            continue
        rows.append((label, cli_per_call_ms(argv, socket, calls)))
    with xenstore.open_sync_client(socket) as c:
        c.rm("/bench-cli")
    return rows


# -- output -------------------------------------------------------------------


def fmt(times: list[int]) -> str:
    us = [t / 1000 for t in times]
    return f"{statistics.fmean(us):7.1f} ({min(us):6.1f}..{max(us):7.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", action="append", help="daemon socket (repeat to compare daemons)")
    parser.add_argument("-i", "--iterations", type=int, default=1000)
    parser.add_argument("-t", "--test", action="append", choices=list(TESTS), help="only these tests")
    parser.add_argument("--flavour", choices=["sync", "async", "both"], default="both")
    parser.add_argument("--pipeline", type=int, default=32, help="tasks sharing one connection (0: skip)")
    parser.add_argument("--cli", type=int, default=0, metavar="N", help="also time N CLI calls, ours vs /usr/bin")
    args = parser.parse_args()
    sockets = args.socket or [xenstore.daemon_socket_path()]
    names = args.test or list(TESTS)
    flavours = ["sync", "async"] if args.flavour == "both" else [args.flavour]
    base = f"/bench-client-{os.getpid()}"

    columns = [(s, f) for s in sockets for f in flavours]
    print(f"per-operation latency, µs: avg (min..max) over {args.iterations} iterations")
    for i, s in enumerate(sockets):
        print(f"  daemon {i}: {s}")
    header = f"{'test':<11}" + "".join(f" | d{sockets.index(s)} {f:<5} {'':>25}" for s, f in columns)
    print(header)
    print("-" * len(header))
    for name in names:
        cells = []
        for socket, flavour in columns:
            runner = run_sync if flavour == "sync" else run_async
            try:
                cells.append(fmt(runner(socket, name, args.iterations, base)))
            except (AssertionError, XenStoreError) as exc:  # a daemon that behaves unlike Xen's
                cells.append(f"FAILED {type(exc).__name__} {exc}"[:34])
                with xenstore.open_sync_client(socket) as c:
                    c.rm(base)
        print(f"{name:<11}" + "".join(f" | {c:>34}" for c in cells))
    if args.pipeline:
        total = max(args.iterations * 10, 2000)
        for i, socket in enumerate(sockets):
            rate = run_pipelined(socket, total, args.pipeline, base)
            print(f"pipelined reads, {args.pipeline} tasks on one async connection, d{i}: {rate:,.0f} reads/s")
    if args.cli:
        print(f"\nCLI start-up: xenstore-read, per call over {args.cli} calls (same daemon: d0): median / min")
        for label, (median, fastest) in cli_comparison(sockets[0], args.cli):
            print(f"  {median:7.2f} / {fastest:6.2f} ms  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
