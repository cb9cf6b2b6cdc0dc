#!/usr/bin/env python3
"""Send the same random requests to our xenstored and another XenStore
daemon; report the first reply that differs.

    python3 tools/diff_xenstored.py --compare-start SCRIPT [--seeds 0:50] [--steps 200]
    python3 tools/diff_xenstored.py --compare-socket PATH ...

For checking behaviour against Xen's own daemons (e.g. the C xenstored,
started by ``SCRIPT SOCKET``, which prints its pid last).  Each seed runs
on freshly started daemons (with --compare-socket: on the running one,
under /fz), as dom0 over the socket: WRITE, READ, DIRECTORY, MKDIR, RM,
GET_PERMS, SET_PERMS, transactions, WATCH, UNWATCH, RESET_WATCHES,
DIRECTORY_PART, unknown types, with good and bad arguments.

Compared: every reply, and the watch events each step caused (as a set).
Not compared: transaction ids (mapped between the daemons) and
DIRECTORY_PART's generation (a counter each daemon keeps its own way).
Prints the steps before a difference; the exit status is 1 if a seed differs.

Known difference with the C xenstored 4.17: an RM inside a transaction of a
node created outside it after the transaction saw the node's parent gets
EIO there (its transaction view is inconsistent; it logs corruption); ours
answers OK, and the commit fails with EAGAIN, as any conflict does.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xsdaemons import Client, daemons  # noqa: E402

from xenstore.wire import Op  # noqa: E402

_NAMES = ["a", "b", "a/b", "a/b/c", "b/x", "c", "a/c", "d/e/f"]
_BAD_PATHS = ["", "/", "//a", "a/", "/fz/a/", "/fz/" + "x" * 10, "/fz/" + "x" * 3000]
_PERMS = [[b"n0"], [b"r0"], [b"n0", b"r5"], [b"b7", b"w5"], [b"x1"], [b"n0", b"r0x10"], [b"n99999"], [b"n0", b"r-1"]]
_VALUES = [b"", b"v", b"x" * 5, b"x" * 100, b"x" * 2100]
#: Types no request should use, and ones dom0 rarely sends with these arguments.
_OTHER_TYPES = [Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.GET_DOMAIN_PATH, Op.ERROR, Op.IS_DOMAIN_INTRODUCED, Op.RESUME, Op.SET_TARGET, 20, 99]
#: Requests after which watch events are compared.
_FIRING = {Op.WATCH, Op.WRITE, Op.MKDIR, Op.RM, Op.SET_PERMS, Op.TRANSACTION_END}


def random_request(r: random.Random, open_txs: list[int]) -> tuple[int, bytes, int]:
    """``(type, payload, transaction)``: transaction is one of ``open_txs``
    (our daemon's ids), 0, or for TRANSACTION_END sometimes a stale one."""
    path = (r.choice(_BAD_PATHS) if r.random() < 0.1 else "/fz/" + r.choice(_NAMES)).encode()
    tx = r.choice(open_txs) if open_txs and r.random() < 0.4 else 0
    token = r.choice([b"t1", b"t2"])
    choices = [
        (25, lambda: (Op.WRITE, path + b"\0" + r.choice(_VALUES), tx)),
        (10, lambda: (Op.READ, path + b"\0", tx)),
        (7, lambda: (Op.DIRECTORY, path + b"\0", tx)),
        (5, lambda: (Op.MKDIR, path + b"\0", tx)),
        (6, lambda: (Op.RM, path + b"\0", tx)),
        (5, lambda: (Op.GET_PERMS, path + b"\0", tx)),
        (6, lambda: (Op.SET_PERMS, path + b"\0" + b"".join(p + b"\0" for p in r.choice(_PERMS)), tx)),
        (6, lambda: (Op.TRANSACTION_START, b"\0", 0)),
        (8, lambda: (Op.TRANSACTION_END, r.choice([b"T\0", b"F\0", b"X\0", b"T"]), r.choice(open_txs) if open_txs else r.choice([0, 5]))),
        (5, lambda: (Op.WATCH, path + b"\0" + token + b"\0", 0)),
        (3, lambda: (Op.UNWATCH, path + b"\0" + token + b"\0", 0)),
        (2, lambda: (Op.RESET_WATCHES, b"", 0)),
        (3, lambda: (Op.DIRECTORY_PART, path + b"\0" + r.choice([b"0", b"1", b"x", b""]) + b"\0", tx)),
        (7, lambda: (r.choice(_OTHER_TYPES), r.choice([b"", b"0\0", b"5\0", b"x\0"]), 0)),
    ]
    pick = r.uniform(0, sum(weight for weight, _ in choices))
    for weight, make in choices:
        pick -= weight
        if pick <= 0:
            return make()
    return choices[-1][1]()


def _type_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:  # (an unknown type, sent on purpose)
        return str(op)


def _comparable(op: int, reply: tuple[int, bytes]) -> tuple[int, bytes]:
    if op == Op.DIRECTORY_PART and reply[0] == Op.DIRECTORY_PART:
        return reply[0], reply[1].split(b"\0", 1)[1]  # drop the generation
    if op == Op.TRANSACTION_START and reply[0] == Op.TRANSACTION_START:
        return reply[0], b"<id>"
    return reply


def run_seed(ours: str, theirs: str, seed: int, steps: int, shown: int) -> bool:
    """True if both daemons answered every step alike."""
    r = random.Random(seed)
    clients = [Client(ours), Client(theirs)]
    for c in clients:
        c.call(Op.RM, b"/fz\0")
        c.call(Op.MKDIR, b"/fz\0")
        c.events.clear()
    ids: list[list[int]] = [[], []]  # open transactions, in the same order in both
    trail: list[str] = []
    for step in range(steps):
        op, payload, tx = random_request(r, ids[0])
        txs = [tx, ids[1][ids[0].index(tx)] if tx in ids[0] else tx]
        replies = []
        for c, t in zip(clients, txs):
            try:
                replies.append(c.call(op, payload, t))
            except OSError:  # (ConnectionError included)
                replies.append((-1, b"connection closed"))
        if op == Op.TRANSACTION_START and all(rep[0] == Op.TRANSACTION_START for rep in replies):
            for i, rep in enumerate(replies):
                ids[i].append(int(rep[1].rstrip(b"\0")))
        if op == Op.TRANSACTION_END and tx in ids[0]:
            j = ids[0].index(tx)
            del ids[0][j], ids[1][j]
        # A set: an event identical to one still queued may be dropped, and
        # whether it is still queued depends on timing (cxenstored).
        events = [sorted(set(c.events)) if op in _FIRING else [] for c in clients]
        for c in clients:
            c.events.clear()
        trail.append(f"{step:4} {_type_name(op)} tx={tx} {payload[:60]!r} -> {replies[0]!r:.60}")
        if _comparable(op, replies[0]) != _comparable(op, replies[1]) or events[0] != events[1]:
            print(f"seed {seed}: step {step} differs")
            print("\n".join(trail[-shown:]))
            print(f"  ours:   {replies[0]!r:.200} events {events[0][:4]}")
            print(f"  theirs: {replies[1]!r:.200} events {events[1][:4]}")
            return False
        if replies[0][0] == -1:  # both hung up (e.g. on a packet over 4096 bytes): the seed ends
            break
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare-socket", metavar="PATH", help="socket of a running daemon to compare with")
    p.add_argument("--compare-start", metavar="SCRIPT", help="start the daemon to compare with: `SCRIPT SOCKET` prints its pid last")
    p.add_argument("--seeds", default="0:20", metavar="FIRST:END", help="random seeds to run (default 0:20)")
    p.add_argument("--steps", type=int, default=200, help="requests per seed")
    p.add_argument("--show", type=int, default=15, help="steps shown before a difference")
    p.add_argument("--ours-arg", action="append", default=[], help="extra flag for our daemon (repeatable)")
    args = p.parse_args()
    if not (args.compare_socket or args.compare_start):
        p.error("give --compare-start or --compare-socket")
    first, end = (int(x) for x in args.seeds.split(":"))
    differing = []
    for seed in range(first, end):
        with daemons(args.compare_start, args.compare_socket, args.ours_arg, "xsdiff-") as (ours, theirs):
            if not run_seed(ours, theirs, seed, args.steps, args.show):
                differing.append(seed)
    print(f"{end - first - len(differing)} of {end - first} seeds alike" + (f"; differing: {differing}" if differing else ""))
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
