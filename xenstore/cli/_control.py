"""``xenstore-control``: send a ``CONTROL`` command, print the answer.

A port of Xen 4.17's ``xenstore_control.c`` for the commands a daemon
answers in one round trip.  ``live-update`` (which needs Xen's domain
builder for stub domains) is answered as the daemon answers it.
"""

from __future__ import annotations

import errno as _errno
import os
import sys

__all__ = ["main"]


def _stderr(text: str) -> None:
    data = text.encode("utf-8", "surrogateescape")
    while data:
        data = data[os.write(2, data) :]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    prog = argv[0] if argv else "xenstore-control"
    if len(argv) < 2:
        _stderr(f"Usage:\n{prog} <command> [<arg>...]\n")
        return 2

    from ._xs import xs_open

    try:
        xs = xs_open()
    except OSError:
        _stderr("Failed to contact Xenstored.\n")
        return 1
    try:
        args = [a.encode("utf-8", "surrogateescape") for a in argv[2:]]
        answer = xs.control(argv[1].encode("utf-8", "surrogateescape"), args)
        if answer is None:
            if xs.errno == _errno.EINVAL:
                valid = xs.control(b"help", [])
                if valid is not None:
                    _stderr("Command not supported. Valid commands are:\n" + valid.decode("utf-8", "replace") + "\n")
                else:
                    _stderr("Error when executing command.\n")
            else:
                _stderr(f"Error {xs.errno} when trying to execute command.\n")
            return 3
        if answer:
            data = answer + b"\n"
            while data:
                data = data[os.write(1, data) :]
        return 0
    finally:
        xs.close()
