"""Client-side operations, sans-IO: request payloads and reply parsers.

Each ``Request.<operation>(...)`` constructor gives the message type, the
payload to send and how to turn the reply payload into a Python value.  The
async client, the synchronous client and the CLI all send these same
requests, so the encoding rules of ``xs_wire.h`` (one NUL after each string
argument, none after a ``WRITE`` value...) live here once.

Paths and names are ``str`` or ``bytes``; ``str`` is encoded as UTF-8 with
``surrogateescape`` so that any byte string given on a command line round
trips.  Values are ``bytes`` (``str`` is accepted and UTF-8 encoded).
"""

from __future__ import annotations

from ..wire import Op, XenStoreError, split_strings

TYPE_CHECKING = False  # importing typing costs milliseconds the CLI tools cannot spare
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable

__all__ = [
    "Request",
    "Perm",
    "DirectoryPartAssembler",
    "to_bytes",
    "to_str",
    "parse_reply",
]


def to_bytes(value: str | bytes) -> bytes:
    """``str`` -> UTF-8 (surrogateescape, so ``os.fsencode`` round trips)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def to_str(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _strings(*args: str | bytes | int) -> bytes:
    out = bytearray()
    for arg in args:
        if isinstance(arg, int):
            arg = str(arg)
        out += to_bytes(arg)
        out += b"\0"
    return bytes(out)


def _strip_nul(payload: bytes) -> bytes:
    """Replies like ``<id>\\0``: drop the terminator (and anything after)."""
    end = payload.find(b"\0")
    return payload if end < 0 else payload[:end]


def _expect_ok(payload: bytes) -> None:
    # Acknowledgements are "OK\0"; like libxenstore, ignore the body.
    return None


def _int_reply(payload: bytes) -> int:
    text = _strip_nul(payload)
    try:
        return int(text)
    except ValueError:
        raise XenStoreError("EINVAL", f"not a number: {text!r}") from None


def _names(payload: bytes) -> list[str]:
    return [to_str(name) for name in split_strings(payload)]


class Perm(tuple):
    """One permission entry ``(access, domid)``, ``access`` in ``"nrwb"``.

    The first entry of a list is the owner (its letter is the access of
    everybody not listed).  ``str(Perm("r", 5)) == "r5"`` is the wire form.
    (A plain tuple subclass rather than a NamedTuple: importing ``typing``
    would slow down every CLI call.)
    """

    __slots__ = ()

    def __new__(cls, access: str, domid: int) -> "Perm":
        if access not in ("n", "r", "w", "b"):
            raise ValueError(f"invalid access {access!r}")
        return tuple.__new__(cls, (access, int(domid)))

    @property
    def access(self) -> str:
        return self[0]

    @property
    def domid(self) -> int:
        return self[1]

    def __repr__(self) -> str:
        return f"Perm({self[0]!r}, {self[1]})"

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"

    @classmethod
    def parse(cls, text: str | bytes) -> "Perm":
        """Parse ``"r5"``; raises :class:`ValueError` on anything else."""
        text = to_str(to_bytes(text))
        if len(text) < 2 or text[0] not in "nrwb" or not text[1:].isdigit():
            raise ValueError(f"invalid permission {text!r}")
        return cls(text[0], int(text[1:]))


def _perms_reply(payload: bytes) -> list[Perm]:
    try:
        return [Perm.parse(entry) for entry in split_strings(payload)]
    except ValueError as exc:
        raise XenStoreError("EINVAL", str(exc)) from None


class Request:
    """One request to send and the parser for its successful reply.

    ``transactional``: operations executed inside a transaction carry its
    id; the others (watches, domain management) always travel with
    ``tx_id`` 0.
    """

    __slots__ = ("op", "payload", "parse", "transactional", "error_values")

    def __init__(
        self,
        op: int,
        payload: bytes,
        parse: "Callable[[bytes], Any]",
        transactional: bool = False,
        error_values: "dict[str, Any] | None" = None,
    ) -> None:
        self.op = op
        self.payload = payload
        self.parse = parse
        self.transactional = transactional
        #: Error names that are an answer, not a failure (e.g. ``UNWATCH``
        #: of an unknown watch -> ``False``).
        self.error_values = error_values

    def __repr__(self) -> str:
        return f"Request(op={self.op}, payload={self.payload!r})"

    # -- constructors, one per operation --------------------------------

    @classmethod
    def read(cls, path: str | bytes) -> "Request":
        return cls(Op.READ, _strings(path), bytes, True)

    @classmethod
    def write(cls, path: str | bytes, value: str | bytes) -> "Request":
        return cls(Op.WRITE, _strings(path) + to_bytes(value), _expect_ok, True)

    @classmethod
    def mkdir(cls, path: str | bytes) -> "Request":
        return cls(Op.MKDIR, _strings(path), _expect_ok, True)

    @classmethod
    def rm(cls, path: str | bytes) -> "Request":
        return cls(Op.RM, _strings(path), _expect_ok, True)

    @classmethod
    def directory(cls, path: str | bytes) -> "Request":
        return cls(Op.DIRECTORY, _strings(path), _names, True)

    @classmethod
    def directory_part(cls, path: str | bytes, offset: int) -> "Request":
        """Raw reply (``<gen>\\0<names>``): feed it to :class:`DirectoryPartAssembler`."""
        return cls(Op.DIRECTORY_PART, _strings(path, offset), bytes, True)

    @classmethod
    def get_perms(cls, path: str | bytes) -> "Request":
        return cls(Op.GET_PERMS, _strings(path), _perms_reply, True)

    @classmethod
    def set_perms(cls, path: str | bytes, perms: "Iterable[Perm | str]") -> "Request":
        # An empty list is the daemon's to refuse (EINVAL), as with libxenstore.
        entries = [str(p) for p in perms]
        return cls(Op.SET_PERMS, _strings(path, *entries), _expect_ok, True)

    @classmethod
    def watch(cls, path: str | bytes, token: str | bytes, depth: int | None = None) -> "Request":
        args: tuple = (path, token) if depth is None else (path, token, depth)
        return cls(Op.WATCH, _strings(*args), _expect_ok)

    @classmethod
    def unwatch(cls, path: str | bytes, token: str | bytes) -> "Request":
        """``True``, or ``False`` if there was no such watch (not an error)."""
        return cls(Op.UNWATCH, _strings(path, token), lambda p: True, error_values={"ENOENT": False})

    @classmethod
    def reset_watches(cls) -> "Request":
        return cls(Op.RESET_WATCHES, b"\0", _expect_ok)

    @classmethod
    def transaction_start(cls) -> "Request":
        return cls(Op.TRANSACTION_START, b"\0", _int_reply)

    @classmethod
    def transaction_end(cls, commit: bool) -> "Request":
        # Sent with the transaction's id in the header (transactional).
        return cls(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", _expect_ok, True)

    @classmethod
    def get_domain_path(cls, domid: int) -> "Request":
        return cls(Op.GET_DOMAIN_PATH, _strings(domid), lambda p: to_str(_strip_nul(p)))

    @classmethod
    def introduce(cls, domid: int, gfn: int, port: int) -> "Request":
        return cls(Op.INTRODUCE, _strings(domid, gfn, port), _expect_ok)

    @classmethod
    def release(cls, domid: int) -> "Request":
        return cls(Op.RELEASE, _strings(domid), _expect_ok)

    @classmethod
    def is_domain_introduced(cls, domid: int) -> "Request":
        return cls(Op.IS_DOMAIN_INTRODUCED, _strings(domid), lambda p: _strip_nul(p) != b"F")

    @classmethod
    def resume(cls, domid: int) -> "Request":
        return cls(Op.RESUME, _strings(domid), _expect_ok)

    @classmethod
    def set_target(cls, domid: int, target: int) -> "Request":
        return cls(Op.SET_TARGET, _strings(domid, target), _expect_ok)

    @classmethod
    def control(cls, command: str | bytes, *args: str | bytes) -> "Request":
        """Reply: the daemon's text up to its NUL (``b"OK"`` for most commands)."""
        return cls(Op.CONTROL, _strings(command, *args), _strip_nul)

    @classmethod
    def get_feature(cls, domid: int | None = None) -> "Request":
        payload = b"" if domid is None else _strings(domid)
        return cls(Op.GET_FEATURE, payload, _int_reply)

    @classmethod
    def set_feature(cls, domid: int, features: int) -> "Request":
        return cls(Op.SET_FEATURE, _strings(domid, features), _expect_ok)

    @classmethod
    def get_quota(cls, name: str | None = None, domid: int | None = None) -> "Request":
        """No name: the list of quota names; else that quota's value."""
        if name is None:
            if domid is not None:
                raise ValueError("a domain's quota needs a quota name")
            return cls(Op.GET_QUOTA, b"", lambda p: to_str(_strip_nul(p)).split())
        args: tuple = (name,) if domid is None else (domid, name)
        return cls(Op.GET_QUOTA, _strings(*args), _int_reply)

    @classmethod
    def set_quota(cls, name: str, value: int, domid: int | None = None) -> "Request":
        args: tuple = (name, value) if domid is None else (domid, name, value)
        return cls(Op.SET_QUOTA, _strings(*args), _expect_ok)


