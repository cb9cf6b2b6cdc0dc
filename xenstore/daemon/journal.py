"""Persistence of the store: an append-only journal plus snapshots.

No trio here: the daemon calls these methods from its event loop (appends)
or from a worker thread (``fsync``, writing a snapshot), and the tests drive
them directly.

The journal being appended to is a shared memory mapping of its file: an
append copies the frame into the page cache (no system call, which on the
request path cost more than the rest of the append), and what is there
survives a crash or ``kill -9`` of the daemon just as a ``write()`` would;
``fdatasync`` makes it survive power loss too.  The file is extended ahead
in chunks with ``posix_fallocate`` (so a full disk is an error of the
append, never a SIGBUS) and cut back to its data when closed; a journal
left by a crash ends in zeros, which recovery treats as its clean end.

State directory layout::

    snapshot            the whole tree at some point (atomically replaced)
    snapshot.tmp        a snapshot being written (ignored and removed at start)
    journal.00000007    changes made after the snapshot, oldest file first

Every file starts with an 8-byte magic and then holds *frames*::

    u32 length (little-endian) | u32 CRC-32 of the body | body

A journal frame's body holds the change records (see ``xenstore.core.store``)
that one read batch of one connection committed: ``("set", path, value,
perms)``, ``("rm", path)``, or ``path NUL value`` (a new value for an
existing node).  The body is a msgpack array of them -- except for a lone
``path NUL value``, by far the most common batch (one WRITE), which is the
body as it is: no encoding on the request path, and no msgpack code to
bring into a cold cache.  The first byte tells them apart: a path starts
with ``/``, which no msgpack array does.  (Version 1 journals, magic
``UXSJRNL1``, had msgpack bodies only; they are read, and upgraded in place
when appended to.)

The snapshot holds exactly one frame whose body is ``{"journal": N,
"changes": [...]}``: load the changes, then replay every journal file
numbered N or higher, in order.  Because the number is written in the
snapshot, a crash at any point of a compaction leaves a readable state: an
old snapshot still names the older journals, and those are only deleted
once the new snapshot is in place.

A zero length field ends the frames (the unused, zero-filled end of a
journal; a body is never empty).  A frame that is cut short or fails its CRC (a crash in the middle of a
``write()``, or a damaged disk) ends the journal: it and anything after it
are dropped, logged, and the file is truncated there (a damaged file is
first copied aside as ``journal.N.corrupt``) so later appends stay readable.
Nothing acknowledged can be in a torn frame, because a batch's replies are
only sent after its frame has been written.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import msgpack

from ..core.store import Change, split_value_record

__all__ = [
    "FsyncPolicy",
    "JournalError",
    "Recovered",
    "StateDir",
    "encode_frame",
    "decode_frames",
    "JOURNAL_MAGIC",
    "SNAPSHOT_MAGIC",
]

log = logging.getLogger("xenstored.journal")

JOURNAL_MAGIC = b"UXSJRNL2"
#: The journal format before lone value records went unencoded (readable).
_JOURNAL_MAGIC_V1 = b"UXSJRNL1"
SNAPSHOT_MAGIC = b"UXSSNAP1"
FRAME = struct.Struct("<II")
#: A frame body larger than this is treated as corruption, not allocated.
MAX_FRAME = 1 << 30


_JOURNAL_NAME = re.compile(r"^journal\.(\d{8})$")


class FsyncPolicy(enum.Enum):
    """What an acknowledged write survives.

    ``PROCESS``: the journal frame is handed to the kernel (``write()``)
    before the reply is sent, so a crash or ``kill -9`` of the daemon loses
    nothing; a power failure may lose the last moments.  ``POWER``: the
    journal is also ``fdatasync``-ed before the reply is sent (one sync
    covers every connection's pending replies: group commit).
    """

    PROCESS = "process"
    POWER = "power"


class JournalError(Exception):
    """Persisting failed (disk full, I/O error) or the state is unreadable."""


#: The journal file grows by this much at a time (allocated, then mapped).
_CHUNK = 1 << 20
_pack_frame_header_into = FRAME.pack_into
_crc32 = zlib.crc32


def encode_frame(body: bytes) -> bytes:
    """Length + CRC32 header followed by ``body``."""
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def decode_frames(data: bytes | memoryview, start: int = 0) -> tuple[list[tuple[int, bytes]], int, str | None]:
    """Split ``data[start:]`` into ``(offset, body)`` frames.

    Returns ``(frames, end, problem)``: ``end`` is the offset just after the
    last good frame and ``problem`` says why decoding stopped early
    (``None`` if the data ended exactly at a frame boundary).
    """
    frames: list[tuple[int, bytes]] = []
    view = memoryview(data)
    pos = start
    total = len(view)
    while pos < total:
        if total - pos < FRAME.size:
            return frames, pos, f"truncated frame header at offset {pos}"
        length, crc = FRAME.unpack_from(view, pos)
        if length == 0:
            return frames, pos, f"empty frame at offset {pos}"
        if length > MAX_FRAME:
            return frames, pos, f"impossible frame length {length} at offset {pos}"
        body_start = pos + FRAME.size
        if total - body_start < length:
            return frames, pos, f"truncated frame at offset {pos} ({total - body_start} of {length} bytes)"
        body = bytes(view[body_start : body_start + length])
        if zlib.crc32(body) != crc:
            return frames, pos, f"CRC mismatch in frame at offset {pos}"
        frames.append((pos, body))
        pos = body_start + length
    return frames, pos, None


#: msgpack.packb builds a packer per call: half the cost of a one-change
#: frame.  (Not thread-safe: only the daemon's loop appends.)
_pack = msgpack.Packer(use_bin_type=True).pack


def pack_changes(changes: Sequence[Change]) -> bytes:
    """A journal frame's body for ``changes`` (see the module doc)."""
    record = changes[0] if len(changes) == 1 else None
    if record.__class__ is bytes and record[:1] == b"/":
        return record
    return _pack(changes)


def unpack_changes(body: bytes) -> list[Change]:
    """Inverse of :func:`pack_changes`; raises ``ValueError`` on garbage."""
    if body[:1] == b"/":
        return [_check_change(body)]
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"undecodable record: {exc}") from None
    if not isinstance(obj, list):
        raise ValueError("record is not an array")
    changes: list[Change] = []
    for item in obj:
        changes.append(_check_change(item))
    return changes


