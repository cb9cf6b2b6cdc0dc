"""The ``xenstore-*`` tools, a port of Xen 4.17's ``xenstore_client.c``.

One program with several names, like Xen's: ``xenstore-read``,
``-write``, ``-rm``, ``-exists``, ``-list``, ``-ls``, ``-chmod``,
``-watch`` and the multiplexer ``xenstore <mode> ...``.  Options, output
bytes, messages and exit codes follow the C tools (checked by the golden
tests against Debian's binaries).  One extension: ``xenstore-watch -d
DEPTH`` (``--depth``) from later Xen releases.

This module is on the start-up path of every tool call: it imports only
the blocking client and small stdlib modules (never trio).
"""

from __future__ import annotations

import errno as _errno
import os
import sys

from . import _getopt
from ._escape import sanitise, unsanitise

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from ._xs import Xs

__all__ = [
    "main",
    "main_read",
    "main_write",
    "main_ls",
    "main_list",
    "main_exists",
    "main_rm",
    "main_chmod",
    "main_watch",
    "main_control",
    "main_multiplexer",
]

MODES = ("chmod", "exists", "list", "ls", "read", "rm", "write", "watch")

_OPTSTRING = "hfspturn:Rd:"
_LONGOPTS = [
    _getopt.LongOption("help", False, "h"),
    _getopt.LongOption("flat", False, "f"),  # ls
    _getopt.LongOption("socket", False, "s"),
    _getopt.LongOption("prefix", False, "p"),  # read, list, ls
    _getopt.LongOption("tidy", False, "t"),  # rm
    _getopt.LongOption("upto", False, "u"),  # chmod
    _getopt.LongOption("recurse", False, "r"),  # chmod
    _getopt.LongOption("number", True, "n"),  # watch
    _getopt.LongOption("raw", False, "R"),  # read, write
    _getopt.LongOption("depth", True, "d"),  # watch (Xen >= 4.18)
]
#: Which mode accepts which option ('h' and 's' are accepted everywhere).
_OPTION_MODES = {
    "f": ("ls",),
    "p": ("read", "list", "ls"),
    "t": ("rm",),
    "u": ("chmod",),
    "r": ("chmod",),
    "n": ("watch",),
    "R": ("read", "write"),
    "d": ("watch",),
}

_USAGE = {
    "read": "[-h] [-p] [-s] [-R] key [...]",
    "write": "[-h] [-s] [-R] key value [...]",
    "rm": "[-h] [-s] [-t] key [...]",
    "exists": "[-h] [-p] [-s] key [...]",
    "list": "[-h] [-p] [-s] key [...]",
    "ls": "[-h] [-f] [-p] [-s] [path]",
    "chmod": "[-h] [-u] [-r] [-s] key <mode [modes...]>",
    "watch": "[-h] [-n NR] key",
}

# ls layout (xenstore_client.c): the " = \"...\"" tag and the widths.
_TAG_LEN = 8
_STRING_MAX = 3072 + 1024  # XENSTORE_ABS_PATH_MAX + 1024
_MAX_PATH_LEN = 256  # chmod -r child paths are cut to this (snprintf)
_INT_MAX = 0x7FFFFFFF


def _fsencode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class _Exit(Exception):
    """Leave the program with ``status`` (like C's ``exit()``)."""

    def __init__(self, status: int) -> None:
        self.status = status


