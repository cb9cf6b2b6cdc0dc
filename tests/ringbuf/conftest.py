"""Fixtures: a hypervisor service in its own process, and guest processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Iterator

import pytest


@pytest.fixture
def hypervisor_socket(tmp_path) -> Iterator[str]:
    """Path of a freshly started ``uxen-hypervisor`` (a subprocess)."""
    path = str(tmp_path / "hv.sock")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringbuf.hypervisor.main", "--socket", path,
         "--ready-fd", str(write_end)],
        pass_fds=[write_end],
    )
    os.close(write_end)
    try:
        ready = os.read(read_end, 1)  # EOF if the service died first
        os.close(read_end)
        assert ready == b"1", "hypervisor service failed to start"
        yield path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"service exited with {proc.returncode}"


@pytest.fixture
def spawn_guest() -> Iterator:
    """``spawn_guest(fd, code, *args)`` runs ``code`` (Python, dedented) as a
    guest domain owning connection ``fd``.

    The guest gets the fd as ``$UXEN_HYPERVISOR_FD``; extra ``args`` become
    ``sys.argv[1:]``; its stdout is a text pipe (guests report there).  Guests
    still running at the end of the test are killed.
    """
    procs: list[subprocess.Popen] = []

    def spawn(fd: int, code: str, *args: str) -> subprocess.Popen:
        env = dict(os.environ, UXEN_HYPERVISOR_FD=str(fd))
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                                pass_fds=[fd], env=env, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
