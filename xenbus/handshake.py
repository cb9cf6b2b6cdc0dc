"""Front/back negotiation as pure functions over key -> value maps.

In the spirit of mirage-block-xen's ``to_assoc_list`` / ``of_assoc_list``:
each record is what one end writes into its own directory at one point of
the handshake (``to_assoc()`` -> ``{key: value}`` relative to the device
directory) and what the other end parses back (``of_assoc(values, ...)``).
The trio driver layer only moves these maps in and out of XenStore.

Peer input rules (the other end may be hostile or broken):

* required keys (ring references, event channels, sizes) are parsed
  strictly; a missing or malformed one raises :class:`HandshakeError`
  carrying the errno Linux would report and the offending key;
* ``feature-*`` flags and optional limits are parsed like Linux's
  ``xenbus_read_unsigned``: absent or unparsable -> the default;
* nothing here raises anything but :class:`HandshakeError` on peer input.

Errors are reported the Xen way with :func:`format_error` (``"<errno>
<message>"``) at :func:`xenbus.paths.error_path`.
"""

from __future__ import annotations

import enum
import errno as _errno
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .paths import DOMID_FIRST_RESERVED
from .state import Role

__all__ = [
    "Values",
    "HandshakeError",
    "ERROR_VALUE_MAX",
    "format_error",
    "parse_error",
    "read_uint",
    "read_flag",
    "feature_flags",
    "negotiate_features",
    "Protocol",
    "NATIVE_PROTOCOL",
    "read_protocol",
    "OtherEnd",
    "read_other_end",
    "ring_ref_keys",
    "queue_prefix",
    "RingQueue",
    "BlkBackendFeatures",
    "BlkFrontendRings",
    "BlkBackendDisk",
    "NetBackendFeatures",
    "NetQueue",
    "NetFrontendRings",
]

#: A device directory's contents as read from XenStore (key -> value).
Values = Mapping[str, "str | bytes"]

UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF
#: Linux formats error nodes into a 4096-byte buffer including the NUL.
ERROR_VALUE_MAX = 4095

_UNSIGNED = re.compile(r"[0-9]+")
_LEADING_UNSIGNED = re.compile(r"\s*\+?([0-9]+)")


class HandshakeError(Exception):
    """The other end's keys are missing or invalid.

    ``errno`` is the positive errno to report (``format_error``); ``key``
    names the offending key when there is one.
    """

    def __init__(self, errno: int, message: str, key: str | None = None) -> None:
        self.errno = errno
        self.message = message
        self.key = key
        super().__init__(f"{message} ({_errno.errorcode.get(errno, errno)})")


# ---------------------------------------------------------------------------
# Error nodes


def format_error(errno: int, message: str) -> str:
    """The value of an ``error/.../error`` node: ``"<errno> <message>"``.

    Linux prints ``-err`` with ``%i`` where ``err`` is a negative errno, so
    the number written is positive; a negative argument is accepted and
    flipped the same way.  The result is cut to :data:`ERROR_VALUE_MAX`
    bytes like Linux's buffer (never inside a UTF-8 sequence).
    """
    text = f"{abs(int(errno))} {message}"
    raw = text.encode("utf-8")
    if len(raw) <= ERROR_VALUE_MAX:
        return text
    return raw[:ERROR_VALUE_MAX].decode("utf-8", "ignore")


def parse_error(value: str | bytes) -> tuple[int, str]:
    """Split an error node value into ``(errno, message)``.

    Raises ``ValueError`` if it does not start with a decimal number.
    """
    text = _text(value)
    number, _, message = text.partition(" ")
    if not _UNSIGNED.fullmatch(number):
        raise ValueError(f"not an error node value: {text!r}")
    return int(number), message


