"""Per-domain monitor (like the daemon ``xl create`` leaves behind).

    python -m xenbus.toolstack.monitor --domid N --uuid U --output FILE -- CMD...

Started by ``uxl create`` in its own session with the guest's hypervisor fd
and start-of-day environment; it runs the guest process (``CMD``, the fd
passed on), records its pid in ``/libxl/<domid>/guest-pid`` and waits for it.
When the guest ends -- it shut down, crashed or was killed -- the domain
is dead (its hypervisor connection is closed), and the monitor cleans up
its XenStore state (:func:`xenbus.toolstack.domains.cleanup_domain`,
guarded by the domain's uuid).  ``uxl destroy`` kills the monitor's whole
process group and cleans up itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import trio

from ringbuf.hypervisor import ENV_FD


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uxl-monitor")
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--uuid", required=True)
    p.add_argument("--output", required=True, help="the guest's stdout/stderr")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return p


async def _record_pid(domid: int, pid: int) -> None:
    import xenstore

    async with xenstore.open_client() as xs:
        await xs.write(f"/libxl/{domid}/guest-pid", str(pid))


async def _cleanup(domid: int, vm_uuid: str) -> None:
    import xenstore

    from .domains import cleanup_domain

    async with xenstore.open_client() as xs:
        await cleanup_domain(xs, domid, vm_uuid=vm_uuid)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    fd = int(os.environ[ENV_FD])
    try:
        with open(args.output, "ab") as out:
            guest = subprocess.Popen(command, pass_fds=[fd], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    except OSError as exc:
        print(f"uxl-monitor: dom{args.domid}: cannot start {command[:1]}: {exc}", file=sys.stderr)
        os.close(fd)  # the domain dies with its last connection
        _cleanup_logged(args.domid, args.uuid)
        return 127
    os.close(fd)  # the guest holds the domain now
    try:
        trio.run(_record_pid, args.domid, guest.pid)
    except Exception as exc:
        print(f"uxl-monitor: dom{args.domid}: cannot record the guest pid: {exc}", file=sys.stderr)
    status = guest.wait()
    print(f"uxl-monitor: dom{args.domid}: guest exited with status {status}", file=sys.stderr)
    return _cleanup_logged(args.domid, args.uuid)


def _cleanup_logged(domid: int, vm_uuid: str) -> int:
    try:
        trio.run(_cleanup, domid, vm_uuid)
    except Exception as exc:
        print(f"uxl-monitor: dom{domid}: cleanup failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
