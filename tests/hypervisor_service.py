"""A ``uxen-hypervisor`` subprocess for tests (the guest and ringbuf fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def hypervisor_service(path: str) -> Iterator[subprocess.Popen]:
    """A ``uxen-hypervisor`` listening on ``path``, ready to accept; stopped
    (SIGTERM, then SIGKILL after 10 s) when the block ends."""
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringbuf.hypervisor.main", "--socket", path, "--ready-fd", str(write_end)],
        pass_fds=[write_end],
    )
    os.close(write_end)
    try:
        ready = os.read(read_end, 1)  # EOF if the service died first
        os.close(read_end)
        assert ready == b"1", "hypervisor service failed to start"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
