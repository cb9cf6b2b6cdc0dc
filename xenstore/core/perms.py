"""Node permission lists (``n0``, ``r5``...) and the access rule.

A list ``e0, e1, ... ek``: ``e0.domid`` owns the node (full access whatever
its letter); ``e0.letter`` is the access of every domain without an entry
of its own; ``e1..ek`` grant their letter to the named domain, the first
matching entry deciding (cxenstored ``perm_for_conn``).  Privileged
connections always have full access.
"""

from __future__ import annotations

import re
from typing import Iterable

from ..wire import XenStoreError

__all__ = ["NONE", "READ", "WRITE", "OWNER", "FULL", "Perms", "parse_domid"]

NONE = 0x00
READ = 0x01
WRITE = 0x02
OWNER = 0x08
FULL = READ | WRITE | OWNER

_LETTER_BITS = {"n": NONE, "r": READ, "w": WRITE, "b": READ | WRITE}
_BITS_LETTER = {bits: letter for letter, bits in _LETTER_BITS.items()}

# C strtol(s, &end, 0) with the whole string consumed: optional leading
# white space and sign, then hex (0x..), octal (0..) or decimal.
_STRTOL0 = re.compile(r"[ \t\n\v\f\r]*([+\-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))").fullmatch
_LONG_MAX = (1 << 63) - 1


def parse_domid(text: str) -> int | None:
    """``strtol(text, &end, 0)`` requiring full consumption, truncated to
    ``unsigned int`` like cxenstored stores it; ``None`` if malformed."""
    m = _STRTOL0(text)
    if m is None:
        return None
    sign, hexdigits, octdigits, decdigits = m.groups()
    if hexdigits is not None:
        value = int(hexdigits, 16)
    elif octdigits is not None:
        value = int(octdigits, 8)
    else:
        value = int(decdigits)
    value = min(value, _LONG_MAX + (sign == "-"))  # strtol saturates
    if sign == "-":
        value = -value
    return value & 0xFFFFFFFF


class Perms:
    """An immutable permission list.  Shared freely between nodes."""

    __slots__ = ("owner", "other", "entries", "strings", "wire")

    owner: int
    other: int
    entries: tuple[tuple[int, int], ...]
    strings: tuple[str, ...]
    wire: bytes

    def __init__(self, pairs: Iterable[tuple[str, int]]) -> None:
        """``pairs``: ``(letter, domid)`` with letter in ``nrwb``, at least one."""
        pairs = tuple(pairs)
        if not pairs:
            raise ValueError("a permission list needs at least the owner entry")
        self.owner = pairs[0][1]
        self.other = _LETTER_BITS[pairs[0][0]]
        self.entries = tuple((domid, _LETTER_BITS[letter]) for letter, domid in pairs[1:])
        # cxenstored prints a domid with %i: 0xFFFFFFFF (from "r-1") is "r-1".
        self.strings = tuple(f"{letter}{domid - (1 << 32) if domid >= 1 << 31 else domid}" for letter, domid in pairs)
        self.wire = "".join(s + "\0" for s in self.strings).encode()

    @classmethod
    def parse(cls, strings: Iterable[str]) -> "Perms":
        """From wire strings (``xs_strings_to_perms``); ``EINVAL`` if malformed."""
        pairs = []
        for s in strings:
            letter = s[:1]
            domid = parse_domid(s[1:]) if letter in _LETTER_BITS else None
            if domid is None:
                raise XenStoreError("EINVAL")
            pairs.append((letter, domid))
        if not pairs:
            raise XenStoreError("EINVAL")
        return cls(pairs)

    @classmethod
    def owned_by(cls, domid: int) -> "Perms":
        """``n<domid>``: the owner only."""
        return cls((("n", domid),))

    def with_owner(self, domid: int) -> "Perms":
        """The same list with entry 0 naming ``domid`` (new-node rule)."""
        if domid == self.owner:
            return self
        pairs = [(_BITS_LETTER[self.other], domid)]
        pairs += [(_BITS_LETTER[bits], d) for d, bits in self.entries]
        return Perms(pairs)

    def without_domain(self, domid: int) -> "Perms":
        """The list with the non-owner entries naming ``domid`` dropped."""
        if all(d != domid for d, _ in self.entries):
            return self
        pairs = [(_BITS_LETTER[self.other], self.owner)]
        pairs += [(_BITS_LETTER[bits], d) for d, bits in self.entries if d != domid]
        return Perms(pairs)

    def access(self, domid: int, target: int | None, ignored: tuple[int, ...] = ()) -> int:
        """Access bits of an unprivileged caller (``perm_for_conn``);
        entries naming a domain in ``ignored`` do not count (cxenstored
        ``XS_PERM_IGNORE``: stale domids), ownership always does."""
        if self.owner == domid or (target is not None and self.owner == target):
            return FULL
        for d, bits in self.entries:
            if (d == domid or d == target) and d not in ignored:
                return bits
        return self.other

    def domids(self) -> set[int]:
        return {self.owner, *(d for d, _ in self.entries)}

    def __len__(self) -> int:
        return 1 + len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Perms) and self.strings == other.strings

    def __hash__(self) -> int:
        return hash(self.strings)

    def __repr__(self) -> str:
        return f"Perms({' '.join(self.strings)})"
