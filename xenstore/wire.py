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
from operator import itemgetter as _itemgetter

__all__ = [
    "HEADER",
    "PAYLOAD_MAX",
    "ABS_PATH_MAX",
    "REL_PATH_MAX",
    "Op",
    "ERROR_NAMES",
    "Packet",
    "PacketReader",
    "Request",
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


class Packet(tuple):
    """One XenStore message: header fields plus raw payload bytes.

    Immutable, compared and hashed by value (never equal to a plain tuple).
    A tuple underneath: building one is a single C-level allocation, which
    matters because the daemon makes two per request.  (Not a frozen
    dataclass: importing ``dataclasses`` costs the command-line tools, which
    import this module, about 10 ms per call.)
    """

    __slots__ = ()
    __match_args__ = ("op", "req_id", "tx_id", "payload")

    def __new__(cls, op: int, req_id: int = 0, tx_id: int = 0, payload: bytes = b"") -> "Packet":
        return _tuple_new(cls, (op, req_id, tx_id, payload))

    op: int = property(_itemgetter(0), doc="Message type (:class:`Op`).")  # type: ignore[assignment]
    req_id: int = property(_itemgetter(1), doc="Request id, echoed in the reply.")  # type: ignore[assignment]
    tx_id: int = property(_itemgetter(2), doc="Transaction id (0: none).")  # type: ignore[assignment]
    payload: bytes = property(_itemgetter(3), doc="Raw payload bytes.")  # type: ignore[assignment]

    # Only a Packet equals a Packet (a tuple's own comparison would say
    # Packet(2, 1, 0, b"") == (2, 1, 0, b"")).
    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and _tuple_eq(self, other)

    def __ne__(self, other: object) -> bool:
        return other.__class__ is not self.__class__ or _tuple_ne(self, other)

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return f"Packet(op={self[0]!r}, req_id={self[1]!r}, tx_id={self[2]!r}, payload={self[3]!r})"

    def __reduce__(self) -> tuple:
        return (Packet, tuple(self))

    def encode(self) -> bytes:
        """Header + payload, ready to write to the stream.

        Raises :class:`ValueError` if the payload is over the 4096-byte limit
        (that is the local caller's bug, not the peer's).
        """
        op, req_id, tx_id, payload = self
        if len(payload) > PAYLOAD_MAX:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
        return _pack_header(op, req_id, tx_id, len(payload)) + payload

    def reply(self, op: int, payload: bytes) -> "Packet":
        """A reply echoing this request's ``req_id`` and ``tx_id`` (as cxenstored)."""
        return _tuple_new(Packet, (op, self[1], self[2], payload))

    def error_reply(self, name: str) -> "Packet":
        return _tuple_new(Packet, (Op.ERROR, self[1], self[2], name.encode() + b"\x00"))

    @property
    def args(self) -> list[bytes]:
        """The payload split into NUL-terminated strings (see :func:`split_strings`)."""
        return split_strings(self[3])


_tuple_new = tuple.__new__
_tuple_eq = tuple.__eq__
_tuple_ne = tuple.__ne__
_pack_header = HEADER.pack


#: A packet as :class:`PacketReader` parses it for a server: the plain tuple
#: ``(op, req_id, tx_id, payload)``, what a :class:`Packet` holds.  Building
#: the Packet costs more than parsing the header (0.16 us): the daemon makes
#: one only for requests that take the engine's full way.
Request = tuple[int, int, int, bytes]


class PacketReader:
    """Incremental parser: feed stream bytes, pull complete packets.

    >>> r = PacketReader(); r.feed(Packet(Op.READ, 1, 0, b"/a\\0").encode())
    >>> r.next_packet()
    Packet(op=2, req_id=1, tx_id=0, payload=b'/a\\x00')

    A header announcing more than ``max_payload`` bytes raises
    :class:`ProtocolError`: the peer is broken or hostile and the stream
    cannot be resynchronised (cxenstored drops the connection).
    """

    # The unparsed bytes are ``_buf[_pos:]``: packets are sliced out of the
    # received chunk at an advancing offset (one copy per payload), and the
    # consumed head is only dropped when more data is fed.
    __slots__ = ("_buf", "_pos", "_max")

    def __init__(self, max_payload: int = PAYLOAD_MAX) -> None:
        self._buf = b""
        self._pos = 0
        self._max = max_payload

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if self._pos == len(buf):
            self._buf = data if data.__class__ is bytes else bytes(data)
        else:
            self._buf = buf[self._pos :] + data
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as packets."""
        return len(self._buf) - self._pos

    def next_packet(self) -> Packet | None:
        """The next complete packet, or ``None`` if more bytes are needed."""
        request = self.next_request()
        return None if request is None else _tuple_new(Packet, request)

    def next_request(self) -> Request | None:
        """:meth:`next_packet` as a plain :data:`Request` tuple."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 16:
            return None
        op, req_id, tx_id, length = _unpack_header(buf, pos)
        if length > self._max:
            raise ProtocolError(f"payload length {length} exceeds {self._max}")
        start = pos + 16
        end = start + length
        if len(buf) < end:
            return None
        if end == len(buf):  # all parsed: do not keep the chunk alive
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end
        return (op, req_id, tx_id, buf[start:end])

    def whole_request(self, data: bytes) -> Request | None:
        """``data`` as a :data:`Request` if nothing is buffered and it is
        exactly one well-formed packet (a client's usual chunk: one request,
        then a wait for its reply); else ``None`` and nothing changes
        (``feed`` it).  One call instead of feed + next_request + next_request."""
        if self._buf or len(data) < 16:
            return None
        op, req_id, tx_id, length = _unpack_header(data)
        if length + 16 != len(data) or length > self._max:
            return None
        return (op, req_id, tx_id, data[16:])

    def __iter__(self):
        while (packet := self.next_packet()) is not None:
            yield packet


_unpack_header = HEADER.unpack_from


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
