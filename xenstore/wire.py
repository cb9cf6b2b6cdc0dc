"""The XenStore wire protocol (``xs_wire.h``), sans-IO.

A message is a 16-byte header ``struct xsd_sockmsg {type, req_id, tx_id,
len}`` (little-endian ``uint32`` each) followed by ``len`` payload bytes,
``len <= XENSTORE_PAYLOAD_MAX``.  This module only turns bytes into
:class:`Packet` objects and back; it never touches a socket, so the daemon,
the async client, the synchronous CLI client and the shared-ring transport
all share it.  It deliberately imports nothing heavy (the CLI tools must
start fast).
"""

from __future__ import annotations

import enum
import struct

__all__ = [
    "HEADER",
    "PAYLOAD_MAX",
    "ABS_PATH_MAX",
    "REL_PATH_MAX",
    "Op",
    "ERROR_NAMES",
    "Packet",
    "PacketReader",
    "ProtocolError",
    "XenStoreError",
    "split_strings",
    "join_strings",
    "OK",
]

HEADER = struct.Struct("<IIII")
PAYLOAD_MAX = 4096
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048

#: Acknowledgement payload of operations that return nothing.
OK = b"OK\x00"


class Op(enum.IntEnum):
    """Message types of ``xs_wire.h`` (``enum xsd_sockmsg_type``)."""

    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was RESTRICT; removed, the value is invalid.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


#: ``xsd_errors[]`` in header order; only the names travel on the wire.
ERROR_NAMES: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)


class XenStoreError(Exception):
    """An operation failed with a Xen error name (``ENOENT``, ``EACCES``...).

    ``name`` is always one of :data:`ERROR_NAMES` when raised by this
    project; a peer's unknown error string (e.g. oxenstored's ``EQUOTA``) is
    kept verbatim in ``name`` so nothing is lost, and callers should treat
    it like ``EINVAL``.
    """

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        self.detail = detail
        super().__init__(f"{name}: {detail}" if detail else name)

    @property
    def errno(self) -> int:
        """The Linux errno for ``name`` (``EINVAL`` for unknown names)."""
        import errno as _errno

        return getattr(_errno, self.name, _errno.EINVAL)


class ProtocolError(Exception):
    """The peer broke framing (e.g. ``len`` > 4096): the stream is unusable."""


class Packet:
    """One XenStore message: header fields plus raw payload bytes.

    Immutable, compared and hashed by value.  (Written out rather than as
    a frozen dataclass: importing ``dataclasses`` costs the command-line
    tools, which import this module, about 10 ms per call.)
    """

    __slots__ = ("op", "req_id", "tx_id", "payload")
    __match_args__ = ("op", "req_id", "tx_id", "payload")

    op: int
    req_id: int
    tx_id: int
    payload: bytes

    def __init__(self, op: int, req_id: int = 0, tx_id: int = 0, payload: bytes = b"") -> None:
        setter = object.__setattr__
        setter(self, "op", op)
        setter(self, "req_id", req_id)
        setter(self, "tx_id", tx_id)
        setter(self, "payload", payload)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen Packet")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen Packet")

    def _fields(self) -> tuple:
        return (self.op, self.req_id, self.tx_id, self.payload)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._fields() == other._fields()  # type: ignore[attr-defined]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"Packet(op={self.op!r}, req_id={self.req_id!r}, tx_id={self.tx_id!r}, payload={self.payload!r})"

    def __reduce__(self) -> tuple:
        return (Packet, self._fields())

    def encode(self) -> bytes:
        """Header + payload, ready to write to the stream.

        Raises :class:`ValueError` if the payload is over the 4096-byte limit
        (that is the local caller's bug, not the peer's).
        """
        if len(self.payload) > PAYLOAD_MAX:
            raise ValueError(f"payload of {len(self.payload)} bytes exceeds {PAYLOAD_MAX}")
        return HEADER.pack(self.op, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def reply(self, op: int, payload: bytes) -> "Packet":
        """A reply echoing this request's ``req_id`` and ``tx_id`` (as cxenstored)."""
        return Packet(op, self.req_id, self.tx_id, payload)

    def error_reply(self, name: str) -> "Packet":
        return Packet(Op.ERROR, self.req_id, self.tx_id, name.encode() + b"\x00")

    @property
    def args(self) -> list[bytes]:
        """The payload split into NUL-terminated strings (see :func:`split_strings`)."""
        return split_strings(self.payload)


class PacketReader:
    """Incremental parser: feed stream bytes, pull complete packets.

    >>> r = PacketReader(); r.feed(Packet(Op.READ, 1, 0, b"/a\\0").encode())
    >>> r.next_packet()
    Packet(op=2, req_id=1, tx_id=0, payload=b'/a\\x00')

    A header announcing more than ``max_payload`` bytes raises
    :class:`ProtocolError`: the peer is broken or hostile and the stream
    cannot be resynchronised (cxenstored drops the connection).
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_payload: int = PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buf)

    def next_packet(self) -> Packet | None:
        """The next complete packet, or ``None`` if more bytes are needed."""
        buf = self._buf
        if len(buf) < 16:
            return None
        op, req_id, tx_id, length = HEADER.unpack_from(buf)
        if length > self._max:
            raise ProtocolError(f"payload length {length} exceeds {self._max}")
        end = 16 + length
        if len(buf) < end:
            return None
        payload = bytes(buf[16:end])
        del buf[:end]
        return Packet(op, req_id, tx_id, payload)

    def __iter__(self):
        while (packet := self.next_packet()) is not None:
            yield packet


def split_strings(payload: bytes) -> list[bytes]:
    """Split ``a\\0b\\0`` into ``[b"a", b"b"]``.

    A trailing fragment without its NUL is kept as a last element, so callers
    that need "exactly N NUL-terminated strings" can check
    ``payload.count(b"\\0")`` or the result length themselves.
    """
    parts = payload.split(b"\x00")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def join_strings(*strings: bytes | str) -> bytes:
    """``join_strings("a", b"b") == b"a\\0b\\0"``."""
    return b"".join((s.encode() if isinstance(s, str) else s) + b"\x00" for s in strings)