# ---------------------------------------------------------------------------
# Key readers


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def read_uint(
    values: Values,
    key: str,
    *,
    default: int | None = None,
    maximum: int = UINT32_MAX,
) -> int:
    """A required (``default=None``) or optional decimal key, parsed strictly.

    Missing and no default -> ``HandshakeError(ENOENT)``; present but not a
    plain decimal number in ``[0, maximum]`` -> ``HandshakeError(EINVAL)``.
    """
    raw = values.get(key)
    if raw is None:
        if default is None:
            raise HandshakeError(_errno.ENOENT, f"reading {key}", key)
        return default
    text = _text(raw)
    if not _UNSIGNED.fullmatch(text):
        raise HandshakeError(_errno.EINVAL, f"{key} is not a number: {text[:64]!r}", key)
    number = int(text)
    if number > maximum:
        raise HandshakeError(_errno.EINVAL, f"{key} out of range: {number}", key)
    return number


def _lenient_uint(values: Values, key: str, default: int) -> int:
    """``xenbus_read_unsigned``: ``%u`` prefix parse, anything odd -> default."""
    raw = values.get(key)
    if raw is None:
        return default
    match = _LEADING_UNSIGNED.match(_text(raw))
    if match is None:
        return default
    number = int(match.group(1))
    return number if number <= UINT32_MAX else default


def read_flag(values: Values, key: str, default: bool = False) -> bool:
    """A ``feature-*`` style flag: nonzero number -> True; absent or
    unparsable -> ``default`` (as Linux reads them)."""
    return _lenient_uint(values, key, int(default)) != 0


def feature_flags(values: Values) -> dict[str, bool]:
    """Every ``feature-*`` key of a directory, read as a flag."""
    return {key: read_flag(values, key) for key in values if key.startswith("feature-")}


def negotiate_features(offered: Mapping[str, bool], wanted: Mapping[str, bool]) -> frozenset[str]:
    """The features both ends enable: offered by one and wanted by the other."""
    return frozenset(k for k, on in wanted.items() if on and offered.get(k, False))


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _check_u32(what: str, value: int) -> None:
    # Local values: a bad one is a bug in the caller, not peer input.
    if not 0 <= value <= UINT32_MAX:
        raise ValueError(f"{what} out of range: {value!r}")


# ---------------------------------------------------------------------------
# ABI / protocol


class Protocol(enum.Enum):
    """Values of the frontend's ``protocol`` key (``io/protocols.h``)."""

    X86_32 = "x86_32-abi"
    X86_64 = "x86_64-abi"
    ARM = "arm-abi"


#: Absent ``protocol`` means the backend's native ABI; ours is x86_64.
NATIVE_PROTOCOL = Protocol.X86_64


def read_protocol(values: Values, native: Protocol = NATIVE_PROTOCOL) -> Protocol:
    """Absent or empty -> ``native``; unknown -> ``HandshakeError(ENOSYS)``
    (Linux blkback: "unknown fe protocol")."""
    raw = values.get("protocol")
    if raw is None or _text(raw) == "":
        return native
    text = _text(raw)
    try:
        return Protocol(text)
    except ValueError:
        raise HandshakeError(_errno.ENOSYS, f"unknown fe protocol {text[:64]!r}", "protocol") from None


# ---------------------------------------------------------------------------
# Cross references


@dataclass(frozen=True)
class OtherEnd:
    """Where the other end lives, from ``backend``/``backend-id`` (read by
    a frontend) or ``frontend``/``frontend-id`` (read by a backend)."""

    path: str
    domid: int

    @property
    def state_path(self) -> str:
        return f"{self.path}/state"


def read_other_end(role: Role, values: Values) -> OtherEnd:
    """Parse the cross reference the toolstack wrote into ``role``'s own
    directory.  Raises :class:`HandshakeError` (ENOENT / EINVAL)."""
    name = "backend" if role is Role.FRONTEND else "frontend"
    raw = values.get(name)
    if raw is None:
        raise HandshakeError(_errno.ENOENT, f"reading {name}", name)
    path = _text(raw)
    if not path.startswith("/") or path.endswith("/") or "//" in path or "\x00" in path:
        raise HandshakeError(_errno.EINVAL, f"{name} is not a path: {path[:64]!r}", name)
    domid = read_uint(values, f"{name}-id", maximum=DOMID_FIRST_RESERVED - 1)
    return OtherEnd(path, domid)


# ---------------------------------------------------------------------------
# Ring references and queues