def _check_change(item: Any) -> Change:
    if isinstance(item, bytes):
        try:
            split_value_record(item)
        except ValueError:
            pass
        else:
            return item
    elif isinstance(item, list) and item:
        if item[0] == "set" and len(item) == 4:
            _, path, value, perms = item
            if (
                isinstance(path, str)
                and isinstance(value, bytes)
                and isinstance(perms, list)
                and all(isinstance(p, str) for p in perms)
            ):
                return ("set", path, value, perms)
        elif item[0] == "rm" and len(item) == 2 and isinstance(item[1], str):
            return ("rm", item[1])
    raise ValueError(f"malformed change {item!r:.80}")


@dataclass
class Recovered:
    """What :meth:`StateDir.recover` found on disk."""

    snapshot: list[Change] | None
    batches: list[list[Change]] = field(default_factory=list)
    #: Human-readable descriptions of dropped (torn/corrupt) data.
    problems: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.snapshot is None and not self.batches


class StateDir:
    """The journal and snapshots of one state directory.

    Typical life: ``recover()`` once, then ``open_journal()``, then
    ``append()`` per batch (and ``sync()`` per group with
    :attr:`FsyncPolicy.POWER`), with ``start_compaction()`` /
    ``write_snapshot()`` / ``finish_compaction()`` when
    ``wants_compaction`` says the journal has grown.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        policy: FsyncPolicy = FsyncPolicy.PROCESS,
        compact_bytes: int = 16 << 20,
    ) -> None:
        self.path = os.fspath(path)
        self.policy = policy
        self.compact_bytes = compact_bytes
        self._fd: int | None = None
        self._map: mmap.mmap | None = None  # the journal file, mapped (see _extend)
        self._mapped = 0  # its size (0: no journal open)
        self._seq = 0  # number of the journal being appended to
        self._journal_bytes = 0
        #: Journal size beyond which it wants compaction (_snapshot_is).
        self._compact_at = compact_bytes
        #: Frames appended so far (monotonic; group commit compares it).
        self.frames_written = 0

    # -- startup --------------------------------------------------------

    def recover(self, strict: bool = False) -> Recovered:
        """Read the snapshot and the journals after it.

        Torn or corrupt journal data is dropped, logged and reported in
        ``Recovered.problems``; with ``strict`` it raises
        :class:`JournalError` instead.  An unreadable snapshot always
        raises: it cannot be partially trusted.
        """
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.path, "snapshot.tmp")
        if os.path.exists(tmp):
            os.unlink(tmp)  # an interrupted compaction; the old snapshot rules
        snapshot, first_seq = self._read_snapshot()
        result = Recovered(snapshot=snapshot)
        seqs = self._journal_seqs()
        for seq in seqs:
            if seq < first_seq:
                os.unlink(self._journal_path(seq))  # already in the snapshot
        seqs = [s for s in seqs if s >= first_seq]
        for index, seq in enumerate(seqs):
            problem = self._read_journal(seq, result, strict)
            if problem is None:
                continue
            message = f"{self._journal_path(seq)}: {problem}; dropping it and everything after it"
            if strict:
                raise JournalError(message)
            log.error("%s", message)
            result.problems.append(message)
            for later in seqs[index + 1 :]:
                later_path = self._journal_path(later)
                result.problems.append(f"{later_path}: dropped (follows damaged journal)")
                os.replace(later_path, later_path + ".corrupt")
            seqs = seqs[: index + 1]
            break
        self._seq = seqs[-1] if seqs else max(first_seq, 1)
        return result

    def _read_snapshot(self) -> tuple[list[Change] | None, int]:
        path = os.path.join(self.path, "snapshot")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, 0
        if not data.startswith(SNAPSHOT_MAGIC):
            raise JournalError(f"{path}: not a snapshot file")
        frames, end, problem = decode_frames(data, len(SNAPSHOT_MAGIC))
        if problem or len(frames) != 1 or end != len(data):
            raise JournalError(f"{path}: damaged snapshot ({problem or 'wrong frame count'})")
        try:
            obj = msgpack.unpackb(frames[0][1], raw=False)
            first_seq = obj["journal"]
            changes = [_check_change(c) for c in obj["changes"]]
        except Exception as exc:
            raise JournalError(f"{path}: damaged snapshot ({exc})") from None
        if not isinstance(first_seq, int) or first_seq < 0:
            raise JournalError(f"{path}: damaged snapshot (journal number)")
        self._snapshot_is(len(data))
        return changes, first_seq

    def _read_journal(self, seq: int, result: Recovered, strict: bool) -> str | None:
        """Append the journal's batches to ``result``.

        On damage, returns the problem; unless ``strict``, the file is
        truncated after its last good frame (a file with more than a torn
        tail is first copied aside as ``.corrupt`` for inspection).
        """
        path = self._journal_path(seq)
        with open(path, "rb") as f:
            data = f.read()
        magic = len(JOURNAL_MAGIC)
        if not _is_journal(data):
            if JOURNAL_MAGIC.startswith(data):
                problem, keep = None, 0  # crash between creating the file and writing its magic
            else:
                problem, keep = "bad magic", 0
        else:
            frames, keep, problem = decode_frames(data, magic)
            for offset, body in frames:
                try:
                    result.batches.append(unpack_changes(body))
                except ValueError as exc:
                    problem, keep = f"{exc} at offset {offset} (valid CRC)", offset
                    break
            else:
                if problem is not None and not data[keep:].strip(b"\0"):
                    problem = None  # the zero-filled room of a journal left open: its clean end
        if keep == len(data) or (strict and problem is not None):
            return problem
        torn_tail_only = problem is not None and problem.startswith("truncated")
        if problem is not None and not torn_tail_only:
            shutil.copyfile(path, path + ".corrupt")
        with open(path, "r+b") as f:
            if keep < magic:
                f.seek(0)
                f.write(JOURNAL_MAGIC)
                keep = magic
            f.truncate(keep)
            os.fsync(f.fileno())
        return problem

    # -- appending -------------------------------------------------------

    def open_journal(self) -> None:
        """Open (or create) the current journal for appending (after
        :meth:`recover`, which cuts a damaged or zero-filled end off)."""
        path = self._journal_path(self._seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                _write_all(fd, JOURNAL_MAGIC)
                os.fsync(fd)
                self._fsync_dir()
                size = len(JOURNAL_MAGIC)
            else:
                size, magic = _data_end(fd, size)
                if magic != JOURNAL_MAGIC:  # version 1: the new frames need the new magic
                    os.pwrite(fd, JOURNAL_MAGIC, 0)
                    os.fsync(fd)
            self._fd = fd
            self._journal_bytes = size
            self._map = None
            self._extend(size)
        except BaseException:
            self._fd = None
            os.close(fd)
            raise

    def _extend(self, needed: int) -> None:
        """Room for at least ``needed`` bytes: the file is allocated up to
        the next chunk boundary (an ``ENOSPC`` shows here, as a
        :class:`JournalError`) and mapped whole."""
        if self._fd is None:
            raise RuntimeError("journal is not open")
        size = (needed // _CHUNK + 1) * _CHUNK
        try:
            os.posix_fallocate(self._fd, 0, size)
            if self._map is None:
                self._map = mmap.mmap(self._fd, size)
            else:
                self._map.resize(size)
        except OSError as exc:
            raise JournalError(f"journal cannot grow: {exc}") from exc
        self._mapped = size
        # Pages written before stay in the page cache; only the mapping lets
        # go of them (they would count as the daemon's resident memory).
        done = self._journal_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        if done:
            self._map.madvise(mmap.MADV_DONTNEED, 0, done)

    def append(self, changes: Sequence[Change]) -> bool:
        """Append one frame holding ``changes``; returns :attr:`wants_compaction`.

        After this returns the frame is in the page cache: it survives a
        crash of this process.  Raises :class:`JournalError` if the journal
        cannot grow (disk full).
        """
        body = pack_changes(changes)
        start = self._journal_bytes
        end = start + 8 + len(body)
        if end > self._mapped:  # (always, while no journal is open)
            self._extend(end)
        mapped = self._map
        # The body first, the header last: a crash in between leaves a zero
        # length field, i.e. the clean end of the journal.
        mapped[start + 8 : end] = body
        _pack_frame_header_into(mapped, start, len(body), _crc32(body))
        self._journal_bytes = end
        self.frames_written += 1
        return end > self._compact_at

    def sync(self) -> None:
        """``fdatasync`` the journal (may be called from a worker thread)."""
        fd = self._fd
        if fd is None:
            return
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise JournalError(f"journal sync failed: {exc}") from exc

    @property
    def current_journal(self) -> int:
        """Number of the journal file appends go to."""
        return self._seq

    @property
    def journal_bytes(self) -> int:
        return self._journal_bytes

    @property
    def wants_compaction(self) -> bool:
        """The journal outgrew both the threshold and twice the snapshot."""
        return self._journal_bytes > self._compact_at

    def _snapshot_is(self, snapshot_bytes: int) -> None:
        """The snapshot now has ``snapshot_bytes``: the journal wants
        compaction when it outgrows both ``compact_bytes`` and twice that."""
        self._compact_at = max(self.compact_bytes, 2 * snapshot_bytes)

    # -- compaction ------------------------------------------------------

    def start_compaction(self) -> int:
        """Switch appends to a fresh journal; returns its number.

        The caller takes the store snapshot at this very moment (no change
        may slip between the switch and the snapshot), then writes it with
        :meth:`write_snapshot` (in a thread if it likes) and finally calls
        :meth:`finish_compaction`.
        """
        self._close_journal()
        self._seq += 1
        self.open_journal()
        return self._seq

    def write_snapshot(self, changes: Iterable[Change], first_journal: int) -> int:
        """Atomically replace the snapshot; returns its size in bytes."""
        body = msgpack.packb({"journal": first_journal, "changes": list(changes)}, use_bin_type=True)
        data = SNAPSHOT_MAGIC + encode_frame(body)
        tmp = os.path.join(self.path, "snapshot.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(self.path, "snapshot"))
        self._fsync_dir()
        return len(data)

    def finish_compaction(self, first_journal: int, snapshot_bytes: int) -> None:
        """Delete the journals the new snapshot made obsolete."""
        self._snapshot_is(snapshot_bytes)
        for seq in self._journal_seqs():
            if seq < first_journal:
                os.unlink(self._journal_path(seq))

    def close(self) -> None:
        self._close_journal()

    def _close_journal(self) -> None:
        """Sync the journal, cut its unused room off and close it."""
        fd = self._fd
        if fd is None:
            return
        self._fd = None
        try:
            self._mapped = 0
            if self._map is not None:
                self._map.close()
                self._map = None
            os.ftruncate(fd, self._journal_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- helpers ---------------------------------------------------------

    def _journal_path(self, seq: int) -> str:
        return os.path.join(self.path, f"journal.{seq:08d}")

    def _journal_seqs(self) -> list[int]:
        seqs = []
        for name in os.listdir(self.path):
            m = _JOURNAL_NAME.match(name)
            if m:
                seqs.append(int(m.group(1)))
        return sorted(seqs)

    def _fsync_dir(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _data_end(fd: int, size: int) -> tuple[int, bytes]:
    """Where the frames of an existing journal end, and its magic.  The
    zero-filled room after the frames is free; anything else there is
    damage ``recover`` did not remove (appending after it would hide every
    later frame)."""
    data = os.pread(fd, size, 0)
    if not _is_journal(data):
        raise JournalError("journal has no magic; recover() first")
    _, end, problem = decode_frames(data, len(JOURNAL_MAGIC))
    if problem is not None and data[end:].strip(b"\0"):
        raise JournalError(f"journal is damaged ({problem}); recover() first")
    return end, data[: len(JOURNAL_MAGIC)]


def _is_journal(data: bytes) -> bool:
    """``data`` starts with a journal magic this version reads."""
    return data.startswith(JOURNAL_MAGIC) or data.startswith(_JOURNAL_MAGIC_V1)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