class Output:
    """stdout with C stdio's effect: everything written, flushed on exit.

    Messages go to stderr unbuffered, as ``err()``/``warnx()`` do; stdout
    is flushed first so a terminal shows both in program order.
    """

    __slots__ = ("buf", "short_name")

    def __init__(self, short_name: str) -> None:
        self.buf = bytearray()
        self.short_name = short_name

    def write(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 65536:
            self.flush()

    def flush(self) -> None:
        data = memoryview(bytes(self.buf))
        self.buf.clear()
        while data:
            data = data[os.write(1, data) :]

    def stderr(self, data: bytes) -> None:
        self.flush()
        while data:
            data = data[os.write(2, data) :]

    def warnx(self, msg: bytes) -> None:
        self.stderr(_fsencode(self.short_name) + b": " + msg + b"\n")

    def warn(self, msg: bytes, errno: int) -> None:
        self.warnx(msg + b": " + os.strerror(errno).encode())

    def errx(self, msg: bytes) -> "NoReturn":
        self.warnx(msg)
        raise _Exit(1)

    def err(self, msg: bytes, errno: int) -> "NoReturn":
        self.warn(msg, errno)
        raise _Exit(1)


class Options:
    __slots__ = ("prefix", "tidy", "upto", "recurse", "nr_watches", "raw", "depth", "flat")

    def __init__(self) -> None:
        self.prefix = False
        self.tidy = False
        self.upto = False
        self.recurse = False
        self.nr_watches = -1
        self.raw = False
        self.depth = -1
        self.flat = False


def _atoi(text: bytes) -> int:
    """C ``atoi`` (glibc: ``(int) strtol(s, NULL, 10)``)."""
    s = text.lstrip(b" \t\n\v\f\r")
    sign = 1
    if s[:1] in (b"+", b"-"):
        sign = -1 if s[:1] == b"-" else 1
        s = s[1:]
    digits = 0
    value = 0
    for c in s:
        if not 0x30 <= c <= 0x39:
            break
        value = value * 10 + c - 0x30
        digits += 1
    value = max(-(2**63), min(2**63 - 1, sign * value))
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _usage(out: Output, mode: str | None, incl_mode: bool, progname: str) -> "NoReturn":
    prog = _fsencode(progname)
    if mode is None:
        out.errx(b"Usage: " + prog + b" <mode> [-h] [...]")
    mstr = (mode + " ").encode() if incl_mode else b""
    out.errx(b"Usage: " + prog + b" " + mstr + _USAGE[mode].encode())


# -- the modes ------------------------------------------------------------


def _ls(xs: "Xs", out: Output, root: bytes, opts: Options, max_width: int, desired_width: int) -> None:
    """``do_ls``: depth-first, children in daemon order; iterative so a
    1000-level tree does not hit Python's recursion limit."""
    stack: list[tuple[bytes, int, list[str], int]] = []

    def listing(path: bytes, depth: int) -> list[str] | None:
        names = xs.directory(path)
        if names is None:
            if depth and xs.errno == _errno.ENOENT:
                return None  # vanished while we walked: move on silently
            out.err(b"xs_directory (" + path + b")", xs.errno)
        return names

    names = listing(root, 0)
    if names is None:
        return
    stack.append((root, 0, names, 0))
    while stack:
        path, depth, names, index = stack.pop()
        if index >= len(names):
            continue
        stack.append((path, depth, names, index + 1))
        name = _fsencode(names[index])
        newpath = path + (b"" if path.endswith(b"/") else b"/") + name
        truncated = len(newpath) >= _STRING_MAX
        if truncated:
            newpath = newpath[: _STRING_MAX - 1]

        linewid = 0
        if opts.flat:
            out.write(newpath)
        else:
            out.write(b" " * depth)
            linewid = depth
            shown = _precision(name, max_width - _TAG_LEN - linewid)
            out.write(shown)
            linewid += len(shown)

        value = None if truncated else xs.read(newpath)
        if value is None:
            out.write(b":\n")
        elif max_width < linewid + len(value) + _TAG_LEN:
            shown = _precision(sanitise(value), max_width - _TAG_LEN - linewid)
            out.write(b' = "' + shown + b'\\..."')
        else:
            text = b' = "' + sanitise(value) + b'"'
            out.write(text)
            linewid += len(text)
            if opts.prefix:
                out.write(b" ")
                linewid += 1
                limit = min(desired_width, max_width)
                if linewid < limit:
                    out.write(b"".join(b"." if w & 1 else b" " for w in range(linewid, limit)))

        if opts.prefix:
            perms = xs.get_perms(newpath)
            if perms is None:
                out.warn(b"\ncould not access permissions for " + name, xs.errno)
            else:
                out.write(b"  (" + b",".join(str(p).encode() for p in perms) + b")")
        out.write(b"\n")

        children = listing(newpath, depth + 1)
        if children:
            stack.append((newpath, depth + 1, children, 0))


def _precision(text: bytes, precision: int) -> bytes:
    """``printf("%.*s")``: a negative precision means no limit."""
    return text if precision < 0 else text[:precision]


def _chmod(xs: "Xs", out: Output, path: bytes, perms: list[str], upto: bool, recurse: bool, tx: int) -> None:
    """``do_chmod``: set, then the ancestors (-u), then the subtree (-r)."""
    work = [(path, upto, recurse)]
    while work:
        path, upto, recurse = work.pop()
        if not path:
            continue
        if not xs.set_perms(path, perms, tx):
            out.err(b"Error occurred setting permissions on '" + path + b"'", xs.errno)
        later = []
        if upto:
            sep = path.rfind(b"/")
            if sep < 0:
                out.errx(b"Unable to locate path separator '/' in '" + path + b"'")
            later.append((path[:sep], True, False))
        if recurse:
            names = xs.directory(path, tx)
            for name in names or ():
                child = (path + b"/" + _fsencode(name))[: _MAX_PATH_LEN - 1]
                later.append((child, False, True))
        # C recurses upwards first, then into each child in order.
        work.extend(reversed(later))


def _rm(xs: "Xs", out: Output, path: bytes, tidy: bool, tx: int) -> bool:
    """``-t``: also remove each parent left empty and valueless."""
    while True:
        if not xs.rm(path, tx):
            out.warnx(b"could not remove path " + path)
            return False
        if not tidy:
            return True
        slash = path.rfind(b"/")
        if slash < 0:
            return True
        path = path[:slash]
        value = xs.read(path, tx)
        if value is None or value:
            return True
        names = xs.directory(path, tx)
        if names is None or names:
            return True


def _watch(xs: "Xs", out: Output, keys: list[bytes], opts: Options) -> None:
    for key in keys:
        if opts.depth < 0:
            if not xs.watch(key, key):
                out.errx(b"Unable to add watch on " + key + b"\n")
        elif not xs.watch(key, key, opts.depth):
            out.errx(b"Unable to add watch on " + key + b" with depth %d\n" % opts.depth)
    count = 0
    while opts.nr_watches == -1 or count < opts.nr_watches:
        count += 1
        event = xs.read_watch()
        if event is None:
            if xs.errno == _errno.EBADF and opts.nr_watches == -1:  # daemon gone
                raise _Exit(1)  # (C would spin forever here)
            continue
        out.write(event[0] + b"\n")
        out.flush()


def _perform(xs: "Xs", out: Output, mode: str, args: list[bytes], tx: int, opts: Options, result: bytearray) -> int:
    """One pass over the operands (re-run from scratch on ``EAGAIN``).

    ``result`` is the C tool's ``output()`` buffer: printed after the
    transaction ended, even when an operand failed.
    """
    if mode == "read":
        for path in args:
            value = xs.read(path, tx)
            if value is None:
                out.warnx(b"couldn't read path " + path)
                return 1
            if opts.prefix:
                result += path + b": "
            result += value if opts.raw else sanitise(value) + b"\n"
    elif mode == "write":
        for path, spec in zip(args[::2], args[1::2]):
            value = spec if opts.raw else unsanitise(spec)
            if not xs.write(path, value, tx):
                out.warnx(b"could not write path " + path)
                return 1
    elif mode == "rm":
        for path in args:
            if not _rm(xs, out, path, opts.tidy, tx):
                return 1
    elif mode == "exists":
        for path in args:
            if xs.read(path, tx) is None:
                return 1
    elif mode == "list":
        for path in args:
            names = xs.directory(path, tx)
            if names is None:
                out.warnx(b"could not list path " + path)
                return 1
            for name in names:
                if opts.prefix:
                    result += path + b"/"
                result += _fsencode(name) + b"\n"
    elif mode == "ls":
        max_width, desired_width = (_INT_MAX // 2, 0) if opts.flat else (80, 60)
        try:
            max_width = os.get_terminal_size(1).columns - 2
        except OSError:
            pass  # not a terminal: keep the defaults
        for path in args or [b"/"]:
            _ls(xs, out, path, opts, max_width, desired_width)
    elif mode == "chmod":
        perms = []
        for spec in args[1:]:
            letter = spec[:1]
            if letter not in (b"n", b"r", b"w", b"b"):
                out.errx(b"Invalid permission specification: '" + (letter or b"\0") + b"'")
            perms.append("%s%u" % (letter.decode(), _atoi(spec[1:]) & 0xFFFFFFFF))
        _chmod(xs, out, args[0], perms, opts.upto, opts.recurse, tx)
    elif mode == "watch":
        _watch(xs, out, args, opts)
    return 0


def main(argv: list[str] | None = None, mode: str | None = None) -> int:
    """Run one tool; ``mode`` fixed by the entry point, else from argv."""
    argv = sys.argv if argv is None else argv
    progname = argv[0] if argv else "xenstore"
    out = Output(os.path.basename(progname))
    try:
        return _main(argv, mode, progname, out)
    except _Exit as exc:
        return exc.status
    finally:
        try:
            out.flush()
        except BrokenPipeError:
            pass


def _main(argv: list[str], forced_mode: str | None, progname: str, out: Output) -> int:
    command = os.path.basename(progname)
    if forced_mode is not None:
        mode, switch_argv = forced_mode, 0
    else:
        if command.startswith("xenstore-"):
            switch_argv = 0
            command = command[len("xenstore-") :]
        elif len(argv) < 2:
            _usage(out, None, False, progname)
        else:
            command = argv[1]
            switch_argv = 1
        if command not in MODES:
            out.errx(b"unknown mode " + _fsencode(command) + b"\n")
        mode = command

    options, operands = _getopt.parse(
        argv[switch_argv],
        argv[switch_argv + 1 :],
        _OPTSTRING,
        _LONGOPTS,
        posixly_correct="POSIXLY_CORRECT" in os.environ,
    )
    opts = Options()
    for char, value, diagnostic in options:
        if diagnostic is not None:
            out.stderr(_fsencode(diagnostic))
        if char == _getopt.UNKNOWN or char == "s":  # -s: libxenstore 4.17 ignores it too
            continue
        if char == "h" or mode not in _OPTION_MODES[char]:
            _usage(out, mode, bool(switch_argv), progname)
        if char == "f":
            opts.flat = True
        elif char == "p":
            opts.prefix = True
        elif char == "t":
            opts.tidy = True
        elif char == "u":
            opts.upto = True
        elif char == "r":
            opts.recurse = True
        elif char == "n":
            opts.nr_watches = _atoi(_fsencode(value or ""))
        elif char == "R":
            opts.raw = True
        elif char == "d":
            opts.depth = _atoi(_fsencode(value or ""))

    if mode == "write" and len(operands) % 2 == 1:
        _usage(out, mode, bool(switch_argv), progname)
    if mode != "ls" and not operands:
        _usage(out, mode, bool(switch_argv), progname)

    if mode == "read":
        transaction = len(operands) > 1
    elif mode == "write":
        transaction = len(operands) > 2
    else:
        transaction = mode not in ("ls", "watch")

    import _signal  # (the signal module's enums cost a millisecond)

    # Die quietly on a closed pipe (| head) or ^C, as C programs do.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)

    from ._xs import xs_open

    try:
        xs = xs_open()
    except OSError as exc:
        out.err(b"xs_open", exc.errno or 5)
    try:
        return _run(xs, out, mode, [_fsencode(a) for a in operands], transaction, opts)
    finally:
        xs.close()


def _run(xs: "Xs", out: Output, mode: str, args: list[bytes], transaction: bool, opts: Options) -> int:
    while True:
        tx = 0
        if transaction:
            tx = xs.transaction_start()
            if not tx:
                out.errx(b"couldn't start transaction")
        result = bytearray()
        ret = _perform(xs, out, mode, args, tx, opts, result)
        if transaction and not xs.transaction_end(tx, abort=bool(ret)):
            if ret == 0 and xs.errno == _errno.EAGAIN:
                continue  # someone changed what we read: redo everything
            out.errx(b"couldn't end transaction")
        out.write(bytes(result))
        return ret


def main_read() -> int:
    return main(mode="read")


def main_write() -> int:
    return main(mode="write")


def main_ls() -> int:
    return main(mode="ls")


def main_list() -> int:
    return main(mode="list")


def main_exists() -> int:
    return main(mode="exists")


def main_rm() -> int:
    return main(mode="rm")


def main_chmod() -> int:
    return main(mode="chmod")


def main_watch() -> int:
    return main(mode="watch")


def main_multiplexer() -> int:
    return main()


def main_control() -> int:
    from ._control import main as control_main

    return control_main()


if __name__ == "__main__":
    sys.exit(main())
