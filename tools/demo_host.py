#!/usr/bin/env python3
"""A whole userxen host in a temp dir, for a first look.

    python3 tools/demo_host.py            # serve until Ctrl-C
    python3 tools/demo_host.py --once     # show, then tear down and exit

Starts the hypervisor service (``uxen-hypervisor``), ``xenstored`` with its
hypervisor link (guests reach it over their ring pages) and the console
daemon (``uxl consoled``), then creates two demo guests with ``uxl create``
(each one a process: XenStore over its ring, a primary PV console and one
secondary console negotiated over XenBus) and shows ``uxl list``, the
XenStore tree and the guests' console logs.  It prints the environment to
use ``uxl`` / ``xenstore-*`` against it from another shell.  Ctrl-C (or
SIGTERM) shuts the guests down and stops everything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from xenbus.toolstack.localhost import LocalHost

GUESTS = ("demo1", "demo2")


class DemoHost(LocalHost):
    def start(self) -> None:
        print(f"userxen demo host in {self.dir}")
        super().start(new_session=True)  # Ctrl-C is ours to handle
        for name, proc in self.procs.items():
            print(f"  started {name:<11} pid {proc.pid}")

    # -- tools -----------------------------------------------------------------
    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run([sys.executable, "-m", *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def uxl(self, *args: str, check: bool = True) -> str | None:
        """uxl's output; None if it failed and ``check`` is false."""
        try:
            return self.run("xenbus.toolstack.uxl", *args, check=True)
        except RuntimeError:
            if check:
                raise
            return None

    def xenstore_ls(self, path: str) -> str:
        return self.run("xenstore.cli.main", "ls", "-fp", path)

    def console_logs(self) -> dict[str, str]:
        out = {}
        if os.path.isdir(self.log_dir):
            for name in sorted(os.listdir(self.log_dir)):
                with open(os.path.join(self.log_dir, name), "rb") as f:
                    out[name] = f.read().decode(errors="replace").replace("\r\n", "\n")
        return out

    # -- shutdown --------------------------------------------------------------
    def stop(self) -> None:
        if "xenstored" in self.procs and self.procs["xenstored"].poll() is None:
            for guest in GUESTS:
                if self.uxl("domid", guest, check=False):  # still there
                    if self.uxl("shutdown", "-w", "-t", "5", guest, check=False) is None:
                        self.uxl("destroy", guest, check=False)  # it did not listen
        for name, status in self.close().items():
            print(f"  stopped {name:<11} (status {status})")


def show(host: DemoHost) -> None:
    print("\n$ uxl list")
    print(host.uxl("list"), end="")
    print("\n$ xenstore-ls -fp /local/domain")
    print(host.xenstore_ls("/local/domain"), end="")
    print("\n$ xenstore-ls -fp /vm")
    print(host.xenstore_ls("/vm"), end="")
    for name, text in host.console_logs().items():
        print(f"\n==> {host.log_dir}/{name} <==")
        print(text, end="" if text.endswith("\n") else "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="show everything once, then tear down and exit")
    parser.add_argument("--dir", default=None, help="use this directory (default: a new temp dir, removed at exit)")
    args = parser.parse_args(argv)
    base = args.dir or tempfile.mkdtemp(prefix="uxen-demo-", dir="/tmp")  # short: unix socket paths
    os.makedirs(base, exist_ok=True)
    host = DemoHost(base)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        host.start()
        for i, name in enumerate(GUESTS):
            print(host.uxl("create", name, "--consoles", "1", "--", sys.executable, "-m", "xenbus.guest",
                           "--interval", "0.5", "--message", f"I am guest number {i + 1}."), end="")
        time.sleep(1.5)  # a few ticks
        show(host)
        if args.once:
            return 0
        print("\nServing; from another shell:")
        for key in ("XENSTORED_PATH", "UXEN_HYPERVISOR_SOCKET", "UXEN_CONSOLED_SOCKET", "UXL_RUN_DIR"):
            print(f"  export {key}={host.env[key]}")
        print(f"  uxl list; uxl console {GUESTS[0]}   (Ctrl-] detaches); xenstore-ls -fp /local/domain")
        print("Ctrl-C stops everything.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nShutting down")
        return 0
    except RuntimeError as exc:
        print(f"demo_host: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        host.stop()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
