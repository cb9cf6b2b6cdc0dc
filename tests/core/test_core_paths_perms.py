"""Paths and permission lists: properties against straightforward references."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstore.core.perms import FULL, READ, WRITE, Perms, parse_domid
from xenstore.core.paths import ArgumentPaths, ancestors, is_valid_path, parent_of, resolve, resolve_watch_path
from xenstore.wire import XenStoreError

CHARS = "abcXYZ019-_@/ .\x00é"
ALLOWED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@")


def reference_valid(path: str, path_max: int = 2048) -> bool:
    """cxenstored is_valid_nodename, spelled out step by step."""
    if not path.startswith("/"):
        return False
    if path.endswith("/") and path != "/":
        return False
    if "//" in path:
        return False
    if any(c not in ALLOWED for c in path):
        return False
    m = re.match(r"/local/domain/([+-]?\d+)/", path)
    local_off = 0
    if m and len(m.group(1)) <= 5:
        local_off = m.end()
    return len(path) - local_off <= path_max


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=CHARS, max_size=20))
def test_path_validation_matches_reference(path):
    assert is_valid_path(path, 2048) == reference_valid(path)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab-_@0", min_size=1, max_size=5), min_size=1, max_size=6))
def test_well_formed_paths_are_valid_and_ancestors_walk_to_root(components):
    path = "/" + "/".join(components)
    assert is_valid_path(path, 2048)
    chain = list(ancestors(path))
    assert chain[-1] == "/" and len(chain) == len(components)
    assert chain[0] == parent_of(path)


@pytest.mark.parametrize(
    "path,max_,ok",
    [
        ("/" + "a" * 10, 11, True),
        ("/" + "a" * 11, 11, False),
        ("/local/domain/7/" + "a" * 11, 11, True),
        ("/local/domain/7/" + "a" * 12, 11, False),
        ("/local/domain/12345/" + "a" * 11, 11, True),
        ("/local/domain/123456/" + "a" * 11, 11, False),
        ("/local/domain/7", 11, False),  # 15 chars, no trailing slash: no prefix rule
    ],
)
def test_path_length_rules(path, max_, ok):
    assert is_valid_path(path, max_) == ok


def test_resolve():
    assert resolve("x/y", "/local/domain/5", 2048) == "/local/domain/5/x/y"
    assert resolve("/abs", "/local/domain/5", 2048) == "/abs"
    for bad in ("", "@x", "x/", "/a//b"):
        with pytest.raises(XenStoreError) as e:
            resolve(bad, "/local/domain/5", 2048)
        assert e.value.name == "EINVAL"
    assert resolve_watch_path("@releaseDomain", "/local/domain/5", 2048) == ("@releaseDomain", False)
    assert resolve_watch_path("dev", "/local/domain/5", 2048) == ("/local/domain/5/dev", True)
    with pytest.raises(XenStoreError):
        resolve_watch_path("@" + "x" * 2048, "/local/domain/5", 2048)


@pytest.mark.parametrize(
    "text,value",
    [
        ("0", 0),
        ("5", 5),
        ("0x10", 16),
        ("0X1f", 31),
        ("010", 8),
        ("  7", 7),
        ("+7", 7),
        ("-1", 0xFFFFFFFF),
        ("", None),
        ("0x", None),
        ("08", None),
        ("5 ", None),
        ("abc", None),
        ("1e3", None),
    ],
)
def test_parse_domid_is_strtol_base0(text, value):
    assert parse_domid(text) == value


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("nrwb"), st.integers(0, 0x7FEF)), min_size=1, max_size=6))
def test_perms_round_trip_in_decimal(pairs):
    strings = [f"{letter}{domid}" for letter, domid in pairs]
    perms = Perms.parse(strings)
    assert list(perms.strings) == strings
    assert perms.wire == "".join(s + "\0" for s in strings).encode()
    assert Perms.parse([f"{letter}{hex(domid)}" for letter, domid in pairs]) == perms
    assert perms.owner == pairs[0][1]


def reference_access(strings: list[str], domid: int, target: int | None) -> int:
    owner = int(strings[0][1:])
    if domid == owner or target == owner:
        return FULL
    bits = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
    for s in strings[1:]:
        if int(s[1:]) in (domid, target):
            return bits[s[0]]
    return bits[strings[0][0]]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("nrwb"), st.integers(0, 4)), min_size=1, max_size=5),
    st.integers(1, 4),
    st.one_of(st.none(), st.integers(0, 4)),
)
def test_access_rule(pairs, domid, target):
    strings = [f"{letter}{d}" for letter, d in pairs]
    assert Perms.parse(strings).access(domid, target) == reference_access(strings, domid, target)


def test_perms_helpers():
    perms = Perms.parse(["r0", "w5", "b6"])
    assert perms.with_owner(5).strings == ("r5", "w5", "b6")
    assert perms.without_domain(5).strings == ("r0", "b6")
    assert perms.domids() == {0, 5, 6} and len(perms) == 3
    for bad in ([], ["x1"], ["n"], ["n1", "r"]):
        with pytest.raises(XenStoreError):
            Perms.parse(bad)


def _outcome(call):
    try:
        return call()
    except XenStoreError as exc:
        return exc.name


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(max_size=12).map(lambda b: b.replace(b"\xff", b"/")), st.sampled_from([3, 8, 2048])),
        max_size=30,
    )
)
def test_argument_paths_memo_answers_like_onearg_plus_resolve(calls):
    """The memo never changes an answer: same path or same error as
    cxenstored's onearg + resolve, also when path-max shrinks later and
    when the memo starts afresh (capacity 4)."""
    memo = ArgumentPaths(capacity=4)
    home = "/local/domain/3"
    for arg, path_max in calls:
        for candidate in (arg, arg + b"\0", b"/" + arg + b"\0"):

            def reference():
                if not candidate or candidate.find(b"\0") != len(candidate) - 1:
                    raise XenStoreError("EINVAL")
                return resolve(candidate[:-1].decode("latin-1"), home, path_max)

            assert _outcome(lambda: memo.resolve(candidate, home, path_max)) == _outcome(reference)


def test_argument_paths_remembers_short_absolute_paths_only():
    memo = ArgumentPaths()
    assert memo.resolve(b"/a/b\0", "/local/domain/0", 2048) == "/a/b"
    assert memo.resolve(b"rel\0", "/local/domain/5", 2048) == "/local/domain/5/rel"
    long_arg = b"/" + b"x" * ArgumentPaths.MAX_KEY + b"\0"
    assert memo.resolve(long_arg, "/local/domain/0", 4096) == long_arg[:-1].decode()
    assert set(memo.known) == {b"/a/b\0"}
