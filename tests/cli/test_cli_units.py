"""The tools' pure parts: Xen's value quoting, glibc's getopt, C's atoi."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstore.cli import _getopt
from xenstore.cli._escape import sanitise, unsanitise
from xenstore.cli.main import _LONGOPTS, _OPTSTRING, _atoi


def test_sanitise_golden():
    assert sanitise(b"plain text ~!") == b"plain text ~!"
    assert sanitise(b"x\ty\001\x7f\\z\n\r\x00\x08\xff") == b"x\\ty\\001\\x7f\\\\z\\n\\r\\000\\x08\\xff"


@pytest.mark.parametrize(
    "text, value",
    [
        (b"abc\\", b"abc\0"),  # a lone trailing backslash becomes NUL
        (b"\\x41\\x4", b"A\x04"),
        (b"\\x 41", b"A"),  # sscanf skips blanks
        (b"\\x-1", b"\xff"),
        (b"\\x0x5", b"\x005"),  # "0x" eats the width
        (b"\\x+f", b"\x0f"),
        (b"\\q", b"q"),
        (b"\\101\\1010", b"AA0"),
        (b"\\8", b"8"),
        (b"\\x", b"x"),
        (b"\\xg", b"xg"),
        (b"\\x0X", b"\0"),
        (b"\\377\\400", b"\xff\0"),
        (b"\\x  5", b"\x05"),
        (b"\\t\\n\\r\\\\", b"\t\n\r\\"),
    ],
)
def test_unsanitise_like_the_c_tools(text, value):
    # Expected values were recorded with Debian's xenstore-write + read -R.
    assert unsanitise(text) == value


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_sanitise_round_trips(value):
    quoted = sanitise(value)
    assert all(0x20 <= c <= 0x7E for c in quoted)
    assert unsanitise(quoted) == value


def parse(*args):
    return _getopt.parse("prog", list(args), _OPTSTRING, _LONGOPTS)


def test_getopt_permutes_and_stops_at_double_dash():
    assert parse("/a", "-p", "--", "-R") == ([("p", None, None)], ["/a", "-R"])
    assert _getopt.parse("prog", ["/a", "-p"], _OPTSTRING, _LONGOPTS, posixly_correct=True) == ([], ["/a", "-p"])


def test_getopt_short_clusters_and_arguments():
    assert parse("-fp", "-n3", "-n", "4", "-")[0] == [("f", None, None), ("p", None, None), ("n", "3", None), ("n", "4", None)]
    assert parse("-fp", "-")[1] == ["-"]
    assert parse("-n") == ([("?", None, "prog: option requires an argument -- 'n'\n")], [])
    assert parse("-x")[0] == [("?", None, "prog: invalid option -- 'x'\n")]


def test_getopt_long_options():
    assert parse("--pre")[0] == [("p", None, None)]
    assert parse("--number=5", "--number", "6")[0] == [("n", "5", None), ("n", "6", None)]
    assert parse("--r")[0][0][2] == "prog: option '--r' is ambiguous; possibilities: '--recurse' '--raw'\n"
    assert parse("--foo=1")[0][0][2] == "prog: unrecognized option '--foo=1'\n"
    assert parse("--help=1")[0][0][2] == "prog: option '--help' doesn't allow an argument\n"
    assert parse("--number")[0][0][2] == "prog: option '--number' requires an argument\n"


@pytest.mark.parametrize("text, value", [(b"12", 12), (b" -3x", -3), (b"abc", 0), (b"", 0), (b"+7", 7), (b"4294967297", 1), (b"99999999999999999999", -1)])
def test_atoi(text, value):
    assert _atoi(text) == value
