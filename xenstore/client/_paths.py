"""Where the daemon listens: libxenstore's rules, exactly.

``xs_daemon_socket()``: ``$XENSTORED_PATH`` if set, else
``$XENSTORED_RUNDIR/socket``, else ``/var/run/xenstored/socket``.  If that
is not a socket, ``xs_open()`` falls back to the kernel's xenbus device
(``$XENSTORED_PATH`` again if set, else ``/dev/xen/xenbus`` when it exists,
else ``/proc/xen/xenbus``), which speaks the same protocol through
read()/write() on a character device.
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_RUNDIR", "daemon_socket_path", "domain_device_path"]

DEFAULT_RUNDIR = "/var/run/xenstored"


def daemon_socket_path(environ: "os._Environ[str] | dict[str, str] | None" = None) -> str:
    env = os.environ if environ is None else environ
    explicit = env.get("XENSTORED_PATH")
    if explicit is not None:  # getenv(): set-but-empty counts as set
        return explicit
    return env.get("XENSTORED_RUNDIR", DEFAULT_RUNDIR) + "/socket"


def domain_device_path(environ: "os._Environ[str] | dict[str, str] | None" = None) -> str:
    env = os.environ if environ is None else environ
    explicit = env.get("XENSTORED_PATH")
    if explicit is not None:  # getenv(): set-but-empty counts as set
        return explicit
    if os.path.exists("/dev/xen/xenbus"):
        return "/dev/xen/xenbus"
    return "/proc/xen/xenbus"
