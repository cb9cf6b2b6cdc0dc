"""In-process throughput of Engine.handle() (not collected by pytest).

    python3 tests/core/bench_core_engine.py [N]

Measures requests/s for READ and WRITE (privileged and unprivileged),
transactions (START + WRITE + END), DIRECTORY, and a WRITE that fires 10
watches while 10000 unrelated watches are registered.
"""

from __future__ import annotations

import sys
import time

from xenstore.core import Engine
from xenstore.wire import Op, Packet


def rate(handle, conn, packets) -> float:
    start = time.perf_counter()
    for packet in packets:
        handle(conn, packet)
    return len(packets) / (time.perf_counter() - start)


def main(n: int = 200_000) -> None:
    engine = Engine()
    dom0 = engine.connect()
    handle = engine.handle
    for i in range(100):
        handle(dom0, Packet(Op.WRITE, 1, 0, b"/bench/key%d\0value" % i))
        handle(dom0, Packet(Op.SET_PERMS, 1, 0, b"/bench/key%d\0n0\0b5\0" % i))
    handle(dom0, Packet(Op.SET_PERMS, 1, 0, b"/bench\0n0\0b5\0"))
    guest = engine.connect(5, privileged=False)
    reads = [Packet(Op.READ, i, 0, b"/bench/key%d\0" % (i % 100)) for i in range(n)]
    writes = [Packet(Op.WRITE, i, 0, b"/bench/key%d\0value%d" % (i % 100, i)) for i in range(n)]
    for name, conn in (("dom0", dom0), ("guest", guest)):
        print(f"READ  ({name}): {rate(handle, conn, reads):>10,.0f} ops/s")
        print(f"WRITE ({name}): {rate(handle, conn, writes):>10,.0f} ops/s")
        engine.take_changes()
    m = n // 10
    start = time.perf_counter()
    for i in range(m):
        tx = int(handle(dom0, Packet(Op.TRANSACTION_START, 1, 0, b"\0"))[-1][1].payload[:-1])
        handle(dom0, Packet(Op.WRITE, 2, tx, b"/bench/key%d\0v" % (i % 100)))
        handle(dom0, Packet(Op.TRANSACTION_END, 3, tx, b"T\0"))
    print(f"TX start+write+end: {m / (time.perf_counter() - start):>10,.0f} tx/s")
    engine.take_changes()
    dirs = [Packet(Op.DIRECTORY, 1, 0, b"/bench\0")] * m
    print(f"DIRECTORY (100 children): {rate(handle, dom0, dirs):>10,.0f} ops/s")
    for i in range(10_000):
        handle(dom0, Packet(Op.WATCH, 1, 0, b"/other/w%d\0t\0" % i))
    for i in range(10):
        handle(dom0, Packet(Op.WATCH, 1, 0, b"/bench\0t%d\0" % i))
    print(f"WRITE firing 10 watches, 10000 unrelated: {rate(handle, dom0, writes[:m]):>10,.0f} ops/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