def parse_reply(request: Request, op: int, payload: bytes) -> "Any":
    """The value of a reply to ``request``; raises :class:`XenStoreError`.

    An ``ERROR`` reply carries the error name; a reply of any type other
    than the request's is a broken daemon (libxenstore closes the
    connection with ``EBADF``; we report ``EINVAL`` with a detail).
    """
    if op == Op.ERROR:
        name = to_str(_strip_nul(payload)) or "EINVAL"
        if request.error_values and name in request.error_values:
            return request.error_values[name]
        raise XenStoreError(name)
    if op != request.op:
        raise XenStoreError("EINVAL", f"reply of type {op} to a request of type {request.op}")
    return request.parse(payload)


class DirectoryPartAssembler:
    """Collects ``DIRECTORY_PART`` replies into the full child list.

    Used like libxenstore's ``xs_directory_part``: ask at :attr:`offset`,
    :meth:`feed` each reply until it returns the names.  If the node's
    generation changes between replies the listing restarts at offset 0.
    """

    def __init__(self) -> None:
        self.offset = 0
        self._gen: bytes | None = None
        self._data = bytearray()

    def feed(self, reply: bytes) -> list[str] | None:
        """The complete list, or ``None`` if another request is needed."""
        gen, sep, names = reply.partition(b"\0")
        if not sep:
            raise XenStoreError("EINVAL", "malformed DIRECTORY_PART reply")
        if self._gen is None:
            self._gen = gen
        elif gen != self._gen:
            # The directory changed under us: start over.
            self._gen = None
            self._data.clear()
            self.offset = 0
            return None
        if not names:
            raise XenStoreError("EINVAL", "empty DIRECTORY_PART reply")
        self._data += names
        self.offset += len(names)
        # The last part ends with an extra NUL ("a\0b\0" + "\0"); a
        # listing of no children is just "\0".
        if len(self._data) <= 1 or self._data[-2] == 0:
            return _names(bytes(self._data[:-1]))
        return None

