"""The pure XenStore engine (no I/O): store, permissions, transactions,
watches, quotas, domains and the request dispatcher.  See XENSTORE_API.md."""

from .connection import Connection as Connection
from .domains import Introduced as Introduced
from .domains import Released as Released
from .engine import Engine as Engine
from .limits import Limits as Limits
from .memory import MemoryQuotaNotice as MemoryQuotaNotice
from .perms import Perms as Perms
from .store import Node as Node
from .store import Store as Store

__all__ = ["Connection", "Engine", "Introduced", "Limits", "MemoryQuotaNotice", "Node", "Perms", "Released", "Store"]
