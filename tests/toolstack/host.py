"""A whole userxen host for cross-process tests: the hypervisor service,
xenstored (with its hypervisor link) and the console daemon in a temp dir,
plus helpers to run ``uxl`` and read the store.  Everything started is
stopped (and every guest killed) by :meth:`Host.close`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from xenbus.toolstack.localhost import LocalHost
from xenstore import open_sync_client
from xenstore.wire import XenStoreError


def wait_until(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Host(LocalHost):
    def __init__(self) -> None:
        super().__init__(tempfile.mkdtemp(prefix="uxh-", dir="/tmp"))  # short: AF_UNIX path limit
        try:
            self.start()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def start_consoled(self, *, via_uxl: bool = False, verbose: bool = True, new_session: bool = False) -> subprocess.Popen:
        """The console daemon, verbose by default, as ``python -m xenbus.consoled`` or ``uxl consoled``."""
        return super().start_consoled(via_uxl=via_uxl, verbose=verbose, new_session=new_session)

    def kill_consoled(self) -> None:
        self.stop_daemon("consoled", kill=True)

    def uxl(self, *args: str, check: bool = True, timeout: float = 30.0, input: bytes | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "xenbus.toolstack.uxl", *args], env=self.env, capture_output=True,
                                timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"uxl {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}")
        return result

    def create(self, name: str, *guest_args: str) -> int:
        out = self.uxl("create", name, "--", sys.executable, "-m", "xenbus.guest", *guest_args).stdout.decode()
        assert out.startswith(f"Created domain {name} (id "), out
        return int(out.rsplit("id ", 1)[1].rstrip(")\n"))

    def log(self, domid: int) -> bytes:
        try:
            with open(os.path.join(self.log_dir, f"guest-{domid}.log"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def wait_log(self, domid: int, needle: bytes, timeout: float = 10.0) -> bytes:
        return wait_until(lambda: needle in self.log(domid) and self.log(domid), f"{needle!r} in the log of dom{domid}", timeout)

    def xs(self):
        return open_sync_client(self.xs_path)

    def read(self, path: str) -> bytes | None:
        with self.xs() as c:
            try:
                return c.read(path)
            except XenStoreError:
                return None

    def stderr(self, what: str) -> str:
        with open(self.log_path(what), "rb") as f:
            return f.read().decode(errors="replace")

    def kill_guests(self) -> None:
        """Kill every monitor process group still recorded in XenStore."""
        try:
            with self.xs() as c:
                for domid in c.directory("/libxl"):
                    try:
                        pid = int(c.read(f"/libxl/{domid}/monitor-pid"))
                    except (XenStoreError, ValueError):
                        continue
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        except (OSError, XenStoreError):
            pass

    def close(self) -> None:
        if "xenstored" in self.procs and self.procs["xenstored"].poll() is None:
            self.kill_guests()
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)
