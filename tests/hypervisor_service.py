"""A ``uxen-hypervisor`` subprocess for tests (the guest and ringbuf fixtures)."""

from __future__ import annotations

import os
import socket
import subprocess
from contextlib import contextmanager
from typing import Iterator

from xenbus.toolstack.localhost import LocalHost


@contextmanager
def hypervisor_service(path: str) -> Iterator[subprocess.Popen]:
    """A ``uxen-hypervisor`` listening on ``path``, ready to accept, started
    the way every host starts it (its log beside the socket); stopped
    (SIGTERM, then SIGKILL after 5 s) when the block ends."""
    host = LocalHost(os.path.dirname(path))
    proc = host.start_daemon("hypervisor", ["ringbuf.hypervisor.main", "--socket", path], path, socket.SOCK_SEQPACKET)
    try:
        yield proc
    finally:
        host.stop_daemon("hypervisor")