def ring_ref_keys(order: int) -> list[str]:
    """``ring-ref`` for a one-page ring, ``ring-ref0`` ... for ``2**order`` pages
    (never both, fact sheet 9.7)."""
    if order == 0:
        return ["ring-ref"]
    return [f"ring-ref{i}" for i in range(1 << order)]


def queue_prefix(index: int, num_queues: int) -> str:
    """Keys of queue ``index``: top level for one queue, else ``queue-<n>/``."""
    return "" if num_queues == 1 else f"queue-{index}/"


@dataclass(frozen=True)
class RingQueue:
    """One (block-style) ring: its page grant references and event channel."""

    ring_refs: tuple[int, ...]
    event_channel: int

    def __post_init__(self) -> None:
        for ref in self.ring_refs:
            _check_u32("grant reference", ref)
        _check_u32("event channel", self.event_channel)


# ---------------------------------------------------------------------------
# vbd (blkif.h, fact sheet 9.3 / 9.5)


@dataclass(frozen=True)
class BlkBackendFeatures:
    """Backend keys written at probe, before ``InitWait`` (9.5 step 2)."""

    max_indirect_segments: int = 0  # 0: key absent, no BLKIF_OP_INDIRECT
    max_queues: int = 1
    max_ring_page_order: int = 0

    def __post_init__(self) -> None:
        if self.max_queues < 1 or self.max_ring_page_order < 0 or self.max_indirect_segments < 0:
            raise ValueError(f"invalid backend limits {self!r}")

    def to_assoc(self) -> dict[str, str]:
        out = {}
        if self.max_indirect_segments:
            out["feature-max-indirect-segments"] = str(self.max_indirect_segments)
        out["multi-queue-max-queues"] = str(self.max_queues)
        out["max-ring-page-order"] = str(self.max_ring_page_order)
        return out

    def choose(self, *, queues: int, ring_page_order: int) -> tuple[int, int]:
        """The frontend's pick (9.5 step 4.1): as many queues and as large a
        ring as it wants, within the backend's limits."""
        return max(1, min(queues, self.max_queues)), max(0, min(ring_page_order, self.max_ring_page_order))

    @classmethod
    def of_assoc(cls, values: Values) -> BlkBackendFeatures:
        # Optional limits: absent or garbage mean the protocol default.
        return cls(
            max_indirect_segments=_lenient_uint(values, "feature-max-indirect-segments", 0),
            max_queues=max(1, _lenient_uint(values, "multi-queue-max-queues", 1)),
            max_ring_page_order=_lenient_uint(values, "max-ring-page-order", 0),
        )


