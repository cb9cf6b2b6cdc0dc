"""GNU ``getopt_long`` as the Xen tools use it, pure.

The ``xenstore-*`` tools parse options with glibc's ``getopt_long``, so
their behaviour on odd command lines is glibc's: options may follow
operands (argv is permuted unless ``POSIXLY_CORRECT`` is set), ``--``
ends the options, long options may be abbreviated to any unique prefix,
and a bad option prints a diagnostic and is then *ignored* by the tools
(their ``switch`` has no ``case '?'``).  Messages are glibc's, word for
word, with the program name getopt was given (``argv[0]``).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Sequence

__all__ = ["LongOption", "parse", "UNKNOWN"]

#: (option character, its argument, glibc's diagnostic for it)
Parsed = "tuple[str, str | None, str | None]"

#: The option character reported for unknown/malformed options ('?').
UNKNOWN = "?"


class LongOption:
    __slots__ = ("name", "has_arg", "short")

    def __init__(self, name: str, has_arg: bool, short: str) -> None:
        self.name = name
        self.has_arg = has_arg
        self.short = short


def _short_table(optstring: str) -> dict[str, bool]:
    table: dict[str, bool] = {}
    i = 0
    while i < len(optstring):
        ch = optstring[i]
        takes = i + 1 < len(optstring) and optstring[i + 1] == ":"
        table[ch] = takes
        i += 2 if takes else 1
    return table


def parse(
    prog: str,
    args: "Sequence[str]",
    optstring: str,
    longopts: "Sequence[LongOption]",
    posixly_correct: bool = False,
) -> tuple[list[Parsed], list[str]]:
    """Parse ``args`` (without ``argv[0]``).

    Returns ``(options, operands)``: ``options`` are ``(char, argument,
    diagnostic)`` in command-line order — ``char`` is ``"?"`` for a bad
    option and ``diagnostic`` the line glibc prints to stderr when it meets
    that option (else ``None``); ``operands`` are the non-option arguments.
    """
    shorts = _short_table(optstring)
    options: list = []
    operands: list[str] = []
    i = 0
    n = len(args)
    while i < n:
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        if arg.startswith("--"):
            i = _parse_long(prog, arg, args, i, longopts, options)
            continue
        if not arg.startswith("-") or arg == "-":
            if posixly_correct:
                operands.append(arg)
                operands.extend(args[i:])
                break
            operands.append(arg)
            continue
        # A cluster of short options: -fp, -n3, -n 3.
        j = 1
        while j < len(arg):
            ch = arg[j]
            j += 1
            if ch not in shorts or ch == ":":
                options.append((UNKNOWN, None, f"{prog}: invalid option -- '{ch}'\n"))
                continue
            if not shorts[ch]:
                options.append((ch, None, None))
                continue
            if j < len(arg):
                options.append((ch, arg[j:], None))
            elif i < n:
                options.append((ch, args[i], None))
                i += 1
            else:
                options.append((UNKNOWN, None, f"{prog}: option requires an argument -- '{ch}'\n"))
            break
    return options, operands


def _parse_long(
    prog: str,
    arg: str,
    args: "Sequence[str]",
    i: int,
    longopts: "Sequence[LongOption]",
    options: list,
) -> int:
    body = arg[2:]
    name, eq, value = body.partition("=")
    exact = [o for o in longopts if o.name == name]
    if exact:
        match = exact[0]
    else:
        candidates = [o for o in longopts if o.name.startswith(name)]
        if not candidates:
            options.append((UNKNOWN, None, f"{prog}: unrecognized option '--{body}'\n"))
            return i
        first = candidates[0]
        if any((o.has_arg, o.short) != (first.has_arg, first.short) for o in candidates[1:]):
            listed = "".join(f" '--{o.name}'" for o in candidates)
            options.append((UNKNOWN, None, f"{prog}: option '--{body}' is ambiguous; possibilities:{listed}\n"))
            return i
        match = first
    if match.has_arg:
        if eq:
            options.append((match.short, value, None))
        elif i < len(args):
            options.append((match.short, args[i], None))
            i += 1
        else:
            options.append((UNKNOWN, None, f"{prog}: option '--{match.name}' requires an argument\n"))
    elif eq:
        options.append((UNKNOWN, None, f"{prog}: option '--{match.name}' doesn't allow an argument\n"))
    else:
        options.append((match.short, None, None))
    return i
