"""Fixtures: a hypervisor service in its own process, and guest processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Iterator

import pytest

from hypervisor_service import hypervisor_service


@pytest.fixture
def hypervisor_socket(tmp_path) -> Iterator[str]:
    """Path of a freshly started ``uxen-hypervisor`` (a subprocess)."""
    path = str(tmp_path / "hv.sock")
    with hypervisor_service(path) as proc:
        yield path
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
