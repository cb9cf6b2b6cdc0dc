"""A whole userxen host for cross-process tests: the hypervisor service,
xenstored (with its hypervisor link) and the console daemon in a temp dir,
plus helpers to run ``uxl`` and read the store.  Everything started is
stopped (and every guest killed) by :meth:`Host.close`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from xenstore import open_sync_client
from xenstore.wire import XenStoreError

START_TIMEOUT = 15.0


def wait_socket(path: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if what == "hypervisor" else socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    raise RuntimeError(f"{what} did not start")


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


class Host:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="uxh-", dir="/tmp")  # short: AF_UNIX path limit
        self.hv_path = os.path.join(self.dir, "hv.sock")
        self.xs_path = os.path.join(self.dir, "xs.sock")
        self.console_path = os.path.join(self.dir, "con.sock")
        self.log_dir = os.path.join(self.dir, "logs")
        self.run_dir = os.path.join(self.dir, "run")
        self.env = dict(
            os.environ,
            XENSTORED_PATH=self.xs_path,
            UXEN_HYPERVISOR_SOCKET=self.hv_path,
            UXEN_CONSOLED_SOCKET=self.console_path,
            UXL_RUN_DIR=self.run_dir,
        )
        self.env.pop("UXEN_HYPERVISOR_FD", None)
        self.procs: dict[str, subprocess.Popen] = {}
        self._files = []
        try:
            self._start("hypervisor", [sys.executable, "-m", "ringbuf.hypervisor.main", "--socket", self.hv_path], self.hv_path)
            self._start("xenstored", [sys.executable, "-m", "xenstore.daemon.main", "-N", "-I", "on", "--hypervisor", self.hv_path], self.xs_path)
            self.start_consoled()
        except BaseException:
            self.close()
            raise

    def _start(self, what: str, cmd: list[str], path: str) -> subprocess.Popen:
        err = open(os.path.join(self.dir, f"{what}.err"), "ab")
        self._files.append(err)
        proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.procs[what] = proc
        wait_socket(path, proc, what)
        return proc

    def start_consoled(self, *, via_uxl: bool = False) -> subprocess.Popen:
        """``python -m xenbus.consoled``, or the same daemon as ``uxl consoled``."""
        command = ["xenbus.toolstack.uxl", "consoled"] if via_uxl else ["xenbus.consoled"]
        return self._start("consoled", [sys.executable, "-m", *command, "--log-dir", self.log_dir, "--socket", self.console_path, "-v"],
                           self.console_path)

    def kill_consoled(self) -> None:
        proc = self.procs.pop("consoled")
        proc.kill()
        proc.wait()

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
        with open(os.path.join(self.dir, f"{what}.err"), "rb") as f:
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
        for what in ("consoled", "xenstored", "hypervisor"):
            proc = self.procs.pop(what, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for f in self._files:
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)
