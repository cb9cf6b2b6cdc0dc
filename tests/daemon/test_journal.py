"""The journal/snapshot files, without trio and without the engine."""

from __future__ import annotations

import os
import subprocess

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenstore.daemon.journal import (
    JOURNAL_MAGIC,
    FsyncPolicy,
    JournalError,
    StateDir,
    decode_frames,
    encode_frame,
    pack_changes,
    unpack_changes,
)

paths = st.lists(st.sampled_from(["a", "b", "c-1", "_x", "@w"]), min_size=1, max_size=4).map(lambda p: "/" + "/".join(p))
perms = st.lists(st.sampled_from(["n0", "r5", "w7", "b3", "n32752"]), min_size=1, max_size=3)
changes = st.one_of(
    st.tuples(st.just("set"), paths, st.binary(max_size=64), perms),
    st.tuples(st.just("rm"), paths),
    st.builds(lambda p, v: p.encode() + b"\0" + v, paths, st.binary(max_size=64)),  # a value record
)


def _as_read(change):
    """A change as recovery gives it back (lists come back as tuples)."""
    return change if isinstance(change, bytes) else tuple(change)
batches = st.lists(st.lists(changes, min_size=1, max_size=5), max_size=8)


def test_frame_golden_bytes():
    assert encode_frame(b"abc") == b"\x03\x00\x00\x00\xc2\x41\x24\x35abc"
    assert decode_frames(encode_frame(b"abc")) == ([(0, b"abc")], 11, None)


def test_a_zero_length_field_ends_the_frames():
    """Bodies are never empty (a packed batch is at least one byte), so a
    zero length is the zero-filled room at the end of a mapped journal."""
    blob = encode_frame(b"abc") + bytes(64)
    assert decode_frames(blob) == ([(0, b"abc")], 11, "empty frame at offset 11")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.data())
def test_decode_stops_exactly_at_the_damage(bodies, data):
    blob = b"".join(encode_frame(b) for b in bodies)
    frames, end, problem = decode_frames(blob)
    assert [b for _, b in frames] == bodies and end == len(blob) and problem is None
    if not blob:
        return
    cut = data.draw(st.integers(0, len(blob) - 1))
    frames, end, problem = decode_frames(blob[:cut])
    # Every whole frame before the cut survives, nothing partial does.
    assert end <= cut and problem is not None or end == cut
    assert [b for _, b in frames] == bodies[: len(frames)]
    flip = data.draw(st.integers(0, len(blob) - 1))
    damaged = bytearray(blob)
    damaged[flip] ^= 0x40
    frames, end, problem = decode_frames(bytes(damaged))
    assert problem is not None  # a CRC (or length) catches every single-byte flip
    assert [b for _, b in frames] == bodies[: len(frames)]


def test_a_lone_value_record_is_its_own_frame_body():
    """The usual batch, one WRITE's ``path NUL value``, goes to the journal
    as it is; anything else is a msgpack array (which never starts with "/")."""
    assert pack_changes([b"/a/b\0v\0w"]) == b"/a/b\0v\0w"
    assert unpack_changes(b"/a/b\0v\0w") == [b"/a/b\0v\0w"]
    two = pack_changes([b"/a\0v", ("rm", "/b")])
    assert two[:1] == b"\x92" and unpack_changes(two) == [b"/a\0v", ("rm", "/b")]
    assert pack_changes([("rm", "/b")])[:1] == b"\x91"


@settings(max_examples=100, deadline=None)
@given(st.lists(changes, max_size=10))
def test_changes_round_trip(items):
    assert unpack_changes(pack_changes(items)) == [_as_read(c) for c in items]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",
        b"\x91\x92\xa3set\xa1a",
        b"\x81\xa1a\x01",
        b"\x91\x91\xa3bad",
        b"\x91\xc4\x02/a",  # a value record without its NUL
        b"\x91\xc4\x04/\xe9\x00v",  # a value record whose path is not ASCII
        b"/a",  # a lone value record without its NUL
        b"/\xe9\x00v",  # a lone value record whose path is not ASCII
    ],
)
def test_unpack_rejects_garbage(garbage):
    with pytest.raises(ValueError):
        unpack_changes(garbage)


