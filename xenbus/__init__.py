"""XenBus: the front/back device handshake on top of XenStore.

The pure parts (no trio, no I/O):

* :mod:`xenbus.state`     -- ``XenbusState``, the transition table and the
  decision rules (``decide``) both ends use;
* :mod:`xenbus.paths`     -- device directories, cross references, permissions;
* :mod:`xenbus.handshake` -- what each end writes and parses at each state
  (``to_assoc`` / ``of_assoc``) and error nodes;
* :mod:`xenbus.console`   -- PV console keys and page constants.

The trio driver layer (:mod:`xenbus.driver`: ``Frontend``, ``Backend``, the
``Store`` protocol) and the device hosts (:mod:`xenbus.backend_host`,
:mod:`xenbus.frontend_host`: one driver task per device directory) are
imported on first use of those names.  The PV console lives in
:mod:`xenbus.console_frontend` / :mod:`xenbus.console_backend` /
:mod:`xenbus.consoled`, the ``uxl`` toolstack in :mod:`xenbus.toolstack`.
"""

from .handshake import BlkBackendDisk as BlkBackendDisk
from .handshake import BlkBackendFeatures as BlkBackendFeatures
from .handshake import BlkFrontendRings as BlkFrontendRings
from .handshake import HandshakeError as HandshakeError
from .handshake import NetBackendFeatures as NetBackendFeatures
from .handshake import NetFrontendRings as NetFrontendRings
from .handshake import NetQueue as NetQueue
from .handshake import OtherEnd as OtherEnd
from .handshake import Protocol as Protocol
from .handshake import RingQueue as RingQueue
from .handshake import feature_flags as feature_flags
from .handshake import format_error as format_error
from .handshake import negotiate_features as negotiate_features
from .handshake import parse_error as parse_error
from .handshake import read_other_end as read_other_end
from .paths import DeviceId as DeviceId
from .paths import error_path as error_path
from .paths import parse_backend_path as parse_backend_path
from .paths import parse_frontend_path as parse_frontend_path
from .state import Local as Local
from .state import Role as Role
from .state import Step as Step
from .state import Work as Work
from .state import XenbusState as XenbusState
from .state import decide as decide
from .state import is_allowed as is_allowed
from .state import parse_state as parse_state

_LAZY_DRIVER_NAMES = ("Frontend", "Backend", "Driver", "Store", "StoreOps", "transact", "read_directory")
_LAZY_HOST_NAMES = {"BackendHost": "backend_host", "FrontendHost": "frontend_host", "DeviceHost": "device_host"}


def __getattr__(name: str):
    # Keep `import xenbus.state` etc. free of trio: the driver is loaded lazily.
    if name in _LAZY_DRIVER_NAMES:
        from . import driver

        return getattr(driver, name)
    if name in _LAZY_HOST_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_HOST_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'xenbus' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_DRIVER_NAMES) | set(_LAZY_HOST_NAMES))
