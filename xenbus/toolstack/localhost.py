"""Dom0's daemons of one userxen host, started as subprocesses in a directory.

The hypervisor service, ``xenstored`` with its hypervisor link (guests reach
it over their ring pages) and the console daemon, with their sockets,
logs and run directory under ``base``, plus the environment that points
``uxl`` and the ``xenstore-*`` tools at them.  Used by the demo host, the
benchmarks and the cross-process tests, so all start a host the same way::

    host = LocalHost(tempfile.mkdtemp(dir="/tmp"))   # short: AF_UNIX path limit
    host.start()                                     # all three, ready to serve
    subprocess.run(["uxl", "create", "demo"], env=host.env)
    host.close()                                     # consoled, xenstored, hypervisor
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

__all__ = ["LocalHost"]

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class LocalHost:
    """Paths, environment and processes of the host's dom0 daemons."""

    def __init__(self, base: str) -> None:
        self.dir = base
        self.hv_path = os.path.join(base, "hv.sock")
        self.xs_path = os.path.join(base, "xs.sock")
        self.console_path = os.path.join(base, "con.sock")
        self.log_dir = os.path.join(base, "logs")
        self.run_dir = os.path.join(base, "run")
        self.env = dict(
            os.environ,
            XENSTORED_PATH=self.xs_path,
            UXEN_HYPERVISOR_SOCKET=self.hv_path,
            UXEN_CONSOLED_SOCKET=self.console_path,
            UXL_RUN_DIR=self.run_dir,
        )
        self.env.pop("UXEN_HYPERVISOR_FD", None)  # ours would make the daemons a guest
        #: Running daemons by name, in start order.
        self.procs: dict[str, subprocess.Popen] = {}

    def log_path(self, name: str) -> str:
        """Where daemon ``name``'s stdout and stderr go."""
        return os.path.join(self.dir, f"{name}.log")

    def start(self, *, new_session: bool = False) -> None:
        """Start all three daemons; on failure stop whatever did start.
        ``new_session``: keep them out of the terminal's Ctrl-C."""
        try:
            self.start_daemon("hypervisor", ["ringbuf.hypervisor.main", "--socket", self.hv_path],
                              self.hv_path, socket.SOCK_SEQPACKET, new_session=new_session)
            self.start_daemon("xenstored", ["xenstore.daemon.main", "-N", "-I", "on", "--hypervisor", self.hv_path],
                              self.xs_path, new_session=new_session)
            self.start_consoled(new_session=new_session)
        except BaseException:
            self.close()
            raise

    def start_consoled(self, *, via_uxl: bool = False, verbose: bool = False,
                       new_session: bool = False) -> subprocess.Popen:
        """``python -m xenbus.consoled``, or the same daemon as ``uxl consoled``."""
        command = ["xenbus.toolstack.uxl", "consoled"] if via_uxl else ["xenbus.consoled"]
        args = [*command, "--log-dir", self.log_dir, "--socket", self.console_path, *(["-v"] if verbose else [])]
        return self.start_daemon("consoled", args, self.console_path, new_session=new_session)

    def start_daemon(self, name: str, module_args: list[str], socket_path: str,
                     kind: int = socket.SOCK_STREAM, *, new_session: bool = False) -> subprocess.Popen:
        """Run ``python -m <module_args>`` and wait until it accepts on ``socket_path``."""
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", *module_args], env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=new_session)
        self.procs[name] = proc
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}; see {self.log_path(name)}")
            with socket.socket(socket.AF_UNIX, kind) as probe:
                try:
                    probe.connect(socket_path)
                    return proc
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not start; see {self.log_path(name)}") from None
            time.sleep(0.02)

    def stop_daemon(self, name: str, *, kill: bool = False) -> int | None:
        """SIGTERM (SIGKILL with ``kill``, or after 5 s) and reap; its exit
        status, or ``None`` if it was not running here.  Idempotent."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> dict[str, int | None]:
        """Stop every daemon, last started first; their exit statuses."""
        return {name: self.stop_daemon(name) for name in reversed(list(self.procs))}
