"""XenStore path syntax: validation and relative-path resolution.

Rules follow cxenstored 4.17 (``is_valid_nodename``, ``canonicalize``):

* absolute paths start with ``/``; characters ``A-Za-z0-9-/_@`` only; no
  ``//``; no trailing ``/`` except the root itself;
* a path that starts with neither ``/`` nor ``@`` is relative to the
  caller's home ``/local/domain/<domid>`` (socket connections are dom0);
* length: if the path starts with ``/local/domain/<1-5 digits>/`` only the
  part after that prefix counts and must be ``<= path_max``; any other
  path must be ``<= path_max`` in total (``path_max`` is the ``path-max``
  quota, 2048 by default).  This applies to every caller, like cxenstored.

Paths are handled as ``str`` (validated paths are ASCII, decoded from the
wire as latin-1 so that no byte can make decoding fail).
"""

from __future__ import annotations

import re

from ..wire import XenStoreError

__all__ = [
    "home_path",
    "is_valid_path",
    "resolve",
    "resolve_watch_path",
    "parent_of",
    "ancestors",
    "is_in_subtree",
    "LOCAL_DOMAIN",
    "ArgumentPaths",
]

LOCAL_DOMAIN = "/local/domain/"

# A whole path: "/" or "/comp(/comp)*" with the allowed characters.  One
# fullmatch covers charset, "//" and the trailing "/" rule at once.
_VALID = re.compile(r"/|(?:/[A-Za-z0-9_@\-]+)+").fullmatch
# sscanf("/local/domain/%5u/%n"): at most 5 characters for the number
# (an optional sign counts towards the width; %u accepts one).
_LOCAL_PREFIX = re.compile(r"/local/domain/(?:[+\-]\d{1,4}|\d{1,5})/").match


def home_path(domid: int) -> str:
    """The implicit home of a domain, ``/local/domain/<domid>`` (no slash)."""
    return f"{LOCAL_DOMAIN}{domid}"


def is_valid_path(path: str, path_max: int) -> bool:
    """True iff ``path`` is a valid absolute node path (not an ``@`` name)."""
    return _VALID(path) is not None and (len(path) <= path_max or _long_local_path_ok(path, path_max))


def _long_local_path_ok(path: str, path_max: int) -> bool:
    """A path over ``path_max`` is still fine if it is ``/local/domain/<id>/``
    followed by at most ``path_max`` characters."""
    m = _LOCAL_PREFIX(path)
    return m is not None and len(path) - m.end() <= path_max


def resolve(raw: str, home: str, path_max: int) -> str:
    """Canonical absolute path for a node argument, or ``EINVAL``.

    ``@`` names are not nodes: they are rejected here (watches and
    ``SET_PERMS`` handle them before calling this).
    """
    if raw[:1] != "/":
        if raw[:1] == "@":
            raise XenStoreError("EINVAL")
        raw = f"{home}/{raw}"
    # is_valid_path, inline: this runs for nearly every request.
    if _VALID(raw) is None or (len(raw) > path_max and not _long_local_path_ok(raw, path_max)):
        raise XenStoreError("EINVAL")
    return raw


class ArgumentPaths:
    """``resolve`` for wire arguments, remembering absolute paths already
    validated.

    Clients name the same few paths over and over, and a dict lookup of the
    raw argument costs a fraction of decoding and matching it.  Keys are the
    argument bytes *with* their NUL terminator, so a key is exactly one
    NUL-terminated string.  Only short absolute paths are kept, and at most
    ``capacity`` of them (then the memo starts afresh): a peer sending
    endless distinct paths costs at most ~1 MiB.  ``path_max`` may shrink at
    run time, so a remembered path longer than the current one goes through
    the full check again.
    """

    __slots__ = ("known", "_capacity")

    #: Longest argument remembered (bytes, NUL included).
    MAX_KEY = 256

    def __init__(self, capacity: int = 4096) -> None:
        #: argument -> path (read-only outside: ask :meth:`remembered`).
        self.known: dict[bytes, str] = {}
        self._capacity = capacity

    def remembered(self, arg: bytes, path_max: int) -> str | None:
        """The path ``arg`` was resolved to before, if it is still within
        ``path_max``; else ``None`` (:meth:`resolve` it)."""
        path = self.known.get(arg)
        return path if path is not None and len(path) <= path_max else None

    def resolve(self, arg: bytes, home: str, path_max: int) -> str:
        """The canonical path of ``arg``, which must be one NUL-terminated
        string (cxenstored ``onearg``); ``EINVAL`` otherwise and as
        :func:`resolve`."""
        path = self.remembered(arg, path_max)
        if path is not None:
            return path
        if not arg or arg.find(b"\0") != len(arg) - 1:
            raise XenStoreError("EINVAL")
        path = resolve(arg[:-1].decode("latin-1"), home, path_max)
        if arg[:1] == b"/" and len(arg) <= self.MAX_KEY:
            known = self.known
            if len(known) >= self._capacity:
                known.clear()
            known[arg] = path
        return path


def resolve_watch_path(raw: str, home: str, path_max: int) -> tuple[str, bool]:
    """``(absolute path, relative?)`` for a ``WATCH`` argument.

    ``@`` names are accepted with any syntax up to 2048 bytes (cxenstored
    ``check_watch_path``); they are never relative.
    """
    if raw[:1] == "@":
        if len(raw) > 2048:
            raise XenStoreError("EINVAL")
        return raw, False
    relative = raw[:1] != "/"
    return resolve(raw, home, path_max), relative


def parent_of(path: str) -> str:
    """Parent of a valid absolute path other than ``/``."""
    i = path.rfind("/")
    return path[:i] if i > 0 else "/"


def ancestors(path: str):
    """Yield the proper ancestors of ``path``, nearest first, ending with ``/``."""
    while path != "/":
        i = path.rfind("/")
        path = path[:i] if i > 0 else "/"
        yield path


def is_in_subtree(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (xenstored ``is_child``)."""
    if top == "/":
        return True
    return path == top or path.startswith(top + "/")
