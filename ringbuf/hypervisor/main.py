"""``uxen-hypervisor --socket PATH``: run the hypervisor service."""

from __future__ import annotations

import argparse
import logging
import resource
import sys

import trio

from .._trio_util import serve_until_signalled
from .service import HypervisorService, ServiceLimits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uxen-hypervisor", description=__doc__)
    parser.add_argument("--socket", required=True, help="unix socket path (dom0 connects here)")
    parser.add_argument("--dom0-pages", type=int, default=ServiceLimits.dom0_pages,
                        help="dom0 memory in 4 KiB pages")
    parser.add_argument("--grant-frames", type=int, default=ServiceLimits.dom0_grant_frames,
                        help="dom0 grant-table frames")
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="write one byte to this fd (then close it) once listening")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


async def _run(args: argparse.Namespace) -> None:
    limits = ServiceLimits(dom0_pages=args.dom0_pages, dom0_grant_frames=args.grant_frames)
    service = HypervisorService(limits)
    await serve_until_signalled(service.serve, args.socket, ready_fd=args.ready_fd)


def _raise_fd_limit() -> None:
    # Every port costs up to two eventfds and every domain two memory files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _raise_fd_limit()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="uxen-hypervisor: %(levelname)s %(message)s")
    try:
        trio.run(_run, args)
    except OSError as exc:  # e.g. the socket's directory is not writable
        print(f"uxen-hypervisor: {args.socket}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
