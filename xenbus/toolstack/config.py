"""Domain configuration for ``uxl create`` (an ``xl.cfg`` subset).  Pure.

A config file holds ``key = value`` lines whose values are Python/xl
literals; ``#`` starts a comment::

    name = "web1"
    memory = 2                      # MiB, as in xl.cfg
    consoles = 1                    # secondary PV consoles (device/console/1..N)
    command = ["python3", "-m", "xenbus.guest", "--ticks", "5"]   # or one string (shell-split)

``command`` is what the guest process runs (the "kernel"); without it the
demo guest (:mod:`xenbus.guest`) runs.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
from dataclasses import dataclass, field

__all__ = ["DomainConfig", "ConfigError", "parse_config", "default_guest_command", "PAGES_PER_MIB"]

PAGES_PER_MIB = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_KNOWN = ("name", "memory", "command", "console", "consoles")


class ConfigError(ValueError):
    """The configuration is not usable (message says why and where)."""


def default_guest_command() -> list[str]:
    return [sys.executable, "-m", "xenbus.guest"]


@dataclass(frozen=True)
class DomainConfig:
    name: str
    command: list[str] = field(default_factory=default_guest_command)
    memory_mib: int = 1
    console: bool = True  # give the guest a primary console
    consoles: int = 0  # secondary consoles (XenBus devices console/1..N)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.name.isdigit():
            raise ConfigError(f"invalid domain name {self.name!r} (letters, digits, _.-; not all digits)")
        if not 1 <= self.memory_mib <= 1024:
            raise ConfigError(f"memory must be 1..1024 MiB, not {self.memory_mib}")
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise ConfigError("command must be a non-empty list of strings")
        if not 0 <= self.consoles <= 8:
            raise ConfigError(f"consoles must be 0..8, not {self.consoles}")

    @property
    def nr_pages(self) -> int:
        return self.memory_mib * PAGES_PER_MIB

    @property
    def memory_kib(self) -> int:
        return self.memory_mib * 1024


def parse_config(text: str, *, source: str = "<config>") -> DomainConfig:
    """Parse an ``xl.cfg``-style file (see the module docstring)."""
    values: dict[str, object] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{source}:{number}: expected key = value")
        if key not in _KNOWN:
            raise ConfigError(f"{source}:{number}: unknown key {key!r} (known: {', '.join(_KNOWN)})")
        try:
            values[key] = ast.literal_eval(_strip_comment(value.strip()))
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(f"{source}:{number}: bad value for {key}: {exc}") from None
    if "name" not in values:
        raise ConfigError(f"{source}: no name")
    name = values["name"]
    if not isinstance(name, str):
        raise ConfigError(f"{source}: name must be a string")
    kwargs: dict[str, object] = {"name": name}
    if "memory" in values:
        memory = values["memory"]
        if not isinstance(memory, int) or isinstance(memory, bool):
            raise ConfigError(f"{source}: memory must be an integer (MiB)")
        kwargs["memory_mib"] = memory
    if "command" in values:
        command = values["command"]
        if isinstance(command, str):
            command = shlex.split(command)
        if not isinstance(command, list):
            raise ConfigError(f"{source}: command must be a list or a string")
        kwargs["command"] = command
    if "console" in values:
        kwargs["console"] = bool(values["console"])
    if "consoles" in values:
        consoles = values["consoles"]
        if not isinstance(consoles, int) or isinstance(consoles, bool):
            raise ConfigError(f"{source}: consoles must be an integer")
        kwargs["consoles"] = consoles
    return DomainConfig(**kwargs)  # type: ignore[arg-type]


def _strip_comment(value: str) -> str:
    # A '#' outside quotes starts a comment.
    quote = None
    for i, ch in enumerate(value):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return value[:i].strip()
    return value
