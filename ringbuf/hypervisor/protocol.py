"""Control protocol of the hypervisor service: msgpack messages.  Sans-IO.

Transport: a ``SOCK_SEQPACKET`` unix socket, so one packet is one message and
file descriptors passed with ``SCM_RIGHTS`` arrive attached to exactly the
message that announced them (``nfds``).  This module only turns messages
into bytes and back and validates them; it never touches a socket.

Messages are msgpack maps:

* request  ``{"t": "req", "id": int, "op": str, "a": {...}}`` (client → service)
* reply    ``{"t": "rep", "id": int, "r": result, "nfds": int}`` or, on failure,
  ``{"t": "rep", "id": int, "err": "EINVAL", "msg": str, "gnt": status|None, "nfds": 0}``
* notice   ``{"t": "ntc", "kind": str, "a": {...}}`` (service → client, unsolicited)

Request argument schemas are data (:data:`OPS`); a request that does not fit
is answered with ``EINVAL`` and the connection stays up, while bytes that are
not a message at all are a :class:`ProtocolError` (the peer is disconnected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

__all__ = [
    "MAX_MESSAGE", "MAX_FDS", "OPS", "PRIVILEGED_OPS", "ProtocolError",
    "Request", "Reply", "Notice", "Message", "encode", "decode", "validate_args",
]

#: Largest encoded message (and receive buffer size).
MAX_MESSAGE = 64 * 1024
#: Most file descriptors one message carries.
MAX_FDS = 4
#: Most refs in one map request or segments in one copy request.
MAX_BATCH = 512


class ProtocolError(Exception):
    """The peer sent something that is not a valid message."""


_INT = "int"
_BOOL = "bool"
_INTS = "list[int]"
_SEGMENTS = "list[segment]"

#: op name → {argument: type}; every argument is required.
OPS: dict[str, dict[str, str]] = {
    "hello": {},
    "create_domain": {"nr_pages": _INT, "grant_frames": _INT},
    "destroy_domain": {"domid": _INT},
    "domain_info": {"domid": _INT},
    "list_domains": {},
    "shutdown": {"reason": _INT},
    "foreign_memory": {"domid": _INT},
    "seed_grant": {"domid": _INT, "ref": _INT, "grantee": _INT, "gfn": _INT, "readonly": _BOOL},
    "reserve_refs": {"count": _INT},
    "end_access": {"ref": _INT},
    "map_grants": {"domid": _INT, "refs": _INTS, "readonly": _BOOL},
    "unmap_grants": {"handle": _INT},
    "grant_copy": {"segments": _SEGMENTS},
    "alloc_unbound": {"dom": _INT, "remote_dom": _INT},
    "bind_interdomain": {"remote_dom": _INT, "remote_port": _INT},
    "bind_virq": {"virq": _INT},
    "attach_port": {"port": _INT},
    "close_port": {"port": _INT},
    "port_status": {"dom": _INT, "port": _INT},
}

#: ops only a privileged domain (dom0) may use
PRIVILEGED_OPS = frozenset({"create_domain", "destroy_domain", "list_domains",
                            "foreign_memory", "seed_grant", "bind_virq"})

_U32 = 0xFFFFFFFF


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U32


def _check(kind: str, value: Any) -> bool:
    if kind == _INT:
        return _is_int(value)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _INTS:
        return (isinstance(value, list) and 0 < len(value) <= MAX_BATCH
                and all(_is_int(v) for v in value))
    if kind == _SEGMENTS:
        return (isinstance(value, list) and 0 < len(value) <= MAX_BATCH
                and all(_is_segment(v) for v in value))
    raise AssertionError(kind)


def _is_side(side: Any) -> bool:
    # [domid, offset, ref or None, gfn or None]: exactly one of ref/gfn
    return (isinstance(side, list) and len(side) == 4 and _is_int(side[0]) and _is_int(side[1])
            and (side[2] is None) != (side[3] is None)
            and all(v is None or _is_int(v) for v in side[2:]))


def _is_segment(seg: Any) -> bool:
    return (isinstance(seg, list) and len(seg) == 3 and _is_side(seg[0]) and _is_side(seg[1])
            and _is_int(seg[2]))


def validate_args(op: str, args: Any) -> str | None:
    """None if ``args`` fit ``op``'s schema, else a reason."""
    schema = OPS.get(op)
    if schema is None:
        return f"unknown op {op!r}"
    if not isinstance(args, dict):
        return "arguments must be a map"
    if set(args) != set(schema):
        return f"{op} takes {sorted(schema)}"
    for name, kind in schema.items():
        if not _check(kind, args[name]):
            return f"{op}: bad {name}"
    return None


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    id: int
    result: Any = None
    nfds: int = 0
    error: str | None = None
    message: str = ""
    grant_status: int | None = None


@dataclass(frozen=True)
class Notice:
    kind: str
    args: dict[str, Any] = field(default_factory=dict)


Message = Request | Reply | Notice


def encode(msg: Message) -> bytes:
    if isinstance(msg, Request):
        obj: dict[str, Any] = {"t": "req", "id": msg.id, "op": msg.op, "a": msg.args}
    elif isinstance(msg, Reply):
        if msg.error is None:
            obj = {"t": "rep", "id": msg.id, "r": msg.result, "nfds": msg.nfds}
        else:
            obj = {"t": "rep", "id": msg.id, "err": msg.error, "msg": msg.message,
                   "gnt": msg.grant_status, "nfds": 0}
    elif isinstance(msg, Notice):
        obj = {"t": "ntc", "kind": msg.kind, "a": msg.args}
    else:
        raise TypeError(f"not a message: {msg!r}")
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def _field(obj: dict, name: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"field {name!r} missing or not {kind.__name__}")
    return value


def decode(data: bytes, nfds: int = 0) -> Message:
    """Parse one packet that arrived with ``nfds`` file descriptors."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("message too large")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a map")
    kind = obj.get("t")
    if kind == "req":
        if nfds:
            raise ProtocolError("requests carry no file descriptors")
        return Request(_field(obj, "id", int), _field(obj, "op", str), _field(obj, "a", dict))
    if kind == "rep":
        declared = _field(obj, "nfds", int)
        if declared != nfds:
            raise ProtocolError(f"reply announced {declared} fds, {nfds} arrived")
        if "err" in obj:
            gnt = obj.get("gnt")
            if gnt is not None and not isinstance(gnt, int):
                raise ProtocolError("bad grant status")
            return Reply(_field(obj, "id", int), error=_field(obj, "err", str),
                         message=_field(obj, "msg", str), grant_status=gnt)
        return Reply(_field(obj, "id", int), result=obj.get("r"), nfds=declared)
    if kind == "ntc":
        if nfds:
            raise ProtocolError("notices carry no file descriptors")
        return Notice(_field(obj, "kind", str), _field(obj, "a", dict))
    raise ProtocolError(f"unknown message type {kind!r}")
