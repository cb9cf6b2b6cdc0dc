"""Mapping granted pages into this process, virtually contiguous, no copies.

The service answers a map request with the granter's memory fd (read-only fd
for read-only maps) and the frame of every ref.  Consecutive frames are
mapped with one ``mmap``; scattered frames are stitched into one contiguous
region (``MAP_FIXED`` over an anonymous reservation, as gntdev does), so a
multi-page ring is one buffer either way.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Sequence

from ..memory import PAGE_SIZE

__all__ = ["GrantMapping", "map_frames"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_MAP_FIXED = 0x10


def _contiguous(frames: Sequence[int]) -> bool:
    return all(b == a + 1 for a, b in zip(frames, frames[1:]))


def map_frames(fd: int, frames: Sequence[int], readonly: bool) -> mmap.mmap:
    """One mmap covering ``frames`` of the memory file ``fd``, in order."""
    count = len(frames)
    if _contiguous(frames):
        access = mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE
        return mmap.mmap(fd, count * PAGE_SIZE, access=access, offset=frames[0] * PAGE_SIZE)
    region = mmap.mmap(-1, count * PAGE_SIZE)  # reservation; its close() unmaps everything
    anchor = ctypes.c_char.from_buffer(region)
    base = ctypes.addressof(anchor)
    del anchor  # drop the buffer export so region can be closed later
    prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
    for i, frame in enumerate(frames):
        want = base + i * PAGE_SIZE
        got = _libc.mmap(want, PAGE_SIZE, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, frame * PAGE_SIZE)
        if got != want:
            err = ctypes.get_errno()
            region.close()
            raise OSError(err, f"mmap of frame {frame}: {os.strerror(err)}")
    return region


class GrantMapping:
    """Granted pages mapped here: ``buffer`` (all pages) and ``pages`` (one
    view per ref).  Read-only mappings give read-only memoryviews.

    Release every view you derived before unmapping (Python's mmap refuses
    to close while views are alive, which protects you from touching
    unmapped memory).
    """

    def __init__(self, domid: int, refs: Sequence[int], handle: int, frames: Sequence[int],
                 readonly: bool, fd: int) -> None:
        self.domid = domid
        self.refs = tuple(refs)
        self.handle = handle
        self.readonly = readonly
        self._map = map_frames(fd, frames, readonly)
        self._view = memoryview(self._map)
        self.buffer: memoryview = self._view.toreadonly() if readonly else self._view
        self.pages: list[memoryview] = [self.buffer[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                                        for i in range(len(self.refs))]

    @property
    def closed(self) -> bool:
        return self._map.closed

    def close(self) -> None:
        """Unmap locally (idempotent); raises BufferError if views are still alive."""
        if self._map.closed:
            return
        for page in self.pages:
            page.release()
        self.buffer.release()
        self._view.release()
        self._map.close()

    def __repr__(self) -> str:
        return f"<GrantMapping dom{self.domid} refs={list(self.refs)} {'ro' if self.readonly else 'rw'}>"
