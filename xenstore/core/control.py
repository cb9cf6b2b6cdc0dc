"""``CONTROL`` (``xenstore-control``) sub-commands, with cxenstored 4.17's
argument rules and reply texts.

File-writing commands (``logfile``, ``memreport``) and ``log on|off`` only
record the request in :class:`ControlState`; the I/O layer may act on it.
``live-update`` is not supported (there is never a session to report on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..wire import XenStoreError
from .domains import DomainTable
from .limits import Limits

__all__ = ["ControlState", "run_control", "HELP_TEXT", "c_atoi", "c_strtoul10"]

HELP_TEXT = (
    "check\t\n"
    "log\ton|off\n"
    "live-update\t[-c <cmdline>] [-F] [-t <timeout>] <file>\n"
    "    Default timeout is 60 seconds.\n"
    "logfile\t<file>\n"
    "memreport\t[<file>]\n"
    "print\t<string>\n"
    "quota\t[set <name> <val>|<domid>]\n"
    "quota-soft\t[set <name> <val>]\n"
    "help\t\n"
)


@dataclass(slots=True)
class ControlState:
    """What CONTROL asked the daemon to do; the engine never does I/O."""

    logging: bool = False
    logfile: str | None = None
    memreport_file: str | None = None


def c_atoi(text: str) -> int:
    """C ``atoi`` as an ``int`` (leading blanks, sign, digits; junk -> 0)."""
    s = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if s[:1] in "+-" and s[:1]:
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    n = 0
    for ch in s:
        if not "0" <= ch <= "9":
            break
        n = n * 10 + ord(ch) - 48
    n = (sign * n) & 0xFFFFFFFF
    return n - (1 << 32) if n >= 1 << 31 else n


def c_strtoul10(text: str) -> int | None:
    """A non-negative decimal consumed entirely, else ``None``."""
    return int(text) if text.isdigit() and text.isascii() else None


def run_control(
    args: list[str],
    limits: Limits,
    domains: DomainTable,
    usage: Callable[[int], dict[str, int]],
    state: ControlState,
) -> bytes:
    """Execute ``args`` (command first); the reply payload, or XenStoreError."""
    if not args:
        raise XenStoreError("EINVAL")
    cmd, rest = args[0], args[1:]
    handler = _COMMANDS.get(cmd)
    if handler is None:
        raise XenStoreError("EINVAL")
    text = handler(rest, limits, domains, usage, state)
    return text.encode() + b"\0"


def _check(rest, limits, domains, usage, state) -> str:
    if rest:
        raise XenStoreError("EINVAL")
    return "OK"


def _log(rest, limits, domains, usage, state) -> str:
    if len(rest) != 1 or rest[0] not in ("on", "off"):
        raise XenStoreError("EINVAL")
    state.logging = rest[0] == "on"
    return "OK"


def _logfile(rest, limits, domains, usage, state) -> str:
    if len(rest) != 1:
        raise XenStoreError("EINVAL")
    state.logfile = rest[0]
    return "OK"


def _memreport(rest, limits, domains, usage, state) -> str:
    if len(rest) != 1:
        raise XenStoreError("EINVAL")
    state.memreport_file = rest[0]
    return "OK"


def _print(rest, limits, domains, usage, state) -> str:
    if len(rest) != 1:
        raise XenStoreError("EINVAL")
    return "OK"


def _help(rest, limits, domains, usage, state) -> str:
    if rest:
        raise XenStoreError("EINVAL")
    return HELP_TEXT


def _live_update(rest, limits, domains, usage, state) -> str:
    if rest in (["-s"], ["-a"]):
        return "Not in live-update session."
    raise XenStoreError("EINVAL")


def _quota(rest, limits, domains, usage, state, soft: bool = False) -> str:
    if not rest:
        return limits.describe(soft)
    if rest[0] == "set":
        if len(rest) != 3 or not limits.is_name(rest[1], soft):
            raise XenStoreError("EINVAL")
        value = c_strtoul10(rest[2])
        if value is None:
            raise XenStoreError("EINVAL")
        limits.set(rest[1], value, soft)
        return "OK"
    if soft or len(rest) != 1:
        raise XenStoreError("EINVAL")
    domid = c_atoi(rest[0])
    if not domains.is_introduced(domid):
        raise XenStoreError("ENOENT")
    u = usage(domid)
    lines = [f"Domain {domid}:\n"]
    for name in ("nodes", "watches", "transactions", "outstanding", "memory"):
        lines.append(f"{name:<16}: {u.get(name, 0):8d}\n")
    return "".join(lines)


def _quota_soft(rest, limits, domains, usage, state) -> str:
    return _quota(rest, limits, domains, usage, state, soft=True)


_COMMANDS = {
    "check": _check,
    "log": _log,
    "live-update": _live_update,
    "logfile": _logfile,
    "memreport": _memreport,
    "print": _print,
    "quota": _quota,
    "quota-soft": _quota_soft,
    "help": _help,
}
