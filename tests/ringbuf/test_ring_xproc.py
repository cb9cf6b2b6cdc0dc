"""Cross-process ring tests: two real processes share a memfd page and signal
each other through eventfd-backed event channels.

The child (this file run as a script) is the backend / xenstore server; the
test process is the frontend / guest. Hypothesis picks the ring size, a start
index just below 2^32, batch sizes and pauses on both sides (the child gets
its schedule as a seed). Checked: nothing lost, duplicated or reordered, and
no missed wake-up: an end that waited WAKE_TIMEOUT seconds without a
notification while work was pending reports failure (in a correct run waits
end by notification within microseconds).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import select
import subprocess
import sys
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ringbuf.byte_ring import ByteRingRole, XenstoreRing
from ringbuf.evtchn import EventChannel, new_eventfd
from ringbuf.layouts.xenstore import XenstoreDomainInterface as XS
from ringbuf.ring import RING_IDX_MASK, SRING_HEADER_SIZE, define_ring_types

WAKE_TIMEOUT = 1.0
PAGES = 4


class Msg(ctypes.Structure):
    _fields_ = [("seq", ctypes.c_uint32), ("value", ctypes.c_uint32)]


MSG_RING = define_ring_types("xproc", Msg, Msg)  # response echoes seq, transforms value


def transform(value: int) -> int:
    return value ^ 0xA5A5A5A5


def pause(rng: random.Random, chance: float) -> None:
    """Perturb the interleaving: nothing, a short spin, a yield, or a sleep."""
    if rng.random() >= chance:
        return
    kind = rng.randrange(3)
    if kind == 0:
        end = time.perf_counter() + rng.uniform(0, 20e-6)
        while time.perf_counter() < end:
            pass
    elif kind == 1:
        time.sleep(0)
    else:
        time.sleep(rng.uniform(0, 300e-6))


# -- child side ----------------------------------------------------------------


async def serve_ring(cmd: dict, mem: memoryview, chan: EventChannel) -> dict:
    rng = random.Random(cmd["seed"])
    back = MSG_RING.attach_back(mem[: cmd["ring_bytes"]])
    done = wakeups = 0
    try:
        while done < cmd["count"]:
            reqs = back.take_requests(rng.randint(1, cmd["max_take"]))
            for r in reqs:
                back.put_response(Msg(r.seq, transform(r.value)))
                if rng.random() < 0.3:  # sometimes publish mid-batch
                    pause(rng, cmd["pause"])
                    if back.push_responses():
                        chan.notify()
            pause(rng, cmd["pause"])
            if back.push_responses():
                chan.notify()
            done += len(reqs)
            if reqs or back.final_check_for_requests():
                continue
            pause(rng, cmd["pause"])  # between final check and sleeping
            with trio.move_on_after(WAKE_TIMEOUT):
                await chan.wait()
                wakeups += 1
                continue
            if back.unconsumed_requests():
                return {"error": f"backend missed a wake-up with {back.unconsumed_requests()} requests pending"}
        return {"ok": True, "wakeups": wakeups}
    finally:
        back.release()


async def serve_xenstore(cmd: dict, mem: memoryview, chan: EventChannel) -> dict:
    rng = random.Random(cmd["seed"])
    server = XenstoreRing(mem[:4096], ByteRingRole.SERVER)
    echoed = 0
    backlog = b""
    try:
        while echoed < cmd["count"]:
            moved = False
            if len(backlog) < 4096:
                got = server.read(rng.randint(1, 1024))
                backlog += got
                moved |= bool(got)
            pause(rng, cmd["pause"])
            if backlog:
                n = server.write(backlog[: rng.randint(1, 1024)])
                backlog = backlog[n:]
                echoed += n
                moved |= bool(n)
            if moved:
                chan.notify()  # no hold-off on this ring: always notify
                continue
            with trio.move_on_after(WAKE_TIMEOUT):
                await chan.wait()
                continue
            if (server.readable() and len(backlog) < 4096) or (backlog and server.writable()):
                return {"error": "xenstore server missed a wake-up"}
        return {"ok": True}
    finally:
        server.release()


async def child_main(memfd: int, wait_fd: int, notify_fd: int) -> None:
    mem_map = mmap.mmap(memfd, PAGES * 4096)
    mem = memoryview(mem_map)
    chan = EventChannel(2, wait_fd, notify_fd)
    stdin = trio.wrap_file(sys.stdin)
    while line := await stdin.readline():
        cmd = json.loads(line)
        chan.clear()
        serve = serve_ring if cmd["mode"] == "ring" else serve_xenstore
        try:
            result = await serve(cmd, mem, chan)
        except Exception as exc:  # report, don't hang the parent
            result = {"error": repr(exc)}
        print(json.dumps(result), flush=True)


# -- parent side ---------------------------------------------------------------


class Peer:
    def __init__(self) -> None:
        self.memfd = os.memfd_create("xproc-ring")
        os.ftruncate(self.memfd, PAGES * 4096)
        self.map = mmap.mmap(self.memfd, PAGES * 4096)
        self.mem = memoryview(self.map)
        parent_fd, child_fd = new_eventfd(), new_eventfd()
        self.chan = EventChannel(1, parent_fd, child_fd, close_fds=False)
        self.fds = (parent_fd, child_fd)
        self.proc = self._spawn()
        self.report: dict | None = None

    def _spawn(self) -> subprocess.Popen:
        parent_fd, child_fd = self.fds
        return subprocess.Popen(
            [sys.executable, __file__, str(self.memfd), str(child_fd), str(parent_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self.memfd, child_fd, parent_fd),
            text=True,
        )

    def _stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def restart(self) -> None:
        """After a failed example the child may still be mid-command: replace it."""
        self.proc.kill()
        self._stop()
        self.proc = self._spawn()

    def start(self, cmd: dict) -> None:
        self.report = None
        self.chan.clear()
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 10.0) -> dict:
        if self.report is not None:
            return self.report
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "child did not report in time"
        line = self.proc.stdout.readline()
        assert line, f"child died (rc={self.proc.poll()})"
        return json.loads(line)

    def wait_event(self) -> bool:
        """Block until notified; False after WAKE_TIMEOUT without a notification.

        If the child reports a failure meanwhile, fail at once with its report
        instead of waiting for work that will never come."""
        watch = [self.chan.wait_fd] + ([self.proc.stdout] if self.report is None else [])
        ready, _, _ = select.select(watch, [], [], WAKE_TIMEOUT)
        if self.proc.stdout in ready:
            line = self.proc.stdout.readline()
            self.report = json.loads(line) if line else {"error": "child died"}
            assert self.report.get("ok"), f"child failed: {self.report}"
            return True  # it finished: its last responses are already published
        self.chan.clear()
        return bool(ready)

    def close(self) -> None:
        self._stop()
        # EventChannel.close() needs a trio context; we own the fds (close_fds=False).
        for fd in self.fds:
            os.close(fd)
        self.mem.release()
        self.map.close()
        os.close(self.memfd)


@pytest.fixture(scope="module")
def peer():
    p = Peer()
    yield p
    p.close()


def schedule():
    return st.fixed_dictionaries(
        {
            "start": st.integers(0, 200).map(lambda k: (0xFFFFFFF0 + k) & RING_IDX_MASK),
            "entries": st.sampled_from([1, 2, 4, 8, 32, 512]),
            "count": st.integers(1, 400),
            "batches": st.lists(st.integers(1, 40), min_size=1, max_size=10),
            "parent_take": st.integers(1, 40),
            "child_take": st.integers(1, 40),
            "pause": st.sampled_from([0.0, 0.05, 0.3]),
            "seed": st.integers(0, 2**32),
        }
    )


@given(s=schedule())
@settings(max_examples=150, deadline=None)
def test_ring_between_processes_loses_nothing_and_never_sleeps_on_work(peer, s):
    ring_bytes = SRING_HEADER_SIZE + s["entries"] * MSG_RING.entry_size
    front = MSG_RING.init_front(peer.mem[:ring_bytes], start_index=s["start"])
    rng = random.Random(s["seed"] ^ 1)
    peer.start(
        {
            "mode": "ring",
            "ring_bytes": ring_bytes,
            "count": s["count"],
            "seed": s["seed"],
            "max_take": s["child_take"],
            "pause": s["pause"],
        }
    )
    try:
        sent, got, i = 0, [], 0
        while len(got) < s["count"]:
            n = min(s["batches"][i % len(s["batches"])], front.free_requests(), s["count"] - sent)
            i += 1
            for k in range(n):
                front.put_request(Msg(sent + k, (sent + k) * 7919 & RING_IDX_MASK))
            sent += n
            pause(rng, s["pause"])
            if front.push_requests():
                peer.chan.notify()
            rsps = front.take_responses(s["parent_take"])
            got += [(r.seq, r.value) for r in rsps]
            if n or rsps:
                continue
            if front.final_check_for_responses():
                continue
            pause(rng, s["pause"])
            if not peer.wait_event():
                assert front.unconsumed_responses() == 0, "frontend missed a wake-up"
        assert got == [(k, transform(k * 7919 & RING_IDX_MASK)) for k in range(s["count"])]
        assert front.shared.rsp_prod == (s["start"] + s["count"]) & RING_IDX_MASK
        result = peer.result()
    except BaseException:
        peer.restart()
        raise
    finally:
        front.release()
    assert result.get("ok"), result


@given(
    start=st.integers(0, 3000).map(lambda k: (0xFFFFF800 + k) & RING_IDX_MASK),
    data=st.binary(min_size=1, max_size=6000),
    chunks=st.lists(st.integers(1, 1500), min_size=1, max_size=8),
    pause_chance=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=60, deadline=None)
def test_xenstore_byte_ring_between_processes(peer, start, data, chunks, pause_chance, seed):
    page = peer.mem[:4096]
    page[:4096] = bytes(4096)
    idx = page[XS.req_cons.offset : XS.rsp_prod.offset + 4].cast("I")
    for i in range(4):
        idx[i] = start  # a guest must not assume the indices start at 0
    idx.release()
    guest = XenstoreRing(page, ByteRingRole.GUEST)
    peer.start({"mode": "xenstore", "count": len(data), "seed": seed, "pause": pause_chance})
    try:
        sent, echoed, i = 0, bytearray(), 0
        while len(echoed) < len(data):
            n = guest.write(data[sent : sent + chunks[i % len(chunks)]])
            i += 1
            sent += n
            got = guest.read()
            echoed += got
            if n or got:
                peer.chan.notify()
                continue
            if not peer.wait_event():
                assert guest.readable() == 0, "guest missed a wake-up"
        assert bytes(echoed) == data
        result = peer.result()
    except BaseException:
        peer.restart()
        raise
    finally:
        guest.release()
        page.release()
    assert result.get("ok"), result


if __name__ == "__main__":
    trio.run(child_main, *map(int, sys.argv[1:4]))
