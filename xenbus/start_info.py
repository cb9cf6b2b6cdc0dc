"""Where a guest finds its primary console: Xen's ``start_info.console.domU``.

A PV guest learns its console page frame and event channel from
``start_info`` (``console.domU.mfn``, ``console.domU.evtchn``), not from
XenStore.  Here the toolstack hands them to the guest process in
``UXEN_CONSOLE_GFN`` / ``UXEN_CONSOLE_PORT``, next to the hypervisor
connection fd and the XenStore ring location
(:mod:`xenstore.client.ring_transport`: ``UXEN_STORE_GFN`` /
``UXEN_STORE_PORT``).  Pure: no I/O.

The domain builder puts the store and console pages at the top of the
guest's memory, like Xen's "magic pages": :func:`magic_frames`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ENV_CONSOLE_GFN", "ENV_CONSOLE_PORT", "ConsoleStart", "magic_frames"]

ENV_CONSOLE_GFN = "UXEN_CONSOLE_GFN"
ENV_CONSOLE_PORT = "UXEN_CONSOLE_PORT"


def magic_frames(nr_pages: int) -> tuple[int, int]:
    """``(store_gfn, console_gfn)``: the two last frames of the guest."""
    if nr_pages < 2:
        raise ValueError("a guest needs at least 2 pages")
    return nr_pages - 1, nr_pages - 2


def _number(text: str, what: str) -> int:
    if not text.isdigit() or len(text) > 10:
        raise ValueError(f"bad {what} {text!r}")
    value = int(text)
    if value > 0xFFFFFFFF:
        raise ValueError(f"bad {what} {text!r}")
    return value


@dataclass(frozen=True)
class ConsoleStart:
    """The primary console's page frame and the guest's port for it."""

    gfn: int
    port: int

    def environment(self) -> dict[str, str]:
        return {ENV_CONSOLE_GFN: str(self.gfn), ENV_CONSOLE_PORT: str(self.port)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConsoleStart | None:
        """``None`` when the toolstack gave the guest no console."""
        env = os.environ if environ is None else environ
        gfn, port = env.get(ENV_CONSOLE_GFN), env.get(ENV_CONSOLE_PORT)
        if gfn is None and port is None:
            return None
        if gfn is None or port is None:
            raise ValueError(f"${ENV_CONSOLE_GFN} and ${ENV_CONSOLE_PORT} go together")
        return cls(_number(gfn, ENV_CONSOLE_GFN), _number(port, ENV_CONSOLE_PORT))
