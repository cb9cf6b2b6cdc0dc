"""Where split devices live in XenStore (fact sheet 4, 5.2, 3.3).

frontend directory  ``/local/domain/<F>/device/<type>/<devid>``
backend directory   ``/local/domain/<B>/backend/<type>/<F>/<devid>``

The primary console (``console`` device 0) is the exception: its frontend
directory is ``/local/domain/<F>/console`` and it is read-only for the
guest.  The toolstack writes the cross references (``backend`` /
``backend-id`` in the frontend directory, ``frontend`` / ``frontend-id`` /
``online`` in the backend directory), both ``state`` nodes = 1, and the
permission lists below.  Everything here is pure string work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DOMID_FIRST_RESERVED",
    "DeviceId",
    "domain_path",
    "frontend_type_dir",
    "backend_type_dir",
    "error_path",
    "parse_frontend_path",
    "parse_backend_path",
    "is_under",
    "guest_home_perms",
    "guest_writable_perms",
]

#: domids at and above this are special (DOMID_SELF, DOMID_INVALID, ...).
DOMID_FIRST_RESERVED = 0x7FF0

_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_NAME = re.compile(r"[A-Za-z0-9_\-@.]+")


def _check_domid(domid: int) -> int:
    if not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"invalid domid {domid!r}")
    return domid


def _check_type(kind: str) -> str:
    if not _NAME.fullmatch(kind):
        raise ValueError(f"invalid device type {kind!r}")
    return kind


def domain_path(domid: int) -> str:
    """A domain's home, ``/local/domain/<domid>`` (GET_DOMAIN_PATH)."""
    return f"/local/domain/{_check_domid(domid)}"


def frontend_type_dir(frontend_domid: int, kind: str) -> str:
    """The directory a frontend lists (and watches) to find its devices."""
    return f"{domain_path(frontend_domid)}/device/{_check_type(kind)}"


def backend_type_dir(backend_domid: int, kind: str) -> str:
    """The directory a backend lists: ``<type>/<F>/<devid>`` below it."""
    return f"{domain_path(backend_domid)}/backend/{_check_type(kind)}"


def error_path(domid: int, nodename: str) -> str:
    """Where an end reports errors about one of its devices (fact sheet 5.5).

    ``nodename`` is the device directory relative to the reporter's home
    (``device/vbd/51712`` or ``backend/vbd/5/51712``); Linux writes
    ``error/<nodename>/error`` relative to that home.
    """
    if nodename.startswith("/"):
        home = domain_path(domid) + "/"
        if not nodename.startswith(home):
            raise ValueError(f"{nodename!r} is not below {home!r}")
        nodename = nodename[len(home) :]
    return f"{domain_path(domid)}/error/{nodename}/error"


def is_under(path: str, directory: str) -> bool:
    """Is ``path`` the directory itself or inside it?  Used to drop watch
    events that are not about the other end's current directory."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def guest_home_perms(domid: int) -> tuple[str, ...]:
    """libxl's list for a domain home and most of its keys: ``n0 r<domid>``."""
    return ("n0", f"r{_check_domid(domid)}")


def guest_writable_perms(domid: int) -> tuple[str, ...]:
    """libxl's list for guest-writable keys (``error``, ``data``, ...): ``n<domid>``."""
    return (f"n{_check_domid(domid)}",)


@dataclass(frozen=True)
class DeviceId:
    """One split device: its type, both domains and its device number."""

    kind: str
    frontend_domid: int
    backend_domid: int
    devid: int

    def __post_init__(self) -> None:
        _check_type(self.kind)
        _check_domid(self.frontend_domid)
        _check_domid(self.backend_domid)
        if self.devid < 0:
            raise ValueError(f"invalid devid {self.devid!r}")

    @property
    def is_primary_console(self) -> bool:
        return self.kind == "console" and self.devid == 0

    @property
    def frontend_nodename(self) -> str:
        """The frontend directory relative to the frontend's home."""
        if self.is_primary_console:
            return "console"
        return f"device/{self.kind}/{self.devid}"

    @property
    def backend_nodename(self) -> str:
        """The backend directory relative to the backend's home."""
        return f"backend/{self.kind}/{self.frontend_domid}/{self.devid}"

    @property
    def frontend(self) -> str:
        return f"{domain_path(self.frontend_domid)}/{self.frontend_nodename}"

    @property
    def backend(self) -> str:
        return f"{domain_path(self.backend_domid)}/{self.backend_nodename}"

    @property
    def frontend_error(self) -> str:
        return error_path(self.frontend_domid, self.frontend_nodename)

    @property
    def backend_error(self) -> str:
        return error_path(self.backend_domid, self.backend_nodename)

    @property
    def libxl_path(self) -> str:
        """The toolstack's private copy: ``/libxl/<F>/device/<type>/<devid>``."""
        return f"/libxl/{self.frontend_domid}/device/{self.kind}/{self.devid}"

    @property
    def frontend_perms(self) -> tuple[str, ...]:
        """``n<F> r<B>``: the guest owns its frontend directory, the backend
        reads it; the primary console is ``n<B> r<F>`` (read-only for the
        guest)."""
        if self.is_primary_console:
            return (f"n{self.backend_domid}", f"r{self.frontend_domid}")
        return (f"n{self.frontend_domid}", f"r{self.backend_domid}")

    @property
    def backend_perms(self) -> tuple[str, ...]:
        """``n<B> r<F>``: the backend owns its directory, the guest reads it."""
        return (f"n{self.backend_domid}", f"r{self.frontend_domid}")

    def frontend_links(self) -> dict[str, str]:
        """What the toolstack writes into the frontend directory for XenBus.

        The primary console's frontend has no ``state``: it is set up by the
        domain builder, not negotiated.
        """
        links = {"backend": self.backend, "backend-id": str(self.backend_domid)}
        if not self.is_primary_console:
            links["state"] = "1"
        return links

    def backend_links(self) -> dict[str, str]:
        """What the toolstack writes into the backend directory for XenBus."""
        return {
            "frontend": self.frontend,
            "frontend-id": str(self.frontend_domid),
            "online": "1",
            "state": "1",
        }


def _domid_of(text: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"invalid domid {text!r}")
    return _check_domid(int(text))


def _devid_of(text: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"invalid devid {text!r}")
    return int(text)


def parse_frontend_path(path: str) -> tuple[int, str, int]:
    """``/local/domain/<F>/device/<type>/<devid>`` -> ``(F, type, devid)``.

    Also accepts the primary console's ``/local/domain/<F>/console``
    (-> ``(F, "console", 0)``).  Raises ``ValueError`` for anything else.
    """
    parts = path.split("/")
    if parts[:3] == ["", "local", "domain"]:
        if len(parts) == 5 and parts[4] == "console":
            return _domid_of(parts[3]), "console", 0
        if len(parts) == 7 and parts[4] == "device":
            return _domid_of(parts[3]), _check_type(parts[5]), _devid_of(parts[6])
    raise ValueError(f"not a frontend directory: {path!r}")


def parse_backend_path(path: str) -> tuple[int, str, int, int]:
    """``/local/domain/<B>/backend/<type>/<F>/<devid>`` -> ``(B, type, F, devid)``."""
    parts = path.split("/")
    if len(parts) == 8 and parts[:3] == ["", "local", "domain"] and parts[4] == "backend":
        return _domid_of(parts[3]), _check_type(parts[5]), _domid_of(parts[6]), _devid_of(parts[7])
    raise ValueError(f"not a backend directory: {path!r}")