@dataclass(frozen=True)
class BlkFrontendRings:
    """Frontend keys written before ``Initialised`` (9.5 step 4)."""

    queues: tuple[RingQueue, ...]
    ring_page_order: int = 0
    protocol: Protocol = NATIVE_PROTOCOL
    persistent: bool = False

    def __post_init__(self) -> None:
        if not self.queues:
            raise ValueError("at least one queue")
        if self.ring_page_order < 0:
            raise ValueError("negative ring page order")
        pages = 1 << self.ring_page_order
        if any(len(q.ring_refs) != pages for q in self.queues):
            raise ValueError(f"every queue needs {pages} ring references")

    def to_assoc(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.ring_page_order > 0:
            out["ring-page-order"] = str(self.ring_page_order)
        n = len(self.queues)
        if n > 1:
            out["multi-queue-num-queues"] = str(n)
        for i, queue in enumerate(self.queues):
            prefix = queue_prefix(i, n)
            for key, ref in zip(ring_ref_keys(self.ring_page_order), queue.ring_refs):
                out[prefix + key] = str(ref)
            out[prefix + "event-channel"] = str(queue.event_channel)
        out["protocol"] = self.protocol.value
        out["feature-persistent"] = _flag(self.persistent)
        return out

    @classmethod
    def of_assoc(cls, values: Values, limits: BlkBackendFeatures) -> BlkFrontendRings:
        """The backend's view (9.5 step 5): validate against its own limits."""
        protocol = read_protocol(values)
        n = read_uint(values, "multi-queue-num-queues", default=1)
        if n == 0 or n > limits.max_queues:
            raise HandshakeError(
                _errno.EINVAL,
                f"guest requested {n} queues, exceeding the maximum of {limits.max_queues}",
                "multi-queue-num-queues",
            )
        order = read_uint(values, "ring-page-order", default=0)
        if order > limits.max_ring_page_order:
            raise HandshakeError(
                _errno.EINVAL,
                f"ring-page-order {order} exceeds the maximum of {limits.max_ring_page_order}",
                "ring-page-order",
            )
        queues = []
        for i in range(n):
            prefix = queue_prefix(i, n)
            refs = tuple(read_uint(values, prefix + key) for key in ring_ref_keys(order))
            queues.append(RingQueue(refs, read_uint(values, prefix + "event-channel")))
        return cls(tuple(queues), order, protocol, read_flag(values, "feature-persistent"))


@dataclass(frozen=True)
class BlkBackendDisk:
    """Backend keys written at connect, before ``Connected`` (9.5 step 5.3)."""

    sectors: int  # always 512-byte units
    info: int = 0  # VDISK_* bits
    sector_size: int = 512
    physical_sector_size: int | None = None  # None: same as sector_size
    flush_cache: bool = False
    barrier: bool = False
    discard: bool = False
    discard_granularity: int | None = None  # None: sector_size
    discard_alignment: int = 0
    discard_secure: bool = False
    persistent: bool = False

    def __post_init__(self) -> None:
        _check_disk_geometry(self.sector_size, self.physical_sector_size, ValueError)
        if not 0 <= self.sectors <= UINT64_MAX:
            raise ValueError(f"sectors out of range: {self.sectors}")

    def to_assoc(self) -> dict[str, str]:
        out = {
            "feature-flush-cache": _flag(self.flush_cache),
            "feature-barrier": _flag(self.barrier),
            "feature-discard": _flag(self.discard),
        }
        if self.discard:
            out["discard-granularity"] = str(self.discard_granularity or self.sector_size)
            out["discard-alignment"] = str(self.discard_alignment)
            if self.discard_secure:
                out["discard-secure"] = "1"
        out["feature-persistent"] = _flag(self.persistent)
        out["sectors"] = str(self.sectors)
        out["info"] = str(self.info)
        out["sector-size"] = str(self.sector_size)
        out["physical-sector-size"] = str(self.physical_sector_size or self.sector_size)
        return out

    @classmethod
    def of_assoc(cls, values: Values) -> BlkBackendDisk:
        """The frontend's view (9.5 step 6)."""
        sector_size = read_uint(values, "sector-size")
        physical = read_uint(values, "physical-sector-size", default=sector_size)
        _check_disk_geometry(sector_size, physical, _peer_geometry_error)
        discard = read_flag(values, "feature-discard")
        return cls(
            sectors=read_uint(values, "sectors", maximum=UINT64_MAX),
            info=read_uint(values, "info"),
            sector_size=sector_size,
            physical_sector_size=physical,
            flush_cache=read_flag(values, "feature-flush-cache"),
            barrier=read_flag(values, "feature-barrier"),
            discard=discard,
            discard_granularity=_lenient_uint(values, "discard-granularity", sector_size) if discard else None,
            discard_alignment=_lenient_uint(values, "discard-alignment", 0) if discard else 0,
            discard_secure=read_flag(values, "discard-secure") if discard else False,
            persistent=read_flag(values, "feature-persistent"),
        )


def _peer_geometry_error(message: str) -> HandshakeError:
    return HandshakeError(_errno.EINVAL, message, "sector-size")


def _check_disk_geometry(sector_size: int, physical: int | None, error) -> None:
    if sector_size < 512 or sector_size & (sector_size - 1):
        raise error(f"sector-size must be a power of two >= 512, got {sector_size}")
    if physical is not None and (physical < sector_size or physical % sector_size):
        raise error(f"physical-sector-size {physical} is not a multiple of {sector_size}")


# ---------------------------------------------------------------------------
# vif (netif.h, fact sheet 10.3 / 10.5)


@dataclass(frozen=True)
class NetBackendFeatures:
    """Backend keys written at probe (10.5 step 2)."""

    sg: bool = True
    gso_tcpv4: bool = True
    gso_tcpv6: bool = True
    ipv6_csum_offload: bool = True
    rx_copy: bool = True
    multicast_control: bool = False
    dynamic_multicast_control: bool = False
    split_event_channels: bool = False
    max_queues: int | None = None  # None: key absent (no multi-queue keys at all)
    ctrl_ring: bool = False

    def to_assoc(self) -> dict[str, str]:
        out = {
            "feature-sg": _flag(self.sg),
            "feature-gso-tcpv4": _flag(self.gso_tcpv4),
            "feature-gso-tcpv6": _flag(self.gso_tcpv6),
            "feature-ipv6-csum-offload": _flag(self.ipv6_csum_offload),
            "feature-rx-copy": _flag(self.rx_copy),
            "feature-rx-flip": "0",  # the page-flipping receive path is gone
            "feature-multicast-control": _flag(self.multicast_control),
            "feature-dynamic-multicast-control": _flag(self.dynamic_multicast_control),
            "feature-split-event-channels": _flag(self.split_event_channels),
        }
        if self.max_queues is not None:
            out["multi-queue-max-queues"] = str(self.max_queues)
        out["feature-ctrl-ring"] = _flag(self.ctrl_ring)
        return out

    def choose_queues(self, wanted: int) -> int:
        """Queues the frontend may use: 1 unless the backend advertised more."""
        return max(1, min(wanted, self.max_queues or 1))

    @classmethod
    def of_assoc(cls, values: Values) -> NetBackendFeatures:
        """The frontend's view (10.5 step 3); netfront gives up without rx-copy."""
        if not read_flag(values, "feature-rx-copy"):
            raise HandshakeError(_errno.EOPNOTSUPP, "backend does not support rx-copy", "feature-rx-copy")
        max_queues = None
        if "multi-queue-max-queues" in values:
            max_queues = max(1, _lenient_uint(values, "multi-queue-max-queues", 1))
        return cls(
            sg=read_flag(values, "feature-sg"),
            gso_tcpv4=read_flag(values, "feature-gso-tcpv4"),
            gso_tcpv6=read_flag(values, "feature-gso-tcpv6"),
            ipv6_csum_offload=read_flag(values, "feature-ipv6-csum-offload"),
            rx_copy=True,
            multicast_control=read_flag(values, "feature-multicast-control"),
            dynamic_multicast_control=read_flag(values, "feature-dynamic-multicast-control"),
            split_event_channels=read_flag(values, "feature-split-event-channels"),
            max_queues=max_queues,
            ctrl_ring=read_flag(values, "feature-ctrl-ring"),
        )


@dataclass(frozen=True)
class NetQueue:
    """One network queue: a TX and an RX ring, one or two event channels."""

    tx_ring_ref: int
    rx_ring_ref: int
    event_channel_tx: int
    event_channel_rx: int | None = None  # None: one channel for both

    def __post_init__(self) -> None:
        for what in ("tx_ring_ref", "rx_ring_ref", "event_channel_tx"):
            _check_u32(what, getattr(self, what))
        if self.event_channel_rx is not None:
            _check_u32("event_channel_rx", self.event_channel_rx)

    @property
    def split(self) -> bool:
        return self.event_channel_rx is not None


@dataclass(frozen=True)
class NetFrontendRings:
    """Frontend keys written before switching to ``Connected`` (10.5 step 3.4)."""

    queues: tuple[NetQueue, ...]
    sg: bool = True
    gso_tcpv4: bool = True
    gso_tcpv6: bool = True
    ipv6_csum_offload: bool = True
    no_csum_offload: bool = False
    rx_notify: bool = True
    request_multicast_control: bool = False
    ctrl_ring_ref: int | None = None
    ctrl_event_channel: int | None = None
    multi_queue: bool = field(default=False)  # backend advertised multi-queue-max-queues

    def __post_init__(self) -> None:
        if not self.queues:
            raise ValueError("at least one queue")
        if len(self.queues) > 1 and not self.multi_queue:
            raise ValueError("several queues need a backend that advertised multi-queue")
        if (self.ctrl_ring_ref is None) != (self.ctrl_event_channel is None):
            raise ValueError("control ring needs both a ring reference and an event channel")

    def to_assoc(self) -> dict[str, str]:
        out: dict[str, str] = {}
        n = len(self.queues)
        if self.multi_queue:
            out["multi-queue-num-queues"] = str(n)
        for i, queue in enumerate(self.queues):
            prefix = queue_prefix(i, n)
            out[prefix + "tx-ring-ref"] = str(queue.tx_ring_ref)
            out[prefix + "rx-ring-ref"] = str(queue.rx_ring_ref)
            if queue.split:
                out[prefix + "event-channel-tx"] = str(queue.event_channel_tx)
                out[prefix + "event-channel-rx"] = str(queue.event_channel_rx)
            else:
                out[prefix + "event-channel"] = str(queue.event_channel_tx)
        out["request-rx-copy"] = "1"
        out["feature-rx-notify"] = _flag(self.rx_notify)
        out["feature-sg"] = _flag(self.sg)
        out["feature-gso-tcpv4"] = _flag(self.gso_tcpv4)
        out["feature-gso-tcpv6"] = _flag(self.gso_tcpv6)
        out["feature-ipv6-csum-offload"] = _flag(self.ipv6_csum_offload)
        if self.no_csum_offload:
            out["feature-no-csum-offload"] = "1"
        if self.request_multicast_control:
            out["request-multicast-control"] = "1"
        if self.ctrl_ring_ref is not None:
            out["ctrl-ring-ref"] = str(self.ctrl_ring_ref)
            out["event-channel-ctrl"] = str(self.ctrl_event_channel)
        return out

    @classmethod
    def of_assoc(cls, values: Values, backend: NetBackendFeatures) -> NetFrontendRings:
        """The backend's view (10.5 step 4)."""
        limit = backend.max_queues or 1
        n = read_uint(values, "multi-queue-num-queues", default=1)
        if n == 0 or n > limit:
            raise HandshakeError(
                _errno.EINVAL,
                f"guest requested {n} queues, exceeding the maximum of {limit}",
                "multi-queue-num-queues",
            )
        if not read_flag(values, "request-rx-copy"):
            raise HandshakeError(_errno.EOPNOTSUPP, "frontend must request rx-copy", "request-rx-copy")
        queues = []
        for i in range(n):
            prefix = queue_prefix(i, n)
            tx = read_uint(values, prefix + "tx-ring-ref")
            rx = read_uint(values, prefix + "rx-ring-ref")
            # Split channels first, then the shared one (as netback does).
            if prefix + "event-channel-tx" in values:
                queue = NetQueue(
                    tx,
                    rx,
                    read_uint(values, prefix + "event-channel-tx"),
                    read_uint(values, prefix + "event-channel-rx"),
                )
            else:
                queue = NetQueue(tx, rx, read_uint(values, prefix + "event-channel"))
            queues.append(queue)
        ctrl_ref = ctrl_port = None
        if "ctrl-ring-ref" in values:
            ctrl_ref = read_uint(values, "ctrl-ring-ref")
            ctrl_port = read_uint(values, "event-channel-ctrl")
        return cls(
            queues=tuple(queues),
            sg=read_flag(values, "feature-sg"),
            gso_tcpv4=read_flag(values, "feature-gso-tcpv4"),
            gso_tcpv6=read_flag(values, "feature-gso-tcpv6"),
            ipv6_csum_offload=read_flag(values, "feature-ipv6-csum-offload"),
            no_csum_offload=read_flag(values, "feature-no-csum-offload"),
            rx_notify=read_flag(values, "feature-rx-notify"),
            request_multicast_control=read_flag(values, "request-multicast-control"),
            ctrl_ring_ref=ctrl_ref,
            ctrl_event_channel=ctrl_port,
            multi_queue="multi-queue-num-queues" in values,
        )
