"""cxenstored-style trace file (``xenstored -T FILE``).

One line per request and per reply/event, in cxenstored's format::

    CREATE connection 0x1
    IN 0x1 20261126 22:43:13 WRITE (/foo bar)
    OUT 0x1 20261126 22:43:13 WRITE (OK )
    DESTROY connection 0x1

(the payload is shown with every NUL turned into a space).
"""

from __future__ import annotations

import time

from ..wire import Op, Packet

__all__ = ["Tracer", "format_packet"]

_OP_NAMES = {op.value: op.name for op in Op}


def format_packet(prefix: str, conn_id: int, packet: Packet, now: float | None = None) -> str:
    """One trace line (without the newline)."""
    stamp = time.strftime("%Y%m%d %H:%M:%S", time.localtime(now))
    name = _OP_NAMES.get(packet.op, "**UNKNOWN**")
    body = packet.payload.replace(b"\x00", b" ").decode("utf-8", "backslashreplace")
    return f"{prefix} 0x{conn_id:x} {stamp} {name} ({body})"


class Tracer:
    """Appends trace lines to a file; ``reopen()`` after log rotation (SIGHUP)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1 << 16, encoding="utf-8")

    def reopen(self) -> None:
        self._file.close()
        self._file = open(self.path, "a", buffering=1 << 16, encoding="utf-8")

    def connection(self, event: str, conn_id: int) -> None:
        """``event`` is ``CREATE`` or ``DESTROY``."""
        self._file.write(f"{event} connection 0x{conn_id:x}\n")

    def packet(self, prefix: str, conn_id: int, packet: Packet) -> None:
        """``prefix`` is ``IN`` (request) or ``OUT`` (reply or event)."""
        self._file.write(format_packet(prefix, conn_id, packet) + "\n")

    def note(self, text: str) -> None:
        self._file.write(text + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
