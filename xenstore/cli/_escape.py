"""Xen's value quoting for the tools (``sanitise_value``/``unsanitise_value``).

Printable ASCII except backslash passes through; ``\\t \\n \\r \\\\`` are
escaped by name; bytes below 8 become three-digit octal (``\\001``), every
other byte ``\\xNN``.  Unquoting is the C code's ``sscanf``-based parser,
quirks included: ``\\x`` takes up to two hex digits after optional blanks
and sign (``0x`` counts as digits), ``\\0``..``\\7`` up to three octal
digits, an unknown escape stands for the character itself, and a trailing
lone backslash becomes a NUL byte.
"""

from __future__ import annotations

__all__ = ["sanitise", "unsanitise"]


def _make_table() -> list[bytes]:
    table = []
    for c in range(256):
        if 0x20 <= c <= 0x7E and c != 0x5C:
            table.append(bytes((c,)))
        elif c in (0x09, 0x0A, 0x0D, 0x5C):
            table.append(b"\\" + {0x09: b"t", 0x0A: b"n", 0x0D: b"r", 0x5C: b"\\"}[c])
        elif c < 0o10:
            table.append(b"\\%03o" % c)
        else:
            table.append(b"\\x%02x" % c)
    return table


_TABLE = _make_table()
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c != 0x5C)


def sanitise(value: bytes) -> bytes:
    """Quote ``value`` for display, exactly like Xen's tools."""
    if not value.translate(None, _PLAIN):
        return value  # the common case: nothing to quote
    return b"".join([_TABLE[c] for c in value])


_SPACE = b" \t\n\v\f\r"
_HEX = b"0123456789abcdefABCDEF"
_OCT = b"01234567"


def _scan_int(data: bytes, pos: int, width: int, base: int) -> tuple[int, int] | None:
    """glibc ``sscanf("%<width>x"|"%<width>o")`` at ``pos``.

    Returns ``(value, characters consumed)`` or ``None`` (no conversion).
    """
    start = pos
    while pos < len(data) and data[pos] in _SPACE:
        pos += 1
    left = width
    sign = 1
    if left and pos < len(data) and data[pos] in b"+-":
        sign = -1 if data[pos] == 0x2D else 1
        pos += 1
        left -= 1
    digits = _HEX if base == 16 else _OCT
    value = 0
    got = False
    if base == 16 and left and pos < len(data) and data[pos] == 0x30:
        # "0x" prefix: the 0 is a digit on its own if no x follows.
        pos += 1
        left -= 1
        got = True
        if left and pos < len(data) and data[pos] in b"xX":
            pos += 1
            left -= 1
    while left and pos < len(data) and data[pos] in digits:
        value = value * base + int(chr(data[pos]), base)
        pos += 1
        left -= 1
        got = True
    if not got:
        return None
    return (sign * value) & 0xFF, pos - start


def unsanitise(text: bytes) -> bytes:
    """Turn a command-line value back into bytes, exactly like Xen's tools."""
    if b"\\" not in text:
        return text
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        i += 1
        if c != 0x5C:
            out.append(c)
            continue
        if i >= n:
            out.append(0)  # the C loop copies the string's terminator
            break
        c = text[i]
        i += 1
        if c == 0x74:
            out.append(0x09)
        elif c == 0x6E:
            out.append(0x0A)
        elif c == 0x72:
            out.append(0x0D)
        elif c == 0x78:  # \x
            scanned = _scan_int(text, i, 2, 16)
            if scanned is None:
                out.append(c)
            else:
                out.append(scanned[0])
                i += scanned[1]
        elif 0x30 <= c <= 0x37:
            scanned = _scan_int(text, i - 1, 3, 8)
            assert scanned is not None  # text[i-1] is an octal digit
            out.append(scanned[0])
            i += scanned[1] - 1
        else:
            out.append(c)
    return bytes(out)
