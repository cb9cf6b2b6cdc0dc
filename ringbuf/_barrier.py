"""A full memory barrier for pure Python code sharing memory with another CPU.

Python has no fence primitive. Ring producers must make their index store
visible before they read the peer's event index (and consumers the reverse),
otherwise both sides can decide to sleep (the classic lost wake-up). On
x86-64 the only reordering the CPU does is store->load, and any locked
instruction (``lock cmpxchg``) drains the store buffer. CPython's
``threading.Lock`` acquire/release on Linux is a sem_t / pthread mutex whose
uncontended fast path is exactly such an atomic, so acquire+release of a
private, never-contended lock acts as a full barrier (~70 ns). The lost
wake-up freedom that relies on this is exercised by the cross-process tests,
not merely assumed.
"""

from __future__ import annotations

import threading
from typing import Callable


def make_full_barrier() -> Callable[[], None]:
    """Return a function that executes one full (store/load) memory barrier.

    Each ring end owns its own barrier so the lock is never contended.
    """
    lock = threading.Lock()
    acquire = lock.acquire
    release = lock.release

    def full_barrier() -> None:
        acquire()
        release()

    return full_barrier