def _write(state_dir, batches_, compact_bytes=1 << 30):
    sd = StateDir(state_dir, compact_bytes=compact_bytes)
    rec = sd.recover()
    sd.open_journal()
    for batch in batches_:
        sd.append(batch)
    sd.close()
    return rec


@settings(max_examples=40, deadline=None)
@given(batches, st.data())
def test_torn_tail_drops_only_the_torn_record(tmp_path_factory, bs, data):
    d = tmp_path_factory.mktemp("state")
    _write(d, bs)
    journal = d / "journal.00000001"
    size = journal.stat().st_size
    cut = data.draw(st.integers(len(JOURNAL_MAGIC), size))
    os.truncate(journal, cut)
    rec = StateDir(d).recover()
    n = len(rec.batches)
    assert rec.batches == [[_as_read(c) for c in b] for b in bs[:n]]
    complete = [len(JOURNAL_MAGIC) + sum(len(encode_frame(pack_changes(b))) for b in bs[:k]) for k in range(len(bs) + 1)]
    assert cut in complete or rec.problems  # a cut inside a frame is reported
    assert n == max(k for k, end in enumerate(complete) if end <= cut)
    # The file was repaired: appending after recovery keeps everything readable.
    sd = StateDir(d)
    sd.recover()
    sd.open_journal()
    sd.append([("rm", "/z")])
    sd.close()
    rec2 = StateDir(d).recover()
    assert rec2.problems == [] and rec2.batches[-1] == [("rm", "/z")] and len(rec2.batches) == n + 1


def test_a_version_1_journal_is_read_and_upgraded_when_appended_to(tmp_path):
    """Version 1 put every batch in a msgpack array, lone value records too."""
    v1 = [[b"/tool\0x"], [("set", "/a", b"1", ["n0"]), ("rm", "/a")]]
    journal = tmp_path / "journal.00000001"
    journal.write_bytes(b"UXSJRNL1" + b"".join(encode_frame(msgpack.packb(b, use_bin_type=True)) for b in v1))
    sd = StateDir(tmp_path)
    assert sd.recover().batches == [[_as_read(c) for c in b] for b in v1]
    sd.open_journal()
    sd.append([b"/tool\0y"])
    sd.close()
    assert journal.read_bytes()[: len(JOURNAL_MAGIC)] == JOURNAL_MAGIC == b"UXSJRNL2"
    rec = StateDir(tmp_path).recover()
    assert rec.problems == [] and rec.batches == [[_as_read(c) for c in b] for b in v1] + [[b"/tool\0y"]]


def test_corrupt_middle_record_is_set_aside_and_logged(tmp_path, caplog):
    _write(tmp_path, [[("rm", "/a")], [("rm", "/b")], [("rm", "/c")]])
    journal = tmp_path / "journal.00000001"
    data = bytearray(journal.read_bytes())
    first = len(JOURNAL_MAGIC) + len(encode_frame(pack_changes([("rm", "/a")])))
    data[first + 10] ^= 1  # inside the second record's body
    journal.write_bytes(bytes(data))
    rec = StateDir(tmp_path).recover()
    assert rec.batches == [[("rm", "/a")]]
    assert "CRC mismatch" in rec.problems[0]
    assert "CRC mismatch" in caplog.text
    assert (tmp_path / "journal.00000001.corrupt").read_bytes() == bytes(data)


def test_strict_recovery_refuses_and_leaves_files_alone(tmp_path):
    _write(tmp_path, [[("rm", "/a")], [("rm", "/b")]])
    journal = tmp_path / "journal.00000001"
    os.truncate(journal, journal.stat().st_size - 1)
    before = journal.read_bytes()
    with pytest.raises(JournalError):
        StateDir(tmp_path).recover(strict=True)
    assert journal.read_bytes() == before


