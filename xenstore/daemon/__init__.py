"""The ``xenstored`` daemon: the trio/socket/disk edges around the pure engine.

``main`` is the command line (``xenstored``), ``server`` the socket loop,
``journal`` persistence (journal + snapshots), ``outqueue`` the bounded
per-connection output queue and ``trace`` the ``-T`` trace file.
With ``--hypervisor``, ``hypervisor_link`` serves introduced guests over
their ring page and event channel (``domain_conn``: one guest's ring);
import them from there: they load the ring layer, which a daemon without
guests does without.
"""

from .journal import FsyncPolicy as FsyncPolicy
from .journal import JournalError as JournalError
from .journal import Recovered as Recovered
from .journal import StateDir as StateDir
from .outqueue import OutputQueue as OutputQueue
from .server import Listener as Listener
from .server import ServerConfig as ServerConfig
from .server import XenstoreServer as XenstoreServer
from .server import default_socket_path as default_socket_path
from .server import open_listener as open_listener
from .trace import Tracer as Tracer

__all__ = [
    "FsyncPolicy",
    "JournalError",
    "Listener",
    "OutputQueue",
    "Recovered",
    "ServerConfig",
    "StateDir",
    "Tracer",
    "XenstoreServer",
    "default_socket_path",
    "open_listener",
]
