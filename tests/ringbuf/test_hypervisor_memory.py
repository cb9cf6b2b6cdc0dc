"""Domain memory files, frame allocation, grant-page mapping, package exports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import ringbuf
import ringbuf.hypervisor
from ringbuf.hypervisor.mapping import GrantMapping, map_frames
from ringbuf.memory import PAGE_SIZE, DomainMemory, FrameAllocator


def test_memory_is_shared_between_processes_without_copies():
    with DomainMemory.create(4) as mem:
        page = mem.page(2)
        page[:5] = b"hello"
        code = ("import os, sys; from ringbuf.memory import DomainMemory;"
                "m = DomainMemory(int(sys.argv[1])); p = m.page(2);"
                "assert bytes(p[:5]) == b'hello'; p[:5] = b'HELLO'")
        subprocess.run([sys.executable, "-c", code, str(mem.fd)], pass_fds=[mem.fd], check=True,
                       timeout=30)
        assert bytes(page[:5]) == b"HELLO"  # the same page, seen through our mapping
        assert page.obj is mem.buffer.obj  # a view over the mmap, not a copy
        with pytest.raises(IndexError):
            mem.page(4)
        page.release()


def test_memory_file_size_is_sealed():
    with DomainMemory.create(2) as mem:
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, PAGE_SIZE)  # would make other mappers fault


def test_read_only_memory_view():
    with DomainMemory.create(1) as rw:
        ro = DomainMemory(rw.fd, writable=False, close_fd=False)
        with pytest.raises(TypeError):
            ro.page(0)[0] = 1
        ro.close()


def test_scattered_frames_map_contiguously_and_read_only_is_enforced():
    with DomainMemory.create(8) as mem:
        for f in range(8):
            mem.page(f)[0] = f
        mapping = GrantMapping(1, [10, 11, 12], handle=1, frames=[6, 2, 5], readonly=True, fd=mem.fd)
        assert [p[0] for p in mapping.pages] == [6, 2, 5]
        assert mapping.buffer[PAGE_SIZE] == 2
        with pytest.raises(TypeError):
            mapping.buffer[0] = 0
        mem.page(2)[1] = 99
        assert mapping.pages[1][1] == 99
        mapping.close()
        assert mapping.closed
        region = map_frames(mem.fd, [3, 4], readonly=False)
        region[PAGE_SIZE] = 42
        assert mem.page(4)[0] == 42
        region.close()


def test_mapping_refuses_to_close_under_live_views():
    with DomainMemory.create(2) as mem:
        mapping = GrantMapping(1, [8], 1, [1], False, mem.fd)
        view = mapping.pages[0][:10]
        with pytest.raises(BufferError):
            mapping.close()
        view.release()
        mapping.close()


def test_frame_allocator_basics():
    alloc = FrameAllocator(4, 6)
    assert alloc.alloc(2) == 4
    assert alloc.alloc(3) == 6
    with pytest.raises(MemoryError):
        alloc.alloc(2)
    alloc.free(4, 2)
    with pytest.raises(ValueError):
        alloc.free(5)
    assert alloc.alloc(2) == 4


class FrameAllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.alloc = FrameAllocator(0, 32)
        self.used: dict[int, int] = {}

    @rule(count=st.integers(1, 8))
    def allocate(self, count):
        free = {f for f in range(32)} - {f for s, n in self.used.items() for f in range(s, s + n)}
        possible = any(all(f + i in free for i in range(count)) for f in free)
        try:
            start = self.alloc.alloc(count)
        except MemoryError:
            assert not possible
            return
        assert all(start + i in free for i in range(count))
        self.used[start] = count

    @rule(data=st.data())
    def release(self, data):
        if self.used:
            start = data.draw(st.sampled_from(sorted(self.used)))
            self.alloc.free(start, self.used.pop(start))

    @invariant()
    def accounting(self):
        assert self.alloc.free_frames == 32 - sum(self.used.values())


FrameAllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestFrameAllocator = FrameAllocatorMachine.TestCase


@pytest.mark.parametrize("module", [ringbuf, ringbuf.hypervisor])
def test_public_exports_resolve(module):
    names = [n for n in dir(module) if not n.startswith("_")]
    for expected in ("open_hypervisor", "HypervisorClient", "DomainInfo"):
        assert expected in names
    for name in names:
        assert getattr(module, name) is not None