def test_compaction_and_every_crash_point(tmp_path):
    snapshot = [("set", "/", b"", ["n0"]), ("set", "/a", b"1", ["n0"])]
    sd = StateDir(tmp_path)
    assert sd.recover().is_empty
    sd.open_journal()
    sd.append([("set", "/a", b"1", ["n0"])])
    # Crash right after switching journals, before the snapshot: both journals replay.
    first = sd.start_compaction()
    sd.append([("set", "/b", b"2", ["n0"])])
    rec = StateDir(tmp_path).recover()
    assert rec.snapshot is None and rec.batches == [[("set", "/a", b"1", ["n0"])], [("set", "/b", b"2", ["n0"])]]
    # Snapshot written: only the newer journal replays, the old one is deleted on recovery.
    size = sd.write_snapshot(snapshot, first)
    rec = StateDir(tmp_path).recover()
    assert rec.snapshot == [tuple(c) for c in snapshot]
    assert rec.batches == [[("set", "/b", b"2", ["n0"])]]
    assert sorted(os.listdir(tmp_path)) == ["journal.00000002", "snapshot"]
    sd.finish_compaction(first, size)
    sd.close()


def test_wants_compaction_threshold(tmp_path):
    sd = StateDir(tmp_path, compact_bytes=100)
    sd.recover()
    sd.open_journal()
    assert not sd.wants_compaction
    sd.append([("set", "/a", b"x" * 100, ["n0"])])
    assert sd.wants_compaction
    first = sd.start_compaction()
    sd.finish_compaction(first, sd.write_snapshot([("set", "/", b"", ["n0"])] * 50, first))
    assert not sd.wants_compaction
    sd.close()


def test_interrupted_snapshot_write_is_ignored(tmp_path):
    _write(tmp_path, [[("rm", "/a")]])
    (tmp_path / "snapshot.tmp").write_bytes(b"half a snapsh")
    rec = StateDir(tmp_path).recover()
    assert rec.batches == [[("rm", "/a")]] and not (tmp_path / "snapshot.tmp").exists()


def test_damaged_snapshot_is_an_error(tmp_path):
    sd = StateDir(tmp_path)
    sd.recover()
    sd.write_snapshot([("set", "/", b"", ["n0"])], 1)
    snap = tmp_path / "snapshot"
    os.truncate(snap, snap.stat().st_size - 2)
    with pytest.raises(JournalError):
        StateDir(tmp_path).recover()


def test_power_policy_sync(tmp_path):
    sd = StateDir(tmp_path, FsyncPolicy.POWER)
    sd.recover()
    sd.open_journal()
    sd.append([("rm", "/a")])
    sd.sync()
    assert sd.frames_written == 1
    sd.close()
    assert StateDir(tmp_path).recover().batches == [[("rm", "/a")]]


def test_package_exports():
    import xenstore.daemon as daemon

    for name in daemon.__all__:
        assert getattr(daemon, name).__module__.startswith("xenstore.daemon.")


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MiB tmpfs: room for the first journal chunk, not the second."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_an_append_error_and_loses_nothing_appended(small_disk):
    """The mapped journal is allocated ahead (posix_fallocate): a full disk
    shows as JournalError from append -- never a SIGBUS -- and every frame
    appended before it is there after recovery."""
    sd = StateDir(small_disk)
    sd.recover()
    sd.open_journal()
    appended = []
    with pytest.raises(JournalError, match="cannot grow"):
        for i in range(100_000):
            batch = [("set", f"/full/k{i}", b"x" * 100, ["n0"])]
            sd.append(batch)
            appended.append(batch)
    sd.close()
    assert len(appended) > 1000
    rec = StateDir(small_disk).recover()
    assert rec.problems == [] and rec.batches == [[_as_read(c) for c in b] for b in appended]
