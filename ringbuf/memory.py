"""Domain "physical" memory: a shared-memory file addressed by 4 KiB frames.

Each domain's pseudo-physical memory is one ``memfd`` of ``nr_pages`` pages.
Guest frame number *gfn* lives at byte offset ``gfn * PAGE_SIZE``.  The
hypervisor service creates the file; the domain process and the service each
``mmap`` it once (``MAP_SHARED``), so a page is the same physical memory in
every process that maps it.  :meth:`DomainMemory.page` returns a
``memoryview`` slice of that mapping: no copying.

Python's ``mmap`` refuses to close while memoryviews into it are alive
(``BufferError``); release page views before :meth:`DomainMemory.close`.
"""

from __future__ import annotations

import fcntl
import mmap
import os

__all__ = ["PAGE_SHIFT", "PAGE_SIZE", "DomainMemory", "FrameAllocator", "create_memfd"]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


def create_memfd(nr_pages: int, name: str = "uxen-memory") -> int:
    """A fresh zero-filled memfd of ``nr_pages`` pages (close-on-exec).

    Its size is sealed: a process holding the fd cannot shrink the file under
    other processes' mappings (which would make them fault with SIGBUS).
    """
    if nr_pages <= 0:
        raise ValueError("nr_pages must be positive")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nr_pages * PAGE_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DomainMemory:
    """A domain's memory file mapped into this process.

    ``writable=False`` maps it read-only (the fd may then be read-only too).
    The object owns ``fd`` and closes it in :meth:`close` unless
    ``close_fd=False``.
    """

    def __init__(self, fd: int, nr_pages: int | None = None, *, writable: bool = True,
                 close_fd: bool = True) -> None:
        size = os.fstat(fd).st_size
        if nr_pages is None:
            nr_pages = size // PAGE_SIZE
        if nr_pages <= 0 or nr_pages * PAGE_SIZE > size:
            raise ValueError(f"memory file holds {size} bytes, not {nr_pages} pages")
        self.fd = fd
        self.nr_pages = nr_pages
        self.writable = writable
        self._close_fd = close_fd
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._map = mmap.mmap(fd, nr_pages * PAGE_SIZE, mmap.MAP_SHARED, prot)
        view = memoryview(self._map)
        self._view = view if writable else view.toreadonly()

    @classmethod
    def create(cls, nr_pages: int, name: str = "uxen-memory") -> "DomainMemory":
        """Allocate a new memory file (used by the service and by tests)."""
        return cls(create_memfd(nr_pages, name), nr_pages)

    @property
    def size(self) -> int:
        return self.nr_pages * PAGE_SIZE

    @property
    def buffer(self) -> memoryview:
        """The whole memory, as one memoryview."""
        return self._view

    def _check_range(self, gfn: int, count: int) -> None:
        if count <= 0 or gfn < 0 or gfn + count > self.nr_pages:
            raise IndexError(f"frames {gfn}..{gfn + count - 1} outside 0..{self.nr_pages - 1}")

    def page(self, gfn: int) -> memoryview:
        """The 4096 bytes of frame ``gfn`` (a view, not a copy)."""
        self._check_range(gfn, 1)
        return self._view[gfn << PAGE_SHIFT:(gfn + 1) << PAGE_SHIFT]

    def pages(self, gfn: int, count: int) -> memoryview:
        """``count`` consecutive frames starting at ``gfn``, as one view."""
        self._check_range(gfn, count)
        return self._view[gfn << PAGE_SHIFT:(gfn + count) << PAGE_SHIFT]

    def close(self) -> None:
        """Unmap and close (idempotent).  Page views must be released first."""
        if self._map.closed:
            return
        self._view.release()
        self._map.close()
        if self._close_fd:
            os.close(self.fd)

    def __enter__(self) -> "DomainMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameAllocator:
    """First-fit allocator of contiguous frame ranges inside ``[first, first+count)``.

    A domain uses it to pick pages for rings and buffers; it is bookkeeping
    only (pure), the memory itself is :class:`DomainMemory`.
    """

    def __init__(self, first: int, count: int) -> None:
        if first < 0 or count < 0:
            raise ValueError("bad frame range")
        self._free: list[tuple[int, int]] = [(first, count)] if count else []

    @property
    def free_frames(self) -> int:
        return sum(n for _, n in self._free)

    def alloc(self, count: int = 1) -> int:
        """First gfn of ``count`` free contiguous frames; MemoryError if none."""
        if count <= 0:
            raise ValueError("count must be positive")
        for i, (start, n) in enumerate(self._free):
            if n >= count:
                if n == count:
                    del self._free[i]
                else:
                    self._free[i] = (start + count, n - count)
                return start
        raise MemoryError(f"no {count} contiguous free frames")

    def free(self, gfn: int, count: int = 1) -> None:
        """Return a range obtained from :meth:`alloc` (double frees are refused)."""
        if count <= 0:
            raise ValueError("count must be positive")
        end = gfn + count
        for start, n in self._free:
            if gfn < start + n and start < end:
                raise ValueError(f"frames {gfn}..{end - 1} are already free")
        self._free.append((gfn, count))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((start, n))
        self._free = merged
